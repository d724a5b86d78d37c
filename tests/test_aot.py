"""pewm-compile: topologies, reading compiled programs, the fit error, and (marked `aot`, with
libtpu and the CUDA plugin from `.[aot]`) real ahead-of-time compiles for TPU and GPU targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from pewm_jax import compile_cli
from pewm_jax.config import ConfigError, load_config
from pewm_jax.parallel import topologies
from pewm_jax.parallel.topologies import GIB
from pewm_jax.recipes import kinds
from pewm_jax.train import aot, metrics

HLO = """
  %all-reduce.3 = f32[256]{0} all-reduce(f32[256]{0} %p), replica_groups={{0,1}}
  %all-gather-start.1 = (bf16[8]{0}, bf16[64]{0}) all-gather-start(bf16[8]{0} %x), dimensions={0}
  %all-gather-done.1 = bf16[64]{0} all-gather-done((bf16[8]{0}, bf16[64]{0}) %all-gather-start.1)
  %reduce-scatter.7 = f32[32]{0} reduce-scatter(f32[256]{0} %g), dimensions={0}
  %all-reduce-start.2 = f32[] all-reduce-start(f32[] %l), replica_groups={{0,1}}
  %all-reduce-done.2 = f32[] all-reduce-done(f32[] %all-reduce-start.2)
  %fusion.all-reduce = f32[] fusion(f32[] %q), kind=kLoop
"""


def test_collectives_are_counted_once_each_in_optimized_hlo():
    assert aot.collective_counts(HLO) == {"all-gather": 1, "all-reduce": 2, "reduce-scatter": 1}


def test_tpu_out_of_memory_message_gives_the_bytes_needed():
    message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
               "space hbm. Used 48.21G of 15.75G hbm. Exceeded hbm capacity by 32.46G.\n"
               "Total hbm usage >= 48.46G: ...")
    assert aot.tpu_oom_bytes(message) == (int(48.21 * 2**30), False)
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
               "temporaries (99.95G) exceeds available HBM (15.75G).")
    assert aot.tpu_oom_bytes(message) == (int(99.95 * 2**30), True)
    assert aot.tpu_oom_bytes("INTERNAL: something else") is None


def test_every_topology_has_its_chips_memory_and_peak():
    for topology in topologies.TOPOLOGIES.values():
        assert topology.chips % topology.hosts == 0
        kind = types.SimpleNamespace(device_kind=topology.device_kind)
        assert metrics.device_peak_flops(kind, "bfloat16") > 1e14, topology.name
    v5e, v5p, h100 = (topologies.get_topology(n) for n in ("v5e-256", "v5p-128", "2xh100x8"))
    assert (v5e.chips, v5e.hosts, v5e.usable_bytes) == (256, 64, 16 * GIB)
    assert (v5p.chips, v5p.hosts, v5p.usable_bytes) == (64, 16, 95 * GIB)  # N/2 chips
    assert (h100.chips, h100.hosts) == (16, 2)
    assert h100.usable_bytes == pytest.approx(0.75 * 79.1 * GIB, rel=1e-3)  # JAX's prealloc


def test_missing_plugin_names_the_install_command(monkeypatch):
    monkeypatch.setattr(topologies, "plugin_installed", lambda platform: False)
    with pytest.raises(topologies.AotUnavailable, match=r"pip install -e '\.\[aot\]'"):
        topologies.stand_in_devices(topologies.get_topology("v5e-8"))


def test_compile_environment_drops_host_flags_and_plans_gpu_matmuls():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d "
                        "--xla_cpu_collective_call_terminate_timeout_seconds=1800"}
    compile_cli.compile_environment("tpu", env)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/d"
    assert env["JAX_PLATFORMS"] == "cpu" and env["TPU_SKIP_MDS_QUERY"] == "1"
    env = {"XLA_FLAGS": "--xla_gpu_autotune_level=2"}
    compile_cli.compile_environment("cuda", env)
    assert env["XLA_FLAGS"].split() == ["--xla_gpu_autotune_level=2",
                                        "--xla_gpu_enable_triton_gemm=false"]


def _fit_error(report: aot.CompileReport, config):
    return aot.fit_error(report, config, kinds.KINDS[report.kind])


def _report(**fields) -> aot.CompileReport:
    base = dict(config="configs/x.py", topology="v5e-8", kind="world_model", chips=8, hosts=1,
                mesh={"data": 8, "fsdp": 1, "tensor": 1}, params=10**9, global_batch=512,
                grad_accum_steps=1, remat="dots", argument_bytes=2 * GIB, output_bytes=2 * GIB,
                alias_bytes=2 * GIB, temp_bytes=40 * GIB, code_bytes=0, need_bytes=42 * GIB,
                usable_bytes=16 * GIB, hbm_bytes=16 * GIB, model_flops_per_step=1e16,
                xla_flops_per_chip=1.4e15, peak_flops_per_chip=197e12,
                collectives={"all-reduce": 3}, compile_seconds=1.0, versions={})
    return aot.CompileReport(**{**base, **fields})


def test_a_step_that_does_not_fit_names_the_keys_to_change():
    config = load_config("configs/pewm_base.py:v5p-128",
                         ["mesh.data=8", "mesh.fsdp=1", "model.param_dtype=float32"], 8)
    report = _report()
    assert not report.fits
    error = _fit_error(report, config)
    assert isinstance(error, ConfigError)
    text = str(error)
    assert "needs 42.0 GiB per chip" in text and "16.0 GiB a chip may use" in text
    # 42 GB against 16: a factor of 4 (the next power of two above 2.6).
    keys = ["config.train.grad_accum_steps (1 -> 4)", "config.train.global_batch_size "
            "(512 -> 128)", "config.model.remat ('dots' -> 'full')", "config.mesh.fsdp (1 -> 4"]
    positions = [text.index(key) for key in keys]
    assert positions == sorted(positions)  # activations dominate: batch and remat first
    # Parameters and optimizer state dominate: more sharding comes first.
    text = str(_fit_error(_report(argument_bytes=30 * GIB, temp_bytes=GIB), config))
    assert text.index("config.mesh.fsdp") < text.index("config.train.grad_accum_steps")
    # The planner's keys are its own section's, and it has no remat.
    text = str(_fit_error(_report(kind="planner", remat=None), config))
    assert "config.planner.train.grad_accum_steps" in text and "remat" not in text


def test_a_step_the_tpu_compiler_stopped_never_fits():
    # libtpu reported only the temporaries (below the limit): the step still did not compile.
    report = _report(argument_bytes=None, output_bytes=None, alias_bytes=None, code_bytes=None,
                     temp_bytes=12 * GIB, need_bytes=12 * GIB)
    assert not report.compiled and not report.fits
    text = str(_fit_error(report, load_config("configs/quickstart.py", (), 8)))
    assert "needs at least 12.0 GiB" in text and "the compiler ran out of memory" in text


def test_the_projection_follows_from_flops_peak_and_mfu():
    report = _report(need_bytes=10 * GIB)
    assert report.fits
    seconds = 1e16 / (0.4 * 197e12 * 8)
    assert report.step_seconds(0.4) == pytest.approx(seconds)
    assert report.examples_per_second(0.4) == pytest.approx(512 / seconds)
    assert json.loads(json.dumps(report.to_json(0.4)))["examples_per_second"] > 0


def _compile(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict] | None]:
    """pewm-compile in its own process (it sets JAX's environment before importing JAX), run
    in `tmp_path` with a --json path relative to it."""
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pewm_jax.compile_cli", f"--json={out.name}",
                           *args], capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ), cwd=tmp_path)
    return proc, json.loads(out.read_text()) if out.exists() else None


def test_unknown_topology_lists_the_known_ones(tmp_path):
    proc, _ = _compile(tmp_path, "--config=configs/quickstart.py", "--topology=v9-bogus")
    assert proc.returncode == 2, proc.stderr
    assert "v5p-128" in proc.stderr and "h100x8" in proc.stderr


def test_a_replicated_config_is_refused_before_compiling(tmp_path):
    rules = ("(('batch', ('data', 'fsdp')), ('frames', None), ('tokens', None), "
             "('embed', 'tensor'), ('heads', 'tensor'), ('mlp', 'tensor'), ('vocab', 'tensor'), "
             "('kv', None))")
    proc, report = _compile(tmp_path, "--config=configs/quickstart.py", "--topology=v5e-8",
                            "--config.mesh.data=1", "--config.mesh.fsdp=8",
                            f"--config.mesh.logical_axis_rules={rules}")
    assert proc.returncode == 2, proc.stderr
    assert "replicated" in proc.stderr and "config.mesh.logical_axis_rules" in proc.stderr
    assert report is None


needs_libtpu = pytest.mark.skipif(not topologies.plugin_installed("tpu"),
                                  reason="libtpu is not installed: pip install -e '.[aot]'")
needs_cuda_plugin = pytest.mark.skipif(not topologies.plugin_installed("cuda"),
                                       reason="the JAX CUDA plugin is not installed: "
                                              "pip install -e '.[aot]'")


@pytest.mark.aot
@pytest.mark.parametrize("topology", [
    pytest.param("v5e-8", marks=needs_libtpu), pytest.param("h100x8", marks=needs_cuda_plugin)])
def test_quickstart_train_steps_compile_and_fit(tmp_path, topology):
    proc, reports = _compile(tmp_path, "--config=configs/quickstart.py", f"--topology={topology}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["kind"] for r in reports] == ["world_model", "planner"]
    for r in reports:
        assert r["fits"] and 0 < r["need_bytes"] < r["usable_bytes"]
        assert r["argument_bytes"] >= r["alias_bytes"] > 0  # the donated state is reused
        assert r["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
        assert r["collectives"].get("all-reduce", 0) > 0  # data-parallel gradients
        if topology == "v5e-8":  # XLA's own count is near the analytic one (remat: none)
            ratio = r["xla_flops_per_chip"] * r["chips"] / r["model_flops_per_step"]
            assert 0.8 < ratio < 2.0, ratio
        else:
            assert r["xla_flops_per_chip"] is None
    assert "fits" in proc.stdout


@pytest.mark.aot
@pytest.mark.parametrize("topology", [
    pytest.param("v5e-8", marks=needs_libtpu), pytest.param("h100x8", marks=needs_cuda_plugin)])
def test_an_oversized_config_fails_naming_the_keys(tmp_path, topology):
    proc, reports = _compile(
        tmp_path, "--config=configs/quickstart.py", f"--topology={topology}",
        "--kind=world_model", "--config.world.image_size=128", "--config.model.width=512",
        "--config.model.num_heads=8", "--config.data.horizon=16",
        "--config.train.global_batch_size=2048")
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert "does not fit" in message and topology in message
    for key in ("config.train.grad_accum_steps", "config.train.global_batch_size",
                "config.model.remat", "config.mesh.fsdp"):
        assert key in message
    assert "Traceback" not in proc.stderr
    assert not reports[0]["fits"]


@pytest.mark.aot
@needs_libtpu
def test_a_mesh_axis_that_splits_the_torus_is_laid_out():
    # fsdp 8 on v5p-128's 4x4x4 chips is no product of whole torus axes: jax.make_mesh refuses
    # it, our mesh splits one axis.
    code = """if True:
        import os
        from pewm_jax import compile_cli
        compile_cli.compile_environment("tpu", os.environ)
        from pewm_jax.config import load_config
        from pewm_jax.parallel import mesh, topologies
        devices = topologies.stand_in_devices(topologies.get_topology("v5p-128"))
        config = load_config("configs/pewm_base.py:v5p-128", ["mesh.fsdp=8"], len(devices))
        grid = mesh.make_mesh(config, devices)
        print(dict(grid.shape), sorted(d.id for d in grid.devices.flat) == sorted(
            d.id for d in devices))
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "{'data': 8, 'fsdp': 8, 'tensor': 1} True"
