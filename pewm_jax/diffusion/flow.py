"""Rectified-flow (flow-matching) objective with logit-normal time sampling.

Convention: data x0 and Gaussian noise e are joined by the straight path
    x_t = (1 - t) * x0 + t * e,        t in [0, 1]  (t = 0: data, t = 1: pure noise),
whose velocity dx_t/dt = e - x0 is the regression target. Samplers integrate the predicted
velocity from t = 1 down to t = 0. Training times are logit-normal, t = sigmoid(m + s * n),
n ~ N(0, 1) (SD3), which spends most steps at intermediate noise levels.

Pixels: uint8 frames map to [-1, 1] (`frames_to_model`), samples back to [0, 1].

Target (`diffusion.target`): 'frames' diffuses the clip's pixels; 'residual' diffuses the clip's
change from the last context frame, times `diffusion.residual_scale`, so the still scene (most
of a primitive clip) is copied exactly and the model spends its capacity on what moves.

Prediction (`diffusion.prediction`): the network outputs either the velocity ('velocity') or the
clean data x0 ('clean', as in JiT, Li & He 2025), turned into the velocity
v = (x_t - x0_hat) / max(t, T_MIN) for the loss and the sampler. Clean data lies on a
low-dimensional manifold, noise does not: a narrow pixel-space model (patch dimension above
its width) predicts x0 far better than v, and its zero-initialised output head starts at
x0_hat = 0, which with the residual target is the copied context frame.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from pewm_jax.config import DIFFUSION_PREDICTIONS, DIFFUSION_TARGETS
from pewm_jax.models.video_dit import WorldModel
from pewm_jax.sgg import render_heatmaps


def frames_to_model(frames: jax.Array) -> jax.Array:
    """uint8 frames (..., 3) in [0, 255] -> float32 in [-1, 1]."""
    return frames.astype(jnp.float32) / 127.5 - 1.0


def model_to_unit(x: jax.Array) -> jax.Array:
    """Model-space pixels (about [-1, 1]) -> float32 clipped to [0, 1]."""
    return jnp.clip((x.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


T_MIN = 0.05  # clean prediction: smallest time divided by (keeps v finite near the data)


def clip_to_target(frames: jax.Array, context: jax.Array, target: str,
                   residual_scale: float) -> jax.Array:
    """Model-space clip (B, T, N, N, 3) -> the diffused data x0 for `target` (module doc);
    context (B, C, N, N, 3) in model space."""
    if target == "frames":
        return frames
    if target == "residual":
        return (frames - context[:, -1:]) * residual_scale  # (B, T, N, N, 3)
    raise ValueError(f"diffusion target must be one of {DIFFUSION_TARGETS}, got {target!r}")


def target_to_unit(x: jax.Array, context: jax.Array, target: str,
                   residual_scale: float) -> jax.Array:
    """Inverse of `clip_to_target`, to pixels clipped to [0, 1]: (B, T, N, N, 3) float32."""
    if target == "residual":
        x = x / residual_scale + context[:, -1:]  # (B, T, N, N, 3)
    elif target != "frames":
        raise ValueError(f"diffusion target must be one of {DIFFUSION_TARGETS}, got {target!r}")
    return model_to_unit(x)


def target_settings(config: ml_collections.ConfigDict) -> dict[str, str | float]:
    """`target`, `residual_scale` and `prediction` of a config's diffusion section (for
    checkpoints saved before these options existed: frames and velocity)."""
    d = config.diffusion
    return {"target": d.get("target", "frames"),
            "residual_scale": float(d.get("residual_scale", 1.0)),
            "prediction": d.get("prediction", "velocity")}


def output_to_velocity(out: jax.Array, x_t: jax.Array, t: jax.Array,
                       prediction: str) -> jax.Array:
    """The network's output (B, T, N, N, 3) as a velocity, for `prediction` (module doc);
    t (B,) flow times."""
    if prediction == "velocity":
        return out
    if prediction == "clean":
        t = jnp.maximum(t, T_MIN).reshape((-1,) + (1,) * (x_t.ndim - 1))  # (B, 1, 1, 1, 1)
        return (x_t - out) / t  # (B, T, N, N, 3)
    raise ValueError(f"diffusion prediction must be one of {DIFFUSION_PREDICTIONS}, got "
                     f"{prediction!r}")


def sample_time(rng: jax.Array, batch_size: int, mean: float, std: float) -> jax.Array:
    """Logit-normal flow times (B,) in (0, 1)."""
    return jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch_size,)))


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x0 + t noise for x0, noise (B, ...) and t (B,)."""
    t = t.reshape((-1,) + (1,) * (x0.ndim - 1))  # (B, 1, ...)
    return (1.0 - t) * x0 + t * noise  # (B, ...)


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The path's velocity dx_t/dt = noise - x0 (independent of t)."""
    return noise - x0


def loss_fn(model: WorldModel, batch: Mapping[str, jax.Array], rng: jax.Array,
            config: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Flow-matching MSE of one batch (the `BatchSpec` keys) and its metrics.

    Text and SGG are dropped independently per clip with probability
    `config.diffusion.cond_dropout` (text: the cross-attention mask is cleared, leaving the null
    token; SGG: zero heatmaps and zero injection), so classifier-free guidance can scale each.
    Clips with `sgg_valid` False always train without SGG. Call inside a jitted step.
    """
    d = config.diffusion
    context = frames_to_model(batch["context"])  # (B, C, N, N, 3)
    settings = target_settings(config)
    x0 = clip_to_target(frames_to_model(batch["frames"]), context, settings["target"],
                        settings["residual_scale"])  # (B, T, N, N, 3)
    b, n = x0.shape[0], x0.shape[2]
    rng_t, rng_noise, rng_text, rng_sgg = jax.random.split(rng, 4)

    t = sample_time(rng_t, b, d.time_logit_mean, d.time_logit_std)  # (B,)
    noise = jax.random.normal(rng_noise, x0.shape)  # (B, T, N, N, 3)
    x_t = interpolate(x0, noise, t)  # (B, T, N, N, 3)

    keep_text = jax.random.uniform(rng_text, (b,)) >= d.cond_dropout  # (B,)
    keep_sgg = (jax.random.uniform(rng_sgg, (b,)) >= d.cond_dropout) & batch["sgg_valid"]  # (B,)
    text_mask = batch["text_mask"].astype(bool)  # (B, L)
    text = model.encode_text(batch["text_tokens"], text_mask)  # (B, L, text_width)
    heatmaps = render_heatmaps(batch["start_xy"], batch["goal_xy"], keep_sgg, n, n,
                               d.sgg_sigma_px)  # (B, N, N, 2)

    out = model(x_t, t, context, text, text_mask & keep_text[:, None], heatmaps, keep_sgg)
    v = output_to_velocity(out, x_t, t, settings["prediction"])  # (B, T, N, N, 3)
    weight = motion_weights(batch["frames"], batch["context"], d.motion_weight)  # (B, T, N, N, 1)
    err = (jnp.mean(weight * jnp.square(v - velocity_target(x0, noise)), axis=(1, 2, 3, 4))
           / jnp.mean(weight, axis=(1, 2, 3, 4)))  # (B,)
    loss = jnp.mean(err)
    metrics = {"loss": loss,
               "loss_t_low": _masked_mean(err, t < 0.5),  # mostly-data half of the path
               "loss_t_high": _masked_mean(err, t >= 0.5),  # mostly-noise half
               "text_kept": jnp.mean(keep_text.astype(jnp.float32)),
               "sgg_kept": jnp.mean(keep_sgg.astype(jnp.float32))}
    return loss, metrics


def motion_weights(frames: jax.Array, context: jax.Array, motion_weight: float) -> jax.Array:
    """(B, T, N, N, 1) per-pixel loss weights: 1 + motion_weight where a future frame differs
    from the last context frame (by more than 1/16 of the range in any channel), else 1.

    What a primitive clip must get right, the gripper's and the objects' new places and the
    background they uncover, is a few percent of its pixels; the weight keeps the still rest
    from drowning them out (0: the plain mean over pixels)."""
    moved = jnp.abs(frames.astype(jnp.float32) - context[:, -1:].astype(jnp.float32)) > 16.0
    return 1.0 + motion_weight * jnp.any(moved, axis=-1, keepdims=True).astype(jnp.float32)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)
