"""Runs that stop and start: exact resume after SIGKILL, SIGTERM saves, restore on other meshes,
half-written and corrupted checkpoints, refused configs, --init_from, NaN stops, metrics."""

import json
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
from pewm_jax.text.tokenizer import load_tokenizer
from pewm_jax.parallel import mesh as mesh_lib
from pewm_jax.train import checkpoint as ckpt_lib
from pewm_jax.train import loop, metrics
from pewm_jax.recipes import kinds
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


LOGGED = ("loss", "learning_rate", "grad_norm")  # the logged scalars that timing cannot change


def logs(log_dir: pathlib.Path) -> tuple[dict, dict]:
    """(metrics.jsonl rows, TensorBoard points) of LOGGED, as a user reads them; a step in
    metrics.jsonl twice fails."""
    from tensorboard.backend.event_processing import event_accumulator

    lines = [json.loads(line) for line in (log_dir / metrics.METRICS_FILE).read_text().splitlines()]
    steps = [row["step"] for row in lines]
    assert steps == sorted(set(steps)), f"steps logged out of order or twice: {steps}"
    events = event_accumulator.EventAccumulator(str(log_dir))
    events.Reload()
    return ({row["step"]: {k: row[k] for k in LOGGED} for row in lines},
            {k: [(e.step, e.value) for e in events.Scalars(k)] for k in LOGGED})


@pytest.mark.slow  # about 30 s; CI runs it in its slow stage
def test_resume_after_sigkill_equals_an_uninterrupted_run(tabletop_dataset, tmp_path):
    # Logs every 3 steps, saves every K = 2: the save at step 2 falls between logs (its steps
    # are in the step-3 mean), and the killed run logs step 3 after that save, which the
    # resumed run logs again, once.
    overrides = train_overrides(tabletop_dataset, "train.steps=6", "train.log_every=3")
    ref_dir = tmp_path / "reference"
    ref = loop.train(tiny_config(*overrides), ref_dir, kind=kinds.WORLD_MODEL)
    workdir = tmp_path / "killed"
    out = subprocess.run(
        [sys.executable, str(TESTS / "train_process.py"), str(workdir), str(tmp_path / "r.json"),
         "--kill_after_checkpoint", str(K), "--kill_at_step", "4", *TINY_DATA, *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert ckpt_lib.RunCheckpoints(workdir / kinds.WORLD_MODEL.name, read_only=True).steps() == [K]
    log_dir = workdir / loop.TENSORBOARD_DIR / kinds.WORLD_MODEL.name
    assert 3 in metrics.read_metrics(log_dir)  # logged after the checkpoint, before the kill

    config = tiny_config(*overrides)
    result = loop.train(config, workdir, resume=True, kind=kinds.WORLD_MODEL)
    assert result.status == "completed" and sorted(result.losses) == list(range(K + 1, 7))
    assert result.losses == {s: ref.losses[s] for s in range(K + 1, 7)}  # same data, RNG, mesh
    assert_trees_equal(saved_params(config, workdir, 6), saved_params(config, ref_dir, 6),
                       rtol=0, atol=0)
    assert logs(log_dir) == logs(ref.log_dir)  # step for step: no loss of steps, no duplicate


@pytest.mark.slow  # a subprocess job of about 40 s; CI runs it in its slow stage
def test_sigterm_saves_exits_0_and_resume_continues_at_that_step(tabletop_dataset, tmp_path):
    workdir = tmp_path / "preempted"
    # A constant learning rate after warmup (final_lr_fraction 1): the schedule does not depend
    # on train.steps, so the preempted run compares with a shorter uninterrupted one.
    overrides = [*TINY_DATA, *train_overrides(tabletop_dataset, "train.steps=500",
                                              "train.checkpoint_every=500", "train.log_every=3",
                                              "train.final_lr_fraction=1.0")]
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

    final = saved + 3
    result = loop.train(tiny_config(*overrides, f"train.steps={final}"), workdir, resume=True, kind=kinds.WORLD_MODEL)
    assert result.status == "completed" and sorted(result.losses) == list(range(saved + 1,
                                                                                 final + 1))
    # The logs equal an uninterrupted run's, step for step, whether or not the preemption's
    # save fell on a logged step.
    ref = loop.train(tiny_config(*overrides, f"train.steps={final}"), tmp_path / "reference", kind=kinds.WORLD_MODEL)
    assert result.losses == {s: ref.losses[s] for s in result.losses}
    assert logs(log) == logs(ref.log_dir)


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
    result = loop.train(config, workdir, resume=True, kind=kinds.WORLD_MODEL)
    assert result.status == "completed" and result.losses == {}  # step 2k was the end already
    assert f"ignoring the uncommitted (half-written) checkpoint {half}" in capsys.readouterr().out
    assert half.exists()

    # A committed checkpoint whose arrays are damaged raises, naming it; nothing starts afresh.
    for path in (model_dir / str(2 * K) / "params").rglob("*"):
        if path.is_file() and path.name != "_METADATA":
            path.write_bytes(b"\0garbage")
    with pytest.raises(ckpt_lib.CheckpointError,
                       match=rf"{model_dir / str(2 * K)} is committed but cannot be read.*"
                             rf"--resume_step N, N one of \[{K}\]") as error:
        loop.train(config, workdir, resume=True, kind=kinds.WORLD_MODEL)
    assert not (workdir / kinds.WORLD_MODEL.name / "0").exists()
    # The fix comes first; TensorStore's kilobytes of detail are cut to their first line.
    message = str(error.value)
    assert message.index("--resume_step") < message.index("Cause:") and len(message) < 1000

    # --resume_step k continues from the good one; the bad one is moved aside, not deleted.
    result = loop.train(config, workdir, resume_step=K, kind=kinds.WORLD_MODEL)
    assert result.losses == {s: ref.losses[s] for s in range(K + 1, 2 * K + 1)}
    aside = list((workdir / loop.SUPERSEDED_DIR / kinds.WORLD_MODEL.name).glob(f"*/{2 * K}"))
    assert len(aside) == 1 and (aside[0] / "params").is_dir()
    assert ckpt_lib.RunCheckpoints(model_dir, read_only=True).steps() == [K, 2 * K]


def _flip_a_bit_orbax_does_not_notice(params_dir: pathlib.Path) -> pathlib.Path:
    """Flips one bit in a data file of a params item such that Orbax itself restores changed
    values without an error (a silent corruption); returns that file."""
    import orbax.checkpoint as ocp

    reader = ocp.StandardCheckpointer()
    clean = jax.device_get(reader.restore(params_dir))
    for path in sorted(p for p in params_dir.rglob("*") if p.is_file() and p.parent.name == "d"):
        data = bytearray(path.read_bytes())
        for offset in range(len(data) // 2, len(data), max(1, len(data) // 50)):
            data[offset] ^= 0x10
            path.write_bytes(bytes(data))
            try:
                changed = jax.device_get(reader.restore(params_dir))
            except Exception:  # noqa: BLE001  (a flip Orbax notices: not the case sought)
                changed = clean
            if any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(clean),
                                                             jax.tree.leaves(changed))):
                return path
            data[offset] ^= 0x10
            path.write_bytes(bytes(data))
    raise AssertionError(f"no silent bit flip found in {params_dir}")


def _edit_first_digit(path: pathlib.Path) -> None:
    """Changes the first digit of a JSON file: still valid JSON, another value."""
    text = path.read_text()
    i = next(i for i, c in enumerate(text) if c.isdigit())
    path.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])


def test_a_corrupted_checkpoint_is_refused_naming_an_intact_one(reference_run, tabletop_dataset,
                                                                tmp_path):
    ref_dir, ref = reference_run
    config = tiny_config(*train_overrides(tabletop_dataset))
    newest = str(2 * K)
    # One flipped bit that Orbax alone restores silently (a changed weight).
    workdir = copy_run(ref_dir, tmp_path / "flipped")
    model_dir = workdir / kinds.WORLD_MODEL.name
    _flip_a_bit_orbax_does_not_notice(model_dir / newest / "params")
    with pytest.raises(ckpt_lib.CorruptCheckpointError) as error:
        loop.train(config, workdir, resume=True, kind=kinds.WORLD_MODEL)
    message = str(error.value)
    assert f"checkpoint {model_dir / newest} is corrupt: array params/" in message
    assert f"resume from step {K}, which is intact (checked): --resume_step {K}" in message
    # Nothing ran, so nothing rotated the good step out; following the fix resumes exactly.
    assert ckpt_lib.RunCheckpoints(model_dir, read_only=True).steps() == [K, 2 * K]
    result = loop.train(config, workdir, resume_step=K, kind=kinds.WORLD_MODEL)
    assert result.losses == {s: ref.losses[s] for s in range(K + 1, 2 * K + 1)}
    # --init_from and evaluation restore parameters alone: verified the same way.
    other = copy_run(ref_dir, tmp_path / "flipped_again")
    _flip_a_bit_orbax_does_not_notice(other / kinds.WORLD_MODEL.name / newest / "params")
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match="array params/"):
        saved_params(config, other, 2 * K)

    # A JSON item, the data iterator's state or meta itself, changed but still valid JSON.
    for item, file in (("config", "config/metadata"), ("meta", "meta/metadata"),
                       ("data iterator", "data_iter/process_0-of-1.json")):
        workdir = copy_run(ref_dir, tmp_path / item.replace(" ", "_"))
        _edit_first_digit(workdir / kinds.WORLD_MODEL.name / newest / file)
        with pytest.raises(ckpt_lib.CorruptCheckpointError, match=f"is corrupt: .*{item}"):
            loop.train(config, workdir, resume=True, kind=kinds.WORLD_MODEL)

    # A checkpoint written before checksums were recorded restores, unverified.
    workdir = copy_run(ref_dir, tmp_path / "legacy")
    meta_file = workdir / kinds.WORLD_MODEL.name / newest / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({k: v for k, v in meta.items()
                                     if k not in ("seal", "checksums", "metrics_window")}))
    assert loop.train(config, workdir, resume=True, kind=kinds.WORLD_MODEL).status == "completed"


def test_existing_runs_need_resume_or_overwrite_and_configs_must_match(reference_run,
                                                                       tabletop_dataset, tmp_path):
    ref_dir, _ = reference_run
    workdir = copy_run(ref_dir, tmp_path / "run")
    longer = tiny_config(*train_overrides(tabletop_dataset, f"train.steps={3 * K}"))
    with pytest.raises(ckpt_lib.CheckpointError, match="already holds checkpoints.*--resume"):
        loop.train(longer, workdir, kind=kinds.WORLD_MODEL)
    # the finished run with its own config is reused, not retrained
    same = tiny_config(*train_overrides(tabletop_dataset))
    assert loop.train(same, workdir, kind=kinds.WORLD_MODEL).status == "reused"
    changed = tiny_config(*train_overrides(tabletop_dataset, "train.learning_rate=0.5",
                                           "model.mlp_ratio=2.0", "train.log_every=7",
                                           "diffusion.sgg_guidance=2.0",
                                           "diffusion.num_steps=3"))
    events = sorted((workdir / loop.TENSORBOARD_DIR / kinds.WORLD_MODEL.name).iterdir())
    with pytest.raises(ckpt_lib.CheckpointError) as error:
        loop.train(changed, workdir, resume=True, kind=kinds.WORLD_MODEL)
    # a refused resume writes nothing, not even an empty TensorBoard events file
    assert sorted((workdir / loop.TENSORBOARD_DIR / kinds.WORLD_MODEL.name).iterdir()) == events
    message = str(error.value)
    assert f"train.learning_rate: {same.train.learning_rate} -> 0.5" in message
    assert "model.mlp_ratio" in message
    assert "train.log_every" not in message.split("Keys that may change")[0]
    # how clips are sampled is not what training computes
    assert "diffusion." not in message.split("Keys that may change")[0]
    with pytest.raises(ckpt_lib.CheckpointError, match=r"--resume_step 3: no committed .*\[2, 4\]"):
        loop.train(same, workdir, resume_step=3, kind=kinds.WORLD_MODEL)
    # --overwrite cannot be combined with flags that need the old run; nothing is deleted
    with pytest.raises(ckpt_lib.CheckpointError, match="cannot be combined with --resume"):
        loop.train(same, workdir, overwrite=True, resume=True, kind=kinds.WORLD_MODEL)
    assert ckpt_lib.RunCheckpoints(workdir / kinds.WORLD_MODEL.name, read_only=True).steps() == [K, 2 * K]
    # --overwrite starts afresh
    result = loop.train(tiny_config(*train_overrides(tabletop_dataset, "train.steps=1")),
                        workdir, overwrite=True, kind=kinds.WORLD_MODEL)
    assert result.losses.keys() == {1}
    assert ckpt_lib.RunCheckpoints(workdir / kinds.WORLD_MODEL.name, read_only=True).steps() == [1]


def test_a_missing_dataset_leaves_no_run_directory_behind(tmp_path):
    from data_loaders.clip_dataset import DatasetError

    config = tiny_config(*train_overrides(tmp_path / "no_data"))
    with pytest.raises(DatasetError, match="no dataset at"):
        loop.train(config, tmp_path / "run", kind=kinds.WORLD_MODEL)
    assert not (tmp_path / "run" / kinds.WORLD_MODEL.name).exists()
    assert not (tmp_path / "run" / loop.TENSORBOARD_DIR).exists()


def test_init_from_loads_params_only(reference_run, tabletop_dataset, tmp_path):
    ref_dir, ref = reference_run
    # Everything frozen: after a step the params are still exactly the source run's.
    config = tiny_config(*train_overrides(tabletop_dataset, "train.steps=1",
                                          "train.frozen=('.*',)"))
    result = loop.train(config, tmp_path / "finetune", init_from=str(ref_dir), kind=kinds.WORLD_MODEL)
    assert result.step == 1
    assert_trees_equal(jax.device_get(result.state.params), jax.device_get(ref.state.params),
                       rtol=0, atol=0)
    # fresh optimizer: its step count restarted
    counts = [int(x) for x in jax.tree.leaves(jax.device_get(result.state.opt_state))
              if np.ndim(x) == 0]
    assert counts and max(counts) <= 1
    with pytest.raises(ckpt_lib.CheckpointError, match="no committed checkpoint there"):
        loop.train(config, tmp_path / "other", init_from=str(tmp_path), kind=kinds.WORLD_MODEL)


def test_a_nan_loss_stops_the_run_without_saving_that_state(tabletop_dataset, tmp_path):
    # Warmup from 0: step 1 changes nothing, step 2's update explodes.
    config = tiny_config(*train_overrides(tabletop_dataset, "train.learning_rate=1e38",
                                          "train.grad_clip=None", "train.steps=6",
                                          "train.checkpoint_every=1", "train.warmup_steps=2",
                                          "train.log_every=100"))
    with pytest.raises(loop.TrainingDivergedError, match=r"at step (\d+)") as error:
        loop.train(config, tmp_path, kind=kinds.WORLD_MODEL)
    message = str(error.value)
    bad = int(message.split("at step ")[1].split(";")[0])
    steps = ckpt_lib.RunCheckpoints(tmp_path / kinds.WORLD_MODEL.name, read_only=True).steps()
    assert steps == list(range(1, bad)) and bad > 1
    # The advice works as printed (the learning rate cannot change on --resume): the last good
    # weights (the state before the one that gave the bad loss) in a new run directory, or
    # this run afresh, each with a lower learning rate.
    init_from = message.split("--init_from=")[1].split()[0]
    assert int(pathlib.Path(init_from).name) <= bad - 2
    assert "--config.train.learning_rate=<lower>" in message and "--overwrite" in message
    lower = tiny_config(*train_overrides(tabletop_dataset, "train.learning_rate=1e-3",
                                         "train.steps=1"))
    for result in (loop.train(lower, tmp_path / "new", init_from=init_from, kind=kinds.WORLD_MODEL),
                   loop.train(lower, tmp_path, overwrite=True, kind=kinds.WORLD_MODEL)):
        assert result.status == "completed" and all(np.isfinite(list(result.losses.values())))


@pytest.mark.parametrize("writer", ["0.0.9", None])
def test_a_tree_that_does_not_fit_names_the_version_that_wrote_it(tmp_path, monkeypatch, writer):
    # Parameter layouts change between versions (0.2.0 moved the text tower onto the shared
    # SigLIP block): the error says which pewm-jax to load a checkpoint of another one with.
    ours = ckpt_lib.versions()
    if writer is not None:
        monkeypatch.setattr(ckpt_lib, "versions", lambda: {**ours, "pewm-jax": writer})
    checkpoints = ckpt_lib.RunCheckpoints(tmp_path / "model")
    checkpoints.save_params(0, {"blocks": {"fc1": np.zeros(3, np.float32)}}, {"seed": 0})
    monkeypatch.setattr(ckpt_lib, "versions", lambda: ours)
    target = {"blocks": {"mlp": jax.ShapeDtypeStruct((3,), np.float32)}}
    with pytest.raises(ckpt_lib.CheckpointError) as error:
        checkpoints.restore_params(0, target)
    message = str(error.value)
    assert "params/blocks/fc1 is in the checkpoint but not in the model" in message
    if writer is None:
        assert "pewm-jax" not in message and "use the config it was trained with" in message
    else:
        assert (f"written by pewm-jax {writer} and this is {ours['pewm-jax']}" in message
                and f"load it with pewm-jax {writer}" in message)
    checkpoints.close()


def test_a_key_added_after_a_checkpoint_differs_only_away_from_its_default():
    """A checkpoint written before a key existed ran with that key's default: resuming with the
    default is no difference, with another value it is one."""
    config = tiny_config()
    saved = config.to_dict()
    del saved["action_decoder"]["imagined_weight"]
    assert ckpt_lib.config_differences(saved, config) == []
    changed = tiny_config("action_decoder.imagined_weight=0.5")
    assert ckpt_lib.config_differences(saved, changed) == [
        "action_decoder.imagined_weight: '<absent>' -> 0.5"]
