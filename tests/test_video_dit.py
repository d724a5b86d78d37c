"""The video DiT and world model: shapes over horizons and resolutions, logical axis names,
sharding constraints, the zero-initialised SGG branch, gradients, remat and bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh

from pewm_jax.config import LOGICAL_AXES
from pewm_jax.models import VideoDiT, WorldModel
from pewm_jax.models.layers import Dense
from world_model_fixtures import TEXT_TOKENS, make_model, randomize, small_config


def _inputs(config, batch: int = 2, horizon: int | None = None, image: int | None = None,
            seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of `WorldModel.__call__` (numpy, so nothing compiles per shape)."""
    n = image or config.world.image_size
    h = horizon or config.data.horizon
    rng = np.random.default_rng(seed)
    heatmaps = np.zeros((batch, n, n, 2), np.float32)
    heatmaps[:, rng.integers(n), rng.integers(n), :] = 1.0
    return {"x_t": rng.standard_normal((batch, h, n, n, 3), np.float32),
            "t": rng.uniform(size=(batch,)).astype(np.float32),
            "context": rng.uniform(-1, 1, (batch, config.data.context_frames, n, n, 3)
                                   ).astype(np.float32),
            "text": rng.standard_normal((batch, TEXT_TOKENS, config.model.text_width), np.float32),
            # clips alternate between all tokens real and two real tokens
            "text_mask": np.arange(TEXT_TOKENS)[None] < np.where(
                np.arange(batch) % 2 == 0, TEXT_TOKENS, 2)[:, None],
            "heatmaps": heatmaps,
            "sgg_keep": np.ones((batch,), bool)}


def _output_shape(abstract_model: WorldModel, inputs: dict) -> jax.ShapeDtypeStruct:
    """The output shape of a model made by `nnx.eval_shape` (nothing is computed)."""
    graphdef, state = nnx.split(abstract_model)
    return jax.eval_shape(lambda s, i: nnx.merge(graphdef, s)(**i), state, inputs)


def _forward(model: WorldModel):
    """A jitted forward over (params, inputs) of `model`'s graph."""
    graphdef, params = nnx.split(model)
    return jax.jit(lambda p, inputs: nnx.merge(graphdef, p)(**inputs)), params


@pytest.mark.parametrize("tubelet,image,patch,horizons", [
    (1, 64, 8, (1, 3, 8)),  # every frame count up to the configured horizon
    (1, 32, 8, (2, 8)),  # another resolution, same parameters
    (2, 48, 8, (2, 4, 8)),  # space-time tubelets of 2 frames
    (1, 32, 16, (8,)),  # larger patches
])
def test_output_shape_and_dtype_for_horizons_and_resolutions(tubelet, image, patch, horizons):
    config = small_config(f"model.tubelet={tubelet}", f"model.patch_size={patch}",
                          image=64, horizon=8, patch=patch)
    model = nnx.eval_shape(lambda: make_model(config))
    for horizon in horizons:
        inputs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                              _inputs(config, horizon=horizon, image=image))
        out = _output_shape(model, inputs)
        assert out.shape == (2, horizon, image, image, 3) and out.dtype == jnp.float32


def test_frame_counts_beyond_horizon_or_off_tubelet_are_refused():
    config = small_config("model.tubelet=2", horizon=4)
    model = nnx.eval_shape(lambda: make_model(config))
    for horizon in (6, 3):
        with pytest.raises(ValueError, match="multiple of tubelet 2 and at most"):
            _output_shape(model, _inputs(config, horizon=horizon))


def test_every_parameter_has_logical_axis_names():
    config = small_config(depth=2)
    model = nnx.eval_shape(lambda: WorldModel.from_config(config, nnx.Rngs(0)))
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert len(params) > 50
    for path, var in params:
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.get_value().shape), path
        assert set(names) <= set(LOGICAL_AXES) | {None}, (path, names)
    spec = nnx.get_partition_spec(nnx.state(model.dit.blocks[0].mlp.up))
    assert tuple(spec["kernel"].get_value()) == ("embed", "mlp")
    spec = nnx.get_partition_spec(nnx.state(model.dit.blocks[0].spatial_attn.query))
    assert tuple(spec["kernel"].get_value()) == ("embed", "heads", "kv")


def _mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"),
                axis_types=(AxisType.Auto,) * 3)


def test_params_and_activations_shard_only_under_rules_and_mesh():
    config = small_config()
    rules = tuple(config.mesh.logical_axis_rules)
    dense = lambda: Dense(16, 32, ("embed", "mlp"), rngs=nnx.Rngs(0))
    assert dense().kernel[...].sharding.is_fully_replicated
    forward, params = _forward(make_model(config))
    inputs = _inputs(config, batch=4)
    assert "sharding_constraint" not in forward.lower(params, inputs).as_text()
    with nnx.logical_axis_rules(rules):  # rules without a mesh: nothing to shard over
        assert "sharding_constraint" not in forward.lower(params, inputs).as_text()
    with jax.set_mesh(_mesh()), nnx.logical_axis_rules(rules):
        assert tuple(dense().kernel[...].sharding.spec) == ("fsdp", "tensor")
        hlo = forward.lower(params, inputs).as_text()
    # every block's token grid, attention heads and MLP hidden, the SGG injections, ...
    assert hlo.count("sharding_constraint") >= 15


def test_dense_contracts_the_trailing_axes_as_tensordot_does():
    """Dense computes one 2-D matmul over flattened axes (faster on CPU); the product is the
    tensordot of its trailing in_shape axes with the kernel, for any leading axes, forward
    and backward, with several in and out axes (the attention projections' (H, E))."""
    layer = Dense((3, 4), (2, 5), (None, None, None, None), rngs=nnx.Rngs(0))
    layer.bias[...] = jax.random.normal(jax.random.key(3), (2, 5))
    kernel, bias = np.asarray(layer.kernel[...], np.float64), np.asarray(layer.bias[...])
    for lead in ((), (6,), (2, 7)):
        x = np.asarray(jax.random.normal(jax.random.key(len(lead)), (*lead, 3, 4)))
        want = np.tensordot(x.astype(np.float64), kernel, axes=2) + bias
        np.testing.assert_allclose(layer(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.key(9), (2, 7, 3, 4))
    grad = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2))(params)
    y = np.tensordot(np.asarray(x, np.float64), kernel, axes=2) + bias  # (2, 7, 2, 5)
    want = np.tensordot(np.asarray(x, np.float64), 2 * y, axes=([0, 1], [0, 1]))  # (3, 4, 2, 5)
    np.testing.assert_allclose(grad["kernel"][...], want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"trailing axes \(3, 4\)"):
        layer(jnp.zeros((2, 4, 3)))


def test_fresh_sgg_branch_leaves_the_output_unchanged():
    """ControlNet property: on a backbone with non-zero weights (as after training), adding the
    zero-initialised SGG branch changes nothing, with or without heatmaps; once its injection
    weights move, the heatmaps do change the output (so the check can fail)."""
    config = small_config()
    model = make_model(config)
    randomize(model.dit, seed=1)
    forward, params = _forward(model)
    inputs = _inputs(config)
    dropped = dict(inputs, sgg_keep=jnp.zeros((2,), bool))
    with_sgg = np.asarray(forward(params, inputs))
    without = np.asarray(forward(params, dropped))
    assert np.abs(with_sgg).mean() > 1e-2  # the backbone's output is not trivially zero
    np.testing.assert_array_equal(with_sgg, without)

    randomize(model.sgg.inject, seed=2, scale=0.05)
    _, params = _forward(model)
    moved = np.asarray(forward(params, inputs))
    assert np.abs(moved - without).mean() > 1e-3
    np.testing.assert_array_equal(np.asarray(forward(params, dropped)), without)


def test_gradient_reaches_every_parameter():
    config = small_config()
    model = make_model(config)
    randomize(model, seed=3)
    graphdef, params = nnx.split(model, nnx.Param)
    inputs = _inputs(config)

    @jax.jit
    def grad(p):
        return jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(**inputs) ** 2))(p)

    grads = nnx.to_flat_state(grad(params))
    for path, g in grads:
        if path[0] == "text_encoder":
            continue  # WorldModel.__call__ takes text embeddings; the encoder is not used here
        assert np.all(np.isfinite(g[...])) and np.abs(g[...]).max() > 0, path


def test_remat_policies_save_and_recompute_what_they_say():
    """'dots' keeps the blocks' matmul outputs for the backward pass and recomputes only the
    cheap elementwise work; 'full' keeps no matmul output and recomputes the whole forward
    pass of each block, so its gradient costs the most FLOPs (XLA's own count)."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    inputs = _inputs(small_config())
    matmuls_saved, flops = {}, {}
    for policy in ("none", "full", "dots"):
        model = VideoDiT.from_config(small_config(f"model.remat={policy}"), nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(
            inputs["x_t"], inputs["t"], inputs["context"], inputs["text"], inputs["text_mask"]))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            print_saved_residuals(loss, params)
        matmuls_saved[policy] = printed.getvalue().count("output of dot_general")
        cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
        flops[policy] = (cost if isinstance(cost, dict) else cost[0])["flops"]
    assert matmuls_saved["full"] == 0 < matmuls_saved["dots"], matmuls_saved
    assert flops["full"] > flops["dots"] >= flops["none"], flops
    # dots recomputes elementwise work only: a small part of what full recomputes
    assert flops["dots"] - flops["none"] < 0.25 * (flops["full"] - flops["none"]), flops


@pytest.mark.slow
def test_remat_gives_the_same_gradients():
    config = small_config()
    inputs = _inputs(config)
    grads = {}
    for policy in ("none", "full", "dots"):
        model = make_model(small_config(f"model.remat={policy}"))
        randomize(model, seed=4)
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(**inputs) ** 2)
        grads[policy] = jax.jit(jax.grad(loss))(params)
    for policy in ("full", "dots"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     grads["none"], grads[policy])


def test_bfloat16_compute_with_float32_params_tracks_float32():
    inputs = _inputs(small_config())
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        model = make_model(small_config(f"model.dtype={dtype}"))
        randomize(model, seed=5)
        assert model.dit.blocks[0].mlp.up.kernel[...].dtype == jnp.float32
        forward, params = _forward(model)
        outputs[dtype] = forward(params, inputs)
    assert outputs["bfloat16"].dtype == jnp.float32
    f32, bf16 = np.asarray(outputs["float32"]), np.asarray(outputs["bfloat16"])
    assert np.all(np.isfinite(bf16))
    rel = np.linalg.norm(bf16 - f32) / np.linalg.norm(f32)
    assert 0 < rel < 0.05, rel  # bfloat16 keeps ~3 significant digits; differs, but tracks
