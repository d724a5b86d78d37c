"""Long-horizon tasks: templates of 2 to 6 primitives, success checks, compositional hold-outs.

A `Task` is a template filled with objects, zones and directions from one scene. Its success is
read from the world state by `TaskProgress`: the goal of every primitive whose effect must last
(the last primitive acting on an object) must hold at the end; the goals of the others must have
held at some step of the episode ("touch the red cube, then the blue disc"). An approach only
prepares its push; the task's words do not ask for it, so its goal is not part of the check.

Scene rejection rule (documented, applied by `sample_episode_setup`): a sampled scene and task is
rejected, and another drawn from the same seed stream, when the task's scripted expert meets a
primitive that is infeasible when it starts (`primitives.Infeasible`: no free spot in the target
zone, a push target off the table, no room behind the object, another object within the push
corridor). Rejection happens before the episode starts and never looks at whether the expert
succeeds. Draws whose task belongs to another split than the one asked for are skipped and not
counted as rejections.

Compositional hold-outs (deterministic):
- `HELD_OUT_PAIRS`: (skill, object) combinations that never appear in training data. Skill
  "carry" covers pick, grasp, release and place (all need the object held).
- Held-out compositions: of each template's instances (objects, zones, directions) that contain
  no held-out pair, about `COMPOSITION_HOLDOUT_FRACTION` (at least one), chosen in SHA-256 order
  of their key so that each of their primitives still appears in training, only never in that
  combination.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools

import numpy as np

from pewm_jax.sim.primitives import DIRECTIONS, Expert, Infeasible, Primitive, PrimitivePlan
from pewm_jax.sim.world import OBJECT_NAMES, WorldState, sample_scene, step_state

BINS = ("left bin", "right bin")
SPLITS = ("train", "holdout_primitive", "holdout_composition")
SKILL_OF_KIND = {"reach": "reach", "approach": "push", "push": "push", "pick": "carry",
                 "grasp": "carry", "release": "carry", "place": "carry"}
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("push", "red disc"), ("push", "yellow cube"), ("carry", "blue cube"), ("reach", "green disc")})
COMPOSITION_HOLDOUT_FRACTION = 1 / 8
# How tasks split into primitives, recorded with generated data so that data of an earlier
# split is not reused. 2: every push is an approach, then the push (`sim.primitives`).
DECOMPOSITION = 2


@dataclasses.dataclass(frozen=True)
class Template:
    """A task pattern: its words and the primitives it chains, both over named slots."""

    name: str
    words: str  # format string over slots a, b, c (objects), z, z2 (zones), d, d2 (directions)
    primitives: tuple[tuple[str, str, str | None], ...]  # (kind, object slot, target slot)
    num_objects: int
    zones: tuple[str, ...] = ()  # slot names that take a bin
    directions: tuple[str, ...] = ()  # slot names that take a direction


_P, _A = "pick", "approach"  # every push is an approach, then the push (`sim.primitives`)
TEMPLATES: tuple[Template, ...] = (
    Template("bin_one", "put the {a} in the {z}", ((_P, "a", None), ("place", "a", "z")), 1, ("z",)),
    Template("bin_two", "put the {a} in the {z}, then put the {b} in the {z2}",
             ((_P, "a", None), ("place", "a", "z"), (_P, "b", None), ("place", "b", "z2")), 2,
             ("z", "z2")),
    Template("bin_three", "clear the table: put the {a}, the {b} and the {c} in the {z}",
             ((_P, "a", None), ("place", "a", "z"), (_P, "b", None), ("place", "b", "z"),
              (_P, "c", None), ("place", "c", "z")), 3, ("z",)),
    Template("push_two", "push the {a} {d}, then push the {b} {d2}",
             ((_A, "a", "d"), ("push", "a", "d"), (_A, "b", "d2"), ("push", "b", "d2")), 2, (),
             ("d", "d2")),
    Template("edge_then_bin", "push the {a} to the top edge, then put the {b} in the {z}",
             ((_A, "a", "top edge"), ("push", "a", "top edge"), (_P, "b", None),
              ("place", "b", "z")), 2, ("z",)),
    Template("bin_then_push", "put the {a} in the {z}, then push the {b} {d}",
             ((_P, "a", None), ("place", "a", "z"), (_A, "b", "d"), ("push", "b", "d")), 2,
             ("z",), ("d",)),
    Template("touch_two", "touch the {a}, then touch the {b}",
             (("reach", "a", None), ("reach", "b", None)), 2),
    Template("lift_to_edge", "pick up the {a} and set it down on the top edge",
             ((_P, "a", None), ("place", "a", "top edge")), 1),
    Template("push_then_bin", "push the {a} {d}, then put it in the {z}",
             ((_A, "a", "d"), ("push", "a", "d"), (_P, "a", None), ("place", "a", "z")), 1,
             ("z",), ("d",)),
    Template("reach_grasp_bin", "go to the {a}, grab it and drop it in the {z}",
             (("reach", "a", None), ("grasp", "a", None), ("place", "a", "z")), 1, ("z",)),
    Template("edge_two", "push the {a} and the {b} to the top edge",
             ((_A, "a", "top edge"), ("push", "a", "top edge"), (_A, "b", "top edge"),
              ("push", "b", "top edge")), 2),
    Template("bin_then_touch", "put the {a} in the {z}, then touch the {b}",
             ((_P, "a", None), ("place", "a", "z"), ("reach", "b", None)), 2, ("z",)),
    Template("lift_release", "lift the {a}, then let it go",
             ((_P, "a", None), ("release", "a", None)), 1),
    Template("edge_then_bin_lift", "set the {a} down on the top edge, then put the {b} in the {z}",
             ((_P, "a", None), ("place", "a", "top edge"), (_P, "b", None), ("place", "b", "z")), 2,
             ("z",)),
    Template("drop_then_bin", "lift the {a} and let it go, then put the {b} in the {z}",
             ((_P, "a", None), ("release", "a", None), (_P, "b", None), ("place", "b", "z")), 2,
             ("z",)),
)
TEMPLATE_NAMES = tuple(t.name for t in TEMPLATES)


@dataclasses.dataclass(frozen=True)
class Task:
    """A template filled in for one scene."""

    template: str
    text: str
    primitives: tuple[Primitive, ...]

    @property
    def key(self) -> str:
        """Identity of the composition (template + arguments), independent of the scene."""
        return self.template + "|" + ";".join(f"{p.kind}:{p.obj}:{p.target}" for p in self.primitives)

    def split(self) -> str:
        """Which split this composition belongs to (see module docstring)."""
        if self.has_held_out_pair():
            return "holdout_primitive"
        if self.key in held_out_compositions():
            return "holdout_composition"
        return "train"

    def has_held_out_pair(self) -> bool:
        return any((SKILL_OF_KIND[p.kind], p.obj) in HELD_OUT_PAIRS for p in self.primitives)


def template(name: str) -> Template:
    """Looks a template up by name; ValueError lists the known ones."""
    for t in TEMPLATES:
        if t.name == name:
            return t
    raise ValueError(f"unknown task template {name!r}; known: {TEMPLATE_NAMES}")


def instantiate(tmpl: Template, state: WorldState, rng: np.random.Generator) -> Task:
    """Fills a template's slots with objects of the scene, bins and directions drawn from rng."""
    names = state.object_names()
    if len(names) < tmpl.num_objects:
        raise Infeasible(f"{tmpl.name} needs {tmpl.num_objects} objects, scene has {len(names)}")
    objs = [names[i] for i in rng.choice(len(names), size=tmpl.num_objects, replace=False)]
    zones = [BINS[rng.integers(len(BINS))] for _ in tmpl.zones]
    directions = [tuple(DIRECTIONS)[rng.integers(len(DIRECTIONS))] for _ in tmpl.directions]
    return _fill(tmpl, objs, zones, directions)


def _fill(tmpl: Template, objs, zones, directions) -> Task:
    slots: dict[str, str] = dict(zip("abc", objs))
    slots.update(zip(tmpl.zones, zones))
    slots.update(zip(tmpl.directions, directions))
    prims = tuple(Primitive(kind, slots[o], slots.get(t, t)) for kind, o, t in tmpl.primitives)
    return Task(tmpl.name, tmpl.words.format(**slots), prims)


def all_instances(tmpl: Template) -> list[Task]:
    """Every way to fill the template's slots, whatever the scene."""
    return [_fill(tmpl, objs, zones, directions)
            for objs in itertools.permutations(OBJECT_NAMES, tmpl.num_objects)
            for zones in itertools.product(BINS, repeat=len(tmpl.zones))
            for directions in itertools.product(DIRECTIONS, repeat=len(tmpl.directions))]


@functools.cache
def held_out_compositions() -> frozenset[str]:
    """Keys of the held-out task compositions (module docstring).

    Candidates are taken in SHA-256 order of their key; one is held out only while each of its
    primitives still appears in some other training instance.
    """
    eligible = {tmpl.name: [t for t in all_instances(tmpl) if not t.has_held_out_pair()]
                for tmpl in TEMPLATES}
    uses = collections.Counter(p for ts in eligible.values() for t in ts for p in set(t.primitives))
    held = []
    for tmpl in TEMPLATES:
        quota = max(1, round(len(eligible[tmpl.name]) * COMPOSITION_HOLDOUT_FRACTION))
        for t in sorted(eligible[tmpl.name], key=lambda t: hashlib.sha256(t.key.encode()).digest()):
            if quota == 0:
                break
            if all(uses[p] > 1 for p in set(t.primitives)):
                uses.subtract(set(t.primitives))
                held.append(t.key)
                quota -= 1
    return frozenset(held)


class TaskProgress:
    """Tracks a task's success from world states (module docstring): call `update` every step."""

    def __init__(self, task: Task, plans: list[PrimitivePlan]):
        last_for_obj = {p.obj: k for k, p in enumerate(task.primitives)}
        self.plans = plans
        # A goal must hold at the end when no later primitive acts on the same object; a reach
        # is a momentary goal unless it is the task's last step.
        self.final = [last_for_obj[p.obj] == k and (p.kind != "reach" or k == len(plans) - 1)
                      for k, p in enumerate(task.primitives)]
        self.asked = [p.kind != "approach" for p in task.primitives]  # module docstring
        self.reached = [False] * len(plans)

    def update(self, state: WorldState) -> bool:
        """Records which goals hold now; returns whether the whole task is achieved."""
        now = [plan.success(state) for plan in self.plans]
        self.reached = [r or n for r, n in zip(self.reached, now)]
        return all(n if f else r for n, r, f, a in zip(now, self.reached, self.final, self.asked)
                   if a)


@dataclasses.dataclass
class EpisodeSetup:
    """A scene and a task that passed the rejection rule, with the plans the expert made."""

    state: WorldState
    task: Task
    plans: list[PrimitivePlan]
    rejected: int  # scenes of this split rejected as infeasible before this one


def sample_episode_setup(seed: int, *, num_objects: tuple[int, int], max_delta: float,
                         primitive_max_steps: int, split: str = "train",
                         template_name: str | None = None, max_tries: int = 1000) -> EpisodeSetup:
    """Draws a template, then scenes + task arguments from `seed` until one passes the rejection
    rule for `split` (module docstring); templates are thus equally likely in every split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    rng = np.random.default_rng(seed)
    tmpl = template(template_name) if template_name else TEMPLATES[rng.integers(len(TEMPLATES))]
    rejected = 0
    for _ in range(max_tries):
        lo = max(num_objects[0], tmpl.num_objects)
        state = sample_scene(rng, int(rng.integers(lo, max(lo, num_objects[1]) + 1)))
        try:
            task = instantiate(tmpl, state, rng)
            if task.split() != split:
                continue
            plans = plan_with_expert(state, task, max_delta, primitive_max_steps)[1]
        except Infeasible:
            rejected += 1
            continue
        return EpisodeSetup(state, task, plans, rejected)
    raise RuntimeError(f"no feasible {split} scene for template {tmpl.name} in {max_tries} "
                       f"draws from seed {seed}")


def plan_with_expert(state: WorldState, task: Task, max_delta: float, primitive_max_steps: int,
                     on_step=None) -> tuple[WorldState, list[PrimitivePlan]]:
    """Runs the task expert on a copy of `state`; returns the final state and the plans.

    Each primitive is planned when it starts (raising Infeasible) and its expert runs until its
    waypoints are done or `primitive_max_steps` pass. `on_step(k, plan, action, state)` sees
    every action and the state after it.
    """
    state = state.copy()
    plans = []
    for k, primitive in enumerate(task.primitives):
        plan = primitive.plan(state)
        plans.append(plan)
        expert = Expert(plan, max_delta)
        for _ in range(primitive_max_steps):
            if expert.done:
                break
            action = expert.act(state)
            step_state(state, action)
            if on_step is not None:
                on_step(k, plan, action, state)
    return state, plans
