"""`pewm-compile`: compile a config's train steps for a TPU or GPU topology, on this CPU host.

    pewm-compile --config=configs/pewm_base.py:v5p-128 --topology=v5p-128
    pewm-compile --config=configs/quickstart.py --topology=h100x8 --kind=world_model \\
                 --config.train.global_batch_size=64 --json=report.json

Builds the real train step (world model, planner fine-tuning) over the topology's stand-in
devices, checks that parameters are sufficiently sharded, compiles it ahead of time with libtpu
or the JAX CUDA plugin (`pip install -e '.[aot]'`) and prints, per chip, the memory it needs
against the chip's, its FLOPs and collectives, and the pod's projected clips/s at --mfu.
Exit codes: 0 every step fits; 1 a missing or unknown flag; 2 a bad config, flag value or mesh,
too little sharding, a compiler error, or a step that does not fit (the message names the config
keys to change); 3 the compiler plugin is not installed.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import MutableMapping, Sequence
from typing import NoReturn

from absl import app, flags

from pewm_jax import config as config_lib
from pewm_jax import paths
from pewm_jax.parallel import topologies

_HOST_ONLY_FLAGS = re.compile(r"--xla_(force_host_platform_device_count|cpu_)\S*")


def _define_flags() -> None:
    """The flags, defined when the command runs (not on import: `pewm` has a --config too)."""
    flags.DEFINE_string("config", None, "Config file `configs/<name>.py[:arg]`; override keys "
                        "with --config.<key>=<value>.")
    flags.DEFINE_string("topology", None,
                        f"Target topology: {', '.join(topologies.TOPOLOGIES)}.")
    flags.DEFINE_list("kind", ["world_model", "planner"], "Train steps to compile: "
                      "world_model, planner.")
    flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation the throughput projection "
                       "assumes, in (0, 1].")
    flags.DEFINE_string("json", None, "Also write the reports (a list of objects) to this file.")
    flags.mark_flags_as_required(["config", "topology"])


def compile_environment(platform: str, env: MutableMapping[str, str]) -> None:
    """Sets `env` (os.environ before JAX is imported) for compiling with `platform`'s plugin.

    JAX itself runs on the CPU; libtpu must not query the GCE metadata server; XLA flags meant
    for the host CPU (fake device counts) are dropped, because the plugins refuse unknown flags.
    For CUDA there is no GPU to autotune on, and without autotuning XLA's Triton GEMM tiling
    fails on some float32 dots, so matmuls are planned as cuBLAS calls (flags the caller set
    win).
    """
    env["JAX_PLATFORMS"] = "cpu"
    env["TPU_SKIP_MDS_QUERY"] = "1"
    xla_flags = _HOST_ONLY_FLAGS.sub("", env.get("XLA_FLAGS", "")).split()
    if platform == "cuda":
        for flag in ("--xla_gpu_autotune_level=0", "--xla_gpu_enable_triton_gemm=false"):
            if not any(f.startswith(flag.split("=")[0] + "=") for f in xla_flags):
                xla_flags.append(flag)
    env["XLA_FLAGS"] = " ".join(xla_flags)


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"pewm-compile: {message}", file=sys.stderr)
    sys.exit(code)


def _run(overrides: list[str]) -> None:
    f = flags.FLAGS
    json_path = paths.resolve(f.json)  # against the directory the command was given in
    try:
        topology = topologies.get_topology(f.topology)
    except ValueError as e:
        _fail(str(e))
    if not 0 < f.mfu <= 1:
        _fail(f"--mfu={f.mfu} is not in (0, 1]; e.g. --mfu=0.4")
    compile_environment(topology.platform, os.environ)
    import jax  # only now: the environment above must be set first

    from pewm_jax.recipes.kinds import COMPILED, KINDS
    from pewm_jax.train import abstract_layout, aot

    reports = []
    try:
        unknown = sorted(set(f.kind) - set(COMPILED))
        if unknown or not f.kind:
            raise ValueError(f"--kind {','.join(f.kind)}: choose from {', '.join(COMPILED)}")
        config = config_lib.load_config(f.config, overrides, num_devices=topology.chips)
        for name in f.kind:
            layout = abstract_layout.abstract_layout(config, topology.chips, KINDS[name])
            abstract_layout.check_sufficiently_sharded(layout, f"{f.config} on {f.topology}")
        devices = topologies.stand_in_devices(topology)
        for name in f.kind:
            report = aot.compile_train_step(config, f.config, topology, KINDS[name], devices)
            print(report.text(f.mfu), flush=True)
            reports.append(report)
    except topologies.AotUnavailable as e:
        _fail(str(e), 3)
    except (config_lib.ConfigError, ValueError, NotImplementedError) as e:
        _fail(str(e))  # a bad config, flag value, or a mesh the topology cannot lay out
    except jax.errors.JaxRuntimeError as e:
        _fail(f"the compiler failed for {f.config} on {f.topology}: "
              f"{str(e).strip().splitlines()[0]}")
    if json_path:
        try:
            with open(json_path, "w", encoding="utf-8") as out:
                json.dump([r.to_json(f.mfu) for r in reports], out, indent=1)
        except OSError as e:
            _fail(f"cannot write --json={json_path}: {e}")
    for report in reports:
        if not report.fits:
            _fail(str(aot.fit_error(report, config, KINDS[report.kind])))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `pewm-compile` console script."""
    argv = list(sys.argv if argv is None else argv)
    _define_flags()
    overrides = [a.removeprefix("--config.") for a in argv[1:] if a.startswith("--config.")]
    rest = [a for a in argv[1:] if not a.startswith("--config.")]
    app.run(lambda _: _run(overrides), argv=["pewm-compile"] + rest)


if __name__ == "__main__":
    main()
