"""Meta-World v3 tasks behind the environment interface the controller uses.

    env = MetaWorldEnv("door-open", camera="corner", image_size=128)
    obs, info = env.reset(seed=7)            # the benchmark's seeded task variation
    obs, reward, terminated, truncated, info = env.step(np.array([0.1, 0, 0, 1.0]))

Observation: {"image": (N, N, 3) uint8 upright RGB from `camera`, "state": (4,) float32 hand
xyz (metres) and gripper opening}. Action: (4,) float32 xyz delta and gripper effort, each in
[-1, 1] (the effort > 0 closes); values outside are clipped and `info["action_clipped"]` says
so; a NaN or wrongly shaped action raises `ActionError`. Reward is 1.0 on the step the task
succeeds, which terminates the episode; it is truncated after `max_episode_steps` (500, the
benchmark's budget). `step(action, render=False)` simulates without drawing the image, and
`continue_from(other)` puts an env of the same task and seed in another's exact state: together
they simulate a look-ahead on a copy of the world (the controller's `ControlEnv.rollout`).

Rendering is MuJoCo's offscreen renderer on EGL (`MUJOCO_GL=egl`; on a machine without a GPU,
Mesa's software EGL: Debian's libegl1 + libgl1-mesa-dri) with multisampling, shadows and
reflections off: about 9x faster than Meta-World's default, same content. The corner cameras
are mounted with their image "up" pointing down in the world, so their images are rotated
180 degrees to stand upright (a rotation, not a mirror); `camera_model()` projects world points
into the stored image, rotation included.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from typing import Any

import gymnasium
import mujoco  # after pewm_jax.metaworld/__init__ chose the EGL backend
import numpy as np
from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

from pewm_jax.camera import project_points
from pewm_jax.sim.world import ActionError

CAMERAS = ("corner", "corner2", "corner3")  # the AVDC protocol's cameras
MAX_EPISODE_STEPS = 500  # Meta-World's path length; the AVDC protocol's success budget
ACTION_DIM = 4
GRIPPER_DIMS = [3]  # the effort dimension: never normalised (DESIGN.md "Batch")
TASK_NAMES = tuple(sorted(k.removesuffix("-v3-goal-observable")
                          for k in ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE))


def check_task(task: str) -> str:
    """`task` as a Meta-World v3 task name ('door-open'); ValueError naming close ones."""
    if task not in TASK_NAMES:
        close = difflib.get_close_matches(task, TASK_NAMES, n=3)
        raise ValueError(f"unknown Meta-World task {task!r}" +
                         (f"; did you mean {close}?" if close else f"; known: {list(TASK_NAMES)}"))
    return task


@dataclasses.dataclass(frozen=True)
class CameraModel:
    """Pinhole model of one camera's stored (upright) image: OpenCV-style intrinsics (pixel
    centres at integer coordinates) and a world -> camera (x right, y down, z forward) matrix."""

    intrinsics: np.ndarray  # (3, 3)
    extrinsics: np.ndarray  # (4, 4)
    image_size: int

    def project(self, points: np.ndarray) -> np.ndarray:
        """World (..., 3) metres -> (..., 2) float32 (x, y) pixels of the stored image (origin
        at the top-left corner, DESIGN.md "Coordinates"); NaN for points behind the camera."""
        points = np.asarray(points, np.float64)
        uv, in_front = project_points(points.reshape(-1, 3), self.intrinsics, self.extrinsics)
        uv[~in_front] = np.nan
        return uv.reshape(*points.shape[:-1], 2).astype(np.float32)


class MetaWorldEnv(gymnasium.Env):
    """One Meta-World v3 task seen from one camera (module docstring)."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, task: str, *, camera: str = "corner", image_size: int = 128,
                 fast_render: bool = True, max_episode_steps: int = MAX_EPISODE_STEPS):
        self.task = check_task(task)
        if camera not in CAMERAS:
            raise ValueError(f"camera must be one of {CAMERAS} (the protocol's), got {camera!r}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
        if not 1 <= max_episode_steps <= MAX_EPISODE_STEPS:
            raise ValueError(f"max_episode_steps must be in [1, {MAX_EPISODE_STEPS}], got "
                             f"{max_episode_steps}")
        self.camera, self.image_size = camera, int(image_size)
        self.fast_render, self.max_episode_steps = fast_render, int(max_episode_steps)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        self.observation_space = gymnasium.spaces.Dict({
            "image": gymnasium.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8),
            "state": gymnasium.spaces.Box(-np.inf, np.inf, (4,), np.float32)})
        self._env = None
        self._renderer: mujoco.Renderer | None = None
        self.raw_observation: np.ndarray | None = None  # Meta-World's own 39-D observation
        self.seed_value: int | None = None
        self._steps = 0

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        """Builds the task variation of `seed` as the benchmark does (its goal-observable class
        constructed with that seed) and returns the first observation."""
        super().reset(seed=seed)
        if options:
            raise ValueError(f"unknown reset options {sorted(options)}; MetaWorldEnv takes none")
        if seed is None:
            seed = int(self.np_random.integers(2**31))
        self.close()
        self._env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{self.task}-v3-goal-observable"](
            seed=seed)
        self.raw_observation, _ = self._env.reset()
        self.seed_value, self._steps = int(seed), 0
        model = self._env.model
        if self.fast_render:
            model.vis.quality.offsamples = 0  # read when the renderer's buffers are made
        try:
            self._renderer = mujoco.Renderer(model, self.image_size, self.image_size)
        except (mujoco.FatalError, ImportError, RuntimeError) as e:  # no usable GL context
            self.close()
            raise RuntimeError(
                f"MuJoCo could not make an offscreen OpenGL context ({e}); MUJOCO_GL is "
                f"{os.environ.get('MUJOCO_GL')!r}. Fix: import pewm_jax.metaworld before mujoco "
                "or metaworld (it selects EGL), or set MUJOCO_GL=egl; on a machine without a "
                "GPU install Mesa's EGL: apt-get install libegl1 libgl1-mesa-dri") from e
        if self.fast_render:
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        return self._observation(), self._info(success=False, clipped=False)

    def step(self, action, *, render: bool = True) -> tuple[dict, float, bool, bool, dict]:
        """Applies one clipped action; returns obs, reward, terminated, truncated, info.
        `render` False leaves the camera image out (obs["image"] is None): simulating only."""
        if self._env is None:
            raise RuntimeError("call reset() before step()")
        action = np.asarray(action, np.float32)
        if action.shape != (ACTION_DIM,) or not np.all(np.isfinite(action)):
            raise ActionError(f"expected a finite action of shape ({ACTION_DIM},) (xyz delta, "
                              f"gripper effort), got {action.dtype} {action.shape}: {action}")
        clipped_action = np.clip(action, -1.0, 1.0)
        clipped = bool(np.any(clipped_action != action))
        self.raw_observation, _, _, _, env_info = self._env.step(clipped_action)
        self._steps += 1
        success = bool(env_info["success"])
        truncated = (not success) and self._steps >= self.max_episode_steps
        return (self._observation(render), float(success), success, truncated,
                self._info(success=success, clipped=clipped))

    def continue_from(self, other: MetaWorldEnv) -> None:
        """Puts this env (reset with `other`'s task and seed) in `other`'s exact current state:
        MuJoCo's integration state and Meta-World's per-step Python state (step count, the
        previous observation it stacks), so the same actions give the same observations."""
        if self._env is None or other._env is None or (self.task, self.seed_value) != (
                other.task, other.seed_value):
            raise ValueError(f"continue_from needs both envs reset with the same task and seed; "
                             f"got {(self.task, self.seed_value)} and "
                             f"{(other.task, other.seed_value)}")
        src, dst = other._env, self._env
        what = mujoco.mjtState.mjSTATE_INTEGRATION  # everything the simulation's future needs
        state = np.empty(mujoco.mj_stateSize(src.model, what))
        mujoco.mj_getState(src.model, src.data, state, what)
        mujoco.mj_setState(dst.model, dst.data, state, what)
        mujoco.mj_forward(dst.model, dst.data)  # positions as `other`'s step left them ...
        mujoco.mj_setState(dst.model, dst.data, state, what)  # ... and the solver's warm start
        # as it was: mj_forward rewrites it, and the next step starts from it
        # The same seed built the same task (model, goal, initial positions); what stepping
        # changes on the Python side is held in scalars and arrays of their own (arrays that
        # view MuJoCo's data follow it).
        for key, value in vars(src).items():
            if isinstance(value, (bool, int, float, np.generic, type(None))) or (
                    isinstance(value, np.ndarray) and value.base is None):
                vars(dst)[key] = copy.copy(value)
        self.raw_observation = other.raw_observation.copy()
        self._steps = other._steps

    @property
    def tcp(self) -> np.ndarray:
        """(3,) the gripper's tool-centre point (between the finger pads), world metres."""
        return np.asarray(self._env.tcp_center, np.float64)

    @property
    def task_env(self):
        """The wrapped Meta-World environment (its model, data and expert observations)."""
        return self._env

    def render(self, camera: str | None = None) -> np.ndarray:
        """(N, N, 3) uint8 upright image from `camera` (default: the env's camera)."""
        camera = camera or self.camera
        self._renderer.update_scene(self._env.data, camera=camera)
        image = self._renderer.render()
        return np.ascontiguousarray(image[::-1, ::-1]) if self._up_is_down(camera) else image

    def camera_model(self, camera: str | None = None) -> CameraModel:
        """`camera`'s projection into its stored image (rotation to upright included)."""
        camera = camera or self.camera
        data, model = self._env.data, self._env.model
        cam = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        rotation = data.cam_xmat[cam].reshape(3, 3)  # columns: camera x, y, z in the world
        # MuJoCo's camera looks along -z with y up; OpenCV's along +z with y down. Upright
        # images are also turned 180 degrees about the optical axis (x and y negate).
        axes = np.diag([-1.0, 1.0, -1.0] if self._up_is_down(camera) else [1.0, -1.0, -1.0])
        extrinsics = np.eye(4)
        extrinsics[:3, :3] = axes @ rotation.T
        extrinsics[:3, 3] = -extrinsics[:3, :3] @ data.cam_xpos[cam]
        n = self.image_size
        focal = 0.5 * n / np.tan(np.deg2rad(model.cam_fovy[cam]) / 2)  # vertical field of view
        intrinsics = np.array([[focal, 0, n / 2 - 0.5], [0, focal, n / 2 - 0.5], [0, 0, 1]])
        return CameraModel(intrinsics, extrinsics, n)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        if self._env is not None:
            self._env.close()
            self._env = None

    def _up_is_down(self, camera: str) -> bool:
        """Whether `camera`'s image "up" axis points down in the world (then it is turned)."""
        if camera not in CAMERAS:
            raise ValueError(f"camera must be one of {CAMERAS}, got {camera!r}")
        cam = mujoco.mj_name2id(self._env.model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        return bool(self._env.data.cam_xmat[cam].reshape(3, 3)[2, 1] < 0)

    def _observation(self, render: bool = True) -> dict:
        return {"image": self.render() if render else None,
                "state": np.asarray(self.raw_observation[:4], np.float32)}

    def _info(self, *, success: bool, clipped: bool) -> dict:
        return {"success": success, "action_clipped": clipped, "task": self.task,
                "seed": self.seed_value, "camera": self.camera, "steps": self._steps}
