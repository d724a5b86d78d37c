"""Space-time diffusion transformer over pixel-space video, and the world model around it.

`VideoDiT` predicts the flow-matching velocity of a noisy clip x_t (B, T, N, N, 3) at flow time
t (B,), conditioned on:
  * the clean context frame(s) (B, C, N, N, 3): patchified by their own embedding and
    PREPENDED along time, so the token grid is (B, C + T/k, S, D); temporal attention lets every
    future frame read them; they are never noised and the output head ignores their positions;
  * t: sinusoidal features -> MLP -> c (B, D), which drives adaLN-zero modulation (shift,
    scale, gate for spatial attention, temporal attention and MLP; gates and the output head
    start at zero, so every block starts as the identity);
  * text embeddings (B, L, text_width) + mask: projected to D and read by masked
    cross-attention in every block. A learned null token is always attendable, so a clip with
    its text dropped (mask all False) attends to the null token alone;
  * SGG injections (from `SGGConditioner`), one (B, S, D) per block, added to the future
    frames' tokens before the block (zero at init).
Frames are cut into patch_size^2 patches, or space-time tubelets of `tubelet` frames (large
frames use larger patches or tubelets; there is no autoencoder). Positions use fixed
sinusoidal encodings, 2-D over the patch grid plus 1-D over the frame index (context frames
first), so any resolution divisible by the patch and any frame count up to the configured
horizon work with the same parameters. Each block: spatial self-attention within each frame,
temporal self-attention across frames at each patch position (factorised), cross-attention to
text, MLP.

Shape letters: B batch, C context frames, T future frames, k tubelet, T' = T/k, F = C + T',
N image side, p patch, S = (N/p)^2 patches per frame, D width, L text tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from pewm_jax.models.layers import (
    MLP,
    Attention,
    Dense,
    LayerNorm,
    constrain,
    make_param,
    modulate,
    patchify,
    sincos_1d,
    sincos_2d,
    timestep_embedding,
    unpatchify,
)
from pewm_jax.models.sgg_conditioner import SGGConditioner

TIME_FEATURES = 256  # sinusoidal features of the flow time fed to the time MLP
TOKENS = ("batch", "frames", "tokens", "embed")  # logical axes of the (B, F, S, D) token grid
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}


class DiTBlock(nnx.Module):
    """Spatial attention, temporal attention, text cross-attention and MLP on (B, F, S, D)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        nkw = dict(dtype=dtype, param_dtype=param_dtype)
        # shift, scale, gate for spatial attention, temporal attention and MLP; zero: identity.
        self.modulation = Dense(width, (9, width), ("embed", None, "mlp"),
                                kernel_init=nnx.initializers.zeros_init(), **kw)
        self.spatial_norm = LayerNorm(width, use_affine=False, **nkw)
        self.spatial_attn = Attention(width, num_heads, **kw)
        self.temporal_norm = LayerNorm(width, use_affine=False, **nkw)
        self.temporal_attn = Attention(width, num_heads, **kw)
        self.cross_norm = LayerNorm(width, **nkw)
        self.cross_attn = Attention(width, num_heads, **kw)
        self.mlp_norm = LayerNorm(width, use_affine=False, **nkw)
        self.mlp = MLP(width, int(width * mlp_ratio), **kw)

    def __call__(self, x: jax.Array, c: jax.Array, text: jax.Array,
                 text_mask: jax.Array) -> jax.Array:
        """x (B, F, S, D), c (B, D), text (B, L, D), text_mask (B, L) -> (B, F, S, D)."""
        b, f, s, d = x.shape
        mod = self.modulation(jax.nn.silu(c))  # (B, 9, D)
        shift_s, scale_s, gate_s, shift_t, scale_t, gate_t, shift_m, scale_m, gate_m = (
            mod[:, i] for i in range(9))  # each (B, D)

        h = modulate(self.spatial_norm(x), shift_s, scale_s)  # (B, F, S, D)
        h = self.spatial_attn(h.reshape(b * f, s, d)).reshape(b, f, s, d)  # (B, F, S, D)
        x = constrain(x + gate_s[:, None, None] * h, TOKENS)  # (B, F, S, D)

        h = modulate(self.temporal_norm(x), shift_t, scale_t)  # (B, F, S, D)
        h = h.transpose(0, 2, 1, 3).reshape(b * s, f, d)  # (B*S, F, D)
        h = self.temporal_attn(h).reshape(b, s, f, d).transpose(0, 2, 1, 3)  # (B, F, S, D)
        x = constrain(x + gate_t[:, None, None] * h, TOKENS)  # (B, F, S, D)

        h = self.cross_norm(x).reshape(b, f * s, d)  # (B, F*S, D)
        h = self.cross_attn(h, kv=text, mask=text_mask).reshape(b, f, s, d)  # (B, F, S, D)
        x = constrain(x + h, TOKENS)  # (B, F, S, D)

        h = modulate(self.mlp_norm(x), shift_m, scale_m)  # (B, F, S, D)
        h = self.mlp(h, TOKENS[:3])  # (B, F, S, D)
        return constrain(x + gate_m[:, None, None] * h, TOKENS)  # (B, F, S, D)


class FinalLayer(nnx.Module):
    """adaLN-modulated LayerNorm + zero-initialised projection to pixels of each patch."""

    def __init__(self, width: int, out_dim: int, *, rngs: nnx.Rngs,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=nnx.initializers.zeros_init())
        self.norm = LayerNorm(width, use_affine=False, dtype=dtype, param_dtype=param_dtype)
        self.modulation = Dense(width, (2, width), ("embed", None, "mlp"), **kw)
        self.proj = Dense(width, out_dim, ("embed", None), **kw)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        """x (B, T', S, D), c (B, D) -> (B, T', S, out_dim)."""
        mod = self.modulation(jax.nn.silu(c))  # (B, 2, D)
        return self.proj(modulate(self.norm(x), mod[:, 0], mod[:, 1]))  # (B, T', S, out_dim)


def _run_block(block: DiTBlock, x: jax.Array, c: jax.Array, text: jax.Array,
               text_mask: jax.Array) -> jax.Array:
    return block(x, c, text, text_mask)


class VideoDiT(nnx.Module):
    """Velocity network v(x_t, t | context, text, SGG) over pixel-space clips (module doc)."""

    def __init__(self, *, patch_size: int, tubelet: int, context_frames: int, max_frames: int,
                 width: int, depth: int, num_heads: int, mlp_ratio: float, text_width: int,
                 rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, remat: str = "none"):
        if remat not in ("none", *REMAT_POLICIES):
            raise ValueError(f"remat must be 'none', 'full' or 'dots', got {remat!r}")
        if max_frames % tubelet:
            raise ValueError(f"max_frames {max_frames} is not a multiple of tubelet {tubelet}")
        self.patch_size, self.tubelet, self.context_frames = patch_size, tubelet, context_frames
        self.max_frames, self.width, self.remat, self.dtype = max_frames, width, remat, dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.video_embed = Dense(tubelet * patch_size * patch_size * 3, width, (None, "embed"),
                                 **kw)
        self.context_embed = Dense(patch_size * patch_size * 3, width, (None, "embed"), **kw)
        normal = nnx.initializers.normal(0.02)
        self.time_in = Dense(TIME_FEATURES, width, (None, "embed"), kernel_init=normal, **kw)
        self.time_out = Dense(width, width, ("mlp", "embed"), kernel_init=normal, **kw)
        self.text_proj = Dense(text_width, width, (None, "embed"), **kw)
        self.null_text = make_param(normal, (None, "embed"), rngs.params(), (1, width),
                                    param_dtype)  # (1, D)
        self.blocks = nnx.List([DiTBlock(width, num_heads, mlp_ratio, **kw)
                                for _ in range(depth)])
        self.final = FinalLayer(width, tubelet * patch_size * patch_size * 3, **kw)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, rngs: nnx.Rngs,
                    text_width: int | None = None) -> "VideoDiT":
        """The DiT that `config.model` and `config.data` describe; `text_width` (the text
        encoder's output width) defaults to config.model.text_width."""
        m = config.model
        return cls(patch_size=m.patch_size, tubelet=m.tubelet,
                   context_frames=config.data.context_frames, max_frames=config.data.horizon,
                   width=m.width, depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                   text_width=text_width or m.text_width, rngs=rngs, dtype=jnp.dtype(m.dtype),
                   param_dtype=jnp.dtype(m.param_dtype), remat=m.remat)

    def __call__(self, x_t: jax.Array, t: jax.Array, context: jax.Array, text: jax.Array,
                 text_mask: jax.Array, sgg: list[jax.Array] | None = None) -> jax.Array:
        """Velocity (B, T, N, N, 3) float32 of x_t (B, T, N, N, 3) at times t (B,).

        context (B, C, N, N, 3) clean frames in [-1, 1]; text (B, L, text_width) embeddings with
        text_mask (B, L) True on tokens to attend; sgg: None or one (B, S, D) injection per block.
        """
        b, num_frames, n, w, _ = x_t.shape
        p, k, c_frames = self.patch_size, self.tubelet, self.context_frames
        if num_frames % k or num_frames > self.max_frames:
            raise ValueError(f"{num_frames} frames: need a multiple of tubelet {k} and at most "
                             f"the configured horizon {self.max_frames}")
        if context.shape != (b, c_frames, n, w, 3):
            raise ValueError(f"context {context.shape} does not match x_t {x_t.shape} with "
                             f"{c_frames} context frame(s)")
        rows, cols = n // p, w // p

        video = self.video_embed(patchify(x_t, p, k))  # (B, T', S, D)
        ctx = self.context_embed(patchify(context, p))  # (B, C, S, D)
        x = jnp.concatenate([ctx, video], axis=1)  # (B, F, S, D)
        frames = x.shape[1]
        pos = (sincos_1d(jnp.arange(frames), self.width)[:, None]  # (F, 1, D)
               + sincos_2d(rows, cols, self.width)[None])  # (F, S, D)
        x = constrain(x + pos[None].astype(self.dtype), TOKENS)  # (B, F, S, D)

        c = self.time_in(timestep_embedding(t, TIME_FEATURES))  # (B, D)
        c = self.time_out(jax.nn.silu(c))  # (B, D)

        txt = self.text_proj(text)  # (B, L, D)
        null = jnp.broadcast_to(self.null_text[...].astype(self.dtype), (b, 1, self.width))
        txt = constrain(jnp.concatenate([null, txt], axis=1),
                        ("batch", "tokens", "embed"))  # (B, 1 + L, D)
        txt_mask = jnp.concatenate([jnp.ones((b, 1), bool), text_mask.astype(bool)],
                                   axis=1)  # (B, 1 + L)

        run = _run_block
        if self.remat != "none":
            run = nnx.remat(_run_block, policy=REMAT_POLICIES[self.remat])
        for i, block in enumerate(self.blocks):
            if sgg is not None:
                x = x.at[:, c_frames:].add(sgg[i][:, None].astype(self.dtype))  # (B, F, S, D)
            x = run(block, x, c, txt, txt_mask)  # (B, F, S, D)

        out = self.final(x[:, c_frames:], c)  # (B, T', S, k*p*p*3)
        return unpatchify(out, p, k, rows, 3).astype(jnp.float32)  # (B, T, N, N, 3)


class WorldModel(nnx.Module):
    """The primitive world model: video DiT + SGG conditioner + a slot for the text encoder.

    `text_encoder` is any module with `__call__(tokens (B, L) int32, mask (B, L) bool) ->
    (B, L, text_width)` (`pewm_jax.models.text_encoder.make_text_encoder`); `encode_text` needs
    it, while `__call__` takes text embeddings, so guided sampling encodes the text once per clip.
    """

    def __init__(self, dit: VideoDiT, sgg: SGGConditioner, text_encoder: nnx.Module | None = None):
        self.dit, self.sgg, self.text_encoder = dit, sgg, text_encoder

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, rngs: nnx.Rngs,
                    text_encoder: nnx.Module | None = None) -> "WorldModel":
        """A freshly initialised world model for `config`, around `text_encoder`.

        The DiT reads text of the encoder's `text_width` when it has one (a pretrained SigLIP
        tower keeps its own width), else config.model.text_width.
        """
        m = config.model
        dit = VideoDiT.from_config(config, rngs, getattr(text_encoder, "text_width", None))
        sgg = SGGConditioner(patch_size=m.patch_size, width=m.width, depth=m.depth, rngs=rngs,
                             dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))
        return cls(dit, sgg, text_encoder)

    def encode_text(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """Tokens (B, L) int32, mask (B, L) bool -> embeddings (B, L, text_width)."""
        if self.text_encoder is None:
            raise ValueError("this WorldModel has no text encoder; build it with "
                             "WorldModel.from_config(config, rngs, text_encoder=TextEncoder(...))")
        return self.text_encoder(tokens, mask)

    def __call__(self, x_t: jax.Array, t: jax.Array, context: jax.Array, text: jax.Array,
                 text_mask: jax.Array, heatmaps: jax.Array, sgg_keep: jax.Array) -> jax.Array:
        """Velocity (B, T, N, N, 3) float32.

        x_t (B, T, N, N, 3) noisy clip; t (B,) flow time; context (B, C, N, N, 3) in [-1, 1];
        text (B, L, text_width) embeddings, text_mask (B, L) (all False: text dropped);
        heatmaps (B, N, N, 2) from `pewm_jax.sgg.render_heatmaps`; sgg_keep (B,) bool (False:
        SGG dropped or unknown, the clip is treated as unconditioned on SGG).
        """
        return self.dit(x_t, t, context, text, text_mask, self.sgg(heatmaps, sgg_keep))
