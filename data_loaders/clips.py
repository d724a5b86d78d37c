"""Primitive clips (DESIGN.md "Clip") and the action statistics that normalise them.

One primitive segment of an episode is one training clip: the context frame(s) (the
observation when the primitive starts) plus H future frames taken every `stride` environment
steps. A segment shorter than H * stride is padded by holding its last state; a longer one is
resampled to H frames. The action label between two clip frames sums the per-step actions over
the steps between them, except gripper dimensions, which take the last command (an empty
interval, in the padding, keeps the previous label's gripper command and moves nothing). The
controller executes each label as `stride` environment steps.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass
class Clip:
    """One primitive clip, at the resolution of its source frames."""

    context: np.ndarray  # (C, N, N, 3) uint8: frames up to the primitive's start
    frames: np.ndarray  # (H, N, N, 3) uint8: the future frames
    actions: np.ndarray  # (H, A) float32: raw (unnormalised) label from frame j-1 to frame j
    text: str  # the primitive's words
    start_xy: np.ndarray  # (2,) float32 pixels (x, y) of these frames
    goal_xy: np.ndarray  # (2,) float32 pixels (x, y)
    sgg_valid: bool  # False when start/goal points are unknown
    episode_id: int
    segment_index: int


def frame_indices(start: int, end: int, horizon: int, stride: int) -> np.ndarray:
    """Episode frame index of each of the H future frames of segment [start, end] (frames).

    Frame `start` is the observation when the primitive begins, `end` the one after its last
    action (end > start).
    """
    if end <= start:
        raise ValueError(f"a segment needs at least one step; got frames [{start}, {end}]")
    length = end - start
    j = np.arange(1, horizon + 1)
    if length <= horizon * stride:
        return np.minimum(start + j * stride, end)
    return start + np.round(j * length / horizon).astype(np.int64)


def clip_actions(actions: np.ndarray, start: int, idx: np.ndarray,
                 gripper_dims: Sequence[int]) -> np.ndarray:
    """(H, A) labels between consecutive clip frames `start, idx[0], ..., idx[-1]` (docstring)."""
    bounds = np.concatenate([[start], idx])
    summed = np.concatenate([np.zeros((1, actions.shape[1])), np.cumsum(actions, axis=0)])
    labels = (summed[bounds[1:]] - summed[bounds[:-1]]).astype(np.float32)
    grip = list(gripper_dims)
    if grip:
        # Last command issued before each clip frame: padding repeats it (an empty interval).
        labels[:, grip] = actions[bounds[1:] - 1][:, grip]
    return labels


def cut_clip(frames: np.ndarray, actions: np.ndarray, start: int, end: int, *, horizon: int,
             stride: int, context_frames: int, gripper_dims: Sequence[int], text: str,
             start_xy: np.ndarray, goal_xy: np.ndarray, sgg_valid: bool, episode_id: int,
             segment_index: int) -> Clip:
    """Cuts segment [start, end] of an episode (frames (T+1, ...), actions (T, A)) into a Clip."""
    idx = frame_indices(start, end, horizon, stride)
    ctx = np.maximum(start - stride * np.arange(context_frames - 1, -1, -1), 0)
    return Clip(context=frames[ctx], frames=frames[idx],
                actions=clip_actions(actions, start, idx, gripper_dims), text=text,
                start_xy=np.asarray(start_xy, np.float32), goal_xy=np.asarray(goal_xy, np.float32),
                sgg_valid=bool(sgg_valid), episode_id=int(episode_id),
                segment_index=int(segment_index))


@dataclasses.dataclass
class ActionStats:
    """Per-dimension action statistics of a dataset's train clips; gripper dims are not normalised."""

    mean: np.ndarray  # (A,)
    std: np.ndarray  # (A,)
    q01: np.ndarray  # (A,) 1st percentile
    q99: np.ndarray  # (A,) 99th percentile
    normalize_mask: np.ndarray  # (A,) bool, False on gripper dimensions
    count: int  # clip actions the statistics were computed from

    @classmethod
    def compute(cls, actions: np.ndarray, gripper_dims: Sequence[int]) -> "ActionStats":
        """Statistics of (M, A) clip action labels."""
        actions = np.asarray(actions, np.float64)
        if actions.ndim != 2 or len(actions) == 0:
            raise ValueError(f"need a non-empty (M, A) array of actions, got shape {actions.shape}")
        mask = np.ones(actions.shape[1], bool)
        mask[list(gripper_dims)] = False
        return cls(mean=actions.mean(0), std=actions.std(0), q01=np.quantile(actions, 0.01, 0),
                   q99=np.quantile(actions, 0.99, 0), normalize_mask=mask, count=len(actions))

    def normalize(self, actions: np.ndarray) -> np.ndarray:
        """(..., A) raw -> normalised: (a - mean) / std on non-gripper dimensions."""
        scale = np.where(self.normalize_mask, np.maximum(self.std, 1e-6), 1.0)
        shift = np.where(self.normalize_mask, self.mean, 0.0)
        return ((actions - shift) / scale).astype(np.float32)

    def denormalize(self, actions: np.ndarray) -> np.ndarray:
        """Inverse of `normalize`."""
        scale = np.where(self.normalize_mask, np.maximum(self.std, 1e-6), 1.0)
        shift = np.where(self.normalize_mask, self.mean, 0.0)
        return (actions * scale + shift).astype(np.float32)

    def step_actions(self, labels: np.ndarray, stride: int) -> np.ndarray:
        """(..., A) clip labels -> the action of each of the `stride` environment steps that
        execute them: the summed displacement spread evenly, gripper commands repeated (the
        inverse of `clip_actions`; normalize_mask marks the non-gripper dimensions)."""
        labels = np.asarray(labels, np.float32)
        return np.where(self.normalize_mask, labels / stride, labels).astype(np.float32)

    def to_json(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "q01": self.q01.tolist(),
                "q99": self.q99.tolist(), "normalize_mask": self.normalize_mask.tolist(),
                "count": self.count}

    @classmethod
    def from_json(cls, d: dict) -> "ActionStats":
        return cls(**{k: np.asarray(d[k], bool if k == "normalize_mask" else np.float64)
                      for k in ("mean", "std", "q01", "q99", "normalize_mask")}, count=int(d["count"]))

    def save(self, path: pathlib.Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1))
