"""The built-in tabletop world behind the controller's environment interface (`ControlEnv`).

Its truth for each link of the evaluation chain: the task's own decomposition (each primitive
planned from the true state), the scripted `Expert` of any primitive the words name, that
expert's future simulated on a copy of the world state (rendered at the observation's size),
and every primitive's own success check.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np

from pewm_jax.control.controller import ControlEnv, Rollout
from pewm_jax.control.policy import PrimitiveCommand
from pewm_jax.sim import TabletopEnv
from pewm_jax.sim.primitives import Expert, Infeasible, primitive_from_text
from pewm_jax.sim import render as render_lib
from pewm_jax.sim.world import clip_action, step_state, validate_action


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
    """Which episode to run: the world seed, task split and (optional) template."""

    seed: int
    split: str = "train"
    template: str | None = None


class TabletopControlEnv(ControlEnv):
    """One built-in world environment for the controller (module docstring)."""

    has_checks = True
    reads_gripper = True
    action_dim = 3
    gripper_dims = (2,)

    def __init__(self, image_size: int, num_objects: tuple[int, int] = (3, 5),
                 max_delta: float = 0.08, primitive_max_steps: int = 32,
                 spare_primitives: int = 0):
        """`spare_primitives`: the episode's step budget holds this many primitives beyond the
        task's (`TabletopEnv`), so that failed ones can be tried again."""
        self.env = TabletopEnv(image_size, num_objects, max_delta, primitive_max_steps,
                               spare_primitives=spare_primitives)
        self.scripted_steps = primitive_max_steps
        self.image_size = image_size

    def reset(self, spec: EpisodeSpec) -> None:
        options = {"split": spec.split} | ({"template": spec.template} if spec.template else {})
        obs, self.info = self.env.reset(seed=spec.seed, options=options)
        self.image = obs["image"]

    def step(self, action: np.ndarray) -> str | None:
        obs, _, terminated, truncated, self.info = self.env.step(action)
        self.image = obs["image"]
        return "success" if terminated else "out_of_steps" if truncated else None

    @property
    def task_text(self) -> str:
        return self.env.task.text

    @property
    def task_length(self) -> int:
        return len(self.env.task.primitives)

    def world_command(self, index: int, fresh: bool) -> PrimitiveCommand | None:
        task = self.env.task
        if index >= len(task.primitives):
            return None
        primitive, plan = task.primitives[index], self.env.setup.plans[index]
        if fresh:
            try:
                plan = primitive.plan(self.env.state)
            except Infeasible:  # e.g. still holding another object: the expert's points
                pass
        n = self.image_size
        return PrimitiveCommand(primitive.text(), (float(plan.start[0] * n), float(plan.start[1] * n)),
                                (float(plan.goal[0] * n), float(plan.goal[1] * n)))

    def expert(self, command: PrimitiveCommand) -> Expert | None:
        try:
            plan = primitive_from_text(command.text).plan(self.env.state)
        except (ValueError, Infeasible):
            return None
        return Expert(plan, self.env.max_delta)

    def expert_action(self, expert: Expert) -> np.ndarray | None:
        return None if expert.done else expert.act(self.env.state).astype(np.float32)

    def hold_action(self) -> np.ndarray:
        return np.array([0.0, 0.0, 1.0 if self.env.state.closed else -1.0], np.float32)

    def rollout(self, expert: Expert, steps: int, render: bool) -> Rollout:
        state, expert = self.env.state.copy(), copy.deepcopy(expert)
        frames, actions, experts = [self.image], [], [copy.deepcopy(expert)]
        for _ in range(steps):
            if expert.done:
                break
            action = expert.act(state).astype(np.float32)  # as the live world receives it
            step_state(state, clip_action(validate_action(action), self.env.max_delta)[0])
            actions.append(action)
            experts.append(copy.deepcopy(expert))
            if render:
                frames.append(render_lib.render(state, self.image_size))
        return Rollout(np.stack(frames), np.asarray(actions, np.float32).reshape(-1, 3), experts)

    def succeeded(self, expert: Expert) -> bool:
        return bool(expert.plan.success(self.env.state))

    def outcome(self, expert: Expert) -> dict[str, float]:
        """Every kind: the gripper's distance from the plan's goal point (px; a pick that closed
        beside its object ends that far off). A place also: the object's distance from the
        spot it was to be set down on (px; far: dropped on the way or never carried) and
        whether it is still held (1) or let go (0). A push: the object's distance from its
        target (px), its part along the push (negative: short of it) and its part to the side."""
        plan, state = expert.plan, self.env.state
        out = {"gripper_error_px": float(np.hypot(*(state.gripper - plan.goal))
                                         * self.image_size)}
        if plan.primitive.kind == "place":
            miss = np.hypot(*(state.positions[plan.obj_index] - plan.goal)) * self.image_size
            return {**out, "object_error_px": float(miss),
                    "still_held": float(state.held == plan.obj_index)}
        if plan.primitive.kind != "push":
            return out
        miss = (state.positions[plan.obj_index] - plan.target) * self.image_size
        along = plan.direction
        return {**out, "object_error_px": float(np.hypot(*miss)),
                "object_error_along_px": float(miss @ along),
                "object_error_side_px": float(abs(miss[0] * along[1] - miss[1] * along[0]))}

    def gripper_xy(self) -> tuple[float, float]:
        x, y = self.env.state.gripper * self.image_size
        return float(x), float(y)

    def gripper_in(self, frame: np.ndarray) -> tuple[float, float] | None:
        found = render_lib.locate_gripper(frame)
        return None if found is None else (float(found[0]), float(found[1]))

    def primitive_kind(self, text: str) -> str | None:
        try:
            return primitive_from_text(text).kind
        except ValueError:
            return None

    def summary(self) -> dict[str, Any]:
        reached = self.info["primitives_reached"]
        task = self.env.task
        return {"template": task.template, "task": task.text, "split": task.split(),
                "chain_length": next((k for k, r in enumerate(reached) if not r), len(reached)),
                "kinds": tuple(p.kind for p in task.primitives)}
