"""The shared segmenter: splits an episode without primitive annotations into primitive segments.

DESIGN.md "Clip": data without primitive annotations is split where the gripper opens or closes
and where the end effector pauses; failing both signals it is cut into fixed windows, which the
caller marks `sgg_valid=False` (their ends are not primitive starts and goals).

Indices. An episode of T steps has T+1 frames (observations) 0..T; step t takes frame t to
frame t+1. A segment (start, end) covers the steps start..end-1, from frame `start` (its
context frame) to frame `end`; consecutive segments share their boundary frame, and together
they cover [0, T] exactly (the form `clips.cut_clip` takes).

The rules, in this order (all deterministic, pure numpy):

1. Gripper changes. The gripper signal (one value per frame, e.g. an opening or closedness
   reading) is binarised at `gripper_threshold` (value > threshold -> 1). A boundary goes at
   every frame whose binary state differs from the previous frame's: the step that opened or
   closed the gripper ends the segment before it.
2. Pauses. The end-effector speed of step t is |p[t+1] - p[t]| (Euclidean, in the position's
   own units per step). A pause is a run of at least `pause_steps` consecutive steps with speed
   below `pause_speed`. A boundary goes at the middle frame of every pause that has motion on
   both sides; a pause at the very start or end of the episode (the arm idle before starting
   or after finishing) is not a primitive boundary.
3. Merging. While some segment is shorter than `min_segment_steps` steps (and there is more
   than one), the shortest one (the earliest on ties) is merged into its shorter neighbour (the
   earlier one on ties) by removing the boundary between them. Gripper flicker and short
   hesitations so never make clips of their own.
4. Fallback. With neither a gripper nor an end-effector signal, the episode is cut into fixed
   windows of `window` steps (H * stride: one clip without resampling each), the remainder
   merged by rule 3.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SegmenterConfig:
    """Thresholds of the segmenter (module docstring); each dataset spec may set its own."""

    gripper_threshold: float = 0.5  # binarises the gripper signal: value > threshold -> 1
    pause_speed: float = 1e-3  # end-effector speed (position units per step) below = paused
    pause_steps: int = 3  # a pause is at least this many consecutive slow steps
    min_segment_steps: int = 4  # shorter segments are merged into a neighbour

    def __post_init__(self):
        if self.pause_steps < 1:
            raise ValueError(f"pause_steps must be >= 1, got {self.pause_steps}")
        if self.min_segment_steps < 1:
            raise ValueError(f"min_segment_steps must be >= 1, got {self.min_segment_steps}")
        if self.pause_speed < 0:
            raise ValueError(f"pause_speed must be >= 0, got {self.pause_speed}")


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """Segments (start, end) in frames covering [0, T], and how they were found."""

    bounds: list[tuple[int, int]]
    from_signals: bool  # False: fixed windows (no gripper or end-effector signal) -> sgg invalid


def gripper_change_frames(gripper: np.ndarray, threshold: float) -> np.ndarray:
    """Frames t >= 1 whose binarised gripper state differs from frame t-1's."""
    g = np.asarray(gripper, np.float64).reshape(len(gripper), -1)[:, 0] > threshold
    return np.flatnonzero(g[1:] != g[:-1]) + 1


def pause_frames(position: np.ndarray, speed: float, min_steps: int) -> np.ndarray:
    """Middle frames of the pauses (>= min_steps slow steps) that have motion on both sides."""
    p = np.asarray(position, np.float64).reshape(len(position), -1)
    slow = np.linalg.norm(np.diff(p, axis=0), axis=1) < speed  # per step
    frames = []
    t, n = 0, len(slow)
    while t < n:
        if not slow[t]:
            t += 1
            continue
        run_end = t
        while run_end < n and slow[run_end]:
            run_end += 1
        # Steps t..run_end-1 are slow: frames t..run_end are (nearly) the same pose.
        if run_end - t >= min_steps and t > 0 and run_end < n:
            frames.append((t + run_end) // 2)
        t = run_end
    return np.asarray(frames, np.int64)


def merge_short(boundaries: np.ndarray, num_steps: int, min_steps: int) -> list[tuple[int, int]]:
    """Segments between the sorted interior `boundaries` with short ones merged (rule 3)."""
    cuts = [0] + sorted({int(b) for b in boundaries if 0 < b < num_steps}) + [num_steps]
    while len(cuts) > 2:
        lengths = np.diff(cuts)
        i = int(np.argmin(lengths))  # shortest segment, earliest on ties
        if lengths[i] >= min_steps:
            break
        if i == 0:
            drop = 1  # only a right neighbour: remove the boundary at its end
        elif i == len(lengths) - 1:
            drop = i  # only a left neighbour
        else:
            drop = i if lengths[i - 1] <= lengths[i + 1] else i + 1
        del cuts[drop]
    return list(zip(cuts[:-1], cuts[1:]))


def fixed_windows(num_steps: int, window: int, min_steps: int) -> list[tuple[int, int]]:
    """Windows of `window` steps covering [0, num_steps], a short remainder merged (rule 4)."""
    if window < 1:
        raise ValueError(f"window must be >= 1 step, got {window}")
    return merge_short(np.arange(window, num_steps, window), num_steps, min(min_steps, window))


def segment_episode(num_steps: int, *, gripper: np.ndarray | None = None,
                    ee_position: np.ndarray | None = None, window: int,
                    config: SegmenterConfig = SegmenterConfig()) -> Segmentation:
    """Segments an episode of `num_steps` steps (module docstring).

    Args:
      num_steps: T, the number of steps (the episode has T+1 frames).
      gripper: optional (T+1,) or (T+1, 1) gripper signal, one value per frame.
      ee_position: optional (T+1, D) end-effector position per frame.
      window: fixed window length in steps (H * stride), used when both signals are missing.
      config: thresholds.
    """
    if num_steps < 1:
        raise ValueError(f"an episode needs at least one step, got {num_steps}")
    for name, signal in (("gripper", gripper), ("ee_position", ee_position)):
        if signal is not None and len(signal) != num_steps + 1:
            raise ValueError(f"{name} needs one value per frame ({num_steps + 1}), "
                             f"got {len(signal)}")
    if gripper is None and ee_position is None:
        return Segmentation(fixed_windows(num_steps, window, config.min_segment_steps), False)
    cuts = []
    if gripper is not None:
        cuts.append(gripper_change_frames(gripper, config.gripper_threshold))
    if ee_position is not None:
        cuts.append(pause_frames(ee_position, config.pause_speed, config.pause_steps))
    bounds = merge_short(np.concatenate(cuts), num_steps, config.min_segment_steps)
    return Segmentation(bounds, True)
