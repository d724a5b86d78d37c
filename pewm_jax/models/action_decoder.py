"""Inverse dynamics: two consecutive frames of a clip -> the action taken between them.

The clip contract (DESIGN.md "Clip"): frame j of a clip follows frame j - 1 by `s` environment
steps, and the action label between them (`batch['actions'][:, j]`, frame 0 being the last
context frame) is the summed gripper displacement over those steps plus the last gripper
command, normalised with the dataset statistics except the gripper dimensions and zero-padded
to the mixture's action size (`action_mask`). The controller decodes a generated clip with this
model and executes each action as `s` environment steps.

Each frame pair is stacked on the channels (6), cut into patches, embedded with 2-D sinusoidal
positions, passed through a small pre-LN transformer and mean-pooled to one action: pairs are
independent, so the model reads what moved, not what usually comes next.

Shapes: B batch, H horizon (pairs), S image side, P patch side, N = (S / P)^2 patches, D width,
A action size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from pewm_jax.models.layers import MLP, Attention, Dense, LayerNorm, constrain, patchify, sincos_2d


@dataclasses.dataclass(frozen=True)
class ActionDecoderSpec:
    """The architecture (config.action_decoder plus the data's image and action sizes)."""

    image_size: int  # S
    patch_size: int  # P
    width: int  # D
    depth: int
    num_heads: int
    action_dim: int  # A: the largest action size of the mixture

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, action_dim: int
                    ) -> "ActionDecoderSpec":
        a = config.action_decoder
        return cls(image_size=config.world.image_size, patch_size=a.patch_size, width=a.width,
                   depth=a.depth, num_heads=a.num_heads, action_dim=action_dim)


class _Block(nnx.Module):
    """Pre-LN transformer block over one pair's patch tokens."""

    def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1, self.norm2 = LayerNorm(width, **kw), LayerNorm(width, **kw)
        self.attn = Attention(width, num_heads, rngs=rngs, **kw)
        self.mlp = MLP(width, 4 * width, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))  # (B', N, D)
        return x + self.mlp(self.norm2(x), ("batch", "tokens"))  # (B', N, D)


class ActionDecoder(nnx.Module):
    """`model(context, frames)` -> (B, H, A) normalised actions between consecutive frames."""

    def __init__(self, spec: ActionDecoderSpec, *, rngs: nnx.Rngs,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32):
        if spec.image_size % spec.patch_size:
            raise ValueError(f"action_decoder.patch_size {spec.patch_size} does not divide the "
                             f"image size {spec.image_size}")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.spec, self.dtype = spec, dtype
        self.patch_embed = Dense(spec.patch_size ** 2 * 6, spec.width, (None, "embed"), **kw)
        self.blocks = nnx.List([_Block(spec.width, spec.num_heads, **kw)
                                for _ in range(spec.depth)])
        self.norm = LayerNorm(spec.width, dtype=dtype, param_dtype=param_dtype)
        self.head = Dense(spec.width, spec.action_dim, ("embed", None), **kw)

    def __call__(self, context: jax.Array, frames: jax.Array) -> jax.Array:
        """context (B, C, S, S, 3) and frames (B, H, S, S, 3), uint8 or [-1, 1] floats ->
        actions (B, H, A): action j takes frame j - 1 (the last context frame for j = 0) to
        frame j."""
        video = _unit(jnp.concatenate([context[:, -1:], frames], axis=1))  # (B, H + 1, S, S, 3)
        pairs = jnp.concatenate([video[:, :-1], video[:, 1:]], axis=-1)  # (B, H, S, S, 6)
        b, h = pairs.shape[:2]
        tokens = patchify(pairs, self.spec.patch_size)  # (B, H, N, P*P*6)
        tokens = tokens.reshape(b * h, *tokens.shape[2:]).astype(self.dtype)  # (B*H, N, P*P*6)
        grid = self.spec.image_size // self.spec.patch_size
        x = self.patch_embed(tokens) + sincos_2d(grid, grid, self.spec.width).astype(self.dtype)
        x = constrain(x, ("batch", "tokens", "embed"))  # (B*H, N, D)
        for block in self.blocks:
            x = block(x)
        pooled = jnp.mean(self.norm(x), axis=1)  # (B*H, D)
        return self.head(pooled).astype(jnp.float32).reshape(b, h, -1)  # (B, H, A)


def build_action_decoder(config: ml_collections.ConfigDict, action_dim: int,
                         rngs: nnx.Rngs) -> ActionDecoder:
    """A randomly initialised action decoder of config.action_decoder for `action_dim`."""
    a = config.action_decoder
    return ActionDecoder(ActionDecoderSpec.from_config(config, action_dim), rngs=rngs,
                         dtype=jnp.dtype(a.dtype), param_dtype=jnp.dtype(a.param_dtype))


def action_decoder_flops(spec: ActionDecoderSpec, batch_size: int, horizon: int) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3 x forward) on `batch_size`
    clips of `horizon` frame pairs: patch embedding, attention projections and scores, MLP,
    head."""
    n = (spec.image_size // spec.patch_size) ** 2
    d = spec.width
    per_pair = n * spec.patch_size ** 2 * 6 * d + spec.depth * (
        n * (4 * d * d + 8 * d * d) + 2 * n * n * d) + d * spec.action_dim
    return 3.0 * 2.0 * batch_size * horizon * per_pair


def _unit(video: jax.Array) -> jax.Array:
    """uint8 pixels -> [-1, 1]; floats are taken as already there (sampled clips)."""
    if jnp.issubdtype(video.dtype, jnp.integer):
        return video.astype(jnp.float32) / 127.5 - 1.0
    return video.astype(jnp.float32)


def action_loss(model: ActionDecoder, batch: Mapping[str, jax.Array], rng: jax.Array | None,
                config: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean squared error of the decoded (normalised) actions over the real action dimensions
    (`action_mask`)."""
    del rng, config  # deterministic; no settings beyond the architecture
    predicted = model(batch["context"], batch["frames"])  # (B, H, A)
    loss = masked_mse(predicted, batch["actions"], batch["action_mask"])
    return loss, {"loss": loss}


def masked_mse(predicted: jax.Array, target: jax.Array, action_mask: jax.Array) -> jax.Array:
    """Mean squared error of (B, H, A) actions over the dimensions `action_mask` (B, A) marks."""
    mask = jnp.broadcast_to(action_mask[:, None, :], target.shape).astype(jnp.float32)
    return jnp.sum(jnp.square(predicted - target) * mask) / jnp.maximum(jnp.sum(mask), 1.0)
