"""The closed-loop controller: plan -> imagine a primitive clip -> decode actions -> act -> replan.

One controller for every world: it drives environments through `ControlEnv`, which the
built-in world (`pewm_jax.control.tabletop.TabletopControlEnv`) and Meta-World
(`pewm_jax.control.metaworld.MetaWorldControlEnv`) each implement. Many environments run
in lockstep, one round at a time, so every model call is one batch:

    observations ─► planner ─► next primitive per env (words + start/goal points)
                 ─► executor ─► per-step actions ─► environment steps ─► new observations

Choices (`ControlSettings`), each feeding one link of the chain with truth (DESIGN.md
"Evaluation chain"):
- planner   'vlm': the fine-tuned PaliGemma planner; 'world': the world's own task
            decomposition (no planner error); 'task': the task's words as one command without
            points (the whole-task baseline's input, and Meta-World's scripted expert).
- executor  'scripted': the world's scripted expert runs the named primitive to its end;
            'replay': the expert's own per-step actions for the primitive (simulated on a copy
            of the world), cut into the clip form and played as the decoded ones are: isolates
            the clip contract and the executor;
            'true_video': the expert's true future frames from the current state (same copy,
            rendered at the model's frame size) through the action decoder: isolates the
            decoder;
            'decoded': the world model imagines the clip and the action decoder reads it.
- loop      'closed': replan from every new observation; 'open': plan once, from the first one.
- sgg       False drops the start/goal heatmaps when sampling (the text-only ablation).
- gripper   'decoded': the decoder's gripper commands; 'expert': the gripper dimensions of the
            expert's own actions for the primitive (its future from the round's state on a copy
            of the world, as replay plays them) with the decoded motion: isolates the decoder's
            gripper commands from the motion it reads off the clip.
- execute_frames  k <= H: play the first k frames' actions (k * frame_stride steps) of a clip,
            then observe and imagine again, with the same words and goal (receding horizon
            within a primitive); None plays all H.
- track     True: the decoder reads each frame interval from the live observation, not the
            clip's previous frame (closed-loop tracking of the clip: the gripper's error stays
            one interval's decoding error instead of adding up over the clip). The rest of its
            input is as in training: the whole clip after the observation it was imagined
            from, with only the interval's first frame swapped for the live one. False decodes
            the whole clip once, open loop, from its own frames.

Rounds and attempts: a round plans (as the loop asks), makes one clip per environment and
plays it. An attempt is one primitive's rounds: it ends when it has played a whole clip's
worth of frames (H: one round, or H / k rounds of receding horizon), or for the scripted
executor after one round; then the primitive's own check says whether it succeeded. Which
primitive comes next: the world planner keeps a pointer into the task that moves on when the
primitive's check holds (a failed primitive is retried, or the one before it when the failure
undid what that one set up: `Controller._world_command`) or, in a world without
per-primitive checks (Meta-World), after every attempt; a VLM planner trained on mid-task
examples (`Planner.plans_remaining`) lists the primitives left, so the controller runs its
first one, else the step at the attempt's position. When a plan runs out without success the
controller plans afresh, up to `max_replans` times; a world with checks instead retries failed
primitives, up to `len(task) + max_replans` attempts. An episode ends on success, when the
environment's step budget runs out, or when its attempts or plans are used up.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from data_loaders.clips import frame_indices, step_actions
from pewm_jax.control.policy import PrimitiveCommand, PrimitivePolicy
from pewm_jax.vlm.planner import Planner

PLANNERS = ("vlm", "world", "task")
EXECUTORS = ("decoded", "true_video", "replay", "scripted")
LOOPS = ("closed", "open")
GRIPPERS = ("decoded", "expert")


@dataclasses.dataclass(frozen=True)
class ControlSettings:
    """How the controller plans and acts (module docstring)."""

    planner: str = "vlm"
    executor: str = "decoded"
    loop: str = "closed"
    sgg: bool = True
    gripper: str = "decoded"  # where the gripper commands come from (module docstring)
    max_replans: int = 2
    execute_frames: int | None = None  # k <= H frames played per clip; None: all H
    track: bool = True  # decode each interval from the live observation (module docstring)

    def __post_init__(self):
        for name, known in (("planner", PLANNERS), ("executor", EXECUTORS), ("loop", LOOPS),
                            ("gripper", GRIPPERS)):
            if getattr(self, name) not in known:
                raise ValueError(f"control {name} must be one of {known}, got "
                                 f"{getattr(self, name)!r}")
        if self.gripper == "expert" and not self.uses_decoder:
            raise ValueError(f"gripper='expert' replaces decoded gripper commands; the "
                             f"{self.executor!r} executor decodes none")
        if self.max_replans < 0:
            raise ValueError(f"max_replans must be >= 0, got {self.max_replans}")
        if self.execute_frames is not None and self.execute_frames < 1:
            raise ValueError(f"execute_frames must be >= 1 (or None for all), got "
                             f"{self.execute_frames}")

    @property
    def uses_decoder(self) -> bool:
        return self.executor in ("decoded", "true_video")


@dataclasses.dataclass(frozen=True)
class Rollout:
    """The scripted expert's future from the current state, simulated on a copy of the world."""

    frames: np.ndarray  # (n + 1, N, N, 3) uint8: the current observation, then after each step
    actions: np.ndarray  # (n, A) float32
    experts: list[Any]  # (n + 1) the expert as it stands after each step (to continue it)


class ControlEnv(abc.ABC):
    """One world the controller drives: an episode's observation, stepping and task, and the
    truth each link of the chain can be fed with (the world's decomposition, the scripted
    expert of a named primitive, its future simulated on a copy)."""

    image: np.ndarray  # (N, N, 3) uint8: the current observation
    scripted_steps: int  # environment steps a scripted primitive may take
    has_checks: bool  # the world checks each primitive's success (the built-in world does)
    reads_gripper: bool  # the world finds the gripper in a frame (`gripper_in`; the built-in
    # world does): imagined clips get goal reach and follow scores
    action_dim: int
    gripper_dims: Sequence[int]  # action dimensions that are gripper commands

    @abc.abstractmethod
    def reset(self, spec: Any) -> None:
        """Starts the episode of `spec` (the world's own episode description)."""

    @abc.abstractmethod
    def step(self, action: np.ndarray) -> str | None:
        """Applies one action and updates `image`; 'success' or 'out_of_steps' when the
        episode ends with it, else None."""

    @property
    @abc.abstractmethod
    def task_text(self) -> str:
        """The task's words (what the planner is asked)."""

    @abc.abstractmethod
    def world_command(self, index: int, fresh: bool) -> PrimitiveCommand | None:
        """Primitive `index` of the world's decomposition of the task, with its points planned
        from the current state (`fresh`) or as planned at reset; None past its end."""

    @abc.abstractmethod
    def expert(self, command: PrimitiveCommand) -> Any | None:
        """The scripted expert of the primitive the words name, from the current state; None
        when they name none or it cannot run from here."""

    @abc.abstractmethod
    def expert_action(self, expert: Any) -> np.ndarray | None:
        """The expert's next action in the live world (advancing it); None once it is done."""

    @abc.abstractmethod
    def hold_action(self) -> np.ndarray:
        """The no-op: no motion, the gripper command that keeps its current state."""

    @abc.abstractmethod
    def rollout(self, expert: Any, steps: int, render: bool) -> Rollout:
        """The expert's next `steps` steps (fewer if it finishes) on a copy of the world, the
        live one untouched; frames rendered at the observation's size when `render`."""

    @abc.abstractmethod
    def succeeded(self, expert: Any) -> bool | None:
        """Whether the expert's primitive has achieved what its words say (its own check), or
        None in a world without per-primitive checks."""

    @property
    @abc.abstractmethod
    def task_length(self) -> int:
        """Primitives in the world's decomposition of the task."""

    @abc.abstractmethod
    def gripper_xy(self) -> tuple[float, float]:
        """The gripper's (x, y) pixels in the observation (the world's truth: where a world
        planner's continuing clip starts)."""

    @abc.abstractmethod
    def gripper_in(self, frame: np.ndarray) -> tuple[float, float] | None:
        """(x, y) pixels where an (imagined) frame shows the gripper; None where it shows none
        or the world cannot read frames (`reads_gripper` False)."""

    def goal_reached(self, frame: np.ndarray, goal_xy: tuple[float, float],
                     radius_px: float) -> bool | None:
        """Whether an (imagined) frame shows the gripper within radius_px of the goal; None
        where the world cannot read it from a frame."""
        if not self.reads_gripper:
            return None
        found = self.gripper_in(frame)
        return found is not None and _distance(found, goal_xy) <= radius_px

    @abc.abstractmethod
    def primitive_kind(self, text: str) -> str | None:
        """The kind of the world's primitive that the words name (per-primitive scores), or
        None."""

    @abc.abstractmethod
    def summary(self) -> dict[str, Any]:
        """What the episode's result reports of the world: template, task, split,
        chain_length (primitives of the decomposition reached in order) and, optionally, kinds
        (the primitive kinds of that decomposition)."""

    def outcome(self, expert: Any) -> dict[str, float]:
        """How far the expert's primitive ended from its aim, in the world's own measures (a
        pushed object's distance from its target, say), so a near miss reads apart from a wild
        one; {} where the world has none."""
        del expert
        return {}

    def close(self) -> None:
        """Releases what the environment holds (renderers)."""


@dataclasses.dataclass
class PrimitiveRecord:
    """One primitive attempt the controller ran."""

    text: str
    kind: str | None  # the world primitive its words name ('task' for the whole task as one
    # command; None: they name no primitive of the world)
    start_xy: tuple[float, float]  # commanded points at the attempt's start, pixels
    goal_xy: tuple[float, float]
    success: bool | None  # the named primitive's own check when the attempt ended (None: the
    # world has no per-primitive check)
    env_steps: int
    rounds: int  # clips made for it
    goal_reached: bool | None  # the first clip's last frame shows the gripper within
    # goal_reach_px of the goal point; None where no clip was imagined
    outcome: dict[str, float] = dataclasses.field(default_factory=dict)  # how far from its aim
    # it ended, in the world's measures (`ControlEnv.outcome`)
    follow_px: float | None = None  # mean distance of the real gripper from where the first
    # clip (imagined, or the true future under true_video) draws it, over the frames played
    # from it: whether the actions carry out the clip; None without a clip or a gripper in it


@dataclasses.dataclass
class EpisodeResult:
    """One controlled episode."""

    spec: Any
    template: str
    task: str
    split: str
    task_length: int  # primitives in the world's decomposition of the task
    chain_length: int  # leading primitives of it whose goals were reached, in order
    success: bool
    end: str  # 'success', 'out_of_steps', 'plan_done', 'budget', 'replans'
    env_steps: int
    replans: int  # fresh plans after the first ran out
    planner_errors: int  # plans that did not parse (each ends its plan; none is guessed)
    primitives: list[PrimitiveRecord]
    frames: list[np.ndarray]  # recorded episodes: (N, 2N, 3) uint8 [observation | imagined]
    task_kinds: tuple[str, ...] = ()  # primitive kinds of the world's decomposition of the
    # task (`ControlEnv.summary`'s 'kinds'); () where the world names none


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


@dataclasses.dataclass
class _Attempt:
    """The primitive a slot is running: its command, expert (or None) and progress."""

    command: PrimitiveCommand
    kind: str | None
    expert: Any | None
    rounds: int = 0
    frames_played: int = 0
    env_steps: int = 0
    goal_reached: bool | None = None
    follow_px: float | None = None


class _Slot:
    """The controller's bookkeeping for one environment's current episode."""

    def __init__(self, env: ControlEnv, spec: Any, record: bool):
        self.env, self.spec, self.record = env, spec, record
        env.reset(spec)
        self.frames: list[np.ndarray] = [np.concatenate(
            [env.image, np.zeros_like(env.image)], 1)] if record else []
        self.attempts = 0  # attempts finished
        self.position = 0  # the plan's primitive to run next
        self.plan: list[PrimitiveCommand] | None = None
        self.plan_length = 0  # primitives in the plan made when the position was last 0
        self.replans = 0
        self.planner_errors = 0
        self.attempt: _Attempt | None = None
        self.primitives: list[PrimitiveRecord] = []
        self.env_steps = 0
        self.end: str | None = None

    def result(self) -> EpisodeResult:
        world = self.env.summary()
        return EpisodeResult(self.spec, world["template"], world["task"], world["split"],
                             self.env.task_length, world["chain_length"], self.end == "success",
                             self.end, self.env_steps, self.replans, self.planner_errors,
                             self.primitives, self.frames, tuple(world.get("kinds", ())))


class Controller:
    """Runs episodes with a planner and an executor (module docstring)."""

    def __init__(self, settings: ControlSettings, make_env: Callable[[], ControlEnv], *,
                 horizon: int, frame_stride: int, policy: PrimitivePolicy | None = None,
                 planner: Planner | None = None, goal_reach_px: float = 4.0):
        """`make_env` builds one environment (at the frame size the models saw); `horizon`
        and `frame_stride` are the clips' (H, s) (a policy's own horizon wins: the whole-task
        model's clips are longer); `policy` is needed by the decoded and true-video executors,
        `planner` by the VLM planner."""
        if settings.uses_decoder and policy is None:
            raise ValueError(f"the {settings.executor!r} executor needs a PrimitivePolicy (world "
                             "model and action decoder)")
        if settings.planner == "vlm" and planner is None:
            raise ValueError("the 'vlm' planner needs a Planner; use planner='world' for the "
                             "world's own task decomposition")
        horizon = policy.horizon if policy is not None else horizon
        k = settings.execute_frames
        if k is not None and k > horizon:
            raise ValueError(f"execute_frames = {k} exceeds the clip's {horizon} frames")
        self.settings, self.policy, self.planner = settings, policy, planner
        self.make_env = make_env
        self.horizon, self.frame_stride = horizon, frame_stride
        self.execute_frames = horizon if k is None else k
        self.goal_reach_px = goal_reach_px
        self.latency = Latency()
        self._round = 0

    def run(self, specs: Sequence[Any], *, parallel: int, record: int = 0) -> list[EpisodeResult]:
        """Runs every episode of `specs`, `parallel` environments at a time (at most the
        policy's batch size); the first `record` episodes keep their frames for videos."""
        if self.policy is not None and parallel > self.policy.batch_size:
            raise ValueError(f"parallel={parallel} exceeds the policy's batch size "
                             f"{self.policy.batch_size}")
        envs = [self.make_env() for _ in range(min(parallel, len(specs)))]
        self._batch = len(envs)
        results = []
        try:
            for first in range(0, len(specs), parallel):
                chunk = specs[first:first + parallel]
                slots = [_Slot(env, spec, first + i < record)
                         for i, (env, spec) in enumerate(zip(envs, chunk))]
                while active := [s for s in slots if s.end is None]:
                    self._round_of(active)
                results += [s.result() for s in slots]
        finally:  # renderers hold GL contexts: always released
            for env in envs:
                env.close()
        return results

    # ------------------------------------------------------------------------------ planning

    def _round_of(self, slots: list[_Slot]) -> None:
        """Gives every slot without one a primitive to run, then plays one round of each."""
        self._start_attempts([s for s in slots if s.attempt is None])
        running = [s for s in slots if s.end is None and s.attempt is not None]
        if running:
            self._play(running)
            self._round += 1

    def _start_attempts(self, slots: list[_Slot]) -> None:
        """Plans (as the loop asks) and starts the next primitive of each of `slots`."""
        for slot in slots:
            self._check_budget(slot)
        slots = [s for s in slots if s.end is None]
        if self.settings.planner == "vlm":
            closed = self.settings.loop == "closed"
            self._plan_vlm([s for s in slots if s.plan is None or closed])
        for slot in slots:
            command = self._next_command(slot)
            if command is not None:
                slot.attempt = _Attempt(command, slot.env.primitive_kind(command.text),
                                        slot.env.expert(command))

    def _check_budget(self, slot: _Slot) -> None:
        """Ends the slot when it may start no further primitive (module docstring); restarts
        a plan that ran out when replans are left."""
        env, replans = slot.env, self.settings.max_replans
        if self.settings.planner == "task":
            if slot.attempts:
                slot.end = "plan_done"
            return
        if env.has_checks:  # failed primitives are retried
            if slot.attempts >= env.task_length + replans:
                slot.end = "budget"
            return
        if self.settings.planner == "world":
            length = env.task_length
        elif slot.plan is None:
            return
        else:
            length = slot.plan_length if self._first_of_plan() else len(slot.plan)
        if slot.position >= length:  # the plan ran out without success: plan afresh
            if slot.replans >= replans:
                slot.end = "replans"
            else:
                slot.replans += 1
                slot.position, slot.plan = 0, None

    def _first_of_plan(self) -> bool:
        """A closed-loop planner that lists the primitives left: run the first of each plan."""
        return (self.settings.loop == "closed" and self.planner is not None
                and self.planner.plans_remaining)

    def _plan_vlm(self, slots: list[_Slot]) -> None:
        """A fresh VLM plan for each of `slots` from its current observation."""
        if not slots:
            return
        rows = slots + [slots[0]] * (self._batch - len(slots))  # one compiled shape
        start = time.perf_counter()
        plans = self.planner.plan_batch(np.stack([s.env.image for s in rows]),
                                        [s.env.task_text for s in rows])
        self.latency.planner.append((time.perf_counter() - start, len(slots)))
        scale = slots[0].env.image.shape[0] / self.planner.image_size
        for slot, plan in zip(slots, plans):
            if plan is None:  # cut off at max_tokens: no command is guessed from it
                slot.planner_errors += 1
            slot.plan = [PrimitiveCommand.from_plan_step(step, scale)
                         for step in (plan.steps if plan is not None else ())]
            if slot.position == 0:
                slot.plan_length = len(slot.plan)

    def _next_command(self, slot: _Slot) -> PrimitiveCommand | None:
        """The command the slot runs next; None when there is none (the slot ended, or, in a
        world without checks, its plan ran out: the next round plans afresh)."""
        planner = self.settings.planner
        if planner == "task":
            return PrimitiveCommand(slot.env.task_text, (0.0, 0.0), (0.0, 0.0))
        if planner == "world":
            command = self._world_command(slot)
        else:
            index = 0 if self._first_of_plan() else slot.position
            command = slot.plan[index] if index < len(slot.plan) else None
        if command is None:
            if slot.env.has_checks or planner == "world":
                slot.end = "plan_done"
            else:  # a fresh closed-loop plan shorter than the attempt so far
                slot.position = math.inf
        return command

    def _world_command(self, slot: _Slot) -> PrimitiveCommand | None:
        """The world planner's command at the slot's position. Closed loop in a world with
        checks, a primitive that cannot start from here (a failed try undid what the step
        before it set up: a push no longer lined up, a place whose object was dropped) gives way
        to that step before it, when that one can start."""
        env, fresh = slot.env, self.settings.loop == "closed"
        command = env.world_command(slot.position, fresh)
        if (fresh and env.has_checks and command is not None and slot.position > 0
                and env.expert(command) is None):
            before = env.world_command(slot.position - 1, fresh)
            if env.expert(before) is not None:
                slot.position -= 1
                return before
        return command

    # ----------------------------------------------------------------------------- executing

    def _play(self, slots: list[_Slot]) -> None:
        """One round: a clip's per-step actions for every slot (or its scripted expert), played."""
        executor = self.settings.executor
        if executor == "scripted":
            start = time.perf_counter()
            for slot in slots:
                self._play_scripted(slot)
            self.latency.env.append((time.perf_counter() - start, len(slots)))
            return
        experts: list[list[Any]] = [[] for _ in slots]
        commands = [self._round_command(sl) for sl in slots]
        tracking = self.settings.track and self.settings.uses_decoder
        expert_gripper = self.settings.gripper == "expert"
        if executor in ("replay", "true_video") or expert_gripper:
            futures = [self._future(slot) for slot in slots]
            experts = [f[2] for f in futures]
            truth = [f[0] for f in futures]  # (H, s, A) the expert's actions in clip form
        if executor in ("replay", "true_video"):
            actions = [f[0] for f in futures]
            imagined = [f[1] for f in futures]
            if executor == "true_video" and not tracking:
                start = time.perf_counter()
                actions = list(self._decode(slots, np.stack(imagined)))
                self.latency.action_decoding.append((time.perf_counter() - start, len(slots)))
        else:
            out = self.policy.step(np.stack([sl.env.image for sl in slots]),
                                   commands,
                                   step_index=self._round, use_sgg=self.settings.sgg,
                                   decode=not tracking)
            self.latency.generation.append((out.generate_s, len(slots)))
            if not tracking:
                self.latency.action_decoding.append((out.decode_s, len(slots)))
            actions, imagined = list(out.actions), list(out.clips)
        for slot, clip in zip(slots, imagined):
            attempt = slot.attempt
            if attempt.rounds == 0 and executor == "decoded":
                attempt.goal_reached = slot.env.goal_reached(clip[-1], attempt.command.goal_xy,
                                                             self.goal_reach_px)
        frames = [min(self.execute_frames, self.horizon - sl.attempt.frames_played)
                  for sl in slots]
        played = [0] * len(slots)
        follow: list[list[float]] = [[] for _ in slots]  # first clips: real vs drawn gripper
        decode_s = env_s = 0.0
        if tracking:  # each clip with the observation it was imagined from, encoded once
            start = time.perf_counter()
            codes = self.policy.encode_clips(np.stack([sl.env.image for sl in slots]),
                                             np.stack(imagined))
            decode_s += time.perf_counter() - start
        for j in range(max(frames)):
            rows = [r for r, sl in enumerate(slots) if j < frames[r] and sl.end is None]
            if not rows:
                break
            start = time.perf_counter()
            if tracking:
                interval = self._decode_interval([slots[r] for r in rows], codes[rows],
                                                 [commands[r] for r in rows], j)
            decode_s += time.perf_counter() - start
            start = time.perf_counter()
            for n, r in enumerate(rows):
                slot, clip = slots[r], imagined[r]
                acts = interval[n] if tracking else actions[r][j]
                if expert_gripper:
                    acts = np.array(acts)
                    grip = list(slot.env.gripper_dims)
                    acts[:, grip] = truth[r][j][:, grip]
                for i in range(self.frame_stride):
                    if slot.end is None:
                        self._step(slot, acts[i], None if clip is None else clip[j])
                        played[r] += 1
                drawn = (slot.env.gripper_in(clip[j]) if clip is not None and slot.end is None
                         and slot.attempt.rounds == 0 and slot.env.reads_gripper else None)
                if drawn is not None:
                    follow[r].append(_distance(slot.env.gripper_xy(), drawn))
            env_s += time.perf_counter() - start
        if tracking:  # one entry per round, as a clip decoded at once is
            self.latency.action_decoding.append((decode_s, len(slots)))
        self.latency.env.append((env_s, len(slots)))
        for slot, after, count, frame_count, gaps in zip(slots, experts, played, frames, follow):
            attempt = slot.attempt
            if after:  # the expert continues from where its simulated future was left
                attempt.expert = after[min(count, len(after) - 1)]
            if gaps:
                attempt.follow_px = float(np.mean(gaps))
            attempt.rounds += 1
            attempt.frames_played += frame_count
            self._after_round(slot, clip_done=attempt.frames_played >= self.horizon)

    def _round_command(self, slot: _Slot) -> PrimitiveCommand:
        """The attempt's command for this round. A later round of one attempt (receding
        horizon) keeps its words and goal; with the world planner it starts where the gripper
        now is (the world's truth, as the planned start point was), else where planned."""
        attempt = slot.attempt
        if attempt.rounds == 0 or self.settings.planner != "world":
            return attempt.command
        return dataclasses.replace(attempt.command, start_xy=slot.env.gripper_xy())

    def _future(self, slot: _Slot) -> tuple[np.ndarray, np.ndarray | None, list[Any]]:
        """(actions (H, s, A), true frames (H, N, N, 3) or None, the expert after each step) of
        the expert's next H * s steps from the current state, in clip form (`clips.step_actions`:
        padded with no-ops). A command no expert runs gets no-ops and the frame held."""
        h, s, env = self.horizon, self.frame_stride, slot.env
        render = self.settings.executor == "true_video"
        held = np.repeat(env.image[None], h, 0)
        expert = slot.attempt.expert
        roll = None if expert is None else env.rollout(expert, h * s, render=render)
        if roll is None or not len(roll.actions):
            hold = np.broadcast_to(env.hold_action(), (h, s, env.action_dim))
            return (np.array(hold, np.float32), held if render else None,
                    [] if roll is None else roll.experts)
        n = len(roll.actions)
        acts, _ = step_actions(roll.actions, 0, n, h, s, env.gripper_dims)
        frames = roll.frames[frame_indices(0, n, h, s)] if render else None
        return acts, frames, roll.experts

    def _decode(self, slots: list[_Slot], frames: np.ndarray) -> np.ndarray:
        """(B, H, s, A) decoded per-step actions of whole clips (B, H, N, N, 3), read from
        each slot's observation on (each clip decoded once, from its own frames)."""
        commands = [self._round_command(sl) for sl in slots]
        context = self.policy.context(np.stack([sl.env.image for sl in slots]))
        return self.policy.decode(context, frames,
                                  np.array([c.start_xy for c in commands], np.float32),
                                  np.array([c.goal_xy for c in commands], np.float32),
                                  np.full((len(slots),), self.settings.sgg),
                                  [c.text for c in commands])

    def _decode_interval(self, slots: list[_Slot], codes: np.ndarray, commands: list,
                         j: int) -> np.ndarray:
        """(B, s, A) per-step actions from each slot's live observation to frame j of its
        clip, encoded with the observation it was imagined from (B, H + 1, E), for `commands`
        (`PrimitivePolicy.decode_interval`)."""
        return self.policy.decode_interval(
            codes, np.stack([sl.env.image for sl in slots]), j,
            np.array([c.start_xy for c in commands], np.float32),
            np.array([c.goal_xy for c in commands], np.float32),
            np.full((len(slots),), self.settings.sgg), [c.text for c in commands])

    def _play_scripted(self, slot: _Slot) -> None:
        """The world's scripted expert runs the attempt's primitive to its end."""
        attempt = slot.attempt
        steps = 0
        if attempt.expert is not None:
            while slot.end is None and steps < slot.env.scripted_steps:
                action = slot.env.expert_action(attempt.expert)
                if action is None:
                    break
                self._step(slot, action, None)
                steps += 1
        attempt.rounds += 1
        self._after_round(slot, clip_done=True)

    def _step(self, slot: _Slot, action: np.ndarray, imagined: np.ndarray | None) -> None:
        """One environment step of the slot's attempt."""
        end = slot.env.step(np.asarray(action, np.float32))
        slot.env_steps += 1
        slot.attempt.env_steps += 1
        if slot.record:
            image = slot.env.image
            slot.frames.append(np.concatenate(
                [image, np.zeros_like(image) if imagined is None else imagined], 1))
        if end is not None:
            slot.end = end

    def _after_round(self, slot: _Slot, clip_done: bool) -> None:
        """Ends the attempt when its clip is played out (H frames, over one or more rounds) or
        the episode ended; records it with its primitive's own check and moves the plan on
        (module docstring)."""
        if not (clip_done or slot.end is not None):
            return
        attempt = slot.attempt
        success = None if attempt.expert is None else slot.env.succeeded(attempt.expert)
        if success is None and slot.env.has_checks:
            success = False  # words that name no primitive that can run here
        kind, reached = attempt.kind, attempt.goal_reached
        if self.settings.planner == "task":  # one command for the task, without points:
            kind, success, reached = "task", slot.end == "success", None  # judged as the task
        slot.primitives.append(PrimitiveRecord(
            attempt.command.text, kind, attempt.command.start_xy, attempt.command.goal_xy,
            success, attempt.env_steps, attempt.rounds, reached,
            {} if attempt.expert is None else slot.env.outcome(attempt.expert), attempt.follow_px))
        slot.attempt = None
        slot.attempts += 1
        # The world planner moves on when the primitive succeeded (else retries it) in a world
        # with checks; every other plan moves on after each attempt.
        if not (self.settings.planner == "world" and slot.env.has_checks) or success:
            slot.position += 1


def _distance(a: Sequence[float], b: Sequence[float]) -> float:
    """Euclidean distance of two (x, y) pixel points."""
    return float(np.hypot(a[0] - b[0], a[1] - b[1]))
