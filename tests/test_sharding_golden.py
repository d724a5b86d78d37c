"""Golden shardings of the shipped configs, and the sufficiently-sharded rule (no plugins, no
compile: shapes and logical-axis rules over an abstract mesh of each topology's size)."""

from __future__ import annotations

import functools
import json

import pytest
import sharding_golden

from pewm_jax.config import ConfigError, load_config
from pewm_jax.parallel import topologies
from pewm_jax.recipes import kinds
from pewm_jax.train import abstract_layout


@functools.cache
def _table(spec: str, topology: str) -> dict:
    """The table computed from the code, once per session (a pod config takes ~10 s)."""
    return sharding_golden.sharding_table(spec, topology)


# The pod plans take ~15 s each (tracing a pod-size model): the default suite compares the
# small configs and one pod plan (whose table the next test reads too); the slow stage the rest.
DEFAULT_SUITE_PLANS = {("configs/pewm_base.py:h100x8", "h100x8")}


@pytest.mark.parametrize("spec, topology", [
    pytest.param(spec, topology, marks=() if spec in ("configs/quickstart.py", "configs/mid.py")
                 or (spec, topology) in DEFAULT_SUITE_PLANS else pytest.mark.slow)
    for spec, topology in topologies.SHIPPED_PLANS])
def test_shardings_match_the_committed_golden_tables(spec, topology):
    path = sharding_golden.golden_path(spec, topology)
    assert path.exists(), (f"no golden table {path}; write it with "
                           "`python tests/sharding_golden.py --update`")
    diff = sharding_golden.table_diff(json.loads(path.read_text()), _table(spec, topology))
    assert not diff, ("shardings changed:\n" + "\n".join(diff[:40]) + "\nIf intended, rerun "
                      "`python tests/sharding_golden.py --update` and commit.")


def test_large_parameters_of_pod_configs_are_sharded_over_fsdp():
    table = _table("configs/pewm_base.py:h100x8", "h100x8")
    params = table["world_model"]["params"]
    assert len(params) > 900  # every leaf is listed
    for path, line in params.items():
        shape = [int(n) for n in line[line.index("[") + 1:line.index("]")].split(",") if n]
        if len(shape) >= 2 and shape[0] * shape[-1] >= 2**20:
            assert "'fsdp'" in line, (path, line)
    assert table["world_model"]["replicated_param_share"] < 0.01
    # Adam's moments lie like their parameters.
    kernel = params["dit/blocks/0/mlp/up/kernel"]
    moments = [line for path, line in table["world_model"]["opt_state"].items()
               if path.endswith("dit/blocks/0/mlp/up/kernel")]
    assert moments == [kernel, kernel] and kernel.endswith("P('fsdp', 'tensor')")


def _quickstart_fsdp8(*overrides: str):
    return load_config("configs/quickstart.py", ["mesh.data=1", "mesh.fsdp=8", *overrides], 8)


def test_a_config_that_replicates_its_parameters_is_refused():
    config = _quickstart_fsdp8()
    layout = abstract_layout.abstract_layout(config, 8, kinds.WORLD_MODEL)
    share = abstract_layout.check_sufficiently_sharded(layout, "quickstart")
    assert share < abstract_layout.MAX_REPLICATED_PARAM_SHARE
    # 'embed' no longer on fsdp: almost every parameter is whole on every chip.
    config = _quickstart_fsdp8(
        "mesh.logical_axis_rules=(('batch', ('data', 'fsdp')), ('frames', None), "
        "('tokens', None), ('embed', 'tensor'), ('heads', 'tensor'), ('mlp', 'tensor'), "
        "('vocab', 'tensor'), ('kv', None))")
    layout = abstract_layout.abstract_layout(config, 8, kinds.WORLD_MODEL)
    with pytest.raises(ConfigError, match=r"replicated on every chip of an fsdp=8 mesh.*"
                                          r"config\.mesh\.logical_axis_rules"):
        abstract_layout.check_sufficiently_sharded(layout, "quickstart")


def test_without_fsdp_replication_is_the_plan():
    layout = abstract_layout.abstract_layout(load_config("configs/quickstart.py", (), 8), 8,
                                            kinds.WORLD_MODEL)
    assert abstract_layout.check_sufficiently_sharded(layout, "quickstart") == 1.0
