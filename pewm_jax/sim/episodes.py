"""Expert episodes: the task expert run through the environment, with primitive segments.

Every primitive segment records its words, its start and goal points in pixel coordinates of
the rendered frames (x right, y down, origin top-left; DESIGN.md), and the frame range it
covers: frame `start_frame` is the observation when the primitive begins, frame `end_frame` the
observation after its last action. These are what the data pipeline cuts into clips.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pewm_jax.sim.env import TabletopEnv
from pewm_jax.sim.primitives import DIRECTIONS, Expert, Infeasible, Primitive
from pewm_jax.sim.world import ZONES, sample_scene, step_state


@dataclasses.dataclass
class Segment:
    """One primitive of an episode."""

    kind: str
    obj: str
    text: str  # the words (a paraphrase when the episode asked for them)
    start_xy: np.ndarray  # (2,) float32 pixels: gripper at the segment's first frame
    goal_xy: np.ndarray  # (2,) float32 pixels: where the gripper must be at its last frame
    start_frame: int
    end_frame: int
    success: bool  # the primitive's own check, read from the state at `end_frame`


@dataclasses.dataclass
class Episode:
    """A whole expert episode: frames[t] is the observation before actions[t]."""

    seed: int
    task: str
    template: str
    split: str
    frames: np.ndarray  # (T + 1, N, N, 3) uint8
    states: np.ndarray  # (T + 1, 3) float32 gripper x, y (workspace units), closed
    actions: np.ndarray  # (T, 3) float32 (dx, dy, grip)
    segments: list[Segment]
    success: bool  # the task's success check at the end
    rejected_scenes: int  # scenes the rejection rule discarded before this one


def expert_episode(env: TabletopEnv, seed: int, split: str = "train",
                   template: str | None = None, paraphrase_rng: np.random.Generator | None = None
                   ) -> Episode:
    """Runs the task expert for the scene and task drawn from `seed`; see the module docstring.

    With `paraphrase_rng`, each segment's words are a paraphrase drawn from it; otherwise the
    canonical wording.
    """
    options = {"split": split} if template is None else {"split": split, "template": template}
    obs, info = env.reset(seed=seed, options=options)
    frames, states, actions, segments = [obs["image"]], [obs["state"]], [], []
    scale = float(env.image_size)
    success = False
    for primitive in env.task.primitives:
        plan = primitive.plan(env.state)
        expert = Expert(plan, env.max_delta)
        start_frame = len(actions)
        for _ in range(env.primitive_max_steps):
            if expert.done:
                break
            action = expert.act(env.state).astype(np.float32)
            obs, _, success, _, info = env.step(action)
            frames.append(obs["image"])
            states.append(obs["state"])
            actions.append(action)
        paraphrase = 0 if paraphrase_rng is None else int(
            paraphrase_rng.integers(primitive.num_paraphrases()))
        segments.append(Segment(
            kind=primitive.kind, obj=primitive.obj, text=primitive.text(paraphrase),
            start_xy=(plan.start * scale).astype(np.float32),
            goal_xy=(plan.goal * scale).astype(np.float32),
            start_frame=start_frame, end_frame=len(actions), success=plan.success(env.state)))
    return Episode(seed=seed, task=env.task.text, template=env.task.template,
                   split=env.task.split(), frames=np.stack(frames), states=np.stack(states),
                   actions=np.asarray(actions, np.float32).reshape(-1, 3), segments=segments,
                   success=bool(success), rejected_scenes=info["rejected_scenes"])


@dataclasses.dataclass
class PrimitiveTrial:
    """One scripted primitive run in a fresh scene (no rendering)."""

    primitive: Primitive
    rejected: bool  # the scene failed the rejection rule (nothing was run)
    success: bool
    steps: int
    finished: bool  # the expert completed its waypoints within primitive_max_steps


# Primitives that need the object held first (pick it), the gripper above it (reach it) or
# lowered behind it (approach it, for the same push).
_SETUP = {"place": "pick", "release": "pick", "grasp": "reach", "push": "approach"}


def primitive_trial(kind: str, seed: int, *, num_objects: tuple[int, int] = (3, 5),
                    max_delta: float = 0.08, primitive_max_steps: int = 32) -> PrimitiveTrial:
    """Runs the scripted expert of one primitive `kind` in the scene drawn from `seed`.

    The object, zone or direction are drawn from the same seed; primitives that need the object
    held, the gripper above it or lowered behind it start after the expert of `pick`, `reach`
    or `approach` got it there. A scene where a plan is infeasible is rejected
    (`rejected=True`), as in data generation.
    """
    rng = np.random.default_rng(seed)
    state = sample_scene(rng, int(rng.integers(num_objects[0], num_objects[1] + 1)))
    obj = state.object_names()[rng.integers(len(state.kinds))]
    pushes = tuple(DIRECTIONS) + ("top edge",)
    targets = {"place": tuple(ZONES), "approach": pushes, "push": pushes}.get(kind)
    primitive = Primitive(kind, obj, None if targets is None else targets[rng.integers(len(targets))])
    setup = _SETUP.get(kind)
    chain = ([] if setup is None else
             [Primitive(setup, obj, primitive.target if setup == "approach" else None)])
    chain.append(primitive)
    try:
        for p in chain:
            plan = p.plan(state)
            expert = Expert(plan, max_delta)
            steps = 0
            while not expert.done and steps < primitive_max_steps:
                step_state(state, expert.act(state))
                steps += 1
    except Infeasible:
        return PrimitiveTrial(primitive, rejected=True, success=False, steps=0, finished=False)
    return PrimitiveTrial(primitive, rejected=False, success=plan.success(state), steps=steps,
                          finished=expert.done)
