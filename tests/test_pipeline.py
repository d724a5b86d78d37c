"""The Grain input pipeline (data_loaders.pipeline) and global-batch assembly (pewm_jax.parallel)."""

import json
import pathlib
import shutil

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_record.python import array_record_module
from jax.sharding import Mesh, PartitionSpec

from data_loaders import clip_dataset, pipeline
from data_loaders.clip_dataset import DatasetError, DatasetMeta
from data_loaders.clips import cut_clips
from pewm_jax.config import default_config
from pewm_jax.parallel.global_batch import make_global_batch
from pewm_jax.sgg import render_heatmaps
from pewm_jax.sim import TabletopEnv, expert_episode

HORIZON, STRIDE, IMAGE = 8, 4, 64
GLOBAL_BATCH = 8
CORRUPT_INDEX = 3  # the record the corrupt fixture replaces with garbage


def _write_tabletop_dataset(out_dir: pathlib.Path, image_size: int, seeds: range,
                            extra_action_dim: bool) -> DatasetMeta:
    """Expert episodes cut into clips; optionally with a 4-dim action (dx, dy, dx - dy, grip)."""
    env = TabletopEnv(image_size)
    episodes = [expert_episode(env, seed) for seed in seeds]
    action_dim = 4 if extra_action_dim else 3

    def clips():
        for ep in episodes:
            actions = ep.actions
            if extra_action_dim:
                actions = np.concatenate([actions[:, :2], actions[:, :1] - actions[:, 1:2],
                                          actions[:, 2:]], axis=1)
            for i, seg in enumerate(ep.segments):
                # Every segment fits the horizon, so a clip's last frame is the segment's last.
                assert seg.end_frame - seg.start_frame <= HORIZON * STRIDE
                yield from cut_clips(ep.frames, actions, seg.start_frame, seg.end_frame,
                                     horizon=HORIZON, stride=STRIDE, context_frames=1,
                                     gripper_dims=[action_dim - 1], text=seg.text,
                                     start_xy=seg.start_xy, goal_xy=seg.goal_xy, sgg_valid=True,
                                     episode_id=ep.seed, segment_index=i)

    meta = DatasetMeta(name=f"tabletop{image_size}", image_size=image_size, horizon=HORIZON,
                       frame_stride=STRIDE, context_frames=1, action_dim=action_dim,
                       gripper_dims=[action_dim - 1], source="tests")
    return clip_dataset.write_dataset(out_dir, meta, {"train": clips})


@pytest.fixture(scope="session")
def datasets(tmp_path_factory) -> tuple[str, str]:
    """Two clip datasets: 64 px frames with 3-dim actions, 96 px frames with 4-dim actions."""
    root = tmp_path_factory.mktemp("clip_datasets")
    _write_tabletop_dataset(root / "a64", 64, range(12), extra_action_dim=False)
    _write_tabletop_dataset(root / "b96", 96, range(100, 110), extra_action_dim=True)
    return str(root / "a64"), str(root / "b96")


@pytest.fixture(scope="session")
def corrupt_dataset(datasets, tmp_path_factory) -> tuple[str, str]:
    """A copy of dataset a64 whose train record CORRUPT_INDEX holds garbage; and its file."""
    out = tmp_path_factory.mktemp("corrupt") / "a64"
    shutil.copytree(datasets[0], out)
    (path,) = (out / clip_dataset.CLIPS_DIR).rglob("*train.array_record*")
    reader = array_record_module.ArrayRecordReader(str(path))
    options, records = reader.writer_options_string(), reader.read_all()
    reader.close()
    records[CORRUPT_INDEX] = b"\x00 not a clip record \xff" * 8
    writer = array_record_module.ArrayRecordWriter(str(path), options)
    for record in records:
        writer.write(record)
    writer.close()
    return str(out), str(path)


def _config(*dirs: str, weights=None, **data):
    config = default_config()
    config.world.image_size = IMAGE
    config.data.horizon = HORIZON
    config.data.frame_stride = STRIDE
    config.train.global_batch_size = GLOBAL_BATCH
    config.data.mixture = tuple((d, w) for d, w in zip(dirs, weights or [1.0] * len(dirs)))
    for key, value in data.items():
        config.data[key] = value
    return config


def _take(it: pipeline.ClipBatchIterator, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def test_every_batch_follows_the_batch_spec_with_a_two_dataset_mixture(datasets):
    pipe = pipeline.ClipPipeline(_config(*datasets))
    assert pipe.spec.action_dim == 4
    with pipe.iterator() as it:
        batches = _take(it, 4)
    seen = set()
    for batch in batches:
        pipe.spec.check(batch, GLOBAL_BATCH)
        for mask, dataset_id in zip(batch["action_mask"], batch["dataset_id"]):
            assert mask.tolist() == ([True] * 3 + [False] if dataset_id == 0 else [True] * 4)
        assert batch["text_mask"].any(axis=1).all()  # every clip has words
        assert (batch["text_tokens"][batch["text_mask"]] > 0).all()
        seen.update(batch["dataset_id"].tolist())
    assert seen == {0, 1}


def _palm_at(frame: np.ndarray, row: int, col: int) -> bool:
    """The pixel is the gripper's palm: the darkest thing drawn (PALM_RGB), up to resampling."""
    brightness = frame.astype(np.float32).mean(-1)
    return brightness[row, col] <= brightness.min() + 12 and brightness[row, col] < 80


def test_heatmaps_from_augmented_points_peak_on_the_gripper(datasets):
    pipe = pipeline.ClipPipeline(_config(*datasets, crop_scale_min=0.6, color_jitter=0.2),
                                 augment=True)
    plain = pipeline.ClipPipeline(_config(*datasets), augment=False)
    examples = [pipe.element(p) for p in range(48)]
    start = np.stack([e["start_xy"] for e in examples])
    goal = np.stack([e["goal_xy"] for e in examples])
    maps = np.asarray(render_heatmaps(start, goal, np.ones(len(examples), bool), IMAGE, IMAGE,
                                      sigma=2.0))
    moved = 0
    for p, e in enumerate(examples):
        for c, frame, point in ((0, e["context"][-1], e["start_xy"]),
                                (1, e["frames"][-1], e["goal_xy"])):
            row, col = np.unravel_index(np.argmax(maps[p, :, :, c]), (IMAGE, IMAGE))
            assert (col, row) == tuple(np.floor(point).astype(int)), (p, c)
            assert _palm_at(frame, row, col), (p, c, point)
        moved += not np.allclose(e["start_xy"], plain.element(p)["start_xy"], atol=0.5)
    assert moved > len(examples) // 2  # the crops really moved the points


def test_actions_are_normalised_per_dataset_and_padded(datasets):
    pipe = pipeline.ClipPipeline(_config(*datasets), augment=False)
    sources = [clip_dataset.clip_source(d, "train") for d in datasets]
    stats = [clip_dataset.load_statistics(d) for d in datasets]
    for p in range(24):
        k, j = pipe.order[p]
        raw, got = sources[k][j], pipe.element(p)
        dims = raw["actions"].shape[-1]
        np.testing.assert_allclose(got["actions"][..., :dims - 1],
                                   stats[k].normalize(raw["actions"])[..., :-1], rtol=1e-6)
        # The gripper dimension holds the command: 1 closed, 0 open.
        np.testing.assert_array_equal(got["actions"][..., dims - 1], raw["actions"][..., -1] > 0)
        assert not got["actions"][..., dims:].any()
        assert got["gripper_mask"].tolist() == [i == dims - 1 for i in range(4)]
        np.testing.assert_array_equal(got["action_valid"], raw["action_valid"])
        other = stats[1 - k]  # (dx, dy) mean the same in both datasets; their statistics differ
        with_other = (raw["actions"][..., :2] - other.mean[:2]) / other.std[:2]
        assert not np.allclose(got["actions"][..., :2], with_other, atol=1e-3)
        scale = IMAGE / (64 if k == 0 else 96)
        np.testing.assert_allclose(got["start_xy"], raw["start_xy"] * scale, rtol=1e-6)
        if k == 0:  # same size, no augmentation: the frames pass through untouched
            np.testing.assert_array_equal(got["frames"], raw["frames"])


def test_global_order_respects_mixture_weights_and_visits_every_record():
    sizes = (1000, 500)  # grain's index shuffle is slow on tiny ranges; these are fast
    order = pipeline.GlobalOrder(sizes, [3.0, 1.0], seed=0)
    draws = np.array([order[p] for p in range(2 * pipeline.MIX_WINDOW)])
    assert abs(np.mean(draws[:, 0] == 0) - 0.75) < 0.01
    for k, size in enumerate(sizes):  # each dataset's records are drawn equally often
        counts = np.bincount(draws[draws[:, 0] == k, 1], minlength=size)
        assert counts.max() - counts.min() <= 1
    assert draws[:64, 0].tolist() != draws[64:128, 0].tolist()  # no fixed interleaving pattern
    again = pipeline.GlobalOrder(sizes, [3.0, 1.0], seed=0)
    assert np.array_equal([again[p] for p in range(64)], draws[:64])  # a function of the seed
    other = pipeline.GlobalOrder(sizes, [3.0, 1.0], seed=1)
    assert not np.array_equal([other[p] for p in range(64)], draws[:64])


def test_batches_follow_the_mixture_weights(datasets):
    pipe = pipeline.ClipPipeline(_config(*datasets, weights=[3.0, 1.0]))
    with pipe.iterator() as it:
        ids = np.concatenate([b["dataset_id"] for b in _take(it, 8)])
    assert 0.6 < np.mean(ids == 0) < 0.9


@pytest.mark.parametrize("workers", [0, 2])
def test_restored_iterator_continues_like_the_uninterrupted_one(datasets, workers):
    config = _config(*datasets, num_workers=workers)
    pipe = pipeline.ClipPipeline(config)
    with pipe.iterator() as it:
        head = _take(it, 2)
        state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
        want = _take(it, 3)
    assert state["global_step"] == 2 and state["layout"]["num_workers"] == workers
    with pipe.iterator() as restored:
        restored.set_state(state)
        _assert_same_batches(_take(restored, 3), want)
        assert restored.global_step == 5
    if workers:  # workers change nothing in the order
        with pipeline.ClipPipeline(config, num_workers=0).iterator() as in_process:
            _assert_same_batches(_take(in_process, 5), head + want)
    else:
        bad = dict(state, order=dict(state["order"], seed=1))
        with pipe.iterator() as it, pytest.raises(ValueError, match="same seed"):
            it.set_state(bad)


def test_processes_read_disjoint_slices_and_resume_on_another_count(datasets):
    config = _config(*datasets)
    with pipeline.ClipPipeline(config, process_index=0, process_count=1).iterator() as one:
        global_batches = _take(one, 4)
    parts = []
    for i in range(2):
        pipe = pipeline.ClipPipeline(config, process_index=i, process_count=2)
        assert pipe.local_batch_size == GLOBAL_BATCH // 2
        with pipe.iterator() as it:
            parts.append(_take(it, 2))
            if i == 0:
                state = it.get_state()
    for step in range(2):
        joined = {k: np.concatenate([parts[0][step][k], parts[1][step][k]]) for k in parts[0][0]}
        _assert_same_batches([joined], [global_batches[step]])
        assert not np.array_equal(parts[0][step]["frames"], parts[1][step]["frames"])
    with pipeline.ClipPipeline(config, process_index=0, process_count=1).iterator() as resumed:
        resumed.set_state(state)  # one process continues the run of two
        _assert_same_batches(_take(resumed, 2), global_batches[2:])


def test_missing_dataset_says_how_to_make_it(tmp_path, datasets):
    with pytest.raises(DatasetError, match="pewm data"):
        pipeline.ClipPipeline(_config(datasets[0], str(tmp_path / "nowhere")))
    config = _config()
    config.data.dataset_dir = str(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="pewm data"):
        pipeline.make_iterator(config)


def test_corrupt_record_raises_naming_file_and_index(corrupt_dataset):
    directory, path = corrupt_dataset
    pipe = pipeline.ClipPipeline(_config(directory))
    p = next(p for p in range(1000) if pipe.order[p] == (0, CORRUPT_INDEX))
    with pipe.iterator() as it:
        _take(it, p // GLOBAL_BATCH)
        with pytest.raises(pipeline.CorruptRecordError) as error:
            next(it)
    assert path in str(error.value) and f"record {CORRUPT_INDEX}" in str(error.value)


def test_corrupt_records_are_skipped_deterministically_and_counted(corrupt_dataset):
    directory, _ = corrupt_dataset
    pipe = pipeline.ClipPipeline(_config(directory, skip_corrupt=True))
    steps = 6
    hits = sum(pipe.order[p] == (0, CORRUPT_INDEX) for p in range(steps * GLOBAL_BATCH))
    assert hits > 0
    with pipe.iterator() as it:
        first = _take(it, steps)
        assert it.corrupt_skipped == hits
        state = it.get_state()
    with pipe.iterator() as again:
        _assert_same_batches(_take(again, steps), first)
    with pipe.iterator() as restored:
        restored.set_state(state)
        assert restored.corrupt_skipped == hits


def test_make_global_batch_shards_the_batch_over_data_and_fsdp(datasets):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    pipe = pipeline.ClipPipeline(_config(*datasets))
    with pipe.iterator() as it:
        local = next(it)
    batch = make_global_batch(local, mesh)
    assert batch.keys() == local.keys()
    for key, value in batch.items():
        assert value.shape == local[key].shape and value.dtype == local[key].dtype
        assert value.sharding.spec == PartitionSpec(("data", "fsdp"))
        np.testing.assert_array_equal(np.asarray(value), local[key])
        for shard in value.addressable_shards:
            assert shard.data.shape[0] == GLOBAL_BATCH // 8
            np.testing.assert_array_equal(np.asarray(shard.data), local[key][shard.index])


def test_iterator_state_rides_in_an_orbax_checkpoint(datasets, tmp_path):
    pipe = pipeline.ClipPipeline(_config(*datasets))
    with pipe.iterator() as it:
        _take(it, 2)
        with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
            manager.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
            manager.wait_until_finished()
        want = _take(it, 2)
    with pipe.iterator() as restored, ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(2, args=ocp.args.Composite(
            data_iter=grain.checkpoint.CheckpointRestore(restored)))
        assert restored.global_step == 2
        _assert_same_batches(_take(restored, 2), want)
