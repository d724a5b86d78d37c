"""Planner (PaliGemma) decoding latency on this machine, with and without the KV cache.

    python benchmarks/planner.py [--sizes tiny,mid] [--prompt 12] [--new 32] [--batch 1]

Per size (random weights, float32, a ~1100-token vocabulary like a built project tokenizer):
  * prefill: one jitted `prefill` of image + prompt into a cache for prompt + new tokens;
  * cached decode: the median latency of one jitted `decode_step`, and its tokens/s (x batch);
    timed through `jax.jit` of the split model, and again through `decode_step`'s own nnx.jit,
    whose per-call cost of walking the module graph shows in a Python loop;
  * generate: one jitted `generate` (prefill + a `lax.scan` of decode steps), and tokens/s;
  * no cache: greedy decoding that re-runs the whole sequence (vision tower included) for each
    new token, as a model without a cache must; the sequence is kept at its final length
    (later slots are zeros the causal suffix mask hides) so it compiles once: the per-token
    cost is that of the last token, an upper bound within (N + L + T) / (N + L + 1) of the
    first's. Printed beside cached decoding with their ratio.
Sizes: tiny = `tiny_planner_spec` (64 px / patch 8, width 128, 2 layers); mid = SigLIP width
384 x 6 layers and Gemma width 512 x 6 layers on 112 px / patch 14 (64 image tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pewm_jax.vlm.paligemma import (KVCache, PaliGemma, PaliGemmaSpec, decode_step,
                                    generate, prefill)
from pewm_jax.vlm.planner import tiny_planner_spec

VOCAB = 1100  # about the size of a built tokenizer: specials, 1024 locations, words


def spec_of(size: str) -> PaliGemmaSpec:
    """The benchmark's PaliGemma spec for `size` (module docstring)."""
    if size == "tiny":
        return tiny_planner_spec(VOCAB, 64)
    if size == "mid":
        return dataclasses.replace(
            tiny_planner_spec(VOCAB, 112, patch_size=14, width=512, num_layers=6),
            vision_width=384, vision_mlp_dim=1536, vision_heads=6, num_heads=8, head_dim=64,
            query_pre_attn_scalar=64)
    raise ValueError(f"unknown size {size!r}; expected tiny or mid")


def _best(fn, repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls of `fn` (which blocks), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _full_step(model: PaliGemma, image: jax.Array, tokens: jax.Array, prefix_len: int,
               pos: jax.Array) -> jax.Array:
    """No cache: the whole sequence through the model, the greedy token after text slot pos."""
    logits = model(image, tokens, prefix_len)  # (B, N + L + T, V)
    return jnp.argmax(logits[:, model.spec.num_image_tokens + pos], axis=-1).astype(jnp.int32)


def _decode_latency(step: Callable[[KVCache, jax.Array], tuple[jax.Array, KVCache]],
                    logits: jax.Array, cache: KVCache, new: int) -> float:
    """Median latency of `step(cache, token) -> (logits, cache)` over a greedy decode of `new`."""
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    jax.block_until_ready(step(cache, token))  # compile
    times = []
    for _ in range(new - 1):
        start = time.perf_counter()
        logits, cache = jax.block_until_ready(step(cache, token))
        times.append(time.perf_counter() - start)
        token = jnp.argmax(logits, -1).astype(jnp.int32)
    return statistics.median(times)


def bench(size: str, prompt_len: int, new: int, batch: int) -> None:
    """Prints the latencies of one size (module docstring)."""
    spec = spec_of(size)
    with nnx.use_eager_sharding(False):
        model = PaliGemma(spec, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.uniform(-1, 1, (batch, spec.image_size, spec.image_size, 3)),
                        jnp.float32)
    prompt = jnp.asarray(rng.integers(5, VOCAB, (batch, prompt_len)), jnp.int32)
    max_len = spec.num_image_tokens + prompt_len + new

    # Host loops call pure jax.jit functions of the split model: nnx.jit re-walks the module
    # graph on every call, a per-call cost measured separately (`nnx.jit decode_step`).
    graphdef, params = nnx.split(model)
    pure_prefill = jax.jit(lambda p, im, pr: prefill(nnx.merge(graphdef, p), im, pr, max_len))
    pure_decode = jax.jit(lambda p, c, t: decode_step(nnx.merge(graphdef, p), c, t))
    pure_full = jax.jit(lambda p, im, t, pos: _full_step(nnx.merge(graphdef, p), im, t,
                                                         prompt_len, pos))

    t_prefill = _best(lambda: jax.block_until_ready(pure_prefill(params, image, prompt)))
    t_decode = _decode_latency(lambda c, t: pure_decode(params, c, t),
                               *pure_prefill(params, image, prompt), new)
    t_nnx_decode = _decode_latency(lambda c, t: decode_step(model, c, t),
                                   *prefill(model, image, prompt, max_len), new)
    t_generate = _best(lambda: jax.block_until_ready(generate(model, image, prompt, new)))

    def no_cache() -> None:
        tokens = jnp.concatenate([prompt, jnp.zeros((batch, new), jnp.int32)], axis=1)
        for i in range(new):
            pos = prompt_len + i - 1  # the last filled text slot
            token = pure_full(params, image, tokens, jnp.int32(pos))
            tokens = tokens.at[:, pos + 1].set(token)
        jax.block_until_ready(tokens)

    t_full = _best(no_cache, repeats=1) / new
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"{size}: {n_params / 1e6:.1f}M params, image {spec.image_size}px "
          f"({spec.num_image_tokens} tokens), prompt {prompt_len}, new {new}, batch {batch}")
    print(f"  prefill                {t_prefill * 1e3:8.2f} ms")
    print(f"  cached decode_step     {t_decode * 1e3:8.2f} ms/token  "
          f"{batch / t_decode:8.1f} tokens/s")
    print(f"  nnx.jit decode_step    {t_nnx_decode * 1e3:8.2f} ms/token  "
          f"{batch / t_nnx_decode:8.1f} tokens/s")
    print(f"  generate (scan)        {t_generate * 1e3:8.2f} ms total  "
          f"{batch * new / t_generate:8.1f} tokens/s")
    print(f"  no cache (full seq)    {t_full * 1e3:8.2f} ms/token  "
          f"{batch / t_full:8.1f} tokens/s")
    print(f"  no-cache / cached per-token latency: {t_full / t_decode:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,mid")
    parser.add_argument("--prompt", type=int, default=12, help="prompt tokens")
    parser.add_argument("--new", type=int, default=32, help="generated tokens")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
    for size in args.sizes.split(","):
        bench(size, args.prompt, args.new, args.batch)


if __name__ == "__main__":
    main()
