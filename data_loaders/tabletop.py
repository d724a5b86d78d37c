"""The built-in tabletop world's dataset: expert episodes in RLDS layout, then primitive clips.

`generate_dataset(config, out_dir)` (the `pewm data` job) runs the task experts in parallel
worker processes and writes one dataset directory (see `clip_dataset`):

    episodes/pewm_tabletop/2.0.0/   RLDS episodes (TFDS, array_record): steps of
        observation/{image, state, gripper_xy (pixels)}, action, language_instruction (the
        task), reward, discount, is_first/is_last/is_terminal, and per-step primitive
        annotations: primitive_id, primitive_text, primitive_start_xy, primitive_goal_xy (pixels)
    clips/ ...                      the clips of every primitive segment (clips.cut_clips), cut
                                    from the stored episodes
    dataset_statistics.json, tokenizer.json, pewm_dataset.json

Splits: train, validation and test draw seen task compositions from disjoint seed ranges;
holdout_primitive and holdout_composition hold the compositional hold-outs
(pewm_jax.sim.tasks), which never appear in the other splits. The same config and seed give
identical data; the directory appears only when complete.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import pathlib
from collections.abc import Iterator, Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
import tqdm
from etils import epath

from data_loaders.clip_dataset import (DatasetError, DatasetMeta, staged_directory,
                                       write_clips)
from data_loaders.clips import Clip, cut_clips
from pewm_jax.sim import TabletopEnv, expert_episode
from pewm_jax.sim.episodes import Episode
from pewm_jax.sim.primitives import all_primitives
from pewm_jax.sim.tasks import DECOMPOSITION
from pewm_jax.text.plan import plan_prompt

EPISODES_DIR = "episodes"
GRIPPER_DIMS = [2]  # the tabletop action is (dx, dy, grip)
# Dataset split -> (task split of pewm_jax.sim.tasks, config key with its episode count).
SPLITS = {
    "train": ("train", "num_train_episodes"),
    "validation": ("train", "num_val_episodes"),
    "test": ("train", "num_test_episodes"),
    "holdout_primitive": ("holdout_primitive", "num_holdout_episodes"),
    "holdout_composition": ("holdout_composition", "num_holdout_episodes"),
}
_SEEDS_PER_SPLIT = 10_000_000  # episode seeds of different splits never collide
# Episode builders of `pewm data`: the built-in world's, Meta-World's, at EPISODES_VERSION
# (2.0.0 added observation/gripper_xy, the track a long segment's later clips start from).
GENERATED_EPISODES = ("pewm_tabletop", "pewm_metaworld")
EPISODES_VERSION = "2.0.0"


def episode_seed(config: ml_collections.ConfigDict, split: str, index: int) -> int:
    """The world seed of episode `index` of `split`: disjoint ranges per split and config seed."""
    return (config.seed * len(SPLITS) + list(SPLITS).index(split)) * _SEEDS_PER_SPLIT + index


def step_features(image_size: int, *, state_dim: int, action_dim: int) -> tfds.features.Dataset:
    """The RLDS steps of generated episodes (module docstring), with primitive annotations."""
    n, t = image_size, tfds.features.Tensor
    return tfds.features.Dataset({
        "observation": {"image": t(shape=(n, n, 3), dtype=np.uint8,
                                   encoding=tfds.features.Encoding.BYTES),
                        "state": t(shape=(state_dim,), dtype=np.float32),
                        "gripper_xy": t(shape=(2,), dtype=np.float32)},
        "action": t(shape=(action_dim,), dtype=np.float32),
        "language_instruction": tfds.features.Text(),
        "reward": t(shape=(), dtype=np.float32),
        "discount": t(shape=(), dtype=np.float32),
        "is_first": t(shape=(), dtype=np.bool_),
        "is_last": t(shape=(), dtype=np.bool_),
        "is_terminal": t(shape=(), dtype=np.bool_),
        "primitive_id": t(shape=(), dtype=np.int32),
        "primitive_text": tfds.features.Text(),
        "primitive_start_xy": t(shape=(2,), dtype=np.float32),
        "primitive_goal_xy": t(shape=(2,), dtype=np.float32),
    })


def rlds_steps(frames: np.ndarray, states: np.ndarray, gripper_xy: np.ndarray,
               actions: np.ndarray, instruction: str, success: bool,
               segments: Sequence[tuple[int, str, np.ndarray, np.ndarray]]) -> list[dict]:
    """T + 1 RLDS steps from frames (T+1, ...), states (T+1, S), the gripper's pixels
    (T+1, 2), actions (T, A) and segments (first frame, words, start xy, goal xy) in order; the
    last step holds the final observation (zero action) and belongs to the last segment."""
    num_steps = len(frames)
    seg_of_step = np.zeros(num_steps, np.int32)
    for k, (start, *_) in enumerate(segments):
        seg_of_step[start:] = k
    actions = np.concatenate([actions, np.zeros((1, actions.shape[1]), np.float32)])
    steps = []
    for t in range(num_steps):
        _, text, start_xy, goal_xy = segments[seg_of_step[t]]
        last = t == num_steps - 1
        steps.append({
            "observation": {"image": frames[t], "state": states[t],
                            "gripper_xy": np.asarray(gripper_xy[t], np.float32)},
            "action": actions[t], "language_instruction": instruction,
            "reward": np.float32(last and success), "discount": np.float32(1.0),
            "is_first": t == 0, "is_last": last, "is_terminal": last and success,
            "primitive_id": seg_of_step[t], "primitive_text": text,
            "primitive_start_xy": start_xy, "primitive_goal_xy": goal_xy})
    return steps


class _EpisodeBuilder(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of the tabletop episodes in RLDS layout (module docstring)."""

    name = "pewm_tabletop"
    VERSION = tfds.core.Version(EPISODES_VERSION)

    def __init__(self, *, config: ml_collections.ConfigDict, pool, **kwargs):
        self._cfg = config
        self._pool = pool  # a multiprocessing pool set up by _init_worker, or None: in-process
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        t = tfds.features.Tensor
        return tfds.core.DatasetInfo(builder=self, description="pewm built-in tabletop world, "
                                     "scripted expert episodes with primitive annotations",
                                     features=tfds.features.FeaturesDict({
            "steps": step_features(self._cfg.world.image_size, state_dim=3, action_dim=3),
            "episode_metadata": {"seed": t(shape=(), dtype=np.int64),
                                 "template": tfds.features.Text(),
                                 "task_split": tfds.features.Text(),
                                 "success": t(shape=(), dtype=np.bool_)},
        }))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split, (_, key) in SPLITS.items()
                if self._cfg.data[key] > 0}

    def _generate_examples(self, split: str):
        for ep in _generate_episodes(self._cfg, split, self._pool):
            yield ep.seed, _rlds_episode(ep)


def _init_worker(world: dict) -> None:
    global _ENV
    _ENV = TabletopEnv(world["image_size"], (world["num_objects_min"], world["num_objects_max"]),
                       world["max_delta"], world["primitive_max_steps"])


def _run_episode(args: tuple[int, str]) -> Episode:
    seed, task_split = args
    return expert_episode(_ENV, seed, split=task_split, paraphrase_rng=np.random.default_rng(seed))


def _generate_episodes(config: ml_collections.ConfigDict, split: str, pool) -> Iterator[Episode]:
    """Expert episodes of one dataset split, in seed order, from `pool` (or in-process)."""
    task_split, key = SPLITS[split]
    jobs = [(episode_seed(config, split, i), task_split) for i in range(config.data[key])]
    results = pool.imap(_run_episode, jobs, chunksize=4) if pool else map(_run_episode, jobs)
    yield from tqdm.tqdm(results, total=len(jobs), desc=f"{split} episodes", unit="ep", leave=False)


@contextlib.contextmanager
def _worker_pool(config: ml_collections.ConfigDict):
    """Processes that generate episodes; none (in-process) for generation_workers <= 1."""
    world = config.world.to_dict()
    if config.data.generation_workers <= 1:
        _init_worker(world)
        yield None
        return
    # spawn: the parent may hold JAX threads, which fork would copy in a broken state.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(config.data.generation_workers, _init_worker, (world,)) as pool:
        yield pool


def _rlds_episode(ep: Episode) -> dict:
    """An Episode as an RLDS episode (`rlds_steps`)."""
    segments = [(seg.start_frame, seg.text, seg.start_xy, seg.goal_xy) for seg in ep.segments]
    track = ep.states[:, :2] * float(ep.frames.shape[1])  # the gripper, in pixels
    return {"steps": rlds_steps(ep.frames, ep.states, track, ep.actions, ep.task, ep.success,
                                segments),
            "episode_metadata": {"seed": ep.seed, "template": ep.template,
                                 "task_split": ep.split, "success": ep.success}}


def episode_source(dataset_dir: str | pathlib.Path, split: str) -> Sequence[dict]:
    """Random-access source over one split's stored RLDS episodes (decoded numpy dicts) of a
    generated dataset (the built-in world's or Meta-World's: the same per-step annotations);
    DatasetError when the directory holds no generated episodes or not that split."""
    root = epath.Path(dataset_dir)
    DatasetMeta.load(root)  # DatasetError for a missing dataset or an older format
    found = [root / EPISODES_DIR / name / EPISODES_VERSION for name in GENERATED_EPISODES]
    version = next((v for v in found if v.exists()), None)
    if version is None:
        raise DatasetError(
            f"{root} holds no generated episodes (none of {[str(v) for v in found]}); the planner "
            "learns from them. Fix: point config.data.dataset_dir at a dataset `pewm data` "
            "generated.")
    builder = tfds.builder_from_directory(str(version))
    if split not in builder.info.splits:
        raise DatasetError(f"{root} has no episodes in split {split!r}; it has "
                           f"{sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)


def single_episode_dataset(entries: Sequence[tuple[str, float]], split: str,
                           learner: str) -> tuple[str, int]:
    """(dataset dir, episode count of `split`) of the one built-in world dataset that `learner`
    (what learns from whole episodes: the planner, the whole-task baseline) reads; DatasetError
    for a mixture of several or an empty split."""
    if len(entries) > 1:
        raise DatasetError(f"{learner} learns from one built-in world dataset; "
                           "config.data.mixture names several. Fix: set "
                           "config.data.dataset_dir to the generated one.")
    dataset_dir = str(entries[0][0])
    size = len(episode_source(dataset_dir, split))
    if size == 0:
        raise DatasetError(f"{dataset_dir} has no episodes in split {split!r}")
    return dataset_dir, size


def segment_starts(record: dict) -> np.ndarray:
    """The step at which each primitive of a stored RLDS episode begins (ascending)."""
    steps = record["steps"]
    ids = np.array([steps[t]["primitive_id"] for t in range(len(steps))])
    return np.flatnonzero(np.diff(ids, prepend=-1))


def episode_clips(record: dict, data: ml_collections.ConfigDict, *,
                  gripper_dims: Sequence[int] = tuple(GRIPPER_DIMS),
                  episode_id: int | None = None) -> list[Clip]:
    """The clips of every primitive of one stored RLDS episode (per-step primitive
    annotations); `episode_id` defaults to the episode's seed."""
    steps = record["steps"]
    steps = [steps[t] for t in range(len(steps))]
    frames = np.stack([s["observation"]["image"] for s in steps])
    track = np.stack([s["observation"]["gripper_xy"] for s in steps])
    actions = np.stack([s["action"] for s in steps[:-1]])
    starts = segment_starts(record)
    ends = np.append(starts[1:], len(steps) - 1)
    clips = []
    for start, end in zip(starts, ends):
        first = steps[start]
        clips += cut_clips(
            frames, actions, int(start), int(end), horizon=data.horizon, stride=data.frame_stride,
            context_frames=data.context_frames, gripper_dims=gripper_dims,
            text=decode_text(first["primitive_text"]), start_xy=first["primitive_start_xy"],
            goal_xy=first["primitive_goal_xy"], sgg_valid=True,
            episode_id=int(record["episode_metadata"]["seed"] if episode_id is None
                           else episode_id),
            segment_index=int(steps[start]["primitive_id"]), track_xy=track)
    return clips


def decode_text(value) -> str:
    """A TFDS text feature (bytes or str) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def generate_dataset(config: ml_collections.ConfigDict, out_dir: str | pathlib.Path,
                     overwrite: bool = False) -> DatasetMeta:
    """Generates the tabletop dataset directory `out_dir` (module docstring); returns its meta."""
    with staged_directory(pathlib.Path(out_dir), overwrite) as stage:
        with _worker_pool(config) as pool:
            builder = _EpisodeBuilder(config=config, pool=pool, data_dir=str(stage / EPISODES_DIR),
                                      file_format="array_record")
            tfds.disable_progress_bar()  # our own progress bar counts episodes
            builder.download_and_prepare()
        splits = {split: builder.as_data_source(split=split) for split in builder.info.splits}
        # Tasks as the planner reads them (their words and the prompt's own), and every wording
        # of every primitive of the world (what the planner may write, held-out ones included).
        prompts = {plan_prompt(decode_text(record["steps"][0]["language_instruction"]))
                   for record in splits["train"]}
        wordings = {p.text(k) for p in all_primitives() for k in range(p.num_paraphrases())}

        def clips_of(source) -> Iterator[Clip]:
            for i in range(len(source)):
                yield from episode_clips(source[i], config.data)

        return write_clips(stage, dataset_meta(config),
                           {s: clips_of(src) for s, src in splits.items()},
                           tokenizer_texts=sorted(prompts | wordings))


def dataset_meta(config: ml_collections.ConfigDict) -> DatasetMeta:
    """The meta a tabletop dataset generated from `config` has (split counts aside)."""
    return DatasetMeta(
        name="pewm_tabletop", image_size=config.world.image_size, horizon=config.data.horizon,
        frame_stride=config.data.frame_stride, context_frames=config.data.context_frames,
        action_dim=3, gripper_dims=GRIPPER_DIMS,
        source=(f"pewm_jax.sim expert episodes; task decomposition {DECOMPOSITION}; seed "
                f"{config.seed}; world {config.world.to_dict()}; "
                + "; ".join(f"{k} {config.data[k]}" for _, k in SPLITS.values())))
