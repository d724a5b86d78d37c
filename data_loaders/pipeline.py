"""The Grain input pipeline: a weighted mixture of clip datasets -> per-process training batches.

Data order (DESIGN.md "Data order") is a pure function of (seed, global step):

    global element p = step * global_batch_size + b          (b in [0, global_batch_size))
    p -> (dataset id k, record j)      `GlobalOrder`: each dataset's records in a seeded
                                       shuffle, reshuffled every epoch; datasets interleaved by
                                       weight and the interleaving shuffled in windows
    p -> clip                          read, resize / augment / tokenise (`data_loaders.transforms`)
                                       with a generator seeded from (seed, p)

JAX process i of P takes rows [i * B, (i + 1) * B) of each global batch, B = global / P, so
item s of the per-process Grain `MapDataset` is process i's part of global step s, whatever P
is. That is what makes resuming exact (the Grain iterator state, checkpointed and checked
against the step) and what lets a run continue the same global order on another number of
processes or workers (the pipeline is re-opened at the global step).

Actions are normalised with each dataset's own statistics (never the gripper dimensions) and
zero-padded to the largest action size of the mixture, with `action_mask` and `dataset_id`.
A record that fails to read or decode raises `CorruptRecordError` naming its file and index;
with `config.data.skip_corrupt` the next readable record of the same dataset stands in for it
(deterministically) and the iterator counts the skips (`ClipBatchIterator.corrupt_skipped`).
"""

from __future__ import annotations

import bisect
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

from data_loaders import clip_dataset, transforms
from pewm_jax.text import tokenizer as tokenizer_lib
from data_loaders.batch_spec import BatchSpec
from data_loaders.clip_dataset import DatasetError, DatasetMeta

STATE_VERSION = 1
# Per-element bookkeeping carried through the batch and popped by the iterator (so what it
# yields follows BatchSpec exactly): corrupt records skipped, and the global element index,
# which the iterator checks against the step it expects.
SKIPPED_KEY = "_corrupt_skipped"
ELEMENT_KEY = "_element"
# Global elements per window in which the dataset interleaving is shuffled.
MIX_WINDOW = 4096
# Stream tags separating the random streams derived from config.seed.
_ORDER_STREAM = 0x0DE5
_MIX_STREAM = 0x313C
_AUGMENT_STREAM = 0xA116


def augment_rng(seed: int, p: int) -> np.random.Generator:
    """The augmentation generator of global element `p`: a function of (seed, p) only."""
    return np.random.default_rng([seed, _AUGMENT_STREAM, p])


class CorruptRecordError(DatasetError):
    """A clip record could not be read or decoded."""


def mixture_entries(config: ml_collections.ConfigDict) -> list[tuple[str, float]]:
    """(dataset dir, weight) pairs: config.data.mixture, or config.data.dataset_dir alone."""
    if config.data.mixture:
        entries = []
        for i, entry in enumerate(config.data.mixture):
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                raise DatasetError(f"config.data.mixture[{i}] = {entry!r} must be a "
                                   "(dataset_dir, weight) pair")
            path, weight = entry
            if not float(weight) > 0:
                raise DatasetError(f"config.data.mixture[{i}] = {entry!r}: the weight must be > 0")
            entries.append((str(path), float(weight)))
        return entries
    if not config.data.dataset_dir:
        raise DatasetError("no dataset given: set config.data.dataset_dir (or run through `pewm`, "
                           "which puts it inside --workdir), or config.data.mixture")
    return [(config.data.dataset_dir, 1.0)]


class ClipMixture:
    """The datasets of a mixture for one split: metadata, action statistics, sizes, weights."""

    def __init__(self, entries: Sequence[tuple[str, float]], split: str):
        if not entries:
            raise DatasetError("a mixture needs at least one dataset")
        self.split = split
        self.dirs = [os.fspath(path) for path, _ in entries]
        self.weights = [float(weight) for _, weight in entries]
        self.metas = [DatasetMeta.load(path) for path in self.dirs]
        self.stats = [clip_dataset.load_statistics(path) for path in self.dirs]
        self.sizes = []
        for path, meta in zip(self.dirs, self.metas):
            if meta.splits.get(split, 0) <= 0:
                raise DatasetError(f"{path} has no clips in split {split!r}; its splits are "
                                   f"{meta.splits}")
            self.sizes.append(meta.splits[split])
        self.action_dim = max(meta.action_dim for meta in self.metas)

    def check_shapes(self, horizon: int, context_frames: int, frame_stride: int) -> None:
        """Raises DatasetError unless every dataset's clips have the configured frame counts
        and steps per frame interval."""
        for path, meta in zip(self.dirs, self.metas):
            for key, have, want in (("horizon", meta.horizon, horizon),
                                    ("context_frames", meta.context_frames, context_frames),
                                    ("frame_stride", meta.frame_stride, frame_stride)):
                if have != want:
                    raise DatasetError(
                        f"{path} holds clips with {key} = {have}, but config.data.{key} = {want}. "
                        f"Fix: set --config.data.{key}={have}, or regenerate the dataset with "
                        f"{key} = {want}.")

    def fingerprint(self) -> list[list]:
        """What the data order depends on: (name, clip count, weight) per dataset."""
        return [[meta.name, size, weight]
                for meta, size, weight in zip(self.metas, self.sizes, self.weights)]


def _stream_seed(seed: int, stream: int, index: int) -> int:
    """A 32-bit seed (what grain's shuffles take) derived from (seed, stream, index)."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1)[0])


class _Tag:
    """Record index j -> (dataset id, j)."""

    def __init__(self, dataset_id: int):
        self.dataset_id = dataset_id

    def __call__(self, index: int) -> tuple[int, int]:
        return self.dataset_id, int(index)


class GlobalOrder:
    """Global element index p -> (dataset id, record index): a pure function of (seed, p)."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int):
        parts = [grain.MapDataset.range(size).seed(_stream_seed(seed, _ORDER_STREAM, k))
                 .shuffle().repeat().map(_Tag(k)) for k, size in enumerate(sizes)]
        mixed = grain.MapDataset.mix(parts, list(weights))
        self.dataset: grain.MapDataset = grain.experimental.WindowShuffleMapDataset(
            mixed, window_size=MIX_WINDOW, seed=_stream_seed(seed, _MIX_STREAM, 0))

    def __getitem__(self, p: int) -> tuple[int, int]:
        return self.dataset[p]


class _RecordReader:
    """Reads clip records by (dataset id, index), opening the sources lazily in each process."""

    def __init__(self, dirs: Sequence[str], split: str, sizes: Sequence[int], skip_corrupt: bool):
        self.dirs, self.split, self.sizes = list(dirs), split, list(sizes)
        self.skip_corrupt = skip_corrupt
        self._sources: dict[int, Sequence[dict]] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_sources": {}}

    def _source(self, k: int) -> Sequence[dict]:
        if k not in self._sources:
            self._sources[k] = clip_dataset.clip_source(self.dirs[k], self.split)
        return self._sources[k]

    def _where(self, k: int, j: int) -> str:
        """'file, record n' of record j of dataset k (for error messages)."""
        instructions = self._source(k).dataset_info.splits[self.split].file_instructions
        ends = np.cumsum([fi.take for fi in instructions]).tolist()
        f = bisect.bisect_right(ends, j)
        start = ends[f - 1] if f else 0
        return f"{instructions[f].filename}, record {instructions[f].skip + j - start}"

    def read(self, k: int, j: int) -> tuple[dict, int]:
        """Record j of dataset k (decoded) and how many corrupt records were skipped for it."""
        source = self._source(k)
        for skipped in range(self.sizes[k]):
            index = (j + skipped) % self.sizes[k]
            try:
                return source[index], skipped
            except Exception as e:  # noqa: BLE001 - any read or decode failure is corruption
                if not self.skip_corrupt:
                    raise CorruptRecordError(
                        f"corrupt clip record in {self.dirs[k]} split {self.split!r} index "
                        f"{index} ({self._where(k, index)}): {type(e).__name__}: {e}. Fix: "
                        "regenerate the dataset, or set --config.data.skip_corrupt=True to "
                        "skip such records (they are counted).") from e
        raise CorruptRecordError(f"every record of {self.dirs[k]} split {self.split!r} is corrupt")


class ClipTransform:
    """(global element p, (dataset id, record)) -> one training example (BatchSpec row), from
    any reader whose `read(k, j)` gives clip records (context, frames, actions, text, points)."""

    def __init__(self, reader: _RecordReader, mixture: ClipMixture, tokenizer_path: str,
                 seed: int, image_size: int, max_text_tokens: int, augment: bool,
                 crop_scale_min: float, color_jitter: float):
        self.reader, self.stats, self.action_dim = reader, mixture.stats, mixture.action_dim
        self.source_sizes = [meta.image_size for meta in mixture.metas]
        self.tokenizer_path, self.seed, self.image_size = tokenizer_path, seed, image_size
        self.max_text_tokens, self.augment = max_text_tokens, augment
        self.crop_scale_min, self.color_jitter = crop_scale_min, color_jitter
        self._tokenizer = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}

    def __call__(self, p: int, record: tuple[int, int]) -> dict[str, np.ndarray]:
        k, j = record
        example, skipped = self.reader.read(k, j)
        rng = augment_rng(self.seed, p)
        size = self.source_sizes[k]
        valid = bool(example["sgg_valid"])
        points = np.stack([example["start_xy"], example["goal_xy"]])
        box = (transforms.random_crop(rng, size, self.crop_scale_min, points if valid else None)
               if self.augment else transforms.CropBox.full(size))
        context, frames = example["context"], example["frames"]
        video = transforms.crop_and_resize(np.concatenate([context, frames]), box, self.image_size)
        if self.augment and self.color_jitter > 0:
            video = transforms.color_jitter(video, rng, self.color_jitter,
                                            reference=video[:len(context)])
        # Unknown points (sgg_valid False) are zeros, never NaN that could leak through masks.
        start_xy, goal_xy = (box.map_points(points, self.image_size) if valid
                             else np.zeros((2, 2), np.float32))
        if self._tokenizer is None:
            self._tokenizer = tokenizer_lib.load_tokenizer(self.tokenizer_path)
        text = example["text"]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        tokens, text_mask = tokenizer_lib.encode_batch(self._tokenizer, [text],
                                                       self.max_text_tokens)
        actions, action_mask, gripper_mask = transforms.pad_actions(
            example["actions"], self.stats[k], self.action_dim)
        return {
            "context": video[:len(context)], "frames": video[len(context):],
            "text_tokens": tokens[0], "text_mask": text_mask[0],
            "start_xy": start_xy, "goal_xy": goal_xy, "sgg_valid": np.asarray(valid),
            "actions": actions, "action_valid": np.asarray(example["action_valid"], bool),
            "action_mask": action_mask, "gripper_mask": gripper_mask,
            "dataset_id": np.asarray(k, np.int32), SKIPPED_KEY: np.asarray(skipped, np.int32),
            ELEMENT_KEY: np.asarray(p, np.int64)}


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(index, count) of this JAX process; defaults from grain's ShardByJaxProcess."""
    if process_index is None or process_count is None:
        shard = grain.sharding.ShardByJaxProcess()
        process_index = shard.shard_index if process_index is None else process_index
        process_count = shard.shard_count if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return int(process_index), int(process_count)


class OrderedPipeline:
    """What every input pipeline shares (DESIGN.md "Data order"): global element p of a split
    goes to row p % B of global step p // B, process i of P takes its slice of each global
    batch, and an iterator opens at any global step. Subclasses set `order` (p -> record),
    `transform` ((p, record) -> example dict with ELEMENT_KEY and SKIPPED_KEY) and
    `datasets` (what the order depends on besides seed and batch size)."""

    order: GlobalOrder
    transform: Any
    datasets: list

    def __init__(self, config: ml_collections.ConfigDict, train: ml_collections.ConfigDict,
                 split: str, process_index: int | None, process_count: int | None,
                 num_workers: int | None):
        self.split = split
        self.seed = int(config.seed)
        self.global_batch_size = int(train.global_batch_size)
        self.process_index, self.process_count = _process_layout(process_index, process_count)
        if self.global_batch_size % self.process_count:
            raise ValueError(f"the global batch size {self.global_batch_size} is not divisible "
                             f"by the {self.process_count} processes")
        self.local_batch_size = self.global_batch_size // self.process_count
        self.num_workers = int(config.data.num_workers if num_workers is None else num_workers)
        self.prefetch = int(config.data.prefetch)

    def element(self, p: int) -> dict[str, np.ndarray]:
        """Global element p, transformed (what lands in row p % global batch of step p // it)."""
        return self.transform(p, self.order[p])

    def batches(self) -> grain.MapDataset:
        """Item s: this process's rows of global step s, as one batch dict."""
        examples = self.order.dataset.map_with_index(self.transform)
        return examples.batch(self.local_batch_size, drop_remainder=True)[
            self.process_index::self.process_count]

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a saved iterator state to continue the same global order."""
        return {"seed": self.seed, "global_batch_size": self.global_batch_size,
                "split": self.split, "datasets": self.datasets}

    def layout(self) -> dict[str, int]:
        """How this process reads: a saved Grain state applies only to the same layout."""
        return {"process_index": self.process_index, "process_count": self.process_count,
                "num_workers": self.num_workers}

    def iterator(self, start_step: int = 0) -> "ClipBatchIterator":
        """A checkpointable iterator over this process's batches from global step `start_step`."""
        return ClipBatchIterator(self, start_step)

    def element_indices(self, step: int) -> np.ndarray:
        """The global element indices of this process's rows of global step `step`."""
        first = step * self.global_batch_size + self.process_index * self.local_batch_size
        return np.arange(first, first + self.local_batch_size, dtype=np.int64)

    def open(self, start_step: int) -> grain.DatasetIterator:
        """A fresh Grain iterator over `batches()` from global step `start_step` on."""
        ds = self.batches()[start_step:].to_iter_dataset(grain.ReadOptions(
            num_threads=min(self.prefetch, 1), prefetch_buffer_size=self.prefetch))
        if self.num_workers > 0:
            if not flags.FLAGS.is_parsed():
                flags.FLAGS(sys.argv[:1])  # grain's worker start-up reads absl flags
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.num_workers, per_worker_buffer_size=max(self.prefetch, 1)))
        return ds.__iter__()


class ClipPipeline(OrderedPipeline):
    """The world model's input pipeline of one split for this process: global order over the
    clip mixture, transforms, batching.

    `augment` defaults to config.data.augment on the train split and to False on the others;
    `train` is the training section whose batch size it batches by (default config.train; the
    action decoder's is config.action_decoder.train); process index and count default to this
    JAX process's.
    """

    def __init__(self, config: ml_collections.ConfigDict, split: str = "train", *,
                 augment: bool | None = None, train: ml_collections.ConfigDict | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 num_workers: int | None = None):
        super().__init__(config, config.train if train is None else train, split,
                         process_index, process_count, num_workers)
        data = config.data
        self.mixture = ClipMixture(mixture_entries(config), split)
        self.mixture.check_shapes(data.horizon, data.context_frames, data.frame_stride)
        self.datasets = self.mixture.fingerprint()
        self.spec = BatchSpec.from_config(config, self.mixture.action_dim)
        self.order = GlobalOrder(self.mixture.sizes, self.mixture.weights, self.seed)
        tokenizer_path = data.tokenizer or os.path.join(self.mixture.dirs[0],
                                                        clip_dataset.TOKENIZER_FILE)
        tokenizer_lib.load_tokenizer(tokenizer_path)  # fail here, not in a worker
        reader = _RecordReader(self.mixture.dirs, split, self.mixture.sizes, data.skip_corrupt)
        self.transform = ClipTransform(
            reader, self.mixture, tokenizer_path, self.seed, config.world.image_size,
            data.max_text_tokens,
            data.augment and split == "train" if augment is None else augment,
            data.crop_scale_min, data.color_jitter)


class ClipBatchIterator(grain.DatasetIterator):
    """This process's batches in the global order; `get_state`/`set_state` resume exactly.

    The state (JSON-serialisable; it rides in the Orbax checkpoint, e.g. through
    `grain.checkpoint.CheckpointSave`) holds the next global step, the corrupt-record count,
    what the order depends on (checked on restore), the process layout, and the Grain iterator
    state with the step its dataset starts at. On the same layout the Grain state is restored;
    on another (processes or workers) the pipeline re-opens at the global step. Every batch is
    checked to be the global step the iterator expects, so a wrong state cannot go unnoticed.
    """

    _inner: grain.DatasetIterator | None = None  # None only if opening it failed

    def __init__(self, pipeline: OrderedPipeline, start_step: int = 0):
        super().__init__()
        self.pipeline = pipeline
        self._start = self._step = int(start_step)
        self._skipped = 0
        self._inner = pipeline.open(self._start)

    @property
    def global_step(self) -> int:
        """The global step whose batch `next` returns."""
        return self._step

    @property
    def corrupt_skipped(self) -> int:
        """Corrupt records skipped in this process's batches so far (a metric to log)."""
        return self._skipped

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._inner))
        elements = batch.pop(ELEMENT_KEY)
        if not np.array_equal(elements, self.pipeline.element_indices(self._step)):
            raise RuntimeError(f"data iterator out of order: expected global step {self._step}, "
                               f"got global elements {elements.tolist()}")
        self._skipped += int(np.sum(batch.pop(SKIPPED_KEY)))
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """The JSON-serialisable state (class docstring)."""
        return {"version": STATE_VERSION, "global_step": self._step,
                "corrupt_skipped": self._skipped, "order": self.pipeline.fingerprint(),
                "layout": self.pipeline.layout(), "start_step": self._start,
                "grain": self._inner.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from a `get_state` of this or another process layout of the same run."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r} is not "
                             f"{STATE_VERSION}; it was written by another version of the code")
        if state["order"] != self.pipeline.fingerprint():
            raise ValueError(
                "the saved data iterator cannot continue on this data: it was saved with "
                f"{state['order']}, this pipeline has {self.pipeline.fingerprint()}. Resume "
                "with the same seed, global batch size, split and datasets.")
        self._inner.close()
        self._step = int(state["global_step"])
        if state["layout"] == self.pipeline.layout():
            self._start = int(state["start_step"])
            self._inner = self.pipeline.open(self._start)
            self._inner.set_state(state["grain"])
        else:
            self._start = self._step
            self._inner = self.pipeline.open(self._start)
        self._skipped = int(state["corrupt_skipped"])

    def start_prefetch(self) -> None:
        """Starts the workers' prefetching now (e.g. while the model restores)."""
        self._inner.start_prefetch()

    def close(self) -> None:
        """Stops the worker processes and frees their shared memory."""
        if self._inner is not None:
            self._inner.close()
        super().close()

    def __enter__(self) -> "ClipBatchIterator":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def make_iterator(config: ml_collections.ConfigDict, split: str = "train", *,
                  start_step: int = 0, augment: bool | None = None,
                  train: ml_collections.ConfigDict | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  num_workers: int | None = None) -> ClipBatchIterator:
    """This process's batch iterator for `split` from `start_step` (see ClipPipeline)."""
    return ClipPipeline(config, split, augment=augment, train=train,
                        process_index=process_index, process_count=process_count,
                        num_workers=num_workers).iterator(start_step)
