"""The whole-task baseline's input pipeline: one clip per stored episode, covering the whole task.

The non-primitive baseline generates the whole task as one clip, from the first frame and the
task's words, at the primitive clips' frame stride and with per-step actions
(`config.whole_task.horizon` frames: a task shorter than horizon x stride is padded by holding
its last state, exactly as `clips.cut_clips` treats a segment; a longer one keeps its first
horizon x stride steps, the clip the baseline imagines from the first frame). It has no
start/goal points (`sgg_valid` False). Everything else is the world model's pipeline: the same transforms, augmentation,
tokenizer, action statistics, batch spec (with the whole-task horizon) and data order.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from data_loaders import clip_dataset, tabletop
from data_loaders.batch_spec import BatchSpec
from data_loaders.clips import cut_clips
from data_loaders.pipeline import (ClipBatchIterator, ClipMixture, GlobalOrder, OrderedPipeline,
                                   ClipTransform, mixture_entries)


def whole_task_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An unlocked copy of `config` as the whole-task model sees it: clips of
    config.whole_task.horizon frames (data.horizon); everything else unchanged."""
    derived = ml_collections.ConfigDict(config.to_dict())
    derived.data.horizon = int(config.whole_task.horizon)
    return derived


class _EpisodeReader:
    """Reads stored episodes by (0, index) as whole-task clip records, the fields
    `ClipTransform` reads from a clip record."""

    def __init__(self, dataset_dir: str, split: str, horizon: int, stride: int,
                 context_frames: int):
        self.dataset_dir, self.split = dataset_dir, split
        self.horizon, self.stride, self.context_frames = horizon, stride, context_frames
        self._source = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_source": None}

    def read(self, k: int, j: int) -> tuple[dict, int]:
        if self._source is None:
            self._source = tabletop.episode_source(self.dataset_dir, self.split)
        record = self._source[j]
        steps = record["steps"]
        steps = [steps[t] for t in range(len(steps))]
        frames = np.stack([s["observation"]["image"] for s in steps])  # (T + 1, N, N, 3)
        actions = np.stack([s["action"] for s in steps[:-1]])  # (T, A)
        clip = cut_clips(frames, actions, 0, len(steps) - 1, horizon=self.horizon,
                         stride=self.stride, context_frames=self.context_frames,
                         gripper_dims=tabletop.GRIPPER_DIMS,
                         text=tabletop.decode_text(steps[0]["language_instruction"]),
                         start_xy=np.zeros(2), goal_xy=np.zeros(2), sgg_valid=False,
                         episode_id=int(record["episode_metadata"]["seed"]), segment_index=0)[0]
        return {"context": clip.context, "frames": clip.frames, "actions": clip.actions,
                "action_valid": clip.action_valid,
                "text": clip.text, "start_xy": clip.start_xy, "goal_xy": clip.goal_xy,
                "sgg_valid": np.asarray(False)}, 0


class WholeTaskPipeline(OrderedPipeline):
    """The whole-task model's input pipeline of one split for this process (module docstring);
    batches by config.train like the world model, augmented on the train split as it is."""

    def __init__(self, config: ml_collections.ConfigDict, split: str = "train", *,
                 process_index: int | None = None, process_count: int | None = None,
                 num_workers: int | None = None):
        super().__init__(config, config.train, split, process_index, process_count, num_workers)
        entries = mixture_entries(config)
        dataset_dir, size = tabletop.single_episode_dataset(entries, split,
                                                            "the whole-task baseline")
        data = config.data
        mixture = ClipMixture(entries, split)  # statistics, tokenizer and frame size
        self.datasets = [["pewm_tabletop_whole_tasks", size, 1.0]]
        self.spec = BatchSpec.from_config(whole_task_config(config), mixture.action_dim)
        self.order = GlobalOrder([size], [1.0], self.seed)
        reader = _EpisodeReader(dataset_dir, split, int(config.whole_task.horizon),
                                data.frame_stride, data.context_frames)
        self.transform = ClipTransform(
            reader, mixture, data.tokenizer or os.path.join(dataset_dir, clip_dataset.TOKENIZER_FILE), self.seed,
            config.world.image_size, data.max_text_tokens, data.augment and split == "train",
            data.crop_scale_min, data.color_jitter)


def make_whole_task_iterator(config: ml_collections.ConfigDict, split: str = "train", *,
                             start_step: int = 0) -> ClipBatchIterator:
    """This process's whole-task batch iterator for `split` from `start_step`."""
    return WholeTaskPipeline(config, split).iterator(start_step)
