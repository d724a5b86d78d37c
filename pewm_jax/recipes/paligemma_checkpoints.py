"""Hugging Face PaliGemma checkpoints <-> our `PaliGemma`, and the Orbax checkpoint of it.

- `load_paligemma(dir)`: a local `PaliGemmaForConditionalGeneration` checkpoint (config.json +
  model.safetensors, or shards with model.safetensors.index.json) -> our model. Every parameter
  comes from one tensor through `_name_table` (our path -> checkpoint name, conversion); a
  checkpoint with missing, unexpected or mis-shaped tensors raises `CheckpointMismatchError`
  naming each. Tensors are read lazily and converted one at a time into the arrays of an
  abstract model, so at most one tensor is held twice.
- `save_params` / `convert_checkpoint`: the params as an Orbax checkpoint (step 0, items
  `params` = `nnx.to_pure_dict` of the nnx.Param state and `config` = the HF config dict) that
  `pewm_jax.train.checkpoint.find_checkpoint` + `RunCheckpoints.restore_module` read;
  `restore_paligemma` loads it back.
- `export_hf`: our params -> config.json + model.safetensors that
  `PaliGemmaForConditionalGeneration.from_pretrained` loads.

Checkpoint names: transformers has written PaliGemma under two layouts (`language_model.model.*`,
`vision_tower.[vision_model.]*` and `multi_modal_projector.*`, which 5.x `save_pretrained` still
writes, or the module layout `model.language_model.*`, `model.vision_tower.vision_model.*`, ...);
each part's prefix is detected from the tensors present. The SigLIP pooling head
(`vision_tower.head.*`, unused by PaliGemma) and a tied `lm_head.weight` are skipped.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pewm_jax.models.hf_checkpoint import (CONVERSIONS, SIGLIP_ENCODER_LAYER,
                                           CheckpointMismatchError, SafetensorsIndex)
from pewm_jax.train.checkpoint import RunCheckpoints, find_checkpoint
from pewm_jax.vlm.paligemma import PaliGemma, PaliGemmaSpec, read_paligemma_config

__all__ = ["CheckpointMismatchError", "read_hf_config", "load_paligemma", "save_params", "convert_checkpoint",
           "restore_paligemma", "export_hf"]

# Checkpoint-name prefixes of each part: the longest one some tensor name starts with is used
# ("vision_tower." also prefixes "vision_tower.vision_model."); the first is what `export_hf`
# writes (transformers 5.x save_pretrained's layout).
_PREFIXES = {
    "text": ("language_model.model.", "model.language_model."),
    "vision": ("vision_tower.", "model.vision_tower.vision_model.",
               "vision_tower.vision_model.", "model.vision_tower."),
    "projector": ("multi_modal_projector.", "model.multi_modal_projector."),
    "head": ("language_model.lm_head.", "lm_head."),
}
_SKIPPED = ("head.",)  # under the vision prefix: SigLIP's pooling head, unused by PaliGemma


def _name_table(spec: PaliGemmaSpec) -> dict[tuple, tuple[str, str, str]]:
    """Our parameter path -> (part, checkpoint name after the part's prefix, conversion)."""
    table: dict[tuple, tuple[str, str, str]] = {
        ("vision", "patch_embed", "kernel"): ("vision", "embeddings.patch_embedding.weight",
                                              "conv_to_patch"),
        ("vision", "patch_embed", "bias"): ("vision", "embeddings.patch_embedding.bias", "copy"),
        ("vision", "pos_embed"): ("vision", "embeddings.position_embedding.weight", "copy"),
        ("vision", "post_norm", "scale"): ("vision", "post_layernorm.weight", "copy"),
        ("vision", "post_norm", "bias"): ("vision", "post_layernorm.bias", "copy"),
        ("projector", "kernel"): ("projector", "linear.weight", "linear"),
        ("projector", "bias"): ("projector", "linear.bias", "copy"),
        ("text", "embed"): ("text", "embed_tokens.weight", "copy"),
        ("text", "final_norm", "scale"): ("text", "norm.weight", "copy"),
    }
    if not spec.tie_word_embeddings:
        table[("text", "lm_head")] = ("head", "weight", "linear")
    for i in range(spec.vision_layers):
        for path, (name, kind) in SIGLIP_ENCODER_LAYER.items():
            table[("vision", "blocks", i, *path)] = ("vision", f"encoder.layers.{i}.{name}", kind)
    text_layer = {
        ("input_norm", "scale"): ("input_layernorm.weight", "copy"),
        ("post_attn_norm", "scale"): ("post_attention_layernorm.weight", "copy"),
        ("attn", "query", "kernel"): ("self_attn.q_proj.weight", "linear_to_heads"),
        ("attn", "key", "kernel"): ("self_attn.k_proj.weight", "linear_to_heads"),
        ("attn", "value", "kernel"): ("self_attn.v_proj.weight", "linear_to_heads"),
        ("attn", "out", "kernel"): ("self_attn.o_proj.weight", "linear_from_heads"),
        ("mlp", "gate", "kernel"): ("mlp.gate_proj.weight", "linear"),
        ("mlp", "up", "kernel"): ("mlp.up_proj.weight", "linear"),
        ("mlp", "down", "kernel"): ("mlp.down_proj.weight", "linear"),
    }
    if spec.gemma2:
        text_layer[("pre_ffw_norm", "scale")] = ("pre_feedforward_layernorm.weight", "copy")
        text_layer[("post_ffw_norm", "scale")] = ("post_feedforward_layernorm.weight", "copy")
    if spec.attention_bias:
        for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
            text_layer[("attn", ours, "bias")] = (f"self_attn.{theirs}_proj.bias",
                                                  "bias_to_heads")
        text_layer[("attn", "out", "bias")] = ("self_attn.o_proj.bias", "copy")
    for i in range(spec.num_layers):
        for path, (name, kind) in text_layer.items():
            table[("text", "layers", i, *path)] = ("text", f"layers.{i}.{name}", kind)
    return table


def read_hf_config(path: str | pathlib.Path) -> dict[str, Any]:
    """The complete `PaliGemmaConfig` dict of a checkpoint directory: its config.json with the
    keys it leaves out filled by transformers' defaults (Hub configs list only a few)."""
    from transformers import PaliGemmaConfig  # configuration only; no model code from it

    return PaliGemmaConfig.from_dict(read_paligemma_config(path)).to_dict()


def _abstract_model(spec: PaliGemmaSpec, dtype: Any, param_dtype: Any) -> PaliGemma:
    """A `PaliGemma` of `spec` whose arrays are shapes only (nothing allocated)."""
    with nnx.use_eager_sharding(False):  # no mesh here; placement is the caller's
        return nnx.eval_shape(lambda: PaliGemma(spec, rngs=nnx.Rngs(0), dtype=dtype,
                                                param_dtype=param_dtype))


def load_paligemma(path: str | pathlib.Path, *, dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32) -> PaliGemma:
    """Our `PaliGemma` with the weights of a local HF PaliGemma checkpoint directory.

    Raises `CheckpointMismatchError` naming every missing, unexpected or mis-shaped tensor.
    Arrays are unsharded; place them with the project's rules like any restored state.
    """
    path = pathlib.Path(path)
    spec = PaliGemmaSpec.from_hf_config(read_hf_config(path))
    index = SafetensorsIndex(path)
    where = index.where
    prefix = {part: max((p for p in options if any(n.startswith(p) for n in where)), key=len,
                        default=options[0]) for part, options in _PREFIXES.items()}
    skipped = {n for n in where if n.startswith(tuple(prefix["vision"] + s for s in _SKIPPED))}
    if spec.tie_word_embeddings:
        skipped |= {n for n in where if n.startswith(prefix["head"])}

    graphdef, state = nnx.split(_abstract_model(spec, dtype, param_dtype))
    variables = dict(nnx.to_flat_state(state))  # our path -> abstract nnx.Param
    # our path -> (tensor name, conversion kind)
    table = {p: (prefix[part] + name, kind) for p, (part, name, kind) in _name_table(spec).items()}
    index.load(variables, table, skipped=skipped,
               param_dtype=param_dtype,
               describe=f"PaliGemma checkpoint {path} does not match the model its config.json "
                        "describes")
    return nnx.merge(graphdef, state)


def save_params(model: PaliGemma, config: dict[str, Any], out_dir: str | pathlib.Path,
                step: int = 0) -> pathlib.Path:
    """Writes the params of `model` and its HF `config` dict as Orbax checkpoint `step`, with
    their checksums (the trainer's `RunCheckpoints.save_params`)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    checkpoints = RunCheckpoints(pathlib.Path(out_dir).absolute())
    try:
        checkpoints.save_params(step, params, config)
    finally:
        checkpoints.close()
    return pathlib.Path(out_dir)


def convert_checkpoint(hf_dir: str | pathlib.Path, out_dir: str | pathlib.Path, *,
                       param_dtype: Any = jnp.float32) -> pathlib.Path:
    """HF PaliGemma checkpoint directory -> Orbax checkpoint directory (step 0); returns it."""
    model = load_paligemma(hf_dir, param_dtype=param_dtype)
    return save_params(model, read_hf_config(hf_dir), out_dir)


def restore_paligemma(path: str | pathlib.Path, *, dtype: Any = jnp.float32,
                      param_dtype: Any = jnp.float32) -> PaliGemma:
    """A `PaliGemma` from an Orbax checkpoint `save_params` wrote (its newest step), through the
    trainer's `find_checkpoint` / `restore_module`."""
    checkpoints, step = find_checkpoint(path, model="planner")
    try:
        spec = PaliGemmaSpec.from_hf_config(checkpoints.read_json(step, "config"))
        return checkpoints.restore_module(step, _abstract_model(spec, dtype, param_dtype))
    finally:
        checkpoints.close()


def export_hf(model: PaliGemma, config: dict[str, Any], out_dir: str | pathlib.Path
              ) -> pathlib.Path:
    """Writes config.json + model.safetensors (transformers' layout) of `model` to `out_dir`.

    `config` is the model's PaliGemmaConfig dict. Its vision tower is written without SigLIP's
    pooling head (`vision_use_head: false`): PaliGemma never uses the head, so we neither keep
    nor export it, and a config that announced one would make transformers initialise it
    randomly and report its weights missing.
    """
    from safetensors.numpy import save_file

    config = {**config, "vision_config": {**config.get("vision_config", {}),
                                          "vision_use_head": False}}
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = _name_table(model.spec)
    tensors = {}
    for our_path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        part, name, kind = table[our_path]
        value = np.asarray(jax.device_get(variable[...]))
        tensors[_PREFIXES[part][0] + name] = np.ascontiguousarray(CONVERSIONS[kind][2](value))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
