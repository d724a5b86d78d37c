"""Start-goal heatmaps (pewm_jax.sgg): peak location, the Gaussian formula, validity, jit."""

import jax
import jax.numpy as jnp
import numpy as np

from pewm_jax.sgg import render_heatmaps

START = np.array([[10.5, 3.5], [20.2, 40.9]], np.float32)  # (x, y) pixels
GOAL = np.array([[47.9, 60.1], [0.3, 0.7]], np.float32)


def test_heatmap_peaks_at_the_pixel_holding_the_point():
    maps = np.asarray(render_heatmaps(START, GOAL, np.array([True, True]), 64, 48, sigma=2.0))
    assert maps.shape == (2, 64, 48, 2) and maps.dtype == np.float32
    for b in range(2):
        for c, points in enumerate((START, GOAL)):
            row, col = np.unravel_index(np.argmax(maps[b, :, :, c]), (64, 48))
            assert (col, row) == tuple(np.floor(points[b]).astype(int))
    assert maps[0, 3, 10, 0] == 1.0  # exactly on pixel row 3, column 10's centre


def test_heatmap_values_follow_the_gaussian():
    sigma = 3.0
    maps = np.asarray(render_heatmaps(START, GOAL, np.array([True, True]), 64, 48, sigma=sigma))
    for b, row, col, c in ((0, 5, 12, 0), (1, 41, 20, 0), (0, 50, 40, 1), (1, 2, 3, 1)):
        x, y = (START if c == 0 else GOAL)[b]
        want = np.exp(-((col + 0.5 - x) ** 2 + (row + 0.5 - y) ** 2) / (2 * sigma ** 2))
        np.testing.assert_allclose(maps[b, row, col, c], want, rtol=1e-5, atol=1e-7)


def test_invalid_points_give_zero_maps():
    maps = np.asarray(render_heatmaps(START, GOAL, np.array([False, True]), 32, 32, sigma=2.0))
    assert not maps[0].any()
    assert maps[1].max() > 0.5


def test_render_heatmaps_jits():
    render = jax.jit(render_heatmaps, static_argnames=("height", "width", "sigma"))
    valid = jnp.array([True, False])
    jitted = render(START, GOAL, valid, height=16, width=24, sigma=1.5)
    eager = render_heatmaps(START, GOAL, valid, 16, 24, 1.5)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6)
