"""Clip dataset directories: what the dataset commands write and the Grain pipelines read.

    <dataset_dir>/
      pewm_dataset.json          what the data is: name, frame size, clip shape, action layout
      dataset_statistics.json    ActionStats of the train clips (action normalisation)
      tokenizer.json             the tokenizer built from the train split's words
      clips/pewm_clips/2.0.0/    TFDS, array_record: one record per primitive clip, by split
      episodes/...               (generated data) the source episodes in RLDS layout

A directory is written under a temporary name and renamed into place only when everything in
it is complete, so an interrupted run never leaves a dataset that looks complete, and an
existing dataset is never replaced unless `overwrite=True`. Writing is local; reading goes
through `etils.epath`, so a dataset copied to `gs://...` is read the same way (with the `gcs`
extra installed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from pewm_jax.text import tokenizer as tokenizer_lib
from data_loaders.clips import CLIP_FORMAT, ActionStats, Clip

META_FILE = "pewm_dataset.json"
STATS_FILE = "dataset_statistics.json"
TOKENIZER_FILE = "tokenizer.json"
CLIPS_DIR = "clips"
BUILDER_NAME = "pewm_clips"
BUILDER_VERSION = "2.0.0"  # 2.0.0: per-step actions (clips.CLIP_FORMAT 2)


class DatasetError(ValueError):
    """A dataset directory is missing, incomplete or not what the config expects."""


@dataclasses.dataclass
class DatasetMeta:
    """What a clip dataset holds; stored as pewm_dataset.json."""

    name: str
    image_size: int  # stored frames are image_size x image_size RGB
    horizon: int
    frame_stride: int
    context_frames: int
    action_dim: int
    gripper_dims: list[int]  # action dimensions that are gripper commands (never normalised)
    source: str  # where the episodes came from (generator and its settings, or an RLDS path)
    splits: dict[str, int] = dataclasses.field(default_factory=dict)  # split -> clip count
    # Ingested data: split -> what was read ({"episodes": n, "without_instruction": n,
    # "too_short": n, "clips_without_text": n}), filled in while the clips are written.
    episodes: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    clip_format: int = CLIP_FORMAT  # the clip contract the clips follow (clips.CLIP_FORMAT)

    @classmethod
    def load(cls, dataset_dir: str | os.PathLike) -> "DatasetMeta":
        """The meta of a dataset directory; DatasetError for one written under an older clip
        contract (it cannot be read as per-step actions: rebuild it)."""
        path = require_dataset(dataset_dir)
        fields = json.loads((path / META_FILE).read_text())
        if fields.get("clip_format", 1) != CLIP_FORMAT:
            raise DatasetError(
                f"{path} was written under clip format {fields.get('clip_format', 1)} (one summed "
                f"action per frame interval); this version reads format {CLIP_FORMAT}: the "
                "actions of every environment step, (H, frame_stride, A). Fix: rebuild it into a "
                "new directory (or with --overwrite): `pewm data --config=<its config> "
                "--workdir=<run dir> --overwrite` for generated data, `pewm ingest --spec=<spec> "
                "--source=<source> --out=<dir> --overwrite` for RLDS data.")
        return cls(**fields)


class _ClipBuilder(tfds.core.GeneratorBasedBuilder):
    """TFDS builder writing the clips that `write_dataset` hands it (one record per clip)."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version(BUILDER_VERSION)

    def __init__(self, *, meta: DatasetMeta, split_clips: Mapping[str, Iterable[Clip]], **kwargs):
        self._meta = meta
        self._split_clips = split_clips
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        m = self._meta
        n, t, raw = m.image_size, tfds.features.Tensor, tfds.features.Encoding.BYTES
        return tfds.core.DatasetInfo(builder=self, description=f"Primitive clips of {m.name}",
                                     features=tfds.features.FeaturesDict({
            # Raw bytes: ~70x faster to decode than the default per-element encoding.
            "context": t(shape=(m.context_frames, n, n, 3), dtype=np.uint8, encoding=raw),
            "frames": t(shape=(m.horizon, n, n, 3), dtype=np.uint8, encoding=raw),
            "actions": t(shape=(m.horizon, m.frame_stride, m.action_dim), dtype=np.float32),
            "action_valid": t(shape=(m.horizon, m.frame_stride), dtype=np.bool_),
            "text": tfds.features.Text(),
            "start_xy": t(shape=(2,), dtype=np.float32),
            "goal_xy": t(shape=(2,), dtype=np.float32),
            "sgg_valid": t(shape=(), dtype=np.bool_),
            "episode_id": t(shape=(), dtype=np.int64),
            "segment_index": t(shape=(), dtype=np.int32),
            "part": t(shape=(), dtype=np.int32),
        }))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(clips) for split, clips in self._split_clips.items()}

    def _generate_examples(self, clips: Iterable[Clip]):
        for clip in clips:
            yield f"{clip.episode_id}_{clip.segment_index}_{clip.part}", {
                "context": clip.context, "frames": clip.frames, "actions": clip.actions,
                "action_valid": clip.action_valid, "text": clip.text, "start_xy": clip.start_xy,
                "goal_xy": clip.goal_xy, "sgg_valid": clip.sgg_valid,
                "episode_id": clip.episode_id, "segment_index": clip.segment_index,
                "part": clip.part}


@contextlib.contextmanager
def staged_directory(out_dir: pathlib.Path, overwrite: bool) -> Iterator[pathlib.Path]:
    """Yields a temporary sibling of `out_dir` that becomes `out_dir` only if the block succeeds."""
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DatasetError(f"{out_dir} already exists; it is left as it is. Choose another "
                           "directory, or pass --overwrite to replace it.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.with_name(f".{out_dir.name}.incomplete-{uuid.uuid4().hex[:8]}")
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out_dir.exists():  # overwrite: move the old one aside first, delete it once replaced
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
        os.replace(stage, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(stage, out_dir)


def write_clips(stage: pathlib.Path, meta: DatasetMeta, split_clips: Mapping[str, Iterable[Clip]],
                tokenizer_texts: Iterable[str] = ()) -> DatasetMeta:
    """Writes clips, statistics, tokenizer and meta into a staged dataset directory.

    Statistics and the tokenizer come from the 'train' split's clips (plus `tokenizer_texts`,
    e.g. task instructions), gathered while the clips are written.
    """
    if "train" not in split_clips:
        raise DatasetError(f"a dataset needs a 'train' split; got {sorted(split_clips)}")
    train_actions: list[np.ndarray] = []
    train_texts: list[str] = list(tokenizer_texts)
    counts = {split: 0 for split in split_clips}

    def tracked(split: str, clips: Iterable[Clip]):
        for clip in clips:
            counts[split] += 1
            if split == "train":
                train_actions.append(clip.actions[clip.action_valid])  # (steps, A)
                train_texts.append(clip.text)
            yield clip

    builder = _ClipBuilder(meta=meta, split_clips={s: tracked(s, c) for s, c in split_clips.items()},
                           data_dir=str(stage / CLIPS_DIR), file_format="array_record")
    tfds.disable_progress_bar()  # our own progress bar counts episodes
    builder.download_and_prepare()
    if counts["train"] == 0:
        raise DatasetError("the train split has no clips; generate or convert more episodes")
    ActionStats.compute(np.concatenate(train_actions), meta.gripper_dims).save(stage / STATS_FILE)
    tokenizer_lib.save_tokenizer(tokenizer_lib.build_tokenizer(train_texts), stage / TOKENIZER_FILE)
    meta = dataclasses.replace(meta, splits=counts)
    (stage / META_FILE).write_text(json.dumps(dataclasses.asdict(meta), indent=1))
    return meta


def write_dataset(out_dir: str | os.PathLike, meta: DatasetMeta,
                  split_clips: Mapping[str, Callable[[], Iterable[Clip]]],
                  tokenizer_texts: Iterable[str] = (), overwrite: bool = False) -> DatasetMeta:
    """Writes a whole clip dataset directory (module docstring) atomically."""
    with staged_directory(pathlib.Path(out_dir), overwrite) as stage:
        return write_clips(stage, meta, {s: make() for s, make in split_clips.items()},
                           tokenizer_texts)


class Generator(Protocol):
    """A dataset generator module (`data_loaders.tabletop`, `data_loaders.metaworld`)."""

    def dataset_meta(self, config: Any) -> DatasetMeta: ...

    def generate_dataset(self, config: Any, out_dir: str | os.PathLike,
                         overwrite: bool = False) -> DatasetMeta: ...


def ensure_dataset(generator: Generator, config: Any, out_dir: str | os.PathLike,
                   overwrite: bool = False) -> tuple[DatasetMeta, bool]:
    """(meta, generated): reuses the dataset at `out_dir` if `generator` would make the same one
    from `config` (split counts aside), else generates it. A dataset made with other settings
    is never replaced silently: DatasetError lists what differs (overwrite=True regenerates)."""
    path = pathlib.Path(out_dir)
    if path.exists() and not overwrite:
        have, want = DatasetMeta.load(path), generator.dataset_meta(config)
        differ = [f.name for f in dataclasses.fields(DatasetMeta)
                  if f.name not in ("splits", "episodes")
                  and getattr(have, f.name) != getattr(want, f.name)]
        if differ:
            raise DatasetError(
                f"{path} holds a dataset made with other settings ({', '.join(differ)} differ: "
                f"{[(getattr(have, f), getattr(want, f)) for f in differ]}). It is left as it is; "
                "use another --config.data.dataset_dir, or pass --overwrite to regenerate it.")
        return have, False
    return generator.generate_dataset(config, path, overwrite=overwrite), True


def require_dataset(dataset_dir: str | os.PathLike) -> epath.Path:
    """The dataset directory as a path, or DatasetError saying how to make or where to put it."""
    path = epath.Path(dataset_dir)
    if not (path / META_FILE).exists():
        raise DatasetError(
            f"no dataset at {path} ({META_FILE} not found). Generate the built-in world's data "
            "with `pewm data --config=configs/quickstart.py --workdir=<run dir>`, convert an RLDS "
            "dataset with `pewm ingest`, or point --config.data.dataset_dir at a directory that "
            f"holds {META_FILE}, {STATS_FILE}, {TOKENIZER_FILE} and {CLIPS_DIR}/.")
    return path


def clip_source(dataset_dir: str | os.PathLike, split: str) -> Sequence[dict]:
    """Random-access source over one split's clips (decoded numpy dicts)."""
    path = require_dataset(dataset_dir)
    meta = DatasetMeta.load(path)
    if split not in meta.splits:
        raise DatasetError(f"{path} has no split {split!r}; it has {sorted(meta.splits)}")
    builder = tfds.builder_from_directory(str(path / CLIPS_DIR / BUILDER_NAME / BUILDER_VERSION))
    return builder.as_data_source(split=split)


def load_statistics(dataset_dir: str | os.PathLike) -> ActionStats:
    return ActionStats.from_json(json.loads((require_dataset(dataset_dir) / STATS_FILE).read_text()))
