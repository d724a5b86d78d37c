"""Where the action decoder's training step spends its time on this machine.

    python benchmarks/decoder_step.py [--config configs/quickstart.py] [--repeats 7]

The decoder stage is the main job's longest (README "Quickstart"). Measured in one run (median
of --repeats after compilation), each beside what it is part of:

  * one training step (`action_loss`, its gradient and an AdamW update) on a random batch of
    the config's `action_decoder.train.global_batch_size` clips, and its FLOP/s against this
    machine's float32 matmul peak (`measured_matmul_peak`);
  * the frame encoder on the step's frames (B x (H + 1)), forward and forward + backward: its
    share of the step;
  * each of the encoder's convolutions at its training shape: forward, the gradient for its
    input and the gradient for its kernel, the last as a multiple of the forward. A convolution's
    three products have equal FLOPs; on CPU, XLA computes the kernel's several times slower.
    (Training needs no input gradient for conv1, whose input is the frames; it is shown alike.)
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pewm_jax.config import load_config  # noqa: E402
from pewm_jax.models.action_decoder import (action_decoder_flops, action_loss,  # noqa: E402
                                            build_action_decoder)
from pewm_jax.train.metrics import measured_matmul_peak  # noqa: E402

ACTION_DIM, GRIPPER_DIMS = 3, (2,)  # the built-in world's (dx, dy, gripper command)


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn()` (blocked until ready) after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _batch(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random training batch of the decoder's shapes."""
    b, h = config.action_decoder.train.global_batch_size, config.data.horizon
    s, stride, ctx = config.world.image_size, config.data.frame_stride, config.data.context_frames
    gripper = np.zeros(ACTION_DIM, bool)
    gripper[list(GRIPPER_DIMS)] = True
    return {
        "context": rng.integers(0, 256, (b, ctx, s, s, 3), dtype=np.uint8),
        "frames": rng.integers(0, 256, (b, h, s, s, 3), dtype=np.uint8),
        "start_xy": rng.uniform(0, s, (b, 2)).astype(np.float32),
        "goal_xy": rng.uniform(0, s, (b, 2)).astype(np.float32),
        "sgg_valid": np.ones((b,), bool),
        "text_tokens": rng.integers(1, 50, (b, 8)).astype(np.int32),
        "text_mask": np.ones((b, 8), bool),
        "actions": rng.normal(size=(b, h, stride, ACTION_DIM)).astype(np.float32),
        "action_mask": np.ones((b, ACTION_DIM), bool),
        "gripper_mask": np.broadcast_to(gripper, (b, ACTION_DIM)).copy(),
    }


def _conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """The decoder's convolution: NHWC, 'SAME' padding (models.action_decoder.Conv)."""
    return jax.lax.conv_general_dilated(x, kernel, (stride,) * 2, "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_rows(frames: int, size: int, channels: int, repeats: int) -> list[tuple]:
    """(name, forward s, input-gradient s, kernel-gradient s) of each encoder convolution."""
    rng = np.random.default_rng(0)
    rows = []
    for name, side, cin, k, stride in (("conv1 5x5/2", size, 5, 5, 2),
                                       ("conv2 3x3", size // 2, channels, 3, 1),
                                       ("conv3 3x3", size // 2, channels, 3, 1)):
        x = jnp.asarray(rng.normal(size=(frames, side, side, cin)), jnp.float32)
        kernel = jnp.asarray(rng.normal(size=(k, k, cin, channels)), jnp.float32)
        dy = jnp.asarray(rng.normal(size=_conv(x, kernel, stride).shape), jnp.float32)
        fwd = jax.jit(lambda x, w, s=stride: _conv(x, w, s))
        d_input = jax.jit(lambda x, w, g, s=stride: jax.vjp(lambda v: _conv(v, w, s), x)[1](g))
        d_kernel = jax.jit(lambda x, w, g, s=stride: jax.vjp(lambda v: _conv(x, v, s), w)[1](g))
        rows.append((name, _median_seconds(lambda: fwd(x, kernel), repeats),
                     _median_seconds(lambda: d_input(x, kernel, dy), repeats),
                     _median_seconds(lambda: d_kernel(x, kernel, dy), repeats)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(pathlib.Path(__file__).resolve().parents[1]
                                                / "configs" / "quickstart.py"))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    config = load_config(args.config, [])
    a = config.action_decoder
    model = build_action_decoder(config, ACTION_DIM, GRIPPER_DIMS, 100, nnx.Rngs(0))
    batch = _batch(config, np.random.default_rng(0))
    b, h, s = a.train.global_batch_size, config.data.horizon, config.world.image_size

    graph, params = nnx.split(model, nnx.Param)
    optimizer = optax.adamw(a.train.learning_rate)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        grads = jax.grad(lambda p: action_loss(nnx.merge(graph, p), batch, None, config)[0])(
            params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step_s = _median_seconds(lambda: step(params, opt_state, batch), args.repeats)

    frames = jnp.concatenate([jnp.asarray(batch["frames"].reshape(b * h, s, s, 3)),
                              jnp.asarray(batch["context"][:, -1])], 0)  # (B x (H + 1), S, S, 3)
    encoder_graph, encoder_params = nnx.split(model.encoder, nnx.Param)
    unit = frames.astype(jnp.float32) / 127.5 - 1.0
    encode = jax.jit(lambda p: nnx.merge(encoder_graph, p)(unit))
    encode_grad = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(encoder_graph, p)(unit) ** 2)))
    fwd_s = _median_seconds(lambda: encode(encoder_params), args.repeats)
    grad_s = _median_seconds(lambda: encode_grad(encoder_params), args.repeats)
    convs = _conv_rows(frames.shape[0], s, a.channels, args.repeats)
    peak = measured_matmul_peak()
    flops = action_decoder_flops(model.spec, b, h)

    print(f"action decoder, {args.config}: batch {b} clips x {h + 1} frames of {s}x{s}, "
          f"{a.channels} channels; devices: {jax.devices()[0].device_kind} x "
          f"{jax.device_count()}")
    print(f"matmul peak (float32, 2048^3): {peak / 1e9:.0f} GFLOP/s")
    print(f"training step: {step_s * 1e3:.1f} ms, {flops / step_s / 1e9:.1f} GFLOP/s "
          f"({flops / step_s / peak:.0%} of the matmul peak)")
    print(f"frame encoder, forward: {fwd_s * 1e3:.1f} ms; forward + backward: "
          f"{grad_s * 1e3:.1f} ms ({grad_s / step_s:.0%} of the step)")
    print(f"{'convolution':<14}{'forward ms':>12}{'input grad ms':>15}{'kernel grad ms':>16}"
          f"{'kernel / forward':>18}")
    for name, f, di, dk in convs:
        print(f"{name:<14}{f * 1e3:>12.1f}{di * 1e3:>15.1f}{dk * 1e3:>16.1f}{dk / f:>17.1f}x")
    kernel_s = sum(dk for *_, dk in convs)
    print(f"kernel gradients: {kernel_s * 1e3:.1f} ms, {kernel_s / step_s:.0%} of the step")


if __name__ == "__main__":
    main()
