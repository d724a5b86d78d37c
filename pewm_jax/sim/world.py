"""State and dynamics of the built-in tabletop world (numpy only, deterministic).

The table is the unit square in workspace coordinates: x to the right, y down, (0, 0) the
top-left corner, so a point's pixel coordinates are simply `xy * image_size` (the coordinate
contract of DESIGN.md). The world holds one gripper and up to 8 objects (4 colours x 2 shapes,
each at most once, so "the red cube" always names one object) plus fixed target zones.

Dynamics, applied by `World.step` in this order:
1. The gripper command: `grip > 0` closes, `grip <= 0` opens. Closing within `GRASP_RADIUS` of an
   object's centre grasps the nearest one, which snaps under the gripper. Opening drops it.
2. The displacement `(dx, dy)` moves the gripper, clamped to `GRIPPER_BOUNDS`.
   - An open gripper travels above the objects and touches nothing.
   - A closed gripper holding an object lifts it: the object moves with the gripper, touching
     nothing until it is dropped.
   - A closed, empty gripper is lowered onto the table and pushes every object it meets with a
     flat pad, the closed gripper's drawn footprint (`GRIPPER_PAD_HALF`; the motion is
     sub-stepped so nothing tunnels through). An object touching a face of the pad is pushed
     straight along that face's normal, as a flat pusher pushes in the real world (stable
     pushing): a push stays on its line when the gripper is a little off it, instead of
     sliding the object off sideways as a round pusher would.
3. Objects never overlap: every overlap is pushed apart along the line between the centres,
   and objects are kept on the table. Collision uses a disc of radius `OBJECT_RADIUS` for
   every shape.
"""

from __future__ import annotations

import dataclasses

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 48, 49),
    "green": (46, 160, 67),
    "blue": (41, 98, 255),
    "yellow": (240, 196, 25),
}
SHAPES: tuple[str, ...] = ("cube", "disc")
# Every object that can exist, e.g. "red cube"; an object's kind is its index here.
OBJECT_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for s in SHAPES for c in COLORS)
MAX_OBJECTS = len(OBJECT_NAMES)

OBJECT_RADIUS = 0.05  # collision radius of every object (workspace units)
# Half extents (x, y) of the lowered (closed, empty) gripper's pad: the closed fingers and palm
# as render.py draws them (fingers out to 0.034 + 0.010 across, palm radius 0.028 along).
GRIPPER_PAD_HALF = np.array([0.044, 0.028])
GRASP_RADIUS = 0.03  # closing this close to an object's centre grasps it
GRIPPER_BOUNDS = (0.04, 0.96)  # the gripper's centre stays inside this square
OBJECT_BOUNDS = (OBJECT_RADIUS, 1.0 - OBJECT_RADIUS)
_CONTACT_SUBSTEP = 0.02  # longest gripper move between contact resolutions when lowered
_SEPARATION_ITERS = 20


@dataclasses.dataclass(frozen=True)
class Zone:
    """An axis-aligned target area on the table (a bin or a marked strip)."""

    name: str
    x0: float
    y0: float
    x1: float
    y1: float
    preposition: str  # "in the left bin", "on the top edge"

    def contains(self, xy: np.ndarray) -> bool:
        """True when the point lies inside the zone (borders included)."""
        return bool(self.x0 <= xy[0] <= self.x1 and self.y0 <= xy[1] <= self.y1)

    @property
    def center(self) -> np.ndarray:
        return np.array([(self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2])


ZONES: dict[str, Zone] = {
    "left bin": Zone("left bin", 0.04, 0.70, 0.36, 0.96, "in"),
    "right bin": Zone("right bin", 0.64, 0.70, 0.96, 0.96, "in"),
    "top edge": Zone("top edge", 0.04, 0.04, 0.96, 0.16, "on"),
}
# Where scenes place objects at reset: between the top edge and the bins.
SPAWN_BOX = (0.10, 0.24, 0.90, 0.64)  # x0, y0, x1, y1
SPAWN_MIN_GAP = 0.03  # free space between two spawned objects' discs


@dataclasses.dataclass
class WorldState:
    """Everything that evolves: gripper position and grip, held object, object positions."""

    gripper: np.ndarray  # (2,) float64 workspace xy
    closed: bool
    held: int  # index into `kinds`/`positions`, -1 when nothing is held
    kinds: np.ndarray  # (n,) int, index into OBJECT_NAMES
    positions: np.ndarray  # (n, 2) float64 workspace xy of object centres

    def copy(self) -> "WorldState":
        return WorldState(self.gripper.copy(), self.closed, self.held, self.kinds.copy(),
                          self.positions.copy())

    def index_of(self, name: str) -> int:
        """Index of the object called `name` ("red cube"); KeyError if it is not in the scene."""
        kind = OBJECT_NAMES.index(name)
        hits = np.flatnonzero(self.kinds == kind)
        if hits.size == 0:
            raise KeyError(f"no {name!r} in this scene; it has {self.object_names()}")
        return int(hits[0])

    def object_names(self) -> list[str]:
        return [OBJECT_NAMES[k] for k in self.kinds]

    def position_of(self, name: str) -> np.ndarray:
        return self.positions[self.index_of(name)]


class ActionError(ValueError):
    """An action that cannot be applied: wrong shape or non-finite values."""


def contact_distance(direction: np.ndarray) -> float:
    """Centre distance of the lowered gripper and an object in flat contact, the gripper
    pushing along the axis direction `direction` (a unit vector along x or y)."""
    return OBJECT_RADIUS + float(np.abs(np.asarray(direction, float)) @ GRIPPER_PAD_HALF)


def validate_action(action: object) -> np.ndarray:
    """Returns the action as a float64 (3,) array or raises ActionError saying what is wrong."""
    a = np.asarray(action, dtype=np.float64)
    if a.shape != (3,):
        raise ActionError(
            f"action must have shape (3,) = (dx, dy, grip); got shape {a.shape}. "
            "dx, dy move the gripper in workspace units, grip > 0 closes it.")
    if not np.all(np.isfinite(a)):
        raise ActionError(f"action must be finite; got {a.tolist()} (NaN or Inf). "
                          "Check the policy's output before stepping the environment.")
    return a


def clip_action(action: np.ndarray, max_delta: float) -> tuple[np.ndarray, bool]:
    """Clips (dx, dy) to [-max_delta, max_delta] and grip to [-1, 1]; reports if it clipped."""
    bound = np.array([max_delta, max_delta, 1.0])
    clipped = np.clip(action, -bound, bound)
    return clipped, bool(np.any(clipped != action))


def sample_scene(rng: np.random.Generator, num_objects: int) -> WorldState:
    """Draws distinct objects at non-overlapping spawn positions and a gripper position."""
    kinds = np.sort(rng.choice(MAX_OBJECTS, size=num_objects, replace=False))
    x0, y0, x1, y1 = SPAWN_BOX
    min_dist = 2 * OBJECT_RADIUS + SPAWN_MIN_GAP
    positions: list[np.ndarray] = []
    while len(positions) < num_objects:
        p = rng.uniform((x0, y0), (x1, y1))
        if all(np.hypot(*(p - q)) >= min_dist for q in positions):
            positions.append(p)
    gripper = rng.uniform(GRIPPER_BOUNDS[0] + 0.1, GRIPPER_BOUNDS[1] - 0.1, size=2)
    return WorldState(gripper=gripper, closed=False, held=-1, kinds=kinds,
                      positions=np.array(positions))


def step_state(state: WorldState, action: np.ndarray) -> None:
    """Applies one already validated and clipped action to `state` in place (module docstring)."""
    dxy, want_closed = action[:2], bool(action[2] > 0)
    if want_closed and not state.closed:
        state.closed = True
        dist = np.hypot(*(state.positions - state.gripper).T)
        nearest = int(np.argmin(dist))
        if dist[nearest] <= GRASP_RADIUS:
            state.held = nearest
            state.positions[nearest] = state.gripper
    elif not want_closed and state.closed:
        state.closed = False
        dropped, state.held = state.held, -1
        if dropped >= 0:
            _separate(state, pusher=None)

    lo, hi = GRIPPER_BOUNDS
    target = np.clip(state.gripper + dxy, lo, hi)
    pushing = state.closed and state.held < 0
    if not pushing:
        state.gripper = target
        if state.held >= 0:
            state.positions[state.held] = target
        return
    start = state.gripper
    n_sub = max(1, int(np.ceil(np.max(np.abs(target - start)) / _CONTACT_SUBSTEP)))
    for i in range(1, n_sub + 1):
        state.gripper = target if i == n_sub else start + (target - start) * (i / n_sub)
        _separate(state, pusher=state.gripper)


def _separate(state: WorldState, pusher: np.ndarray | None) -> None:
    """Pushes objects out of the lowered gripper and out of each other; keeps them on the table.

    The gripper (when given) and a held object are immovable; two free objects share the
    correction. A few Jacobi iterations settle the small scenes of this world.
    """
    pos = state.positions
    n = len(pos)
    movable = np.ones(n, dtype=bool)
    if state.held >= 0:
        movable[state.held] = False
    min_obj = 2 * OBJECT_RADIUS
    for _ in range(_SEPARATION_ITERS):
        moved = False
        if pusher is not None and _push_out_of_pad(pos, pusher, movable):
            moved = True
        d = pos[:, None, :] - pos[None, :, :]
        dist = np.hypot(d[..., 0], d[..., 1])
        np.fill_diagonal(dist, np.inf)
        overlap = np.maximum(min_obj - dist, 0.0)
        if np.any(overlap > 1e-9):
            normal = d / np.maximum(dist, 1e-9)[..., None]
            # Free object vs free object: each moves half; vs an immovable one it moves fully.
            share = np.where(movable[None, :], 0.5, 1.0) * movable[:, None]
            pos += np.sum(normal * (overlap * share)[..., None], axis=1)
            moved = True
        lo, hi = OBJECT_BOUNDS
        pos[movable] = np.clip(pos[movable], lo, hi)
        if not moved:
            break


def _push_out_of_pad(pos: np.ndarray, pusher: np.ndarray, movable: np.ndarray) -> bool:
    """Moves every movable object overlapping the gripper's pad (centred at `pusher`) out of it,
    along the normal of the pad's nearest face (or corner); True when one moved."""
    half = GRIPPER_PAD_HALF
    d = pos - pusher  # (n, 2) object centres relative to the pad's centre
    nearest = np.clip(d, -half, half)  # the pad's point nearest each centre
    gap = d - nearest
    dist = np.hypot(gap[:, 0], gap[:, 1])
    hit = (dist < OBJECT_RADIUS - 1e-9) & movable
    if not np.any(hit):
        return False
    outside = hit & (dist > 1e-12)
    pos[outside] = (pusher + nearest[outside]
                    + gap[outside] / dist[outside, None] * OBJECT_RADIUS)
    for i in np.flatnonzero(hit & ~outside):  # centre inside the pad: out by the nearest face
        axis = int(np.argmin(half - np.abs(d[i])))
        side = 1.0 if d[i, axis] >= 0 else -1.0
        pos[i, axis] = pusher[axis] + side * (half[axis] + OBJECT_RADIUS)
    return True
