"""Runs that stop and start: exact resume after SIGKILL, SIGTERM saves, restore on other meshes,
half-written and corrupted checkpoints, refused configs, --init_from, NaN stops, metrics."""

import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import K, ROOT, TINY_DATA, tiny_config, train_overrides
from data_loaders.tokenizer import load_tokenizer
from pewm_jax.parallel import mesh as mesh_lib
from pewm_jax.train import checkpoint as ckpt_lib
from pewm_jax.train import loop, metrics
from pewm_jax.train import kinds
from pewm_jax.train import state as state_lib

TESTS = pathlib.Path(__file__).resolve().parent


def layout_on(config, devices: int) -> state_lib.StateLayout:
    """The train-state layout of `config` on a mesh over the first `devices` devices."""
    vocab = load_tokenizer(pathlib.Path(config.data.dataset_dir, "tokenizer.json")).get_vocab_size()
    return state_lib.state_layout(config, vocab, mesh_lib.make_mesh(config, jax.devices()[:devices]),
                                  kinds.WORLD_MODEL)


def saved_params(config, workdir: pathlib.Path, step: int) -> dict:
    """The params of checkpoint `step` of a run of `config`, restored onto one device."""
    checkpoints = ckpt_lib.RunCheckpoints(workdir / kinds.WORLD_MODEL.name, read_only=True)
    return jax.device_get(checkpoints.restore_params(step, layout_on(config, 1).abstract.params))


def assert_trees_equal(a, b, **tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol), a, b)


def copy_run(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def test_reference_run_writes_checkpoints_metrics_and_samples(reference_run):
    workdir, result = reference_run
    assert result.status == "completed" and result.step == 2 * K
    assert sorted(result.losses) == list(range(1, 2 * K + 1))
    checkpoints = ckpt_lib.RunCheckpoints(workdir / kinds.WORLD_MODEL.name, read_only=True)
    assert checkpoints.steps() == [K, 2 * K]
    step_dir = workdir / kinds.WORLD_MODEL.name / str(2 * K)
    assert {p.name for p in step_dir.iterdir()} >= set(ckpt_lib.ITEMS)
    meta = checkpoints.read_json(2 * K, "meta")
    assert meta["step"] == 2 * K and meta["process_count"] == 1 and "jax" in meta["versions"]
    # metrics.jsonl has every step's loss, equal to what the run returned
    logged = metrics.read_metrics(result.log_dir)
    assert {s: logged[s]["loss"] for s in result.losses} == pytest.approx(result.losses)
    for key in ("learning_rate", "grad_norm", "steps_per_sec", "examples_per_sec", "mfu"):
        assert key in logged[2 * K]
    assert 0 < logged[2 * K]["mfu"] < 1
    # TensorBoard: scalars, the sampled clip grid and its animation
    from tensorboard.backend.event_processing import event_accumulator
    events = event_accumulator.EventAccumulator(str(result.log_dir), size_guidance={"images": 0})
    events.Reload()
    assert "loss" in events.Tags()["scalars"]
    assert {"samples/grid", "samples/animation"} <= set(events.Tags()["images"])


def test_resume_after_sigkill_equals_an_uninterrupted_run(reference_run, tabletop_dataset,
                                                          tmp_path):
    ref_dir, ref = reference_run
    workdir = tmp_path / "killed"
    out = subprocess.run(
        [sys.executable, str(TESTS / "train_process.py"), str(workdir), str(tmp_path / "r.json"),
         "--kill_after_checkpoint", str(K), *TINY_DATA, *train_overrides(tabletop_dataset)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    checkpoints = ckpt_lib.RunCheckpoints(workdir / kinds.WORLD_MODEL.name, read_only=True)
    assert checkpoints.steps() == [K]
    killed_losses = metrics.read_metrics(workdir / loop.TENSORBOARD_DIR / kinds.WORLD_MODEL.name)

    config = tiny_config(*train_overrides(tabletop_dataset))
    result = loop.train(config, workdir, resume=True)
    assert result.status == "completed" and sorted(result.losses) == list(range(K + 1, 2 * K + 1))
    losses = {s: killed_losses[s]["loss"] for s in range(1, K + 1)} | result.losses
    assert losses == ref.losses  # bit for bit: same mesh, same data order, same RNG
    assert_trees_equal(saved_params(config, workdir, 2 * K), saved_params(config, ref_dir, 2 * K),
                       rtol=0, atol=0)


def test_sigterm_saves_exits_0_and_resume_continues_at_that_step(tabletop_dataset, tmp_path):
    workdir = tmp_path / "preempted"
    overrides = [*TINY_DATA, *train_overrides(tabletop_dataset, "train.steps=500",
                                              "train.checkpoint_every=500")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pewm_jax.cli", "train", "--config=configs/quickstart.py",
         f"--workdir={workdir}", *(f"--config.{o}" for o in overrides)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = workdir / loop.TENSORBOARD_DIR / kinds.WORLD_MODEL.name
    deadline = time.monotonic() + 300
    while not (log / metrics.METRICS_FILE).exists() or not metrics.read_metrics(log):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "preemption notice: saved step" in stdout
    steps = ckpt_lib.RunCheckpoints(workdir / kinds.WORLD_MODEL.name, read_only=True).steps()
    assert len(steps) == 1 and 1 <= steps[0] < 500
    saved = steps[0]

    result = loop.train(tiny_config(*overrides, f"train.steps={saved + 2}"), workdir, resume=True)
    assert result.status == "completed" and sorted(result.losses) == [saved + 1, saved + 2]


@pytest.mark.parametrize("devices", [4, 1])
def test_a_checkpoint_from_8_devices_restores_onto_fewer(reference_run, tabletop_dataset, devices):
    workdir, ref = reference_run
    layout = layout_on(tiny_config(*train_overrides(tabletop_dataset)), devices)
    checkpoints = ckpt_lib.RunCheckpoints(workdir / kinds.WORLD_MODEL.name, read_only=True)
    state, meta = checkpoints.restore(2 * K, layout, None)
    assert meta["mesh"]["data"] == 8
    assert {len(x.sharding.device_set) for x in jax.tree.leaves(state)} == {devices}
    assert_trees_equal(jax.device_get(state), jax.device_get(ref.state), rtol=0, atol=0)


def test_half_written_and_corrupted_checkpoints(reference_run, tabletop_dataset, tmp_path,
                                                capsys):
    ref_dir, ref = reference_run
    workdir = copy_run(ref_dir, tmp_path / "run")
    model_dir = workdir / kinds.WORLD_MODEL.name
    # A save killed mid-write leaves an uncommitted temporary directory: ignored, reported.
    half = model_dir / f"{3 * K}.orbax-checkpoint-tmp-1234"
    shutil.copytree(model_dir / str(2 * K), half)
    config = tiny_config(*train_overrides(tabletop_dataset))
    result = loop.train(config, workdir, resume=True)
    assert result.status == "completed" and result.losses == {}  # step 2k was the end already
    assert f"ignoring the uncommitted (half-written) checkpoint {half}" in capsys.readouterr().out
    assert half.exists()

    # A committed checkpoint whose arrays are damaged raises, naming it; nothing starts afresh.
    for path in (model_dir / str(2 * K) / "params").rglob("*"):
        if path.is_file() and path.name != "_METADATA":
            path.write_bytes(b"\0garbage")
    with pytest.raises(ckpt_lib.CheckpointError,
                       match=rf"{model_dir / str(2 * K)} is committed but cannot be read.*"
                             rf"--resume_step N, N one of \[{K}\]"):
        loop.train(config, workdir, resume=True)
    assert not (workdir / kinds.WORLD_MODEL.name / "0").exists()

    # --resume_step k continues from the good one; the bad one is moved aside, not deleted.
    result = loop.train(config, workdir, resume_step=K)
    assert result.losses == {s: ref.losses[s] for s in range(K + 1, 2 * K + 1)}
    aside = list((workdir / loop.SUPERSEDED_DIR / kinds.WORLD_MODEL.name).glob(f"*/{2 * K}"))
    assert len(aside) == 1 and (aside[0] / "params").is_dir()
    assert ckpt_lib.RunCheckpoints(model_dir, read_only=True).steps() == [K, 2 * K]


def test_existing_runs_need_resume_or_overwrite_and_configs_must_match(reference_run,
                                                                       tabletop_dataset, tmp_path):
    ref_dir, _ = reference_run
    workdir = copy_run(ref_dir, tmp_path / "run")
    longer = tiny_config(*train_overrides(tabletop_dataset, f"train.steps={3 * K}"))
    with pytest.raises(ckpt_lib.CheckpointError, match="already holds checkpoints.*--resume"):
        loop.train(longer, workdir)
    # the finished run with its own config is reused, not retrained
    same = tiny_config(*train_overrides(tabletop_dataset))
    assert loop.train(same, workdir).status == "reused"
    changed = tiny_config(*train_overrides(tabletop_dataset, "train.learning_rate=0.5",
                                           "model.mlp_ratio=2.0", "train.log_every=7"))
    with pytest.raises(ckpt_lib.CheckpointError) as error:
        loop.train(changed, workdir, resume=True)
    message = str(error.value)
    assert f"train.learning_rate: {same.train.learning_rate} -> 0.5" in message
    assert "model.mlp_ratio" in message
    assert "train.log_every" not in message.split("Keys that may change")[0]
    with pytest.raises(ckpt_lib.CheckpointError, match=r"--resume_step 3: no committed .*\[2, 4\]"):
        loop.train(same, workdir, resume_step=3)
    # --overwrite cannot be combined with flags that need the old run; nothing is deleted
    with pytest.raises(ckpt_lib.CheckpointError, match="cannot be combined with --resume"):
        loop.train(same, workdir, overwrite=True, resume=True)
    assert ckpt_lib.RunCheckpoints(workdir / kinds.WORLD_MODEL.name, read_only=True).steps() == [K, 2 * K]
    # --overwrite starts afresh
    result = loop.train(tiny_config(*train_overrides(tabletop_dataset, "train.steps=1")),
                        workdir, overwrite=True)
    assert result.losses.keys() == {1}
    assert ckpt_lib.RunCheckpoints(workdir / kinds.WORLD_MODEL.name, read_only=True).steps() == [1]


def test_init_from_loads_params_only(reference_run, tabletop_dataset, tmp_path):
    ref_dir, ref = reference_run
    # Everything frozen: after a step the params are still exactly the source run's.
    config = tiny_config(*train_overrides(tabletop_dataset, "train.steps=1",
                                          "train.frozen=('.*',)"))
    result = loop.train(config, tmp_path / "finetune", init_from=str(ref_dir))
    assert result.step == 1
    assert_trees_equal(jax.device_get(result.state.params), jax.device_get(ref.state.params),
                       rtol=0, atol=0)
    # fresh optimizer: its step count restarted
    counts = [int(x) for x in jax.tree.leaves(jax.device_get(result.state.opt_state))
              if np.ndim(x) == 0]
    assert counts and max(counts) <= 1
    with pytest.raises(ckpt_lib.CheckpointError, match="no committed checkpoint there"):
        loop.train(config, tmp_path / "other", init_from=str(tmp_path))


def test_a_nan_loss_stops_the_run_without_saving_that_state(tabletop_dataset, tmp_path):
    config = tiny_config(*train_overrides(tabletop_dataset, "train.learning_rate=1e38",
                                          "train.grad_clip=None", "train.steps=6",
                                          "train.checkpoint_every=1", "train.warmup_steps=0",
                                          "train.log_every=100"))
    with pytest.raises(loop.TrainingDivergedError, match=r"at step (\d+)") as error:
        loop.train(config, tmp_path)
    bad = int(error.value.args[0].split("at step ")[1].split(";")[0])
    steps = ckpt_lib.RunCheckpoints(tmp_path / kinds.WORLD_MODEL.name, read_only=True).steps()
    assert steps == list(range(1, bad)) and bad > 1
