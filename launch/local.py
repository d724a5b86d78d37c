"""Start N processes of one `pewm` job on this machine, joined by a jax.distributed coordinator.

Every process gets the multi-host contract of `pewm_jax/parallel/distributed.py` in its
environment -- PEWM_COORDINATOR_ADDRESS=127.0.0.1:<port>, PEWM_NUM_PROCESSES=N,
PEWM_PROCESS_ID=i -- so a one-machine run goes through the same code path as a pod. Usage:

    python launch/local.py --num_processes 2 --cpu --devices_per_process 4 -- \\
        pewm train --config=configs/quickstart.py --workdir=runs/two_proc
    python launch/local.py --num_processes 2 --gpus_per_process 4 --log_dir runs/logs -- \\
        pewm train --config=configs/mid.py --workdir=runs/mid --resume

Output: every line a process writes (stdout and stderr) is printed as `[p<i>] <line>`, and with
--log_dir also written to <log_dir>/process_<i>.log. Exit: waits for all processes; when one
fails, the others get SIGTERM, then SIGKILL after --grace_s, and the launcher exits with the first
failure's code (128+signal for a process killed by a signal). SIGINT/SIGTERM sent to the launcher
are forwarded to every process (a trainer saves a checkpoint on SIGTERM and exits 0). Standard
library only, POSIX only.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO, TextIO

LOOPBACK = "127.0.0.1"
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free now on `host` (bind to port 0 and let the kernel pick one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, coordinator: str, *,
                base: Mapping[str, str] | None = None, cpu: bool = False,
                devices_per_process: int | None = None,
                gpus_per_process: int | None = None) -> dict[str, str]:
    """The environment of process `process_id`: `base` (default os.environ) plus the contract.

    PEWM_MULTIHOST is removed: it asks for JAX's cluster auto-detection, which would compete with
    the explicit coordinator set here.
    """
    env = dict(os.environ if base is None else base)
    env.pop("PEWM_MULTIHOST", None)
    env["PEWM_COORDINATOR_ADDRESS"] = coordinator
    env["PEWM_NUM_PROCESSES"] = str(num_processes)
    env["PEWM_PROCESS_ID"] = str(process_id)
    env.setdefault("PYTHONUNBUFFERED", "1")  # lines arrive as they are printed, not at exit
    if cpu:
        env["JAX_PLATFORMS"] = "cpu"
        if devices_per_process is not None:
            # Replace an inherited device count rather than leave two competing values.
            flags = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
            flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
            env["XLA_FLAGS"] = " ".join(flags)
    if gpus_per_process is not None:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = ([d.strip() for d in visible.split(",") if d.strip()] if visible
               else [str(d) for d in range(num_processes * gpus_per_process)])
        if len(ids) < num_processes * gpus_per_process:
            raise ValueError(f"{num_processes} processes x {gpus_per_process} GPUs need "
                             f"{num_processes * gpus_per_process} GPUs; CUDA_VISIBLE_DEVICES "
                             f"lists {len(ids)} ({visible})")
        start = process_id * gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[start:start + gpus_per_process])
    return env


def _pump(stream: IO[bytes], prefix: str, out: TextIO, lock: threading.Lock,
          log_path: str | None) -> None:
    """Copies `stream` line by line to `out` with `prefix` (and verbatim to `log_path`)."""
    log = open(log_path, "w", encoding="utf-8") if log_path else None
    try:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            if not line.endswith("\n"):
                line += "\n"
            with lock:
                out.write(prefix + line)
                out.flush()
            if log:
                log.write(line)
                log.flush()
    finally:
        stream.close()
        if log:
            log.close()


def _exit_code(returncode: int) -> int:
    """A shell-style exit code: 128+signal for a process killed by a signal."""
    return 128 - returncode if returncode < 0 else returncode


def _signal(proc: subprocess.Popen, sig: int, group: bool = False) -> None:
    """Sends `sig` to `proc` (or its whole process group) if it is still running."""
    if proc.poll() is not None:
        return
    try:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


def launch(command: Sequence[str], num_processes: int, *, devices_per_process: int | None = None,
           cpu: bool = False, gpus_per_process: int | None = None, port: int | None = None,
           log_dir: str | os.PathLike | None = None, grace_s: float = 30.0,
           env: Mapping[str, str] | None = None, out: TextIO | None = None) -> int:
    """Runs `num_processes` copies of `command` with the coordinator contract; returns the exit code.

    0 when every process exits 0; otherwise the first failure's code (128+signal when killed by a
    signal), after the remaining processes got SIGTERM and, `grace_s` seconds later, SIGKILL.
    `env` replaces os.environ as the base environment; `out` defaults to sys.stdout.
    """
    if not command:
        raise ValueError("no command to launch")
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    out = sys.stdout if out is None else out
    coordinator = f"{LOOPBACK}:{port if port is not None else free_port()}"
    envs = [process_env(i, num_processes, coordinator, base=env, cpu=cpu,
                        devices_per_process=devices_per_process,
                        gpus_per_process=gpus_per_process) for i in range(num_processes)]
    if log_dir is not None:
        os.makedirs(log_dir, exist_ok=True)
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    forwarded: list[int] = []

    def forward(signum: int, frame) -> None:  # SIGINT/SIGTERM to the launcher -> every process
        forwarded.append(signum)
        for p in procs:
            _signal(p, signum)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main_thread:  # signal handlers can only be installed from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)
    try:
        shown = shlex.join(command).replace("\n", "\\n")  # one line, even for `python -c` code
        with lock:
            out.write(f"[launch] {num_processes} processes, coordinator {coordinator}: {shown}\n")
            out.flush()
        for i, child_env in enumerate(envs):
            try:
                # Own session: a Ctrl-C in the terminal reaches the processes once, through
                # `forward`, not twice; and SIGKILL can take a process's own children with it.
                proc = subprocess.Popen(list(command), env=child_env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            except OSError as e:
                with lock:
                    out.write(f"[launch] cannot start {command[0]!r}: {e}\n")
                    out.flush()
                _stop(procs, grace_s)
                return 127
            procs.append(proc)
            log_path = os.path.join(log_dir, f"process_{i}.log") if log_dir is not None else None
            t = threading.Thread(target=_pump, args=(proc.stdout, f"[p{i}] ", out, lock, log_path),
                                 name=f"launch-pump-{i}", daemon=True)
            t.start()
            pumps.append(t)
        code = _wait(procs, grace_s, out, lock)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for t in pumps:  # a process's leftover children may hold the pipe open: do not wait forever
        t.join(timeout=5.0)
    return code


def _wait(procs: list[subprocess.Popen], grace_s: float, out: TextIO,
          lock: threading.Lock) -> int:
    """Waits for all processes; on the first failure stops the rest. Returns the exit code."""
    first_failure: int | None = None
    while True:
        running = False
        for i, p in enumerate(procs):
            rc = p.poll()
            if rc is None:
                running = True
            elif rc != 0 and first_failure is None:
                first_failure = _exit_code(rc)
                with lock:
                    out.write(f"[launch] process {i} exited with code {first_failure}; "
                              f"stopping the others\n")
                    out.flush()
                _stop(procs, grace_s)
        if not running:
            return first_failure or 0
        time.sleep(0.05)


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM to every running process; SIGKILL to their process groups after `grace_s`."""
    for p in procs:
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in procs:
        _signal(p, signal.SIGKILL, group=True)
        if p.poll() is None:
            p.wait()


def _parser() -> argparse.ArgumentParser:
    """The command-line flags (the command to run follows `--`)."""
    p = argparse.ArgumentParser(
        prog="python launch/local.py",
        usage="python launch/local.py --num_processes N [options] -- pewm <job> ...",
        description="Start N processes of a command on this machine with a jax.distributed "
                    "coordinator on 127.0.0.1 (PEWM_COORDINATOR_ADDRESS, PEWM_NUM_PROCESSES, "
                    "PEWM_PROCESS_ID set per process).")
    p.add_argument("--num_processes", type=int, required=True, help="processes to start")
    p.add_argument("--cpu", action="store_true", help="JAX_PLATFORMS=cpu for every process")
    p.add_argument("--devices_per_process", type=int, default=None,
                   help="with --cpu: fake CPU devices per process "
                        "(--xla_force_host_platform_device_count in XLA_FLAGS)")
    p.add_argument("--gpus_per_process", type=int, default=None,
                   help="give each process its own K GPUs (disjoint CUDA_VISIBLE_DEVICES ranges)")
    p.add_argument("--port", type=int, default=None,
                   help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--log_dir", default=None,
                   help="also write each process's output to <log_dir>/process_<i>.log")
    p.add_argument("--grace_s", type=float, default=30.0,
                   help="seconds between SIGTERM and SIGKILL when stopping processes after a "
                        "failure (default 30)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (see `launch`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if "--" in argv:
        split = argv.index("--")
        options, command = argv[:split], argv[split + 1:]
    else:
        options, command = argv, []
    args = parser.parse_args(options)
    if not command:
        parser.error("give the command to run after `--`, e.g. -- pewm train --config=...")
    if args.num_processes < 1:
        parser.error("--num_processes must be >= 1")
    for name in ("devices_per_process", "gpus_per_process"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.devices_per_process is not None and not args.cpu:
        parser.error("--devices_per_process sets the CPU device count: use it with --cpu")
    if args.cpu and args.gpus_per_process is not None:
        parser.error("--cpu and --gpus_per_process exclude each other")
    try:
        return launch(command, args.num_processes, devices_per_process=args.devices_per_process,
                      cpu=args.cpu, gpus_per_process=args.gpus_per_process, port=args.port,
                      log_dir=args.log_dir, grace_s=args.grace_s)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
