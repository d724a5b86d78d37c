"""Dense layers as one 2-D matmul against the 3-D contraction they replaced, on this machine.

    python benchmarks/dense_layout.py [--repeats 10]

`pewm_jax.models.layers.Dense` flattens the leading axes of its input into one before its
matmul, (prod(lead), prod(in)) . (prod(in), prod(out)), instead of contracting a (B, T, D)
activation with `jnp.tensordot`. Both compute the same product; on CPU, XLA lays out the
3-D form's weight gradient (a contraction over batch and tokens together) by transposing the
activation, a full copy of it per matmul. Measured here, in one run, forward + backward
(jitted `jax.grad`, median of --repeats after compilation), each beside its baseline:

  * a GeGLU block (three Dense layers) at two training shapes: the planner's (CPU reference:
    16 examples x 368 tokens, width 128, hidden 512) and the world model's (quickstart: 8 clips
    x 8 frames x 64 tokens, width 64, hidden 256);
  * one planner training step (`finetune.plan_loss` on a random batch, configs/cpu_reference.py),
    as the library computes it now, and with its Dense layers swapped back to `jnp.tensordot`.

Ratios > 1 mean the 2-D form is faster. Outputs agree to float32 rounding (printed).
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pewm_jax.config import load_config  # noqa: E402
from pewm_jax.models import layers  # noqa: E402
from pewm_jax.vlm.finetune import build_planner, plan_loss  # noqa: E402


def _tensordot_call(self: layers.Dense, x: jax.Array) -> jax.Array:
    """The 3-D contraction Dense used before: tensordot over the trailing `in_shape` axes."""
    y = jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                      axes=len(self.in_shape))
    if self.bias is not None:
        y = y + self.bias[...].astype(self.dtype)
    return y


@contextlib.contextmanager
def tensordot_dense() -> Iterator[None]:
    """Within the block, every Dense computes as `_tensordot_call` (traced afresh)."""
    current = layers.Dense.__call__
    layers.Dense.__call__ = _tensordot_call
    try:
        yield
    finally:
        layers.Dense.__call__ = current


def median_ms(fn: Callable, args: tuple, repeats: int) -> float:
    """Median wall milliseconds of a jitted call after the compiling one."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def mlp_case(lead: tuple[int, ...], width: int, hidden: int, repeats: int) -> tuple[float, ...]:
    """(ms 3-D, ms 2-D, max |difference| of the gradients) of a GeGLU block's fwd+bwd."""
    rngs = nnx.Rngs(0)
    mods = [layers.Dense(width, hidden, ("embed", "mlp"), rngs=rngs),
            layers.Dense(width, hidden, ("embed", "mlp"), rngs=rngs),
            layers.Dense(hidden, width, ("mlp", "embed"), rngs=rngs)]
    graphdef, params = nnx.split(mods)
    x = jax.random.normal(jax.random.key(1), (*lead, width))

    def loss(params, x):
        gate, up, down = nnx.merge(graphdef, params)
        return jnp.sum(down(jax.nn.gelu(gate(x), approximate=True) * up(x)) ** 2)

    new = jax.jit(jax.grad(loss))
    grads_new = new(params, x)
    ms_new = median_ms(new, (params, x), repeats)
    with tensordot_dense():
        old = jax.jit(jax.grad(loss))
        grads_old = old(params, x)
        ms_old = median_ms(old, (params, x), repeats)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(grads_new), jax.tree.leaves(grads_old)))
    return ms_old, ms_new, diff


def planner_case(repeats: int) -> tuple[float, ...]:
    """(ms 3-D, ms 2-D, |loss difference|) of one cpu_reference planner training step."""
    config = load_config(str(pathlib.Path(__file__).resolve().parents[1]
                             / "configs" / "cpu_reference.py"))
    vocab = 1100  # about a built project tokenizer: specials, 1024 locations, words
    model = build_planner(config, vocab, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    b, length, size = 16, config.planner.max_tokens, config.planner.image_size
    prompt = config.planner.prompt_tokens
    rng = np.random.default_rng(0)
    mask = np.zeros((b, length), bool)
    mask[:, prompt:] = True
    bins = np.where(mask & (np.arange(length) % 3 == 0), rng.integers(0, 1024, (b, length)), -1)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)),
             "tokens": jnp.asarray(rng.integers(5, vocab, (b, length), dtype=np.int32)),
             "target_mask": jnp.asarray(mask), "target_bins": jnp.asarray(bins, jnp.int32),
             "ground_bins": jnp.asarray(bins, jnp.int32),
             "prefix_len": jnp.full((b,), prompt, jnp.int32)}

    def loss(params, batch):
        return plan_loss(nnx.merge(graphdef, params), batch, jax.random.key(2), config)[0]

    new = jax.jit(jax.value_and_grad(loss))
    loss_new = new(params, batch)[0]
    ms_new = median_ms(new, (params, batch), repeats)
    with tensordot_dense():
        old = jax.jit(jax.value_and_grad(loss))
        loss_old = old(params, batch)[0]
        ms_old = median_ms(old, (params, batch), repeats)
    return ms_old, ms_new, abs(float(loss_new - loss_old))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"devices: {jax.devices()}")
    print(f"{'fwd+bwd':<44}{'3-D ms':>9}{'2-D ms':>9}{'speed-up':>10}{'max diff':>11}")
    cases = [("planner GeGLU 16x368x128 -> 512", lambda: mlp_case((16, 368), 128, 512,
                                                                    args.repeats)),
             ("GeGLU 8x8x64x64 -> 256", lambda: mlp_case((8, 8, 64), 64, 256,
                                                                     args.repeats)),
             ("planner training step (cpu_reference)", lambda: planner_case(args.repeats))]
    for name, case in cases:
        old, new, diff = case()
        print(f"{name:<44}{old:>9.1f}{new:>9.1f}{old / new:>9.2f}x{diff:>11.1e}")


if __name__ == "__main__":
    main()
