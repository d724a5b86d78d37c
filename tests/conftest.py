"""Session-wide test set-up: 8 fake CPU devices for sharding tests, set before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_DATA = ["data.num_train_episodes=12", "data.num_val_episodes=3", "data.num_test_episodes=3",
             "data.num_holdout_episodes=3", "data.generation_workers=2"]


def tiny_config(*overrides: str):
    """The quickstart config with a tiny dataset (plus `overrides`), validated and locked."""
    from pewm_jax.config import load_config

    return load_config(str(ROOT / "configs" / "quickstart.py"), [*TINY_DATA, *overrides])


@pytest.fixture(scope="session")
def tabletop_dataset(tmp_path_factory) -> pathlib.Path:
    """A tiny built-in world dataset (all splits), generated once per test session."""
    from data_loaders import tabletop

    out = tmp_path_factory.mktemp("tabletop") / "data"
    tabletop.generate_dataset(tiny_config(), out)
    return out
