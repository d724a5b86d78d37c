"""The sharded train step: same numbers on any mesh, accumulation, frozen groups, EMA, schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from benchmarks import model_step
from conftest import TINY_TRAIN, tiny_config
from pewm_jax.diffusion import loss_fn
from pewm_jax.parallel import mesh as mesh_lib
from pewm_jax.parallel.global_batch import make_global_batch
from pewm_jax.recipes import kinds
from pewm_jax.train import state as state_lib

VOCAB = 64
# Random clips, so the frames can be smaller than the dataset's: 32x32, 4 frames.
SMALL = [o for o in TINY_TRAIN if o.startswith("model.")] + [
    "train.warmup_steps=0", "world.image_size=32", "data.horizon=4"]


def random_batch(config, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random clips with every key the loss reads, token ids below VOCAB."""
    return model_step.random_batch(config, size, seed, vocab=VOCAB)


def run_steps(config, devices, steps: int = 2):
    """(losses, final params on the host) of `steps` train steps on a mesh over `devices`."""
    mesh = mesh_lib.make_mesh(config, devices)
    layout = state_lib.state_layout(config, VOCAB, mesh, kinds.WORLD_MODEL)
    state = state_lib.create_train_state(config, layout)
    step_fn = state_lib.TrainStep(config, layout)
    losses = []
    for i in range(steps):
        batch = make_global_batch(random_batch(config, config.train.global_batch_size, i), mesh)
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state), layout


@pytest.fixture(scope="module")
def one_device_run():
    config = tiny_config(*SMALL, "mesh.data=1")
    return run_steps(config, jax.devices()[:1])


def test_a_step_on_a_2x2x2_mesh_equals_one_device(one_device_run):
    # Tolerance: float32 reductions split over 8 devices change the summation order only.
    config = tiny_config(*SMALL, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    losses, state, layout = run_steps(config, jax.devices())
    ref_losses, ref_state, _ = one_device_run
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 state.params, ref_state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 state.opt_state, ref_state.opt_state)
    assert int(state.step) == 2
    # and the parameters really were sharded over fsdp and tensor
    specs = {str(s.spec) for s in jax.tree.leaves(layout.shardings.params)}
    assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs)


@pytest.mark.slow  # about 30 s; CI runs it in its slow stage
def test_accumulated_gradients_are_the_mean_over_microbatches():
    config = tiny_config(*SMALL, "mesh.data=2", "mesh.fsdp=1", "mesh.tensor=1",
                         "train.grad_accum_steps=2", "train.global_batch_size=8",
                         "train.grad_clip=None", "train.weight_decay=0.0")
    mesh = mesh_lib.make_mesh(config, jax.devices()[:2])
    layout = state_lib.state_layout(config, VOCAB, mesh, kinds.WORLD_MODEL)
    state = state_lib.create_train_state(config, layout)
    params0 = jax.device_get(state.params)
    batch = random_batch(config, 8)
    step_fn = state_lib.TrainStep(config, layout)
    new_state, metrics = step_fn(state, make_global_batch(batch, mesh))

    # Reference: microbatch j = rows j, j + 2, ...; key fold_in(fold_in(base, step 0), j).
    key = jax.random.fold_in(jax.random.key(config.seed), 0)

    def loss_of(p, mb, k):
        return loss_fn(nnx.merge(layout.graphdef, p), mb, k, config)[0]

    grads, losses = [], []
    value_and_grad = jax.jit(jax.value_and_grad(loss_of))
    for j in range(2):
        mb = {k: v[j::2] for k, v in batch.items()}
        loss, g = value_and_grad(params0, mb, jax.random.fold_in(key, j))
        grads.append(g)
        losses.append(float(loss))
    mean_grad = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(mean_grad)),
                               rtol=1e-4)
    tx = state_lib.make_optimizer(config.train, layout.labels)
    expected = jax.jit(lambda g, p: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))(
        mean_grad, params0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(new_state.params), expected)


def test_frozen_groups_do_not_move_and_the_rest_does(one_device_run):
    # adaLN-zero gates pass no gradient to most weights on step 1; after 2 steps all move.
    config = tiny_config(*SMALL, "mesh.data=1", "train.frozen=('text_encoder/.*', 'sgg/.*')")
    _, state, layout = run_steps(config, jax.devices()[:1], steps=2)
    _, free_state, _ = one_device_run  # the same 2 steps without frozen groups
    mesh = mesh_lib.make_mesh(config, jax.devices()[:1])
    init = jax.device_get(state_lib.create_train_state(config, state_lib.state_layout(
        config, VOCAB, mesh, kinds.WORLD_MODEL)).params)

    def moved(a, b):
        return jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.any(x != y)), a, b))

    for group in ("text_encoder", "sgg"):
        jax.tree.map(np.testing.assert_array_equal, state.params[group], init[group])
        assert any(moved(free_state.params[group], init[group]))
    assert any(moved(state.params["dit"], init["dit"]))
    assert set(jax.tree.leaves(layout.labels["text_encoder"])) == {"frozen"}


def test_a_frozen_pattern_that_matches_nothing_is_an_error():
    config = tiny_config(*SMALL, "train.frozen=('text_encodr/.*',)")
    with pytest.raises(ValueError, match="'text_encodr/.*' matches no parameter"):
        state_lib.state_layout(config, VOCAB, mesh_lib.make_mesh(config), kinds.WORLD_MODEL)


def test_ema_follows_the_documented_decay():
    config = tiny_config(*SMALL, "mesh.data=1")
    mesh = mesh_lib.make_mesh(config, jax.devices()[:1])
    init = jax.device_get(state_lib.create_train_state(
        config, state_lib.state_layout(config, VOCAB, mesh, kinds.WORLD_MODEL)).params)
    _, state, _ = run_steps(config, jax.devices()[:1], steps=1)
    # decay at step s: min(ema_decay, (1 + s) / (10 + s)) -> 0.1 at step 0
    d0 = float(state_lib.ema_decay(config.train, jnp.asarray(0)))
    assert d0 == pytest.approx(0.1)
    assert float(state_lib.ema_decay(config.train, jnp.asarray(10**6))) == pytest.approx(config.train.ema_decay)
    expected = jax.tree.map(lambda p0, p1: d0 * p0 + (1 - d0) * p1, init, state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 state.ema_params, expected)


def test_learning_rate_warms_up_then_decays_to_the_final_fraction():
    config = tiny_config("train.steps=100", "train.warmup_steps=10", "train.learning_rate=1e-3",
                         "train.final_lr_fraction=0.1")
    schedule = state_lib.learning_rate_schedule(config.train)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(55)) == pytest.approx(1e-4 + 0.9e-3 * 0.5, rel=1e-4)
    assert float(schedule(100)) == pytest.approx(1e-4)


def test_bfloat16_compute_keeps_float32_params_and_close_losses(one_device_run):
    config = tiny_config(*SMALL, "mesh.data=1", "model.dtype=bfloat16")
    losses, state, _ = run_steps(config, jax.devices()[:1])
    ref_losses, _, _ = one_device_run
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype(np.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if np.ndim(x)} == {np.dtype(np.float32)}
    np.testing.assert_allclose(losses, ref_losses, rtol=5e-2)  # bf16 has ~3 significant digits
