"""The analytic FLOP count of the world model against XLA's cost analysis of the same program."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import ROOT
from pewm_jax.config import load_config
from pewm_jax.models import WorldModel
from pewm_jax.models.flops import world_model_flops


def _xla_flops(config, batch: int, backward: bool) -> float:
    """XLA's FLOP estimate of the compiled forward (or forward + parameter gradient) of
    `WorldModel.__call__`; parameters and inputs are abstract, nothing is executed."""
    model = nnx.eval_shape(lambda: WorldModel.from_config(config, nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    n, h, c, l = (config.world.image_size, config.data.horizon, config.data.context_frames,
                  config.data.max_text_tokens)
    spec = jax.ShapeDtypeStruct
    inputs = (spec((batch, h, n, n, 3), jnp.float32), spec((batch,), jnp.float32),
              spec((batch, c, n, n, 3), jnp.float32),
              spec((batch, l, config.model.text_width), jnp.float32), spec((batch, l), bool),
              spec((batch, n, n, 2), jnp.float32), spec((batch,), bool))
    forward = lambda p, *x: nnx.merge(graphdef, p)(*x)
    fn = jax.grad(lambda p, *x: jnp.sum(forward(p, *x))) if backward else forward
    return jax.jit(fn).lower(params, *inputs).compile().cost_analysis()["flops"]


def _mid(*overrides: str):
    return load_config(str(ROOT / "configs" / "mid.py"), overrides)


def test_forward_flops_match_xla_at_mid():
    config = _mid()
    ratio = world_model_flops(config, 4).forward / _xla_flops(config, 4, backward=False)
    assert abs(ratio - 1) < 0.10, ratio  # measured 0.992


def test_forward_backward_flops_match_xla_one_mid_block():
    """mid's width, heads and MLP with one block on 32x32 frames: compiles in seconds."""
    config = _mid("model.depth=1", "world.image_size=32")
    ratio = world_model_flops(config, 2).forward_backward / _xla_flops(config, 2, backward=True)
    assert abs(ratio - 1) < 0.10, ratio  # measured 0.994


@pytest.mark.slow
def test_forward_backward_flops_match_xla_at_mid():
    config = _mid()
    ratio = world_model_flops(config, 4).forward_backward / _xla_flops(config, 4, backward=True)
    assert abs(ratio - 1) < 0.10, ratio  # measured 0.947 (XLA also counts elementwise work)


def test_flops_scale_with_batch_depth_and_frames():
    config = _mid()
    one, two = world_model_flops(config, 1), world_model_flops(config, 2)
    assert two.forward == pytest.approx(2 * one.forward)
    # backward costs about twice the forward
    assert 2.8 < one.forward_backward / one.forward < 3.0
    shallow = world_model_flops(_mid("model.depth=4"), 1)
    assert 1.9 < one.forward / shallow.forward < 2.0  # blocks dominate; embeddings do not double
    assert world_model_flops(config, 1, horizon=4).forward < one.forward
