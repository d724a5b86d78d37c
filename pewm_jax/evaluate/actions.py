"""Action decoder evaluation: how well it reads actions from real held-out frame pairs.

Every clip of a split (no augmentation) is decoded, and the error is taken over the real action
dimensions (`action_mask`) in normalised units (DESIGN.md "Batch": mean/std normalised, gripper
dimensions as stored):

    mse              the decoded actions' mean squared error
    mean_action_mse  the same error of always answering the train split's mean action (the
                     baseline to beat: 1.0 on a normalised dimension whose test actions follow
                     the train statistics)
    per_dim_mse      `mse` of each action dimension of the first dataset, beside
    per_dim_mean_action_mse

`load_action_decoder` restores a trained decoder (EMA weights) from a run directory onto the
default device, with its config and dataset statistics taken from the checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from data_loaders import pipeline
from data_loaders.clips import ActionStats
from pewm_jax.models.action_decoder import ActionDecoder, build_action_decoder
from pewm_jax.train.checkpoint import find_checkpoint


@dataclasses.dataclass(frozen=True)
class ActionScores:
    """The action decoder's scores on one split (module docstring)."""

    split: str
    transitions: int  # frame pairs scored
    mse: float
    mean_action_mse: float
    per_dim_mse: tuple[float, ...]
    per_dim_mean_action_mse: tuple[float, ...]


def mean_actions(stats: Sequence[ActionStats], action_dim: int) -> np.ndarray:
    """(datasets, action_dim) float32: each dataset's train mean action, normalised as the
    pipeline normalises its actions and zero-padded."""
    out = np.zeros((len(stats), action_dim), np.float32)
    for k, s in enumerate(stats):
        out[k, :len(s.mean)] = s.normalize(s.mean)
    return out


def _squared_errors(predicted: np.ndarray, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """(B, H, A) squared errors, zero outside the real action dimensions."""
    mask = np.asarray(batch["action_mask"])[:, None, :]
    return np.square(np.asarray(predicted) - np.asarray(batch["actions"])) * mask


def mean_action_mse(batch: Mapping[str, np.ndarray], stats: Sequence[ActionStats]) -> float:
    """The mean-action baseline's error on one batch of clips (module docstring)."""
    means = mean_actions(stats, batch["actions"].shape[-1])[np.asarray(batch["dataset_id"])]
    errors = _squared_errors(np.broadcast_to(means[:, None], batch["actions"].shape), batch)
    count = np.broadcast_to(batch["action_mask"][:, None, :], errors.shape).sum()
    return float(errors.sum() / max(count, 1))


def evaluate_action_decoder(model: ActionDecoder, config: ml_collections.ConfigDict,
                            split: str, *, batch_size: int = 32,
                            max_clips: int | None = None) -> ActionScores:
    """Scores `model` on every clip of `split` of config's data (or its first `max_clips`)."""
    clips = pipeline.ClipPipeline(config, split, augment=False, process_index=0,
                                  process_count=1, num_workers=0)
    total = sum(clips.mixture.sizes)
    count = total if max_clips is None else min(max_clips, total)
    decode = nnx.jit(lambda m, context, frames: m(context, frames))
    means = mean_actions(clips.mixture.stats, clips.mixture.action_dim)
    dims = len(clips.mixture.stats[0].mean)
    sums = np.zeros((2, clips.mixture.action_dim))  # model, baseline: squared error per dim
    counts = np.zeros(clips.mixture.action_dim)
    for first in range(0, count, batch_size):
        examples = [clips.element(p) for p in range(first, min(first + batch_size, count))]
        batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        predicted = decode(model, batch["context"], batch["frames"])
        baseline = np.broadcast_to(means[batch["dataset_id"]][:, None], batch["actions"].shape)
        sums[0] += _squared_errors(predicted, batch).sum((0, 1))
        sums[1] += _squared_errors(baseline, batch).sum((0, 1))
        counts += batch["action_mask"].sum(0) * batch["actions"].shape[1]
    per_dim = sums / np.maximum(counts, 1)
    return ActionScores(split, int(count * config.data.horizon),
                        float(sums[0].sum() / max(counts.sum(), 1)),
                        float(sums[1].sum() / max(counts.sum(), 1)),
                        tuple(per_dim[0, :dims].tolist()), tuple(per_dim[1, :dims].tolist()))


def load_action_decoder(path: str | epath.PathLike, *, use_ema: bool = True
                        ) -> tuple[ActionDecoder, ml_collections.ConfigDict, list[ActionStats]]:
    """(decoder, its config, the statistics of each dataset it was trained on) from a run's
    workdir, its action_decoder/ directory or one step directory."""
    checkpoints, step = find_checkpoint(path, model="action_decoder")
    try:
        config = ml_collections.ConfigDict(checkpoints.read_json(step, "config"))
        stats = [ActionStats.from_json(d["statistics"])
                 for d in checkpoints.read_json(step, "dataset_stats")["datasets"]]
        action_dim = max(len(s.mean) for s in stats)
        model = checkpoints.restore_module(
            step, nnx.eval_shape(lambda: build_action_decoder(config, action_dim, nnx.Rngs(0))),
            item="ema_params" if use_ema else "params")
    finally:
        checkpoints.close()
    return model, config, stats


def scores_table(scores: Sequence[ActionScores]) -> str:
    """The scores as a small fixed-width table for the terminal."""
    lines = [f"{'split':<22}{'pairs':>8}{'action mse':>12}{'mean-action mse':>17}"]
    lines += [f"{s.split:<22}{s.transitions:>8}{s.mse:>12.4f}{s.mean_action_mse:>17.4f}"
              for s in scores]
    return "\n".join(lines)

