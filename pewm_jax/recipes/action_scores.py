"""Action decoder evaluation: how well it reads per-step actions from real held-out clips.

Every clip of a split (no augmentation) is decoded, and each of its per-step actions (the
segment's own steps and the padding no-ops alike: the controller plays both) is scored over
the real action dimensions (`action_mask`), beside the baselines of always answering the train
split's mean action and majority gripper command:

    mse                         squared error of the continuous dimensions, normalised units
                                (DESIGN.md "Batch": mean/std normalised)
    mean_action_mse             the same of the mean action (1.0 on a dimension whose test
                                actions follow the train statistics)
    gripper_accuracy            decoded gripper commands equal to the true ones
    majority_gripper_accuracy   the same of always giving the train split's commoner command
    gripper_change_accuracy     `gripper_accuracy` on the steps where the true command changes
                                (a clip's closes and opens, its previous step the other
                                command): a close one step early or late misses a grasp, which
                                the overall accuracy, dominated by steady steps, hides
    gripper_changes             how many such steps were scored
    per_dim_mse, per_dim_mean_action_mse
                                `mse` of each continuous dimension of the first dataset

Models come from `pewm_jax.recipes.restore.restore`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import ml_collections
import numpy as np
from flax import nnx

from data_loaders import pipeline
from data_loaders.clips import ActionStats
from pewm_jax.models.action_decoder import ActionDecoder, decode_batch


@dataclasses.dataclass(frozen=True)
class ActionScores:
    """The action decoder's scores on one split (module docstring)."""

    split: str
    steps: int  # per-step actions scored
    mse: float
    mean_action_mse: float
    gripper_accuracy: float
    majority_gripper_accuracy: float
    gripper_change_accuracy: float
    gripper_changes: int
    per_dim_mse: tuple[float, ...]
    per_dim_mean_action_mse: tuple[float, ...]


def mean_actions(stats: Sequence[ActionStats], action_dim: int) -> np.ndarray:
    """(datasets, action_dim) float32: each dataset's mean action in model units (`to_model`):
    0 on normalised dimensions, the commoner command (1 or 0) on gripper dimensions; padded."""
    out = np.zeros((len(stats), action_dim), np.float32)
    for k, s in enumerate(stats):
        out[k, :len(s.mean)] = s.to_model(s.mean)
    return out


def _sums(predicted: np.ndarray, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """(5, A): squared error, right gripper commands, counted steps, right gripper commands at
    a change of the true command and such changes, per dimension, over the real dimensions of
    (B, H, s, A) outputs (gripper dimensions: logits)."""
    predicted, target = np.asarray(predicted), np.asarray(batch["actions"])
    real = np.broadcast_to(np.asarray(batch["action_mask"])[:, None, None, :], target.shape)
    grip = np.broadcast_to(np.asarray(batch["gripper_mask"])[:, None, None, :], target.shape)
    squared = np.where(real & ~grip, np.square(predicted - target), 0.0)
    right = np.where(grip, (predicted > 0) == (target > 0.5), False)
    steps = target.shape[0], -1, target.shape[-1]  # (B, H * s, A): the clip's steps in order
    command = (target > 0.5).reshape(steps)
    change = grip.reshape(steps)[:, 1:] & (command[:, 1:] != command[:, :-1])
    right_at_change = right.reshape(steps)[:, 1:] & change
    return np.stack([squared.sum((0, 1, 2)), right.sum((0, 1, 2)), real.sum((0, 1, 2)),
                     right_at_change.sum((0, 1)), change.sum((0, 1))])


def _baseline(batch: Mapping[str, np.ndarray], stats: Sequence[ActionStats]) -> np.ndarray:
    """The mean action as (B, H, s, A) outputs (gripper: a logit of the commoner command)."""
    means = mean_actions(stats, batch["actions"].shape[-1])[np.asarray(batch["dataset_id"])]
    grip = np.asarray(batch["gripper_mask"])
    means = np.where(grip, np.where(means > 0.5, 1.0, -1.0), means)
    return np.broadcast_to(means[:, None, None, :], batch["actions"].shape)


def _scores(sums: np.ndarray, gripper_mask: np.ndarray) -> tuple[float, float]:
    """(mse over continuous dimensions, accuracy over gripper dimensions) of `_sums`."""
    cont = sums[2] * ~gripper_mask
    grip = sums[2] * gripper_mask
    return (float(sums[0].sum() / max(cont.sum(), 1)), float(sums[1].sum() / max(grip.sum(), 1))
            if grip.sum() else float("nan"))


def mean_action_errors(batch: Mapping[str, np.ndarray],
                       stats: Sequence[ActionStats]) -> dict[str, float]:
    """The mean action's `action_mse` and majority command's `gripper_accuracy` on one batch."""
    mse, accuracy = _scores(_sums(_baseline(batch, stats), batch),
                            np.asarray(batch["gripper_mask"]).any(0))
    return {"action_mse": mse, "gripper_accuracy": accuracy}


def evaluate_action_decoder(model: ActionDecoder, config: ml_collections.ConfigDict,
                            split: str, *, batch_size: int = 32,
                            max_clips: int | None = None,
                            imagine: Callable[[dict[str, np.ndarray], int], np.ndarray] | None
                            = None) -> ActionScores:
    """Scores `model` on every clip of `split` of config's data (or its first `max_clips`).
    With `imagine`, it decodes `imagine(batch, first row)`'s (B, H, N, N, 3) uint8 frames
    instead of the true ones (a world model's samples of the clips), against the true actions:
    how well the actions can be read from imagined frames."""
    clips = pipeline.ClipPipeline(config, split, augment=False, process_index=0,
                                  process_count=1, num_workers=0)
    total = sum(clips.mixture.sizes)
    count = total if max_clips is None else min(max_clips, total)
    decode = nnx.jit(decode_batch)
    keys = ("context", "frames", "start_xy", "goal_xy", "sgg_valid", "text_tokens", "text_mask")
    sums = np.zeros((2, 5, clips.mixture.action_dim))  # model, baseline
    gripper = np.zeros(clips.mixture.action_dim, bool)
    for first in range(0, count, batch_size):
        examples = [clips.element(p) for p in range(first, min(first + batch_size, count))]
        batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        if imagine is not None:
            batch["frames"] = imagine(batch, first)
        predicted = decode(model, {k: batch[k] for k in keys})
        sums[0] += _sums(predicted, batch)
        sums[1] += _sums(_baseline(batch, clips.mixture.stats), batch)
        gripper |= batch["gripper_mask"].any(0)
    (mse, accuracy), (base_mse, base_accuracy) = (_scores(sums[0], gripper),
                                                  _scores(sums[1], gripper))
    dims = np.flatnonzero(clips.mixture.stats[0].normalize_mask)
    per_dim = sums[:, 0] / np.maximum(sums[:, 2], 1)
    steps = int(count * config.data.horizon * config.data.frame_stride)
    changes = int(sums[0, 4].sum())
    change_accuracy = float(sums[0, 3].sum() / changes) if changes else float("nan")
    return ActionScores(split, steps, mse, base_mse, accuracy, base_accuracy, change_accuracy,
                        changes, tuple(per_dim[0, dims].tolist()),
                        tuple(per_dim[1, dims].tolist()))


def scores_table(scores: Sequence[ActionScores]) -> str:
    """The scores as a small fixed-width table for the terminal."""
    lines = [f"{'split':<22}{'steps':>8}{'action mse':>12}{'mean-action mse':>17}"
             f"{'gripper acc':>13}{'majority acc':>14}{'acc at changes':>17}"]
    lines += [f"{s.split:<22}{s.steps:>8}{s.mse:>12.4f}{s.mean_action_mse:>17.4f}"
              f"{s.gripper_accuracy:>13.1%}{s.majority_gripper_accuracy:>14.1%}"
              f"{s.gripper_change_accuracy:>10.1%} of {s.gripper_changes:<3d}"
              for s in scores]
    return "\n".join(lines)

