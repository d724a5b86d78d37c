"""How precisely a push must be executed in the built-in world: the scripted expert's push with
its path moved sideways by a fraction of a pixel.

    python benchmarks/push_precision.py [--scenes 60] [--offsets 0 0.1 0.2 0.3 0.5 1]

For each of --scenes push primitives (the first push of `push_two` tasks, seeded), the expert's
plan is run with the point where the gripper is lowered and the point where the push ends both
moved sideways (perpendicular to the push) by each offset, in pixels of a 64-pixel frame. It
prints, per offset, the median distance of the pushed object from its target and the push's
success, beside the unmoved expert (offset 0): the precision an action decoder needs for pushes
to succeed (the README's action decoder section). The lowered gripper pushes with a flat pad
(`sim.world.GRIPPER_PAD_HALF`), so an object touching its face moves straight along the push
and keeps only its sideways offset; past the face's half width it meets a corner and slides off.
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
from pewm_jax.sim.primitives import PUSH_TOLERANCE, Expert  # noqa: E402
from pewm_jax.sim.world import clip_action, step_state  # noqa: E402

IMAGE_SIZE = 64  # the quickstart's frame size: offsets are in its pixels


def shifted_push_errors(scenes: int, offsets: list[float]) -> dict[float, np.ndarray]:
    """Per offset (pixels), the pushed object's distance from its target (pixels) in each
    scene, the expert's push path moved sideways by that offset."""
    env = TabletopEnv(IMAGE_SIZE)
    errors: dict[float, list[float]] = {off: [] for off in offsets}
    for seed in range(scenes):
        env.reset(seed=2 ** 40 + seed, options={"split": "train", "template": "push_two"})
        approach, push = env.setup.plans[:2]  # push_two: the first push, its approach before it
        side = np.array([-push.direction[1], push.direction[0]])
        for off in offsets:
            delta = side * off / IMAGE_SIZE
            ops = [(op, arg + delta if op == "move" else arg) for op, arg in approach.ops + push.ops]
            expert = Expert(dataclasses.replace(push, ops=ops), env.max_delta)
            state = env.state.copy()
            while not expert.done:
                step_state(state, clip_action(expert.act(state), env.max_delta)[0])
            obj = state.positions[push.obj_index]
            errors[off].append(float(np.hypot(*(obj - push.target))) * IMAGE_SIZE)
    return {off: np.array(v) for off, v in errors.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--offsets", type=float, nargs="+", default=[0, 0.1, 0.2, 0.3, 0.5, 1])
    args = parser.parse_args()
    errors = shifted_push_errors(args.scenes, sorted(set([0.0] + args.offsets)))
    tolerance = PUSH_TOLERANCE * IMAGE_SIZE
    print(f"{args.scenes} pushes; success: object within {tolerance:.2f} px of its target")
    print(f"{'sideways offset px':>18}  {'object error px (median)':>24}  {'success':>8}")
    for off, err in errors.items():
        print(f"{off:>18.2f}  {np.median(err):>24.2f}  {np.mean(err <= tolerance):>8.0%}")


if __name__ == "__main__":
    main()
