"""Named TPU and GPU target topologies, and stand-in devices for compiling to them from a CPU host.

`pewm-compile` (pewm_jax/compile_cli.py) builds the real train step over the stand-in devices of
a topology and compiles it ahead of time with libtpu or the JAX CUDA plugin (`pip install -e
'.[aot]'`), so a sharding mistake or an out-of-memory shows before a pod's queue wait. The
table's chip memory is the vendor's figure; the peaks come from `metrics.device_peak_flops`.
Importing this module does not import JAX.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # JAX is imported late: pewm-compile sets its environment first
    import jax


class AotUnavailable(RuntimeError):
    """The compiler plugin a topology needs is not installed."""


# A trimmed copy of XLA's xla/backends/gpu/target_config/specs/h100_sxm.txtpb: the fields this
# jaxlib's GpuTargetConfigProto knows. The CUDA plugin compiles for it without a GPU.
H100_SXM = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 8 minor: 9 patch: 4 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

GIB = 2**30
# JAX preallocates this share of GPU memory (XLA_PYTHON_CLIENT_MEM_FRACTION's default); XLA
# enforces TPU HBM itself, so all of it is usable there.
GPU_USABLE_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Topology:
    """One target: its chips, hosts, per-chip memory and how the compiler plugin describes it."""

    name: str  # as given to --topology
    platform: str  # "tpu" or "cuda"
    chips: int  # devices JAX sees (a v5p "chip" is one megacore device)
    hosts: int  # processes (one per host)
    hbm_bytes: int  # memory per chip: the vendor's GiB (H100: what XLA's target config says)
    usable_fraction: float  # share of hbm_bytes a train step may use
    device_kind: str  # jax.Device.device_kind of the real chip (peak FLOP/s lookup)
    desc_kwargs: tuple[tuple[str, Any], ...]  # get_topology_desc arguments

    @property
    def usable_bytes(self) -> float:
        """Bytes one chip may use for a train step."""
        return self.hbm_bytes * self.usable_fraction


def _tpu(name: str, topology: str, chip_config: str, bounds: tuple[int, int, int], chips: int,
         hosts: int, hbm: int, kind: str) -> Topology:
    return Topology(name, "tpu", chips, hosts, hbm, 1.0, kind, (
        ("topology_name", topology), ("chip_config_name", chip_config),
        ("chips_per_host_bounds", bounds), ("num_slices", 1)))


def _h100(name: str, hosts: int) -> Topology:
    # The plugin reads "<partitions>x<hosts per partition>x<devices per host>".
    return Topology(name, "cuda", 8 * hosts, hosts, 84_942_979_072, GPU_USABLE_FRACTION,
                    "NVIDIA H100 80GB HBM3",
                    (("target_config", H100_SXM), ("topology", f"1x{hosts}x8")))


TOPOLOGIES: dict[str, Topology] = {t.name: t for t in (
    # v5e: 16 GiB per chip; an 8-chip VM, and 256-chip pods of 4-chip hosts.
    _tpu("v5e-8", "v5e:2x4", "default", (2, 4, 1), 8, 1, 16 * GIB, "TPU v5 lite"),
    _tpu("v5e-256", "v5e:16x16", "default", (2, 2, 1), 256, 64, 16 * GIB, "TPU v5 lite"),
    # v5p: 95 GiB per chip; v5p-N has N TensorCores, N/2 megacore chips, 4 chips per host.
    _tpu("v5p-8", "v5:2x2x1", "megacore", (2, 2, 1), 4, 1, 95 * GIB, "TPU v5"),
    _tpu("v5p-128", "v5:4x4x4", "megacore", (2, 2, 1), 64, 16, 95 * GIB, "TPU v5"),
    _tpu("v5p-1024", "v5:8x8x8", "megacore", (2, 2, 1), 512, 128, 95 * GIB, "TPU v5"),
    _h100("h100x8", 1),
    _h100("2xh100x8", 2),
)}

# (config spec, topology) pairs every shipped config is proven on: golden shardings
# (tests/golden/sharding), `pewm-compile` and benchmarks/pod_plan.py.
SHIPPED_PLANS: tuple[tuple[str, str], ...] = (
    ("configs/quickstart.py", "v5e-8"),
    ("configs/quickstart.py", "h100x8"),
    ("configs/mid.py", "v5p-8"),
    ("configs/pewm_base.py:v5p-128", "v5p-128"),
    ("configs/pewm_base.py:v5e-256", "v5e-256"),
    ("configs/pewm_base.py:h100x8", "h100x8"),
    ("configs/pewm_base.py:h100x8", "2xh100x8"),
    ("configs/pewm_large.py:v5p-1024", "v5p-1024"),
)

PLUGINS = {"tpu": "libtpu", "cuda": "jax-cuda12-plugin"}  # platform -> distribution


def get_topology(name: str) -> Topology:
    """The topology called `name`; ValueError listing the known names otherwise."""
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    return TOPOLOGIES[name]


def plugin_installed(platform: str) -> bool:
    """Whether the compiler plugin for `platform` ("tpu" or "cuda") is installed."""
    try:
        importlib.metadata.version(PLUGINS[platform])
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def stand_in_devices(topology: Topology) -> list[jax.Device]:
    """Devices that stand in for the topology's chips: compile for them, never run.

    Raises AotUnavailable naming the install command when the plugin is missing.
    """
    if not plugin_installed(topology.platform):
        raise AotUnavailable(
            f"compiling for {topology.name} needs {PLUGINS[topology.platform]}, which is not "
            "installed. Fix: pip install -e '.[aot]'")
    from jax.experimental import topologies  # imported here: it loads the plugin

    desc = topologies.get_topology_desc(platform=topology.platform, **dict(topology.desc_kwargs))
    devices = list(desc.devices)
    if len(devices) != topology.chips:
        raise AotUnavailable(f"{topology.name}: this {PLUGINS[topology.platform]} gives "
                             f"{len(devices)} devices where {topology.chips} are expected. Fix: "
                             "pip install -e '.[aot]' for the versions pewm-jax is tested with")
    return devices
