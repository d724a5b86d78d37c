"""The `pewm` command: help, config errors through real flags, and the main job's outputs."""

import json
import pathlib
import subprocess
import sys

import pytest

from conftest import TINY_DATA, TINY_PLANNER, TINY_TRAIN
from data_loaders import clip_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]


def pewm(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pewm_jax.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_help_lists_jobs_and_flags():
    out = pewm("--help")
    assert out.returncode == 0 and "run" in out.stdout and "preview" in out.stdout
    out = pewm("run", "--help")
    assert out.returncode == 0 and "--config" in out.stdout and "--workdir" in out.stdout
    out = pewm("trian")
    assert out.returncode == 2 and "unknown job 'trian'" in out.stderr


@pytest.mark.parametrize("override, message", [
    ("--config.train.stpes=5", "config.train.stpes is not a known key; did you mean config.train.steps"),
    ("--config.world.image_size=60", "config.model.patch_size = 8 does not divide config.world.image_size"),
    ("--config.train.steps=abc", "config.train.steps: cannot parse 'abc'"),
    ("--config.run.stages=('preview','dance')", "config.run.stages"),
])
def test_bad_config_stops_with_one_message(tmp_path, override, message):
    out = pewm("run", "--config=configs/quickstart.py", f"--workdir={tmp_path}", override)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "preview").exists()  # nothing ran


def test_main_job_writes_pictures_statistics_data_trained_models_and_evaluation(tmp_path):
    train = [*TINY_TRAIN, "train.steps=2", "train.checkpoint_every=2", *TINY_PLANNER,
             "planner.train.steps=2", "action_decoder.width=32", "action_decoder.depth=1",
             "action_decoder.num_heads=2", "action_decoder.train.steps=2",
             "action_decoder.train.global_batch_size=8",
             "eval.episodes_per_template=1", "eval.splits=('train',)", "eval.parallel_envs=4",
             "eval.conditions=('pewm','oracle')", "eval.video_clips=4",
             "eval.rollout_videos=1"]
    out = pewm("run", "--config=configs/quickstart.py", f"--workdir={tmp_path}",
               "--config.run.preview_episodes=2", "--config.run.preview_episodes_per_template=2",
               "--config.run.preview_scenes_per_primitive=10",
               *(f"--config.{o}" for o in [*TINY_DATA, *train]))
    assert out.returncode == 0, out.stderr
    assert "generated: clips per split" in out.stdout
    # train: checkpoints and TensorBoard logs, and the run says where they are
    assert (tmp_path / "world_model" / "2" / "params").is_dir()
    assert list((tmp_path / "tensorboard" / "world_model").glob("events.out.tfevents.*"))
    assert f"checkpoints in {tmp_path / 'world_model'}" in out.stdout
    assert f"tensorboard --logdir {tmp_path / 'tensorboard'}" in out.stdout
    assert clip_dataset.DatasetMeta.load(tmp_path / "data").splits["train"] > 0
    # planner: fine-tuned beside the world model, then scored on the evaluation splits
    assert (tmp_path / "planner" / "2" / "params").is_dir()
    scores = json.loads((tmp_path / "planner_eval.json").read_text())
    assert [s["split"] for s in scores] == ["test", "holdout_composition", "holdout_primitive"]
    assert all(0.0 <= s["exact_match"] <= 1.0 and s["episodes"] == 3 for s in scores)
    assert "exact match" in out.stdout
    # actions: the action decoder beside them, scored beside the mean action
    assert (tmp_path / "action_decoder" / "2" / "ema_params").is_dir()
    scores = json.loads((tmp_path / "actions_eval.json").read_text())
    assert [s["split"] for s in scores] == ["test", "holdout_composition"]
    assert all(s["mse"] >= 0 and s["mean_action_mse"] > 0 and s["transitions"] > 0
               for s in scores)
    assert "mean-action mse" in out.stdout
    # eval: the closed loop from all three checkpoints, headline numbers printed
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(report["conditions"]) == {"pewm", "oracle"}
    assert report["conditions"]["oracle"]["splits"]["train"]["success"] >= 0.95
    assert "oracle solves" in out.stdout and "PSNR" in out.stdout
    assert (tmp_path / "eval" / "rollout_0.gif").is_file()
    summary = json.loads((tmp_path / "preview" / "summary.json").read_text())
    assert len(summary["episodes"]) == 2
    assert set(summary["primitive_experts"]) == {"reach", "grasp", "release", "pick", "place", "push"}
    for stats in [*summary["task_experts"].values(), *summary["primitive_experts"].values()]:
        assert 0.0 <= stats["rejected_scenes"] < 1.0 and stats["success"] == 1.0
    from PIL import Image
    gif = Image.open(tmp_path / "preview" / "expert_episodes.gif")
    assert gif.n_frames > 10
    assert "expert_episodes.gif" in out.stdout
    again = pewm("data", "--config=configs/quickstart.py", f"--workdir={tmp_path}",
                 *(f"--config.{o}" for o in TINY_DATA))
    assert again.returncode == 0 and "reused" in again.stdout
    other = pewm("data", "--config=configs/quickstart.py", f"--workdir={tmp_path}", "--config.seed=3",
                 *(f"--config.{o}" for o in TINY_DATA))
    assert other.returncode == 2 and "--overwrite" in other.stderr and "Traceback" not in other.stderr


def test_ingest_job_reports_a_missing_source(tmp_path):
    out = pewm("ingest", "--config=configs/quickstart.py", f"--workdir={tmp_path}",
               "--spec=configs/rlds/bridge.py", f"--source={tmp_path / 'nowhere'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert str(tmp_path / "nowhere") in out.stderr


def test_every_job_takes_paths_relative_to_the_current_directory(tmp_path):
    """Each job that reads or writes a directory, run from a scratch directory with relative
    paths (and `~`), as a user types them: asynchronous Orbax saves, worker processes and
    moved checkpoints all need them resolved at the command line."""
    import os

    import rlds_fixtures

    home = tmp_path / "home"
    cwd = home / "work"
    cwd.mkdir(parents=True)
    rlds_fixtures.write_bridge(cwd / "sources")
    env = {**os.environ, "HOME": str(home)}
    data = "--config.data.dataset_dir=~/work/data"  # `~` expanded at the command line
    tiny = [*(f"--config.{o}" for o in [*TINY_DATA, *TINY_TRAIN, *TINY_PLANNER]), data,
            "--config.train.checkpoint_every=1", "--config.planner.train.steps=1",
            "--config.action_decoder.width=32", "--config.action_decoder.depth=1",
            "--config.action_decoder.num_heads=2", "--config.action_decoder.train.steps=1",
            "--config.action_decoder.train.global_batch_size=8",
            "--config.eval.episodes_per_template=1", "--config.eval.splits=('train',)",
            "--config.eval.parallel_envs=4", "--config.eval.conditions=('pewm',)",
            "--config.eval.video_clips=0", "--config.eval.rollout_videos=0"]

    def job(name: str, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "pewm_jax.cli", name,
                              "--config=configs/quickstart.py", *args, *tiny], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"pewm {name} {' '.join(args)}:\n{out.stderr[-3000:]}"
        return out.stdout

    job("data", "--workdir=run")
    assert clip_dataset.DatasetMeta.load(cwd / "data").splits["train"] > 0
    job("train", "--workdir=run", "--config.train.steps=2")
    job("train", "--workdir=run", "--resume", "--config.train.steps=3")
    assert sorted(p.name for p in (cwd / "run" / "world_model").iterdir()) == ["2", "3"]
    job("train", "--workdir=run", "--resume_step=2", "--config.train.steps=3")
    assert (cwd / "run" / "superseded").is_dir() and (cwd / "run/world_model/3").is_dir()
    job("train", "--workdir=other", "--init_from=run/world_model/2", "--config.train.steps=1")
    assert (cwd / "other" / "world_model" / "1" / "params").is_dir()
    job("actions", "--workdir=run")
    job("planner", "--workdir=run")
    assert json.loads((cwd / "run" / "planner_eval.json").read_text())
    job("eval", "--workdir=run")
    assert "pewm" in json.loads((cwd / "run" / "eval" / "report.json").read_text())["conditions"]
    job("export", "--workdir=run", "--out=bundle")
    assert (cwd / "bundle" / "manifest.json").is_file()
    printed = job("ingest", "--workdir=run", "--spec=configs/rlds/bridge.py",
                  "--source=sources/bridge_dataset/1.0.0", "--out=bridge_clips")
    assert clip_dataset.DatasetMeta.load(cwd / "bridge_clips").episodes["train"]["episodes"] == 3
    assert "without an instruction" in printed
    assert sorted(p.name for p in cwd.iterdir()) == [
        "bridge_clips", "bundle", "data", "other", "run", "sources"]
