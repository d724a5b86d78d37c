"""The `pewm` command: help, config errors through real flags, and the main job's outputs."""

import json
import pathlib
import re
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


def test_main_job_then_every_other_job_with_paths_relative_to_the_current_directory(tmp_path):
    """The README's main job (every stage, tiny), then each other job that reads or writes a
    directory, all run from a scratch directory with relative paths (and `~`), as a user types
    them: asynchronous Orbax saves, worker processes and moved checkpoints need them resolved
    at the command line."""
    import os

    import rlds_fixtures

    home = tmp_path / "home"
    cwd = home / "work"
    cwd.mkdir(parents=True)
    env = {**os.environ, "HOME": str(home)}
    tiny = [*(f"--config.{o}" for o in [
        *TINY_DATA, *TINY_TRAIN, "train.steps=2", "train.checkpoint_every=1", *TINY_PLANNER,
        "planner.train.steps=2", "action_decoder.channels=8", "action_decoder.keypoints=4",
        "action_decoder.width=32", "action_decoder.depth=1", "action_decoder.train.steps=2",
        "action_decoder.train.global_batch_size=8", "eval.episodes_per_template=1",
        "eval.splits=('train',)", "eval.parallel_envs=4", "eval.conditions=('pewm','oracle')",
        "eval.video_clips=4", "eval.rollout_videos=1"])]

    def job(name: str, *args: str, code: int = 0) -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, "-m", "pewm_jax.cli", name,
                              "--config=configs/quickstart.py", *args], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == code, f"pewm {name} {' '.join(args)}:\n{out.stderr[-3000:]}"
        return out

    run = cwd / "run"
    out = job("run", "--workdir=run", "--config.run.preview_episodes=2",
              "--config.run.preview_episodes_per_template=2",
              "--config.run.preview_scenes_per_primitive=10", *tiny)
    assert "generated: clips per split" in out.stdout
    assert re.search(r"\[run\] wall time \(minutes\): preview \d+\.\d, data \d+\.\d, train .*"
                     r"eval \d+\.\d; total \d+\.\d", out.stdout), out.stdout[-2000:]
    # train: checkpoints and TensorBoard logs, and the run says where they are
    assert (run / "world_model" / "2" / "params").is_dir()
    assert list((run / "tensorboard" / "world_model").glob("events.out.tfevents.*"))
    assert f"checkpoints in {run / 'world_model'}" in out.stdout
    assert f"tensorboard --logdir {run / 'tensorboard'}" in out.stdout
    assert clip_dataset.DatasetMeta.load(run / "data").splits["train"] > 0
    # planner: fine-tuned beside the world model, then scored on the evaluation splits
    assert (run / "planner" / "2" / "params").is_dir()
    scores = json.loads((run / "planner_eval.json").read_text())
    assert [s["split"] for s in scores] == ["test", "holdout_composition", "holdout_primitive"]
    assert all(0.0 <= s["exact_match"] <= 1.0 and s["episodes"] == 3 for s in scores)
    assert "exact match" in out.stdout
    # actions: the action decoder beside them, scored beside the mean action
    assert (run / "action_decoder" / "2" / "ema_params").is_dir()
    scores = json.loads((run / "actions_eval.json").read_text())
    assert [s["split"] for s in scores] == ["test", "holdout_composition"]
    assert all(s["mse"] >= 0 and s["mean_action_mse"] > 0 and s["steps"] > 0
               for s in scores)
    assert "mean-action mse" in out.stdout
    # eval: the closed loop from all three checkpoints, headline numbers printed
    report = json.loads((run / "eval" / "report.json").read_text())
    assert set(report["conditions"]) == {"pewm", "oracle"}
    assert report["conditions"]["oracle"]["splits"]["train"]["success"] >= 0.95
    assert "oracle solves" in out.stdout and "PSNR" in out.stdout
    assert (run / "eval" / "rollout_0.gif").is_file()
    summary = json.loads((run / "preview" / "summary.json").read_text())
    assert len(summary["episodes"]) == 2
    assert set(summary["primitive_experts"]) == {"reach", "grasp", "release", "pick", "place",
                                                   "approach", "push"}
    for stats in [*summary["task_experts"].values(), *summary["primitive_experts"].values()]:
        assert 0.0 <= stats["rejected_scenes"] < 1.0 and stats["success"] == 1.0
    for stats in summary["primitive_experts"].values():  # data.frame_stride 4
        assert 1 <= stats["median_steps"] <= 32
        assert stats["clip_frames"] == -(-stats["median_steps"] // 4)
    assert "median steps" in out.stdout
    from PIL import Image
    gif = Image.open(run / "preview" / "expert_episodes.gif")
    assert gif.n_frames > 10
    assert "expert_episodes.gif" in out.stdout
    data = [f"--config.{o}" for o in TINY_DATA]
    assert "reused" in job("data", "--workdir=run", *data).stdout
    other = job("data", "--workdir=run", "--config.seed=3", *data, code=2)
    assert "--overwrite" in other.stderr and "Traceback" not in other.stderr

    # The other jobs, on the dataset through `~`: --resume, --resume_step (moves checkpoints
    # aside), --init_from, export, ingest.
    tiny.append("--config.data.dataset_dir=~/work/run/data")
    job("train", "--workdir=run", "--resume", *tiny, "--config.train.steps=3")
    assert (run / "world_model" / "3").is_dir()
    job("train", "--workdir=run", "--resume_step=2", *tiny, "--config.train.steps=3")
    assert list((run / "superseded" / "world_model").glob("*/3"))
    job("train", "--workdir=other", "--init_from=run/world_model/2", *tiny,
        "--config.train.steps=1")
    assert (cwd / "other" / "world_model" / "1" / "params").is_dir()
    job("export", "--workdir=run", "--out=bundle")
    assert (cwd / "bundle" / "manifest.json").is_file()
    rlds_fixtures.write_bridge(cwd / "sources")
    printed = job("ingest", "--workdir=run", "--spec=configs/rlds/bridge.py",
                  "--source=sources/bridge_dataset/1.0.0", "--out=bridge_clips").stdout
    assert clip_dataset.DatasetMeta.load(cwd / "bridge_clips").episodes["train"]["episodes"] == 3
    assert "without an instruction" in printed
    assert sorted(p.name for p in cwd.iterdir()) == [
        "bridge_clips", "bundle", "other", "run", "sources"]


def test_ingest_job_reports_a_missing_source(tmp_path):
    out = pewm("ingest", "--config=configs/quickstart.py", f"--workdir={tmp_path}",
               "--spec=configs/rlds/bridge.py", f"--source={tmp_path / 'nowhere'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert str(tmp_path / "nowhere") in out.stderr
