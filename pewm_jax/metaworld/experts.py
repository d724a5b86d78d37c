"""Meta-World's scripted experts as primitive demonstrations.

`run_expert(task, seed, ...)` plays the benchmark's expert (`metaworld.policies`) on one seeded
task variation, records every camera's frames, and cuts the episode into primitives:

- the expert's phase at each step is the waypoint branch it follows: which `return` of its
  `_desired_pos` produced the target (read with a profile hook on that one function, so every
  policy is segmented the same way without restating its conditions);
- phases only move forward (a branch seen before never reopens a primitive; the expert's
  oscillation between two branches stays in the later one), and a change of gripper command
  (effort > 0 closes) also starts a primitive;
- runs shorter than `min_segment_steps` merge into a neighbour (`segmenter.merge_short`).

Each primitive gets words from `TASKS` (per task, one phrase per branch in source order, and
"grasp / release the <object>" for a gripper change) and start/goal points: the tool-centre
point at its first and last frame, projected into each camera.
"""

from __future__ import annotations

import contextlib
import dataclasses
import dis
import sys
from collections.abc import Iterator, Sequence

import numpy as np
from metaworld.policies import ENV_POLICY_MAP

from pewm_jax.segmenter import merge_short
from pewm_jax.metaworld.env import CAMERAS, MAX_EPISODE_STEPS, MetaWorldEnv


@dataclasses.dataclass(frozen=True)
class TaskWords:
    """The words of one task: its instruction, the object it grasps, and one phrase per
    waypoint branch of its expert (the `return`s of `_desired_pos`, in source order)."""

    instruction: str
    noun: str
    branches: tuple[str, ...]


# The AVDC protocol's 11 tasks.
TASKS: dict[str, TaskWords] = {
    "door-open": TaskWords("open the door", "door handle", (
        "move the gripper above the door handle", "lower the gripper to the door handle",
        "pull the door open")),
    "door-close": TaskWords("close the door", "door handle", (
        "raise the gripper above the door handle", "move the gripper behind the door handle",
        "lower the gripper beside the door handle", "push the door closed")),
    "basketball": TaskWords("put the ball in the basket", "ball", (
        "move the gripper above the ball", "lower the gripper to the ball",
        "lift the ball to the hoop", "move the ball over the hoop")),
    "shelf-place": TaskWords("put the block on the shelf", "block", (
        "move the gripper above the block", "lower the gripper to the block",
        "carry the block in line with the shelf", "lift the block to the shelf",
        "push the block onto the shelf")),
    "button-press": TaskWords("press the button", "button", (
        "line the gripper up with the button", "press the button in")),
    "button-press-topdown": TaskWords("press the button from the top", "button", (
        "move the gripper above the button", "press the button down")),
    "faucet-close": TaskWords("close the faucet", "faucet handle", (
        "move the gripper above the faucet handle", "lower the gripper to the faucet handle",
        "turn the faucet closed")),
    "faucet-open": TaskWords("open the faucet", "faucet handle", (
        "move the gripper above the faucet handle", "lower the gripper to the faucet handle",
        "turn the faucet open")),
    "handle-press": TaskWords("press the handle down", "handle", (
        "move the gripper above the handle", "press the handle down")),
    "hammer": TaskWords("hammer the nail in", "hammer", (
        "move the gripper above the hammer", "lower the gripper to the hammer",
        "lift the hammer in line with the nail", "hit the nail with the hammer")),
    "assembly": TaskWords("put the ring on the peg", "ring", (
        "move the gripper above the ring", "lower the ring onto the peg",
        "lower the gripper to the ring", "lift the ring to the peg",
        "move the ring above the peg")),
}


def task_words(task: str) -> TaskWords:
    """The words table entry of `task`; ValueError for a task without one."""
    if task not in TASKS:
        raise ValueError(f"no primitive words for Meta-World task {task!r}; tasks with words: "
                         f"{sorted(TASKS)}. Add its phrases to pewm_jax.metaworld.experts.TASKS.")
    return TASKS[task]


def all_wordings() -> list[str]:
    """Every phrase a Meta-World primitive or task may carry (for the tokenizer)."""
    words = set()
    for entry in TASKS.values():
        words |= {entry.instruction, *entry.branches, *_grip_words(entry.noun)}
    return sorted(words)


def _grip_words(noun: str) -> tuple[str, str]:
    return f"grasp the {noun}", f"release the {noun}"


def _branch_lines(code) -> tuple[int, ...]:
    """Source lines of the `return` statements of `code`, ascending."""
    return tuple(sorted({ins.positions.lineno for ins in dis.get_instructions(code)
                         if ins.opname in ("RETURN_VALUE", "RETURN_CONST")}))


class _BranchProbe:
    """Records which `return` of a policy's `_desired_pos` each action came from."""

    def __init__(self, policy, task: str):
        self.code = type(policy)._desired_pos.__code__
        self.lines = _branch_lines(self.code)
        expected = len(task_words(task).branches)
        if len(self.lines) != expected:
            raise RuntimeError(
                f"the installed Meta-World expert for {task!r} has {len(self.lines)} waypoint "
                f"branches but TASKS gives {expected} phrases; the `metaworld` version differs "
                "from the one the table was written for (3.1.x): update TASKS.")
        self._last: int | None = None

    def _hook(self, frame, event, arg) -> None:
        if event == "return" and frame.f_code is self.code:
            self._last = frame.f_lineno

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        previous = sys.getprofile()
        self._last = None
        sys.setprofile(self._hook)
        try:
            yield
        finally:
            sys.setprofile(previous)

    def branch(self) -> int:
        if self._last not in self.lines:
            raise RuntimeError(f"the expert's action came from no known branch "
                               f"(line {self._last}; branches at lines {self.lines})")
        return self.lines.index(self._last)


@dataclasses.dataclass(frozen=True)
class Segment:
    """One primitive of a demonstration: steps [start, end) (frames start..end)."""

    start: int
    end: int
    text: str


def segment_demo(branches: np.ndarray, efforts: np.ndarray, words: TaskWords,
                 min_steps: int) -> list[Segment]:
    """Primitives of an expert episode from its per-step branch and gripper effort (module
    docstring): ordered, covering every step, none shorter than `min_steps` unless the episode
    is."""
    branches, efforts = np.asarray(branches), np.asarray(efforts)
    num_steps = len(branches)
    if num_steps == 0 or len(efforts) != num_steps:
        raise ValueError(f"need one branch and one effort per step, got {num_steps} and "
                         f"{len(efforts)}")
    rank: dict[int, int] = {}  # branch -> order of first appearance
    phase = np.zeros(num_steps, np.int64)  # forward-only: the latest branch reached so far
    for t, b in enumerate(branches):
        rank.setdefault(int(b), len(rank))
        phase[t] = max(phase[t - 1] if t else 0, rank[int(b)])
    closed = efforts > 0
    starts = np.flatnonzero((np.diff(phase, prepend=-1) != 0)
                            | (np.diff(closed, prepend=closed[0]) != 0))
    grasp, release = _grip_words(words.noun)
    order = sorted(rank, key=rank.get)  # branch of each phase

    def text_at(t: int) -> str:
        if t == 0 or phase[t] != phase[t - 1]:
            return words.branches[order[phase[t]]]
        return grasp if closed[t] else release

    return [Segment(int(s), int(e), text_at(int(s)))
            for s, e in merge_short(starts, num_steps, min_steps)]


@dataclasses.dataclass
class Demo:
    """One expert episode of a seeded task variation, seen from several cameras."""

    task: str
    seed: int
    success: bool  # the task's success check held at the last step
    actions: np.ndarray  # (T, 4) float32 the expert's clipped actions
    states: np.ndarray  # (T+1, 4) float32 hand xyz and gripper opening per frame
    tcp: np.ndarray  # (T+1, 3) float64 tool-centre point per frame, metres
    frames: dict[str, np.ndarray]  # camera -> (T+1, N, N, 3) uint8 upright frames
    tcp_xy: dict[str, np.ndarray]  # camera -> (T+1, 2) float32 the tcp projected, pixels
    segments: list[Segment]


def run_expert(task: str, seed: int, *, cameras: Sequence[str] = CAMERAS, image_size: int = 128,
               min_segment_steps: int = 4, max_steps: int = MAX_EPISODE_STEPS) -> Demo:
    """Plays the benchmark's expert on `task` with `seed` until success or `max_steps`."""
    words = task_words(task)
    env = MetaWorldEnv(task, camera=cameras[0], image_size=image_size,
                       max_episode_steps=max_steps)
    try:
        env.reset(seed=seed)
        policy = ENV_POLICY_MAP[f"{task}-v3"]()
        probe = _BranchProbe(policy, task)
        models = {c: env.camera_model(c) for c in cameras}  # fixed cameras: one pose each
        frames = {c: [env.render(c)] for c in cameras}
        tcp, actions, branches, efforts = [env.tcp], [], [], []
        states = [env.raw_observation[:4].astype(np.float32)]
        success = False
        for _ in range(max_steps):
            with probe.watching():
                action = policy.get_action(env.raw_observation.copy())  # it edits its input
            branches.append(probe.branch())
            action = np.clip(action, -1.0, 1.0).astype(np.float32)
            efforts.append(float(action[3]))
            _, _, success, truncated, _ = env.step(action)
            actions.append(action)
            tcp.append(env.tcp)
            states.append(env.raw_observation[:4].astype(np.float32))
            for c in cameras:
                frames[c].append(env.render(c))
            if success or truncated:
                break
    finally:
        env.close()
    tcp = np.stack(tcp)
    return Demo(task=task, seed=int(seed), success=bool(success), actions=np.stack(actions),
                states=np.stack(states),
                tcp=tcp, frames={c: np.stack(f) for c, f in frames.items()},
                tcp_xy={c: m.project(tcp) for c, m in models.items()},
                segments=segment_demo(np.array(branches), np.array(efforts), words,
                                      min_segment_steps))
