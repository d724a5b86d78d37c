"""The world model's text path: token ids -> (B, L, text_width) keys/values for cross-attention.

Two encoders, chosen by `config.model.text_encoder` in `make_text_encoder`:

- `TrainableTextEncoder`: a small pre-LN transformer over the project tokenizer's ids
  (pewm_jax/text/tokenizer.py, `<pad>` = 0), trained with the world model.
- `SiglipTextEncoder`: our flax.nnx copy of the Hugging Face SigLIP text tower
  (`transformers.SiglipTextModel`, returning its `last_hidden_state`), with weights loaded from a
  local Hugging Face checkpoint by `load_siglip_text_encoder`. Its tokenizer loads from the same
  directory (`load_siglip_tokenizer`, `encode_siglip_text`).

Both are built from the shared layers (`pewm_jax.models.layers.EncoderBlock`, the block of
PaliGemma's SigLIP vision tower too): LayerNorm -> multi-head self-attention -> residual,
LayerNorm -> MLP (GELU) -> residual, and a final LayerNorm.

Freezing is the trainer's job, not the model's: the parameters are plain `nnx.Param`s, and the
world-model kind declares the SigLIP tower frozen (`ModelKind.frozen`: `text_encoder/.*`),
which the trainer adds to the train section's `frozen` patterns (`optax.set_to_zero()` for
them, and no gradient computed through them).

Sharding. Every parameter names logical axes (`embed`, `mlp`, `heads`, `kv`, `vocab`; position
tables leave their position axis unnamed) with `nnx.with_partitioning`; loaded weights keep the
same metadata. The model knows no mesh: `pewm_jax/parallel` maps the names to mesh axes. Note
that Flax creates variables with eager sharding by default, which needs a mesh context (with
`nnx.logical_axis_rules`) or `nnx.use_eager_sharding(False)` around construction.
`load_siglip_text_encoder` builds with eager sharding off and returns unsharded arrays; place
them with the same rules as any restored state.

Shapes in comments: B batch, L tokens, D width, H heads, K head width, F MLP width, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from pewm_jax.models.hf_checkpoint import SIGLIP_ENCODER_LAYER, SafetensorsIndex
from pewm_jax.models.layers import EncoderBlock, LayerNorm, constrain, make_param

Array = jax.Array
LN_EPS = 1e-6  # SigLIP's layer_norm_eps; the trainable encoder uses the same


class _TextTransformer(nnx.Module):
    """Token + learned position embeddings, `depth` pre-LN encoder blocks, final LayerNorm."""

    def __init__(self, *, vocab_size: int, max_len: int, width: int, depth: int, num_heads: int,
                 mlp_dim: int, eps: float, approximate_gelu: bool, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"text width {width} is not divisible by {num_heads} heads")
        embed_init = nnx.initializers.normal(0.02)
        self.token_embed = make_param(embed_init, ("vocab", "embed"), rngs.params(),
                                      (vocab_size, width), param_dtype)  # (V, D)
        self.pos_embed = make_param(embed_init, (None, "embed"), rngs.params(),
                                    (max_len, width), param_dtype)  # (max_len, D)
        self.blocks = nnx.List([
            EncoderBlock(width, num_heads, mlp_dim, eps=eps, approximate_gelu=approximate_gelu,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(depth)])
        self.final_norm = LayerNorm(width, eps=eps, dtype=dtype, param_dtype=param_dtype)
        self.max_len = max_len
        self.width = width
        self.dtype = dtype

    @property
    def text_width(self) -> int:
        """Width of the output tokens: the key/value width the DiT's cross-attention sees."""
        return self.width

    def _encode(self, tokens: Array, key_mask: Array | None) -> Array:
        """tokens (B, L) int, key_mask (B, L) bool or None -> (B, L, D) float32."""
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"text has {length} tokens but the encoder has only {self.max_len} "
                             "positions; truncate it (config.data.max_text_tokens)")
        x = self.token_embed[...][tokens] + self.pos_embed[...][None, :length]  # (B, L, D)
        x = constrain(x.astype(self.dtype), ("batch", "tokens", "embed"))
        for block in self.blocks:
            x = block(x, key_mask)
        return self.final_norm(x).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# The two encoders.


class TrainableTextEncoder(_TextTransformer):
    """A small transformer over the project tokenizer's ids, trained with the world model."""

    def __init__(self, vocab_size: int, max_len: int, *, width: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        super().__init__(vocab_size=vocab_size, max_len=max_len, width=width, depth=depth,
                         num_heads=num_heads, mlp_dim=int(width * mlp_ratio), eps=LN_EPS,
                         approximate_gelu=True, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

    def __call__(self, tokens: Array, mask: Array) -> Array:
        """tokens (B, L) int32, mask (B, L) bool (True = real token) -> (B, L, D) float32.

        Padded positions are masked out as keys, so real positions ignore them; the outputs at
        padded positions are meaningless and must be masked by the consumer.
        """
        return self._encode(tokens, mask)


@dataclasses.dataclass(frozen=True)
class SiglipTextSpec:
    """The architecture of a SigLIP text tower (the fields of `SiglipTextConfig` we use)."""

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"


# Hugging Face activation names -> whether jax.nn.gelu uses the tanh approximation.
_GELU_APPROXIMATE = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu_fast": True,
                     "gelu": False}


class SiglipTextEncoder(_TextTransformer):
    """Our flax.nnx SigLIP text tower: `SiglipTextModel(...).last_hidden_state`.

    Build it with `load_siglip_text_encoder` (weights from a checkpoint); constructing it
    directly gives random weights of the right shapes. `mask_padding=False` (the default) runs
    it as SigLIP was trained: max-length padded text, padding attended like any token (Hugging
    Face with no attention_mask); True masks padded keys (Hugging Face with attention_mask).
    """

    def __init__(self, spec: SiglipTextSpec, *, mask_padding: bool = False,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if spec.hidden_act not in _GELU_APPROXIMATE:
            raise ValueError(f"SigLIP hidden_act {spec.hidden_act!r} is not supported; expected "
                             f"one of {sorted(_GELU_APPROXIMATE)}")
        super().__init__(vocab_size=spec.vocab_size, max_len=spec.max_position_embeddings,
                         width=spec.hidden_size, depth=spec.num_hidden_layers,
                         num_heads=spec.num_attention_heads, mlp_dim=spec.intermediate_size,
                         eps=spec.layer_norm_eps,
                         approximate_gelu=_GELU_APPROXIMATE[spec.hidden_act],
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.spec = spec
        self.mask_padding = mask_padding

    def __call__(self, tokens: Array, mask: Array) -> Array:
        """tokens (B, L) int32 SigLIP ids, mask (B, L) bool -> (B, L, D)."""
        return self._encode(tokens, mask if self.mask_padding else None)


# ---------------------------------------------------------------------------------------------
# Loading SigLIP from a local Hugging Face checkpoint.


# The checkpoint of a full SiglipModel (and of transformers 4.x SiglipTextModel) prefixes the
# text tower with "text_model."; tensors of the other parts are known and skipped.
_TEXT_PREFIX = "text_model."
_OTHER_TOWER_PREFIXES = ("vision_model.", "logit_scale", "logit_bias")
# Text-tower tensors we do not use: the projection of the pooled (last) token.
_UNUSED = ("head.weight", "head.bias")

def _siglip_name_table(num_layers: int) -> dict[tuple, tuple[str, str]]:
    """Our parameter path -> (checkpoint name without prefix, conversion), for every parameter."""
    table = {
        ("token_embed",): ("embeddings.token_embedding.weight", "copy"),
        ("pos_embed",): ("embeddings.position_embedding.weight", "copy"),
        ("final_norm", "scale"): ("final_layer_norm.weight", "copy"),
        ("final_norm", "bias"): ("final_layer_norm.bias", "copy"),
    }
    for i in range(num_layers):
        for path, (name, conversion) in SIGLIP_ENCODER_LAYER.items():
            table[("blocks", i, *path)] = (f"encoder.layers.{i}.{name}", conversion)
    return table


def read_siglip_text_spec(path: str | pathlib.Path) -> SiglipTextSpec:
    """The text-tower architecture from `config.json` of a SiglipModel or SiglipTextModel dir.

    Keys the file leaves out take `SiglipTextConfig`'s defaults (as transformers does).
    """
    config_file = pathlib.Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}; expected a local Hugging Face SigLIP "
                                "checkpoint directory (config.json + *.safetensors)")
    config = json.loads(config_file.read_text())
    if config.get("model_type") == "siglip":
        config = config.get("text_config") or {}
    elif config.get("model_type") != "siglip_text_model":
        raise ValueError(f"{config_file} has model_type {config.get('model_type')!r}; expected "
                         "'siglip' (SiglipModel) or 'siglip_text_model' (SiglipTextModel)")
    fields = {f.name for f in dataclasses.fields(SiglipTextSpec)}
    return SiglipTextSpec(**{k: v for k, v in config.items() if k in fields})


def load_siglip_text_encoder(path: str | pathlib.Path, *, mask_padding: bool = False,
                             dtype: Any = jnp.float32,
                             param_dtype: Any = jnp.float32) -> SiglipTextEncoder:
    """A `SiglipTextEncoder` with the weights of a local Hugging Face checkpoint directory.

    The directory holds config.json and safetensors (one file or shards with an index), of a
    SiglipModel (its `text_model.*` tensors are used, the vision tower skipped) or a
    SiglipTextModel. Every parameter comes from the checkpoint through `_siglip_name_table`;
    raises `CheckpointMismatchError` naming every missing, unexpected or mis-shaped tensor.
    """
    path = pathlib.Path(path)
    spec = read_siglip_text_spec(path)
    index = SafetensorsIndex(path)
    prefix = _TEXT_PREFIX if any(n.startswith(_TEXT_PREFIX) for n in index.where) else ""
    skipped = {n for n in index.where if prefix and n.startswith(_OTHER_TOWER_PREFIXES)}
    skipped |= {prefix + n for n in _UNUSED}

    with nnx.use_eager_sharding(False):  # no mesh here; placement is the caller's
        abstract = nnx.eval_shape(lambda: SiglipTextEncoder(
            spec, mask_padding=mask_padding, dtype=dtype, param_dtype=param_dtype,
            rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    variables = dict(nnx.to_flat_state(state))  # our path -> abstract nnx.Param
    table = {path: (prefix + name, kind) for path, (name, kind)
             in _siglip_name_table(spec.num_hidden_layers).items()}
    index.load(variables, table, skipped=skipped, param_dtype=param_dtype,
               describe=f"SigLIP checkpoint {path} does not match the text tower its "
                        f"config.json describes ({spec})")
    return nnx.merge(graphdef, state)


def load_siglip_tokenizer(path: str | pathlib.Path) -> Any:
    """The SigLIP checkpoint's own tokenizer, from the same local directory (no network).

    A `transformers` tokenizer via `AutoTokenizer`; SigLIP's SentencePiece tokenizer needs the
    `sentencepiece` package unless the directory has a tokenizer.json.
    """
    from transformers import AutoTokenizer  # tokenizer files only; no model code from it

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def encode_siglip_text(tokenizer: Any, texts: Sequence[str], max_tokens: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(B, max_tokens) int32 ids, padded to max_length as SigLIP was trained, and the bool mask
    of real tokens (from the tokenizer's attention_mask; SigLIP pads with a real id, not 0)."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_tokens,
                    return_attention_mask=True, return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(bool)


# ---------------------------------------------------------------------------------------------


def make_text_encoder(config: ml_collections.ConfigDict, rngs: nnx.Rngs,
                      vocab_size: int) -> TrainableTextEncoder | SiglipTextEncoder:
    """The text encoder `config.model.text_encoder` names; its `text_width` is the DiT's kv width.

    'trainable': sized by config.model.text_width/text_depth/text_num_heads (MLP width
    mlp_ratio * text_width), `vocab_size` from the project tokenizer, positions for
    config.data.max_text_tokens. 'siglip': loaded from config.model.text_encoder_path, with its
    own vocabulary and width (`vocab_size` and `rngs` unused).
    """
    model = config.model
    dtype, param_dtype = jnp.dtype(model.dtype), jnp.dtype(model.param_dtype)
    if model.text_encoder == "trainable":
        return TrainableTextEncoder(
            vocab_size, config.data.max_text_tokens, width=model.text_width,
            depth=model.text_depth, num_heads=model.text_num_heads, mlp_ratio=model.mlp_ratio,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if model.text_encoder == "siglip":
        if not model.text_encoder_path:
            raise ValueError("config.model.text_encoder = 'siglip' needs "
                             "config.model.text_encoder_path: a local Hugging Face SigLIP "
                             "checkpoint directory")
        encoder = load_siglip_text_encoder(model.text_encoder_path, dtype=dtype,
                                           param_dtype=param_dtype)
        if config.data.max_text_tokens > encoder.max_len:
            raise ValueError(
                f"config.data.max_text_tokens = {config.data.max_text_tokens} exceeds the "
                f"{encoder.max_len} positions of the SigLIP checkpoint at "
                f"{model.text_encoder_path}; set it to {encoder.max_len} or less")
        return encoder
    raise ValueError(f"config.model.text_encoder = {model.text_encoder!r}; expected 'trainable' "
                     "or 'siglip'")
