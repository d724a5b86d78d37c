"""Imagined training clips for the action decoder: the world model's samples of train clips
with the true clips' actions, reused only when made the same way, mixed into the decoder's
training at config.action_decoder.imagined_weight."""

import shutil

import jax
import numpy as np
import pytest
from conftest import TINY_DECODER, tiny_config

from data_loaders import clip_dataset, pipeline
from pewm_jax.config import ConfigError
from pewm_jax.diffusion import sample_from_config
from pewm_jax.recipes import imagined_clips, kinds
from pewm_jax.recipes.restore import restore

COUNT = 5  # train clips imagined: one padded batch


def _config(dataset, workdir, *overrides):
    return tiny_config(*TINY_DECODER, f"data.dataset_dir={dataset}",
                       f"action_decoder.imagined_clips={COUNT}",
                       f"action_decoder.imagined_dir={workdir / 'imagined'}", *overrides)


@pytest.fixture(scope="module")
def imagined_run(tmp_path_factory, tabletop_dataset, reference_run):
    """A run directory holding the reference run's world model and its imagined clips."""
    workdir = tmp_path_factory.mktemp("imagined_run")
    shutil.copytree(reference_run[0] / "world_model", workdir / "world_model")
    config = _config(tabletop_dataset, workdir, "diffusion.sgg_guidance=2.0")
    meta, made = imagined_clips.ensure_imagined_dataset(config, workdir)
    return workdir, config, meta, made


def test_imagined_clips_are_the_world_models_samples_with_the_true_actions(imagined_run,
                                                                           tabletop_dataset):
    workdir, config, meta, made = imagined_run
    assert made and meta.splits == {"train": COUNT} and meta.name == "pewm_tabletop_imagined"
    # Normalised as the true clips: the source's statistics and tokenizer, byte for byte.
    for name in (clip_dataset.STATS_FILE, clip_dataset.TOKENIZER_FILE):
        assert ((workdir / "imagined" / name).read_bytes()
                == (tabletop_dataset / name).read_bytes())
    # The reference: the run's world model sampling the first clips with the config's guidance.
    world = restore(workdir / "world_model", "world_model")
    assert world.config.diffusion.sgg_guidance == 1.0  # trained unguided; sampled with 2.0
    world.config.unlock()
    world.config.diffusion.sgg_guidance = 2.0
    clips = pipeline.ClipPipeline(config, "train", augment=False, process_index=0,
                                  process_count=1)
    rows = [clips.transform(j, (0, j)) for j in range(COUNT)]
    rows += rows[-1:] * (imagined_clips.BATCH_SIZE - COUNT)
    cond = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    sampled = np.asarray(sample_from_config(world.model, cond,
                                            jax.random.fold_in(jax.random.key(config.seed), 0),
                                            world.config))
    sampled = np.clip(np.round(sampled * 255), 0, 255).astype(np.uint8)
    source = clip_dataset.clip_source(tabletop_dataset, "train")
    imagined = clip_dataset.clip_source(workdir / "imagined", "train")
    for j in range(COUNT):
        got, truth = imagined[j], source[j]
        np.testing.assert_array_equal(got["frames"], sampled[j])
        assert not np.array_equal(got["frames"], truth["frames"])
        for key in ("context", "actions", "action_valid", "start_xy", "goal_xy", "text",
                    "sgg_valid", "episode_id", "segment_index", "part"):
            np.testing.assert_array_equal(got[key], truth[key])


def test_imagined_clips_are_reused_only_when_made_the_same_way(imagined_run, tabletop_dataset):
    workdir, config, meta, _ = imagined_run
    again, made = imagined_clips.ensure_imagined_dataset(config, workdir)
    assert not made and again == meta
    before = (workdir / "imagined" / clip_dataset.META_FILE).read_bytes()
    other = _config(tabletop_dataset, workdir, "diffusion.sgg_guidance=3.0")
    with pytest.raises(clip_dataset.DatasetError, match="made otherwise.*--overwrite"):
        imagined_clips.ensure_imagined_dataset(other, workdir)
    assert (workdir / "imagined" / clip_dataset.META_FILE).read_bytes() == before


def test_the_decoder_trains_on_both_in_the_configured_shares(imagined_run, tabletop_dataset):
    workdir, _, _, _ = imagined_run
    config = _config(tabletop_dataset, workdir, "action_decoder.imagined_weight=0.25",
                     "action_decoder.train.global_batch_size=64")
    assert kinds.decoder_mixture(config) == [(str(tabletop_dataset), 0.75),
                                             (str(workdir / "imagined"), 0.25)]
    batch = next(kinds.ACTION_DECODER.iterator(config, 0, "train", 0))
    from_imagined = batch["dataset_id"] == 1
    assert 0 < from_imagined.sum() < len(from_imagined)
    imagined = clip_dataset.clip_source(workdir / "imagined", "train")
    stats = clip_dataset.load_statistics(tabletop_dataset)
    for row in np.flatnonzero(from_imagined)[:3]:  # its true actions, normalised as the source's
        record = next(imagined[j] for j in range(COUNT)
                      if np.array_equal(imagined[j]["frames"], batch["frames"][row]))
        np.testing.assert_allclose(batch["actions"][row, ..., :2],
                                   stats.normalize(record["actions"])[..., :2], rtol=1e-6)
    # Validation stays on the rendered clips alone.
    val = next(kinds.ACTION_DECODER.iterator(config, 0, "validation", 0))
    assert (val["dataset_id"] == 0).all()


def test_imagined_weight_needs_its_clips_and_a_share_below_one(tabletop_dataset):
    config = tiny_config(*TINY_DECODER, f"data.dataset_dir={tabletop_dataset}",
                         "action_decoder.imagined_weight=0.5")
    with pytest.raises(clip_dataset.DatasetError, match="pewm actions"):
        kinds.ACTION_DECODER.iterator(config, 0, "train", 0)
    with pytest.raises(ConfigError, match=r"action_decoder\.imagined_weight"):
        tiny_config("action_decoder.imagined_weight=1.0")
