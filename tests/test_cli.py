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
