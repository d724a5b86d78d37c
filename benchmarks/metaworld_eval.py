"""Meta-World on this machine: rendering speed, primitive generation latency, and closed-loop
success on the reduced protocol (needs the `metaworld` extra).

    python benchmarks/metaworld_eval.py --workdir runs/metaworld [--config configs/metaworld.py]
        [--render_steps 200] [--latency_steps 10] [--no_protocol]

Prints, each measured in this run:
  * environment steps per second with a 128x128 `corner` frame rendered every step, with the
    fast render settings against Meta-World's defaults (multisampling, shadows, reflections):
    their ratio;
  * the run's primitive step at batch 1 (the world model samples one clip with the config's
    sampler steps, the action decoder reads its actions): median seconds against the 0.5 s
    control aim (ratio < 1 meets it);
  * the closed-loop protocol the config sets (configs/metaworld.py: the reduced one, 3 tasks x
    1 camera x 5 seeds): per-task and mean success of every condition, the wall time, and each
    condition's mean success against the scripted expert's, beside the published means.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import pewm_jax.metaworld  # noqa: F401  (selects MuJoCo's EGL backend first)

import numpy as np

from pewm_jax.config import load_config
from pewm_jax.control.policy import PrimitiveCommand
from pewm_jax.evaluate.closed_loop import RunModels
from pewm_jax.evaluate import metaworld as mw_eval
from pewm_jax.metaworld.env import MetaWorldEnv

AIM_SECONDS = 0.5


def steps_per_second(fast: bool, steps: int, image_size: int = 128) -> float:
    """Environment steps per second, a frame rendered each step (random actions)."""
    env = MetaWorldEnv("door-open", camera="corner", image_size=image_size, fast_render=fast)
    try:
        env.reset(seed=0)
        actions = np.random.default_rng(0).uniform(-1, 1, (steps, 4)).astype(np.float32)
        start = time.perf_counter()
        for a in actions:
            env.step(a)
        return steps / (time.perf_counter() - start)
    finally:
        env.close()


def primitive_latency(workdir: str, steps: int) -> float:
    """Median seconds of one primitive step (generate + decode) at batch 1, after a warm-up."""
    policy = RunModels(pathlib.Path(workdir), 1, 0).policy("world_model")
    if policy is None:
        raise SystemExit(f"{workdir} has no trained world model and action decoder; run "
                         "`pewm run --config=configs/metaworld.py --workdir=...` first")
    env = MetaWorldEnv("door-open", camera="corner", image_size=policy.image_size)
    try:
        image = env.reset(seed=0)[0]["image"][None]
    finally:
        env.close()
    command = [PrimitiveCommand("move the gripper above the door handle", (30.0, 30.0),
                                (40.0, 20.0))]
    times = []
    for i in range(steps + 1):
        out = policy.step(image, command, step_index=i)
        times.append(out.generate_s + out.decode_s)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a `pewm run` of configs/metaworld.py")
    parser.add_argument("--config", default="configs/metaworld.py")
    parser.add_argument("--render_steps", type=int, default=200)
    parser.add_argument("--latency_steps", type=int, default=10)
    parser.add_argument("--no_protocol", action="store_true", help="skip the closed loop")
    args = parser.parse_args()

    fast, slow = steps_per_second(True, args.render_steps), steps_per_second(False,
                                                                             args.render_steps)
    print(f"env steps/s with a 128x128 frame each step: fast render {fast:.1f}, Meta-World "
          f"defaults {slow:.1f}: {fast / slow:.1f}x")
    seconds = primitive_latency(args.workdir, args.latency_steps)
    print(f"primitive step at batch 1 (generate + decode): {seconds:.3f} s = "
          f"{seconds / AIM_SECONDS:.2f}x the {AIM_SECONDS} s aim")
    if args.no_protocol:
        return
    config = load_config(args.config)
    start = time.perf_counter()
    report = mw_eval.evaluate_run(config, args.workdir)
    print(mw_eval.headline(report))
    minutes = (time.perf_counter() - start) / 60
    mw = config.metaworld
    print(f"protocol {len(mw.eval_tasks)} tasks x {len(mw.eval_cameras)} cameras x "
          f"{mw.eval_seeds} seeds, conditions {list(mw.eval_conditions)}: {minutes:.1f} min")
    conditions = report["conditions"]
    expert = conditions.get("expert", {}).get("mean_success")
    if expert:
        for name, c in conditions.items():
            if "mean_success" in c:
                print(f"{name}: mean success {c['mean_success']:.1%} = "
                      f"{c['mean_success'] / expert:.2f}x the scripted expert's")


if __name__ == "__main__":
    main()
