"""Shared Flax NNX building blocks: dense layer, LayerNorm, attention, MLP, adaLN, encodings.

Every parameter is created through `nnx.with_partitioning` with logical axis names (DESIGN.md
"Flax": batch, frames, tokens, embed, heads, mlp, vocab, kv); `configs/` maps them to mesh axes
and `pewm_jax/parallel/` applies the rules, so nothing here names a mesh. Main activations pass
through `constrain`, which adds a sharding constraint only when logical rules and a mesh are
both active (`nnx.logical_axis_rules(...)` inside `jax.set_mesh(...)`); otherwise it is the
identity, so the same model runs unsharded on one CPU.

Compute dtype vs parameter dtype: parameters are stored in `param_dtype` and cast to `dtype`
where they are used; norms and softmax run in float32 whatever the compute dtype.

Shape letters: B batch, Q query tokens, K key tokens, D width, M MLP width, H heads, E head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.core.spmd as flax_spmd
import jax
import jax.numpy as jnp
from flax import nnx

from pewm_jax.sharding_rules import logical_to_mesh_spec

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]
Names = tuple[str | None, ...]


def _sharding_active() -> bool:
    """True when logical axis rules are set and a mesh is in context (`jax.set_mesh`)."""
    return bool(flax_spmd.get_logical_axis_rules()) and not jax.sharding.get_abstract_mesh().empty


def constrain(x: jax.Array, names: Names) -> jax.Array:
    """Annotates activation `x` with logical axis `names` (one per dimension).

    A sharding constraint is added only when logical rules and a mesh are active; otherwise `x`
    is returned unchanged (the model never needs a mesh to run). As in Linen's
    `logical_to_mesh_axes`, a mesh axis already taken by an earlier dimension is not reused:
    that dimension is replicated instead (with batch -> ("data", "fsdp") and embed -> "fsdp",
    activations (batch, ..., embed) shard the batch and replicate the width).
    """
    if len(names) != x.ndim:
        raise ValueError(f"{len(names)} logical names {names} for an array of shape {x.shape}")
    if not _sharding_active():
        return x
    spec = logical_to_mesh_spec(names, flax_spmd.get_logical_axis_rules(), x.shape,
                                dict(jax.sharding.get_abstract_mesh().shape))
    return jax.lax.with_sharding_constraint(x, spec)


def make_param(init: Initializer, names: Names, key: jax.Array, shape: tuple[int, ...],
               dtype: jnp.dtype) -> nnx.Param:
    """A parameter of `shape` carrying logical axis `names` (one per dimension).

    It is sharded as it is created (NNX eager sharding) only when logical rules and a mesh are
    active; otherwise it stays unsharded and its names are metadata for `nnx.get_partition_spec`.
    """
    if len(names) != len(shape):
        raise ValueError(f"parameter of shape {shape} needs {len(shape)} names, got {names}")
    with nnx.use_eager_sharding(_sharding_active()):
        return nnx.Param(nnx.with_partitioning(init, names)(key, shape, dtype))


def _as_tuple(shape: int | Sequence[int]) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


def _matrix_init(init: Initializer, fan_in: int, fan_out: int) -> Initializer:
    """Initialises a kernel of any shape as a (fan_in, fan_out) matrix, then reshapes it, so
    variance-scaling initialisers see the true fans of multi-axis kernels."""

    def init_fn(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
        return init(key, (fan_in, fan_out), dtype).reshape(shape)

    return init_fn


class Dense(nnx.Module):
    """y = x . W + b contracting the trailing `in_shape` axes of x into `out_shape` axes.

    `names` gives the logical axis of every kernel dimension (in_shape axes, then out_shape
    axes); the bias takes the out_shape names.
    """

    def __init__(self, in_shape: int | Sequence[int], out_shape: int | Sequence[int],
                 names: Names, *, rngs: nnx.Rngs, use_bias: bool = True,
                 kernel_init: Initializer = nnx.initializers.xavier_uniform(),
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32):
        self.in_shape, self.out_shape = _as_tuple(in_shape), _as_tuple(out_shape)
        fan_in, fan_out = math.prod(self.in_shape), math.prod(self.out_shape)
        self.kernel = make_param(_matrix_init(kernel_init, fan_in, fan_out), names, rngs.params(),
                                 self.in_shape + self.out_shape, param_dtype)  # (*in, *out)
        if use_bias:
            self.bias = make_param(nnx.initializers.zeros_init(), names[len(self.in_shape):],
                                   rngs.params(), self.out_shape, param_dtype)  # (*out,)
        else:
            self.bias = None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        if x.shape[x.ndim - n_in:] != self.in_shape:
            raise ValueError(f"Dense expects trailing axes {self.in_shape}, got shape {x.shape}")
        # One 2-D matmul, (prod(...), prod(in)) . (prod(in), prod(out)): on CPU, XLA
        # transposes a 3-D activation to take the kernel's gradient over two contracting
        # dimensions (batch and tokens); the 2-D form's training step is 1.23x faster for the
        # planner (benchmarks/dense_layout.py). The leading dimensions stay major, so their
        # sharding carries over.
        lead = x.shape[:x.ndim - n_in]
        fan_in, fan_out = math.prod(self.in_shape), math.prod(self.out_shape)
        y = jnp.dot(x.astype(self.dtype).reshape(math.prod(lead), fan_in),
                    self.kernel[...].astype(self.dtype).reshape(fan_in, fan_out))
        y = y.reshape(*lead, *self.out_shape)  # (..., *in) . (*in, *out) -> (..., *out)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)  # (..., *out)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis in float32; scale/bias optional (off under adaLN, where the
    modulation supplies them)."""

    def __init__(self, dim: int, *, use_affine: bool = True, eps: float = 1e-6,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32):
        self.eps, self.dtype = eps, dtype
        if use_affine:  # constant initialisers: no random key needed
            key = jax.random.key(0)
            self.scale = make_param(nnx.initializers.ones_init(), ("embed",), key, (dim,),
                                    param_dtype)  # (D,)
            self.bias = make_param(nnx.initializers.zeros_init(), ("embed",), key, (dim,),
                                   param_dtype)  # (D,)
        else:
            self.scale = self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)  # (..., D)
        mean = jnp.mean(x32, axis=-1, keepdims=True)  # (..., 1)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)  # (..., 1)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)  # (..., D)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Attention(nnx.Module):
    """Multi-head attention (softmax in float32 by `jax.nn.dot_product_attention`).

    Self-attention when `kv` is None; cross-attention to `kv` (width `kv_width`) otherwise. The
    optional `mask` (B, K) marks the keys each query may attend to.
    """

    def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, kv_width: int | None = None,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        head_dim = width // num_heads
        kv_width = width if kv_width is None else kv_width
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.query = Dense(width, (num_heads, head_dim), ("embed", "heads", "kv"), **kw)
        self.key = Dense(kv_width, (num_heads, head_dim), ("embed", "heads", "kv"), **kw)
        self.value = Dense(kv_width, (num_heads, head_dim), ("embed", "heads", "kv"), **kw)
        self.out = Dense((num_heads, head_dim), width, ("heads", "kv", "embed"), **kw)

    def __call__(self, x: jax.Array, kv: jax.Array | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        kv = x if kv is None else kv  # (B, K, Dk)
        q = constrain(self.query(x), ("batch", "tokens", "heads", "kv"))  # (B, Q, H, E)
        k = constrain(self.key(kv), ("batch", "tokens", "heads", "kv"))  # (B, K, H, E)
        v = constrain(self.value(kv), ("batch", "tokens", "heads", "kv"))  # (B, K, H, E)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, K)
        o = jax.nn.dot_product_attention(q, k, v, mask=attn_mask)  # (B, Q, H, E)
        return constrain(self.out(o), ("batch", "tokens", "embed"))  # (B, Q, D)


class MLP(nnx.Module):
    """Two-layer GELU MLP, width -> hidden -> width (tanh-approximated GELU unless
    `approximate_gelu` is False)."""

    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, approximate_gelu: bool = True,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.up = Dense(width, hidden, ("embed", "mlp"), **kw)
        self.down = Dense(hidden, width, ("mlp", "embed"), **kw)
        self.approximate_gelu = approximate_gelu

    def __call__(self, x: jax.Array, names: Names) -> jax.Array:
        """x (..., D) with logical `names` for its leading axes -> (..., D)."""
        h = jax.nn.gelu(self.up(x), approximate=self.approximate_gelu)
        return self.down(constrain(h, (*names, "mlp")))  # (..., M) -> (..., D)


class EncoderBlock(nnx.Module):
    """SigLIP's pre-LN encoder layer: x + Attn(LN(x)), then x + MLP(LN(x)).

    The one block of both SigLIP towers (PaliGemma's vision tower, the world model's text
    encoders), so a checkpoint's tensors map onto the same module paths in both.
    """

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs,
                 eps: float = 1e-6, approximate_gelu: bool = True,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = LayerNorm(width, eps=eps, **kw)
        self.attn = Attention(width, num_heads, rngs=rngs, **kw)
        self.norm2 = LayerNorm(width, eps=eps, **kw)
        self.mlp = MLP(width, mlp_dim, rngs=rngs, approximate_gelu=approximate_gelu, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x (B, L, D), mask (B, L) bool of the keys to attend to, or None (all) -> (B, L, D).

        A query whose keys are all masked attends uniformly (never NaN).
        """
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x), ("batch", "tokens"))


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation x * (1 + scale) + shift; x (B, ..., D), shift/scale (B, D)."""
    expand = (slice(None),) + (None,) * (x.ndim - 2) + (slice(None),)
    return x * (1 + scale[expand]) + shift[expand]  # (B, ..., D)


def sincos_1d(positions: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal encodings of (possibly fractional) positions: (n,) -> (n, dim) float32."""
    if dim % 2:
        raise ValueError(f"sinusoidal encodings need an even dim, got {dim}")
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(dim // 2, dtype=jnp.float32) / (dim // 2))
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # (n, dim/2)
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # (n, dim)


def sincos_2d(rows: int, cols: int, dim: int) -> jax.Array:
    """2-D sinusoidal encodings of a rows x cols grid, row-major: (rows * cols, dim) float32.

    Half the channels encode the row, half the column; computed from the grid size at call
    time, so any resolution works without learned tables.
    """
    if dim % 4:
        raise ValueError(f"2-D sinusoidal encodings need dim divisible by 4, got {dim}")
    r = sincos_1d(jnp.arange(rows), dim // 2)  # (rows, dim/2)
    c = sincos_1d(jnp.arange(cols), dim // 2)  # (cols, dim/2)
    grid = jnp.concatenate([jnp.broadcast_to(r[:, None], (rows, cols, dim // 2)),
                            jnp.broadcast_to(c[None, :], (rows, cols, dim // 2))], axis=-1)
    return grid.reshape(rows * cols, dim)  # (rows * cols, dim)


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal features of flow times t in [0, 1] (scaled by 1000): (B,) -> (B, dim)."""
    return sincos_1d(t * 1000.0, dim)  # (B, dim)


def patchify(x: jax.Array, patch: int, tubelet: int = 1) -> jax.Array:
    """Video (B, T, N, W, c) -> patches (B, T/tubelet, (N/patch)*(W/patch), tubelet*patch*patch*c).

    Patch vectors are ordered (frame in tubelet, row in patch, column in patch, channel);
    `unpatchify` inverts it.
    """
    b, t, n, w, c = x.shape
    if t % tubelet or n % patch or w % patch:
        raise ValueError(f"video {x.shape} does not divide into tubelet {tubelet}, patch {patch}")
    x = x.reshape(b, t // tubelet, tubelet, n // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # (B, T', n', w', k, p, p, c)
    return x.reshape(b, t // tubelet, (n // patch) * (w // patch), tubelet * patch * patch * c)


def unpatchify(x: jax.Array, patch: int, tubelet: int, rows: int, channels: int) -> jax.Array:
    """Patches (B, T', rows*cols, tubelet*patch*patch*c) -> video (B, T'*tubelet, rows*patch,
    cols*patch, c); the inverse of `patchify`."""
    b, t, s, _ = x.shape
    cols = s // rows
    x = x.reshape(b, t, rows, cols, tubelet, patch, patch, channels)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)  # (B, T', k, rows, p, cols, p, c)
    return x.reshape(b, t * tubelet, rows * patch, cols * patch, channels)
