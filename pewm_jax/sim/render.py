"""Anti-aliased top-down RGB rendering of the tabletop world (numpy only).

Every shape is drawn from its signed distance field: a pixel's coverage is
`clip(0.5 - sdf_in_pixels, 0, 1)`, so a shape moving by a fraction of a pixel changes the
image. Pixel (row i, column j) has its centre at workspace ((j + 0.5) / N, (i + 0.5) / N), so a
workspace point `xy` lands at pixel coordinates `xy * N` (DESIGN.md coordinate contract).

The gripper is drawn last: a dark palm disc with two fingers, spread wide when open and
closed around the palm when closed, so the grip state is visible in every frame.
"""

from __future__ import annotations

import functools

import numpy as np

from pewm_jax.sim.world import COLORS, OBJECT_NAMES, OBJECT_RADIUS, ZONES, WorldState

TABLE_RGB = (226, 218, 200)
BIN_RGB = (150, 136, 118)
BIN_RIM_RGB = (96, 84, 70)
EDGE_RGB = (170, 200, 226)
PALM_RGB = (24, 24, 28)
FINGER_RGB = (92, 92, 104)

CUBE_HALF = 0.042  # half side of a cube's square (its corners stay inside the collision disc)
PALM_RADIUS = 0.028
FINGER_HALF = (0.010, 0.026)  # half width, half height of one finger
FINGER_OFFSET_OPEN = 0.058  # finger centre distance from the palm centre, open
FINGER_OFFSET_CLOSED = 0.034  # the same, closed
_RIM = 0.012  # bin rim width

_OBJECT_RGB = np.array([COLORS[name.split()[0]] for name in OBJECT_NAMES], dtype=np.float32)
_IS_CUBE = np.array([name.endswith("cube") for name in OBJECT_NAMES])


class Canvas:
    """A float32 RGB image with the pixel-centre grid, for compositing SDF shapes into it."""

    def __init__(self, size: int):
        self.size = size
        self.centers = (np.arange(size, dtype=np.float32) + 0.5) / size  # workspace coords
        self.image = np.empty((size, size, 3), dtype=np.float32)

    def _window(self, cx: float, cy: float, rx: float, ry: float):
        """Pixel slices covering the box centre +- (rx, ry) plus one pixel of anti-aliasing."""
        n = self.size
        j0 = max(int((cx - rx) * n) - 1, 0)
        j1 = min(int((cx + rx) * n) + 2, n)
        i0 = max(int((cy - ry) * n) - 1, 0)
        i1 = min(int((cy + ry) * n) + 2, n)
        return slice(i0, i1), slice(j0, j1)

    def _blend(self, rows: slice, cols: slice, sdf: np.ndarray, rgb) -> None:
        alpha = np.clip(0.5 - sdf * self.size, 0.0, 1.0)[..., None]
        patch = self.image[rows, cols]
        patch += alpha * (np.asarray(rgb, dtype=np.float32) - patch)

    def disc(self, cx: float, cy: float, r: float, rgb) -> None:
        rows, cols = self._window(cx, cy, r, r)
        dx = self.centers[cols][None, :] - cx
        dy = self.centers[rows][:, None] - cy
        self._blend(rows, cols, np.sqrt(dx * dx + dy * dy) - r, rgb)

    def box(self, cx: float, cy: float, hx: float, hy: float, rgb) -> None:
        rows, cols = self._window(cx, cy, hx, hy)
        qx = np.abs(self.centers[cols][None, :] - cx) - hx
        qy = np.abs(self.centers[rows][:, None] - cy) - hy
        outside = np.sqrt(np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2)
        self._blend(rows, cols, outside + np.minimum(np.maximum(qx, qy), 0.0), rgb)


@functools.lru_cache(maxsize=8)
def _background(size: int) -> np.ndarray:
    """The static layer (table, bins, top-edge strip), drawn once per image size."""
    canvas = Canvas(size)
    canvas.image[:] = TABLE_RGB
    for zone in ZONES.values():
        cx, cy = zone.center
        hx, hy = (zone.x1 - zone.x0) / 2, (zone.y1 - zone.y0) / 2
        if zone.name.endswith("bin"):
            canvas.box(cx, cy, hx, hy, BIN_RIM_RGB)
            canvas.box(cx, cy, hx - _RIM, hy - _RIM, BIN_RGB)
        else:
            canvas.box(cx, cy, hx, hy, EDGE_RGB)
    canvas.image.setflags(write=False)
    return canvas.image


def render(state: WorldState, size: int) -> np.ndarray:
    """Renders the state as a (size, size, 3) uint8 top-down image."""
    canvas = Canvas(size)
    canvas.image[:] = _background(size)
    order = [i for i in range(len(state.kinds)) if i != state.held]
    if state.held >= 0:
        order.append(state.held)  # a lifted object is above the others
    for i in order:
        kind = state.kinds[i]
        x, y = state.positions[i]
        if _IS_CUBE[kind]:
            canvas.box(x, y, CUBE_HALF, CUBE_HALF, _OBJECT_RGB[kind])
        else:
            canvas.disc(x, y, OBJECT_RADIUS, _OBJECT_RGB[kind])
    gx, gy = state.gripper
    offset = FINGER_OFFSET_CLOSED if state.closed else FINGER_OFFSET_OPEN
    for side in (-1.0, 1.0):
        canvas.box(gx + side * offset, gy, FINGER_HALF[0], FINGER_HALF[1], FINGER_RGB)
    canvas.disc(gx, gy, PALM_RADIUS, PALM_RGB)
    return (canvas.image + 0.5).astype(np.uint8)


def locate_gripper(image: np.ndarray, max_level: int = 64, min_pixels: int = 2
                   ) -> np.ndarray | None:
    """(x, y) pixels of the gripper's palm in an RGB image (rendered or generated), or None.

    The palm is the only near-black shape of the world: the centroid of the pixels whose
    channels are all at most `max_level`, weighted by how dark they are. None when fewer than
    `min_pixels` such pixels exist (no gripper visible, e.g. in a blurry generated frame).
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected one (H, W, 3) image, got shape {image.shape}")
    darkness = np.clip(max_level - image.max(axis=-1), 0.0, None)  # (H, W)
    if np.count_nonzero(darkness) < min_pixels:
        return None
    rows, cols = np.nonzero(darkness)
    weights = darkness[rows, cols]
    return np.array([np.average(cols + 0.5, weights=weights),
                     np.average(rows + 0.5, weights=weights)], np.float32)


def gripper_at(image: np.ndarray, xy, radius_px: float) -> bool:
    """Whether the image shows the gripper's palm within radius_px of the pixel point xy (how
    evaluation decides that an imagined frame reached a goal point)."""
    found = locate_gripper(image)
    return found is not None and bool(np.hypot(*(found - np.asarray(xy))) <= radius_px)
