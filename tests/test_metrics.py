"""Training metrics: TensorBoard events read back without TensorFlow, the JSON-lines log across
kills and resumes, clip pictures, progress bar, and MFU peaks."""

import io
import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pewm_jax.train.metrics import (CLIP_GAP, SEPARATOR, MetricWriter, ProgressBar, clip_animation,
                                    clip_grid, device_peak_flops, measured_matmul_peak, mfu,
                                    read_metrics)


def _events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_scalars_reach_tensorboard_and_jsonl(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.scalars(1, {"loss": 2.5, "lr": np.float32(1e-3)})
        writer.scalars(2, {"loss": jnp.asarray(1.25)})
    acc = _events(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.5), (2, 1.25)]
    assert acc.Scalars("lr")[0].value == pytest.approx(1e-3)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 2.5, "lr": pytest.approx(1e-3)}, {"step": 2, "loss": 1.25}]


def test_jsonl_lines_are_flushed_before_close(tmp_path):
    writer = MetricWriter(tmp_path)
    writer.scalars(7, {"loss": 0.5})
    assert read_metrics(tmp_path) == {7: {"loss": 0.5}}
    writer.close()


def test_image_video_and_text_summaries(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 20, 3), np.uint8)
    video = np.stack([np.full((8, 10, 3), 40 * t, np.uint8) for t in range(5)])
    with MetricWriter(tmp_path) as writer:
        writer.images(3, {"grid": image})
        writer.videos(3, {"clips": video}, fps=5)
        writer.text(0, "config", "model:\n  width: 64")
    acc = _events(tmp_path)
    png = Image.open(io.BytesIO(acc.Images("grid")[0].encoded_image_string))
    assert png.format == "PNG" and png.size == (20, 12)
    np.testing.assert_array_equal(np.asarray(png), image)
    assert acc.Images("grid")[0].step == 3
    gif = Image.open(io.BytesIO(acc.Images("clips")[0].encoded_image_string))
    assert gif.format == "GIF" and gif.size == (10, 8)
    assert gif.n_frames == 5 and gif.info["loop"] == 0 and gif.info["duration"] == 200
    text = acc.Tensors("config")[0]
    assert text.tensor_proto.string_val == [b"model:\n  width: 64"]
    assert acc.SummaryMetadata("config").plugin_data.plugin_name == "text"


def test_images_reject_float_arrays(tmp_path):
    with MetricWriter(tmp_path) as writer, pytest.raises(ValueError, match="uint8"):
        writer.images(0, {"grid": np.zeros((4, 4, 3), np.float32)})


def test_disabled_writer_creates_nothing(tmp_path):
    logdir = tmp_path / "run"
    with MetricWriter(logdir, enabled=False) as writer:
        writer.scalars(1, {"loss": 1.0})
        writer.images(1, {"grid": np.zeros((4, 4, 3), np.uint8)})
        writer.videos(1, {"clips": np.zeros((2, 4, 4, 3), np.uint8)})
        writer.text(0, "config", "x")
        writer.flush()
    assert not logdir.exists()


def test_read_metrics_last_record_per_step_wins_and_truncated_line_ignored(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0, "eval": 9.0}\n'
        '{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_metrics(tmp_path) == {1: {"loss": 3.0}, 2: {"loss": 1.5, "eval": 9.0}}


def test_read_metrics_rejects_corrupt_middle_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(json.JSONDecodeError):
        read_metrics(tmp_path)


def test_resumed_writer_appends_after_a_killed_partial_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
    with MetricWriter(tmp_path) as writer:
        writer.scalars(2, {"loss": 2.0})
    assert read_metrics(tmp_path) == {1: {"loss": 3.0}, 2: {"loss": 2.0}}


def _clips(b=2, c=2, t=3, n=4):
    rng = np.random.default_rng(1)
    context = rng.integers(0, 256, (b, c, n, n, 3), np.uint8)
    truth = rng.integers(0, 256, (b, t, n, n, 3), np.uint8)
    sampled = rng.uniform(0, 1, (b, t, n, n, 3)).astype(np.float32)
    return context, truth, sampled


def test_clip_grid_layout():
    b, t, n = 2, 3, 4
    context, truth, sampled = _clips(b=b, t=t, n=n)
    grid = clip_grid(context, truth, sampled)
    clip_h = 2 * n + SEPARATOR + CLIP_GAP
    assert grid.dtype == np.uint8
    assert grid.shape == (b * clip_h - CLIP_GAP, (t + 1) * n + t * SEPARATOR, 3)
    step = n + SEPARATOR
    tile = lambda y, x: grid[y:y + n, x:x + n]
    for i in range(b):
        for k in range(2):
            np.testing.assert_array_equal(tile(i * clip_h + k * step, 0), context[i, -1])
        for f in range(t):
            np.testing.assert_array_equal(tile(i * clip_h, (f + 1) * step), truth[i, f])
            np.testing.assert_array_equal(tile(i * clip_h + step, (f + 1) * step),
                                          np.round(sampled[i, f] * 255).astype(np.uint8))
    assert (grid[n:n + SEPARATOR] == 255).all()
    assert (grid[clip_h - CLIP_GAP:clip_h] == 255).all()
    assert (grid[:, n:n + SEPARATOR] == 255).all()


def test_clip_grid_clips_out_of_range_floats_and_checks_shapes():
    context, truth, _ = _clips(b=1, t=1, n=2)
    sampled = np.array([-0.5, 2.0, 0.5]).reshape(1, 1, 1, 1, 3) * np.ones((1, 1, 2, 2, 1))
    grid = clip_grid(context, truth, sampled)
    assert grid[-1, -1].tolist() == [0, 255, 128]
    with pytest.raises(ValueError, match="shapes"):
        clip_grid(context, truth, sampled[:, :, :1])


def test_clip_animation_frames():
    b, t, n = 2, 3, 4
    context, truth, sampled = _clips(b=b, t=t, n=n)
    video = clip_animation(context, truth, sampled)
    assert video.dtype == np.uint8
    assert video.shape == (t, b * n + (b - 1) * CLIP_GAP, 3 * n + 2 * SEPARATOR, 3)
    y = n + CLIP_GAP  # the second clip's row
    step = n + SEPARATOR
    np.testing.assert_array_equal(video[2, y:y + n, :n], context[1, -1])
    np.testing.assert_array_equal(video[2, y:y + n, step:step + n], truth[1, 2])
    np.testing.assert_array_equal(video[2, y:y + n, 2 * step:],
                                  np.round(sampled[1, 2] * 255).astype(np.uint8))


def test_progress_bar_moves_to_absolute_step(capsys):
    bar = ProgressBar(100, initial=10)
    bar.update(25, loss=0.123456, **{"steps/s": 4.5})
    bar.close()
    final = capsys.readouterr().err.split("\r")[-1]
    assert "25/100" in final and "loss=0.1235, steps/s=4.5" in final


def test_disabled_progress_bar_is_silent(capsys):
    bar = ProgressBar(100, enabled=False)
    bar.update(5, loss=1.0)
    bar.close()
    assert capsys.readouterr() == ("", "")


def test_mfu_arithmetic():
    assert mfu(4e12, 0.5, 1e12, 16) == pytest.approx(0.5)


def test_device_peak_flops():
    assert device_peak_flops(jax.devices("cpu")[0], jnp.bfloat16) is None
    kind = lambda k: types.SimpleNamespace(device_kind=k)
    assert device_peak_flops(kind("TPU v5p"), jnp.bfloat16) == 459e12
    assert device_peak_flops(kind("TPU v5"), jnp.bfloat16) == 459e12
    assert device_peak_flops(kind("TPU v5 lite"), jnp.bfloat16) == 197e12
    assert device_peak_flops(kind("TPU v6 lite"), jnp.bfloat16) == 918e12
    assert device_peak_flops(kind("TPU v4"), jnp.bfloat16) == 275e12
    assert device_peak_flops(kind("TPU v4 lite"), jnp.bfloat16) is None
    assert device_peak_flops(kind("NVIDIA H100 80GB HBM3"), jnp.bfloat16) == 989e12
    assert device_peak_flops(kind("NVIDIA H100 80GB HBM3"), jnp.float32) == 494.7e12
    assert device_peak_flops(kind("NVIDIA H100 PCIe"), jnp.bfloat16) == 756e12
    assert device_peak_flops(kind("NVIDIA A100-SXM4-80GB"), np.float32) == 156e12
    assert device_peak_flops(kind("NVIDIA H200"), jnp.bfloat16) == 989e12
    assert device_peak_flops(kind("NVIDIA H100 80GB HBM3"), jnp.float64) is None


def test_measured_matmul_peak_is_positive_and_finite():
    device = jax.devices("cpu")[1]
    peak = measured_matmul_peak(n=64, repeats=2, device=device)
    assert peak > 0 and math.isfinite(peak)
