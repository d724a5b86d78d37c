"""Golden shardings: the PartitionSpec of every parameter and optimizer-state leaf of a shipped
config on a target topology (test tooling: it builds the trainer's layouts of the concrete
kinds, so it lives with the tests, not in the library).

The tables are committed under tests/golden/sharding; tests/test_sharding_golden.py compares
them, so a change to a model, a rule or a config that moves a parameter shows as a diff. After
an intended change:

    python tests/sharding_golden.py --update
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

from pewm_jax import config as config_lib  # noqa: E402
from pewm_jax.config import resolve_mesh_shape  # noqa: E402
from pewm_jax.parallel import topologies  # noqa: E402
from pewm_jax.recipes import kinds  # noqa: E402
from pewm_jax.train.abstract_layout import abstract_layout, check_sufficiently_sharded  # noqa: E402

GOLDEN_DIR = ROOT / "tests" / "golden" / "sharding"
# The kinds whose layouts the tables hold (the steps pewm-compile builds).
KINDS = {name: kinds.KINDS[name] for name in kinds.COMPILED}


def _spec_text(spec: PartitionSpec) -> str:
    return "P(" + ", ".join(repr(entry) for entry in spec) + ")"


def _leaf_lines(tree: Any) -> dict[str, str]:
    """'/'-joined path -> 'dtype[shape] P(...)' for every array leaf (MaskedNodes skipped)."""
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=masked)
    return {jax.tree_util.keystr(path, simple=True, separator="/"):
            f"{leaf.dtype}[{','.join(map(str, leaf.shape))}] {_spec_text(leaf.sharding.spec)}"
            for path, leaf in leaves if not masked(leaf)}


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
