"""Export bundles: the exported policy step equals the training code's; tampering is refused."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pewm_jax.export import bundle as bundle_lib
from pewm_jax.export import runtime

COMMANDS = [("pick up the red cube", (10.0, 20.0), (40.0, 30.0)),
            ("push the blue disc left", (30.0, 30.0), (12.0, 30.0)),
            ("move to the green disc", (5.0, 50.0), (50.0, 5.0))]


@pytest.fixture(scope="module")
def exported(closed_loop_run, tmp_path_factory) -> pathlib.Path:
    """The bundle of the session's closed-loop run (EMA weights, newest steps)."""
    out = tmp_path_factory.mktemp("export") / "bundle"
    bundle_lib.export_bundle(closed_loop_run, out)
    return out


def _observations(dataset: pathlib.Path, count: int) -> np.ndarray:
    from data_loaders import tabletop

    source = tabletop.episode_source(dataset, "test")
    return np.stack([source[i]["steps"][0]["observation"]["image"] for i in range(count)])


@pytest.mark.parametrize("batch", [1, 3])
def test_exported_step_equals_the_training_code(exported, closed_loop_run, tabletop_dataset,
                                                batch):
    """Same clips (uint8, exactly) and actions (within 1e-5) as `PrimitivePolicy.step` for the
    same observations, commands and step index, through the symbolic batch dimension."""
    from pewm_jax.control.policy import PrimitiveCommand, PrimitivePolicy
    from pewm_jax.evaluate.actions import load_action_decoder
    from pewm_jax.evaluate.video_quality import load_world_model

    world_model, config, tokenizer = load_world_model(closed_loop_run)
    decoder, _, stats = load_action_decoder(closed_loop_run)
    commands = [PrimitiveCommand(*c) for c in COMMANDS[:batch]]
    observations = _observations(tabletop_dataset, batch)
    reference = PrimitivePolicy(world_model, config, tokenizer, decoder, stats[0],
                                batch_size=batch, seed=3).step(observations, commands,
                                                               step_index=5)
    policy = runtime.BundlePolicy(runtime.load_bundle(exported), seed=3)
    out = policy.step(observations, commands, step_index=5)
    np.testing.assert_array_equal(out.clips, reference.clips)
    np.testing.assert_allclose(out.actions, reference.actions, atol=1e-5, rtol=0)
    other = policy.step(observations, commands, step_index=6)
    assert not np.array_equal(other.clips, out.clips)  # the step index seeds the noise


def test_manifest_names_the_weights_and_every_platform(exported, closed_loop_run):
    import safetensors.numpy

    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["policy_step"]["platforms"] == ["cpu", "cuda", "tpu"]
    assert manifest["source"]["params"] == "ema_params"
    names = safetensors.numpy.load_file(str(exported / "weights.safetensors"))
    assert {n.split(".")[0] for n in names} == {"world_model", "action_decoder"}
    assert all(n.replace(".", "").replace("_", "").isalnum() for n in names)


def test_export_command_writes_a_bundle_once(closed_loop_run, tmp_path):
    """`pewm export` writes a loadable bundle; a second export to the same --out is refused
    (exit 2, the message says so) and leaves the first untouched."""
    from test_cli import pewm

    args = ("export", "--config=configs/quickstart.py", f"--workdir={closed_loop_run}",
            f"--out={tmp_path / 'bundle'}", "--raw_params")
    first = pewm(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    manifest = runtime.load_bundle(tmp_path / "bundle").manifest
    assert manifest["source"]["params"] == "params"
    again = pewm(*args)
    assert again.returncode == 2 and "never overwritten" in again.stderr
    assert "Traceback" not in again.stderr
    assert runtime.load_bundle(tmp_path / "bundle").manifest == manifest


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_a_modified_bundle_is_refused(exported, tmp_path, damage):
    copy = tmp_path / "bundle"
    shutil.copytree(exported, copy)
    target = copy / "weights.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[:-100]))
    else:
        target.unlink()
    expected = {"flip": "sha256", "truncate": "truncated", "remove": "lacks"}[damage]
    with pytest.raises(runtime.BundleError, match=expected):
        runtime.load_bundle(copy)


def test_export_without_an_action_decoder_names_the_fix(reference_run, tmp_path):
    with pytest.raises(bundle_lib.ExportError, match="pewm actions"):
        bundle_lib.export_bundle(reference_run[0], tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_the_runtime_needs_no_flax(exported, tabletop_dataset):
    """A process where importing flax, optax, orbax or grain fails still loads and runs the
    bundle: a robot needs jax, numpy, safetensors and tokenizers only."""
    script = f"""
import sys, types
for name in ("flax", "optax", "orbax", "grain", "tensorflow", "tensorflow_datasets"):
    sys.modules[name] = None
import numpy as np
from pewm_jax.export import runtime
policy = runtime.BundlePolicy(runtime.load_bundle({str(exported)!r}))
command = types.SimpleNamespace(text="pick up the red cube", start_xy=(10.0, 20.0),
                                goal_xy=(40.0, 30.0))
size = policy.image_size
out = policy.step(np.zeros((1, size, size, 3), np.uint8), [command], step_index=0)
assert out.actions.shape[:2] == out.clips.shape[:2] and np.isfinite(out.actions).all()
print("ok", out.actions.shape)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")
