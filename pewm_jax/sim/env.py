"""Gymnasium interface to the tabletop world, registered as `pewm/Tabletop-v0`.

    env = gymnasium.make("pewm_jax.sim:pewm/Tabletop-v0", image_size=64)
    obs, info = env.reset(seed=3, options={"split": "train"})
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())

Observation: {"image": (N, N, 3) uint8 top-down RGB, "state": (3,) float32 gripper x, y in
workspace units [0, 1] and 1.0 when closed}. Action: (3,) float32 `(dx, dy, grip)` with
`|dx|, |dy| <= max_delta` and `grip` in [-1, 1] (`> 0` closes); out-of-bound actions are
clipped and `info["action_clipped"]` says so; a NaN or wrongly shaped action raises
`ActionError`. Reward is 1.0 on the step the task succeeds, which terminates the episode; it is
truncated after `primitive_max_steps` per primitive of the task and per `spare_primitives`
(room for a controller to retry failed primitives). `info["primitives_reached"]`
says, per primitive of the task, whether its goal has held at some step so far.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np

from pewm_jax.sim import render as render_lib
from pewm_jax.sim import tasks as tasks_lib
from pewm_jax.sim.world import WorldState, clip_action, step_state, validate_action


class TabletopEnv(gymnasium.Env):
    """The built-in tabletop world with one long-horizon task per episode."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, image_size: int = 64, num_objects: tuple[int, int] = (3, 5),
                 max_delta: float = 0.08, primitive_max_steps: int = 32,
                 render_mode: str | None = "rgb_array", spare_primitives: int = 0):
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
        if spare_primitives < 0:
            raise ValueError(f"spare_primitives must be >= 0, got {spare_primitives}")
        self.spare_primitives = int(spare_primitives)
        self.image_size = image_size
        self.num_objects = (int(num_objects[0]), int(num_objects[1]))
        self.max_delta = float(max_delta)
        self.primitive_max_steps = int(primitive_max_steps)
        self.render_mode = render_mode
        self.action_space = gymnasium.spaces.Box(
            low=np.array([-max_delta, -max_delta, -1.0], np.float32),
            high=np.array([max_delta, max_delta, 1.0], np.float32), dtype=np.float32)
        self.observation_space = gymnasium.spaces.Dict({
            "image": gymnasium.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8),
            "state": gymnasium.spaces.Box(0.0, 1.0, (3,), np.float32)})
        self.state: WorldState | None = None
        self.task: tasks_lib.Task | None = None
        self.setup: tasks_lib.EpisodeSetup | None = None
        self._progress: tasks_lib.TaskProgress | None = None
        self._steps = 0

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        """Draws a scene and task from `seed` (options: `split`, `template`)."""
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - {"split", "template"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; known: ['split', 'template']")
        if seed is None:
            seed = int(self.np_random.integers(2**31))
        self.setup = tasks_lib.sample_episode_setup(
            seed, num_objects=self.num_objects, max_delta=self.max_delta,
            primitive_max_steps=self.primitive_max_steps, split=options.get("split", "train"),
            template_name=options.get("template"))
        self.state = self.setup.state.copy()
        self.task = self.setup.task
        self._progress = tasks_lib.TaskProgress(self.task, self.setup.plans)
        self._steps = 0
        return self._observation(), self._info(success=False, clipped=False)

    def step(self, action) -> tuple[dict, float, bool, bool, dict]:
        """Applies one action (module docstring); returns obs, reward, terminated, truncated, info."""
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        action, clipped = clip_action(validate_action(action), self.max_delta)
        step_state(self.state, action)
        self._steps += 1
        success = self._progress.update(self.state)
        truncated = (not success) and self._steps >= self.max_episode_steps
        return (self._observation(), float(success), success, truncated,
                self._info(success=success, clipped=clipped))

    @property
    def max_episode_steps(self) -> int:
        return self.primitive_max_steps * (len(self.task.primitives) + self.spare_primitives)

    def render(self) -> np.ndarray:
        return render_lib.render(self.state, self.image_size)

    def _observation(self) -> dict:
        s = self.state
        return {"image": render_lib.render(s, self.image_size),
                "state": np.array([s.gripper[0], s.gripper[1], float(s.closed)], np.float32)}

    def _info(self, *, success: bool, clipped: bool) -> dict:
        return {"success": success, "action_clipped": clipped, "task": self.task.text,
                "template": self.task.template, "split": self.task.split(),
                "rejected_scenes": self.setup.rejected,
                "primitives_reached": tuple(self._progress.reached)}
