"""The exported policy step against the in-framework one, on this machine.

    python benchmarks/export_policy.py --workdir runs/quickstart [--batch 1] [--steps 10]

Exports the run (world model + action decoder, `pewm_jax.export.bundle`) into a temporary
directory, loads it with the bundle runtime and times, after one warm-up each, `--steps` policy
steps of the bundle (`BundlePolicy.step`: the deserialized StableHLO) and of the training
code's `PrimitivePolicy.step` (Flax modules under `nnx.jit`) on the same observations and
commands. Prints the median seconds of each and their ratio (exported / in-framework; about 1
means the export costs nothing), and whether both gave the same clips.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from pewm_jax.control.policy import PrimitiveCommand, PrimitivePolicy
from pewm_jax.evaluate.actions import load_action_decoder
from pewm_jax.evaluate.video_quality import load_world_model
from pewm_jax.export import bundle, runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a run with world_model/ and "
                        "action_decoder/")
    parser.add_argument("--batch", type=int, default=1, help="commands per policy step")
    parser.add_argument("--steps", type=int, default=10, help="timed policy steps")
    args = parser.parse_args()

    world_model, config, tokenizer = load_world_model(args.workdir)
    decoder, _, stats = load_action_decoder(args.workdir)
    framework = PrimitivePolicy(world_model, config, tokenizer, decoder, stats[0],
                                batch_size=args.batch)
    n = framework.image_size
    rng = np.random.default_rng(0)
    observations = rng.integers(0, 256, (args.batch, n, n, 3), dtype=np.uint8)
    commands = [PrimitiveCommand("pick up the red cube", tuple(rng.uniform(0, n, 2)),
                                 tuple(rng.uniform(0, n, 2))) for _ in range(args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        bundle.export_bundle(args.workdir, f"{tmp}/bundle")
        export_s = time.perf_counter() - start
        exported = runtime.BundlePolicy(runtime.load_bundle(f"{tmp}/bundle"))

    def timed(step) -> tuple[float, np.ndarray]:
        clips = step(0)  # warm-up: compiles
        times = []
        for i in range(args.steps):
            start = time.perf_counter()
            step(i + 1)
            times.append(time.perf_counter() - start)
        return statistics.median(times), clips

    ours, ours_clips = timed(lambda i: exported.step(observations, commands,
                                                     step_index=i).clips)
    theirs, their_clips = timed(lambda i: framework.step(observations, commands,
                                                         step_index=i).clips)
    print(f"export: {export_s:.1f} s; batch {args.batch}, H={framework.horizon}, "
          f"{config.diffusion.num_steps} sampler steps")
    print(f"policy step: exported {ours:.4f} s, in-framework {theirs:.4f} s, "
          f"ratio {ours / theirs:.2f} (exported / in-framework)")
    print(f"same clips: {np.array_equal(ours_clips, their_clips)}")


if __name__ == "__main__":
    main()
