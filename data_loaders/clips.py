"""Primitive clips (DESIGN.md "Clip") and the action statistics that normalise them.

One primitive segment of an episode gives one or more training clips: the context frame(s)
(the observation when the clip starts) plus H future frames taken every `stride` environment
steps, and the actions of every environment step between consecutive frames, `(H, stride, A)`,
at the control rate. The property that defines a clip: playing its actions from its context
state reproduces its frames (exactly, in the built-in world).

- A segment shorter than H * stride is padded by holding its last state: its padding steps are
  no-ops (zero on the non-gripper dimensions, which are displacements; the last gripper command
  on the gripper dimensions), so playing them keeps the held frames. `action_valid` marks the
  segment's own steps.
- A segment longer than H * stride becomes consecutive clips (`part` 0, 1, ...) of H * stride
  steps each, sharing the segment's words and goal; a later part starts where the gripper is
  at its first frame (`track_xy`). Resampling a long segment to H frames, as before, would put
  more displacement between two frames than `stride` steps can play; consecutive clips are also
  what the controller does when a primitive needs more than one clip (imagine again from the
  new observation with the same goal).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import numpy as np

# Version of the clip contract that datasets record (pewm_dataset.json "clip_format"); 1 was a
# summed action per frame interval, 2 is per-step actions (H, s, A) with action_valid.
CLIP_FORMAT = 2


@dataclasses.dataclass
class Clip:
    """One primitive clip, at the resolution of its source frames."""

    context: np.ndarray  # (C, N, N, 3) uint8: frames up to the clip's start
    frames: np.ndarray  # (H, N, N, 3) uint8: the future frames
    actions: np.ndarray  # (H, s, A) float32 raw per-step actions from frame j-1 to frame j
    action_valid: np.ndarray  # (H, s) bool: True on the segment's own steps, False on padding
    text: str  # the primitive's words
    start_xy: np.ndarray  # (2,) float32 pixels (x, y) of these frames
    goal_xy: np.ndarray  # (2,) float32 pixels (x, y)
    sgg_valid: bool  # False when start/goal points are unknown
    episode_id: int
    segment_index: int
    part: int = 0  # consecutive clips of one long segment: 0, 1, ...


def clip_bounds(start: int, end: int, horizon: int, stride: int) -> list[tuple[int, int]]:
    """The step ranges [a, b] of the consecutive clips of segment [start, end] (frames): one
    when the segment fits H * stride steps, else ceil(length / (H * stride))."""
    if end <= start:
        raise ValueError(f"a segment needs at least one step; got frames [{start}, {end}]")
    span = horizon * stride
    return [(a, min(a + span, end)) for a in range(start, end, span)]


def frame_indices(start: int, end: int, horizon: int, stride: int) -> np.ndarray:
    """Episode frame index of each of the H future frames of a clip covering steps [start, end]
    (end - start <= H * stride; frames past `end` hold it)."""
    if not 0 < end - start <= horizon * stride:
        raise ValueError(f"a clip covers 1 to {horizon * stride} steps; got [{start}, {end}]")
    return np.minimum(start + stride * np.arange(1, horizon + 1), end)


def step_actions(actions: np.ndarray, start: int, end: int, horizon: int, stride: int,
                 gripper_dims: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """((H, s, A) actions, (H, s) valid) of the clip covering steps [start, end] of an episode's
    actions (T, A): the steps themselves, then no-ops (module docstring)."""
    span = horizon * stride
    out = np.zeros((span, actions.shape[1]), np.float32)
    n = end - start
    out[:n] = actions[start:end]
    grip = list(gripper_dims)
    if grip:
        out[n:, grip] = actions[end - 1, grip]  # the last command holds through the padding
    valid = np.arange(span) < n
    return out.reshape(horizon, stride, -1), valid.reshape(horizon, stride)


def cut_clips(frames: np.ndarray, actions: np.ndarray, start: int, end: int, *, horizon: int,
              stride: int, context_frames: int, gripper_dims: Sequence[int], text: str,
              start_xy: np.ndarray, goal_xy: np.ndarray, sgg_valid: bool, episode_id: int,
              segment_index: int, track_xy: np.ndarray | None = None) -> list[Clip]:
    """Cuts segment [start, end] of an episode (frames (T+1, ...), actions (T, A)) into its
    clips (module docstring). `track_xy` (T+1, 2), the gripper's pixels at every frame, gives a
    later part its start point; without it later parts keep the segment's start."""
    clips = []
    for part, (a, b) in enumerate(clip_bounds(start, end, horizon, stride)):
        idx = frame_indices(a, b, horizon, stride)
        ctx = np.maximum(a - stride * np.arange(context_frames - 1, -1, -1), 0)
        acts, valid = step_actions(actions, a, b, horizon, stride, gripper_dims)
        begin = start_xy if part == 0 or track_xy is None else track_xy[a]
        clips.append(Clip(context=frames[ctx], frames=frames[idx], actions=acts,
                          action_valid=valid, text=text,
                          start_xy=np.asarray(begin, np.float32),
                          goal_xy=np.asarray(goal_xy, np.float32), sgg_valid=bool(sgg_valid),
                          episode_id=int(episode_id), segment_index=int(segment_index),
                          part=part))
    return clips


@dataclasses.dataclass
class ActionStats:
    """Per-dimension statistics of a dataset's train per-step actions (the segments' own steps,
    not padding); gripper dims are not normalised."""

    mean: np.ndarray  # (A,)
    std: np.ndarray  # (A,)
    q01: np.ndarray  # (A,) 1st percentile
    q99: np.ndarray  # (A,) 99th percentile
    low: np.ndarray  # (A,) smallest value (a gripper dimension's one command)
    high: np.ndarray  # (A,) largest value (a gripper dimension's other command)
    normalize_mask: np.ndarray  # (A,) bool, False on gripper dimensions
    count: int  # per-step actions the statistics were computed from

    @classmethod
    def compute(cls, actions: np.ndarray, gripper_dims: Sequence[int]) -> "ActionStats":
        """Statistics of (M, A) per-step actions."""
        actions = np.asarray(actions, np.float64)
        if actions.ndim != 2 or len(actions) == 0:
            raise ValueError(f"need a non-empty (M, A) array of actions, got shape {actions.shape}")
        mask = np.ones(actions.shape[1], bool)
        mask[list(gripper_dims)] = False
        return cls(mean=actions.mean(0), std=actions.std(0), q01=np.quantile(actions, 0.01, 0),
                   q99=np.quantile(actions, 0.99, 0), low=actions.min(0), high=actions.max(0),
                   normalize_mask=mask, count=len(actions))

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

    def to_model(self, actions: np.ndarray) -> np.ndarray:
        """(..., A) raw actions -> what models learn: non-gripper dimensions normalised, gripper
        dimensions as the command they are, 1.0 for the high command and 0.0 for the low one
        (above or below the midpoint of the two)."""
        high = actions > (self.low + self.high) / 2.0
        return np.where(self.normalize_mask, self.normalize(actions), high).astype(np.float32)

    def from_model(self, outputs: np.ndarray) -> np.ndarray:
        """(..., A) a model's outputs (normalised values; gripper logits) -> raw actions: a
        positive gripper logit gives the high command, else the low one."""
        outputs = np.asarray(outputs, np.float32)
        command = np.where(outputs > 0, self.high, self.low)
        return np.where(self.normalize_mask, self.denormalize(outputs), command).astype(np.float32)

    _ARRAYS = ("mean", "std", "q01", "q99", "low", "high", "normalize_mask")

    def to_json(self) -> dict:
        return {k: getattr(self, k).tolist() for k in self._ARRAYS} | {"count": self.count}

    @classmethod
    def from_json(cls, d: dict) -> "ActionStats":
        return cls(**{k: np.asarray(d[k], bool if k == "normalize_mask" else np.float64)
                      for k in cls._ARRAYS}, count=int(d["count"]))

    def save(self, path: pathlib.Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1))
