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
    and, separately, the wait for the last save to commit after the loop.
On a GPU machine the same script reports MFU against the GPU's measured bf16 peak when run
with --dtype bfloat16 (aim: >= 40% at the mid size on one H100).
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import jax
import jax.numpy as jnp

from pewm_jax.config import load_config
from pewm_jax.models.flops import world_model_flops
from pewm_jax.train import loop
from pewm_jax.train import metrics

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
SMALL_DATA = ["data.num_train_episodes=40", "data.num_val_episodes=4",
              "data.num_test_episodes=4", "data.num_holdout_episodes=4"]


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
            result = loop.train(config, pathlib.Path(tmp) / size)
            rate = (result.step - 1) / result.run_seconds
            batch = config.train.global_batch_size
            flops = world_model_flops(config, batch).forward_backward
            mfu = metrics.mfu(flops, 1 / rate, *loop.peak_flops(config))
            rows.append((size, batch, rate, rate * batch, mfu,
                         result.checkpoint_seconds / result.run_seconds,
                         result.final_wait_seconds))
    print(f"\n{'config':<11}{'batch':>6}{'steps/s':>9}{'ex/s':>8}{'MFU':>7}"
          f"{'ckpt blocked':>14}{'final wait':>12}")
    for size, batch, rate, examples, mfu, blocked, wait in rows:
        print(f"{size:<11}{batch:>6}{rate:>9.2f}{examples:>8.1f}{mfu:>7.1%}{blocked:>14.1%}"
              f"{wait:>11.2f}s")
    print(f"\naim: checkpoint blocked < 5% with saves every {args.checkpoint_every} steps")


if __name__ == "__main__":
    main()
