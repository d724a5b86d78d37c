"""The device mesh and the logical-axis rules: where every parameter and activation lives.

Models name logical axes (`batch`, `embed`, `heads`, ...; see `pewm_jax.config.LOGICAL_AXES`)
and never a mesh. The config maps them to the mesh axes `data`, `fsdp`, `tensor`
(`config.mesh.logical_axis_rules`), and this module applies that one table to everything:
the world model, the action decoder and the planner, their parameters, optimizer states,
activations (`pewm_jax.models.layers.constrain`) and checkpoint restore targets.

A dimension whose size the mapped mesh axes do not divide is replicated instead of sharded,
with a warning naming the parameters (and a mesh axis already used by an earlier dimension of
the same array is not reused), so tiny test models run on any mesh; production sizes divide
and shard as the rules say.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pewm_jax.config import MESH_AXES, resolve_mesh_shape
from pewm_jax.sharding_rules import Rules, logical_to_mesh_spec



def make_mesh(config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh of config.mesh over `devices` (default: all devices).

    One axis may be -1 and takes the devices the others leave; sizes that cannot tile the
    device count raise `pewm_jax.config.ConfigError` naming the axes. Axes are `Auto`, so
    logical sharding constraints inside jit are hints the compiler completes.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(config, len(devices))
    sizes = tuple(shape[axis] for axis in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()) or devices[0].platform != "cpu":
        # Device order follows the physical topology (TPU ICI torus, hosts), as jax.make_mesh
        # orders it, for real chips and for pewm-compile's stand-ins alike; an axis that is
        # no product of whole torus axes splits one (fsdp 8 on v5p-128's 4x4x4) instead of
        # failing.
        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=auto)


def axis_rules(config: ml_collections.ConfigDict) -> Rules:
    """config.mesh.logical_axis_rules as a tuple of (logical name, mesh axes) pairs."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                 for name, axes in config.mesh.logical_axis_rules)


def _variable_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names an NNX variable was created with (`nnx.with_partitioning`)."""
    return variable.get_metadata().get("out_sharding")


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
    """A NamedSharding per array leaf of `state` (NNX variables, optax states, plain arrays).

    NNX variables use the logical names they were created with (`nnx.with_partitioning`);
    anything else, such as optimizer step counts, is replicated. Leaves may be arrays or
    `jax.ShapeDtypeStruct`s (from `jax.eval_shape`).
    """
    mesh_shape = dict(mesh.shape)
    undivided = []

    def one(path: tuple, leaf: Any) -> Any:
        if isinstance(leaf, nnx.Variable):
            names = _variable_names(leaf)
            shape = leaf.get_value().shape
            if names is None:
                return leaf.replace(NamedSharding(mesh, PartitionSpec()))
            spec = logical_to_mesh_spec(names, rules, shape, mesh_shape)
            wanted = logical_to_mesh_spec(names, rules, None, mesh_shape)
            if devices_per_shard(spec, mesh_shape) > devices_per_shard(wanted, mesh_shape):
                undivided.append(f"{jax.tree_util.keystr(path)} {tuple(shape)}")
            return leaf.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    shardings = jax.tree_util.tree_map_with_path(
        one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    if undivided:
        logging.warning("%d parameters are replicated where the rules shard them, because the "
                        "mesh axes do not divide their sizes (more memory per device): %s",
                        len(undivided), ", ".join(undivided[:10]))
    return shardings


def devices_per_shard(spec: PartitionSpec, mesh_shape: Mapping[str, int]) -> int:
    """How many devices hold each shard of an array laid out by `spec` (1: fully sharded)."""
    used = [a for entry in spec if entry is not None
            for a in (entry if isinstance(entry, tuple) else (entry,))]
    return math.prod(mesh_shape.values()) // math.prod(mesh_shape[a] for a in used)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Mesh and logical rules in context: models built or traced inside shard as the rules say."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of a value every device holds whole (scalars, RNG keys, metrics)."""
    return NamedSharding(mesh, PartitionSpec())
