"""Planner evaluation: does it name the expert's primitives, and does it point where they go?

For every stored episode of a split, the planner plans from the first frame and the task
(greedy, constrained decoding) and is scored against the expert's plan (`episode_plan`):

    exact_match     fraction of episodes whose primitive sequence equals the expert's (each
                    step's words read as a primitive of the world, so a paraphrase still
                    counts; words that name no primitive do not match)
    point_error_px  mean distance (pixels of the stored frame) between planned and expert
                    start and goal points, over the steps of plans with as many steps as the
                    expert's (steps aligned by position)
    centre_error_px the same points guessed at the image centre: the error to beat
    goal_error_px_by_kind  per primitive kind (the built-in world's kinds; other words: their
                    first word), the median distance of the planned goal points from the
                    expert's, over the same steps: which primitives the planner points badly for
    goal_near_by_kind  per kind, the share of those goal points within `NEAR` of the expert's
                    (workspace units, `sim.world.GRASP_RADIUS`: as close as a pick must close
                    and an approach must end, `LINEUP_TOLERANCE`), in pixels of each frame:
                    a median inside the tolerance can hide many misses
    unparsed        plans the token budget cut off before <eos> (misses; constrained decoding
                    writes nothing else that fails to parse)

Models come from `pewm_jax.recipes.restore.restore`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from etils import epath

from data_loaders import tabletop
from data_loaders.plan_pipeline import EpisodePlan, episode_plan
from pewm_jax.sim.primitives import Primitive, primitive_from_text
from pewm_jax.sim.world import GRASP_RADIUS
from pewm_jax.text.plan import Plan
from pewm_jax.vlm.planner import Planner


@dataclasses.dataclass(frozen=True)
class PlanScores:
    """The planner's scores on one split (module docstring)."""

    split: str
    episodes: int
    exact_match: float
    point_error_px: float  # nan when no plan had the expert's number of steps
    centre_error_px: float
    points: int  # how many points the two errors average over
    unparsed: int = 0  # plans cut off by the token budget before <eos> (counted as misses)
    goal_error_px_by_kind: dict[str, float] = dataclasses.field(default_factory=dict)
    goal_near_by_kind: dict[str, float] = dataclasses.field(default_factory=dict)


NEAR = GRASP_RADIUS  # workspace units: goal_near_by_kind's radius (the world's tightest)


def _primitive(text: str) -> Primitive | str:
    """What a step's words name: the built-in world's primitive (any paraphrase of it), else
    the words themselves (Meta-World's come from one table, without paraphrases)."""
    try:
        return primitive_from_text(text)
    except ValueError:
        return " ".join(text.lower().split())


def score_plans(plans: Sequence[Plan | None], truths: Sequence[EpisodePlan], planner_size: int,
                split: str = "") -> PlanScores:
    """Scores `plans` (points in pixels of the planner's `planner_size` image; None for output
    that did not parse) against the expert plans of `truths` (points in pixels of their
    stored frames)."""
    matches, errors, centre = 0, [], []
    goals: dict[str, list[float]] = {}
    near: dict[str, list[bool]] = {}
    unparsed = sum(plan is None for plan in plans)
    for plan, truth in zip(plans, truths, strict=True):
        if plan is None:
            continue
        said = [_primitive(step.text) for step in plan.steps]
        expert = [_primitive(step.text) for step in truth.plan.steps]
        matches += said == expert
        if len(plan.steps) != len(truth.plan.steps):
            continue
        size = truth.image.shape[0]
        for mine, theirs, kind in zip(plan.steps, truth.plan.steps, expert):
            for a, b in ((mine.start_xy, theirs.start_xy), (mine.goal_xy, theirs.goal_xy)):
                errors.append(np.hypot(*(np.asarray(a) * size / planner_size - np.asarray(b))))
                centre.append(np.hypot(*(np.full(2, size / 2) - np.asarray(b))))
            name = kind.kind if isinstance(kind, Primitive) else kind.split()[0]
            goals.setdefault(name, []).append(float(errors[-1]))
            near.setdefault(name, []).append(errors[-1] <= NEAR * size)
    return PlanScores(split, len(truths), matches / max(len(truths), 1),
                      float(np.mean(errors)) if errors else float("nan"),
                      float(np.mean(centre)) if centre else float("nan"), len(errors), unparsed,
                      {k: float(np.median(v)) for k, v in sorted(goals.items())},
                      {k: float(np.mean(v)) for k, v in sorted(near.items())})


def evaluate_planner(planner: Planner, dataset_dir: str | epath.PathLike, split: str, *,
                     batch_size: int = 32, max_episodes: int | None = None) -> PlanScores:
    """Plans every episode of `split` (or its first `max_episodes`) and scores the plans."""
    source = tabletop.episode_source(dataset_dir, split)
    count = len(source) if max_episodes is None else min(max_episodes, len(source))
    truths = [episode_plan(source[i]) for i in range(count)]
    plans: list[Plan | None] = []
    for first in range(0, count, batch_size):
        plans += plan_episodes(planner, truths[first:first + batch_size])
    return score_plans(plans, truths, planner.image_size, split)


def plan_episodes(planner: Planner, episodes: Sequence[EpisodePlan]) -> list[Plan | None]:
    """`Planner.plan_batch` of the episodes' first frames and tasks (one batch)."""
    return planner.plan_batch(np.stack([e.image for e in episodes]), [e.task for e in episodes])


def scores_table(scores: Sequence[PlanScores]) -> str:
    """The scores as a small fixed-width table for the terminal."""
    lines = [f"{'split':<22}{'episodes':>9}{'exact match':>13}{'point err px':>14}"
             f"{'centre err px':>15}"]
    lines += [f"{s.split:<22}{s.episodes:>9}{s.exact_match:>13.1%}{s.point_error_px:>14.2f}"
              f"{s.centre_error_px:>15.2f}" for s in scores]
    for s in scores:
        if s.goal_error_px_by_kind:
            lines.append(f"{s.split}: goal error px by kind (median): "
                         f"{goal_errors_line(s.goal_error_px_by_kind)}")
            lines.append(f"{s.split}: goals within {NEAR:g} of the truth (workspace units) by "
                         "kind: " + ", ".join(f"{k} {v:.0%}" for k, v in
                                              s.goal_near_by_kind.items()))
    return "\n".join(lines)


def goal_errors_line(by_kind: dict[str, float]) -> str:
    """'pick 1.6, place 0.6, ...': the planner's median goal error per primitive kind."""
    return ", ".join(f"{kind} {error:.1f}" for kind, error in by_kind.items())
