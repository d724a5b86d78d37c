"""Train-state layouts from shapes and rules alone, and the rule that parameters are
sufficiently sharded.

Everything here comes from `jax.eval_shape` and the config's logical-axis rules over an
`AbstractMesh` of a topology's size: no devices, no plugins, no compile. `pewm-compile` checks
every plan with it before compiling, and the golden sharding tables (tests/sharding_golden.py)
are written from it.
"""

from __future__ import annotations

import math

import jax
import ml_collections
from jax.sharding import AbstractMesh, AxisType

from pewm_jax.config import MESH_AXES, ConfigError, resolve_mesh_shape
from pewm_jax.parallel import mesh as mesh_lib
from pewm_jax.train import state as state_lib
from pewm_jax.train.kind import ModelKind

# On a mesh with fsdp > 1, at most this share of parameter bytes may be left whole on every
# chip (norm scales and biases the rules do not shard); more means a rule is missing.
MAX_REPLICATED_PARAM_SHARE = 0.05
STAND_IN_VOCAB = 1100  # about a built tokenizer's size: specials, 1024 locations, words


def abstract_mesh(config: ml_collections.ConfigDict, chips: int) -> AbstractMesh:
    """The config's (data, fsdp, tensor) mesh for `chips` devices, without devices."""
    shape = resolve_mesh_shape(config, chips)
    return AbstractMesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(MESH_AXES))


def abstract_layout(config: ml_collections.ConfigDict, chips: int, kind: ModelKind,
                    vocab_size: int = STAND_IN_VOCAB) -> state_lib.StateLayout:
    """The train-state layout of `kind` on `chips` devices, from shapes and rules alone."""
    return state_lib.state_layout(config, vocab_size, abstract_mesh(config, chips), kind)


def replicated_params(layout: state_lib.StateLayout) -> tuple[float, list[tuple[str, int]]]:
    """Share of parameter bytes every chip holds whole, and those leaves (path, bytes),
    largest first."""
    mesh_shape = dict(layout.mesh.shape)
    devices = math.prod(mesh_shape.values())
    leaves, _ = jax.tree_util.tree_flatten_with_path(layout.abstract.params)
    total, whole = 0, []
    for path, leaf in leaves:
        size = leaf.size * leaf.dtype.itemsize
        total += size
        if mesh_lib.devices_per_shard(leaf.sharding.spec, mesh_shape) == devices:
            whole.append((jax.tree_util.keystr(path, simple=True, separator="/"), size))
    whole.sort(key=lambda item: -item[1])
    return sum(size for _, size in whole) / total, whole


def check_sufficiently_sharded(layout: state_lib.StateLayout, what: str) -> float:
    """The replicated parameter share; ConfigError when the mesh has fsdp > 1 and more than
    MAX_REPLICATED_PARAM_SHARE of parameter bytes are replicated."""
    share, whole = replicated_params(layout)
    fsdp = dict(layout.mesh.shape)["fsdp"]
    if fsdp > 1 and share > MAX_REPLICATED_PARAM_SHARE:
        largest = ", ".join(f"{path} ({size / 1e6:.1f} MB)" for path, size in whole[:5])
        raise ConfigError(
            f"{what}: {share:.1%} of the {layout.kind.name}'s parameter bytes are replicated on "
            f"every chip of an fsdp={fsdp} mesh (at most {MAX_REPLICATED_PARAM_SHARE:.0%} may "
            f"be); largest: {largest}. Fix: map these parameters' logical axes to a mesh axis "
            "in config.mesh.logical_axis_rules (e.g. ('embed', 'fsdp')), and make "
            "config.mesh.fsdp divide their sizes.")
    return share
