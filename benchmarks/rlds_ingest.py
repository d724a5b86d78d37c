"""RLDS ingestion throughput, and what checking every TFRecord payload's CRC-32C costs.

    python benchmarks/rlds_ingest.py [--episodes 120] [--steps 38] [--repeats 5]

Writes a Bridge-layout RLDS source in a temporary directory (TFRecord shards; per step a
256x256 JPEG camera image, as in `bridge_dataset`, plus state, action and instruction), then in
one run:
- reads every record of its shards with `rlds.read_tfrecord`, with the payload check and
  without it (best of --repeats passes each, files in the page cache): records/s and MB/s;
- ingests it with `rlds.ingest` (the check on, as always: decode, crop and resize, segment,
  write clips): records/s and MB/s of the source;
and prints the check's cost as a share of the reading time and of the whole ingestion.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # rlds_fixtures: TFRecord writing without TensorFlow

import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from PIL import Image  # noqa: E402

import rlds_fixtures  # noqa: E402
from data_loaders import rlds  # noqa: E402

IMAGE = 256  # Bridge's camera side


def bridge_like(episodes: int, steps: int) -> type[tfds.core.GeneratorBasedBuilder]:
    """A builder of `episodes` Bridge-layout episodes of `steps` steps (seeded content)."""

    class BridgeLike(tfds.core.GeneratorBasedBuilder):
        name = "bridge_like"  # bridge_dataset is the test fixture's
        VERSION = tfds.core.Version("1.0.0")

        def _info(self) -> tfds.core.DatasetInfo:
            t = tfds.features
            return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                         features=t.FeaturesDict({"steps": t.Dataset({
                "observation": t.FeaturesDict({
                    "image_0": t.Image(shape=(IMAGE, IMAGE, 3), encoding_format="jpeg"),
                    "state": t.Tensor(shape=(7,), dtype=np.float32)}),
                "action": t.Tensor(shape=(7,), dtype=np.float32),
                "language_instruction": t.Text(),
                "is_first": t.Scalar(dtype=np.bool_), "is_last": t.Scalar(dtype=np.bool_),
            })}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(range(episodes))}

        def _generate_examples(self, ids):
            for e in ids:
                yield f"episode_{e}", self._episode(e)

        @staticmethod
        def _episode(e: int) -> dict:
            rng = np.random.default_rng(e)
            # A smooth scene with texture: JPEGs of a realistic size (~10-20 KB), not noise.
            yy, xx = np.mgrid[0:IMAGE, 0:IMAGE] / IMAGE
            base = np.stack([yy, xx, (xx + yy) / 2], -1) * 200
            gripper = (np.arange(steps) % 12 < 6).astype(np.float32)
            out = []
            for i in range(steps):
                image = base + rng.normal(0, 12, base.shape) + 10 * i
                state = np.r_[0.01 * i, 0.02 * i, 0.1, 0, 0, 0, gripper[i]].astype(np.float32)
                out.append({"observation": {
                    "image_0": Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)),
                    "state": state},
                    "action": np.r_[rng.normal(0, 0.01, 6), gripper[i]].astype(np.float32),
                    "language_instruction": "put the carrot in the pot",
                    "is_first": i == 0, "is_last": i == steps - 1})
            return {"steps": out}

    return BridgeLike


def read_all(shards: list[pathlib.Path], verify: bool, repeats: int) -> tuple[int, int, float]:
    """(records, bytes, best seconds) of reading every record of `shards`."""
    best, records, size = float("inf"), 0, 0
    for _ in range(repeats):
        start, records, size = time.perf_counter(), 0, 0
        for shard in shards:
            for _, data in rlds.read_tfrecord(shard, verify_data=verify):
                records, size = records + 1, size + len(data)
        best = min(best, time.perf_counter() - start)
    return records, size, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=120, help="episodes in the source")
    parser.add_argument("--steps", type=int, default=38, help="steps per episode (Bridge: ~38)")
    parser.add_argument("--repeats", type=int, default=5, help="reading passes, best counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = rlds_fixtures.write_builder(bridge_like(args.episodes, args.steps),
                                             pathlib.Path(tmp) / "source", "tfrecord")
        shards = sorted(source.glob("*.tfrecord*"))
        mb = sum(os.path.getsize(s) for s in shards) / 1e6
        print(f"source: {args.episodes} episodes x {args.steps} steps of {IMAGE}x{IMAGE} JPEG, "
              f"{len(shards)} shard(s), {mb:.1f} MB")
        rows = {}
        for verify in (False, True):
            n, size, seconds = read_all(shards, verify, args.repeats)
            rows[verify] = seconds
            print(f"read records, payload CRC {'checked' if verify else 'not checked'}: "
                  f"{n / seconds:,.0f} records/s, {size / 1e6 / seconds:,.0f} MB/s")
        print(f"  the check costs {rows[True] / rows[False] - 1:+.1%} of the reading time")
        spec = rlds.load_spec(ROOT / "configs" / "rlds" / "bridge.py")
        start = time.perf_counter()
        meta = rlds.ingest(spec, source, pathlib.Path(tmp) / "clips", horizon=8,
                           frame_stride=2, context_frames=1, image_size=64)
        seconds = time.perf_counter() - start
        records = sum(c["episodes"] for c in meta.episodes.values())
        print(f"whole ingestion, check on (decode, crop and resize, segment, write "
              f"{sum(meta.splits.values())} clips): {records / seconds:,.1f} records/s, "
              f"{mb / seconds:,.2f} MB/s")
        print(f"  the check's share of the ingestion time: "
              f"{(rows[True] - rows[False]) / seconds:.3%}")


if __name__ == "__main__":
    main()
