"""Session-wide test set-up: 8 fake CPU devices for sharding tests, set before JAX is imported."""

import os
import sys
import tempfile

# A long run on 8 fake devices sharing 2 cores can leave one device thread more than XLA's
# default collective timeout behind the others, and XLA then aborts the process: allow 30 min.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=1800").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for this session and the processes its tests start, so a
# subprocess resuming a run does not compile the same train step again.
_CACHE = os.path.join(tempfile.mkdtemp(prefix="pewm-test-jax-cache-"), "")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--require-all", action="store_true",
                     help="fail the session when a test or a whole test module is skipped, or "
                          "when no test runs (CI's stages for an extra: a missing or broken "
                          "install must not pass with its tests gone)")


_SKIPPED: list[str] = []


def pytest_collectreport(report):
    if report.skipped:  # a module skipped whole, e.g. by pytest.importorskip
        _SKIPPED.append(f"{report.nodeid}: {report.longrepr[-1]}")


def pytest_runtest_logreport(report):
    if report.skipped:
        _SKIPPED.append(f"{report.nodeid}: {report.longrepr[-1]}")


def pytest_sessionfinish(session, exitstatus):
    if not session.config.getoption("require_all"):
        return
    problems = list(_SKIPPED)
    if session.testscollected == 0 or exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        problems.append("no test was selected")
    if problems:
        print("\n--require-all: this stage must run every test it selects; install what the "
              "skips name. Not run:\n  " + "\n  ".join(problems), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


TINY_DATA = ["data.num_train_episodes=12", "data.num_val_episodes=3", "data.num_test_episodes=3",
             "data.num_holdout_episodes=3", "data.generation_workers=2"]


# Tests sample their briefly trained models unguided: SGG guidance (the quickstart samples with
# 3.0) doubles the model evaluations of every sampler step, and the guidance tests
# (test_diffusion.py) check it on models trained for it.
UNGUIDED = ["diffusion.sgg_guidance=1.0"]
# A world model small enough to train a few steps in seconds on 8 fake CPU devices, sampled
# unguided (also in the jobs that subprocess tests run with configs/quickstart.py).
TINY_TRAIN = ["model.width=32", "model.depth=1", "model.num_heads=2", "model.text_width=32",
              "model.text_num_heads=2", "train.log_every=1", "train.sample_clips=0",
              "train.peak_flops_per_device=1e11", "train.warmup_steps=2", *UNGUIDED]
# Resume tests: 2k steps with a checkpoint every k.
K = 2
RUN_STEPS = [f"train.steps={2 * K}", f"train.checkpoint_every={K}", "train.keep_checkpoints=3"]
# A planner small enough to fine-tune a few steps in seconds: 16 image tokens of 8 x 8 pixels.
TINY_PLANNER = ["planner.image_size=32", "planner.patch_size=8", "planner.width=32",
                "planner.depth=1", "planner.train.log_every=1", "planner.train.sample_clips=0",
                "planner.train.peak_flops_per_device=1e11", "planner.train.warmup_steps=2",
                "planner.train.global_batch_size=8", f"planner.train.steps={2 * K}",
                f"planner.train.checkpoint_every={K}"]

# A decoder small enough to train a few steps in seconds on 8 fake CPU devices.
TINY_DECODER = ["action_decoder.channels=8", "action_decoder.keypoints=4",
                "action_decoder.width=32", "action_decoder.depth=1",
                "action_decoder.train.log_every=1", "action_decoder.train.sample_clips=4",
                f"action_decoder.train.sample_every={2 * K}",
                "action_decoder.train.peak_flops_per_device=1e11",
                "action_decoder.train.warmup_steps=2", "action_decoder.train.global_batch_size=8",
                f"action_decoder.train.steps={2 * K}",
                f"action_decoder.train.checkpoint_every={K}"]


def tiny_config(*overrides: str):
    """The quickstart config with a tiny dataset, sampled unguided (plus `overrides`),
    validated and locked."""
    from pewm_jax.config import load_config

    return load_config(str(ROOT / "configs" / "quickstart.py"),
                       [*TINY_DATA, *UNGUIDED, *overrides])


@pytest.fixture(scope="session")
def tabletop_dataset(tmp_path_factory) -> pathlib.Path:
    """A tiny built-in world dataset (all splits), generated once per test session."""
    from data_loaders import tabletop

    out = tmp_path_factory.mktemp("tabletop") / "data"
    tabletop.generate_dataset(tiny_config(), out)
    return out


def assert_resumes_exactly(halfway_config, config, workdir: pathlib.Path, reference, kind):
    """Training `kind` to step K (`halfway_config`) and resuming to 2K (`config`) in `workdir`
    gives the uninterrupted `reference` run's losses of steps K+1..2K and its parameters."""
    import jax
    import numpy as np

    from pewm_jax.train import loop

    loop.train(halfway_config, workdir, kind=kind)
    resumed = loop.train(config, workdir, kind=kind, resume=True)
    assert resumed.losses == {s: reference.losses[s] for s in range(K + 1, 2 * K + 1)}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params),
                 jax.device_get(reference.state.params))


def train_overrides(dataset: pathlib.Path, *overrides: str) -> list[str]:
    """Overrides of a tiny training run on `dataset` (the session's tiny tabletop data)."""
    return [*TINY_TRAIN, *RUN_STEPS, f"data.dataset_dir={dataset}", *overrides]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tabletop_dataset):
    """An uninterrupted 2k-step tiny run (checkpoints every k), trained once per session."""
    from pewm_jax.recipes import kinds
    from pewm_jax.train import loop

    workdir = tmp_path_factory.mktemp("reference_run")
    config = tiny_config(*train_overrides(tabletop_dataset, "train.sample_clips=2",
                                          f"train.sample_every={2 * K}"))
    result = loop.train(config, workdir, kind=kinds.WORLD_MODEL)
    return workdir, result


@pytest.fixture(scope="session")
def closed_loop_run(tmp_path_factory, tabletop_dataset, reference_run):
    """A run directory with every model, each trained briefly on 8 fake devices: the reference
    run's world model, the whole-task baseline, a tiny action decoder and a tiny planner."""
    import shutil

    from pewm_jax.recipes import kinds
    from pewm_jax.train import loop

    workdir = tmp_path_factory.mktemp("closed_loop_run")
    shutil.copytree(reference_run[0] / "world_model", workdir / "world_model")
    data = f"data.dataset_dir={tabletop_dataset}"
    loop.train(tiny_config(*train_overrides(tabletop_dataset)), workdir, kind=kinds.WHOLE_TASK)
    loop.train(tiny_config(*TINY_DECODER, data), workdir, kind=kinds.ACTION_DECODER)
    loop.train(tiny_config(*TINY_PLANNER, data), workdir, kind=kinds.PLANNER)
    return workdir


@pytest.fixture(scope="session")
def exported(closed_loop_run, tmp_path_factory) -> pathlib.Path:
    """The export bundle of the closed-loop run (EMA weights, newest steps); read-only."""
    from pewm_jax.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("export") / "bundle"
    export_bundle(closed_loop_run, out)
    return out
