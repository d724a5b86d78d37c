"""PaliGemma (1 and 2) in flax.nnx: SigLIP vision tower, linear projector, Gemma decoder.

It computes what Hugging Face transformers 5.x `PaliGemmaForConditionalGeneration` computes:

- Vision: the image (B, H, W, C), channels last, is cut into p x p patches, each embedded by a
  dense layer (SigLIP's stride-p convolution), plus learned position embeddings; pre-LN encoder
  blocks (LayerNorm, multi-head attention, LayerNorm, tanh-GELU MLP); a final LayerNorm. The
  pooling head of SigLIP is not used by PaliGemma and is not built.
- Projector: one dense layer, vision width -> text width. Image tokens enter the decoder as
  projected, unscaled; text tokens are embedded and multiplied by sqrt(width), the scale rounded
  to the embedding's dtype first (as HF's `GemmaTextScaledWordEmbedding` does).
- Decoder: Gemma layers with RMSNorm x * (1 + w) in float32, rotary embeddings at 1-indexed
  positions (PaliGemma counts the first image token as position 1), grouped-query attention
  (`num_key_value_heads`; query head h reads key/value head h // (heads / kv_heads)), GeGLU MLP
  (tanh GELU). Gemma 2 adds attention-logit soft-capping, the final-logit soft-capping, the
  attention scale query_pre_attn_scalar ** -0.5, sliding-window attention on the layers
  `layer_types` marks "sliding_attention", and RMSNorms after attention and around the MLP.
- Prefix-LM attention: the image and prompt tokens (the prefix) attend to each other both ways;
  later tokens (the suffix: target text in training, generated tokens when decoding) attend
  causally. Sliding windows apply to suffix queries only, as in HF.
- The output head is the transposed token embedding (tied, as in every PaliGemma release) or a
  separate `lm_head` when `tie_word_embeddings` is false.

Decoding: `prefill` runs the image and prompt and fills a KV cache; `decode_step` (jitted) feeds
one token; `generate` runs both in one jitted `lax.scan`, greedy or sampled, with an optional
`logits_mask_fn` hook for constrained decoding. Every example of a batch has the same prompt
length (no padding).

Every parameter names logical axes through `pewm_jax.models.layers.make_param`. Shape letters:
B batch, N image tokens, L text tokens, T tokens of one call, S cache length, D width,
H query heads, G kv heads, E head dim, M MLP width, V vocab, p patch size, C channels.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pewm_jax.models.layers import Dense, EncoderBlock, LayerNorm, constrain, make_param

Array = jax.Array
# Hugging Face activation names -> whether jax.nn.gelu uses the tanh approximation.
_GELU_APPROXIMATE = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu_fast": True}
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class PaliGemmaSpec:
    """The architecture of a PaliGemma checkpoint (the fields of its HF config.json we use)."""

    # SigLIP vision tower.
    image_size: int
    patch_size: int
    num_channels: int
    vision_width: int
    vision_mlp_dim: int
    vision_layers: int
    vision_heads: int
    vision_eps: float
    # Gemma decoder.
    text_model_type: str  # "gemma" (PaliGemma) or "gemma2" (PaliGemma 2)
    vocab_size: int
    width: int
    mlp_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    attention_bias: bool
    query_pre_attn_scalar: float  # attention scale is query_pre_attn_scalar ** -0.5
    attn_logit_softcapping: float | None
    final_logit_softcapping: float | None
    sliding_window: int | None
    layer_types: tuple[str, ...]
    tie_word_embeddings: bool
    image_token_id: int

    @property
    def num_image_tokens(self) -> int:
        """N, the image tokens that precede the prompt."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def gemma2(self) -> bool:
        """True for a Gemma 2 decoder (PaliGemma 2)."""
        return self.text_model_type == "gemma2"

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> PaliGemmaSpec:
        """The spec of a `PaliGemmaConfig` dict (config.json); raises on unsupported options."""
        if config.get("model_type") != "paligemma":
            raise ValueError(f"model_type {config.get('model_type')!r}; expected 'paligemma'")
        vision, text = config["vision_config"], config["text_config"]
        kind = text.get("model_type", "gemma")
        if kind not in ("gemma", "gemma2"):
            raise ValueError(f"text_config.model_type {kind!r}; expected 'gemma' or 'gemma2'")
        text_act = text.get("hidden_activation" if kind == "gemma2" else "hidden_act",
                            "gelu_pytorch_tanh")
        if kind == "gemma" and text_act == "gelu":  # HF maps Gemma's legacy "gelu" to tanh
            text_act = "gelu_pytorch_tanh"
        for part, act in (("vision", vision.get("hidden_act", "gelu_pytorch_tanh")),
                          ("text", text_act)):
            if act not in _GELU_APPROXIMATE:
                raise ValueError(f"{part} activation {act!r} is not supported; expected one of "
                                 f"{sorted(_GELU_APPROXIMATE)}")
        rope = text.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_type {rope['rope_type']!r} is not supported (only 'default')")
        layers = text["num_hidden_layers"]
        heads = text["num_attention_heads"]
        head_dim = text.get("head_dim") or text["hidden_size"] // heads
        if kind == "gemma2":
            layer_types = text.get("layer_types") or [
                SLIDING if (i + 1) % 2 else FULL for i in range(layers)]
            window = text.get("sliding_window", 4096)
            scalar = text.get("query_pre_attn_scalar", 256)
            attn_cap = text.get("attn_logit_softcapping", 50.0)
            final_cap = text.get("final_logit_softcapping", 30.0)
        else:  # Gemma 1: full attention everywhere, scale head_dim ** -0.5, no soft-capping
            layer_types, window, scalar = [FULL] * layers, None, head_dim
            attn_cap = final_cap = None
        return cls(
            image_size=vision["image_size"], patch_size=vision["patch_size"],
            num_channels=vision.get("num_channels", 3), vision_width=vision["hidden_size"],
            vision_mlp_dim=vision["intermediate_size"], vision_layers=vision["num_hidden_layers"],
            vision_heads=vision["num_attention_heads"],
            vision_eps=vision.get("layer_norm_eps", 1e-6),
            text_model_type=kind, vocab_size=text["vocab_size"], width=text["hidden_size"],
            mlp_dim=text["intermediate_size"], num_layers=layers, num_heads=heads,
            num_kv_heads=text.get("num_key_value_heads", heads), head_dim=head_dim,
            rms_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", text.get("rope_theta", 10000.0)),
            attention_bias=text.get("attention_bias", False), query_pre_attn_scalar=scalar,
            attn_logit_softcapping=attn_cap, final_logit_softcapping=final_cap,
            sliding_window=window if SLIDING in layer_types else None,
            layer_types=tuple(layer_types),
            tie_word_embeddings=config.get("tie_word_embeddings", True),
            image_token_id=config.get("image_token_index", config.get("image_token_id", 256000)))

    def to_hf_config(self) -> dict[str, Any]:
        """The `PaliGemmaConfig` dict (config.json) of this spec: `from_hf_config`'s inverse,
        what a Hugging Face export of a planner trained from scratch is saved with."""
        act = "gelu_pytorch_tanh"  # every supported activation is the tanh approximation
        text = {"model_type": self.text_model_type, "vocab_size": self.vocab_size,
                "hidden_size": self.width, "intermediate_size": self.mlp_dim,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "rms_norm_eps": self.rms_eps, "attention_bias": self.attention_bias,
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
                "hidden_activation" if self.gemma2 else "hidden_act": act}
        if self.gemma2:
            text.update(layer_types=list(self.layer_types), sliding_window=self.sliding_window,
                        query_pre_attn_scalar=self.query_pre_attn_scalar,
                        attn_logit_softcapping=self.attn_logit_softcapping,
                        final_logit_softcapping=self.final_logit_softcapping)
        return {
            "model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"],
            "vision_config": {
                "model_type": "siglip_vision_model", "image_size": self.image_size,
                "patch_size": self.patch_size, "num_channels": self.num_channels,
                "hidden_size": self.vision_width, "intermediate_size": self.vision_mlp_dim,
                "num_hidden_layers": self.vision_layers,
                "num_attention_heads": self.vision_heads, "layer_norm_eps": self.vision_eps,
                "hidden_act": act, "vision_use_head": False},  # PaliGemma has no pooling head
            "text_config": text, "vocab_size": self.vocab_size, "projection_dim": self.width,
            "hidden_size": self.width, "image_token_index": self.image_token_id,
            "tie_word_embeddings": self.tie_word_embeddings}


def read_paligemma_config(path: str | pathlib.Path) -> dict[str, Any]:
    """The config.json dict of a local Hugging Face PaliGemma checkpoint directory."""
    config_file = pathlib.Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}; expected a local Hugging Face "
                                "PaliGemma checkpoint directory (config.json + *.safetensors)")
    return json.loads(config_file.read_text())


# ---------------------------------------------------------------------------------------------
# Vision tower.


class SiglipVision(nnx.Module):
    """SigLIP vision tower without its pooling head: image -> (B, N, Dv) `last_hidden_state`."""

    def __init__(self, spec: PaliGemmaSpec, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        p, c = spec.patch_size, spec.num_channels
        self.patch_embed = Dense((p, p, c), spec.vision_width, (None, None, None, "embed"),
                                 rngs=rngs, dtype=dtype, param_dtype=param_dtype)  # (p, p, C, Dv)
        self.pos_embed = make_param(nnx.initializers.normal(0.02), (None, "embed"),
                                    rngs.params(), (spec.num_image_tokens, spec.vision_width),
                                    param_dtype)  # (N, Dv)
        self.blocks = nnx.List([
            EncoderBlock(spec.vision_width, spec.vision_heads, spec.vision_mlp_dim,
                         eps=spec.vision_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for _ in range(spec.vision_layers)])
        self.post_norm = LayerNorm(spec.vision_width, eps=spec.vision_eps, dtype=dtype,
                                   param_dtype=param_dtype)
        self.patch_size = p

    def __call__(self, image: Array) -> Array:
        """image (B, H, W, C) float -> (B, N, Dv), patches row-major."""
        b, h, w, c = image.shape
        p = self.patch_size
        if h % p or w % p or (h // p) * (w // p) != self.pos_embed.shape[0]:
            raise ValueError(f"image {image.shape} does not give the {self.pos_embed.shape[0]} "
                             f"patches of size {p} this tower was built for")
        patches = image.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, (h // p) * (w // p), p, p, c)  # (B, N, p, p, C)
        x = self.patch_embed(patches) + self.pos_embed[...].astype(self.patch_embed.dtype)
        x = constrain(x, ("batch", "tokens", "embed"))  # (B, N, Dv)
        for block in self.blocks:
            x = block(x)
        return self.post_norm(x)


# ---------------------------------------------------------------------------------------------
# Gemma decoder.


class RMSNorm(nnx.Module):
    """Gemma's RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + w), in float32; w starts at zero."""

    def __init__(self, dim: int, eps: float, *, dtype: Any, param_dtype: Any):
        self.scale = make_param(nnx.initializers.zeros_init(), ("embed",), jax.random.key(0),
                                (dim,), param_dtype)  # (D,)
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)  # (..., D)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(self.dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding (HF's rotate-half layout) of x (B, T, heads, E) at positions (T,)."""
    e = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))  # (E/2,)
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # (T, E/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # (T, E)
    cos = jnp.cos(emb).astype(x.dtype)[None, :, None, :]  # (1, T, 1, E)
    sin = jnp.sin(emb).astype(x.dtype)[None, :, None, :]
    rotated = jnp.concatenate([-x[..., e // 2:], x[..., : e // 2]], axis=-1)  # (B, T, heads, E)
    return x * cos + rotated * sin


def attention_mask(q_index: Array, k_index: Array, prefix_len: Array | int,
                   window: int | None) -> Array:
    """Prefix-LM mask bool, (T, S) for a scalar prefix_len or (B, T, S) for one per row (B,):
    key k is visible from query q when k <= q (and q - k < window on sliding layers), or when
    both lie in the prefix (k, q < prefix_len)."""
    q, k = q_index[:, None], k_index[None, :]  # (T, 1), (1, S)
    causal = k <= q
    if window is not None:
        causal = causal & (k > q - window)
    prefix_len = jnp.asarray(prefix_len)
    if prefix_len.ndim:  # (B,) -> (B, 1, 1)
        prefix_len = prefix_len[:, None, None]
    return causal | ((q < prefix_len) & (k < prefix_len))


class GemmaAttention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional logit soft-capping and a KV cache."""

    def __init__(self, spec: PaliGemmaSpec, window: int | None, *, rngs: nnx.Rngs, dtype: Any,
                 param_dtype: Any):
        if spec.num_heads % spec.num_kv_heads:
            raise ValueError(f"{spec.num_heads} heads are not a multiple of "
                             f"{spec.num_kv_heads} key/value heads")
        h, g, e, d = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.width
        kw = dict(rngs=rngs, use_bias=spec.attention_bias, dtype=dtype, param_dtype=param_dtype)
        self.query = Dense(d, (h, e), ("embed", "heads", "kv"), **kw)  # (D, H, E)
        self.key = Dense(d, (g, e), ("embed", "heads", "kv"), **kw)  # (D, G, E)
        self.value = Dense(d, (g, e), ("embed", "heads", "kv"), **kw)  # (D, G, E)
        self.out = Dense((h, e), d, ("heads", "kv", "embed"), **kw)  # (H, E, D)
        self.scale = spec.query_pre_attn_scalar ** -0.5
        self.softcap = spec.attn_logit_softcapping
        self.theta = spec.rope_theta
        self.window = window
        self.dtype = dtype

    def __call__(self, x: Array, index: Array, prefix_len: Array | int,
                 cache: tuple[Array, Array] | None) -> tuple[Array, tuple[Array, Array] | None]:
        """x (B, T, D) at sequence indices `index` (T,) (consecutive). With `cache` (k, v), each
        (B, S, G, E), the new keys/values are written at index[0] and all S slots attended
        (unwritten ones are masked as future keys). Returns (B, T, D) and the updated cache."""
        b, t, _ = x.shape
        q, k = self._query_key(x, index)  # (B, T, H, E), (B, T, G, E)
        v = self.value(x)  # (B, T, G, E)
        if cache is not None:
            start = (0, index[0], 0, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
            cache = (k, v)  # (B, S, G, E) each
            k_index = jnp.arange(k.shape[1])
        else:
            k_index = index
        h = q.shape[2]
        logits = self._logits(q, k, index, k_index, prefix_len)  # (B, G, H/G, T, S)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        o = jnp.einsum("bgrts,bsge->btgre", weights, v.astype(self.dtype))
        o = constrain(o.reshape(b, t, h, -1), ("batch", "tokens", "heads", "kv"))  # (B, T, H, E)
        return self.out(o), cache

    def scores(self, x: Array, index: Array, prefix_len: Array | int) -> Array:
        """The masked attention logits (B, H, T, T) float32 of x (B, T, D) attending to itself
        (no cache): what each head's softmax reads, for losses on where the model looks."""
        q, k = self._query_key(x, index)  # (B, T, H, E), (B, T, G, E)
        logits = self._logits(q, k, index, index, prefix_len)  # (B, G, H/G, T, T)
        return logits.reshape(x.shape[0], q.shape[2], *logits.shape[-2:])

    def _query_key(self, x: Array, index: Array) -> tuple[Array, Array]:
        """x (B, T, D) at sequence indices (T,) -> RoPE'd queries (B, T, H, E) and keys
        (B, T, G, E)."""
        positions = index + 1  # PaliGemma's positions are 1-indexed
        return (rope(self.query(x), positions, self.theta),
                rope(self.key(x), positions, self.theta))

    def _logits(self, q: Array, k: Array, index: Array, k_index: Array,
                prefix_len: Array | int) -> Array:
        """q (B, T, H, E), k (B, S, G, E) -> scaled, soft-capped, masked logits (B, G, H/G, T, S)
        float32 (masked keys at the float32 minimum)."""
        b, t, h, e = q.shape
        g = k.shape[2]
        q = q.reshape(b, t, g, h // g, e)  # (B, T, G, H/G, E)
        logits = jnp.einsum("btgre,bsge->bgrts", q, k.astype(q.dtype)).astype(jnp.float32)
        logits = logits * self.scale  # (B, G, H/G, T, S)
        if self.softcap is not None:
            logits = jnp.tanh(logits / self.softcap) * self.softcap
        mask = attention_mask(index, k_index, prefix_len, self.window)  # ([B,] T, S)
        if mask.ndim == 3:
            mask = mask[:, None, None]  # (B, 1, 1, T, S)
        return jnp.where(mask, logits, jnp.finfo(jnp.float32).min)


class GeGLU(nnx.Module):
    """Gemma's MLP: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
        self.gate = Dense(width, hidden, ("embed", "mlp"), **kw)  # (D, M)
        self.up = Dense(width, hidden, ("embed", "mlp"), **kw)  # (D, M)
        self.down = Dense(hidden, width, ("mlp", "embed"), **kw)  # (M, D)

    def __call__(self, x: Array) -> Array:
        """x (B, T, D) -> (B, T, D)."""
        h = jax.nn.gelu(self.gate(x), approximate=True) * self.up(x)
        return self.down(constrain(h, ("batch", "tokens", "mlp")))  # (B, T, M) -> (B, T, D)


class GemmaLayer(nnx.Module):
    """A Gemma (1 or 2) decoder layer; Gemma 2 adds norms after attention and around the MLP."""

    def __init__(self, spec: PaliGemmaSpec, layer_type: str, *, rngs: nnx.Rngs, dtype: Any,
                 param_dtype: Any):
        norm = dict(eps=spec.rms_eps, dtype=dtype, param_dtype=param_dtype)
        window = spec.sliding_window if layer_type == SLIDING else None
        self.input_norm = RMSNorm(spec.width, **norm)
        self.attn = GemmaAttention(spec, window, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.post_attn_norm = RMSNorm(spec.width, **norm)
        if spec.gemma2:
            self.pre_ffw_norm = RMSNorm(spec.width, **norm)
            self.post_ffw_norm = RMSNorm(spec.width, **norm)
        else:
            self.pre_ffw_norm = self.post_ffw_norm = None
        self.mlp = GeGLU(spec.width, spec.mlp_dim, rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype)

    def __call__(self, x: Array, index: Array, prefix_len: Array | int,
                 cache: tuple[Array, Array] | None) -> tuple[Array, tuple[Array, Array] | None]:
        """x (B, T, D) -> (B, T, D) and the updated cache (see `GemmaAttention`)."""
        h, cache = self.attn(self.input_norm(x), index, prefix_len, cache)
        if self.pre_ffw_norm is None:  # Gemma 1: post_attention_layernorm is the MLP's pre-norm
            x = x + h
            return x + self.mlp(self.post_attn_norm(x)), cache
        x = x + self.post_attn_norm(h)
        return x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x))), cache


class GemmaDecoder(nnx.Module):
    """Token embedding, Gemma layers, final RMSNorm and the output head (tied or `lm_head`)."""

    def __init__(self, spec: PaliGemmaSpec, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        self.embed = make_param(nnx.initializers.normal(0.02), ("vocab", "embed"), rngs.params(),
                                (spec.vocab_size, spec.width), param_dtype)  # (V, D)
        self.layers = nnx.List([GemmaLayer(spec, kind, rngs=rngs, dtype=dtype,
                                           param_dtype=param_dtype)
                                for kind in spec.layer_types])
        self.final_norm = RMSNorm(spec.width, spec.rms_eps, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = None if spec.tie_word_embeddings else make_param(
            nnx.initializers.normal(0.02), ("embed", "vocab"), rngs.params(),
            (spec.width, spec.vocab_size), param_dtype)  # (D, V)
        self.final_softcap = spec.final_logit_softcapping
        self.dtype = dtype

    def embed_tokens(self, tokens: Array) -> Array:
        """tokens (B, L) int -> (B, L, D): embedding * sqrt(D), the scale in the table's dtype."""
        table = self.embed[...]
        scale = jnp.asarray(table.shape[1] ** 0.5, table.dtype)
        return (table[tokens] * scale).astype(self.dtype)

    def __call__(self, x: Array, index: Array, prefix_len: Array | int,
                 cache: list[tuple[Array, Array]] | None
                 ) -> tuple[Array, list[tuple[Array, Array]] | None]:
        """Embeddings x (B, T, D) at indices (T,) -> logits (B, T, V) float32, updated cache."""
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, index, prefix_len, None if cache is None else cache[i])
            new_cache.append(layer_cache)
        return self.head(x), None if cache is None else new_cache

    def with_scores(self, x: Array, index: Array, prefix_len: Array | int, layer: int
                    ) -> tuple[Array, Array]:
        """Embeddings x (B, T, D) -> logits (B, T, V) and layer `layer`'s attention logits
        (B, H, T, T) (`GemmaAttention.scores`), in one pass without a cache."""
        if not 0 <= layer < len(self.layers):
            raise ValueError(f"layer {layer} is not one of this decoder's {len(self.layers)}")
        scores = None
        for i, block in enumerate(self.layers):
            if i == layer:
                scores = block.attn.scores(block.input_norm(x), index, prefix_len)
            x, _ = block(x, index, prefix_len, None)
        return self.head(x), scores

    def head(self, x: Array) -> Array:
        """Hidden states (B, T, D) after the last layer -> logits (B, T, V) float32."""
        x = self.final_norm(x)
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]  # (D, V)
        logits = jnp.dot(x, head.astype(self.dtype)).astype(jnp.float32)
        if self.final_softcap is not None:
            logits = jnp.tanh(logits / self.final_softcap) * self.final_softcap
        return constrain(logits, ("batch", "tokens", "vocab"))


class PaliGemma(nnx.Module):
    """PaliGemma / PaliGemma 2: `model(image, tokens, prefix_len)` -> logits (B, N + L, V).

    Build it with `pewm_jax.recipes.paligemma_checkpoints.load_paligemma` for pretrained weights; constructing it
    directly gives random weights of the right shapes.
    """

    def __init__(self, spec: PaliGemmaSpec, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.vision = SiglipVision(spec, **kw)
        self.projector = Dense(spec.vision_width, spec.width, (None, "embed"), **kw)  # (Dv, D)
        self.text = GemmaDecoder(spec, **kw)
        self.spec = spec

    def embed_image(self, image: Array) -> Array:
        """image (B, H, W, C) -> projected image tokens (B, N, D)."""
        return self.projector(self.vision(image))

    def __call__(self, image: Array, tokens: Array, prefix_len: Array | int | None = None
                 ) -> Array:
        """image (B, H, W, C), text tokens (B, L) after the image -> logits (B, N + L, V) float32.

        The first `prefix_len` text tokens (default: all; an int or one per row (B,)) are the
        prompt, attended both ways with the image; the rest attend causally.
        """
        prefix_len = tokens.shape[1] if prefix_len is None else prefix_len
        x = jnp.concatenate([self.embed_image(image), self.text.embed_tokens(tokens)], axis=1)
        index = jnp.arange(x.shape[1])
        logits, _ = self.text(x, index, self.spec.num_image_tokens + prefix_len, None)
        return logits

    def with_scores(self, image: Array, tokens: Array, prefix_len: Array | int, layer: int
                    ) -> tuple[Array, Array]:
        """`model(image, tokens, prefix_len)` and the attention logits (B, H, N + L, N + L) of
        decoder layer `layer`, from the same pass (for losses on where the planner looks)."""
        x = jnp.concatenate([self.embed_image(image), self.text.embed_tokens(tokens)], axis=1)
        index = jnp.arange(x.shape[1])
        return self.text.with_scores(x, index, self.spec.num_image_tokens + prefix_len, layer)


# ---------------------------------------------------------------------------------------------
# KV-cache decoding.


class KVCache(NamedTuple):
    """Per-layer keys and values (B, S, G, E) and `length`, the number of slots written."""

    layers: list[tuple[Array, Array]]
    length: Array  # int32 scalar


def init_cache(model: PaliGemma, batch: int, max_len: int) -> KVCache:
    """An empty cache for `max_len` tokens (image + prompt + generated) in the compute dtype."""
    spec = model.spec
    shape = (batch, max_len, spec.num_kv_heads, spec.head_dim)
    dtype = model.text.dtype
    return KVCache([(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                    for _ in range(spec.num_layers)], jnp.zeros((), jnp.int32))


def _prefill(model: PaliGemma, image: Array, prompt_ids: Array, max_len: int
             ) -> tuple[Array, KVCache]:
    x = jnp.concatenate([model.embed_image(image), model.text.embed_tokens(prompt_ids)], axis=1)
    length = x.shape[1]
    if length > max_len:
        raise ValueError(f"the prefix has {length} tokens but the cache only {max_len} slots")
    cache = init_cache(model, x.shape[0], max_len)
    logits, layers = model.text(x, jnp.arange(length), length, cache.layers)
    return logits[:, -1], KVCache(layers, jnp.asarray(length, jnp.int32))


@nnx.jit(static_argnames="max_len")
def prefill(model: PaliGemma, image: Array, prompt_ids: Array, max_len: int
            ) -> tuple[Array, KVCache]:
    """Runs the prefix (image + prompt (B, L)) into a fresh cache of `max_len` slots (jitted).

    Returns the logits (B, V) for the first generated token and the cache.
    """
    return _prefill(model, image, prompt_ids, max_len)


def _decode(model: PaliGemma, cache: KVCache, token: Array) -> tuple[Array, KVCache]:
    x = model.text.embed_tokens(token[:, None])  # (B, 1, D)
    index = cache.length[None]  # (1,)
    logits, layers = model.text(x, index, 0, cache.layers)  # suffix queries: prefix term unused
    return logits[:, 0], KVCache(layers, cache.length + 1)


@nnx.jit
def decode_step(model: PaliGemma, cache: KVCache, token: Array) -> tuple[Array, KVCache]:
    """Feeds one token (B,) at slot `cache.length` -> logits (B, V) for the next, new cache."""
    return _decode(model, cache, token)


class StepState(NamedTuple):
    """What `logits_mask_fn` sees at each decoding step."""

    step: Array  # int32 scalar: index of the token about to be chosen (0 for the first)
    tokens: Array  # (B, max_new_tokens) int32: tokens chosen so far, zeros after them
    user: Any  # the hook's own state (a pytree), from `mask_state`, as it last returned it


LogitsMaskFn = Callable[[Array, StepState], tuple[Array, Any]]


def generate(model: PaliGemma, image: Array, prompt_ids: Array, max_new_tokens: int, *,
             temperature: float = 0.0, rng: Array | None = None,
             logits_mask_fn: LogitsMaskFn | None = None, mask_state: Any = None) -> Array:
    """Generates `max_new_tokens` tokens (B, max_new_tokens) after image + prompt (B, L).

    Greedy when `temperature` is 0, else sampled from softmax(logits / temperature) with `rng`.
    `logits_mask_fn(logits (B, V) float32, state: StepState) -> (logits, new user state)` is
    applied before each choice (e.g. -inf on tokens a grammar forbids); it runs inside a jitted
    `lax.scan`, so it must be traceable, keep its user state's structure, and be hashable (it is
    a static argument). `mask_state` is the user state at step 0. No early stop at EOS. Each new
    (max_new_tokens, temperature, logits_mask_fn) compiles once.
    """
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng key")
    rng = jax.random.key(0) if rng is None else rng
    return _generate(model, image, prompt_ids, rng, mask_state, max_new_tokens=max_new_tokens,
                     temperature=float(temperature), logits_mask_fn=logits_mask_fn)


@nnx.jit(static_argnames=("max_new_tokens", "temperature", "logits_mask_fn"))
def _generate(model: PaliGemma, image: Array, prompt_ids: Array, rng: Array, mask_state: Any, *,
              max_new_tokens: int, temperature: float,
              logits_mask_fn: LogitsMaskFn | None) -> Array:
    max_len = model.spec.num_image_tokens + prompt_ids.shape[1] + max_new_tokens
    logits, cache = _prefill(model, image, prompt_ids, max_len)
    tokens = jnp.zeros((prompt_ids.shape[0], max_new_tokens), jnp.int32)

    def choose(logits: Array, step: Array, tokens: Array, user: Any, key: Array
               ) -> tuple[Array, Any]:
        if logits_mask_fn is not None:
            logits, user = logits_mask_fn(logits, StepState(step, tokens, user))
        if temperature > 0:
            return jax.random.categorical(key, logits / temperature).astype(jnp.int32), user
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), user

    def body(carry, step):
        logits, cache, tokens, user = carry
        token, user = choose(logits, step, tokens, user, jax.random.fold_in(rng, step))
        tokens = tokens.at[:, step].set(token)
        logits, cache = _decode(model, cache, token)
        return (logits, cache, tokens, user), None

    (_, _, tokens, _), _ = jax.lax.scan(body, (logits, cache, tokens, mask_state),
                                        jnp.arange(max_new_tokens))
    return tokens

