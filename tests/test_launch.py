"""Launchers in launch/: the local multi-process launcher, the TPU-pod and SLURM scripts.

Each test runs the launcher for real (processes, shells, signals), with small Python programs or
fake `gcloud`/`scontrol`/`srun` executables standing in for `pewm` and the cluster tools.
"""

import importlib.util
import io
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"

_spec = importlib.util.spec_from_file_location("launch_local", LAUNCH / "local.py")
local = importlib.util.module_from_spec(_spec)
sys.modules["launch_local"] = local
_spec.loader.exec_module(local)

PEWM_KEYS = ("PEWM_COORDINATOR_ADDRESS", "PEWM_NUM_PROCESSES", "PEWM_PROCESS_ID", "PEWM_MULTIHOST",
             "JAX_PLATFORMS", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES")


def py(code: str) -> list[str]:
    """A command that runs `code` in this Python."""
    return [sys.executable, "-c", textwrap.dedent(code)]


def dump_env(out_dir: pathlib.Path) -> list[str]:
    """A command that writes its PEWM/JAX environment to <out_dir>/<PEWM_PROCESS_ID>.json."""
    return py(f"""
        import json, os, pathlib
        env = {{k: os.environ.get(k) for k in {PEWM_KEYS!r}}}
        pathlib.Path({str(out_dir)!r}, os.environ["PEWM_PROCESS_ID"] + ".json").write_text(json.dumps(env))
    """)


def read_envs(out_dir: pathlib.Path) -> dict[int, dict]:
    return {int(p.stem): json.loads(p.read_text()) for p in out_dir.glob("*.json")}


# ----------------------------------------------------------------------------- launch/local.py

def test_local_sets_the_contract_per_process(tmp_path):
    base = {**os.environ, "PEWM_MULTIHOST": "1"}  # would compete with the explicit coordinator
    out = io.StringIO()
    assert local.launch(dump_env(tmp_path), 3, env=base, out=out) == 0
    envs = read_envs(tmp_path)
    assert sorted(envs) == [0, 1, 2]
    addresses = {e["PEWM_COORDINATOR_ADDRESS"] for e in envs.values()}
    assert len(addresses) == 1
    host, port = addresses.pop().rsplit(":", 1)
    assert host == "127.0.0.1" and 0 < int(port) < 65536
    for i, e in envs.items():
        assert e["PEWM_PROCESS_ID"] == str(i) and e["PEWM_NUM_PROCESSES"] == "3"
        assert e["PEWM_MULTIHOST"] is None


def test_local_port_flag_and_main_entry_point(tmp_path, capsys):
    assert local.main(["--num_processes", "2", "--port", "23456", "--", *dump_env(tmp_path)]) == 0
    envs = read_envs(tmp_path)
    assert [e["PEWM_COORDINATOR_ADDRESS"] for e in envs.values()] == ["127.0.0.1:23456"] * 2


def test_local_cpu_devices_per_process(tmp_path):
    # conftest put --xla_force_host_platform_device_count=8 into os.environ: it must be replaced.
    base = {**os.environ, "XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8",
            "JAX_PLATFORMS": "cuda"}
    assert local.launch(dump_env(tmp_path), 2, cpu=True, devices_per_process=4, env=base,
                        out=io.StringIO()) == 0
    for e in read_envs(tmp_path).values():
        assert e["JAX_PLATFORMS"] == "cpu"
        flags = e["XLA_FLAGS"].split()
        assert "--xla_force_host_platform_device_count=4" in flags
        assert "--xla_force_host_platform_device_count=8" not in flags
        assert "--xla_dump_to=/tmp/x" in flags


def test_local_gpus_per_process_are_disjoint(tmp_path):
    base = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    assert local.launch(dump_env(tmp_path), 2, gpus_per_process=4, env=base, out=io.StringIO()) == 0
    envs = read_envs(tmp_path)
    assert envs[0]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert envs[1]["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    # Inside an allocation that already restricts the GPUs, the ranges come from that list.
    base["CUDA_VISIBLE_DEVICES"] = "2,3,5,7"
    assert local.launch(dump_env(tmp_path), 2, gpus_per_process=2, env=base, out=io.StringIO()) == 0
    envs = read_envs(tmp_path)
    assert (envs[0]["CUDA_VISIBLE_DEVICES"], envs[1]["CUDA_VISIBLE_DEVICES"]) == ("2,3", "5,7")
    with pytest.raises(ValueError, match="need 6 GPUs"):
        local.launch(dump_env(tmp_path), 3, gpus_per_process=2, env=base, out=io.StringIO())


def test_local_prefixes_output_lines_and_writes_logs(tmp_path):
    out = io.StringIO()
    command = py("""
        import os, sys
        i = os.environ["PEWM_PROCESS_ID"]
        print(f"hello from {i}")
        print(f"second line {i}", file=sys.stderr)
        sys.stdout.write(f"no newline {i}")
    """)
    assert local.launch(command, 2, log_dir=tmp_path / "logs", out=out) == 0
    lines = out.getvalue().splitlines()
    for i in (0, 1):
        for text in (f"hello from {i}", f"second line {i}", f"no newline {i}"):
            assert f"[p{i}] {text}" in lines
        log = (tmp_path / "logs" / f"process_{i}.log").read_text().splitlines()
        assert sorted(log) == sorted([f"hello from {i}", f"second line {i}", f"no newline {i}"])
    assert not [line for line in lines if not line.startswith(("[p0] ", "[p1] ", "[launch] "))]


def test_local_failure_stops_the_others_and_returns_its_code(tmp_path):
    command = py("""
        import os, sys, time
        if os.environ["PEWM_PROCESS_ID"] == "1":
            time.sleep(0.5)
            sys.exit(3)
        time.sleep(60)
    """)
    out = io.StringIO()
    start = time.monotonic()
    assert local.launch(command, 2, out=out) == 3
    assert time.monotonic() - start < 20  # far below the sibling's 60 s sleep
    assert "process 1 exited with code 3" in out.getvalue()


def test_local_sigkill_after_grace_for_a_process_ignoring_sigterm(tmp_path):
    command = py("""
        import os, signal, sys, time
        if os.environ["PEWM_PROCESS_ID"] == "0":
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)  # killed by a signal: exit code 128 + 9
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(60)
    """)
    start = time.monotonic()
    assert local.launch(command, 2, grace_s=1.0, out=io.StringIO()) == 128 + signal.SIGKILL
    assert time.monotonic() - start < 20


def test_local_missing_command_and_bad_flags(tmp_path, capsys):
    assert local.launch(["/nonexistent/pewm", "run"], 2, out=io.StringIO()) == 127
    with pytest.raises(SystemExit) as e:
        local.main(["--num_processes", "2", "--devices_per_process", "4", "--", "true"])
    assert e.value.code == 2 and "use it with --cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        local.main(["--num_processes", "2"])
    assert e.value.code == 2 and "after `--`" in capsys.readouterr().err


def test_local_forwards_sigterm_to_every_process(tmp_path):
    """SIGTERM to the launcher reaches the trainers, which save and exit 0: the launcher exits 0."""
    child = textwrap.dedent(f"""
        import os, pathlib, signal, sys, time
        d = pathlib.Path({str(tmp_path)!r}); i = os.environ["PEWM_PROCESS_ID"]
        def save(signum, frame):
            (d / f"saved_{{i}}").write_text("checkpoint")
            sys.exit(0)
        signal.signal(signal.SIGTERM, save)
        (d / f"ready_{{i}}").write_text("")
        time.sleep(60)
    """)
    log = tmp_path / "launcher.out"  # a file, not a pipe: left-over children cannot block reading
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, str(LAUNCH / "local.py"), "--num_processes", "2",
                                 "--", sys.executable, "-c", child], stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not all((tmp_path / f"ready_{i}").exists() for i in (0, 1)):
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert all((tmp_path / f"saved_{i}").read_text() == "checkpoint" for i in (0, 1))


def test_local_two_jax_processes_form_one_distributed_system(tmp_path):
    """The contract works with this JAX: two CPU processes x 4 devices see 8 global devices."""
    command = py("""
        import os, jax
        jax.distributed.initialize(os.environ["PEWM_COORDINATOR_ADDRESS"],
                                   int(os.environ["PEWM_NUM_PROCESSES"]),
                                   int(os.environ["PEWM_PROCESS_ID"]))
        print(f"RESULT {jax.process_index()} {jax.process_count()} {jax.local_device_count()} "
              f"{jax.device_count()}")
    """)
    out = io.StringIO()
    assert local.launch(command, 2, cpu=True, devices_per_process=4, out=out) == 0, out.getvalue()
    results = sorted(line.split("RESULT ", 1)[1] for line in out.getvalue().splitlines()
                     if line.startswith("[p") and "RESULT " in line)
    assert results == ["0 2 4 8", "1 2 4 8"]


# ----------------------------------------------------------------------------- shell scripts

@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm_gpu.sbatch"])
def test_shell_scripts_parse(script):
    out = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    if shutil.which("shellcheck"):
        out = subprocess.run(["shellcheck", str(LAUNCH / script)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout


USER_COMMAND = ["pewm", "run", "--config=configs/pewm_base.py:v5p-128",
                "--workdir=gs://BUCKET/runs/base", "--resume", "--config.run.name=it's $HOME; ls"]


def tpu_pod(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path} if path else None
    return subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), *args], capture_output=True,
                          text=True, timeout=30, env=env)


def test_tpu_pod_dry_run_prints_the_gcloud_command():
    out = tpu_pod("--tpu=my-tpu", "--zone=us-east5-a", "--project=proj", "--env", "A_B=x y",
                  "--dry_run", "--", *USER_COMMAND)
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.strip().splitlines()
    assert "--worker=all" in line and "PEWM_MULTIHOST=1" in line
    argv = shlex.split(line)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert {"--zone=us-east5-a", "--project=proj", "--worker=all"} <= set(argv)
    (remote,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    # The remote shell sees the user's exact words after `exec`, the env before.
    words = shlex.split(remote)
    assert words[-len(USER_COMMAND) - 1:] == ["exec", *USER_COMMAND]
    assert "PEWM_MULTIHOST=1" in words and "A_B=x y" in words and "~/pewm-jax" in words


def fake_worker_bin(tmp_path: pathlib.Path, pewm_code: str) -> pathlib.Path:
    """`gcloud` that runs --command in bash (as ssh on a worker would) and a Python `pewm`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        printf '%s\\n' "$@" > {shlex.quote(str(tmp_path / 'gcloud_args'))}
        for a in "$@"; do [[ "$a" == --command=* ]] && exec bash -c "${{a#--command=}}"; done
    """))
    (bin_dir / "pewm").write_text(f"#!{sys.executable}\n" + textwrap.dedent(pewm_code))
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def test_tpu_pod_runs_the_command_on_the_worker_with_the_contract(tmp_path):
    """End to end: the worker's shell gets the user's exact words, the repo dir and the env."""
    repo = tmp_path / "repo dir"
    repo.mkdir()
    bin_dir = fake_worker_bin(tmp_path, f"""
        import json, os, sys
        json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "multihost": os.environ.get("PEWM_MULTIHOST"),
                   "extra": os.environ.get("EXTRA")}}, open({str(tmp_path / 'pewm.json')!r}, "w"))
    """)
    out = tpu_pod("--tpu", "t", "--zone", "z", "--repo_dir", str(repo), "--env", "EXTRA=a'b c",
                  "--", *USER_COMMAND, path=f"{bin_dir}:{os.environ['PATH']}")
    assert out.returncode == 0, out.stderr
    got = json.loads((tmp_path / "pewm.json").read_text())
    assert got == {"argv": USER_COMMAND[1:], "cwd": str(repo), "multihost": "1", "extra": "a'b c"}
    assert "--worker=all" in (tmp_path / "gcloud_args").read_text().splitlines()


def test_tpu_pod_detach_outlives_the_session_and_stop_sends_sigterm(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    bin_dir = fake_worker_bin(tmp_path, f"""
        import os, pathlib, signal, sys, time
        def save(signum, frame):
            pathlib.Path({str(tmp_path / 'saved')!r}).write_text(str(os.getpid()))
            sys.exit(0)
        signal.signal(signal.SIGTERM, save)
        print("training", flush=True)
        time.sleep(60)
    """)
    path = f"{bin_dir}:{os.environ['PATH']}"
    out = tpu_pod("--tpu=t", "--zone=z", f"--repo_dir={repo}", "--detach", "--", "pewm", "train",
                  path=path)
    assert out.returncode == 0 and "started on" in out.stdout, out.stderr
    pid = int((repo / "pewm_tpu_pod.pid").read_text())  # the trainer itself, not a wrapper
    deadline = time.monotonic() + 15
    while "training" not in (repo / "pewm_tpu_pod.log").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        assert tpu_pod("--tpu=t", "--zone=z", f"--repo_dir={repo}", "--stop", path=path).returncode == 0
        saved = tmp_path / "saved"
        while not (saved.exists() and saved.read_text()):  # created, then written: wait for both
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert saved.read_text() == str(pid)
    finally:
        if not (tmp_path / "saved").exists():  # it did not stop: do not leave it running
            os.kill(pid, signal.SIGKILL)


def test_tpu_pod_setup_and_stop_dry_run():
    out = tpu_pod("--tpu=t", "--zone=z", "--setup", "--git_url=https://example.com/pewm-jax.git",
                  "--dry_run", "--", "pewm", "run")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "git clone https://example.com/pewm-jax.git ~/pewm-jax" in text
    assert 'pip install -q -e ".[gcs]" "jax[tpu]"' in shlex.split(text.splitlines()[1])[-1]
    assert text.count("--worker=all") == 3
    out = tpu_pod("--tpu=t", "--zone=z", "--setup", "--dry_run")  # set-up only: no run command
    assert out.returncode == 0 and "pip install" in out.stdout and "exec" not in out.stdout
    out = tpu_pod("--tpu=t", "--zone=z", "--stop", "--dry_run")
    assert out.returncode == 0 and "kill -TERM" in out.stdout and "pewm_tpu_pod.pid" in out.stdout
    out = tpu_pod("--tpu=t", "--zone=z", "--dry_run")  # no command
    assert out.returncode == 2 and "give the command after --" in out.stderr


def fake_slurm_bin(tmp_path: pathlib.Path) -> pathlib.Path:
    """`scontrol` printing two hosts; `srun` running the task once locally as task 0 of 1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "scontrol").write_text("#!/bin/sh\n[ \"$1\" = show ] && printf 'host1\\nhost2\\n'\n")
    (bin_dir / "srun").write_text(textwrap.dedent("""\
        #!/bin/bash
        while [[ "$1" == --* ]]; do shift; done
        export SLURM_PROCID=0 SLURM_NTASKS=1
        exec "$@"
    """))
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def slurm_env(tmp_path: pathlib.Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PEWM_"))}
    return {**env, "PATH": f"{fake_slurm_bin(tmp_path)}:{env['PATH']}",
            "SLURM_JOB_NODELIST": "host[1-2]", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "42",
            "SLURM_SUBMIT_DIR": str(tmp_path), **extra}


def test_slurm_dry_run_prints_coordinator_and_command(tmp_path):
    command = ["pewm", "run", "--config=configs/pewm_base.py:h100x8", "--workdir=/shared/runs/base",
               "--resume"]
    out = subprocess.run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), *command], capture_output=True,
                         text=True, timeout=30, env=slurm_env(tmp_path, PEWM_DRY_RUN="1"))
    assert out.returncode == 0, out.stderr
    assert "coordinator: host1:12355" in out.stdout
    assert " ".join(command) in out.stdout
    assert "PEWM_PROCESS_ID=1 " + " ".join(command) in out.stdout
    out = subprocess.run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), "pewm", "run"], capture_output=True,
                         text=True, timeout=30,
                         env=slurm_env(tmp_path / "b", PEWM_DRY_RUN="1", PEWM_COORDINATOR_PORT="999"))
    assert out.returncode == 0, out.stderr
    assert "coordinator: host1:999" in out.stdout


def test_slurm_runs_the_task_and_forwards_sigterm(tmp_path):
    """The batch shell gets SIGTERM (--signal=B:TERM): the task saves and exits 0, so does the job."""
    task = textwrap.dedent(f"""
        import json, os, pathlib, signal, sys, time
        d = pathlib.Path({str(tmp_path)!r})
        def save(signum, frame):
            (d / "saved").write_text("checkpoint")
            sys.exit(0)
        signal.signal(signal.SIGTERM, save)
        env = {{k: os.environ.get(k) for k in ("PEWM_COORDINATOR_ADDRESS", "PEWM_NUM_PROCESSES",
                                               "PEWM_PROCESS_ID")}}
        (d / "env.json").write_text(json.dumps(env))
        time.sleep(60)
    """)
    log = tmp_path / "job.out"
    with log.open("w") as f:
        proc = subprocess.Popen(["bash", str(LAUNCH / "slurm_gpu.sbatch"), sys.executable, "-c", task],
                                stdout=f, stderr=subprocess.STDOUT, env=slurm_env(tmp_path))
    try:
        deadline = time.monotonic() + 15
        while not (tmp_path / "env.json").exists():
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "saved").read_text() == "checkpoint"
    env = json.loads((tmp_path / "env.json").read_text())
    assert env == {"PEWM_COORDINATOR_ADDRESS": "host1:12355", "PEWM_NUM_PROCESSES": "1",
                   "PEWM_PROCESS_ID": "0"}
