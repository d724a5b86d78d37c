"""Meta-World expert demonstrations as a clip dataset (`pewm data` with data.generator
'metaworld'; needs the `metaworld` extra).

`generate_dataset(config, out_dir)` plays the benchmark's scripted experts
(`pewm_jax.metaworld.experts`) on seeded task variations, keeps the successful episodes, and
writes the same layout as the built-in world (see `clip_dataset`, `tabletop`):

    episodes/pewm_metaworld/2.0.0/   RLDS episodes, one per (task, seed, camera): steps of
        observation/{image, state (hand xyz, gripper opening), gripper_xy (the tool centre's
        pixels in that camera)}, action (xyz delta, effort),
        language_instruction (the task), reward, discount, is_first/is_last/is_terminal, and
        per-step primitive annotations (id, words, start/goal pixels in that camera)
    clips/ ...                      the clips of every primitive segment, cut by
                                    `tabletop.episode_clips`
    dataset_statistics.json, tokenizer.json, pewm_dataset.json

Splits train / validation / test take `metaworld.{train,val,test}_seeds` seeds per task from
disjoint ranges far past the AVDC protocol's evaluation seeds (0-24); a split with 0 seeds
is left out.

Resumable: each finished demonstration is saved at once in `.<name>.demos/` beside `out_dir`
(written under a temporary name, then renamed); a run started again after an interruption
reuses them and the progress bar starts from there. The cache is deleted once the dataset is in
place; a cache recorded with other settings is refused, not mixed in.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import pathlib
import shutil
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from data_loaders.clip_dataset import DatasetError, DatasetMeta, staged_directory, write_clips
from data_loaders.clips import Clip
from data_loaders.tabletop import EPISODES_VERSION, episode_clips, rlds_steps, step_features
from pewm_jax.metaworld.experts import all_wordings, run_expert, task_words
from pewm_jax.text.plan import plan_prompt

EPISODES_DIR = "episodes"
SPLIT_SEEDS = {"train": "train_seeds", "validation": "val_seeds", "test": "test_seeds"}
_SEED_BASE = {"train": 1_000_000, "validation": 2_000_000, "test": 3_000_000}
ACTION_DIM, STATE_DIM, GRIPPER_DIMS = 4, 4, [3]  # pewm_jax.metaworld.env's action layout


def demo_seed(config: ml_collections.ConfigDict, split: str, index: int) -> int:
    """The Meta-World seed of demonstration `index` of `split`: past the evaluation seeds, in
    disjoint ranges per split and config seed."""
    if index >= 1_000_000:
        raise ValueError(f"at most 1,000,000 seeds per split, got index {index}")
    seed = config.seed * 10_000_000 + _SEED_BASE[split] + index
    if seed >= 2**32:  # Meta-World seeds numpy's global generator
        raise DatasetError(f"config.seed = {config.seed} puts Meta-World demonstration seeds "
                           f"past 2**32 - 1 ({seed}). Fix: use a config.seed of at most 429.")
    return seed


def episode_id(tasks: tuple[str, ...], cameras: tuple[str, ...], task: str, seed: int,
               camera: str) -> int:
    """A unique id of one (task, seed, camera) episode (clip keys and data order use it)."""
    return (seed * len(tasks) + tasks.index(task)) * len(cameras) + cameras.index(camera)


class _EpisodeBuilder(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of the Meta-World episodes in RLDS layout (module docstring)."""

    name = "pewm_metaworld"
    VERSION = tfds.core.Version(EPISODES_VERSION)

    def __init__(self, *, config: ml_collections.ConfigDict, demos, **kwargs):
        self._cfg, self._demos = config, demos  # demos: split -> list of cached demo files
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        t = tfds.features.Tensor
        return tfds.core.DatasetInfo(
            builder=self, description="Meta-World v3 scripted expert episodes, segmented into "
            "primitives (pewm_jax.metaworld.experts)", features=tfds.features.FeaturesDict({
                "steps": step_features(self._cfg.world.image_size, state_dim=STATE_DIM,
                                       action_dim=ACTION_DIM),
                "episode_metadata": {"episode_id": t(shape=(), dtype=np.int64),
                                     "task": tfds.features.Text(),
                                     "seed": t(shape=(), dtype=np.int64),
                                     "camera": tfds.features.Text(),
                                     "success": t(shape=(), dtype=np.bool_)}}))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(files) for split, files in self._demos.items()
                if files}

    def _generate_examples(self, files: list[pathlib.Path]):
        mw = self._cfg.metaworld
        tasks, cameras = tuple(mw.tasks), tuple(mw.cameras)
        for path in files:
            demo = _load_demo(path)
            for camera in cameras:
                xy = demo[f"tcp_xy/{camera}"]
                segments = [(int(s), str(text), xy[s], xy[e]) for s, e, text in
                            zip(demo["seg_start"], demo["seg_end"], demo["seg_text"])]
                key = episode_id(tasks, cameras, str(demo["task"]), int(demo["seed"]), camera)
                yield key, {
                    "steps": rlds_steps(demo[f"frames/{camera}"], demo["states"], xy,
                                        demo["actions"], str(demo["instruction"]), True,
                                        segments),
                    "episode_metadata": {"episode_id": key, "task": str(demo["task"]),
                                         "seed": int(demo["seed"]), "camera": camera,
                                         "success": True}}


def _load_demo(path: pathlib.Path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _run_demo(args: tuple[str, int, tuple[str, ...], int, int, str]) -> str | None:
    """Plays one expert episode and caches it; the file's path, or None when it failed."""
    task, seed, cameras, image_size, min_steps, out = args
    demo = run_expert(task, seed, cameras=cameras, image_size=image_size,
                      min_segment_steps=min_steps)
    if not demo.success:
        return None
    arrays = {"task": np.array(task), "seed": np.array(seed),
              "instruction": np.array(task_words(task).instruction),
              "actions": demo.actions, "states": demo.states,
              "seg_start": np.array([s.start for s in demo.segments]),
              "seg_end": np.array([s.end for s in demo.segments]),
              "seg_text": np.array([s.text for s in demo.segments])}
    for camera in cameras:
        arrays[f"frames/{camera}"] = demo.frames[camera]
        arrays[f"tcp_xy/{camera}"] = demo.tcp_xy[camera]
    tmp = pathlib.Path(f"{out}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, out)  # a cached file is always complete
    return out


@contextlib.contextmanager
def _pool(workers: int):
    if workers <= 1:
        yield None
        return
    # spawn: each worker makes its own EGL context, and the parent may hold JAX threads.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield pool


def collect_demos(config: ml_collections.ConfigDict, cache: pathlib.Path
                  ) -> dict[str, list[pathlib.Path]]:
    """Every split's successful demonstrations, played (or reused from `cache`) in order.

    A cache made with other recording settings is refused (DatasetError), never mixed in."""
    mw = config.metaworld
    cache.mkdir(parents=True, exist_ok=True)
    settings = {"image_size": config.world.image_size, "cameras": list(mw.cameras),
                "min_segment_steps": mw.min_segment_steps}
    stamp = cache / "settings.json"
    if stamp.exists() and json.loads(stamp.read_text()) != settings:
        raise DatasetError(
            f"{cache} holds demonstrations of an interrupted run recorded with other settings "
            f"({json.loads(stamp.read_text())}, this config: {settings}). Fix: run again with "
            "those settings to finish it, or delete that directory to start over.")
    stamp.write_text(json.dumps(settings))
    jobs, wanted = [], {}
    for split, key in SPLIT_SEEDS.items():
        wanted[split] = []
        for task in mw.tasks:
            for i in range(mw[key]):
                seed = demo_seed(config, split, i)
                path = cache / f"{task}_{seed}.npz"
                wanted[split].append(path)
                if not path.exists() and not (cache / f"{task}_{seed}.failed").exists():
                    jobs.append((task, seed, tuple(mw.cameras), config.world.image_size,
                                 mw.min_segment_steps, str(path)))
    total = sum(len(v) for v in wanted.values())
    with _pool(config.data.generation_workers) as pool:
        results = pool.imap(_run_demo, jobs) if pool else map(_run_demo, jobs)
        with tqdm.tqdm(total=total, initial=total - len(jobs), desc="Meta-World demos",
                       unit="ep", leave=False) as bar:
            for job, done in zip(jobs, results):
                if done is None:  # the expert failed: remembered, so a rerun skips it
                    pathlib.Path(job[-1]).with_suffix(".failed").touch()
                bar.update()
    return {split: [p for p in paths if p.exists()] for split, paths in wanted.items()}


def generate_dataset(config: ml_collections.ConfigDict, out_dir: str | pathlib.Path,
                     overwrite: bool = False) -> DatasetMeta:
    """Generates the Meta-World dataset directory `out_dir` (module docstring)."""
    out_dir = pathlib.Path(out_dir)
    cache = out_dir.with_name(f".{out_dir.name}.demos")
    demos = collect_demos(config, cache)
    if not demos["train"]:
        raise DatasetError(f"no successful train demonstrations (metaworld.train_seeds = "
                           f"{config.metaworld.train_seeds}; every expert episode failed). Fix: "
                           "raise config.metaworld.train_seeds.")
    with staged_directory(out_dir, overwrite) as stage:
        builder = _EpisodeBuilder(config=config, demos=demos,
                                  data_dir=str(stage / EPISODES_DIR), file_format="array_record")
        tfds.disable_progress_bar()
        builder.download_and_prepare()
        splits = {s: builder.as_data_source(split=s) for s in builder.info.splits}

        def clips_of(source) -> Iterator[Clip]:
            for i in range(len(source)):
                record = source[i]
                yield from episode_clips(record, config.data, gripper_dims=GRIPPER_DIMS,
                                         episode_id=int(record["episode_metadata"]["episode_id"]))

        prompts = {plan_prompt(task_words(t).instruction) for t in config.metaworld.tasks}
        meta = write_clips(stage, dataset_meta(config),
                           {s: clips_of(src) for s, src in splits.items()},
                           tokenizer_texts=sorted(prompts | set(all_wordings())))
    shutil.rmtree(cache)
    return meta


def dataset_meta(config: ml_collections.ConfigDict) -> DatasetMeta:
    """The meta a Meta-World dataset generated from `config` has (split counts aside)."""
    mw = config.metaworld
    return DatasetMeta(
        name="pewm_metaworld", image_size=config.world.image_size, horizon=config.data.horizon,
        frame_stride=config.data.frame_stride, context_frames=config.data.context_frames,
        action_dim=ACTION_DIM, gripper_dims=GRIPPER_DIMS,
        source=(f"Meta-World v3 scripted experts; seed {config.seed}; tasks {list(mw.tasks)}; "
                f"cameras {list(mw.cameras)}; seeds per task "
                + ", ".join(f"{s} {mw[k]}" for s, k in SPLIT_SEEDS.items())
                + f"; min_segment_steps {mw.min_segment_steps}"))
