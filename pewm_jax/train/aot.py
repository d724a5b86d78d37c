"""Ahead-of-time compilation of the real train step for a target topology, from a CPU host.

The step is the one `loop.train` runs (`state.TrainStep`), built over the stand-in devices of a
topology (`parallel.topologies`) from abstract state and batch (`jax.ShapeDtypeStruct`s with
their shardings: nothing is allocated or executed), then compiled by libtpu or the CUDA plugin.
The report says per chip what the program needs (arguments, outputs, temporaries) against the
chip's memory, its FLOPs and collectives, and the clips/s the pod would train at a stated MFU.
A step that does not fit becomes a ConfigError naming the config keys to change.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import types
from importlib import metadata
from typing import Any

import jax
import ml_collections

from pewm_jax.config import ConfigError, resolve_mesh_shape
from pewm_jax.parallel import mesh as mesh_lib
from pewm_jax.parallel import topologies
from pewm_jax.parallel.topologies import GIB
from pewm_jax.parallel.global_batch import batch_sharding
from pewm_jax.train import metrics, state as state_lib
from pewm_jax.train.abstract_layout import STAND_IN_VOCAB
from pewm_jax.train.kind import ModelKind

# Units of a training example, for the projected throughput.
EXAMPLE_NAMES = {"world_model": "clips", "planner": "plans"}

# Collective ops in optimized HLO: `op(` or async `op-start(`, never `-done(` or names.
_COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|"
                         r"collective-permute)(?:-start)?\(")
# libtpu's out-of-memory errors: the total used, or the temporaries alone.
_TPU_OOM_TOTAL = re.compile(r"Used ([\d.]+)([KMGT]?)i?B? of [\d.]+[KMGT]?i?B? hbm", re.IGNORECASE)
_TPU_OOM_TEMPS = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)i?B?\)",
                            re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What one compiled train step needs per chip, and what the pod would do with it."""

    config: str  # the config spec, e.g. configs/pewm_base.py:v5p-128
    topology: str
    kind: str  # world_model or planner
    chips: int
    hosts: int
    mesh: dict[str, int]
    params: int  # trainable + frozen parameters
    global_batch: int
    grad_accum_steps: int
    remat: str | None  # the world model's remat policy (the planner has none)
    argument_bytes: int | None  # per chip; None when the compiler ran out of memory (TPU)
    output_bytes: int | None
    alias_bytes: int | None  # outputs written into donated arguments (the state)
    temp_bytes: int | None
    code_bytes: int | None
    need_bytes: int  # bytes one chip needs (out of memory on TPU: what the compiler reported)
    usable_bytes: float  # bytes one chip may use
    hbm_bytes: int
    model_flops_per_step: float  # analytic forward + backward FLOPs of the global batch
    xla_flops_per_chip: float | None  # XLA's count (with remat recompute); None on GPU
    peak_flops_per_chip: float  # vendor dense peak at the compute dtype
    collectives: dict[str, int]  # op -> static count in the program
    compile_seconds: float
    versions: dict[str, str]

    @property
    def compiled(self) -> bool:
        """False when the compiler stopped because the step ran out of memory (TPU)."""
        return self.argument_bytes is not None

    @property
    def fits(self) -> bool:
        """Whether the step compiled and one chip's need is within its usable memory."""
        return self.compiled and self.need_bytes <= self.usable_bytes

    @property
    def memory_fraction(self) -> float:
        """Need per chip as a fraction of the chip's memory (not of the usable part)."""
        return self.need_bytes / self.hbm_bytes

    def step_seconds(self, mfu: float) -> float:
        """Seconds per step if the pod ran at model FLOPs utilisation `mfu`."""
        return self.model_flops_per_step / (mfu * self.peak_flops_per_chip * self.chips)

    def examples_per_second(self, mfu: float) -> float:
        """Training examples (clips, plans) per second for the pod at `mfu`."""
        return self.global_batch / self.step_seconds(mfu)

    def to_json(self, mfu: float) -> dict[str, Any]:
        """The report as JSON-ready fields, with the projection at `mfu`."""
        return dict(dataclasses.asdict(self), fits=self.fits,
                    memory_fraction=self.memory_fraction, mfu=mfu,
                    step_seconds=self.step_seconds(mfu),
                    examples_per_second=self.examples_per_second(mfu))

    def text(self, mfu: float) -> str:
        """A few lines for people: memory per chip, FLOPs, collectives, the projection."""
        gb = lambda b: "?" if b is None else f"{b / GIB:.2f}"  # noqa: E731
        hosts = f"{self.hosts} host" + ("s" if self.hosts > 1 else "")
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        stopped = not self.compiled
        ops = ", ".join(f"{k} {v}" for k, v in self.collectives.items()) or (
            "unknown (out of memory)" if stopped else "none")
        xla = ("unknown (out of memory)" if stopped else "n/a (GPU)"
               if self.xla_flops_per_chip is None else f"{_si(self.xla_flops_per_chip)}FLOP")
        usable = ("" if self.usable_bytes == self.hbm_bytes else
                  f", {self.usable_bytes / GIB:.1f} GiB usable: JAX preallocates "
                  f"{self.usable_bytes / self.hbm_bytes:.0%} of GPU memory")
        return "\n".join([
            f"{self.config} -> {self.topology} ({self.kind}): {self.chips} chips on {hosts}, "
            f"mesh {mesh}, {_si(self.params)} parameters, global "
            f"batch {self.global_batch} (x{self.grad_accum_steps} accumulation), remat "
            f"{self.remat or 'n/a'}",
            f"  memory per chip (GiB): {gb(self.need_bytes)} of {self.hbm_bytes / GIB:.1f} "
            f"({self.memory_fraction:.0%}{usable}) = arguments {gb(self.argument_bytes)} + "
            f"outputs {gb(self.output_bytes)} - aliased {gb(self.alias_bytes)} + temporaries "
            f"{gb(self.temp_bytes)} + code {gb(self.code_bytes)}: "
            + ("fits" if self.fits else "DOES NOT FIT"
               + ("" if self.compiled else " (the compiler ran out of memory)")),
            f"  FLOPs per step: model {_si(self.model_flops_per_step)}FLOP (analytic, "
            f"whole batch); XLA per chip {xla}",
            f"  collectives (static count; those in the accumulation loop run per microbatch): "
            f"{ops}",
            f"  at {mfu:.0%} MFU ({self.peak_flops_per_chip / 1e12:.0f} TFLOP/s peak per chip): "
            f"{self.step_seconds(mfu):.3f} s per step, "
            f"{self.examples_per_second(mfu):,.0f} {EXAMPLE_NAMES[self.kind]}/s",
            f"  compiled in {self.compile_seconds:.0f} s with "
            + ", ".join(f"{k} {v}" for k, v in self.versions.items()),
        ])


def _si(value: float) -> str:
    """`value` with an SI prefix: 1.23 G, 45.6 T."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g} "


def abstract_batch(config: ml_collections.ConfigDict, kind: ModelKind, vocab_size: int,
                   mesh: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of `kind` as ShapeDtypeStructs sharded as the trainer shards it."""
    rows = batch_sharding(mesh)
    return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
            for key, (shape, dtype) in kind.batch_shapes(config, vocab_size).items()}


def collective_counts(hlo_text: str) -> dict[str, int]:
    """Static count of each collective op in optimized HLO text."""
    counts: dict[str, int] = {}
    for match in _COLLECTIVE.finditer(hlo_text):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return dict(sorted(counts.items()))


def tpu_oom_bytes(message: str) -> tuple[int, bool] | None:
    """(bytes needed, whether that counts temporaries only) from libtpu's out-of-memory
    error; None for any other error."""
    if "RESOURCE_EXHAUSTED" not in message:
        return None
    for pattern, temporaries in ((_TPU_OOM_TOTAL, False), (_TPU_OOM_TEMPS, True)):
        match = pattern.search(message)
        if match:
            return int(float(match.group(1)) * _UNITS[match.group(2).upper()]), temporaries
    return None


def _versions(platform: str) -> dict[str, str]:
    plugin = topologies.PLUGINS[platform]
    return {"jax": jax.__version__, "jaxlib": metadata.version("jaxlib"),
            plugin: metadata.version(plugin)}


def compile_train_step(config: ml_collections.ConfigDict, spec: str,
                       topology: topologies.Topology, kind: ModelKind,
                       devices: list[Any], vocab_size: int = STAND_IN_VOCAB) -> CompileReport:
    """Compiles `kind`'s train step of `config` for `topology` over stand-in `devices`.

    A TPU program that runs out of memory is a compile error; it becomes a report that does not
    fit (breakdown unknown), so callers treat both platforms alike.
    """
    kind_name = kind.name
    mesh = mesh_lib.make_mesh(config, devices)
    layout = state_lib.state_layout(config, vocab_size, mesh, kind)
    step = state_lib.TrainStep(config, layout)
    batch = abstract_batch(config, kind, vocab_size, mesh)
    train = kind.train(config)
    compute_dtype = kind.compute_dtype(config)
    peak = metrics.device_peak_flops(types.SimpleNamespace(device_kind=topology.device_kind),
                                     compute_dtype)
    common = dict(
        config=spec, topology=topology.name, kind=kind_name, chips=topology.chips,
        hosts=topology.hosts, mesh=resolve_mesh_shape(config, topology.chips),
        params=sum(x.size for x in jax.tree.leaves(layout.abstract.params)),
        global_batch=train.global_batch_size, grad_accum_steps=train.grad_accum_steps,
        remat=kind.remat(config),
        usable_bytes=topology.usable_bytes, hbm_bytes=topology.hbm_bytes,
        model_flops_per_step=kind.flops_per_step(config, vocab_size),
        peak_flops_per_chip=peak, versions=_versions(topology.platform))
    start = time.perf_counter()
    try:
        compiled = step.lower(layout.abstract, batch).compile()
    except jax.errors.JaxRuntimeError as error:
        oom = tpu_oom_bytes(str(error))
        if oom is None:
            raise
        needed, temporaries = oom
        return CompileReport(**common, argument_bytes=None, output_bytes=None, alias_bytes=None,
                             temp_bytes=needed if temporaries else None, code_bytes=None,
                             need_bytes=needed,
                             xla_flops_per_chip=None, collectives={},
                             compile_seconds=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    need = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes
            + memory.generated_code_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return CompileReport(
        **common, argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes, code_bytes=memory.generated_code_size_in_bytes,
        need_bytes=need, xla_flops_per_chip=(cost or {}).get("flops"),
        collectives=collective_counts(compiled.as_text()), compile_seconds=seconds)


def fit_error(report: CompileReport, config: ml_collections.ConfigDict,
              kind: ModelKind) -> ConfigError:
    """The error for `kind`'s step that does not fit: the need, and the config keys that lower
    it.

    Temporaries (activations) shrink with a smaller per-step batch, more accumulation or
    rematerialisation; arguments (parameters, optimizer state) with more fsdp/tensor sharding.
    """
    section, train = kind.section, kind.train(config)
    batch, accum = train.global_batch_size, train.grad_accum_steps
    data_parallel = report.mesh["data"] * report.mesh["fsdp"]
    # The smallest power-of-two factor that would bring the need under the limit, were the
    # whole need to shrink with it (a first guess: rerun pewm-compile to check).
    factor = 2 ** max(1, math.ceil(math.log2(max(report.need_bytes / report.usable_bytes, 1))))
    fixes = []
    if batch % (accum * factor) == 0 and (batch // (accum * factor)) % data_parallel == 0:
        fixes.append(f"config.{section}.grad_accum_steps ({accum} -> {accum * factor})")
    if (batch // factor) % (data_parallel * accum) == 0 and batch % factor == 0:
        fixes.append(f"config.{section}.global_batch_size ({batch} -> {batch // factor})")
    if report.kind == "world_model" and config.model.remat != "full":
        fixes.append(f"config.model.remat ({config.model.remat!r} -> 'full')")
    fsdp, data = report.mesh["fsdp"], report.mesh["data"]
    if data % factor == 0:
        fixes.append(f"config.mesh.fsdp ({fsdp} -> {factor * fsdp}, with config.mesh.data -1) "
                     "or config.mesh.tensor, to shard parameters and optimizer state further")
    if report.kind == "world_model" and config.model.param_dtype == "float32":
        fixes.append("config.model.param_dtype ('float32' -> 'bfloat16')")
    if not fixes:
        fixes.append("a bigger topology, or a smaller model (config.model / config.planner "
                     "width and depth)")
    temporaries_first = report.temp_bytes is None or report.temp_bytes >= (
        report.argument_bytes or 0)
    if not temporaries_first:  # parameters and optimizer state dominate: sharding first
        fixes.sort(key=lambda fix: not fix.startswith(("config.mesh", "config.model.param")))
    gb = lambda b: "?" if b is None else f"{b / GIB:.1f}"  # noqa: E731
    breakdown = ("the compiler ran out of memory" if not report.compiled else
                 f"arguments {gb(report.argument_bytes)} + outputs {gb(report.output_bytes)} - "
                 f"aliased {gb(report.alias_bytes)} + temporaries {gb(report.temp_bytes)}")
    return ConfigError(
        f"{report.config} does not fit {report.topology} ({report.kind}): it needs "
        f"{'at least ' if not report.compiled else ''}{gb(report.need_bytes)} GiB per chip "
        f"({breakdown}), more than the {gb(report.usable_bytes)} GiB a chip may use. Fix, in "
        "this order: "
        + "; ".join(fixes) + ". Then run pewm-compile again.")
