"""The closed-loop controller: plan -> imagine a primitive clip -> decode actions -> act -> replan.

Many environments run in lockstep, one primitive per round, so every model call is one batch:

    observations ─► planner ─► next primitive per env (words + start/goal points)
                 ─► executor ─► environment steps ─► new observations ─► (closed loop) replan

Choices (`ControlSettings`), each isolating one part of the system:
- planner   'vlm': the fine-tuned PaliGemma planner; 'world': the world's own task
            decomposition (the task's primitives, planned from the true state: no planner error);
            'task': the task's words as one command without points, run once (the input of the
            non-primitive whole-task baseline, whose one clip covers the whole task).
- executor  'decoded': the world model imagines the primitive's clip and the action decoder reads
            its actions, each executed as `frame_stride` environment steps (DESIGN.md "Clip");
            'scripted': the world's scripted expert for the named primitive (no world-model error).
- loop      'closed': replan from every new observation; 'open': plan once, from the first one.
- sgg       False drops the start/goal heatmaps when sampling (the text-only ablation).

Which primitive runs next: the world planner keeps a pointer into the task that moves on when
the primitive's own check holds (a failed primitive is retried). A VLM planner trained on
mid-task examples (`Planner.plans_remaining`) lists the primitives left, so the controller runs
its first one; otherwise it plans the whole task from every frame and the controller runs the
step at its position (primitives executed so far). An episode ends when the task succeeds, the
environment's step budget runs out, the plan has no step left, or `len(task) + max_replans`
primitives have run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from pewm_jax.control.policy import PrimitiveCommand, PrimitivePolicy
from pewm_jax.sim import TabletopEnv
from pewm_jax.sim.primitives import Expert, Infeasible, Primitive, primitive_from_text
from pewm_jax.sim.render import gripper_at
from pewm_jax.vlm.planner import Planner

PLANNERS = ("vlm", "world", "task")
EXECUTORS = ("decoded", "scripted")
LOOPS = ("closed", "open")


@dataclasses.dataclass(frozen=True)
class ControlSettings:
    """How the controller plans and acts (module docstring)."""

    planner: str = "vlm"
    executor: str = "decoded"
    loop: str = "closed"
    sgg: bool = True
    max_replans: int = 2  # primitives it may run beyond the task's length (retries)

    def __post_init__(self):
        for name, known in (("planner", PLANNERS), ("executor", EXECUTORS), ("loop", LOOPS)):
            if getattr(self, name) not in known:
                raise ValueError(f"control {name} must be one of {known}, got "
                                 f"{getattr(self, name)!r}")
        if self.max_replans < 0:
            raise ValueError(f"max_replans must be >= 0, got {self.max_replans}")


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
    """Which episode to run: the world seed, task split and (optional) template."""

    seed: int
    split: str = "train"
    template: str | None = None


@dataclasses.dataclass
class PrimitiveRecord:
    """One primitive the controller ran."""

    text: str
    kind: str | None  # the world primitive its words name ('task' for the whole task as one
    # command; None: they name no primitive)
    start_xy: tuple[float, float]  # commanded points, pixels of the observation
    goal_xy: tuple[float, float]
    success: bool  # the named primitive's own check after it ran (False when infeasible)
    env_steps: int
    goal_reached: bool | None  # decoded: the imagined clip's last frame shows the gripper
    # within goal_reach_px of the goal point; None for the scripted executor


@dataclasses.dataclass
class EpisodeResult:
    """One controlled episode."""

    spec: EpisodeSpec
    template: str
    task: str
    task_length: int  # primitives in the task
    success: bool
    chain_length: int  # leading primitives of the task whose goals were reached, in order
    end: str  # 'success', 'out_of_steps', 'plan_done', 'budget'
    env_steps: int
    primitives: list[PrimitiveRecord]
    frames: list[np.ndarray]  # recorded episodes: (N, 2N, 3) uint8 [observation | imagined]


@dataclasses.dataclass
class Latency:
    """Seconds of each part of the control loop, one entry per batched call, with its rows."""

    planner: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    generation: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    action_decoding: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    env: list[tuple[float, int]] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per part: mean seconds per batched call, per primitive step (call time / rows), and
        the number of calls; the first call of each part (compilation) is left out when there
        are more."""
        out = {}
        for part in ("planner", "generation", "action_decoding", "env"):
            calls = getattr(self, part)
            timed = calls[1:] if len(calls) > 1 else calls
            if not timed:
                continue
            seconds = np.array([s for s, _ in timed])
            rows = np.array([r for _, r in timed])
            out[part] = {"seconds_per_call": float(seconds.mean()),
                         "seconds_per_primitive": float((seconds / rows).mean()),
                         "calls": len(calls)}
        return out


class _Slot:
    """The controller's bookkeeping for one environment's current episode."""

    def __init__(self, env: TabletopEnv, spec: EpisodeSpec, record: bool):
        self.env, self.spec, self.record = env, spec, record
        options = {"split": spec.split} | ({"template": spec.template} if spec.template else {})
        obs, self.info = env.reset(seed=spec.seed, options=options)
        self.image = obs["image"]
        self.frames: list[np.ndarray] = [np.concatenate(
            [self.image, np.zeros_like(self.image)], 1)] if record else []
        self.executed = 0  # primitives run so far
        self.pointer = 0  # world planner: the task's next primitive
        self.plan: list[PrimitiveCommand] | None = None  # open loop: the plan made first
        self.primitives: list[PrimitiveRecord] = []
        self.env_steps = 0
        self.end: str | None = None

    def result(self) -> EpisodeResult:
        reached = self.info["primitives_reached"]
        chain = next((k for k, r in enumerate(reached) if not r), len(reached))
        task = self.env.task
        return EpisodeResult(self.spec, task.template, task.text, len(task.primitives),
                             self.end == "success", chain, self.end, self.env_steps,
                             self.primitives, self.frames)


class Controller:
    """Runs episodes with a planner and an executor (module docstring)."""

    def __init__(self, settings: ControlSettings, *, image_size: int, max_delta: float,
                 primitive_max_steps: int, frame_stride: int,
                 policy: PrimitivePolicy | None = None, planner: Planner | None = None,
                 num_objects: tuple[int, int] = (3, 5), goal_reach_px: float = 4.0):
        """`policy` is needed by the decoded executor, `planner` by the VLM planner; the
        environments are built from the world settings given here (those the models saw)."""
        if settings.executor == "decoded" and policy is None:
            raise ValueError("the decoded executor needs a PrimitivePolicy (world model and "
                             "action decoder)")
        if settings.planner == "vlm" and planner is None:
            raise ValueError("the 'vlm' planner needs a Planner; use planner='world' for the "
                             "world's own task decomposition")
        if policy is not None and policy.image_size != image_size:
            raise ValueError(f"the policy's models see {policy.image_size}-pixel frames but the "
                             f"environment renders {image_size}")
        self.settings, self.policy, self.planner = settings, policy, planner
        self.image_size, self.frame_stride = image_size, frame_stride
        self.goal_reach_px = goal_reach_px
        self._env_args = (image_size, num_objects, max_delta, primitive_max_steps)
        self.latency = Latency()
        self._round = 0

    def run(self, specs: Sequence[EpisodeSpec], *, parallel: int,
            record: int = 0) -> list[EpisodeResult]:
        """Runs every episode of `specs`, `parallel` environments at a time (at most the
        policy's batch size); the first `record` episodes keep their frames for videos."""
        if self.policy is not None and parallel > self.policy.batch_size:
            raise ValueError(f"parallel={parallel} exceeds the policy's batch size "
                             f"{self.policy.batch_size}")
        envs = [TabletopEnv(*self._env_args) for _ in range(min(parallel, len(specs)))]
        self._batch = len(envs)
        results = []
        for first in range(0, len(specs), parallel):
            chunk = specs[first:first + parallel]
            slots = [_Slot(env, spec, first + i < record)
                     for i, (env, spec) in enumerate(zip(envs, chunk))]
            while active := [s for s in slots if s.end is None]:
                self._round_of(active)
            results += [s.result() for s in slots]
        return results

    def _round_of(self, slots: list[_Slot]) -> None:
        """Plans and runs one primitive in each of `slots` (all still running)."""
        commands = self._commands(slots)
        running = [(s, c) for s, c in zip(slots, commands) if c is not None]
        if not running:
            return
        if self.settings.executor == "decoded":
            self._run_decoded(running)
        else:
            self._run_scripted(running)
        self._round += 1
        for slot, _ in running:
            slot.executed += 1
            if slot.end is None and slot.executed >= (len(slot.env.task.primitives)
                                                      + self.settings.max_replans):
                slot.end = "budget"

    def _commands(self, slots: list[_Slot]) -> list[PrimitiveCommand | None]:
        """The next command of each slot; None (with the slot ended) when its plan is done."""
        if self.settings.planner == "world":
            return [self._world_command(s) for s in slots]
        if self.settings.planner == "task":
            return [self._task_command(s) for s in slots]
        closed = self.settings.loop == "closed"
        need = [s for s in slots if closed or s.plan is None]
        if need:
            # Padded to the parallel batch, so the planner's decoder compiles once.
            rows = need + [need[0]] * (self._batch - len(need))
            start = time.perf_counter()
            plans = self.planner.plan(np.stack([s.image for s in rows]),
                                      [s.env.task.text for s in rows])
            self.latency.planner.append((time.perf_counter() - start, len(need)))
            scale = self.image_size / self.planner.image_size
            for slot, plan in zip(need, plans):
                slot.plan = [PrimitiveCommand.from_plan_step(step, scale) for step in plan.steps]
        out = []
        for slot in slots:
            index = 0 if closed and self.planner.plans_remaining else slot.executed
            if index >= len(slot.plan):
                slot.end = "plan_done"
                out.append(None)
            else:
                out.append(slot.plan[index])
        return out

    def _task_command(self, slot: _Slot) -> PrimitiveCommand | None:
        """The whole task's words, once (no start/goal points)."""
        if slot.executed:
            slot.end = "plan_done"
            return None
        return PrimitiveCommand(slot.env.task.text, (0.0, 0.0), (0.0, 0.0))

    def _world_command(self, slot: _Slot) -> PrimitiveCommand | None:
        """The world's decomposition: the task's next primitive, planned from the true state
        (closed loop) or as the expert planned it before the episode (open loop)."""
        task = slot.env.task
        if self.settings.loop == "open":
            if slot.executed >= len(task.primitives):
                slot.end = "plan_done"
                return None
            primitive, plan = task.primitives[slot.executed], slot.env.setup.plans[slot.executed]
        else:
            if slot.pointer >= len(task.primitives):
                slot.end = "plan_done"
                return None
            primitive = task.primitives[slot.pointer]
            try:
                plan = primitive.plan(slot.env.state)
            except Infeasible:  # e.g. still holding another object: try the expert's points
                plan = slot.env.setup.plans[slot.pointer]
        n = self.image_size
        return PrimitiveCommand(primitive.text(), _scaled(plan.start, n), _scaled(plan.goal, n))

    def _check(self, slot: _Slot, command: PrimitiveCommand):
        """(the named primitive or None, its plan from the current state or None)."""
        try:
            primitive = primitive_from_text(command.text)
        except ValueError:
            return None, None
        try:
            return primitive, primitive.plan(slot.env.state)
        except Infeasible:
            return primitive, None

    def _step_env(self, slot: _Slot, action: np.ndarray, imagined: np.ndarray | None) -> bool:
        """One environment step; False once the episode is over."""
        obs, _, terminated, truncated, slot.info = slot.env.step(action)
        slot.image = obs["image"]
        slot.env_steps += 1
        if slot.record:
            slot.frames.append(np.concatenate(
                [slot.image, np.zeros_like(slot.image) if imagined is None else imagined], 1))
        if terminated:
            slot.end = "success"
        elif truncated:
            slot.end = "out_of_steps"
        return slot.end is None

    def _finish(self, slot: _Slot, command: PrimitiveCommand, primitive: Primitive | None,
                plan, steps: int, goal_reached: bool | None) -> None:
        kind = None if primitive is None else primitive.kind
        success = plan is not None and bool(plan.success(slot.env.state))
        if self.settings.planner == "world" and success:
            slot.pointer += 1
        if self.settings.planner == "task":  # one command for the task: judged as the task
            kind, success, goal_reached = "task", slot.end == "success", None
        slot.primitives.append(PrimitiveRecord(command.text, kind, command.start_xy,
                                               command.goal_xy, success, steps, goal_reached))

    def _run_decoded(self, running: list[tuple[_Slot, PrimitiveCommand]]) -> None:
        """Imagines every slot's primitive in one batch and plays the decoded actions."""
        slots = [s for s, _ in running]
        out = self.policy.step(np.stack([s.image for s in slots]), [c for _, c in running],
                               step_index=self._round, use_sgg=self.settings.sgg)
        self.latency.generation.append((out.generate_s, len(slots)))
        self.latency.action_decoding.append((out.decode_s, len(slots)))
        start = time.perf_counter()
        for i, (slot, command) in enumerate(running):
            primitive, plan = self._check(slot, command)
            reached = gripper_at(out.clips[i, -1], command.goal_xy, self.goal_reach_px)
            steps = 0
            # A label covers frame_stride environment steps (DESIGN.md "Clip").
            for j, action in enumerate(self.policy.stats.step_actions(out.actions[i],
                                                                      self.frame_stride)):
                alive = True
                for _ in range(self.frame_stride):
                    steps += 1
                    if not (alive := self._step_env(slot, action, out.clips[i, j])):
                        break
                if not alive:
                    break
            self._finish(slot, command, primitive, plan, steps, reached)
        self.latency.env.append((time.perf_counter() - start, len(slots)))

    def _run_scripted(self, running: list[tuple[_Slot, PrimitiveCommand]]) -> None:
        """Runs the world's scripted expert of each slot's named primitive."""
        start = time.perf_counter()
        max_steps = self._env_args[3]
        for slot, command in running:
            primitive, plan = self._check(slot, command)
            steps = 0
            if plan is not None:
                expert = Expert(plan, slot.env.max_delta)
                while not expert.done and steps < max_steps:
                    steps += 1
                    if not self._step_env(slot, expert.act(slot.env.state).astype(np.float32),
                                          None):
                        break
            self._finish(slot, command, primitive, plan, steps, None)
        self.latency.env.append((time.perf_counter() - start, len(running)))


def _scaled(xy, scale: float) -> tuple[float, float]:
    return float(xy[0]) * scale, float(xy[1]) * scale
