"""Golden shardings: the PartitionSpec of every parameter and optimizer-state leaf of a shipped
config on a target topology, and the rule that parameters are sufficiently sharded.

Everything here comes from `jax.eval_shape` and the config's logical-axis rules over an
`AbstractMesh` of the topology's size: no devices, no plugins, no compile. The tables are
committed under tests/golden/sharding; the test compares them, so a change to a model, a rule
or a config that moves a parameter shows as a diff. After an intended change:

    python -m pewm_jax.parallel.sharding_table --update
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from pewm_jax import config as config_lib
from pewm_jax.config import MESH_AXES, ConfigError, resolve_mesh_shape
from pewm_jax.parallel import mesh as mesh_lib
from pewm_jax.parallel import topologies
from pewm_jax.train import kinds, state as state_lib

# On a mesh with fsdp > 1, at most this share of parameter bytes may be left whole on every
# chip (norm scales and biases the rules do not shard); more means a rule is missing.
MAX_REPLICATED_PARAM_SHARE = 0.05
STAND_IN_VOCAB = 1100  # about a built tokenizer's size: specials, 1024 locations, words
GOLDEN_DIR = pathlib.Path(__file__).resolve().parents[2] / "tests" / "golden" / "sharding"
# The steps pewm-compile builds (the action decoder's needs the dataset's action spec).
KINDS: dict[str, kinds.ModelKind] = {name: kinds.KINDS[name] for name in ("world_model", "planner")}


def abstract_mesh(config: ml_collections.ConfigDict, chips: int) -> AbstractMesh:
    """The config's (data, fsdp, tensor) mesh for `chips` devices, without devices."""
    shape = resolve_mesh_shape(config, chips)
    return AbstractMesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(MESH_AXES))


def abstract_layout(config: ml_collections.ConfigDict, chips: int, kind: kinds.ModelKind,
                    vocab_size: int = STAND_IN_VOCAB) -> state_lib.StateLayout:
    """The train-state layout of `kind` on `chips` devices, from shapes and rules alone."""
    return state_lib.state_layout(config, vocab_size, abstract_mesh(config, chips), kind)


def _spec_text(spec: PartitionSpec) -> str:
    return "P(" + ", ".join(repr(entry) for entry in spec) + ")"


def _leaf_lines(tree: Any) -> dict[str, str]:
    """'/'-joined path -> 'dtype[shape] P(...)' for every array leaf (MaskedNodes skipped)."""
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=masked)
    return {jax.tree_util.keystr(path, simple=True, separator="/"):
            f"{leaf.dtype}[{','.join(map(str, leaf.shape))}] {_spec_text(leaf.sharding.spec)}"
            for path, leaf in leaves if not masked(leaf)}


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


def sharding_table(spec: str, topology_name: str) -> dict[str, Any]:
    """The golden table of config `spec` on `topology_name`: mesh, replicated share, and the
    PartitionSpec of each parameter and optimizer-state leaf of the world model and planner."""
    topology = topologies.get_topology(topology_name)
    config = config_lib.load_config(spec, num_devices=topology.chips)
    table: dict[str, Any] = {"config": spec, "topology": topology_name,
                             "mesh": resolve_mesh_shape(config, topology.chips)}
    for name, kind in KINDS.items():
        layout = abstract_layout(config, topology.chips, kind)
        share = check_sufficiently_sharded(layout, f"{spec} on {topology_name}")
        table[name] = {"replicated_param_share": round(share, 6),
                       "params": _leaf_lines(layout.abstract.params),
                       "opt_state": _leaf_lines(layout.abstract.opt_state)}
    return table


def golden_path(spec: str, topology_name: str) -> pathlib.Path:
    """tests/golden/sharding/<config stem>[_<arg>]@<topology>.json."""
    path, _, arg = spec.partition(":")
    stem = pathlib.Path(path).stem + (f"_{arg}" if arg else "")
    return GOLDEN_DIR / f"{stem}@{topology_name}.json"


def table_diff(golden: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Lines that differ between two tables ('-' golden, '+' current), by flattened key."""
    def flat(tree: Any, prefix: str = "") -> dict[str, str]:
        if isinstance(tree, dict):
            return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}/")
                    .items()}
        return {prefix.rstrip("/"): json.dumps(tree)}

    old, new = flat(golden), flat(current)
    lines = []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            lines += [f"- {key}: {old[key]}"] if key in old else []
            lines += [f"+ {key}: {new[key]}"] if key in new else []
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    """Writes (--update) or checks the golden tables of every shipped (config, topology)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="rewrite the golden files")
    args = parser.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")  # shapes and rules only: no accelerator plugin
    changed = 0
    for spec, topology_name in topologies.SHIPPED_PLANS:
        path, table = golden_path(spec, topology_name), sharding_table(spec, topology_name)
        golden = json.loads(path.read_text()) if path.exists() else {}
        diff = table_diff(golden, table)
        changed += bool(diff)
        print(f"{path.name}: {'unchanged' if not diff else f'{len(diff)} lines differ'}")
        if diff and args.update:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    if changed and not args.update:
        raise SystemExit(f"{changed} tables differ; rerun with --update if that is intended")


if __name__ == "__main__":
    main()
