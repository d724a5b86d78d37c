"""Per-clip transforms of the input pipeline: crop-and-resize, colour jitter, points, actions.

Everything here is numpy (plus PIL for resampling) and deterministic given the
`np.random.Generator` it is handed; the pipeline seeds that generator from (seed, global element
index), so a clip's augmentation does not depend on the worker, the process layout or resuming.

Geometry follows DESIGN.md "Coordinates": pixel (row i, column j) has its centre at
(j + 0.5, i + 0.5). A crop box (x0, y0, side) in source pixels resized to N x N maps source
point p to (p - (x0, y0)) * N / side, which is exactly where PIL's resampling (output pixel
centre c samples source x0 + c * side / N) puts the pixels that were at p, so the points move
with the pixels.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from data_loaders.clips import ActionStats

# Crops keep valid start/goal points at least this far (source pixels) inside the crop.
POINT_MARGIN_PX = 1.0


@dataclasses.dataclass(frozen=True)
class CropBox:
    """A square crop of a source frame, in source pixels: [x0, x0 + side) x [y0, y0 + side)."""

    x0: float
    y0: float
    side: float

    @classmethod
    def full(cls, size: int) -> "CropBox":
        """The whole size x size frame."""
        return cls(0.0, 0.0, float(size))

    def is_full(self, size: int) -> bool:
        """Whether this box is the whole size x size frame."""
        return self.x0 == 0.0 and self.y0 == 0.0 and self.side == float(size)

    def map_points(self, xy: np.ndarray, out_size: int) -> np.ndarray:
        """Source pixel points (..., 2) -> pixels of the out_size x out_size resized crop."""
        offset = np.array([self.x0, self.y0], np.float64)
        return ((np.asarray(xy, np.float64) - offset) * (out_size / self.side)).astype(np.float32)


def random_crop(rng: np.random.Generator, size: int, scale_min: float,
                points: np.ndarray | None) -> CropBox:
    """A random square crop with side in [scale_min, 1] x size that keeps `points` inside.

    `points` (M, 2) source pixels (None: no constraint). When the points are farther apart
    than the drawn side, the side grows to hold them (up to the whole frame). Always draws three
    uniforms, so the generator's stream does not depend on the data.
    """
    u_scale, u_x, u_y = rng.uniform(size=3)
    side = (scale_min + (1.0 - scale_min) * u_scale) * size
    lo = np.zeros(2)
    hi = np.full(2, size - side)
    if points is not None and len(points):
        pts = np.clip(np.asarray(points, np.float64), 0.0, size)
        span = pts.max(0) - pts.min(0) + 2 * POINT_MARGIN_PX
        side = float(min(size, max(side, span.max())))
        hi = np.full(2, size - side)
        lo = np.clip(pts.max(0) + POINT_MARGIN_PX - side, 0.0, hi)
        hi = np.maximum(np.clip(pts.min(0) - POINT_MARGIN_PX, 0.0, hi), lo)
    x0, y0 = lo + (hi - lo) * np.array([u_x, u_y])
    return CropBox(float(x0), float(y0), float(side))


def crop_and_resize(frames: np.ndarray, box: CropBox, out_size: int) -> np.ndarray:
    """(F, S, S, 3) uint8 -> (F, out_size, out_size, 3): the same crop, bilinear, every frame."""
    if box.is_full(frames.shape[1]) and frames.shape[1] == out_size:
        return frames
    pil_box = (box.x0, box.y0, box.x0 + box.side, box.y0 + box.side)
    out = np.empty((frames.shape[0], out_size, out_size, 3), np.uint8)
    for i, frame in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(frame).resize(
            (out_size, out_size), Image.Resampling.BILINEAR, box=pil_box))
    return out


def resize_bicubic(images: np.ndarray, size: int) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, size, size, 3) uint8, bicubic: the planner's input resize (what
    Hugging Face's SigLIP image processor does), the same in training and at run time."""
    return np.stack([img if img.shape[:2] == (size, size) else np.asarray(
        Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC)) for img in images])


def random_shift(rng: np.random.Generator, size: int, max_shift: int,
                 points: np.ndarray) -> tuple[int, int]:
    """A random whole-pixel translation (dx, dy), each in [-max_shift, max_shift], that keeps
    `points` (M, 2), pixels of a size x size image, at least POINT_MARGIN_PX inside. Always
    draws two uniforms, so the generator's stream does not depend on the data."""
    u = rng.uniform(size=2)
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    lo = np.maximum(-max_shift, np.ceil(POINT_MARGIN_PX - pts.min(0)))
    hi = np.minimum(max_shift, np.floor(size - POINT_MARGIN_PX - pts.max(0)))
    hi = np.maximum(hi, lo)  # points already nearer the border than the margin: no room
    dx, dy = np.floor(lo + (hi - lo + 1) * u).clip(lo, hi).astype(int)
    return int(dx), int(dy)


def shift_image(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """(S, S, 3) -> the same image moved right by dx and down by dy pixels; the strip uncovered
    repeats the border pixels (a tabletop continues past the frame)."""
    s = max(abs(dx), abs(dy))
    if s == 0:
        return image
    padded = np.pad(image, ((s, s), (s, s), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return padded[s - dy:s - dy + h, s - dx:s - dx + w]


def color_jitter(frames: np.ndarray, rng: np.random.Generator, strength: float,
                 reference: np.ndarray) -> np.ndarray:
    """Random brightness and contrast (each a factor in [1 - strength, 1 + strength]).

    One transform for the whole clip: contrast pivots on the mean of `reference` (the context
    frames), and the affine map is applied to every frame through one 256-entry table. Always
    draws two uniforms.
    """
    brightness, contrast = 1.0 + strength * (2.0 * rng.uniform(size=2) - 1.0)
    mean = float(reference.mean())
    levels = np.arange(256, dtype=np.float64)
    table = np.clip(np.rint(((levels - mean) * contrast + mean) * brightness), 0, 255)
    return table.astype(np.uint8)[frames]


def pad_actions(actions: np.ndarray, stats: ActionStats, action_dim: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, s, A_k) raw -> (H, s, action_dim) as models learn them (`ActionStats.to_model`),
    zero-padded, with the (action_dim,) masks of the real and of the gripper dimensions."""
    dims = actions.shape[-1]
    out = np.zeros(actions.shape[:-1] + (action_dim,), np.float32)
    out[..., :dims] = stats.to_model(actions)
    mask, gripper = np.zeros(action_dim, bool), np.zeros(action_dim, bool)
    mask[:dims] = True
    gripper[:dims] = ~stats.normalize_mask
    return out, mask, gripper
