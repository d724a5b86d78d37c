"""How a training run is doing, for the operator: TensorBoard event files and a JSON-lines log
of scalars, a progress bar, pictures of sampled clips beside ground truth, and model FLOPs
utilization (MFU) against a vendor or measured peak.

TensorBoard events are written with tensorboard's own writer and protos, so TensorFlow is not
needed (`flax.metrics.tensorboard` imports it).
"""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import re
import sys
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from etils import epath
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
SEPARATOR = 2  # white pixels between frames in `clip_grid` / `clip_animation`
CLIP_GAP = 8  # white pixels between clips


class MetricWriter:
    """Writes scalars, images, videos and text to TensorBoard event files under `logdir`, and
    scalars also to `<logdir>/metrics.jsonl`; with `enabled=False` (non-zero JAX processes) it
    does nothing and creates nothing.

    `resumed_at`: the step a run continues from (its checkpoint's, or 0). What an interrupted
    run logged after it is dropped, so the logs read as one uninterrupted run: rows of later steps
    leave metrics.jsonl, and a TensorBoard SessionLog.START at the next step makes TensorBoard
    discard the older event files' points from that step on (its restart convention).
    """

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True,
                 resumed_at: int | None = None):
        self.enabled = enabled
        if not enabled:
            return
        # TensorBoard writes gs:// and other fsspec URLs itself; metrics.jsonl is appended to,
        # which object stores cannot do, so it is written for local log directories only.
        remote = "://" in str(logdir)
        self.logdir = epath.Path(logdir) if remote else pathlib.Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._events = EventFileWriter(str(self.logdir), flush_secs=30)
        if resumed_at is not None:
            self._events.add_event(event_pb2.Event(
                wall_time=time.time(), step=resumed_at + 1,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        self._jsonl = None
        if not remote:
            jsonl = self.logdir / METRICS_FILE
            _keep_rows_until(jsonl, resumed_at)
            self._jsonl = jsonl.open("a", encoding="utf-8")

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One TensorBoard scalar per key, and one flushed `{"step": step, **values}` JSON line."""
        if not self.enabled:
            return
        values = {k: float(v) for k, v in values.items()}
        self._add(step, [summary_pb2.Summary.Value(tag=k, simple_value=v)
                         for k, v in values.items()])
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
            self._jsonl.flush()

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """uint8 (H, W, 3) arrays as PNG image summaries."""
        if not self.enabled:
            return
        self._add(step, [_image_value(k, [np.asarray(v)], "PNG", {}) for k, v in images.items()])

    def videos(self, step: int, videos: Mapping[str, np.ndarray], fps: int = 4) -> None:
        """uint8 (T, H, W, 3) arrays as looping animated-GIF image summaries (TensorBoard's image
        dashboard plays them)."""
        if not self.enabled:
            return
        options = {"save_all": True, "duration": round(1000 / fps), "loop": 0}
        self._add(step, [_image_value(k, list(np.asarray(v)), "GIF", options)
                         for k, v in videos.items()])

    def text(self, step: int, name: str, text: str) -> None:
        """A text summary (markdown), e.g. the run's config recorded once at the start."""
        if not self.enabled:
            return
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode()],
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto())
        metadata = text_metadata.create_summary_metadata(display_name=name, description="")
        self._add(step, [summary_pb2.Summary.Value(tag=name, metadata=metadata, tensor=tensor)])

    def flush(self) -> None:
        """Writes everything buffered to disk."""
        if self.enabled:
            self._events.flush()
            if self._jsonl is not None:
                self._jsonl.flush()

    def close(self) -> None:
        """Flushes and closes the files; the writer is unusable afterwards."""
        if self.enabled:
            self._events.close()
            if self._jsonl is not None:
                self._jsonl.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _add(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                               summary=summary_pb2.Summary(value=values)))


def log(message: str) -> None:
    """Prints `message` on process 0 only (the one that also writes the metrics)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def host_value(x: jax.Array) -> np.ndarray:
    """A replicated array's value on this host (no cross-host transfer)."""
    return np.asarray(x.addressable_data(0))


def _image_value(tag: str, frames: list[np.ndarray], fmt: str,
                 options: dict) -> summary_pb2.Summary.Value:
    if frames[0].dtype != np.uint8 or frames[0].ndim != 3 or frames[0].shape[-1] != 3:
        raise ValueError(f"{tag}: expected uint8 (H, W, 3) frames, got {frames[0].dtype} "
                         f"{frames[0].shape}")
    pictures = [Image.fromarray(f) for f in frames]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format=fmt, append_images=pictures[1:], **options)
    h, w, _ = frames[0].shape
    image = summary_pb2.Summary.Image(height=h, width=w, colorspace=3,
                                      encoded_image_string=buffer.getvalue())
    return summary_pb2.Summary.Value(tag=tag, image=image)


def _keep_rows_until(path: pathlib.Path, last_step: int | None) -> None:
    """Cuts an unterminated last line (a killed writer's) so that appended lines stay whole,
    and with `last_step` the rows of later steps (written after the checkpoint a run resumes
    from). The file is replaced in one rename, never left half-written."""
    if not path.exists():
        return
    data = path.read_bytes()
    lines = data[:data.rfind(b"\n") + 1].splitlines(keepends=True)
    if last_step is not None:
        lines = [line for line in lines
                 if not line.strip() or json.loads(line)["step"] <= last_step]
    kept = b"".join(lines)
    if kept != data:
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(kept)
        os.replace(partial, path)


def read_metrics(logdir: str | os.PathLike) -> dict[int, dict[str, float]]:
    """The scalars of `<logdir>/metrics.jsonl` by step; an unparsable unterminated last line
    (a killed writer's) is ignored. (A resumed run drops what it logs again, `MetricWriter`'s
    `resumed_at`; should a step still appear twice, its later value per key counts.)"""
    text = (pathlib.Path(logdir) / METRICS_FILE).read_text(encoding="utf-8")
    lines = text.split("\n")
    metrics: dict[int, dict[str, float]] = {}
    for i, line in enumerate(lines):
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
        step = int(record.pop("step"))
        metrics.setdefault(step, {}).update(record)
    return metrics


class ProgressBar:
    """A tqdm bar on stderr over training steps with compact postfix values (loss, steps/s);
    does nothing when `enabled` is False."""

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True):
        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                         mininterval=1.0, file=sys.stderr) if enabled else None

    def update(self, step: int, **postfix: float) -> None:
        """Moves the bar to absolute `step` and shows `postfix`, e.g. `loss=0.123`."""
        if self._bar is None:
            return
        self._bar.set_postfix({k: f"{float(v):.4g}" for k, v in postfix.items()}, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        """Leaves the bar at its last state."""
        if self._bar is not None:
            self._bar.close()


def _uint8(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    return np.clip(np.round(frames.astype(np.float32) * 255), 0, 255).astype(np.uint8)


def _mosaic(tiles: np.ndarray, rows_per_group: int) -> np.ndarray:
    """Tiles (R, C, N, N, 3) on white: SEPARATOR pixels between tiles, CLIP_GAP between groups
    of `rows_per_group` rows."""
    rows, cols, n = tiles.shape[:3]
    groups = rows // rows_per_group
    height = rows * n + (rows - groups) * SEPARATOR + (groups - 1) * CLIP_GAP
    width = cols * n + (cols - 1) * SEPARATOR
    canvas = np.full((height, width, 3), 255, np.uint8)
    group_height = rows_per_group * (n + SEPARATOR) - SEPARATOR
    for r in range(rows):
        group, within = divmod(r, rows_per_group)
        y = group * (group_height + CLIP_GAP) + within * (n + SEPARATOR)
        for c in range(cols):
            x = c * (n + SEPARATOR)
            canvas[y:y + n, x:x + n] = tiles[r, c]
    return canvas


def _clip_tiles(context: np.ndarray, truth: np.ndarray, sampled: np.ndarray):
    context, truth, sampled = _uint8(context), _uint8(truth), _uint8(sampled)
    if truth.shape != sampled.shape or context.shape[0] != truth.shape[0] \
            or context.shape[2:] != truth.shape[2:]:
        raise ValueError(f"clip shapes disagree: context {context.shape}, truth {truth.shape}, "
                         f"sampled {sampled.shape}")
    return context[:, -1], truth, sampled


def clip_grid(context: np.ndarray, truth: np.ndarray, sampled: np.ndarray) -> np.ndarray:
    """Sampled clips beside ground truth as one uint8 image: per clip b, row [last context frame |
    truth 1..T] above row [last context frame | sampled 1..T].

    context (B, C, N, N, 3) uint8, truth (B, T, N, N, 3) uint8, sampled (B, T, N, N, 3) uint8 or
    float in [0, 1]. Frames are SEPARATOR white pixels apart, clips CLIP_GAP apart: clip b,
    row k (0 truth, 1 sampled), frame t (1..T) starts at y = b * (2N + SEPARATOR + CLIP_GAP) +
    k * (N + SEPARATOR), x = t * (N + SEPARATOR)."""
    last, truth, sampled = _clip_tiles(context, truth, sampled)
    b, t = truth.shape[:2]
    first = np.broadcast_to(last[:, None, None], (b, 2, 1, *last.shape[1:]))
    frames = np.stack([truth, sampled], 1)  # (B, 2, T, N, N, 3)
    tiles = np.concatenate([first, frames], 2).reshape(2 * b, t + 1, *truth.shape[2:])
    return _mosaic(tiles, rows_per_group=2)


def clip_animation(context: np.ndarray, truth: np.ndarray, sampled: np.ndarray) -> np.ndarray:
    """The clips as a (T, H', W', 3) uint8 video for `MetricWriter.videos`: at each time step one
    row per clip of [last context frame | truth frame | sampled frame]. Inputs as `clip_grid`."""
    last, truth, sampled = _clip_tiles(context, truth, sampled)
    return np.stack([_mosaic(np.stack([last, truth[:, i], sampled[:, i]], 1), rows_per_group=1)
                     for i in range(truth.shape[1])])


def measured_matmul_peak(dtype: DTypeLike = jnp.float32, n: int = 2048, repeats: int = 5,
                         device: jax.Device | None = None) -> float:
    """Best FLOP/s (2 n^3 per product) of a jitted n x n `jnp.dot` of random normal `dtype`
    matrices on `device` (default the first local device) over `repeats` timed runs after a
    warm-up; the MFU denominator where no vendor peak is known."""
    device = device or jax.local_devices()[0]
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), dtype), device)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), dtype), device)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


# Vendor dense peak FLOP/s per chip as (pattern on lower-case `device_kind`, 16-bit, float32);
# first match wins. GPU float32 is TF32 tensor-core; TPU float32 matmuls run as bf16 passes on
# the MXU under JAX's default precision, so they share the bf16 figure.
_VENDOR_PEAKS = (
    (r"h100.*pcie", 756e12, 378e12),
    (r"h100", 989e12, 494.7e12),  # SXM, "NVIDIA H100 80GB HBM3"
    (r"h200", 989e12, 494.7e12),
    (r"a100", 312e12, 156e12),
    (r"^tpu v4$", 275e12, 275e12),
    (r"^tpu v5( lite|e)$", 197e12, 197e12),
    (r"^tpu v5p?$", 459e12, 459e12),  # JAX reports v5p as "TPU v5"
    (r"^tpu v6( lite|e)$", 918e12, 918e12),  # Trillium
)


def device_peak_flops(device: jax.Device, dtype: DTypeLike) -> float | None:
    """The vendor's dense matmul peak FLOP/s of one `device` chip for `dtype` (bfloat16,
    float16 or float32), or None for CPUs and unknown kinds (measure instead)."""
    dtype = np.dtype(dtype)
    if dtype in (np.dtype(jnp.bfloat16), np.dtype(np.float16)):
        column = 1
    elif dtype == np.float32:
        column = 2
    else:
        return None
    kind = device.device_kind.lower()
    return next((row[column] for row in _VENDOR_PEAKS if re.search(row[0], kind)), None)


def mfu(flops_per_step: float, seconds_per_step: float, peak_flops_per_device: float,
        num_devices: int) -> float:
    """Model FLOPs utilization: the fraction of the devices' peak that a step's model FLOPs
    (all devices together) achieve."""
    return flops_per_step / seconds_per_step / (peak_flops_per_device * num_devices)
