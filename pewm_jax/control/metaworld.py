"""Meta-World behind the controller's environment interface (`ControlEnv`).

One episode is a task seen from one camera on one of the benchmark's seeded variations
(`EpisodeSpec`). Its truth for each link of the evaluation chain (DESIGN.md "Evaluation chain"):

- the world's decomposition of the task (`world_command`) is the oracle plan: the expert
  demonstration of that seed, segmented into primitives as the training data was, with the
  tool-centre point at each segment's first and last frame projected into the camera;
- the scripted expert of any words is the benchmark's task policy (`metaworld.policies`): it
  knows no primitives, so it runs the whole task from wherever the world is;
- its future is simulated on a shadow env of the same task and seed put in the live env's exact
  state (`MetaWorldEnv.continue_from`), so replaying it reproduces the expert exactly.

Meta-World checks only the whole task: primitives have no success check (`has_checks` False)
and a frame cannot say whether a goal was reached.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from metaworld.policies import ENV_POLICY_MAP

from pewm_jax.control.controller import ControlEnv, Rollout
from pewm_jax.control.policy import PrimitiveCommand
from pewm_jax.metaworld.env import ACTION_DIM, GRIPPER_DIMS, MAX_EPISODE_STEPS, MetaWorldEnv
from pewm_jax.metaworld.experts import run_expert, task_words


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
    """One protocol episode: task, camera and the benchmark's seed."""

    task: str
    camera: str
    seed: int


def oracle_plan(spec: EpisodeSpec, image_size: int,
                min_segment_steps: int) -> list[PrimitiveCommand]:
    """The expert's primitives on this seed (segmented as the training data was), with its
    tool-centre points in this camera."""
    demo = run_expert(spec.task, spec.seed, cameras=(spec.camera,), image_size=image_size,
                      min_segment_steps=min_segment_steps)
    xy = demo.tcp_xy[spec.camera]  # (T+1, 2) pixels
    return [PrimitiveCommand(s.text, tuple(map(float, xy[s.start])), tuple(map(float, xy[s.end])))
            for s in demo.segments]


def _policy_action(policy: Any, env: MetaWorldEnv) -> np.ndarray:
    """(4,) float32 the task policy's next action in `env`, clipped as `step` applies it."""
    action = policy.get_action(env.raw_observation.copy())  # it edits its input
    return np.clip(action, -1.0, 1.0).astype(np.float32)


class MetaWorldControlEnv(ControlEnv):
    """One Meta-World (task, camera) episode at a time for the controller (module docstring)."""

    has_checks = False
    reads_gripper = False
    action_dim = ACTION_DIM
    gripper_dims = tuple(GRIPPER_DIMS)
    scripted_steps = MAX_EPISODE_STEPS

    def __init__(self, image_size: int, *, min_segment_steps: int = 4):
        """`min_segment_steps`: how the oracle plan's demonstration is cut (the data's
        config.metaworld.min_segment_steps)."""
        self.image_size, self.min_segment_steps = image_size, min_segment_steps
        self.env: MetaWorldEnv | None = None
        self._shadow: MetaWorldEnv | None = None  # the copy rollouts run on, made on first use
        self._plan: list[PrimitiveCommand] | None = None

    def reset(self, spec: EpisodeSpec) -> None:
        self.close()
        self.spec = spec
        self.env = MetaWorldEnv(spec.task, camera=spec.camera, image_size=self.image_size)
        self.image = self.env.reset(seed=spec.seed)[0]["image"]
        self._camera = self.env.camera_model()  # fixed cameras: one pose per episode
        self._policy = ENV_POLICY_MAP[f"{spec.task}-v3"]()  # stateless: reads the observation
        self._effort = -1.0  # the last gripper effort applied (open before any)
        self._plan = None

    def step(self, action: np.ndarray) -> str | None:
        obs, _, terminated, truncated, _ = self.env.step(action)
        self.image = obs["image"]
        self._effort = float(np.clip(action[GRIPPER_DIMS[0]], -1.0, 1.0))
        return "success" if terminated else "out_of_steps" if truncated else None

    @property
    def task_text(self) -> str:
        return task_words(self.spec.task).instruction

    @property
    def oracle_plan(self) -> list[PrimitiveCommand]:
        """The episode's oracle plan (module docstring), computed once: it runs the expert."""
        if self._plan is None:
            self._plan = oracle_plan(self.spec, self.image_size, self.min_segment_steps)
        return self._plan

    @property
    def task_length(self) -> int:
        return len(self.oracle_plan)

    def world_command(self, index: int, fresh: bool) -> PrimitiveCommand | None:
        plan = self.oracle_plan  # the demonstration's points, whatever `fresh` asks
        return plan[index] if index < len(plan) else None

    def expert(self, command: PrimitiveCommand) -> Any:
        return self._policy

    def expert_action(self, expert: Any) -> np.ndarray:
        return _policy_action(expert, self.env)

    def hold_action(self) -> np.ndarray:
        hold = np.zeros(ACTION_DIM, np.float32)
        hold[GRIPPER_DIMS] = self._effort
        return hold

    def rollout(self, expert: Any, steps: int, render: bool) -> Rollout:
        if self._shadow is None:
            self._shadow = MetaWorldEnv(self.spec.task, camera=self.spec.camera,
                                        image_size=self.image_size)
            self._shadow.reset(seed=self.spec.seed)
        shadow = self._shadow
        shadow.continue_from(self.env)
        frames, actions = [self.image], []
        for _ in range(steps):
            action = _policy_action(expert, shadow)
            obs, _, success, truncated, _ = shadow.step(action, render=render)
            actions.append(action)
            if render:
                frames.append(obs["image"])
            if success or truncated:  # the copy's episode is over: so would the live one be
                break
        return Rollout(np.stack(frames), np.asarray(actions, np.float32).reshape(-1, ACTION_DIM),
                       [expert] * (len(actions) + 1))

    def succeeded(self, expert: Any) -> None:
        return None

    def gripper_xy(self) -> tuple[float, float]:
        x, y = self._camera.project(self.env.tcp)
        return float(x), float(y)

    def gripper_in(self, frame: np.ndarray) -> None:
        return None

    def primitive_kind(self, text: str) -> None:
        return None

    def summary(self) -> dict[str, Any]:
        return {"template": self.spec.task, "task": self.task_text, "split": self.spec.camera,
                "chain_length": 0}

    def close(self) -> None:
        for env in (self.env, self._shadow):
            if env is not None:
                env.close()
        self.env = self._shadow = None
