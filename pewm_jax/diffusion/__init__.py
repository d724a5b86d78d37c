"""Flow-matching objective and few-step samplers with text / SGG classifier-free guidance."""

from pewm_jax.diffusion.flow import (
    clip_to_target,
    frames_to_model,
    interpolate,
    loss_fn,
    model_to_unit,
    output_to_velocity,
    sample_time,
    target_settings,
    target_to_unit,
    velocity_target,
)
from pewm_jax.diffusion.samplers import guided_velocity, sample, sample_from_config

__all__ = ["clip_to_target", "frames_to_model", "guided_velocity", "interpolate", "loss_fn",
           "model_to_unit", "output_to_velocity", "sample", "sample_from_config", "sample_time",
           "target_settings", "target_to_unit", "velocity_target"]
