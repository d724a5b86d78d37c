"""World-model evaluation on held-out clips: do the sampled futures look like the true ones?

The EMA world model samples every clip of a split from its context frame, words and start/goal
points (the config's sampler), and each figure sits beside the copy-context baseline (every
future frame = the context frame, what a model that imagines no motion would score):

    psnr, ssim          of the sampled frames against the true ones (dm-pix, per frame, mean)
    copy_psnr, copy_ssim    the same for the copied context frame
    goal_reach          fraction of clips whose last sampled frame shows the gripper within
                        `goal_reach_px` of the goal point (`sim.render.locate_gripper`)
    copy_goal_reach, true_goal_reach    the same for the context frame and the true last frame
    path_px             on the frames where the true gripper is still on its way (not yet where
                        the clip ends), the mean distance of the sampled gripper from the true
                        one, over those where the sample shows a gripper
    jump_path_px        the same for a clip that shows its true end from the first frame (a
                        model that draws where the motion ends, not the motion): path_px near it
                        means the sampled clips skip the way
    path_found          the share of those frames where the sample shows a gripper at all

Models come from `pewm_jax.recipes.restore.restore`.
"""

from __future__ import annotations

import dataclasses

import dm_pix
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_loaders import pipeline
from pewm_jax.diffusion.samplers import sample_from_config
from pewm_jax.models.video_dit import WorldModel
from pewm_jax.sim.render import gripper_at, locate_gripper


@dataclasses.dataclass(frozen=True)
class VideoScores:
    """Sampled clips against the truth and the copy-context baseline (module docstring)."""

    split: str
    clips: int
    psnr: float
    ssim: float
    copy_psnr: float
    copy_ssim: float
    goal_reach: float
    copy_goal_reach: float
    true_goal_reach: float
    path_px: float
    jump_path_px: float
    path_found: float


def reaches_goal(frames: np.ndarray, goal_xy: np.ndarray, radius_px: float) -> np.ndarray:
    """(B,) bool: frame b (B, N, N, 3) shows the gripper within radius_px of goal_xy[b]."""
    return np.array([gripper_at(frame, goal, radius_px) for frame, goal in zip(frames, goal_xy)],
                    bool)


def path_sums(sampled: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(4,) sums over clips of uint8 (B, H, N, N, 3) frames: sampled-to-true gripper
    distance and true-end-to-true distance on the frames where the sample shows a gripper, and
    the counts of those frames and of all frames where the true gripper is on its way (more
    than 1 px from where it ends; frames where it shows none are skipped)."""
    sums = np.zeros(4)
    for clip, true_clip in zip(sampled, truth):
        true_xy = [locate_gripper(f) for f in true_clip]
        end = true_xy[-1]
        if end is None:
            continue
        for frame, xy in zip(clip, true_xy):
            if xy is None or np.hypot(*(xy - end)) <= 1.0:
                continue
            sums[3] += 1
            found = locate_gripper(frame)
            if found is not None:
                sums[:3] += (np.hypot(*(found - xy)), np.hypot(*(end - xy)), 1)
    return sums


@jax.jit
def _frame_quality(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-frame PSNR and SSIM (B, H) of frames in [0, 1] (B, H, N, N, 3)."""
    frames = a.reshape(-1, *a.shape[2:]), b.reshape(-1, *b.shape[2:])  # (B*H, N, N, 3) each
    return (dm_pix.psnr(*frames).reshape(a.shape[:2]),
            dm_pix.ssim(*frames).reshape(a.shape[:2]))


def evaluate_video(model: WorldModel, config: ml_collections.ConfigDict, split: str, *,
                   max_clips: int, batch_size: int, goal_reach_px: float,
                   seed: int = 0) -> VideoScores:
    """Samples the first `max_clips` clips of `split` (unaugmented), `batch_size` at a time
    (the last batch padded, so the sampler compiles once), and scores them."""
    clips = pipeline.ClipPipeline(config, split, augment=False, process_index=0,
                                  process_count=1, num_workers=0)
    count = min(max_clips, sum(clips.mixture.sizes))
    if count == 0:
        raise ValueError(f"split {split!r} has no clips to sample")
    sums = np.zeros(4)  # psnr, ssim, copy psnr, copy ssim (each summed over clips)
    reach = np.zeros(3)  # sampled, copied, true
    path = np.zeros(4)  # `path_sums`
    for first in range(0, count, batch_size):
        rows = list(range(first, min(first + batch_size, count)))
        examples = [clips.element(p) for p in rows + [rows[0]] * (batch_size - len(rows))]
        batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        sampled = sample_from_config(model, batch, jax.random.fold_in(jax.random.key(seed),
                                                                        first), config)
        sampled = np.asarray(sampled)[:len(rows)]  # (b, H, N, N, 3) in [0, 1]
        truth = batch["frames"][:len(rows)].astype(np.float32) / 255.0
        copied = np.broadcast_to(batch["context"][:len(rows), -1:].astype(np.float32) / 255.0,
                                 truth.shape)
        for k, guess in enumerate((sampled, copied)):
            psnr, ssim = _frame_quality(jnp.asarray(guess), jnp.asarray(truth))
            sums[2 * k] += float(jnp.sum(jnp.mean(psnr, axis=1)))
            sums[2 * k + 1] += float(jnp.sum(jnp.mean(ssim, axis=1)))
        goal = batch["goal_xy"][:len(rows)]
        sampled_u8 = np.round(sampled * 255).astype(np.uint8)  # (b, H, N, N, 3)
        last = (sampled_u8[:, -1], batch["context"][:len(rows), -1],
                batch["frames"][:len(rows), -1])
        reach += [reaches_goal(frames, goal, goal_reach_px).sum() for frames in last]
        path += path_sums(sampled_u8, batch["frames"][:len(rows)])
    psnr, ssim, copy_psnr, copy_ssim = (sums / count).tolist()
    found = max(path[2], 1.0)
    return VideoScores(split, count, psnr, ssim, copy_psnr, copy_ssim,
                       *(reach / count).tolist(), path[0] / found, path[1] / found,
                       path[2] / max(path[3], 1.0))
