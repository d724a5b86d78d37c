"""Tabletop world throughput on one core: env steps/s with rendering, and expert data rate.

    python benchmarks/sim_throughput.py [--seconds 3] [--train_clips_per_sec X]

Prints, for 64x64 and 128x128 frames: `env.step` calls per second (render included) under
random in-bound actions, and expert-episode generation (reset + rejection rule + planning +
stepping + rendering) in env steps/s and in clips/s, where a clip is `horizon * frame_stride`
env steps (configs/quickstart.py). The ratio printed is the measured rate over the issue's aim
of 2,000 steps/s at 64x64; with `--train_clips_per_sec` (the quickstart train rate, from
benchmarks/train_throughput.py once training exists) it also prints generation / consumption.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from pewm_jax.sim import TabletopEnv, expert_episode

AIM_STEPS_PER_SEC = 2000.0
STEPS_PER_CLIP = 8 * 4  # quickstart horizon x frame_stride


def env_steps_per_sec(size: int, seconds: float) -> float:
    env = TabletopEnv(size)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = rng.uniform(env.action_space.low, env.action_space.high, (4096, 3)).astype(np.float32)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for a in actions[:256]:
            _, _, terminated, truncated, _ = env.step(a)
            n += 1
            if terminated or truncated:
                env.reset(seed=n)
    return n / (time.perf_counter() - start)


def expert_steps_per_sec(size: int, seconds: float) -> float:
    env = TabletopEnv(size)
    n, seed, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += len(expert_episode(env, seed).actions)
        seed += 1
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--train_clips_per_sec", type=float, default=None,
                        help="clips/s the train step consumes, to print generation/consumption")
    args = parser.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    print(f"{'frames':>8} {'env steps/s':>12} {'vs aim':>7} {'expert steps/s':>15} {'clips/s':>8}"
          + ("  gen/train" if args.train_clips_per_sec else ""))
    for size in (64, 128):
        env_rate = env_steps_per_sec(size, args.seconds)
        expert_rate = expert_steps_per_sec(size, args.seconds)
        clips = expert_rate / STEPS_PER_CLIP
        line = (f"{size:>5}x{size:<2} {env_rate:>12.0f} {env_rate / AIM_STEPS_PER_SEC:>6.2f}x"
                f" {expert_rate:>15.0f} {clips:>8.1f}")
        if args.train_clips_per_sec:
            line += f"  {clips / args.train_clips_per_sec:>8.2f}x"
        print(line)


if __name__ == "__main__":
    main()
