"""Export bundles: the exported policy and planner steps equal the training code's, the bundle's
closed loop acts as the controller does, the planner round-trips through Hugging Face format,
and tampering is refused."""

from __future__ import annotations

import json
import os
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
    from pewm_jax.recipes.restore import restore

    world, trained = restore(closed_loop_run, "world_model"), restore(closed_loop_run,
                                                                     "action_decoder")
    world_model, config, tokenizer = world.model, world.config, world.tokenizer
    decoder, stats = trained.model, trained.stats
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
    assert manifest["planner"]["platforms"] == ["cpu", "cuda", "tpu"]
    assert manifest["source"]["params"] == "ema_params"
    assert set(manifest["source"]["steps"]) == {"world_model", "action_decoder", "planner"}
    names = safetensors.numpy.load_file(str(exported / "weights.safetensors"))
    assert {n.split(".")[0] for n in names} == {"world_model", "action_decoder", "planner"}
    assert all(n.replace(".", "").replace("_", "").isalnum() for n in names)
    listed = {str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == listed - {"manifest.json"}


def _world(run: pathlib.Path):
    """(the world model's config, a fresh environment of its world, the planner)."""
    from pewm_jax.recipes.restore import restore
    from pewm_jax.sim import TabletopEnv
    from pewm_jax.vlm.finetune import make_planner

    config, planner = restore(run, "world_model").config, restore(run, "planner")
    w = config.world
    return config, lambda: TabletopEnv(w.image_size, (w.num_objects_min, w.num_objects_max),
                                       w.max_delta, w.primitive_max_steps), make_planner(
        planner.model, planner.tokenizer, planner.config)


def test_bundle_planner_writes_the_planners_plans(exported, closed_loop_run):
    """Prefill + decode steps from the bundle, grammar masking in numpy: the same tokens as
    `Planner.generate_ids` (which resizes the 64-pixel frames to the planner's 32), and the
    same plans with points scaled to the observation."""
    config, make_env, planner = _world(closed_loop_run)
    images, tasks = [], []
    for seed in range(3):
        env = make_env()
        images.append(env.reset(seed=seed)[0]["image"])
        tasks.append(env.task.text)
    images = np.stack(images)
    bundle_planner = runtime.BundlePlanner(runtime.load_bundle(exported))
    assert bundle_planner.image_size == planner.image_size != images.shape[1]
    plans = bundle_planner.plan(images, tasks)
    reference = planner.plan(images, tasks)
    scale = images.shape[1] / planner.image_size
    for plan, ref in zip(plans, reference, strict=True):
        assert [s.text for s in plan.steps] == [s.text for s in ref.steps]
        np.testing.assert_array_equal([s.start_xy + s.goal_xy for s in plan.steps],
                                      [np.array(s.start_xy + s.goal_xy) * scale
                                       for s in ref.steps])
    from data_loaders.transforms import resize_bicubic

    np.testing.assert_array_equal(
        bundle_planner.generate_ids(resize_bicubic(images, planner.image_size), tasks),
        planner.generate_ids(images, tasks))


def test_bundle_closed_loop_takes_the_controllers_actions(exported, closed_loop_run,
                                                         monkeypatch):
    """Plan -> primitive step -> actions -> replan from the bundle alone plays the same
    commands and the same actions (within 1e-5) as the in-framework Controller (VLM planner,
    decoded executor, closed loop) for the same episodes and seeds."""
    from pewm_jax.control.controller import ControlSettings, Controller
    from pewm_jax.control.policy import PrimitivePolicy
    from pewm_jax.control.tabletop import EpisodeSpec, TabletopControlEnv
    from pewm_jax.recipes.restore import restore
    from pewm_jax.sim import TabletopEnv

    config, make_env, planner = _world(closed_loop_run)
    world, trained = restore(closed_loop_run, "world_model"), restore(closed_loop_run,
                                                                     "action_decoder")
    world_model, tokenizer, decoder, stats = world.model, world.tokenizer, trained.model, \
        trained.stats
    taken: list[np.ndarray] = []
    env_step = TabletopEnv.step
    monkeypatch.setattr(TabletopEnv, "step",
                        lambda self, action: taken.append(np.array(action)) or env_step(self,
                                                                                       action))
    bundle = runtime.load_bundle(exported)
    ends = {"success": "terminated", "out_of_steps": "truncated", "plan_done": "plan_done",
            "budget": "budget"}
    w = config.world
    for seed in (0, 1):
        policy = PrimitivePolicy(world_model, config, tokenizer, decoder, stats[0], batch_size=1,
                                 seed=4)
        controller = Controller(
            ControlSettings("vlm", "decoded", "closed", max_replans=0, track=False),
            lambda: TabletopControlEnv(w.image_size, (w.num_objects_min, w.num_objects_max),
                                       w.max_delta, w.primitive_max_steps),
            horizon=int(config.data.horizon), frame_stride=int(config.data.frame_stride),
            policy=policy, planner=planner)
        taken.clear()
        [result] = controller.run([EpisodeSpec(seed)], parallel=1)
        reference = list(taken)

        env = make_env()
        observation, _ = env.reset(seed=seed)
        taken.clear()
        loop = runtime.BundleController(bundle, seed=4).run(
            env, observation["image"], env.task.text, max_primitives=result.task_length)
        assert [(r.command.text, r.command.start_xy, r.command.goal_xy) for r in loop.records] \
            == [(p.text, p.start_xy, p.goal_xy) for p in result.primitives]
        assert [r.env_steps for r in loop.records] == [p.env_steps for p in result.primitives]
        assert loop.end == ends[result.end]
        assert len(taken) == len(reference) > 0
        np.testing.assert_allclose(np.stack(taken), np.stack(reference), atol=1e-5, rtol=0)


def test_bundle_planner_round_trips_through_hugging_face(exported, closed_loop_run):
    """planner_hf/ loads into transformers with every tensor used, gives our logits, and
    converts back to the same parameters."""
    import torch
    import transformers
    from flax import nnx

    from pewm_jax.recipes import paligemma_checkpoints as convert
    from pewm_jax.recipes.restore import restore
    from pewm_jax.vlm.finetune import make_planner

    trained = restore(closed_loop_run, "planner")
    planner = make_planner(trained.model, trained.tokenizer, trained.config)
    hf_dir = exported / "planner_hf"
    back = convert.load_paligemma(hf_dir)
    ours = dict(nnx.to_flat_state(nnx.state(planner.model, nnx.Param)))
    theirs = dict(nnx.to_flat_state(nnx.state(back, nnx.Param)))
    assert ours.keys() == theirs.keys()
    for path in ours:
        np.testing.assert_array_equal(theirs[path][...], ours[path][...], err_msg=str(path))
    assert (hf_dir / "tokenizer.json").read_text() == planner.tokenizer.to_str()

    model, info = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        hf_dir, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    spec = planner.model.spec
    image = np.random.default_rng(0).uniform(-1, 1, (1, spec.image_size, spec.image_size, 3))
    image = image.astype(np.float32)
    prompt = planner.prompt_ids("put the red cube in the bin")[None]  # (1, L)
    ids = np.concatenate([np.full((1, spec.num_image_tokens), spec.image_token_id), prompt], 1)
    with torch.no_grad():
        reference = model.eval()(
            input_ids=torch.tensor(ids, dtype=torch.long),
            pixel_values=torch.tensor(image.transpose(0, 3, 1, 2).copy()),
            token_type_ids=torch.zeros(ids.shape, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(planner.model(image, prompt)), reference, atol=1e-4,
                               rtol=0)


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
    # Every file, the safetensors weights among them, readable as a plain write would be.
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.relative_to(tmp_path / "bundle").as_posix(): oct(p.stat().st_mode & 0o777)
             for p in (tmp_path / "bundle").rglob("*") if p.is_file()}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    again = pewm(*args)
    assert again.returncode == 2 and "never overwritten" in again.stderr
    assert "Traceback" not in again.stderr
    assert runtime.load_bundle(tmp_path / "bundle").manifest == manifest


@pytest.mark.parametrize("damage,name", [
    ("flip", "weights.safetensors"), ("truncate", "weights.safetensors"),
    ("remove", "weights.safetensors"), ("flip", "planner_decode.jaxexport"),
    ("remove", "planner_hf/model.safetensors")])
def test_a_modified_bundle_is_refused(exported, tmp_path, damage, name):
    copy = tmp_path / "bundle"
    shutil.copytree(exported, copy)
    target = copy / name
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


def test_a_bundle_without_a_planner_runs_the_policy_only(closed_loop_run, tmp_path):
    """A run with no planner exports the policy alone; asking its bundle for the planner names
    the fix."""
    run = tmp_path / "run"
    for model in ("world_model", "action_decoder"):
        shutil.copytree(closed_loop_run / model, run / model)
    manifest = bundle_lib.export_bundle(run, tmp_path / "bundle", platforms=("cpu",))
    assert manifest["planner"] is None and "planner_hf/config.json" not in manifest["files"]
    bundle = runtime.load_bundle(tmp_path / "bundle")
    assert not bundle.has_planner
    with pytest.raises(runtime.BundleError, match="pewm planner"):
        runtime.BundlePlanner(bundle)


def _rewrite_manifest(bundle: pathlib.Path, edit) -> None:
    """Applies `edit` to the manifest and re-hashes it, as a careless hand edit would not."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    manifest["manifest_sha256"] = runtime.manifest_sha256(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("case,message", [
    ("edited manifest", "manifest was modified"), ("unlisted file", "does not list: notes.txt"),
    ("outside the bundle", "outside the bundle")])
def test_a_bundle_that_is_not_as_exported_is_refused(exported, tmp_path, case, message):
    """An edited manifest (here the frame stride the closed loop plays actions with), a file the
    manifest does not list, and a listed name that points outside the bundle are refused."""
    copy = tmp_path / "bundle"
    shutil.copytree(exported, copy)
    if case == "edited manifest":
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["policy_step"]["frame_stride"] += 1
        (copy / "manifest.json").write_text(json.dumps(manifest))
    elif case == "unlisted file":
        (copy / "notes.txt").write_text("hello")
    else:
        (tmp_path / "secret").write_text("x")
        _rewrite_manifest(copy, lambda m: m["files"].update(
            {"../secret": {"bytes": 1, "sha256": runtime.file_sha256(tmp_path / "secret")}}))
    with pytest.raises(runtime.BundleError, match=message):
        runtime.load_bundle(copy)


def test_a_bundle_from_another_jax_names_the_versions(exported, tmp_path):
    """A step this jax cannot deserialize is refused naming the exporter's versions."""
    copy = tmp_path / "bundle"
    shutil.copytree(exported, copy)
    (copy / "planner_decode.jaxexport").write_bytes(b"not a serialized export")

    def rehash(manifest):
        manifest["files"]["planner_decode.jaxexport"] = {
            "bytes": 23, "sha256": runtime.file_sha256(copy / "planner_decode.jaxexport")}
        manifest["versions"]["jax"] = "0.0.1"

    _rewrite_manifest(copy, rehash)
    with pytest.raises(runtime.BundleError, match="exported with .*0.0.1.*install the"):
        runtime.load_bundle(copy)


def test_export_without_an_action_decoder_names_the_fix(reference_run, tmp_path):
    with pytest.raises(bundle_lib.ExportError, match="pewm actions"):
        bundle_lib.export_bundle(reference_run[0], tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_the_runtime_needs_no_flax(exported, tabletop_dataset):
    """A process where importing flax, optax, orbax, grain, TensorFlow, etils, ml_collections,
    transformers or torch fails still loads the bundle and runs a primitive step and a
    closed-loop primitive on the built-in world: a robot needs jax, numpy, safetensors,
    tokenizers (and Pillow to resize for the planner) only."""
    script = f"""
import sys, types
for name in ("flax", "optax", "orbax", "grain", "tensorflow", "tensorflow_datasets", "etils",
             "ml_collections", "transformers", "torch"):
    sys.modules[name] = None
import numpy as np
from pewm_jax.export import runtime
from pewm_jax.sim import TabletopEnv
bundle = runtime.load_bundle({str(exported)!r})
policy = runtime.BundlePolicy(bundle)
command = types.SimpleNamespace(text="pick up the red cube", start_xy=(10.0, 20.0),
                                goal_xy=(40.0, 30.0))
size = policy.image_size
out = policy.step(np.zeros((1, size, size, 3), np.uint8), [command], step_index=0)
assert out.actions.shape[:2] == out.clips.shape[:2] and np.isfinite(out.actions).all()
env = TabletopEnv(size)
observation, _ = env.reset(seed=0)
loop = runtime.BundleController(bundle).run(env, observation["image"], env.task.text,
                                            max_primitives=1)
assert len(loop.records) == 1 and loop.records[0].env_steps > 0
print("ok", out.actions.shape, loop.end)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")
