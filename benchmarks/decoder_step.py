"""Where the action decoder's training step spends its time on this machine.

    python benchmarks/decoder_step.py [--config configs/quickstart.py] [--repeats 7]

The decoder stage is the main job's longest (README "Quickstart"). Measured in one run (median
of --repeats after compilation), each beside what it is part of:

  * one training step (`action_loss`, its gradient and an AdamW update) on a random batch of
    the config's `action_decoder.train.global_batch_size` clips, and its FLOP/s against this
    machine's float32 matmul peak (`measured_matmul_peak`);
  * the frame encoder on the step's frames (B x (H + 1)), forward and forward + backward: its
    share of the step;
  * each of the encoder's convolutions (the model's own layers) at its training shape: forward,
    the gradient for its input and the gradient for its parameters, the last as a multiple of the
    forward. A convolution's three products have equal FLOPs; on CPU, XLA computes the kernel's
    several times slower. (Training needs no input gradient for conv1, whose input is the
    frames; it is shown alike.)
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.dense_layout import median_ms  # noqa: E402
from pewm_jax.config import load_config  # noqa: E402
from pewm_jax.models.action_decoder import (ActionDecoder, action_decoder_flops,  # noqa: E402
                                            action_loss, build_action_decoder)
from pewm_jax.train.metrics import measured_matmul_peak  # noqa: E402

ACTION_DIM, GRIPPER_DIMS = 3, (2,)  # the built-in world's (dx, dy, gripper command)


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


def _conv_rows(model: ActionDecoder, frames: int, repeats: int) -> list[tuple]:
    """(name, forward ms, input-gradient ms, parameter-gradient ms) of each of the encoder's
    convolutions on random inputs of its training shape (frames x side x side x in-channels,
    each layer's side the frame's divided by the strides before it)."""
    rng = np.random.default_rng(0)
    encoder, side, rows = model.encoder, model.spec.image_size, []
    for name in ("conv1", "conv2", "conv3", "keypoint_maps"):
        conv = getattr(encoder, name)
        k, _, cin, _ = conv.kernel[...].shape
        graph, params = nnx.split(conv, nnx.Param)
        x = jnp.asarray(rng.normal(size=(frames, side, side, cin)), jnp.float32)
        dy = jnp.asarray(rng.normal(size=conv(x).shape), jnp.float32)

        def apply(p, v, graph=graph):
            return nnx.merge(graph, p)(v)

        fwd = jax.jit(apply)
        d_input = jax.jit(lambda p, v, g, f=apply: jax.vjp(lambda u: f(p, u), v)[1](g))
        d_params = jax.jit(lambda p, v, g, f=apply: jax.vjp(lambda q: f(q, v), p)[1](g))
        rows.append((f"{name} {k}x{k}/{conv.stride}", median_ms(fwd, (params, x), repeats),
                     median_ms(d_input, (params, x, dy), repeats),
                     median_ms(d_params, (params, x, dy), repeats)))
        side //= conv.stride
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

    step_s = median_ms(step, (params, opt_state, batch), args.repeats) / 1e3

    frames = jnp.concatenate([jnp.asarray(batch["frames"].reshape(b * h, s, s, 3)),
                              jnp.asarray(batch["context"][:, -1])], 0)  # (B x (H + 1), S, S, 3)
    encoder_graph, encoder_params = nnx.split(model.encoder, nnx.Param)
    unit = frames.astype(jnp.float32) / 127.5 - 1.0
    encode = jax.jit(lambda p: nnx.merge(encoder_graph, p)(unit))
    encode_grad = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(encoder_graph, p)(unit) ** 2)))
    fwd_s = median_ms(encode, (encoder_params,), args.repeats) / 1e3
    grad_s = median_ms(encode_grad, (encoder_params,), args.repeats) / 1e3
    convs = _conv_rows(model, frames.shape[0], args.repeats)
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
    print(f"{'convolution':<22}{'forward ms':>12}{'input grad ms':>15}{'kernel grad ms':>16}"
          f"{'kernel / forward':>18}")
    for name, f, di, dk in convs:
        print(f"{name:<22}{f:>12.1f}{di:>15.1f}{dk:>16.1f}{dk / f:>17.1f}x")
    kernel_ms = sum(dk for *_, dk in convs)
    print(f"kernel gradients: {kernel_ms:.1f} ms, {kernel_ms / 1e3 / step_s:.0%} of the step")


if __name__ == "__main__":
    main()
