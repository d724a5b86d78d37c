"""Few-step ODE samplers (Euler, Heun) with classifier-free guidance over text and SGG.

Sampling integrates dx/dt = v(x_t, t) from t = 1 (noise) to t = 0 (data) on the uniform grid
t_i = 1 - i / num_steps (flow convention in `pewm_jax.diffusion.flow`). Euler uses one model
evaluation per step, Heun two (its corrector also runs on the last step; velocities are
defined at t = 0).

Guidance, with separate scales s_text and s_sgg (nested, SGG on top of text):
    v = v_uncond + s_text * (v_text - v_uncond) + s_sgg * (v_text+sgg - v_text)
where v_uncond sees neither condition (text mask cleared, SGG dropped), v_text sees the text
only, and v_text+sgg sees both. s_text = s_sgg = 1 gives exactly the conditional prediction
v_text+sgg (one model evaluation); s_text = s_sgg = 0 the unconditional one; (1, 0) text-only.
With s_text = 1, v_uncond drops out (v = v_text + s_sgg * (v_text+sgg - v_text)): two
evaluations, one batch of 2B. Otherwise the three evaluations run as one batch of 3B. A clip with `sgg_valid` False has
v_text+sgg = v_text, so the SGG scale does not touch it.

Guidance interval (`guidance_min_t`, Kynkaanniemi et al. 2024, "Applying Guidance in a Limited
Interval"): steps that start at t < guidance_min_t use v_text+sgg alone. The noisy steps lay the
clip out (where the gripper goes), and guidance there is what draws it at its goal; on the
nearly clean steps a scale above 1 only overshoots what changes (measured: the place a moved
gripper leaves is drawn too bright, a ghost of it, and the gripper too dark).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from pewm_jax.config import SAMPLERS
from pewm_jax.diffusion.flow import (frames_to_model, output_to_velocity, target_settings,
                                    target_to_unit)
from pewm_jax.models.video_dit import WorldModel
from pewm_jax.sgg import render_heatmaps


def guided_velocity(model: WorldModel, x_t: jax.Array, t: jax.Array, context: jax.Array,
                    text: jax.Array, text_mask: jax.Array, heatmaps: jax.Array,
                    sgg_keep: jax.Array, *, text_guidance: float, sgg_guidance: float,
                    prediction: str) -> jax.Array:
    """Guided velocity (B, T, N, N, 3) (formula in the module doc); arguments as `WorldModel`,
    `prediction` what the network outputs (`flow.output_to_velocity`)."""
    if text_guidance == 1.0 and sgg_guidance == 1.0:
        return output_to_velocity(model(x_t, t, context, text, text_mask, heatmaps, sgg_keep),
                                  x_t, t, prediction)
    b = x_t.shape[0]
    no_sgg, no_heat = jnp.zeros_like(sgg_keep), jnp.zeros_like(heatmaps)
    # (text mask, heatmaps, SGG kept) of v_text and v_text+sgg; v_uncond's only where its
    # coefficient is not 0 (text scale 1: v_uncond + 1 (v_text - v_uncond) = v_text).
    calls = [(text_mask, no_heat, no_sgg), (text_mask, heatmaps, sgg_keep)]
    if text_guidance != 1.0:
        calls.insert(0, (jnp.zeros_like(text_mask), no_heat, no_sgg))
    k = len(calls)

    def tile(a: jax.Array) -> jax.Array:
        return jnp.concatenate([a] * k, axis=0)  # (B, ...) -> (kB, ...)

    v = model(tile(x_t), tile(t), tile(context), tile(text),
              *(jnp.concatenate(parts) for parts in zip(*calls)))  # (kB, T, N, N, 3)
    v = output_to_velocity(v, tile(x_t), tile(t), prediction)  # (kB, T, N, N, 3)
    v_text, v_full = v[(k - 2) * b:(k - 1) * b], v[(k - 1) * b:]  # each (B, T, N, N, 3)
    v_uncond = v[:b] if k == 3 else v_text
    return v_uncond + text_guidance * (v_text - v_uncond) + sgg_guidance * (v_full - v_text)


@nnx.jit(static_argnames=("horizon", "num_steps", "sampler", "text_guidance", "sgg_guidance",
                          "guidance_min_t", "sgg_sigma_px", "target", "residual_scale",
                          "prediction"))
def sample(model: WorldModel, cond: Mapping[str, jax.Array], rng: jax.Array, *, horizon: int,
           num_steps: int, target: str, residual_scale: float, prediction: str,
           sampler: str = "euler", text_guidance: float = 1.0, sgg_guidance: float = 1.0,
           guidance_min_t: float = 0.0, sgg_sigma_px: float = 2.0) -> jax.Array:
    """Samples one clip per conditioning row: (B, horizon, N, N, 3) float32 in [0, 1].

    `cond` holds the conditioning keys of a batch (`BatchSpec`): context (B, C, N, N, 3) uint8,
    text_tokens (B, L) int32, text_mask (B, L) bool, start_xy, goal_xy (B, 2) float32 pixels,
    sgg_valid (B,) bool; other keys are ignored. The same `rng` gives the same clips.
    `target`, `residual_scale` and `prediction` must be those the model trained with
    (`flow.target_settings`). Guidance acts on the steps that start at t >= `guidance_min_t`
    (module docstring).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    context = frames_to_model(cond["context"])  # (B, C, N, N, 3)
    b, n = context.shape[0], context.shape[2]
    text_mask = cond["text_mask"].astype(bool)  # (B, L)
    text = model.encode_text(cond["text_tokens"], text_mask)  # (B, L, text_width)
    sgg_keep = cond["sgg_valid"].astype(bool)  # (B,)
    heatmaps = render_heatmaps(cond["start_xy"], cond["goal_xy"], sgg_keep, n, n,
                               sgg_sigma_px)  # (B, N, N, 2)
    graphdef, state = nnx.split(model)

    def velocity(x: jax.Array, t: jax.Array, text_scale: float,
                 sgg_scale: float) -> jax.Array:
        return guided_velocity(nnx.merge(graphdef, state), x, jnp.full((b,), t), context, text,
                               text_mask, heatmaps, sgg_keep, text_guidance=text_scale,
                               sgg_guidance=sgg_scale, prediction=prediction)  # (B, T, N, N, 3)

    def update(x: jax.Array, t: jax.Array, t_next: jax.Array, text_scale: float,
               sgg_scale: float) -> jax.Array:
        v = velocity(x, t, text_scale, sgg_scale)  # (B, T, N, N, 3)
        if sampler == "heun":
            v = 0.5 * (v + velocity(x + (t_next - t) * v, t_next, text_scale, sgg_scale))
        return x + (t_next - t) * v  # (B, T, N, N, 3)

    def step(i: jax.Array, x: jax.Array) -> jax.Array:
        t = 1.0 - i / num_steps
        t_next = 1.0 - (i + 1) / num_steps
        if guidance_min_t <= 0.0:
            return update(x, t, t_next, text_guidance, sgg_guidance)
        return jax.lax.cond(t >= guidance_min_t,
                            lambda x: update(x, t, t_next, text_guidance, sgg_guidance),
                            lambda x: update(x, t, t_next, 1.0, 1.0), x)

    x = jax.random.normal(rng, (b, horizon, n, n, 3))  # (B, T, N, N, 3) at t = 1
    x = jax.lax.fori_loop(0, num_steps, step, x)  # (B, T, N, N, 3) at t = 0
    return target_to_unit(x, context, target, residual_scale)


def sample_from_config(model: WorldModel, cond: Mapping[str, jax.Array], rng: jax.Array,
                       config: ml_collections.ConfigDict, *, num_steps: int | None = None,
                       horizon: int | None = None) -> jax.Array:
    """`sample` with the sampler, steps, guidance scales, sigma and horizon of `config`."""
    d = config.diffusion
    return sample(model, cond, rng, horizon=horizon or config.data.horizon,
                  num_steps=num_steps or d.num_steps, sampler=d.sampler,
                  text_guidance=float(d.text_guidance), sgg_guidance=float(d.sgg_guidance),
                  guidance_min_t=float(d.get("guidance_min_t", 0.0)),
                  sgg_sigma_px=float(d.sgg_sigma_px), **target_settings(config))
