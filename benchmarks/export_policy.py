"""The exported policy step against the in-framework one, on this machine.

    python benchmarks/export_policy.py --workdir runs/quickstart [--batch 1] [--steps 10]

Exports the run (world model + action decoder, `pewm_jax.export.bundle`) into a temporary
directory, loads it with the bundle runtime and times, after one warm-up each, `--steps` policy
steps of the bundle (`BundlePolicy.step`: the deserialized StableHLO) and of the training
code's `PrimitivePolicy.step` (Flax modules under `nnx.jit`) on the same observations and
commands. Prints the median seconds of each and their ratio (exported / in-framework; about 1
means the export costs nothing), and whether both gave the same clips.

When the run has a planner, also times `--steps` plans of the bundle (`BundlePlanner.plan`:
exported prefill, then one exported decode step per token with the grammar mask in numpy,
stopping when every plan has ended) against the training code's `Planner.plan` (one jitted
scan over every new token) for the same observations and tasks: medians, ratio, same plans.

Then serves the bundle in this process (`pewm_jax.export.server`, a free port on 127.0.0.1)
and times, at batch 1 and at --batch, `--steps` round trips of `PolicyClient.step` (actions
only, after a warm-up) alternating with bundle steps: the median of each and their ratio (round
trip / bundle step; about 1 means serving costs nothing), and the median overhead a request
(round trip minus the step's time in the server: msgpack, HTTP, threads) in ms, with the part
of it spent inside the server.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from pewm_jax.control.policy import PrimitiveCommand, PrimitivePolicy
from pewm_jax.export import bundle, runtime
from pewm_jax.export.client import PolicyClient
from pewm_jax.export.server import serve
from pewm_jax.recipes.restore import restore
from pewm_jax.vlm.finetune import make_planner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a run with world_model/ and "
                        "action_decoder/")
    parser.add_argument("--batch", type=int, default=1, help="commands per policy step")
    parser.add_argument("--steps", type=int, default=10, help="timed policy steps")
    args = parser.parse_args()

    world, decoder = restore(args.workdir, "world_model"), restore(args.workdir, "action_decoder")
    config = world.config
    framework = PrimitivePolicy(world.model, config, world.tokenizer, decoder.model,
                                decoder.stats[0], batch_size=args.batch)
    n = framework.image_size
    rng = np.random.default_rng(0)
    observations = rng.integers(0, 256, (args.batch, n, n, 3), dtype=np.uint8)
    commands = [PrimitiveCommand("pick up the red cube", tuple(rng.uniform(0, n, 2)),
                                 tuple(rng.uniform(0, n, 2))) for _ in range(args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        bundle.export_bundle(args.workdir, f"{tmp}/bundle")
        export_s = time.perf_counter() - start
        loaded = runtime.load_bundle(f"{tmp}/bundle")
        exported = runtime.BundlePolicy(loaded)

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
    if loaded.has_planner:
        trained = restore(args.workdir, "planner")
        bundle_planner = runtime.BundlePlanner(loaded)
        planner = make_planner(trained.model, trained.tokenizer, trained.config)
        tasks = ["put the red cube in the left bin"] * args.batch
        ours, ours_plans = timed(lambda i: bundle_planner.plan(observations, tasks))
        theirs, their_plans = timed(lambda i: planner.plan(observations, tasks))
        scale = n / planner.image_size
        same = [[(s.text, s.start_xy, s.goal_xy) for s in p.steps] for p in ours_plans] == [
            [(s.text, (s.start_xy[0] * scale, s.start_xy[1] * scale),
              (s.goal_xy[0] * scale, s.goal_xy[1] * scale)) for s in p.steps]
            for p in their_plans]
        tokens = sum(len(s.text.split()) + 5 for s in ours_plans[0].steps)
        print(f"plan: exported {ours:.4f} s, in-framework {theirs:.4f} s, ratio "
              f"{ours / theirs:.2f} (exported / in-framework; ~{tokens} of "
              f"{planner.max_new_tokens} tokens decoded); same plans: {same}")

    server = serve(loaded)
    client = PolicyClient(server.url)
    try:
        for b in sorted({1, args.batch}):
            obs, cmds = observations[:b], commands[:b]
            exported.step(obs, cmds, step_index=0)  # warm-up: compiles
            client.step(obs, cmds, step_index=0)
            direct, replies = [], []
            for i in range(args.steps):  # alternating, so both see the same machine load
                start = time.perf_counter()
                exported.step(obs, cmds, step_index=i + 1)
                direct.append(time.perf_counter() - start)
                replies.append(client.step(obs, cmds, step_index=i + 1))
            trip = statistics.median(r.round_trip_s for r in replies)
            step = statistics.median(direct)
            overhead = statistics.median(r.round_trip_s - r.timing["step_s"] for r in replies)
            inside = statistics.median(r.timing["server_s"] - r.timing["step_s"]
                                       for r in replies)
            print(f"server round trip, batch {b}: {trip * 1e3:.1f} ms, bundle step "
                  f"{step * 1e3:.1f} ms, ratio {trip / step:.2f} (round trip / bundle step); "
                  f"overhead {overhead * 1e3:.1f} ms a request (round trip - the server's "
                  f"step), {inside * 1e3:.1f} ms of it inside the server")
    finally:
        server.close()


if __name__ == "__main__":
    main()
