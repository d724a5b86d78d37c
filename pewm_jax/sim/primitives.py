"""Motion primitives of the tabletop world: words, start/goal points, scripted experts, checks.

A `Primitive` names one short motion ("push the red cube left"). `Primitive.plan(state)` turns it
into a `PrimitivePlan` for the current state: where the gripper starts and where it must end
(the start/goal points the world model is conditioned on), the waypoints of its scripted expert,
and its success check. A plan that cannot work in this state (no free spot in the bin, a push
that would leave the table or hit another object) raises `Infeasible`; generators reject such
scenes (the documented rejection rule, see `pewm_jax.sim.tasks`).

Kinds and their plans (start is always the gripper's position when the primitive begins):
- reach X:   open, move above X.                          goal = X's centre.
- grasp X:   close (the gripper is already above X).       goal = start.
- release X: open (X is held).                             goal = start.
- pick X:    open, move above X, close.                    goal = X's centre.
- place X Z: carry X to a free spot of zone Z, open.       goal = that spot.
- approach X D: open, move behind X, close (lower there).  goal = the lowering point, a gap
             `PUSH_BACKOFF` behind X's face on the side away from the push.
- push X D:  (lowered behind X) push X by `PUSH_DISTANCE` in direction D or up to zone Z's
             centre line, open.                            goal = the gripper's final position,
             in contact behind X's target.

A push is two primitives so that each is one straight motion between its start and goal points
(what SGG heatmaps can say): the approach, which a reach is like, and the push itself, which a
place is like. The world model, drawing the gripper from start to goal, then never has to invent
the retreat behind the object. A push is infeasible unless the closed, empty gripper is within
`LINEUP_TOLERANCE` of its lowering point (its approach done).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from pewm_jax.sim.world import (GRASP_RADIUS, GRIPPER_BOUNDS, GRIPPER_PAD_HALF, OBJECT_NAMES,
                                OBJECT_RADIUS, ZONES, WorldState, contact_distance)

KINDS: tuple[str, ...] = ("reach", "grasp", "release", "pick", "place", "approach", "push")
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
PUSH_DISTANCE = 0.2  # how far "push X left" moves X (workspace units)
PUSH_BACKOFF = 0.03  # extra gap behind X where the gripper is lowered before pushing
REACH_TOLERANCE = 0.02  # reach succeeds with the gripper this close to the object's centre
LINEUP_TOLERANCE = 0.03  # approach succeeds (and a push starts lined up) this close to the
# lowering point: at most PUSH_BACKOFF nearer to the object, so lowering there touches nothing
PUSH_TOLERANCE = 0.04  # push succeeds with the object this close to its target
CLEARANCE = 0.01  # free space a plan keeps from objects it does not manipulate
_SLOT_STEP = 0.025  # spacing of candidate drop spots inside a zone

# Paraphrases per kind; index 0 is the canonical wording. No wording of one kind begins as one of
# another kind does: an approach worded "move behind the X ..." read like "move to the X" (a
# reach) to the small text encoders, and the decoder closed the gripper at the end of 40% of
# true-video reaches.
WORDS: dict[str, tuple[str, ...]] = {
    "reach": ("move to the {obj}", "reach the {obj}", "go to the {obj}", "hover over the {obj}"),
    "grasp": ("grasp the {obj}", "grab the {obj}", "close the gripper on the {obj}"),
    "release": ("release the {obj}", "let go of the {obj}", "open the gripper and drop the {obj}"),
    "pick": ("pick up the {obj}", "pick the {obj}", "lift the {obj}"),
    "place": ("place the {obj} {prep} the {target}", "put the {obj} {prep} the {target}",
              "drop the {obj} {prep} the {target}"),
    "approach": ("get behind the {obj} to push it {target}", "line up to push the {obj} {target}",
                 "get ready to push the {obj} {target}"),
    "push": ("push the {obj} {target}", "slide the {obj} {target}", "nudge the {obj} {target}"),
}
_PUSH_TARGETS = tuple(DIRECTIONS) + tuple(ZONES)  # a push and its approach
_TARGETS: dict[str, tuple[str, ...]] = {"place": tuple(ZONES), "approach": _PUSH_TARGETS,
                                        "push": _PUSH_TARGETS}


class Infeasible(Exception):
    """This primitive cannot be carried out from the current state (scene is rejected)."""


@dataclasses.dataclass(frozen=True)
class Primitive:
    """One motion primitive: a kind, the object it acts on, and a target (zone or direction)."""

    kind: str
    obj: str
    target: str | None = None  # zone name for place / push-to-zone; direction for a push (and
    # its approach)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown primitive kind {self.kind!r}; known: {KINDS}")
        if self.obj not in OBJECT_NAMES:
            raise ValueError(f"unknown object {self.obj!r}; known: {OBJECT_NAMES}")
        if self.kind in _TARGETS and self.target not in _TARGETS[self.kind]:
            raise ValueError(f"{self.kind} needs a target in {_TARGETS[self.kind]}, got "
                             f"{self.target!r}")
        if self.kind not in _TARGETS and self.target is not None:
            raise ValueError(f"{self.kind} takes no target, got {self.target!r}")

    def text(self, paraphrase: int = 0) -> str:
        """The primitive's words; `paraphrase` picks one of `num_paraphrases()` wordings."""
        template = WORDS[self.kind][paraphrase]
        target = self.target
        if self.kind in ("approach", "push") and self.target in ZONES:
            template = template.replace("{target}", "to the {target}")
        prep = ZONES[target].preposition if target in ZONES else ""
        return template.format(obj=self.obj, target=target, prep=prep)

    def num_paraphrases(self) -> int:
        return len(WORDS[self.kind])

    def goal_anchor(self, goal: np.ndarray) -> np.ndarray:
        """Where in the scene this primitive's `goal` (workspace units, as planned) is defined:
        an approach's goal is a gap behind its object, so its anchor is that object's centre,
        recovered from the goal and the push's direction; every other goal is its own anchor.
        What a planner looks at to write the point (`vlm.finetune.grounding_loss`)."""
        goal = np.asarray(goal, np.float64)
        if self.kind != "approach":
            return goal
        if self.target in DIRECTIONS:
            direction = np.array(DIRECTIONS[self.target])
        else:  # toward the zone's centre line, which lies beyond the object from the gap
            direction = np.array([0.0, np.sign(ZONES[self.target].center[1] - goal[1])])
        return goal + direction * (contact_distance(direction) + PUSH_BACKOFF)

    def plan(self, state: WorldState) -> "PrimitivePlan":
        """Plans this primitive from `state`; raises Infeasible when it cannot work (also when
        its object is not in the scene: a planner may name one that is not)."""
        try:
            i = state.index_of(self.obj)
        except KeyError as e:
            raise Infeasible(f"{self.kind} {self.obj}: {e.args[0]}") from None
        obj = state.positions[i].copy()
        start = state.gripper.copy()
        ops: list[tuple] = []
        if self.kind in ("reach", "pick", "approach", "push") and state.held >= 0:
            raise Infeasible(f"{self.kind} {self.obj}: the gripper is holding "
                             f"{OBJECT_NAMES[state.kinds[state.held]]}")
        if self.kind in ("approach", "push"):
            return self._plan_push(state, i)
        if self.kind in ("reach", "pick"):
            if state.closed:
                ops.append(("grip", False))
            ops.append(("move", obj))
            if self.kind == "pick":
                ops.append(("grip", True))
            return PrimitivePlan(self, start, obj, ops, obj_index=i)
        if self.kind == "grasp":
            if state.closed or np.hypot(*(obj - start)) > GRASP_RADIUS:
                raise Infeasible(f"grasp {self.obj}: the open gripper must be above it")
            return PrimitivePlan(self, start, start.copy(), [("grip", True)], obj_index=i)
        if state.held != i:
            raise Infeasible(f"{self.kind} {self.obj}: the gripper must hold it")
        if self.kind == "release":
            return PrimitivePlan(self, start, start.copy(), [("grip", False)], obj_index=i)
        if self.kind == "place":
            spot = _free_spot(state, ZONES[self.target], i)
            return PrimitivePlan(self, start, spot, [("move", spot), ("grip", False)], obj_index=i)
        raise AssertionError(self.kind)  # unreachable: kinds are validated at construction

    def _plan_push(self, state: WorldState, i: int) -> "PrimitivePlan":
        """Plans an approach to, or a push of, object `i` (module docstring); raises Infeasible."""
        obj = state.positions[i].copy()
        if self.target in DIRECTIONS:
            direction = np.array(DIRECTIONS[self.target])
            target = obj + direction * PUSH_DISTANCE
        else:
            zone = ZONES[self.target]
            target = np.array([obj[0], zone.center[1]])
            if abs(target[1] - obj[1]) < 1e-6:
                raise Infeasible(f"push {self.obj}: it is already on the {self.target}")
            direction = np.sign(target - obj) * np.array([0.0, 1.0])
        contact = contact_distance(direction)
        lower_at = obj - direction * (contact + PUSH_BACKOFF)
        goal = target - direction * contact
        lo, hi = GRIPPER_BOUNDS
        if np.any(target < OBJECT_RADIUS + CLEARANCE) or np.any(target > 1 - OBJECT_RADIUS - CLEARANCE):
            raise Infeasible(f"push {self.obj} {self.target}: the target leaves the table")
        if np.any(lower_at < lo) or np.any(lower_at > hi):
            raise Infeasible(f"push {self.obj} {self.target}: no room behind it for the gripper")
        others = np.delete(state.positions, i, axis=0)
        if others.size:
            # The object sweeps obj->target and the lowered gripper sweeps lower_at->goal (its
            # pad reaches out to its corners, hypot(GRIPPER_PAD_HALF) from its centre).
            if (_segment_distance(others, obj, target).min() < 2 * OBJECT_RADIUS + CLEARANCE
                    or _segment_distance(others, lower_at, goal).min()
                    < OBJECT_RADIUS + np.hypot(*GRIPPER_PAD_HALF) + CLEARANCE):
                raise Infeasible(f"push {self.obj} {self.target}: another object is in the way")
        start = state.gripper.copy()
        lined_up = state.closed and np.hypot(*(start - lower_at)) <= LINEUP_TOLERANCE
        if self.kind == "approach":
            ops: list[tuple] = [] if lined_up else (
                ([("grip", False)] if state.closed else []) + [("move", lower_at), ("grip", True)])
            return PrimitivePlan(self, start, lower_at, ops, obj_index=i, target=target,
                                 direction=direction)
        if not lined_up:
            raise Infeasible(f"push {self.obj} {self.target}: the gripper must be lowered behind "
                             f"it first (approach it)")
        return PrimitivePlan(self, start, goal, [("move", goal), ("grip", False)], obj_index=i,
                             target=target, direction=direction)


def all_primitives() -> tuple[Primitive, ...]:
    """Every primitive of the world: each kind over each object and each target it takes."""
    return tuple(Primitive(kind, obj, target) for kind in KINDS for obj in OBJECT_NAMES
                 for target in _TARGETS.get(kind, (None,)))


@functools.cache
def _primitive_of_text() -> dict[str, Primitive]:
    words = {}
    for primitive in all_primitives():
        for k in range(primitive.num_paraphrases()):
            words[" ".join(primitive.text(k).split())] = primitive
    return words


def primitive_from_text(text: str) -> Primitive:
    """The primitive whose wording (canonical or a paraphrase) `text` is, whitespace and case
    aside; ValueError for words that name no primitive of this world."""
    key = " ".join(text.lower().split())
    found = _primitive_of_text().get(key)
    if found is None:
        raise ValueError(f"{text!r} names no primitive of the tabletop world; primitives read "
                         f"like {Primitive('pick', OBJECT_NAMES[0]).text()!r}")
    return found


@dataclasses.dataclass
class PrimitivePlan:
    """A primitive made concrete for one state: start/goal points, expert waypoints, check."""

    primitive: Primitive
    start: np.ndarray  # (2,) gripper position when the primitive begins (workspace units)
    goal: np.ndarray  # (2,) where the gripper must be when it ends (workspace units)
    ops: list[tuple]  # ("move", xy) or ("grip", closed) for the scripted expert
    obj_index: int
    target: np.ndarray | None = None  # approach, push: where the push must leave the object
    direction: np.ndarray | None = None  # approach, push: the push's unit direction

    def success(self, state: WorldState) -> bool:
        """Reads from the world state whether the primitive achieved what its words say."""
        kind, i = self.primitive.kind, self.obj_index
        obj = state.positions[i]
        if kind == "reach":
            return (not state.closed) and np.hypot(*(state.gripper - obj)) <= REACH_TOLERANCE
        if kind in ("grasp", "pick"):
            return state.closed and state.held == i
        if kind == "release":
            return (not state.closed) and state.held == -1
        if kind == "place":
            return (not state.closed) and state.held == -1 and ZONES[self.primitive.target].contains(obj)
        if kind == "approach":
            return (state.closed and state.held == -1
                    and np.hypot(*(state.gripper - self.goal)) <= LINEUP_TOLERANCE)
        if state.held >= 0:
            return False
        if self.primitive.target in ZONES:
            return ZONES[self.primitive.target].contains(obj)
        return bool(np.hypot(*(obj - self.target)) <= PUSH_TOLERANCE)


class Expert:
    """Scripted expert: follows a plan's waypoints at full speed, ending exactly on them."""

    def __init__(self, plan: PrimitivePlan, max_delta: float):
        self.plan = plan
        self.max_delta = max_delta
        self._op = 0

    @property
    def done(self) -> bool:
        return self._op >= len(self.plan.ops)

    def act(self, state: WorldState) -> np.ndarray:
        """The next action (dx, dy, grip); call only while not `done`."""
        grip = 1.0 if state.closed else -1.0
        while not self.done:
            op, arg = self.plan.ops[self._op]
            if op == "grip":
                self._op += 1
                return np.array([0.0, 0.0, 1.0 if arg else -1.0])
            delta = arg - state.gripper
            largest = np.max(np.abs(delta))
            if largest <= 1e-9:
                self._op += 1
                continue
            step = delta * min(1.0, self.max_delta / largest)
            if largest <= self.max_delta:
                self._op += 1
            return np.array([step[0], step[1], grip])
        raise RuntimeError("the expert has finished its plan; check `done` before `act`")


def _free_spot(state: WorldState, zone, held: int) -> np.ndarray:
    """The free drop spot in `zone` nearest its anchor (bin centre; top edge: above the gripper)."""
    margin = OBJECT_RADIUS
    xs = np.arange(zone.x0 + margin, zone.x1 - margin + 1e-9, _SLOT_STEP)
    ys = np.arange(zone.y0 + margin, zone.y1 - margin + 1e-9, _SLOT_STEP)
    cand = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    anchor = zone.center.copy()
    if zone.name == "top edge":
        anchor[0] = state.gripper[0]
    cand = cand[np.argsort(np.hypot(*(cand - anchor).T), kind="stable")]
    others = np.delete(state.positions, held, axis=0)
    if others.size:
        gap = np.hypot(*(cand[:, None, :] - others[None, :, :]).transpose(2, 0, 1)).min(axis=1)
        cand = cand[gap >= 2 * OBJECT_RADIUS + CLEARANCE]
    if cand.size == 0:
        raise Infeasible(f"no free spot {zone.preposition} the {zone.name}")
    return cand[0].copy()


def _segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of each point (n, 2) from the segment a-b."""
    ab = b - a
    t = np.clip(((points - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
    closest = a + t[:, None] * ab
    return np.hypot(*(points - closest).T)
