"""Export bundle: a trained world model + action decoder as files a robot can run without us.

A bundle directory holds

    weights.safetensors   every parameter, named `world_model.<path>` / `action_decoder.<path>`
                          (the module's attribute path joined with '.', list indices as numbers,
                          e.g. `world_model.blocks.0.attn.qkv.kernel`)
    policy_step.jaxexport the primitive policy step serialized with `jax.export` (StableHLO),
                          lowered for cpu, cuda and tpu, batch dimension symbolic, the weights
                          its first argument (a dict by the names above; never baked in)
    config.json           the world model's training config
    dataset_stats.json    the action statistics the decoder's outputs are denormalised with
    tokenizer.json        the dataset tokenizer (words -> text tokens)
    manifest.json         format version, package versions, the policy's shapes, and the size
                          and sha256 of every file above (`runtime.load_bundle` checks them)

The exported step is `policy_step(weights, context, text_tokens, text_mask, start_xy, goal_xy,
sgg_valid, seed, step_index) -> (clips, actions)`: the same computation as
`PrimitivePolicy.step` (sampler with the config's steps and guidance, uint8 quantisation,
action decoder), returning actions still normalised; the runtime denormalises them.
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
from pewm_jax.evaluate.actions import load_action_decoder
from pewm_jax.evaluate.video_quality import load_world_model
from pewm_jax.export.runtime import (BUNDLE_FORMAT, CONFIG, MANIFEST, STATS, STEP, TOKENIZER,
                                     WEIGHTS, file_sha256)
from pewm_jax.train.checkpoint import CheckpointError, find_checkpoint

PLATFORMS = ("cpu", "cuda", "tpu")
MODELS = ("world_model", "action_decoder")


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
        return clips, decoder.module(weights)(context, clips)  # (B, H, A) normalised

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


def export_bundle(workdir: str | pathlib.Path, out: str | pathlib.Path, *,
                  world_model: str | pathlib.Path | None = None,
                  action_decoder: str | pathlib.Path | None = None, use_ema: bool = True,
                  platforms: Sequence[str] = PLATFORMS) -> dict:
    """Writes the bundle of the run in `workdir` to `out` and returns its manifest.

    The models are the newest committed steps of workdir's world_model/ and action_decoder/,
    or the step directories `world_model` / `action_decoder` name; EMA weights, or with
    use_ema False the raw ones. `out` must not exist: a bundle is never overwritten. The files
    are written beside it and moved into place whole, so a failed export leaves nothing.
    """
    workdir, out = pathlib.Path(workdir), pathlib.Path(out)
    if out.exists():
        raise ExportError(f"{out} already exists; a bundle is never overwritten. Fix: give "
                          "another --out or remove that directory yourself.")
    paths = {"world_model": world_model or workdir, "action_decoder": action_decoder or workdir}
    steps = {}
    for name, path in paths.items():
        try:
            checkpoints, steps[name] = find_checkpoint(path, model=name)
        except CheckpointError as e:
            raise ExportError(f"no {name} checkpoint to export in {path} ({e}). Fix: train the "
                              "world model (`pewm train`) and the action decoder (`pewm "
                              "actions`) into this --workdir first.") from None
        checkpoints.close()
    world_model, config, tokenizer = load_world_model(paths["world_model"], use_ema=use_ema)
    decoder, _, stats = load_action_decoder(paths["action_decoder"], use_ema=use_ema)
    if decoder.spec.image_size != config.world.image_size:
        raise ExportError(f"the action decoder reads {decoder.spec.image_size}-pixel frames but "
                          f"the world model makes {config.world.image_size}-pixel ones. Fix: "
                          "train both on the same config.world.image_size.")
    step_fn, weights = policy_step_function(world_model, decoder, config)
    exported = export_policy_step(step_fn, weights, config, platforms)

    staging = out.with_name(f".{out.name}.partial-{time.time_ns()}")
    staging.mkdir(parents=True)
    try:
        safetensors.numpy.save_file(weights, str(staging / WEIGHTS),
                                    metadata={"format": f"pewm-bundle-{BUNDLE_FORMAT}"})
        (staging / STEP).write_bytes(exported.serialize())
        (staging / CONFIG).write_text(config.to_json_best_effort(indent=2))
        (staging / STATS).write_text(json.dumps(stats[0].to_json(), indent=2))
        (staging / TOKENIZER).write_text(tokenizer.to_str())
        manifest = {
            "format": BUNDLE_FORMAT,
            "versions": {"pewm_jax": pewm_jax.__version__,
                         **{p: metadata.version(p) for p in ("jax", "jaxlib", "flax")}},
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
                "num_steps": int(config.diffusion.num_steps)},
            "files": {name: {"bytes": (staging / name).stat().st_size,
                             "sha256": file_sha256(staging / name)}
                      for name in (WEIGHTS, STEP, CONFIG, STATS, TOKENIZER)},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
