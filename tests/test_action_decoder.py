"""The action decoder: inverse dynamics per frame pair, trained by the shared trainer in its own
run directory, restored onto any devices, and scored beside the mean action."""

import json

import jax
import numpy as np
import pytest
from conftest import K, TINY_DATA, TINY_DECODER, assert_resumes_exactly, tiny_config
from flax import nnx

from data_loaders import clip_dataset, pipeline, tabletop
from pewm_jax.config import ConfigError
from pewm_jax.evaluate import actions as actions_eval
from pewm_jax.models.action_decoder import (ActionDecoder, ActionDecoderSpec, action_loss,
                                            masked_mse)
from pewm_jax.train import checkpoint as ckpt_lib
from pewm_jax.train import kinds, loop

def decoder_config(dataset, *overrides: str):
    return tiny_config(*TINY_DECODER, f"data.dataset_dir={dataset}", *overrides)


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory, tabletop_dataset):
    """An uninterrupted 2k-step tiny action decoder run (checkpoints every k)."""
    workdir = tmp_path_factory.mktemp("decoder_run")
    config = decoder_config(tabletop_dataset)
    return workdir, config, loop.train(config, workdir, kind=kinds.ACTION_DECODER)


def _model(action_dim: int = 3) -> ActionDecoder:
    return ActionDecoder(ActionDecoderSpec(image_size=16, patch_size=8, width=32, depth=1,
                                           num_heads=2, action_dim=action_dim),
                         rngs=nnx.Rngs(0))


def test_each_action_reads_only_its_own_frame_pair():
    """Action j depends on frames j - 1 and j alone (frame -1: the last context frame), so
    changing one future frame changes exactly the two actions around it."""
    model = _model()
    rng = np.random.default_rng(0)
    context = rng.integers(0, 256, (2, 2, 16, 16, 3), dtype=np.uint8)
    frames = rng.integers(0, 256, (2, 4, 16, 16, 3), dtype=np.uint8)
    actions = np.asarray(model(context, frames))
    assert actions.shape == (2, 4, 3) and np.isfinite(actions).all()
    changed = frames.copy()
    changed[:, 1] = 255 - changed[:, 1]
    moved = np.asarray(model(context, changed))
    differs = np.abs(moved - actions).max(axis=(0, 2)) > 1e-6
    assert differs.tolist() == [False, True, True, False]
    older = context.copy()
    older[:, 0] = 0  # only the last context frame is read
    np.testing.assert_array_equal(np.asarray(model(older, frames)), actions)
    # uint8 pixels and the same frames in [-1, 1] (a sampled clip) decode alike.
    np.testing.assert_allclose(np.asarray(model(context / 127.5 - 1, frames / 127.5 - 1)),
                               actions, atol=1e-5)


def test_the_loss_ignores_padded_action_dimensions():
    model = _model(action_dim=4)
    rng = np.random.default_rng(1)
    batch = {"context": rng.integers(0, 256, (2, 1, 16, 16, 3), dtype=np.uint8),
             "frames": rng.integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8),
             "actions": rng.normal(size=(2, 3, 4)).astype(np.float32),
             "action_mask": np.array([[True, True, True, False], [True, True, False, False]])}
    loss, metrics = action_loss(model, batch, None, None)
    predicted = np.asarray(model(batch["context"], batch["frames"]))
    errors = [np.square(predicted[0, :, :3] - batch["actions"][0, :, :3]),
              np.square(predicted[1, :, :2] - batch["actions"][1, :, :2])]
    expected = (errors[0].sum() + errors[1].sum()) / (errors[0].size + errors[1].size)
    assert float(loss) == pytest.approx(expected, rel=1e-5) and metrics["loss"] == loss
    padded = dict(batch, actions=np.where(batch["action_mask"][:, None], batch["actions"], 9.0))
    assert float(masked_mse(predicted, padded["actions"], padded["action_mask"])) == \
        pytest.approx(expected, rel=1e-5)


def test_decoder_trains_in_its_run_directory_and_resumes_exactly(decoder_run, tabletop_dataset,
                                                                 tmp_path):
    workdir, config, reference = decoder_run
    assert reference.status == "completed" and reference.step == 2 * K
    assert ckpt_lib.RunCheckpoints(workdir / "action_decoder", read_only=True).steps() == [
        K, 2 * K]
    assert not (workdir / "world_model").exists() and not (workdir / "planner").exists()
    assert_resumes_exactly(decoder_config(tabletop_dataset, f"action_decoder.train.steps={K}"),
                           config, tmp_path, reference, kinds.ACTION_DECODER)
    # Its settings are its own: world-model keys may change, its own may not.
    changed = decoder_config(tabletop_dataset, "model.width=48", "planner.width=48")
    assert loop.train(changed, workdir, kind=kinds.ACTION_DECODER).status == "reused"
    with pytest.raises(ckpt_lib.CheckpointError, match="action_decoder.width"):
        loop.train(decoder_config(tabletop_dataset, "action_decoder.width=48"), workdir,
                   kind=kinds.ACTION_DECODER, resume=True)


def test_batches_are_the_unaugmented_clips_at_its_own_batch_size(tabletop_dataset):
    config = decoder_config(tabletop_dataset, "data.augment=True")
    batch = next(kinds.ACTION_DECODER.iterator(config, 0, "train", 0))
    clips = pipeline.ClipPipeline(config, "train", augment=False, process_index=0,
                                  process_count=1)
    assert batch["frames"].shape[0] == config.action_decoder.train.global_batch_size
    for row in range(2):
        np.testing.assert_array_equal(batch["frames"][row], clips.element(row)["frames"])


def test_restored_decoder_is_the_ema_and_scores_beside_the_mean_action(decoder_run,
                                                                      tabletop_dataset):
    """Restored from a checkpoint written on the 8-device mesh onto one device; the baseline
    is the train split's mean action, normalised like the labels."""
    workdir, config, result = decoder_run
    model, saved_config, stats = actions_eval.load_action_decoder(workdir)
    assert saved_config.action_decoder.width == 32 and len(stats) == 1
    restored = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert all(a.sharding.device_set == {jax.devices()[0]} for a in jax.tree.leaves(restored))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored),
                 jax.device_get(result.state.ema_params))
    scores = actions_eval.evaluate_action_decoder(model, config, "test")
    clips = pipeline.ClipPipeline(config, "test", augment=False, process_index=0,
                                  process_count=1)
    examples = [clips.element(p) for p in range(clips.mixture.sizes[0])]
    labels = np.stack([e["actions"] for e in examples])  # (M, H, A), every dim real here
    train_mean = clip_dataset.load_statistics(tabletop_dataset).mean
    normalised_mean = clips.mixture.stats[0].normalize(train_mean)
    assert scores.transitions == labels.shape[0] * labels.shape[1]
    assert scores.mean_action_mse == pytest.approx(
        float(np.mean(np.square(labels - normalised_mean))), rel=1e-5)
    predicted = np.concatenate([np.asarray(model(
        np.stack([e["context"] for e in examples[i:i + 5]]),
        np.stack([e["frames"] for e in examples[i:i + 5]]))) for i in range(0, len(examples), 5)])
    assert scores.mse == pytest.approx(float(np.mean(np.square(predicted - labels))), rel=1e-4)
    assert len(scores.per_dim_mse) == labels.shape[-1]
    assert "mean-action mse" in actions_eval.scores_table([scores])


@pytest.mark.parametrize("override, key", [
    ("action_decoder.patch_size=7", "action_decoder.patch_size"),
    ("action_decoder.num_heads=3", "action_decoder.width"),
    ("action_decoder.train.grad_accum_steps=3", "action_decoder.train.global_batch_size"),
])
def test_bad_decoder_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config(override)


@pytest.mark.slow
def test_trained_decoder_beats_the_mean_action(tmp_path_factory):
    """The default decoder, 500 steps of 16 clips from 150 episodes: on held-out clips (test
    split) its error is well below the mean action's."""
    dataset = tmp_path_factory.mktemp("decoder_data") / "data"
    overrides = [*TINY_DATA, "data.num_train_episodes=150", "data.num_test_episodes=10",
                 f"data.dataset_dir={dataset}"]
    tabletop.generate_dataset(tiny_config(*overrides), dataset)
    config = tiny_config(*overrides, "action_decoder.train.steps=500",
                         "action_decoder.train.global_batch_size=16",
                         "action_decoder.train.log_every=50",
                         "action_decoder.train.checkpoint_every=500",
                         "action_decoder.train.sample_clips=0")
    workdir = tmp_path_factory.mktemp("decoder_500")
    loop.train(config, workdir, kind=kinds.ACTION_DECODER)
    model, _, _ = actions_eval.load_action_decoder(workdir)
    scores = actions_eval.evaluate_action_decoder(model, config, "test")
    print(actions_eval.scores_table([scores]), json.dumps(scores.per_dim_mse))
    assert scores.mse < 0.5 * scores.mean_action_mse
