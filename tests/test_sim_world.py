"""The tabletop world's dynamics, rendering, action handling, determinism and gymnasium API."""

import gymnasium
import numpy as np
import pytest

from pewm_jax import sim
from pewm_jax.sim import render as render_lib
from pewm_jax.sim import world as W


def _state(objects: dict[str, tuple[float, float]], gripper=(0.5, 0.5), closed=False):
    names = list(objects)
    kinds = np.array([W.OBJECT_NAMES.index(n) for n in names])
    return W.WorldState(np.array(gripper, float), closed, -1, kinds,
                        np.array([objects[n] for n in names], float))


def test_same_seed_same_episode():
    a, b = sim.TabletopEnv(64), sim.TabletopEnv(64)
    for seed in (0, 7):
        ea, eb = sim.expert_episode(a, seed), sim.expert_episode(b, seed)
        np.testing.assert_array_equal(ea.frames, eb.frames)
        np.testing.assert_array_equal(ea.states, eb.states)
        np.testing.assert_array_equal(ea.actions, eb.actions)
        assert ea.task == eb.task
    assert not np.array_equal(sim.expert_episode(a, 1).frames[0], sim.expert_episode(a, 2).frames[0])


def test_closed_gripper_over_object_carries_it():
    s = _state({"red cube": (0.5, 0.5), "blue disc": (0.8, 0.3)})
    W.step_state(s, np.array([0.0, 0.0, 1.0]))
    assert s.held == 0 and s.closed
    for _ in range(3):
        W.step_state(s, np.array([-0.05, 0.02, 1.0]))
    np.testing.assert_allclose(s.positions[0], [0.35, 0.56])
    np.testing.assert_allclose(s.positions[1], [0.8, 0.3])  # untouched
    W.step_state(s, np.array([0.0, 0.0, -1.0]))
    assert s.held == -1 and not s.closed
    W.step_state(s, np.array([0.05, 0.0, -1.0]))
    np.testing.assert_allclose(s.positions[0], [0.35, 0.56])  # dropped, stays


def test_open_gripper_passes_over_closed_gripper_pushes():
    s = _state({"red cube": (0.5, 0.5)}, gripper=(0.3, 0.5))
    for _ in range(5):
        W.step_state(s, np.array([0.08, 0.0, -1.0]))
    np.testing.assert_allclose(s.positions[0], [0.5, 0.5])  # open: travelled over it
    s = _state({"red cube": (0.5, 0.5)}, gripper=(0.3, 0.5), closed=True)
    for _ in range(4):
        W.step_state(s, np.array([0.08, 0.0, 1.0]))
    assert s.held == -1
    # Pushed ahead of the gripper, in contact, on the same line.
    np.testing.assert_allclose(s.positions[0], [0.62 + W.contact_distance(np.array([1.0, 0.0])), 0.5])


@pytest.mark.parametrize("offset", [0.0, 0.02, -0.025])
def test_flat_pad_pushes_straight_from_off_line(offset):
    """A push a little off the object's line moves it straight along the push (stable pushing
    by the pad's flat face): it keeps its sideways offset instead of sliding off."""
    s = _state({"red disc": (0.5, 0.5 + offset)}, gripper=(0.3, 0.5), closed=True)
    for _ in range(6):
        W.step_state(s, np.array([0.05, 0.0, 1.0]))
    np.testing.assert_allclose(s.positions[0],
                               [0.6 + W.contact_distance(np.array([1.0, 0.0])), 0.5 + offset])


def test_pad_is_the_closed_gripper_as_drawn():
    """The pad's extent is the closed gripper's drawn footprint, so what a frame shows touching
    is what touches."""
    size = 256
    image = render_lib.render(_state({}, gripper=(0.5, 0.5), closed=True), size).astype(int)
    dark = np.all(image <= np.array(render_lib.FINGER_RGB) + 1, axis=-1)  # palm and fingers
    rows, cols = np.nonzero(dark)
    half_px = np.array([np.ptp(cols) + 1, np.ptp(rows) + 1]) / 2
    np.testing.assert_allclose(half_px / size, W.GRIPPER_PAD_HALF, atol=1.5 / size)


def test_objects_never_overlap_and_stay_on_table():
    rng = np.random.default_rng(0)
    s = W.sample_scene(rng, 6)
    for _ in range(3000):
        W.step_state(s, W.clip_action(rng.uniform(-0.1, 0.1, 3) + [0, 0, rng.choice([-1, 1])], 0.08)[0])
        free = np.array([i for i in range(len(s.kinds)) if i != s.held])
        p = s.positions[free]
        d = np.hypot(*(p[:, None] - p[None]).transpose(2, 0, 1)) + np.eye(len(p))
        assert d.min() >= 2 * W.OBJECT_RADIUS - 1e-6
        assert p.min() >= W.OBJECT_RADIUS - 1e-9 and p.max() <= 1 - W.OBJECT_RADIUS + 1e-9
        assert W.GRIPPER_BOUNDS[0] <= s.gripper.min() and s.gripper.max() <= W.GRIPPER_BOUNDS[1]


@pytest.mark.parametrize("size", [64, 128, 256])
def test_render_sizes_and_subpixel_motion(size):
    s = _state({"red cube": (0.4, 0.4), "green disc": (0.6, 0.6)})
    img = render_lib.render(s, size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    moved = s.copy()
    moved.gripper = moved.gripper + [0.25 / size, 0.0]  # a quarter of a pixel
    assert np.abs(render_lib.render(moved, size).astype(int) - img).max() >= 5
    moved = s.copy()
    moved.positions[1] += [0.0, 0.25 / size]
    assert not np.array_equal(render_lib.render(moved, size), img)
    closed = s.copy()
    closed.closed = True
    assert np.abs(render_lib.render(closed, size).astype(int) - img).sum() > 255 * 3 * (size / 64)


def test_object_pixels_where_coordinates_say():
    """A lone red disc's coverage centroid sits at xy * image_size (the coordinate contract)."""
    xy = np.array([0.3125, 0.45])
    s = _state({"red disc": tuple(xy)}, gripper=(0.9, 0.9))
    img = render_lib.render(s, 64).astype(float)
    # On the plain table, coverage follows from the green channel: table 218, red 48.
    alpha = (render_lib.TABLE_RGB[1] - img[..., 1]) / (render_lib.TABLE_RGB[1] - W.COLORS["red"][1])
    window = np.zeros((64, 64), bool)
    window[20:38, 12:30] = True
    alpha = np.where(window, alpha, 0.0)
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    centroid = np.array([(xs * alpha).sum(), (ys * alpha).sum()]) / alpha.sum()
    np.testing.assert_allclose(centroid, xy * 64, atol=0.05)
    assert abs(alpha.sum() - np.pi * (W.OBJECT_RADIUS * 64) ** 2) < 0.5  # area in pixels


def test_bad_actions_get_documented_errors():
    env = sim.TabletopEnv(64)
    env.reset(seed=0)
    before = env.state.copy()
    with pytest.raises(sim.ActionError, match="finite"):
        env.step([np.nan, 0.0, 0.0])
    with pytest.raises(sim.ActionError, match=r"shape \(3,\)"):
        env.step([0.0, 0.0])
    with pytest.raises(sim.ActionError, match=r"shape \(3,\)"):
        env.step(np.zeros((1, 3)))
    np.testing.assert_array_equal(env.state.gripper, before.gripper)  # nothing was applied
    _, _, _, _, info = env.step([0.5, -0.5, 3.0])
    assert info["action_clipped"]
    np.testing.assert_allclose(env.state.gripper, np.clip(before.gripper + [0.08, -0.08], *W.GRIPPER_BOUNDS))
    _, _, _, _, info = env.step([0.01, 0.0, -1.0])
    assert not info["action_clipped"]


def test_gymnasium_registration_and_checker():
    env = gymnasium.make("pewm_jax.sim:pewm/Tabletop-v0", image_size=64)
    obs, info = env.reset(seed=3, options={"split": "train"})
    assert env.observation_space.contains(obs)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert env.observation_space.contains(obs) and "success" in info
    from gymnasium.utils.env_checker import check_env
    check_env(env.unwrapped, skip_render_check=True)
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(seed=0, options={"splt": "train"})
    with pytest.raises(ValueError, match="unknown split"):
        env.reset(seed=0, options={"split": "validation"})


def test_episode_truncates_without_success():
    env = sim.TabletopEnv(64, primitive_max_steps=8)
    env.reset(seed=5)
    truncated = False
    for t in range(env.max_episode_steps):
        _, reward, terminated, truncated, info = env.step([0.0, 0.0, -1.0])
        assert reward == 0.0 and not terminated
    assert truncated and not info["success"]
