"""How precisely a push must be lowered in the built-in world, with and without steering: the
scripted expert's push from a lowering point moved sideways by a few pixels.

    python benchmarks/push_precision.py [--scenes 60] [--offsets 0 0.3 1 2 3]

For each of --scenes push primitives (the first push of `push_two` tasks, seeded), the gripper is
lowered off the expert's line by each offset (pixels of a 64-pixel frame, perpendicular to the
push) and then pushes in two ways:
- `steered`: the expert's push, which aims behind the object each step (sim/primitives.py);
- `replayed`: the moves the expert makes from its own lowering point, replayed open loop (what a
  push without feedback does).
It prints, per offset, the median distance of the pushed object from its target and the push's
success for both, beside offset 0. A disc pushed by a disc slides off sideways, so without
steering a small offset grows along the push: this is the precision an action decoder would
need without it (the README's action decoder section).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from pewm_jax.sim import TabletopEnv  # noqa: E402
from pewm_jax.sim.primitives import PUSH_TOLERANCE, Expert, PrimitivePlan  # noqa: E402
from pewm_jax.sim.world import WorldState, clip_action, step_state  # noqa: E402

IMAGE_SIZE = 64  # the quickstart's frame size: offsets are in its pixels


@dataclasses.dataclass
class PushOutcome:
    """Object errors (pixels) per scene of one offset, steered and replayed, and the steered
    pushes' step counts."""

    steered: list[float] = dataclasses.field(default_factory=list)
    replayed: list[float] = dataclasses.field(default_factory=list)
    steps: list[int] = dataclasses.field(default_factory=list)


def lowered_off_line(env: TabletopEnv, seed: int, offset_px: float
                     ) -> tuple[WorldState, PrimitivePlan]:
    """(state, plan) of scene `seed`'s first push with the gripper lowered `offset_px` pixels
    to the side of the expert's line (closed, ready to push)."""
    env.reset(seed=2 ** 40 + seed, options={"split": "train", "template": "push_two"})
    plan, state = env.setup.plans[0], env.state.copy()
    (move, lower_at), (push, target) = plan.ops[-4], plan.ops[-2]
    assert (move, push) == ("move", "push"), plan.ops  # ... move, close, push, open
    along = (target - lower_at) / np.linalg.norm(target - lower_at)
    state.gripper = lower_at + np.array([-along[1], along[0]]) * offset_px / IMAGE_SIZE
    state.closed = True
    return state, plan


def _push(state: WorldState, plan: PrimitivePlan, max_delta: float) -> list[np.ndarray]:
    """Runs the expert's push (its last two ops: push, open) on `state`; its actions."""
    expert, actions = Expert(dataclasses.replace(plan, ops=plan.ops[-2:]), max_delta), []
    while not expert.done:
        actions.append(expert.act(state))
        step_state(state, clip_action(actions[-1], max_delta)[0])
    return actions


def push_outcomes(scenes: int, offsets: list[float]) -> dict[float, PushOutcome]:
    """Per offset (pixels), each scene's object error steered and replayed (module docstring)."""
    env = TabletopEnv(IMAGE_SIZE)
    out = {off: PushOutcome() for off in offsets}

    def error(state: WorldState, plan: PrimitivePlan) -> float:
        return float(np.hypot(*(state.positions[plan.obj_index] - plan.target))) * IMAGE_SIZE

    for seed in range(scenes):
        on_line, plan = lowered_off_line(env, seed, 0.0)
        moves = _push(on_line, plan, env.max_delta)
        for off in offsets:
            state, _ = lowered_off_line(env, seed, off)
            replayed = state.copy()
            out[off].steps.append(len(_push(state, plan, env.max_delta)))
            out[off].steered.append(error(state, plan))
            for action in moves:
                step_state(replayed, clip_action(action, env.max_delta)[0])
            out[off].replayed.append(error(replayed, plan))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--offsets", type=float, nargs="+", default=[0.3, 1, 2, 3])
    args = parser.parse_args()
    outcomes = push_outcomes(args.scenes, sorted(set([0.0] + args.offsets)))
    tolerance = PUSH_TOLERANCE * IMAGE_SIZE
    print(f"{args.scenes} pushes lowered off the expert's line; success: object within "
          f"{tolerance:.2f} px of its target; object error in px (median)")
    print(f"{'offset px':>9}  {'steered error':>13}  {'success':>7}  {'replayed error':>14}  "
          f"{'success':>7}")
    for off, o in outcomes.items():
        steered, replayed = np.array(o.steered), np.array(o.replayed)
        print(f"{off:>9.1f}  {np.median(steered):>13.2f}  {np.mean(steered <= tolerance):>7.0%}  "
              f"{np.median(replayed):>14.2f}  {np.mean(replayed <= tolerance):>7.0%}")


if __name__ == "__main__":
    main()
