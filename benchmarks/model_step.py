"""World-model train-step MFU and primitive-clip sampling latency on this machine.

    python benchmarks/model_step.py [--sizes quickstart,mid] [--steps 3] [--batch N]

Measures, in one run:
  * this machine's matmul peak: the best of several jitted float32 jnp.dot of 2048 x 2048
    matrices (2 * 2048^3 FLOPs each);
  * per config (configs/quickstart.py, configs/mid.py): the time of one jitted train step
    (flow-matching loss, gradient and optax AdamW update, on the config's global batch of
    random clips) after compilation, and its MFU = analytic forward+backward FLOPs of the DiT
    and SGG conditioner (pewm_jax.models.flops, text encoder excluded) / step time / peak;
  * sampling latency of one primitive clip (batch 1) at quickstart size with Euler at 1, 4 and
    16 steps, under the config's guidance scales (1, 1: one model evaluation per step), and at
    4 steps with text and SGG guidance on (3 evaluations per step, batched).
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import numpy as np
import optax
from flax import nnx

from pewm_jax.config import load_config
from pewm_jax.diffusion import loss_fn, sample, target_settings
from pewm_jax.models import WorldModel
from pewm_jax.models.flops import world_model_flops
from pewm_jax.models.text_encoder import make_text_encoder
from pewm_jax.train.metrics import measured_matmul_peak

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
VOCAB = 1100  # about the size of a built tokenizer: specials, 1024 locations, words


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def random_batch(config, batch_size: int, seed: int = 0, vocab: int = VOCAB
                 ) -> dict[str, np.ndarray]:
    """A batch of the `BatchSpec` keys the loss reads, with random content (token ids < vocab)."""
    rng = np.random.default_rng(seed)
    n, h, c, l = (config.world.image_size, config.data.horizon, config.data.context_frames,
                  config.data.max_text_tokens)
    return {"context": rng.integers(0, 256, (batch_size, c, n, n, 3), np.uint8),
            "frames": rng.integers(0, 256, (batch_size, h, n, n, 3), np.uint8),
            "text_tokens": rng.integers(1, vocab, (batch_size, l)).astype(np.int32),
            "text_mask": np.ones((batch_size, l), bool),
            "start_xy": rng.uniform(0, n, (batch_size, 2)).astype(np.float32),
            "goal_xy": rng.uniform(0, n, (batch_size, 2)).astype(np.float32),
            "sgg_valid": np.ones((batch_size,), bool)}


def build_model(config) -> WorldModel:
    """The world model with the config's text encoder, unsharded (no mesh here)."""
    rngs = nnx.Rngs(config.seed)
    with nnx.use_eager_sharding(False):
        return WorldModel.from_config(config, rngs, make_text_encoder(config, rngs, VOCAB))


def train_step_seconds(config, batch_size: int, steps: int) -> tuple[float, float]:
    """(compile seconds, mean seconds per step) of the jitted loss + grad + AdamW step."""
    graphdef, params = nnx.split(build_model(config), nnx.Param)
    opt = optax.adamw(config.train.learning_rate)
    opt_state = opt.init(params)

    def step(params, opt_state, batch, key):
        grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch, key, config)[0])(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    batch = jax.device_put(random_batch(config, batch_size))
    key = jax.random.key(0)
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch, key).compile()
    compile_s = time.perf_counter() - start
    params, opt_state = compiled(params, opt_state, batch, key)  # warm-up
    jax.block_until_ready(params)
    start = time.perf_counter()
    for i in range(steps):
        params, opt_state = compiled(params, opt_state, batch, jax.random.fold_in(key, i))
    jax.block_until_ready(params)
    return compile_s, (time.perf_counter() - start) / steps


def clip_latency(model: WorldModel, cond: dict, config, num_steps: int, text_guidance: float,
                 sgg_guidance: float, repeats: int = 5) -> float:
    """Best seconds to sample one clip (compiled beforehand)."""
    kwargs = dict(horizon=config.data.horizon, num_steps=num_steps, sampler="euler",
                  text_guidance=text_guidance, sgg_guidance=sgg_guidance,
                  sgg_sigma_px=float(config.diffusion.sgg_sigma_px), **target_settings(config))
    sample(model, cond, jax.random.key(0), **kwargs).block_until_ready()
    return min(_timed(lambda: sample(model, cond, jax.random.key(1), **kwargs).block_until_ready())
               for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="quickstart,mid", help="configs/<name>.py to time")
    parser.add_argument("--steps", type=int, default=3, help="timed train steps per size")
    parser.add_argument("--batch", type=int, default=None,
                        help="clips per train step (default: config.train.global_batch_size)")
    args = parser.parse_args()

    print(f"devices: {jax.devices()}")
    peak = measured_matmul_peak()
    print(f"matmul peak (float32 2048^3 jnp.dot): {peak / 1e9:.1f} GFLOP/s")
    print(f"{'config':>11} {'batch':>5} {'compile s':>9} {'step s':>8} {'GFLOP/step':>10} "
          f"{'GFLOP/s':>8} {'MFU':>6}")
    for name in args.sizes.split(","):
        config = load_config(str(CONFIGS / f"{name}.py"))
        batch = args.batch or config.train.global_batch_size
        compile_s, step_s = train_step_seconds(config, batch, args.steps)
        flops = world_model_flops(config, batch).forward_backward
        print(f"{name:>11} {batch:>5} {compile_s:>9.1f} {step_s:>8.3f} {flops / 1e9:>10.1f} "
              f"{flops / step_s / 1e9:>8.1f} {flops / step_s / peak:>6.1%}")

    config = load_config(str(CONFIGS / "quickstart.py"))
    model = build_model(config)
    cond = random_batch(config, 1)
    scales = (float(config.diffusion.text_guidance), float(config.diffusion.sgg_guidance))
    print(f"one quickstart clip ({config.data.horizon} frames of {config.world.image_size}^2), "
          f"Euler, batch 1:")
    for num_steps in (1, 4, 16):
        seconds = clip_latency(model, cond, config, num_steps, *scales)
        print(f"  {num_steps:>2} steps, guidance {scales}: {seconds * 1e3:8.1f} ms")
    seconds = clip_latency(model, cond, config, 4, 2.0, 2.0)
    print(f"   4 steps, guidance (2.0, 2.0): {seconds * 1e3:8.1f} ms (3 evaluations per step)")


if __name__ == "__main__":
    main()
