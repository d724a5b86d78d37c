"""Two local processes (jax.distributed on loopback, CPU collectives) train as one run."""

import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import K, ROOT, TINY_DATA, train_overrides

TESTS = pathlib.Path(__file__).resolve().parent


def test_two_processes_train_together_and_match_one(reference_run, tabletop_dataset, tmp_path):
    ref_dir, ref = reference_run
    workdir, out = tmp_path / "two_processes", tmp_path / "result.json"
    # 2 processes x 4 CPU devices: the same 8-device mesh and global batch as the reference.
    run = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "local.py"), "--num_processes", "2", "--cpu",
         "--devices_per_process", "4", "--grace_s", "5", "--",
         sys.executable, str(TESTS / "train_process.py"), str(workdir), str(out),
         *TINY_DATA, *train_overrides(tabletop_dataset)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    results = [json.loads(out.with_name(f"result-{i}.json").read_text()) for i in range(2)]
    for result in results:
        assert result["status"] == "completed" and result["step"] == 2 * K
    # Each process holds a full replica (data-parallel mesh): they agree on every parameter.
    assert results[0]["param_sums"].keys() == results[1]["param_sums"].keys()
    for name, value in results[0]["param_sums"].items():
        assert results[1]["param_sums"][name] == value, name
    # And they computed what one process on 8 devices did: the same losses (cross-process
    # all-reduces may sum in another order, hence the tolerance).
    losses = {int(s): v for s, v in results[0]["losses"].items()}
    assert losses.keys() == ref.losses.keys()
    np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                               [ref.losses[s] for s in sorted(ref.losses)], rtol=1e-5)
    # Both wrote their Grain iterator state into the shared checkpoint.
    data_iter = workdir / "world_model" / str(2 * K) / "data_iter"
    assert {p.name for p in data_iter.iterdir()} >= {"process_0-of-2.json", "process_1-of-2.json"}


# Slow (30 s): two processes train, are signalled and save; the default suite keeps the
# two-process training test and the one-process SIGTERM test (tests/test_checkpoint.py).
@pytest.mark.slow
def test_sigterm_reaches_both_processes_which_save_the_same_step_and_exit_0(tabletop_dataset,
                                                                            tmp_path):
    workdir = tmp_path / "preempted"
    overrides = [*TINY_DATA, *train_overrides(tabletop_dataset, "train.steps=500",
                                              "train.checkpoint_every=500")]
    launcher = subprocess.Popen(
        [sys.executable, str(ROOT / "launch" / "local.py"), "--num_processes", "2", "--cpu",
         "--devices_per_process", "4", "--grace_s", "60", "--",
         sys.executable, "-m", "pewm_jax.cli", "train", "--config=configs/quickstart.py",
         f"--workdir={workdir}", *(f"--config.{o}" for o in overrides)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = workdir / "tensorboard" / "world_model" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not log.exists() or not log.read_text().strip():
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[0]
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)  # what a preempted host gets; the launcher forwards it
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, output[-4000:]
    saved = re.findall(r"\[p(\d)\] \[train\] preemption notice: saved step (\d+)", output)
    assert {p for p, _ in saved} == {"0"}  # process 0 reports; both stopped at the same step
    steps = sorted(int(p.name) for p in (workdir / "world_model").iterdir() if p.name.isdigit())
    assert steps == [int(saved[0][1])] and 1 <= steps[0] < 500
    data_iter = workdir / "world_model" / str(steps[0]) / "data_iter"
    assert {p.name for p in data_iter.iterdir()} >= {"process_0-of-2.json", "process_1-of-2.json"}
