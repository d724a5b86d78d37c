"""Export bundle: a trained world model, action decoder and planner as files a robot can run.

A bundle directory holds

    weights.safetensors   every parameter, named `world_model.<path>` / `action_decoder.<path>`
                          (the module's attribute path joined with '.', list indices as numbers,
                          e.g. `world_model.dit.blocks.0.spatial_attn.query.kernel`)
    policy_step.jaxexport the primitive policy step serialized with `jax.export` (StableHLO),
                          lowered for cpu, cuda and tpu, batch dimension symbolic, the weights
                          its first argument (a dict by the names above; never baked in)
    config.json           the world model's training config
    dataset_stats.json    the action statistics the decoder's outputs are denormalised with
    tokenizer.json        the dataset tokenizer (words -> text tokens)
    manifest.json         format version, package versions, the policy's and planner's shapes,
                          the size and sha256 of every other file, and its own sha256
                          (`runtime.load_bundle` checks them all)

and, when the run has a fine-tuned planner,

    weights.safetensors   also the planner's parameters, named `planner.<path>`
    planner_prefill.jaxexport, planner_decode.jaxexport
                          the planner's two decoding steps (below), exported like the policy step
    planner_tokenizer.json  the planner's tokenizer (prompt, plan grammar, plan parsing)
    planner_hf/           the planner in Hugging Face's layout (config.json, model.safetensors,
                          tokenizer.json): `PaliGemmaForConditionalGeneration.from_pretrained`
                          loads it and `config.planner.hf_config=<dir>` fine-tunes from it

The exported step is `policy_step(weights, context, text_tokens, text_mask, start_xy, goal_xy,
sgg_valid, seed, step_index) -> (clips, actions)`: the same computation as
`PrimitivePolicy.step` (sampler with the config's steps and guidance, uint8 quantisation,
action decoder), returning actions still normalised; the runtime denormalises them.

The planner's steps are `planner_prefill(weights, images, prompt_ids) -> (logits, keys, values,
length)` (uint8 images at the planner's size, the padded prompt; the KV cache of every layer
stacked, (layers, B, slots, kv_heads, head_dim)) and `planner_decode(weights, keys, values,
length, token) -> (logits, keys, values, length)`, one token per call; the runtime masks the
logits with the plan grammar and picks tokens greedily, as `Planner.plan` does.
"""

from __future__ import annotations

from importlib import metadata
import json
import pathlib
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors.numpy
from flax import nnx
from jax import export

import pewm_jax
from pewm_jax.diffusion.samplers import sample_from_config
from pewm_jax.export.runtime import (BUNDLE_FORMAT, CONFIG, MANIFEST, PLANNER_DECODE,
                                     PLANNER_HF, PLANNER_PREFILL, PLANNER_TOKENIZER, STATS, STEP,
                                     TOKENIZER, WEIGHTS, file_sha256, manifest_sha256)
from pewm_jax.train.checkpoint import CheckpointError, find_checkpoint
from pewm_jax.recipes.paligemma_checkpoints import export_hf
from pewm_jax.recipes.restore import restore
from pewm_jax.vlm.finetune import make_planner
from pewm_jax.vlm.paligemma import KVCache, decode_step, prefill
from pewm_jax.vlm.planner import Planner, unit_pixels

PLATFORMS = ("cpu", "cuda", "tpu")


class ExportError(ValueError):
    """The run cannot be exported as asked; the message says what to change."""


class _Weights:
    """A module's parameters as a flat {name: array} dict, and the way back into the module."""

    def __init__(self, module: nnx.Module, prefix: str):
        self.graphdef, state = nnx.split(module)
        self.abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        leaves, self.treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))
        self.names = [prefix + "." + ".".join(str(getattr(k, "key", getattr(k, "idx", k)))
                                              for k in path) for path, _ in leaves]
        self.arrays = {n: np.asarray(jax.device_get(x)) for n, (_, x) in zip(self.names, leaves)}

    def module(self, weights: dict[str, jax.Array]) -> nnx.Module:
        """The module with `weights` (traced arrays under `jax.export`) as its parameters."""
        state = jax.tree.map(lambda x: x, self.abstract)
        nnx.replace_by_pure_dict(state, jax.tree.unflatten(
            self.treedef, [weights[n] for n in self.names]))
        return nnx.merge(self.graphdef, state)


def policy_step_function(world_model: nnx.Module, action_decoder: nnx.Module,
                         config: ml_collections.ConfigDict
                         ) -> tuple[Callable[..., Any], dict[str, np.ndarray]]:
    """(the pure policy step of the module docstring, its weights by bundle name)."""
    world, decoder = _Weights(world_model, "world_model"), _Weights(action_decoder,
                                                                     "action_decoder")

    def policy_step(weights, context, text_tokens, text_mask, start_xy, goal_xy, sgg_valid,
                    seed, step_index):
        cond = {"context": context, "text_tokens": text_tokens, "text_mask": text_mask,
                "start_xy": start_xy, "goal_xy": goal_xy, "sgg_valid": sgg_valid}
        rng = jax.random.fold_in(jax.random.key(seed), step_index)  # as PrimitivePolicy
        unit = sample_from_config(world.module(weights), cond, rng, config)  # (B, H, N, N, 3)
        clips = (unit * 255.0 + 0.5).clip(0, 255).astype(jnp.uint8)  # (B, H, N, N, 3)
        # (B, H, s, A): normalised continuous dimensions, gripper logits
        return clips, decoder.module(weights)(context, clips, start_xy, goal_xy, sgg_valid,
                                              text_tokens, text_mask)

    return policy_step, {**world.arrays, **decoder.arrays}


def export_policy_step(step_fn: Callable[..., Any], weights: dict[str, np.ndarray],
                       config: ml_collections.ConfigDict,
                       platforms: Sequence[str] = PLATFORMS) -> export.Exported:
    """`step_fn` lowered by `jax.export` for `platforms`, batch dimension `b` symbolic."""
    (b,) = export.symbolic_shape("b")
    n, c, length = (int(config.world.image_size), int(config.data.context_frames),
                    int(config.data.max_text_tokens))
    spec = jax.ShapeDtypeStruct
    return export.export(jax.jit(step_fn), platforms=tuple(platforms))(
        {k: spec(v.shape, v.dtype) for k, v in weights.items()},
        spec((b, c, n, n, 3), jnp.uint8), spec((b, length), jnp.int32),
        spec((b, length), jnp.bool_), spec((b, 2), jnp.float32), spec((b, 2), jnp.float32),
        spec((b,), jnp.bool_), spec((), jnp.uint32), spec((), jnp.int32))


def planner_functions(planner: Planner) -> tuple[Callable[..., Any], Callable[..., Any],
                                                  dict[str, np.ndarray], dict[str, Any]]:
    """(prefill, decode, the planner's weights by bundle name, their shapes for the manifest):
    the pure planner steps of the module docstring."""
    if planner.prompt_tokens is None:
        raise ExportError("the planner reads unpadded prompts (prompt_tokens None); a bundle's "
                          "prefill has one prompt length. Fix: fine-tune with "
                          "config.planner.prompt_tokens set.")
    weights = _Weights(planner.model, "planner")
    spec = planner.model.spec
    slots = spec.num_image_tokens + planner.prompt_tokens + planner.max_new_tokens

    def stacked(cache: KVCache) -> tuple[jax.Array, jax.Array, jax.Array]:
        return (jnp.stack([k for k, _ in cache.layers]), jnp.stack([v for _, v in cache.layers]),
                cache.length)  # (layers, B, slots, G, E) twice, ()

    def planner_prefill(weights_, images, prompt_ids):
        model = weights.module(weights_)
        logits, cache = prefill(model, unit_pixels(images), prompt_ids, slots)  # (B, V)
        return logits, *stacked(cache)

    def planner_decode(weights_, keys, values, length, token):
        model = weights.module(weights_)
        cache = KVCache([(keys[i], values[i]) for i in range(spec.num_layers)], length)
        logits, cache = decode_step(model, cache, token)  # (B, V)
        return logits, *stacked(cache)

    shapes = {"image_size": spec.image_size, "prompt_tokens": planner.prompt_tokens,
              "max_new_tokens": planner.max_new_tokens, "max_steps": planner.grammar.max_steps,
              "max_words": planner.grammar.max_words, "plans_remaining": planner.plans_remaining,
              "vocab_size": spec.vocab_size,
              "cache": {"layers": spec.num_layers, "slots": slots, "kv_heads": spec.num_kv_heads,
                        "head_dim": spec.head_dim,
                        "dtype": jnp.dtype(planner.model.text.dtype).name}}
    return planner_prefill, planner_decode, weights.arrays, shapes


def export_planner_steps(prefill_fn: Callable[..., Any], decode_fn: Callable[..., Any],
                         weights: dict[str, np.ndarray], shapes: dict[str, Any],
                         platforms: Sequence[str] = PLATFORMS
                         ) -> tuple[export.Exported, export.Exported]:
    """The planner's prefill and decode steps lowered by `jax.export` for `platforms`, batch
    dimension `b` symbolic."""
    (b,) = export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct
    w = {k: spec(v.shape, v.dtype) for k, v in weights.items()}
    n, c = shapes["image_size"], shapes["cache"]
    cache = spec((c["layers"], b, c["slots"], c["kv_heads"], c["head_dim"]), c["dtype"])
    platforms = tuple(platforms)
    return (export.export(jax.jit(prefill_fn), platforms=platforms)(
                w, spec((b, n, n, 3), jnp.uint8), spec((b, shapes["prompt_tokens"]), jnp.int32)),
            export.export(jax.jit(decode_fn), platforms=platforms)(
                w, cache, cache, spec((), jnp.int32), spec((b,), jnp.int32)))


def export_bundle(workdir: str | pathlib.Path, out: str | pathlib.Path, *,
                  world_model: str | pathlib.Path | None = None,
                  action_decoder: str | pathlib.Path | None = None,
                  planner: str | pathlib.Path | None = None, use_ema: bool = True,
                  platforms: Sequence[str] = PLATFORMS) -> dict:
    """Writes the bundle of the run in `workdir` to `out` and returns its manifest.

    The models are the newest committed steps of workdir's world_model/, action_decoder/ and
    planner/ (the planner only if the run has one), or the step directories `world_model`,
    `action_decoder` and `planner` name; EMA weights, or with use_ema False the raw ones.
    `out` must not exist: a bundle is never overwritten. The files are written beside it and
    moved into place whole, so a failed export leaves nothing.
    """
    workdir, out = pathlib.Path(workdir), pathlib.Path(out)
    if out.exists():
        raise ExportError(f"{out} already exists; a bundle is never overwritten. Fix: give "
                          "another --out or remove that directory yourself.")
    paths = {"world_model": world_model or workdir, "action_decoder": action_decoder or workdir,
             "planner": planner or workdir}
    steps = {}
    for name, path in list(paths.items()):
        try:
            checkpoints, steps[name] = find_checkpoint(path, model=name)
        except CheckpointError as e:
            if name == "planner" and planner is None:  # a run without a planner: policy only
                del paths[name]
                continue
            if name == "planner":
                raise ExportError(f"no planner checkpoint in {path} ({e}). Fix: pass the "
                                  "step directory of a fine-tuned planner (`pewm planner`), "
                                  "or leave --planner out.") from None
            raise ExportError(f"no {name} checkpoint to export in {path} ({e}). Fix: train the "
                              "world model (`pewm train`) and the action decoder (`pewm "
                              "actions`) into this --workdir first.") from None
        checkpoints.close()
    world = restore(paths["world_model"], "world_model", use_ema=use_ema)
    world_model, config, tokenizer = world.model, world.config, world.tokenizer
    trained_decoder = restore(paths["action_decoder"], "action_decoder", use_ema=use_ema)
    decoder, stats = trained_decoder.model, trained_decoder.stats
    if decoder.spec.image_size != config.world.image_size:
        raise ExportError(f"the action decoder reads {decoder.spec.image_size}-pixel frames but "
                          f"the world model makes {config.world.image_size}-pixel ones. Fix: "
                          "train both on the same config.world.image_size.")
    step_fn, weights = policy_step_function(world_model, decoder, config)
    exported = export_policy_step(step_fn, weights, config, platforms)
    planner_files, planner_shapes = {}, None
    if "planner" in paths:
        trained_planner = restore(paths["planner"], "planner", use_ema=use_ema)
        vlm = make_planner(trained_planner.model, trained_planner.tokenizer,
                           trained_planner.config)
        prefill_fn, decode_fn, planner_weights, planner_shapes = planner_functions(vlm)
        prefill_exp, decode_exp = export_planner_steps(prefill_fn, decode_fn, planner_weights,
                                                       planner_shapes, platforms)
        weights |= planner_weights
        planner_files = {PLANNER_PREFILL: prefill_exp.serialize(),
                         PLANNER_DECODE: decode_exp.serialize(),
                         PLANNER_TOKENIZER: vlm.tokenizer.to_str().encode()}

    staging = out.with_name(f".{out.name}.partial-{time.time_ns()}")
    staging.mkdir(parents=True)
    try:
        safetensors.numpy.save_file(weights, str(staging / WEIGHTS),
                                    metadata={"format": f"pewm-bundle-{BUNDLE_FORMAT}"})
        (staging / STEP).write_bytes(exported.serialize())
        (staging / CONFIG).write_text(config.to_json_best_effort(indent=2))
        (staging / STATS).write_text(json.dumps(stats[0].to_json(), indent=2))
        (staging / TOKENIZER).write_text(tokenizer.to_str())
        for name, data in planner_files.items():
            (staging / name).write_bytes(data)
        if planner_files:
            export_hf(vlm.model, vlm.model.spec.to_hf_config(), staging / PLANNER_HF)
            (staging / PLANNER_HF / "tokenizer.json").write_bytes(planner_files[PLANNER_TOKENIZER])
        manifest = {
            "format": BUNDLE_FORMAT,
            "versions": {"pewm_jax": pewm_jax.__version__,
                         **{p: metadata.version(p)
                            for p in ("jax", "jaxlib", "flax", "tokenizers", "safetensors")}},
            "source": {"workdir": str(workdir.resolve()), "steps": steps,
                       "params": "ema_params" if use_ema else "params"},
            "policy_step": {
                "platforms": list(exported.platforms),
                "calling_convention_version": exported.calling_convention_version,
                "image_size": int(config.world.image_size),
                "context_frames": int(config.data.context_frames),
                "horizon": int(config.data.horizon),
                "max_text_tokens": int(config.data.max_text_tokens),
                "action_dim": len(stats[0].mean),
                "sampler": config.diffusion.sampler,
                "num_steps": int(config.diffusion.num_steps),
                "frame_stride": int(config.data.frame_stride)},
            "planner": planner_shapes and {**planner_shapes, "platforms": list(platforms)},
            "files": {str(path.relative_to(staging)): {"bytes": path.stat().st_size,
                                                       "sha256": file_sha256(path)}
                      for path in sorted(staging.rglob("*")) if path.is_file()},
        }
        manifest["manifest_sha256"] = manifest_sha256(manifest)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        # safetensors writes its files 0600; give every file the mode Python's own writes got
        # (0644 under the usual umask), so another account can serve a copied bundle.
        mode = (staging / MANIFEST).stat().st_mode & 0o777
        for path in staging.rglob("*"):
            if path.is_file():
                path.chmod(mode)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest

