"""Input pipeline throughput: clips/s the Grain pipeline delivers on this machine.

    python benchmarks/input_pipeline.py [--seconds 10] [--workers 0,2] [--episodes 40]

Generates a small tabletop dataset in a temporary directory at quickstart shapes
(configs/quickstart.py: 64x64 frames, 8 future frames) and at base shapes
(configs/pewm_base.py: 256x256 frames, 16 future frames), then reads training batches (per-process
batch = the preset's global batch, one process; augmentation on, as in training) with each
number of worker processes and prints clips/s after the first batch, and the time to that first
batch (worker start-up). At quickstart shapes it also times the quickstart train step (loss +
grad + AdamW, benchmarks/model_step.py) in the same run and prints the headroom: pipeline clips/s
over the clips/s that step consumes (aim: >= 5x with 2 workers).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402

from configs import pewm_base, quickstart  # noqa: E402
from benchmarks import model_step  # noqa: E402
from data_loaders import pipeline, tabletop  # noqa: E402


def shapes(episodes: int) -> dict[str, ml_collections.ConfigDict]:
    """Name -> config of each measured shape, with a small dataset's episode counts."""
    configs = {"quickstart": quickstart.get_config(), "base": pewm_base.get_config("h100x8")}
    for config in configs.values():
        config.data.num_train_episodes = episodes
        config.data.num_val_episodes = config.data.num_test_episodes = 1
        config.data.num_holdout_episodes = 1
    return configs


def clips_per_sec(config: ml_collections.ConfigDict, workers: int, seconds: float,
                  min_batches: int) -> tuple[float, float]:
    """(clips/s after the first batch, seconds to the first batch) with `workers` processes."""
    start = time.perf_counter()
    with pipeline.make_iterator(config, num_workers=workers, process_index=0,
                                process_count=1) as it:
        next(it)
        first = time.perf_counter() - start
        batches, start = 0, time.perf_counter()
        while batches < min_batches or time.perf_counter() - start < seconds:
            next(it)
            batches += 1
        elapsed = time.perf_counter() - start
    return batches * config.train.global_batch_size / elapsed, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="time per measurement")
    parser.add_argument("--min_batches", type=int, default=3, help="fewest batches timed")
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    parser.add_argument("--episodes", type=int, default=40, help="train episodes generated")
    args = parser.parse_args()
    worker_counts = [int(w) for w in args.workers.split(",")]
    train = quickstart.get_config()
    _, step_s = model_step.train_step_seconds(train, train.train.global_batch_size, steps=10)
    consumed = train.train.global_batch_size / step_s
    print(f"quickstart train step: {step_s * 1e3:.0f} ms per step of "
          f"{train.train.global_batch_size} clips = {consumed:.1f} clips/s consumed")
    print(f"{'shapes':>10} {'frames':>9} {'batch':>5} {'workers':>7} {'clips/s':>8} "
          f"{'first batch s':>13} {'headroom':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in shapes(args.episodes).items():
            config.data.dataset_dir = os.path.join(tmp, name)
            tabletop.generate_dataset(config, config.data.dataset_dir)
            n = config.world.image_size
            frames = f"{config.data.horizon}x{n}x{n}"
            for workers in worker_counts:
                rate, first = clips_per_sec(config, workers, args.seconds, args.min_batches)
                headroom = f"{rate / consumed:>8.1f}x" if name == "quickstart" else ""
                print(f"{name:>10} {frames:>9} {config.train.global_batch_size:>5} {workers:>7} "
                      f"{rate:>8.1f} {first:>13.2f} {headroom:>9}", flush=True)


if __name__ == "__main__":
    main()
