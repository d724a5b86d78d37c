"""The built-in world's dataset: generation, splits, hold-outs, clips, statistics, tokenizer."""

import json
import pathlib

import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from data_loaders import clip_dataset, clips, tabletop
from pewm_jax.text import tokenizer
from pewm_jax.sim import TabletopEnv, expert_episode
from pewm_jax.sim import primitives as P
from pewm_jax.sim import tasks as T
from pewm_jax.sim.world import OBJECT_NAMES


def _records(path: pathlib.Path, split: str) -> list[dict]:
    src = clip_dataset.clip_source(path, split)
    return sorted((src[i] for i in range(len(src))),
                  key=lambda r: (r["episode_id"], r["segment_index"], r["part"]))


def _pair_of(text: str) -> tuple[str, str]:
    """(skill, object) of a primitive's words, from the paraphrase tables."""
    for kind, forms in P.WORDS.items():
        for form in forms:
            for obj in OBJECT_NAMES:
                if text.startswith(form.split("{obj}")[0] + obj):
                    return T.SKILL_OF_KIND[kind], obj
    raise AssertionError(f"no paraphrase matches {text!r}")


def test_generation_is_deterministic_and_independent_of_workers(tabletop_dataset, tmp_path):
    again = tabletop.generate_dataset(tiny_config("data.generation_workers=1"), tmp_path / "again")
    first = clip_dataset.DatasetMeta.load(tabletop_dataset)
    assert again.splits == first.splits
    for split in first.splits:
        for a, b in zip(_records(tabletop_dataset, split), _records(tmp_path / "again", split),
                        strict=True):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    for name in (clip_dataset.STATS_FILE, clip_dataset.TOKENIZER_FILE):
        assert (tabletop_dataset / name).read_text() == (tmp_path / "again" / name).read_text()


def test_splits_are_disjoint_and_hold_outs_stay_out_of_train(tabletop_dataset):
    meta = clip_dataset.DatasetMeta.load(tabletop_dataset)
    assert set(meta.splits) == set(tabletop.SPLITS)
    episodes = {s: {r["episode_id"] for r in _records(tabletop_dataset, s)} for s in meta.splits}
    names = list(episodes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not episodes[a] & episodes[b], (a, b)
    first_frames = [r["context"][0].tobytes() for s in names for r in _records(tabletop_dataset, s)
                    if r["segment_index"] == 0]
    assert len(first_frames) == len(set(first_frames))
    for split in ("train", "validation", "test"):
        for r in _records(tabletop_dataset, split):
            assert _pair_of(r["text"].decode()) not in T.HELD_OUT_PAIRS
    held = [_pair_of(r["text"].decode()) in T.HELD_OUT_PAIRS
            for r in _records(tabletop_dataset, "holdout_primitive")]
    assert any(held)


def test_clips_follow_the_clip_contract(tabletop_dataset):
    config = tiny_config()
    meta = clip_dataset.DatasetMeta.load(tabletop_dataset)
    assert (meta.horizon, meta.frame_stride, meta.image_size) == (8, 4, 64)
    assert meta.clip_format == clips.CLIP_FORMAT
    for r in _records(tabletop_dataset, "train"):
        assert r["frames"].shape == (config.data.horizon, 64, 64, 3) and r["sgg_valid"]
        assert r["context"].shape == (1, 64, 64, 3)
        assert r["actions"].shape == (8, 4, 3) and r["action_valid"].shape == (8, 4)
        assert np.all(np.abs(r["actions"][..., :2]) <= 0.08 + 1e-6)  # one step: <= max_delta
        assert set(np.unique(r["actions"][..., 2])) <= {-1.0, 1.0}  # gripper commands
        valid = r["action_valid"].reshape(-1)
        assert valid[0] and not np.any(np.diff(valid.astype(int)) > 0)  # steps, then padding
        padding = r["actions"].reshape(-1, 3)[~valid]
        assert not padding[:, :2].any()  # no-ops: no motion, the last command held
        assert np.all(padding[:, 2] == r["actions"].reshape(-1, 3)[valid][-1, 2])


@pytest.mark.parametrize("horizon, stride", [(8, 4), (2, 2)])
def test_playing_a_clips_actions_reproduces_its_frames(horizon, stride):
    """The clip contract's defining property, on clips cut as `pewm data` cuts them: from the
    world state at a clip's context frame, its per-step actions, played as they are, render
    its frames exactly, including a gripper command that falls inside a frame interval and
    the later clips of a segment longer than H * s (H * s = 4 < most segments)."""
    env = TabletopEnv(64)
    data = ml_collections.ConfigDict({"horizon": horizon, "frame_stride": stride,
                                      "context_frames": 1})
    inside = later_parts = 0
    for seed in range(4):
        ep = expert_episode(env, seed)
        for clip in tabletop.episode_clips(tabletop._rlds_episode(ep), data):
            first = ep.segments[clip.segment_index].start_frame + clip.part * horizon * stride
            env.reset(seed=seed, options={"split": "train"})
            for action in ep.actions[:first]:  # the world state at the clip's context frame
                env.step(action)
            assert np.array_equal(env.render(), clip.context[-1])
            np.testing.assert_allclose(clip.start_xy, env.state.gripper * 64, atol=1e-4)
            for j in range(horizon):
                for i in range(stride):
                    env.step(clip.actions[j, i])
                assert np.array_equal(env.render(), clip.frames[j]), (seed, clip.text, j)
            grip = clip.actions[..., 2].reshape(-1)
            inside += any(c % stride for c in np.flatnonzero(np.diff(grip)) + 1)
            later_parts += clip.part > 0
    assert inside, "no gripper command fell inside a frame interval"
    assert later_parts or horizon * stride >= 32


def test_clip_bounds_split_long_segments_and_pad_short_ones():
    assert clips.clip_bounds(3, 13, horizon=4, stride=3) == [(3, 13)]
    assert clips.clip_bounds(0, 40, horizon=4, stride=3) == [(0, 12), (12, 24), (24, 36),
                                                              (36, 40)]
    np.testing.assert_array_equal(clips.frame_indices(3, 13, horizon=4, stride=3), [6, 9, 12, 13])
    np.testing.assert_array_equal(clips.frame_indices(0, 5, horizon=4, stride=3), [3, 5, 5, 5])
    with pytest.raises(ValueError, match="at least one step"):
        clips.clip_bounds(4, 4, horizon=4, stride=3)
    actions = np.array([[1, 0, -1], [2, 0, 1], [3, 1, 1], [4, 1, -1], [5, 2, -1]], np.float32)
    steps, valid = clips.step_actions(actions, 1, 4, horizon=3, stride=2, gripper_dims=[2])
    np.testing.assert_array_equal(steps.reshape(-1, 3), [[2, 0, 1], [3, 1, 1], [4, 1, -1],
                                                         [0, 0, -1], [0, 0, -1], [0, 0, -1]])
    assert valid.reshape(-1).tolist() == [True, True, True, False, False, False]


def test_action_statistics_leave_gripper_unnormalised(tabletop_dataset):
    stats = clip_dataset.load_statistics(tabletop_dataset)
    records = _records(tabletop_dataset, "train")
    acts = np.concatenate([r["actions"][r["action_valid"]] for r in records])  # own steps
    np.testing.assert_allclose(stats.mean, acts.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats.std, acts.std(0), rtol=1e-5)
    assert stats.normalize_mask.tolist() == [True, True, False]
    assert (stats.low[2], stats.high[2]) == (-1.0, 1.0)
    model = stats.to_model(acts)
    np.testing.assert_allclose(model[:, :2].mean(0), 0, atol=1e-5)
    np.testing.assert_array_equal(model[:, 2], acts[:, 2] > 0)  # the command, as 1 / 0
    logits = np.where(model[:, 2:] > 0.5, 3.0, -3.0)
    np.testing.assert_allclose(stats.from_model(np.concatenate([model[:, :2], logits], 1)),
                               acts, atol=1e-5)


def test_a_dataset_of_the_old_clip_format_is_refused_with_the_fix(tabletop_dataset, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads((tabletop_dataset / clip_dataset.META_FILE).read_text())
    del meta["clip_format"]  # written before per-step actions
    (old / clip_dataset.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(clip_dataset.DatasetError, match="clip format 1.*Fix: rebuild") as e:
        clip_dataset.DatasetMeta.load(old)
    assert "pewm data" in str(e.value) and "pewm ingest" in str(e.value)


def test_tokenizer_has_train_words_locations_and_specials(tabletop_dataset):
    tok = tokenizer.load_tokenizer(tabletop_dataset)
    vocab = tok.get_vocab()
    assert [vocab[s] for s in tokenizer.SPECIALS] == [0, 1, 2, 3, 4]
    assert vocab["<loc0000>"] == 5 and vocab["<loc1023>"] == 1028
    train_words = {w for r in _records(tabletop_dataset, "train") for w in r["text"].decode().split()}
    assert train_words <= set(vocab)
    ids, mask = tokenizer.encode_batch(tok, ["pick up the red cube <loc0001><loc0002>", "flibber"], 8)
    assert ids.dtype == np.int32 and mask.tolist()[1] == [True] + [False] * 7
    assert ids[1, 0] == vocab[tokenizer.UNK] and ids[0, 5:7].tolist() == [6, 7]
    with pytest.raises(FileNotFoundError, match="pewm data"):
        tokenizer.load_tokenizer(tabletop_dataset / "nowhere")


def test_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    calls = []

    def failing(ep):
        calls.append(ep.seed)
        if len(calls) > 5:
            raise KeyboardInterrupt("simulated interruption")
        return original(ep)

    original = tabletop._rlds_episode
    monkeypatch.setattr(tabletop, "_rlds_episode", failing)
    with pytest.raises(KeyboardInterrupt):
        tabletop.generate_dataset(tiny_config("data.generation_workers=1"), tmp_path / "data")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(clip_dataset.DatasetError, match="pewm data"):
        clip_dataset.clip_source(tmp_path / "data", "train")


def test_existing_dataset_is_reused_or_refused_never_replaced(tabletop_dataset):
    meta, generated = clip_dataset.ensure_dataset(tabletop, tiny_config(), tabletop_dataset)
    assert not generated and meta.splits == clip_dataset.DatasetMeta.load(tabletop_dataset).splits
    before = (tabletop_dataset / clip_dataset.META_FILE).read_text()
    with pytest.raises(clip_dataset.DatasetError, match="--overwrite"):
        clip_dataset.ensure_dataset(tabletop, tiny_config("seed=7"), tabletop_dataset)
    with pytest.raises(clip_dataset.DatasetError, match="already exists"):
        tabletop.generate_dataset(tiny_config(), tabletop_dataset)
    assert (tabletop_dataset / clip_dataset.META_FILE).read_text() == before
    assert json.loads(before)["splits"]["train"] > 0


def test_data_of_an_earlier_task_decomposition_is_refused(tabletop_dataset, tmp_path):
    """Data made before a push became an approach and the push is not reused for training."""
    meta = json.loads((tabletop_dataset / clip_dataset.META_FILE).read_text())
    assert f"task decomposition {T.DECOMPOSITION};" in meta["source"]
    meta["source"] = meta["source"].replace(f"task decomposition {T.DECOMPOSITION}; ", "")
    old = tmp_path / "old"
    old.mkdir()
    (old / clip_dataset.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(clip_dataset.DatasetError, match="source differ.*--overwrite"):
        clip_dataset.ensure_dataset(tabletop, tiny_config(), old)


def test_missing_split_lists_the_splits(tabletop_dataset):
    with pytest.raises(clip_dataset.DatasetError, match="holdout_composition"):
        clip_dataset.clip_source(tabletop_dataset, "valid")
