"""Mesh from config, logical-axis rules, and the multi-process start contract."""

import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import ROOT, tiny_config
from pewm_jax.config import ConfigError
from pewm_jax.parallel import distributed
from pewm_jax.parallel import mesh as mesh_lib

RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
         ("tokens", None))


@pytest.mark.parametrize("axes, devices, shape", [
    (("-1", "1", "1"), 8, (8, 1, 1)),
    (("2", "-1", "2"), 8, (2, 2, 2)),
    (("1", "4", "-1"), 4, (1, 4, 1)),
    (("2", "2", "2"), 8, (2, 2, 2)),
])
def test_mesh_fills_the_minus_one_axis(axes, devices, shape):
    config = tiny_config(*(f"mesh.{a}={v}" for a, v in zip(("data", "fsdp", "tensor"), axes)))
    mesh = mesh_lib.make_mesh(config, jax.devices()[:devices])
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape


def test_mesh_that_does_not_tile_the_devices_names_the_axes():
    config = tiny_config("mesh.data=3", "mesh.fsdp=-1", "train.global_batch_size=24")
    with pytest.raises(ConfigError, match=r"data=3 x fsdp=-1 x tensor=1.*does not divide the 8"):
        mesh_lib.make_mesh(config)
    config = tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1")
    with pytest.raises(ConfigError, match="uses 4 devices but 8 are available"):
        mesh_lib.make_mesh(config)


def test_logical_names_map_through_the_rules():
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    # embed -> fsdp, mlp -> tensor
    assert mesh_lib.logical_to_mesh_spec(("embed", "mlp"), RULES, (64, 128), sizes) == P("fsdp", "tensor")
    # batch takes data and fsdp, so embed (also fsdp) is replicated rather than reused
    assert mesh_lib.logical_to_mesh_spec(("batch", "tokens", "embed"), RULES, (8, 4, 64),
                                         sizes) == P(("data", "fsdp"), None, None)
    # a dimension the axis size does not divide is replicated
    assert mesh_lib.logical_to_mesh_spec(("embed", "mlp"), RULES, (3, 128), sizes) == P(None, "tensor")
    # unknown names and None replicate
    assert mesh_lib.logical_to_mesh_spec((None, "vocab"), RULES, (4, 4), sizes) == P(None, None)


def test_one_rule_table_shards_the_world_model_params():
    config = tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.width=32",
                         "model.depth=1", "model.num_heads=2")
    from pewm_jax.recipes import kinds
    from pewm_jax.train import state as state_lib

    layout = state_lib.state_layout(config, 64, mesh_lib.make_mesh(config), kinds.WORLD_MODEL)
    specs = {jax.tree_util.keystr(p): s.spec for p, s in
             jax.tree_util.tree_leaves_with_path(layout.shardings.params)}
    sharded = [name for name, spec in specs.items() if any(a is not None for a in spec)]
    assert any("fsdp" in str(specs[n]) for n in sharded) and any("tensor" in str(specs[n])
                                                                 for n in sharded)
    # the optimizer moments follow their parameters; its counters are replicated
    opt = jax.tree.leaves(layout.shardings.opt_state)
    assert {str(s.spec) for s in opt} >= {str(s) for s in specs.values()}


@pytest.mark.parametrize("env, message", [
    ({"PEWM_NUM_PROCESSES": "2"}, "without a coordinator"),
    ({"PEWM_COORDINATOR_ADDRESS": "127.0.0.1:1234"}, "needs both PEWM_NUM_PROCESSES and PEWM_PROCESS_ID"),
    ({"PEWM_COORDINATOR_ADDRESS": "localhost", "PEWM_NUM_PROCESSES": "2", "PEWM_PROCESS_ID": "0"},
     "has no port"),
    ({"PEWM_COORDINATOR_ADDRESS": "h:1", "PEWM_NUM_PROCESSES": "2", "PEWM_PROCESS_ID": "2"},
     r"outside \[0, 2\)"),
    ({"PEWM_COORDINATOR_ADDRESS": "h:1", "PEWM_NUM_PROCESSES": "two", "PEWM_PROCESS_ID": "0"},
     "is not an integer"),
    ({"PEWM_COORDINATOR_ADDRESS": "h:1", "PEWM_NUM_PROCESSES": "2", "PEWM_PROCESS_ID": "0",
      "PEWM_MULTIHOST": "1"}, "use one of them"),
])
def test_inconsistent_multi_process_settings_are_refused(env, message):
    with pytest.raises(distributed.DistributedInitError, match=message):
        distributed.spec_from(env)


def test_flags_win_over_the_environment():
    env = {"PEWM_COORDINATOR_ADDRESS": "a:1", "PEWM_NUM_PROCESSES": "4", "PEWM_PROCESS_ID": "3"}
    spec = distributed.spec_from(env, coordinator_address="b:2", process_id=1)
    assert spec == distributed.DistributedSpec("b:2", 4, 1)
    assert not distributed.spec_from({}).multi_process
    assert distributed.spec_from({"PEWM_MULTIHOST": "1"}).auto


def test_a_failed_start_raises_with_its_cause_instead_of_running_alone(tmp_path):
    # Process 1 of 2 whose coordinator never answers: it must fail, not train alone.
    script = textwrap.dedent("""
        from pewm_jax.parallel import distributed
        spec = distributed.spec_from({"PEWM_COORDINATOR_ADDRESS": "127.0.0.1:9",
                                      "PEWM_NUM_PROCESSES": "2", "PEWM_PROCESS_ID": "1"})
        try:
            distributed.initialize(spec, timeout_s=2)
        except distributed.DistributedInitError as e:
            print("ERROR", e)
        else:
            import jax
            print("STARTED", jax.process_count())
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert "ERROR cannot reach the coordinator 127.0.0.1:9 within 2 s (ConnectionRefusedError" \
        in out.stdout, out.stdout + out.stderr[-2000:]
    assert "STARTED" not in out.stdout
