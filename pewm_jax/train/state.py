"""The train state, the optimizer, and the one jitted train step, all laid out on the mesh.

The same for every model the trainer trains; what differs (the module, its loss, its training
settings `config.train` or `config.planner.train`) comes from the `ModelKind` in the layout.

    TrainState   step (int32), params and ema_params (pure dicts of arrays, the checkpoint
                 format), opt_state (optax), rng (uint32 key data; step keys are
                 fold_in(rng, step), so randomness is a pure function of (seed, step))

`create_train_state` makes the state already sharded: `jax.eval_shape` of the initialiser
gives shapes and logical names, `pewm_jax.parallel.mesh.state_shardings` turns them into
NamedShardings, and `jax.jit(init, out_shardings=...)` materialises every array straight into
its shards (no host or single-device copy of the full model). `TrainStep` is one `jax.jit`
with explicit in/out shardings and the state donated.

Optimizer: AdamW with linear warmup and cosine decay, global-norm clipping, decoupled weight
decay on matrices only, inside `optax.multi_transform` so frozen parameters (the kind's `frozen`,
the train section's `frozen` patterns) get `optax.set_to_zero()` and no gradient is computed for
them. Gradient accumulation runs `grad_accum_steps` microbatches in a `lax.scan` inside the
step; mixed precision is the model's compute dtype over its parameter dtype, with the loss and
optimizer in float32.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pewm_jax.config import ConfigError
from pewm_jax.parallel import mesh as mesh_lib
from pewm_jax.parallel.global_batch import batch_sharding

if TYPE_CHECKING:
    from pewm_jax.train.kind import ModelKind

Params = dict[str, Any]
FROZEN, TRAINABLE = "frozen", "trainable"


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree, so it passes through jit whole."""

    step: jax.Array  # () int32: optimizer steps taken
    params: Params  # nested dict of arrays, as nnx.to_pure_dict gives
    ema_params: Params  # exponential moving average of params (used for sampling / export)
    opt_state: optax.OptState
    rng: jax.Array  # (2,) uint32 key data of the run's base key


def learning_rate_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, then cosine decay to final_lr_fraction *
    learning_rate at `steps` (of the train section `t`)."""
    warmup = min(t.warmup_steps, t.steps)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, t.learning_rate, max(warmup, 1)),
         optax.cosine_decay_schedule(t.learning_rate, max(t.steps - warmup, 1),
                                     alpha=t.final_lr_fraction)],
        boundaries=[warmup])


def _path(keys: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keys)


def frozen_labels(t: ml_collections.ConfigDict, abstract_params: nnx.State,
                  section: str = "train", fixed: Sequence[str] = ()) -> Params:
    """'frozen' or 'trainable' per parameter (pure dict): those matching the patterns of
    `t.frozen` (the train section `section`) or the kind's always-`fixed` ones are frozen.

    Raises ConfigError for a pattern of `t.frozen` that matches no parameter (a typo would
    otherwise silently train everything).
    """
    patterns = [re.compile(p) for p in (*t.frozen, *fixed)]
    hits = {p.pattern: 0 for p in patterns}

    def label(keys: tuple, _) -> str:
        matched = [p for p in patterns if p.fullmatch(_path(keys))]
        for p in matched:
            hits[p.pattern] += 1
        return FROZEN if matched else TRAINABLE

    labels = jax.tree_util.tree_map_with_path(label, nnx.to_pure_dict(abstract_params))
    unmatched = [p for p in t.frozen if hits[p] == 0]
    if unmatched:
        some = ", ".join(_path(k) for k, _ in jax.tree_util.tree_leaves_with_path(labels)[:6])
        raise ConfigError(f"config.{section}.frozen pattern {unmatched[0]!r} matches no parameter. "
                         f"Fix: patterns fully match '/'-joined paths such as {some}, ...")
    return labels


def make_optimizer(t: ml_collections.ConfigDict, labels: Params) -> optax.GradientTransformation:
    """AdamW + warmup/cosine + clipping (train section `t`) for trainable parameters; frozen
    ones never change."""
    inner = optax.chain(
        optax.clip_by_global_norm(t.grad_clip) if t.grad_clip else optax.identity(),
        optax.adamw(learning_rate_schedule(t), b2=t.adam_b2, weight_decay=t.weight_decay,
                    mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)))
    return optax.multi_transform({TRAINABLE: inner, FROZEN: optax.set_to_zero()}, labels)


def ema_decay(t: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    """EMA decay at `step`: min(t.ema_decay, (1 + step) / (10 + step)), so early averages are
    not dominated by the random initialisation."""
    step = step.astype(jnp.float32)
    return jnp.minimum(t.ema_decay, (1.0 + step) / (10.0 + step))


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """What the run needs besides the state: the model kind and graph, optimizer, labels,
    shardings."""

    kind: ModelKind
    graphdef: nnx.GraphDef
    vocab_size: int
    optimizer: optax.GradientTransformation
    labels: Params
    shardings: TrainState  # a NamedSharding per leaf
    abstract: TrainState  # jax.ShapeDtypeStructs carrying the shardings (restore target)
    mesh: Mesh
    rules: mesh_lib.Rules


def state_layout(config: ml_collections.ConfigDict, vocab_size: int, mesh: Mesh,
                 kind: ModelKind) -> StateLayout:
    """Shapes, shardings and optimizer of the train state of `kind`, without allocating it."""
    rules = mesh_lib.axis_rules(config)
    with nnx.use_eager_sharding(False):
        abstract_model = nnx.eval_shape(lambda: kind.build(config, vocab_size,
                                                           nnx.Rngs(config.seed)))
    graphdef, abstract_params, rest = nnx.split(abstract_model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"the {kind.name} holds non-parameter state {rest}; the train state "
                         "only carries nnx.Param")
    labels = frozen_labels(kind.train(config), abstract_params, kind.section,
                           kind.frozen(config))
    optimizer = make_optimizer(kind.train(config), labels)
    param_shardings = nnx.to_pure_dict(mesh_lib.state_shardings(abstract_params, mesh, rules))
    repl = mesh_lib.replicated(mesh)

    def init_abstract() -> TrainState:
        params = nnx.to_pure_dict(abstract_params)
        return TrainState(jnp.zeros((), jnp.int32), params, params, optimizer.init(params),
                          jax.random.key_data(jax.random.key(0)))

    shapes = jax.eval_shape(init_abstract)
    # Moments take their parameter's sharding; counters are replicated; the MaskedNodes that
    # multi_transform leaves where a group's parameters are absent stay as they are.
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    opt_shardings = optax.tree_map_params(
        optimizer, lambda leaf, sharding: leaf if masked(leaf) else sharding, shapes.opt_state,
        param_shardings, transform_non_params=lambda _: repl, is_leaf=masked)
    shardings = TrainState(repl, param_shardings, param_shardings, opt_shardings, repl)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, shardings)
    return StateLayout(kind, graphdef, vocab_size, optimizer, labels, shardings, abstract, mesh,
                       rules)


def create_train_state(config: ml_collections.ConfigDict, layout: StateLayout) -> TrainState:
    """A fresh train state at step 0, initialised directly into its shards (then the kind's
    pretrained parts, if any, loaded into them)."""
    def init() -> TrainState:
        with nnx.use_eager_sharding(False):
            model = layout.kind.build(config, layout.vocab_size, nnx.Rngs(config.seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return TrainState(jnp.zeros((), jnp.int32), params, params, layout.optimizer.init(params),
                          jax.random.key_data(jax.random.key(config.seed)))

    state = jax.jit(init, out_shardings=layout.shardings)()
    return layout.kind.load_pretrained(config, state, layout)


def copy_tree(tree: Any, shardings: Any) -> Any:
    """A copy of `tree` in new buffers laid out by `shardings`: params and EMA params must not
    share buffers, because the train step donates the state."""
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(tree)


def _stop_frozen(params: Params, labels: Params) -> Params:
    """Frozen parameters behind stop_gradient, so no gradient is computed for them."""
    return jax.tree.map(lambda p, label: jax.lax.stop_gradient(p) if label == FROZEN else p,
                        params, labels)


class TrainStep:
    """`(state, batch) -> (state, metrics)`: one optimizer step, jitted with explicit shardings.

    The batch is the global batch (the kind's batch spec, leading dimension sharded over the
    data axes); the state is donated. Metrics (replicated scalars): loss and the loss's own metrics,
    grad_norm (trainable parameters, before clipping), learning_rate (of this step).
    """

    def __init__(self, config: ml_collections.ConfigDict, layout: StateLayout):
        self.layout = layout
        train = layout.kind.train(config)
        accum = train.grad_accum_steps
        schedule = learning_rate_schedule(train)
        graphdef, labels, optimizer = layout.graphdef, layout.labels, layout.optimizer
        loss_fn = layout.kind.loss
        rows = batch_sharding(layout.mesh)  # every batch key: rows over the data axes
        micro_sharding = NamedSharding(layout.mesh, PartitionSpec(None, *rows.spec))

        def loss_of(params: Params, batch: Mapping[str, jax.Array], key: jax.Array):
            model = nnx.merge(graphdef, _stop_frozen(params, labels))
            return loss_fn(model, batch, key, config)

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)

        def gradients(params: Params, batch: Mapping[str, jax.Array], key: jax.Array):
            if accum == 1:
                (_, metrics), grads = grad_fn(params, batch, key)
                return grads, metrics
            # Microbatch j holds rows j, j + accum, ...: each stays evenly sharded.
            micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
                x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1),
                micro_sharding), batch)

            def body(carry, inputs):
                mb, j = inputs
                (_, metrics), grads = grad_fn(params, mb, jax.random.fold_in(key, j))
                return jax.tree.map(jnp.add, carry, (grads, metrics)), None

            zero = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), key)
            zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zero[1], zero[0][1]))
            (grads, metrics), _ = jax.lax.scan(body, zero, (micro, jnp.arange(accum)))
            return jax.tree.map(lambda g: g / accum, (grads, metrics))

        def step(state: TrainState, batch: Mapping[str, jax.Array]):
            key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            grads, metrics = gradients(state.params, batch, key)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            decay = ema_decay(train, state.step)
            ema = jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype),
                               state.ema_params, params)
            metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                           learning_rate=schedule(state.step))
            return TrainState(state.step + 1, params, ema, opt_state, state.rng), metrics

        self._jitted = jax.jit(step, in_shardings=(layout.shardings, rows),
                               out_shardings=(layout.shardings, mesh_lib.replicated(layout.mesh)),
                               donate_argnums=0)

    def __call__(self, state: TrainState, batch: Mapping[str, jax.Array]
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One step (traced with the mesh and logical rules active, so activations shard)."""
        with mesh_lib.activate(self.layout.mesh, self.layout.rules):
            return self._jitted(state, batch)

    def lower(self, state: Any, batch: Mapping[str, Any]) -> jax.stages.Lowered:
        """The step lowered for `state` and `batch` (arrays or jax.ShapeDtypeStructs with
        shardings), for compiling ahead of time: `pewm-compile` on stand-in devices."""
        with mesh_lib.activate(self.layout.mesh, self.layout.rules):
            return self._jitted.lower(state, batch)
