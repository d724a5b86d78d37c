"""The batch contract: every key, shape and dtype a training batch carries (DESIGN.md "Batch").

Every producer (Grain pipelines, synthetic test batches) and consumer (train step, sampler,
policy) imports `BatchSpec`; `BatchSpec.check` is what tests run against each of them. The
planner's fine-tuning batches follow `PlanBatchSpec` the same way.

Frames stay uint8 until the jitted step (4x less host-to-device traffic than float32). Points
are float32 pixels of the stored frame, (x, y), origin top-left (DESIGN.md "Coordinates").
Actions are per environment step (DESIGN.md "Clip"): `s` steps per frame interval, normalised
with the dataset statistics except gripper dimensions, which hold the command (1.0 the high
one, 0.0 the low one; `gripper_mask`), padded to `action_dim` with `action_mask` marking the real
dimensions; `action_valid` marks the segment's own steps (False: padding no-ops).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from pewm_jax.text.tokenizer import NUM_LOCATION_BINS


class BatchSpecError(ValueError):
    """A batch does not follow the batch contract."""


def check_shapes(batch: Mapping[str, np.ndarray],
                 expected: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    """Raises BatchSpecError naming the first key that is missing, extra or mis-shaped."""
    missing, extra = set(expected) - set(batch), set(batch) - set(expected)
    if missing or extra:
        raise BatchSpecError(f"batch keys differ from the spec: missing {sorted(missing)}, "
                             f"unexpected {sorted(extra)}")
    for key, (shape, dtype) in expected.items():
        value = batch[key]
        if tuple(value.shape) != shape or np.dtype(value.dtype) != dtype:
            raise BatchSpecError(f"batch[{key!r}] is {np.dtype(value.dtype)}{list(value.shape)}, "
                                 f"the spec says {dtype}{list(shape)}")


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """Shapes of one batch; `batch_size` is the leading dimension of every key."""

    context_frames: int  # C: clean observation frames at the primitive's start
    horizon: int  # H: future frames to generate
    frame_stride: int  # s: environment steps (actions) between consecutive frames
    image_size: int  # N: frames are N x N RGB
    max_text_tokens: int  # L: primitive words, tokenised and padded
    action_dim: int  # A: largest action size over the datasets in the mixture

    @classmethod
    def from_config(cls, config, action_dim: int) -> "BatchSpec":
        """The spec a config's pipeline produces (`action_dim` comes from the datasets)."""
        return cls(context_frames=config.data.context_frames, horizon=config.data.horizon,
                   frame_stride=config.data.frame_stride, image_size=config.world.image_size,
                   max_text_tokens=config.data.max_text_tokens, action_dim=action_dim)

    def shapes(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Key -> (shape, dtype) for a batch of `batch_size` clips."""
        b, c, h, s, n, l, a = (batch_size, self.context_frames, self.horizon, self.frame_stride,
                               self.image_size, self.max_text_tokens, self.action_dim)
        return {
            "context": ((b, c, n, n, 3), np.dtype(np.uint8)),  # frames at the primitive's start
            "frames": ((b, h, n, n, 3), np.dtype(np.uint8)),  # the H future frames
            "text_tokens": ((b, l), np.dtype(np.int32)),  # primitive words, 0-padded
            "text_mask": ((b, l), np.dtype(bool)),  # True on real tokens
            "start_xy": ((b, 2), np.dtype(np.float32)),  # pixels, (x, y)
            "goal_xy": ((b, 2), np.dtype(np.float32)),  # pixels, (x, y)
            "sgg_valid": ((b,), np.dtype(bool)),  # False: points unknown, no guidance
            # The s actions from frame j-1 to frame j (frame -1: the last context frame).
            "actions": ((b, h, s, a), np.dtype(np.float32)),
            "action_valid": ((b, h, s), np.dtype(bool)),  # False on padding (no-op) steps
            "action_mask": ((b, a), np.dtype(bool)),  # True on the dataset's real dimensions
            "gripper_mask": ((b, a), np.dtype(bool)),  # True on gripper (command) dimensions
            "dataset_id": ((b,), np.dtype(np.int32)),  # index into the mixture's datasets
        }

    def check(self, batch: Mapping[str, np.ndarray], batch_size: int | None = None) -> None:
        """Raises BatchSpecError naming the first key that is missing, extra or mis-shaped."""
        if batch_size is None:
            if "sgg_valid" not in batch:
                raise BatchSpecError("batch has no 'sgg_valid' key to read the batch size from")
            batch_size = int(np.shape(batch["sgg_valid"])[0])
        check_shapes(batch, self.shapes(batch_size))
        if np.any(np.asarray(batch["text_tokens"])[~np.asarray(batch["text_mask"])] != 0):
            raise BatchSpecError("batch['text_tokens'] must be 0 (padding) where text_mask is False")
        if not np.all(np.asarray(batch["action_mask"]).any(axis=1)):
            raise BatchSpecError("batch['action_mask'] has a clip with no real action dimension")
        if np.any(np.asarray(batch["actions"])[np.broadcast_to(
                ~np.asarray(batch["action_mask"])[:, None, None, :], batch["actions"].shape)] != 0):
            raise BatchSpecError("batch['actions'] must be 0 in padded dimensions (action_mask False)")
        if np.any(np.asarray(batch["gripper_mask"]) & ~np.asarray(batch["action_mask"])):
            raise BatchSpecError("batch['gripper_mask'] marks a dimension action_mask does not")
        commands = np.asarray(batch["actions"])[np.broadcast_to(
            np.asarray(batch["gripper_mask"])[:, None, None, :], batch["actions"].shape)]
        if np.any((commands != 0) & (commands != 1)):
            raise BatchSpecError("batch['actions'] gripper dimensions must be 0 or 1 (the command)")


@dataclasses.dataclass(frozen=True)
class PlanBatchSpec:
    """Shapes of one planner fine-tuning batch: first frames, prompt + plan tokens."""

    image_size: int  # S: the planner's square input image
    max_tokens: int  # L: <bos> + prompt + plan + <eos>, padded with <pad> (id 0)

    @classmethod
    def from_config(cls, config, image_size: int) -> "PlanBatchSpec":
        """The spec of a config's planner pipeline (`image_size` is the planner model's)."""
        return cls(image_size=image_size, max_tokens=config.planner.max_tokens)

    def shapes(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Key -> (shape, dtype) for a batch of `batch_size` examples."""
        b, s, l = batch_size, self.image_size, self.max_tokens
        return {
            "image": ((b, s, s, 3), np.dtype(np.uint8)),  # the scene when the task starts
            "tokens": ((b, l), np.dtype(np.int32)),  # <bos> prompt plan <eos> <pad>...
            "target_mask": ((b, l), np.dtype(bool)),  # True on plan tokens (what is learnt)
            "target_bins": ((b, l), np.dtype(np.int32)),  # a plan location token's bin, else -1
            "ground_bins": ((b, l), np.dtype(np.int32)),  # the bin it is grounded on, else -1
            "prefix_len": ((b,), np.dtype(np.int32)),  # <bos> + padded prompt: attended both ways
        }

    def check(self, batch: Mapping[str, np.ndarray]) -> None:
        """Raises BatchSpecError naming the first key that is missing, extra or mis-shaped, or
        a row whose plan does not directly follow its prompt."""
        batch_size = int(np.shape(batch["prefix_len"])[0]) if "prefix_len" in batch else -1
        check_shapes(batch, self.shapes(batch_size))
        mask, prefix = np.asarray(batch["target_mask"]), np.asarray(batch["prefix_len"])
        bins = np.asarray(batch["target_bins"])
        if np.any(bins[~mask] != -1) or np.any(bins >= NUM_LOCATION_BINS) or np.any(bins < -1):
            raise BatchSpecError("batch['target_bins'] must be -1 outside the plan and a bin in "
                                 f"[0, {NUM_LOCATION_BINS}) or -1 on it")
        ground = np.asarray(batch["ground_bins"])
        if np.any((ground == -1) != (bins == -1)) or np.any(ground >= NUM_LOCATION_BINS):
            raise BatchSpecError("batch['ground_bins'] must hold a bin exactly where "
                                 "batch['target_bins'] does, and -1 elsewhere")
        for row in range(batch_size):
            targets = np.flatnonzero(mask[row])
            if (not len(targets) or targets[0] != prefix[row]
                    or not np.array_equal(targets, np.arange(targets[0], targets[-1] + 1))):
                raise BatchSpecError(f"row {row}: target_mask must mark one run of plan tokens "
                                     f"starting at prefix_len = {prefix[row]}")
