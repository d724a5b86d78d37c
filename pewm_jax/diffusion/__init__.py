"""Flow-matching objective and few-step samplers with text / SGG classifier-free guidance."""

from pewm_jax.diffusion.flow import (
    frames_to_model,
    interpolate,
    loss_fn,
    model_to_unit,
    sample_time,
    velocity_target,
)
from pewm_jax.diffusion.samplers import guided_velocity, sample, sample_from_config

__all__ = ["frames_to_model", "guided_velocity", "interpolate", "loss_fn", "model_to_unit",
           "sample", "sample_from_config", "sample_time", "velocity_target"]
