"""Multi-host start: `jax.distributed.initialize` from flags or environment, never silently skipped.

How a process learns it is one of many (the launchers under launch/ set these):
    PEWM_COORDINATOR_ADDRESS=host:port, PEWM_NUM_PROCESSES=N, PEWM_PROCESS_ID=i
        explicit: jax.distributed.initialize(host:port, N, i) (local launcher, SLURM)
    PEWM_MULTIHOST=1
        JAX's own cluster detection (Cloud TPU pod metadata, SLURM, ...) (TPU pod launcher)
    neither: one process, nothing to initialise.
The CLI flags --coordinator_address, --num_processes, --process_id and --multihost mean the
same and win over the environment. A start that was asked for and fails raises
`DistributedInitError` with the cause; the run never falls back to training alone.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Mapping

import jax

ENV_COORDINATOR = "PEWM_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "PEWM_NUM_PROCESSES"
ENV_PROCESS_ID = "PEWM_PROCESS_ID"
ENV_MULTIHOST = "PEWM_MULTIHOST"


class DistributedInitError(RuntimeError):
    """A multi-process start was asked for but is misconfigured or failed."""


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """How to start this process's part of a multi-process job (see the module docstring)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False  # JAX cluster auto-detection

    @property
    def multi_process(self) -> bool:
        """True when this process is to join others (explicitly or by auto-detection)."""
        return self.auto or self.coordinator_address is not None


def _int(value: str | int | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedInitError(f"{name} = {value!r} is not an integer. Fix: set it to a "
                                   "whole number, e.g. 2.") from None


def spec_from(environ: Mapping[str, str] | None = None, *, coordinator_address: str | None = None,
              num_processes: int | None = None, process_id: int | None = None,
              multihost: bool | None = None) -> DistributedSpec:
    """The start spec from keyword values (CLI flags) falling back to `environ`, checked.

    Raises DistributedInitError for an incomplete or inconsistent explicit spec, e.g. a
    coordinator without a process count, or a process id outside [0, N).
    """
    env = os.environ if environ is None else environ
    address = coordinator_address or env.get(ENV_COORDINATOR) or None
    count = num_processes if num_processes is not None else _int(env.get(ENV_NUM_PROCESSES),
                                                                 ENV_NUM_PROCESSES)
    index = process_id if process_id is not None else _int(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
    auto = bool(multihost) if multihost is not None else env.get(ENV_MULTIHOST, "") in ("1", "true")
    if address is None:
        if count is not None or index is not None:
            raise DistributedInitError(
                f"a process count or id was given ({ENV_NUM_PROCESSES}={count}, "
                f"{ENV_PROCESS_ID}={index}) without a coordinator. Fix: also set "
                f"{ENV_COORDINATOR}=host:port (or --coordinator_address), or unset them.")
        return DistributedSpec(auto=auto)
    if auto:
        raise DistributedInitError(
            f"both {ENV_MULTIHOST} (cluster auto-detection) and an explicit coordinator "
            f"{address!r} were given. Fix: use one of them.")
    if ":" not in address:
        raise DistributedInitError(
            f"coordinator address {address!r} has no port. Fix: write it as host:port, "
            "e.g. 127.0.0.1:12355.")
    if count is None or index is None:
        raise DistributedInitError(
            f"coordinator {address!r} needs both {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} "
            f"(or --num_processes and --process_id); got {count} and {index}.")
    if count < 1 or not 0 <= index < count:
        raise DistributedInitError(
            f"process id {index} is outside [0, {count}) for {count} processes. Fix: number "
            "processes 0 .. N-1.")
    return DistributedSpec(address, count, index)


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Waits until the coordinator's port accepts connections; raises DistributedInitError if
    it does not within `timeout_s` (JAX's own client would abort the process instead)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedInitError(
                    f"cannot reach the coordinator {address} within {timeout_s:.0f} s "
                    f"({type(e).__name__}: {e}). Check that process 0 runs with the same "
                    "coordinator address, that the host name resolves here and the port is "
                    "open between the hosts.") from e
            time.sleep(0.5)


def initialize(spec: DistributedSpec, *, timeout_s: int = 300) -> None:
    """Joins the multi-process job `spec` describes (nothing for a single process).

    Call before anything touches a JAX device. A failure raises DistributedInitError with the
    cause and what was tried; processes other than 0 first wait (up to `timeout_s`) for the
    coordinator's port, so an unreachable coordinator is an error message, not an abort.
    """
    if not spec.multi_process:
        return
    if jax.distributed.is_initialized():
        return
    tried = ("cluster auto-detection" if spec.auto else
             f"coordinator {spec.coordinator_address}, process {spec.process_id} of "
             f"{spec.num_processes}")
    if not spec.auto and spec.process_id != 0:
        _wait_for_coordinator(spec.coordinator_address, timeout_s)
    try:
        if spec.auto:
            jax.distributed.initialize(initialization_timeout=timeout_s)
        else:
            jax.distributed.initialize(spec.coordinator_address, spec.num_processes,
                                       spec.process_id, initialization_timeout=timeout_s)
    except Exception as e:  # jax raises RuntimeError / ValueError / XlaRuntimeError variously
        raise DistributedInitError(
            f"jax.distributed.initialize failed ({tried}): {type(e).__name__}: {e}. Check that "
            "every process got the same coordinator and process count, that process 0 is "
            "running and its port is reachable, and that each process id is used once.") from e
