"""Train-loop throughput, MFU and checkpoint cost of the real `pewm train` loop on this machine.

    python benchmarks/train_throughput.py [--sizes quickstart,mid] [--steps 200,12]
                                          [--checkpoint_every 50] [--dataset_dir DIR]

Measures, in one run:
  * this machine's matmul peak in the model's compute dtype (best of several jitted 2048^3
    products on one device; on CPU that is the whole host), used as MFU's denominator;
  * per config: `pewm_jax.train.loop.train` end to end (Grain pipeline, global batch, jitted
    sharded step, metrics, async Orbax checkpoints every --checkpoint_every steps) on a small
    generated built-in-world dataset, timed from the end of the first (compiling) step;
    steps/s, examples/s, MFU = analytic forward+backward FLOPs per step * steps/s / peak;
  * the fraction of that time the loop was blocked starting checkpoint saves (aim < 5%),
    and, separately, the wait for the last save to commit after the loop;
  * what checkpoint checksums cost: at save, the time to fingerprint the state (params, EMA,
    optimizer state: `pewm_jax/train/fingerprint.py`) against the time a save blocks the loop;
    at restore, the verified `RunCheckpoints.restore` of the last step against Orbax's restore
    of the same arrays alone (each the best of 3).
On a GPU machine the same script reports MFU against the GPU's measured bf16 peak when run
with --dtype bfloat16 (aim: >= 40% at the mid size on one H100).
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from pewm_jax.text import tokenizer as tokenizer_lib
from pewm_jax.config import load_config
from pewm_jax.models.flops import world_model_flops
from pewm_jax.parallel import mesh as mesh_lib
from pewm_jax.train import checkpoint as ckpt_lib
from pewm_jax.recipes import kinds
from pewm_jax.train import fingerprint, loop
from pewm_jax.train import metrics
from pewm_jax.train import state as state_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
SMALL_DATA = ["data.num_train_episodes=40", "data.num_val_episodes=4",
              "data.num_test_episodes=4", "data.num_holdout_episodes=4"]


def best_seconds(run: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls of `run` (its result blocked on), after a warm-up."""
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return min(times)


def checksum_costs(config, result: loop.TrainResult) -> tuple[float, float, float]:
    """(seconds to fingerprint the state, seconds of a verified restore, seconds of Orbax's
    restore of the same arrays alone) for the run's last checkpoint."""
    arrays = {name: getattr(result.state, name) for name in ckpt_lib.ARRAY_ITEMS}
    fingerprint_s = best_seconds(lambda: fingerprint.fingerprints(arrays))
    vocab = tokenizer_lib.load_tokenizer(
        pathlib.Path(config.data.dataset_dir, "tokenizer.json")).get_vocab_size()
    layout = state_lib.state_layout(config, vocab, mesh_lib.make_mesh(config), kinds.WORLD_MODEL)
    checkpoints = ckpt_lib.RunCheckpoints(result.checkpoint_dir, read_only=True)
    try:
        verified_s = best_seconds(lambda: checkpoints.restore(result.step, layout, None)[0])
        alone = ocp.args.Composite(**{name: ocp.args.StandardRestore(getattr(layout.abstract,
                                                                            name))
                                      for name in ckpt_lib.ARRAY_ITEMS})
        orbax_s = best_seconds(lambda: dict(checkpoints.manager.restore(result.step, args=alone)))
    finally:
        checkpoints.close()
    return fingerprint_s, verified_s, orbax_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="quickstart,mid", help="configs/<name>.py to run")
    parser.add_argument("--steps", default="200,12", help="train steps per size")
    parser.add_argument("--checkpoint_every", type=int, default=50)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="model compute dtype (and the matmul peak's)")
    parser.add_argument("--dataset_dir", default=None,
                        help="an existing dataset (default: generate a small one)")
    args = parser.parse_args()
    sizes, steps = args.sizes.split(","), [int(s) for s in args.steps.split(",")]

    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
    peak = metrics.measured_matmul_peak(jnp.dtype(args.dtype))
    print(f"measured matmul peak ({args.dtype}, one device): {peak / 1e9:,.1f} GFLOP/s")
    with tempfile.TemporaryDirectory(prefix="pewm-train-bench-") as tmp:
        dataset = args.dataset_dir or str(pathlib.Path(tmp) / "data")
        rows = []
        for size, n in zip(sizes, steps):
            config = load_config(str(CONFIGS / f"{size}.py"), [
                *SMALL_DATA, f"data.dataset_dir={dataset}", f"train.steps={n}",
                f"train.checkpoint_every={args.checkpoint_every}", "train.log_every=10",
                "train.sample_clips=0", f"train.peak_flops_per_device={peak}",
                f"model.dtype={args.dtype}"], jax.device_count())
            if not pathlib.Path(dataset, "pewm_dataset.json").exists():
                from data_loaders import tabletop
                tabletop.generate_dataset(config, dataset)
            result = loop.train(config, pathlib.Path(tmp) / size, kind=kinds.WORLD_MODEL)
            rate = (result.step - 1) / result.run_seconds
            batch = config.train.global_batch_size
            flops = world_model_flops(config, batch).forward_backward
            mfu = metrics.mfu(flops, 1 / rate, *loop.peak_flops(config))
            saves = len([s for s in range(1, n + 1) if s % args.checkpoint_every == 0 or s == n])
            rows.append((size, batch, rate, rate * batch, mfu,
                         result.checkpoint_seconds / result.run_seconds,
                         result.final_wait_seconds, result.checkpoint_seconds / max(saves, 1),
                         *checksum_costs(config, result)))
    print(f"\n{'config':<11}{'batch':>6}{'steps/s':>9}{'ex/s':>8}{'MFU':>7}"
          f"{'ckpt blocked':>14}{'final wait':>12}")
    for size, batch, rate, examples, mfu, blocked, wait, *_ in rows:
        print(f"{size:<11}{batch:>6}{rate:>9.2f}{examples:>8.1f}{mfu:>7.1%}{blocked:>14.1%}"
              f"{wait:>11.2f}s")
    print(f"\naim: checkpoint blocked < 5% with saves every {args.checkpoint_every} steps")
    print(f"\ncheckpoint checksums: {'config':<11}{'fingerprint':>12}{'save blocks':>13}"
          f"{'share':>7}{'restore':>10}{'Orbax alone':>13}{'share':>7}")
    for size, *_, per_save, fingerprint_s, verified_s, orbax_s in rows:
        print(f"{'':<22}{size:<11}{fingerprint_s * 1e3:>10.1f}ms{per_save * 1e3:>11.1f}ms"
              f"{fingerprint_s / per_save:>7.0%}{verified_s * 1e3:>8.1f}ms{orbax_s * 1e3:>11.1f}ms"
              f"{fingerprint_s / verified_s:>7.0%}")
    print("(fingerprint: one pass over the state, the check's cost at save and at restore; save "
          "blocks: the loop's wait per save, fingerprinting included; restore: verified "
          "`RunCheckpoints.restore` (structure, meta and checksums read), against Orbax's "
          "restore of the arrays alone)")


if __name__ == "__main__":
    main()
