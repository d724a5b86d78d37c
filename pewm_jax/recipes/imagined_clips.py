"""Imagined training clips: the world model's own samples of the train split's clips, each
labelled with its true clip's actions, written as a clip dataset (`<workdir>/imagined`).

Why: the action decoder learns inverse dynamics from rendered frames, but in closed loop it
reads the world model's frames, with their ghosts, blur and early jumps. Trained on a share
of imagined clips too (`config.action_decoder.imagined_weight`), it learns which actions the
world model's drawings of a motion stand for. The world model samples each clip from the true
clip's context frame, words and start/goal points, with the run's sampling settings
(`config.SAMPLING_KEYS`), so the labels are the actions the expert took from that frame.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
from collections.abc import Callable, Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx

from data_loaders import clip_dataset, pipeline
from data_loaders.clips import Clip
from pewm_jax.config import SAMPLING_KEYS
from pewm_jax.diffusion import sample_from_config
from pewm_jax.recipes.restore import Trained, restore, with_sampling
from pewm_jax.train.metrics import log

IMAGINED_DIR = "imagined"  # <workdir>/imagined: the default config.action_decoder.imagined_dir
SPLIT = "train"
BATCH_SIZE = 32  # clips sampled per call (one compile: the last batch is padded)


def imagined_dir(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
                 ) -> pathlib.Path:
    """config.action_decoder.imagined_dir, or <workdir>/imagined."""
    return pathlib.Path(config.action_decoder.imagined_dir or pathlib.Path(workdir)
                        / IMAGINED_DIR)


def describe(config: ml_collections.ConfigDict, world: Trained, world_dir: pathlib.Path,
             count: int) -> str:
    """What an imagined dataset was made from (its meta's `source`): reused only if equal."""
    sampling = {key: config.diffusion[key] for key in SAMPLING_KEYS}
    return (f"world model {world_dir} step {world.step}; sampling {sampling}; seed "
            f"{config.seed}; the first {count} {SPLIT} clips of {config.data.dataset_dir}")


def clip_sampler(world: Trained, batch_size: int
                 ) -> Callable[[Mapping[str, np.ndarray], jax.Array], np.ndarray]:
    """(clips' conditions, rng) -> `world`'s samples of up to `batch_size` clips as (b, H, N,
    N, 3) uint8 frames; the rows are padded to `batch_size` with the first one, so the
    sampler compiles once (each row's sample does not depend on the others)."""
    sample = nnx.jit(lambda model, cond, rng: sample_from_config(model, cond, rng, world.config))

    def imagine(cond: Mapping[str, np.ndarray], rng: jax.Array) -> np.ndarray:
        rows = len(cond["context"])
        padded = {k: np.concatenate([v, np.repeat(v[:1], batch_size - rows, axis=0)])
                  for k, v in cond.items()}
        frames = np.asarray(sample(world.model, padded, rng))[:rows]
        return np.clip(np.round(frames * 255.0), 0, 255).astype(np.uint8)

    return imagine


def _imagined(config: ml_collections.ConfigDict, world: Trained, count: int):
    """Yields the first `count` train clips with their future frames sampled by `world`."""
    source = clip_dataset.clip_source(config.data.dataset_dir, SPLIT)
    clips = pipeline.ClipPipeline(config, SPLIT, augment=False, process_index=0,
                                  process_count=1, num_workers=0)
    sample = clip_sampler(world, BATCH_SIZE)
    keys = ("context", "text_tokens", "text_mask", "start_xy", "goal_xy", "sgg_valid")
    rng = jax.random.key(config.seed)
    for first in range(0, count, BATCH_SIZE):
        rows = list(range(first, min(first + BATCH_SIZE, count)))
        examples = [clips.transform(j, (0, j)) for j in rows]
        cond = {k: np.stack([e[k] for e in examples]) for k in keys}
        frames = sample(cond, jax.random.fold_in(rng, first))  # (b, H, S, S, 3) uint8
        for row, j in enumerate(rows):
            record, example = source[j], examples[row]
            text = record["text"]
            yield Clip(context=example["context"], frames=frames[row],
                       actions=np.asarray(record["actions"], np.float32),
                       action_valid=np.asarray(record["action_valid"], bool),
                       text=text.decode("utf-8") if isinstance(text, bytes) else str(text),
                       start_xy=example["start_xy"], goal_xy=example["goal_xy"],
                       sgg_valid=bool(example["sgg_valid"]),
                       episode_id=int(record["episode_id"]),
                       segment_index=int(record["segment_index"]), part=int(record["part"]))
        if first // BATCH_SIZE % 20 == 0:
            log(f"[imagine] {min(first + BATCH_SIZE, count)} / {count} clips")


def ensure_imagined_dataset(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                            overwrite: bool = False) -> tuple[clip_dataset.DatasetMeta, bool]:
    """(meta, generated): the imagined dataset of the run's newest world model, reused when one
    made the same way is there, else sampled and written atomically. One made otherwise (another
    world-model step or sampling) is never replaced silently: DatasetError, unless `overwrite`.
    `config.data.dataset_dir` must name the source dataset."""
    workdir = pathlib.Path(workdir)
    out = imagined_dir(config, workdir)
    world_dir = workdir / "world_model"
    world = with_sampling(restore(world_dir, "world_model"), config.diffusion)
    source = clip_dataset.DatasetMeta.load(config.data.dataset_dir)
    total = source.splits.get(SPLIT, 0)
    count = min(config.action_decoder.imagined_clips or total, total)
    made_from = describe(config, world, world_dir, count)
    if out.exists() and not overwrite:
        have = clip_dataset.DatasetMeta.load(out)
        if have.source != made_from:
            raise clip_dataset.DatasetError(
                f"{out} holds imagined clips made otherwise ({have.source}); this run would make "
                f"them from {made_from}. It is left as it is: pass --overwrite to sample them "
                "again, or set --config.action_decoder.imagined_dir to another directory.")
        return have, False
    meta = dataclasses.replace(source, name=f"{source.name}_imagined", source=made_from,
                               image_size=int(config.world.image_size), splits={}, episodes={})
    log(f"[imagine] {count} {SPLIT} clips sampled by world model step {world.step} -> {out}")
    with clip_dataset.staged_directory(out, overwrite) as stage:
        meta = clip_dataset.write_clips(stage, meta, {SPLIT: _imagined(config, world, count)})
        # The true clips' statistics and tokenizer: actions normalise as in the source dataset.
        for name in (clip_dataset.STATS_FILE, clip_dataset.TOKENIZER_FILE):
            shutil.copyfile(pathlib.Path(config.data.dataset_dir) / name, stage / name)
    return meta, True
