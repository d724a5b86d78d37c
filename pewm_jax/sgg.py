"""Start-Goal heatmap Guidance: start/goal points -> Gaussian heatmaps, in jax.numpy only.

The one renderer of SGG heatmaps (DESIGN.md "Heatmaps"): data pipelines carry points and
`sgg_valid`; the jitted train step, the sampler, the policy step and the exported step call
`render_heatmaps`. Points are float32 pixels (x, y) of the frame, origin top-left; pixel (row i,
column j) has its centre at (j + 0.5, i + 0.5), so a point at (10.5, 3.5) peaks exactly on
pixel row 3, column 10.
"""

from __future__ import annotations

import jax.numpy as jnp


def render_heatmaps(start_xy: jnp.ndarray, goal_xy: jnp.ndarray, valid: jnp.ndarray,
                    height: int, width: int, sigma: float) -> jnp.ndarray:
    """Renders (B, height, width, 2) float32 heatmaps: channel 0 start, channel 1 goal.

    start_xy, goal_xy: (B, 2) pixels; valid: (B,) bool, False gives all-zero maps (a clip
    without known points is treated as unconditioned). Peaks are 1.0 at the point; sigma is
    the Gaussian's standard deviation in pixels.
    """
    points = jnp.stack([start_xy, goal_xy], axis=1).astype(jnp.float32)  # (B, 2 maps, 2 xy)
    xs = jnp.arange(width, dtype=jnp.float32) + 0.5  # (W,)
    ys = jnp.arange(height, dtype=jnp.float32) + 0.5  # (H,)
    dx2 = (xs[None, None, None, :] - points[:, :, 0, None, None]) ** 2  # (B, 2, 1, W)
    dy2 = (ys[None, None, :, None] - points[:, :, 1, None, None]) ** 2  # (B, 2, H, 1)
    maps = jnp.exp(-(dx2 + dy2) / (2.0 * sigma * sigma))  # (B, 2, H, W)
    maps = maps * jnp.asarray(valid, jnp.float32)[:, None, None, None]
    return jnp.transpose(maps, (0, 2, 3, 1))  # (B, H, W, 2)
