"""SGG conditioner: start/goal heatmaps -> per-block patch tokens added to the video tokens.

ControlNet-style: the (B, N, N, 2) heatmaps rendered by `pewm_jax.sgg.render_heatmaps` are
patchified on the DiT's patch grid, embedded by a small MLP, and projected once per DiT block
by a zero-initialised Dense. The DiT adds block i's projection to every noisy (future) frame's
tokens before block i. Because the projections start at zero, a fresh SGG branch leaves the
network's output unchanged, so training starts from the unconditioned model.

`keep` (B,) multiplies the injections: a clip whose SGG was dropped for guidance, or whose
points are unknown (`sgg_valid` False), gets exactly zero injection, the same as the
unconditioned model (not merely "all-zero heatmaps", whose embedding is a learned bias).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pewm_jax.models.layers import Dense, constrain, patchify, sincos_2d


class SGGConditioner(nnx.Module):
    """Heatmaps (B, N, N, 2) + keep (B,) -> `depth` injections, each (B, S, D), S = (N/p)^2."""

    def __init__(self, *, patch_size: int, width: int, depth: int, rngs: nnx.Rngs,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32):
        self.patch_size, self.width = patch_size, width
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embed = Dense(patch_size * patch_size * 2, width, (None, "embed"), **kw)
        self.hidden = Dense(width, width, ("embed", "mlp"), **kw)
        self.inject = nnx.List([
            Dense(width, width, ("mlp", "embed"), kernel_init=nnx.initializers.zeros_init(), **kw)
            for _ in range(depth)])
        self.dtype = dtype

    def __call__(self, heatmaps: jax.Array, keep: jax.Array) -> list[jax.Array]:
        b, n, w, _ = heatmaps.shape
        p = self.patch_size
        tokens = patchify(heatmaps[:, None], p)[:, 0]  # (B, S, p*p*2)
        pos = sincos_2d(n // p, w // p, self.width).astype(self.dtype)  # (S, D)
        h = jax.nn.silu(self.embed(tokens) + pos[None])  # (B, S, D)
        h = constrain(jax.nn.silu(self.hidden(h)), ("batch", "tokens", "mlp"))  # (B, S, D)
        gate = keep.astype(self.dtype)[:, None, None]  # (B, 1, 1)
        return [constrain(proj(h) * gate, ("batch", "tokens", "embed"))  # (B, S, D)
                for proj in self.inject]
