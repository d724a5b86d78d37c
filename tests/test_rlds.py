"""RLDS ingestion (data_loaders/rlds.py) on tiny Bridge- and fractal-layout datasets, and the
shared segmenter (pewm_jax/segmenter.py)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import rlds_fixtures as F
from data_loaders import clip_dataset, rlds
from pewm_jax import segmenter as S
from pewm_jax.camera import project_points

ROOT = pathlib.Path(__file__).resolve().parents[1]
H, STRIDE, CTX, SIZE = 4, 2, 1, 32
SHAPE = dict(horizon=H, frame_stride=STRIDE, context_frames=CTX, image_size=SIZE)

K, E = F.CAMERA_K, F.CAMERA_E  # the Bridge fixture's camera (64x64 image)


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, F.Fixture]:
    root = tmp_path_factory.mktemp("rlds_sources")
    return {"bridge": F.write_bridge(root / "bridge"), "fractal": F.write_fractal(root / "fractal")}


def bridge_spec(**changes):
    spec = rlds.load_spec(ROOT / "configs/rlds/bridge.py")
    return rlds.check_spec({**spec.to_dict(), **changes})


@pytest.fixture(scope="module")
def bridge_out(sources, tmp_path_factory):
    """Bridge with point annotations, a calibration, a wrist camera and a fallback text."""
    spec = bridge_spec(fallback_instruction="do the task", wrist_image_key="observation/image_1",
                       start_point_key="observation/tcp_point_2d",
                       goal_point_key="observation/tcp_point_2d", camera_intrinsics=K,
                       camera_extrinsics=E)
    out = tmp_path_factory.mktemp("clips") / "bridge"
    meta = rlds.ingest(spec, sources["bridge"].path, out, **SHAPE)
    return out, meta


@pytest.fixture(scope="module")
def fractal_out(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("clips") / "fractal"
    meta = rlds.ingest(rlds.load_spec(ROOT / "configs/rlds/fractal.py"),
                       sources["fractal"].path.parent, out, **SHAPE)  # parent: finds 0.1.0
    return out, meta


def records(out, split) -> list[dict]:
    src = clip_dataset.clip_source(out, split)
    return sorted((src[i] for i in range(len(src))),
                  key=lambda r: (int(r["episode_id"]), int(r["segment_index"]), int(r["part"])))


def boundaries_from_changes(changes, num_steps):
    cuts = [0, *changes, num_steps]
    return list(zip(cuts[:-1], cuts[1:]))


def expected_indices(start, segment_end):
    """The clip contract by hand: a clip starting at `start` covers at most H * STRIDE steps of
    its segment, frames past the segment's end holding it."""
    return np.minimum(start + np.arange(1, H + 1) * STRIDE, min(start + H * STRIDE, segment_end))


def segments_of(rs) -> dict[int, list[tuple[int, int]]]:
    """Episode -> the (start, end) frames of its segments, the consecutive clips of a long
    segment joined (each checked to start where the one before ended)."""
    out: dict[int, list[tuple[int, int]]] = {}
    for r in rs:
        episode, start, end, _ = clip_segment(r)
        if int(r["part"]):
            first, last = out[episode][-1]
            assert start == last and start - first == int(r["part"]) * H * STRIDE
            out[episode][-1] = (first, end)
        else:
            out.setdefault(episode, []).append((start, end))
    return out


def parts(bounds) -> int:
    """Clips of segments (start, end): one per H * STRIDE steps begun."""
    return sum(-(-(end - start) // (H * STRIDE)) for start, end in bounds)


def clip_segment(record) -> tuple[int, int, int, list[int]]:
    """(fixture episode, start frame, end frame, frame steps) read from a clip's colours."""
    episode, start = F.decode_colour(record["context"][-1])
    steps = [F.decode_colour(f)[1] for f in record["frames"]]
    assert all(F.decode_colour(f)[0] == episode for f in record["frames"])
    return episode, start, steps[-1], steps


# ------------------------------------------------------------------------------- Bridge


def test_bridge_windows_follow_gripper_changes(sources, bridge_out):
    out, meta = bridge_out
    fx = sources["bridge"]
    for split, source_split in (("train", "train"), ("validation", "val")):
        rs = records(out, split)
        got = segments_of(rs)
        want = {e: boundaries_from_changes(F.BRIDGE_CHANGES[e], F.NUM_STEPS - 1)
                for e in fx.splits[source_split]}
        assert got == want
        assert meta.splits[split] == len(rs) == sum(parts(b) for b in want.values())
        for r in rs:
            episode, start, _, steps = clip_segment(r)
            assert int(r["episode_id"]) == episode  # source order: train 0..2, then val 3
            segment_end = got[episode][int(r["segment_index"])][1]
            np.testing.assert_array_equal(steps, expected_indices(start, segment_end))


def test_bridge_instructions_and_fallback(bridge_out):
    out, _ = bridge_out
    for split in ("train", "validation"):
        for r in records(out, split):
            episode = int(r["episode_id"])
            want = F.BRIDGE_TEXTS[episode] or "do the task"
            assert r["text"].decode() == want
    vocab = pathlib.Path(out, clip_dataset.TOKENIZER_FILE).read_text()
    for word in ("carrot", "drawer", "task"):
        assert f'"{word}"' in vocab
    assert '"wipe"' not in vocab  # validation words stay out of the tokenizer


def hand_projection(ee):
    """Pinhole projection by hand (f=50, c=32, camera = world + t), to 32x32 frame pixels."""
    cam = np.asarray(ee, np.float64) + F.CAMERA_T
    return [(50 * cam[0] / cam[2] + 32 + 0.5) * SIZE / 64,
            (50 * cam[1] / cam[2] + 32 + 0.5) * SIZE / 64]


def test_episodes_without_an_instruction_are_counted(bridge_out, fractal_out):
    _, meta = bridge_out  # episode 2 (train) has no instruction; its clips take the fallback
    assert meta.episodes["train"] == {"episodes": 3, "without_instruction": 1, "too_short": 0,
                                      "clips_without_text": 0}
    assert meta.episodes["validation"]["without_instruction"] == 0
    assert "1 episodes without an instruction (their clips use the fallback 'do the task')" in \
        rlds.ingest_summary(meta, "do the task")
    out, meta = fractal_out  # no fallback: the clips of its episode without text have none
    no_text = [r for s in meta.splits for r in records(out, s) if not r["text"]]
    counts = {k: sum(c[k] for c in meta.episodes.values()) for k in meta.episodes["train"]}
    assert counts == {"episodes": F.FRACTAL_EPISODES, "without_instruction": 1, "too_short": 0,
                      "clips_without_text": len(no_text)} and no_text
    assert "set the spec's fallback_instruction" in rlds.ingest_summary(meta)


def test_bridge_points_annotation_then_projection(sources, bridge_out):
    out, _ = bridge_out
    fx = sources["bridge"]
    scale = SIZE / 64  # 64x64 source, square: no crop, only a resize
    for split in ("train", "validation"):
        rs = records(out, split)
        segments = segments_of(rs)
        for r in rs:
            episode, start, _, _ = clip_segment(r)
            end = segments[episode][int(r["segment_index"])][1]  # the segment's goal frame
            ep = fx.episodes[episode]
            assert bool(r["sgg_valid"])
            if episode == F.BRIDGE_NO_ANNOTATION:  # no annotation: the calibration projects
                want = [hand_projection(ep.ee[start]), hand_projection(ep.ee[end])]
            elif int(r["part"]):  # a later clip starts where the projected gripper is
                want = [hand_projection(ep.ee[start]), ep.points[end] * scale]
            else:
                want = [ep.points[start] * scale, ep.points[end] * scale]
            np.testing.assert_allclose(r["start_xy"], want[0], atol=1e-4)
            np.testing.assert_allclose(r["goal_xy"], want[1], atol=1e-4)


def test_output_loads_with_clip_source(bridge_out):
    out, meta = bridge_out
    assert clip_dataset.DatasetMeta.load(out) == meta
    assert (meta.name, meta.action_dim, meta.gripper_dims) == ("bridge", 7, [6])
    assert meta.source.endswith("bridge_dataset/1.0.0")
    for split, count in meta.splits.items():
        src = clip_dataset.clip_source(out, split)
        assert len(src) == count
        r = src[0]
        assert r["context"].shape == (CTX, SIZE, SIZE, 3) and r["context"].dtype == np.uint8
        assert r["frames"].shape == (H, SIZE, SIZE, 3)
        assert r["actions"].shape == (H, STRIDE, 7) and r["actions"].dtype == np.float32
        assert r["action_valid"].shape == (H, STRIDE)
        assert r["start_xy"].dtype == np.float32


def test_no_points_means_sgg_invalid_and_no_tensorflow(sources, tmp_path):
    """The real Bridge spec (no annotation, no calibration), run with TensorFlow unimportable."""
    out = tmp_path / "plain"
    code = (
        "import sys\n"
        "class Hide:  # every import finder answers as if TensorFlow were not installed\n"
        "    def __init__(self, finder):\n"
        "        self.finder = finder\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'tensorflow':\n"
        "            return None\n"
        "        return self.finder.find_spec(name, path, target)\n"
        "    def __getattr__(self, attr):\n"
        "        return getattr(self.finder, attr)\n"
        "sys.meta_path[:] = [Hide(f) for f in sys.meta_path]\n"
        "from data_loaders import rlds\n"
        f"rlds.ingest(rlds.load_spec('configs/rlds/bridge.py'), {str(sources['bridge'].path)!r},"
        f" {str(out)!r}, horizon={H}, frame_stride={STRIDE}, context_frames={CTX}, image_size=16)\n"
        "assert 'tensorflow' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for split in ("train", "validation"):
        rs = records(out, split)
        assert rs and not any(bool(r["sgg_valid"]) for r in rs)
        assert all(np.all(r["start_xy"] == 0) for r in rs)


def test_array_record_source_and_calibration_from_keys(sources, bridge_out, tmp_path):
    fx = F.write_bridge(tmp_path / "ar", file_format="array_record")
    out = tmp_path / "clips"
    spec = bridge_spec(camera_intrinsics="episode_metadata/camera_intrinsics",
                       camera_extrinsics="episode_metadata/camera_extrinsics")
    rlds.ingest(spec, fx.path, out, **SHAPE)
    for split in ("train", "validation"):
        a, b = records(out, split), records(bridge_out[0], split)
        assert [clip_segment(r)[:3] for r in a] == [clip_segment(r)[:3] for r in b]
        np.testing.assert_allclose(np.stack([r["actions"] for r in a]),
                                   np.stack([r["actions"] for r in b]))
        segments = segments_of(a)
        for r in a:  # no annotation in this spec: every point is projected
            episode, start, _, _ = clip_segment(r)
            end = segments[episode][int(r["segment_index"])][1]  # the segment's goal frame
            ee = fx.episodes[episode].ee
            assert bool(r["sgg_valid"])
            np.testing.assert_allclose(r["start_xy"], hand_projection(ee[start]), atol=1e-4)
            np.testing.assert_allclose(r["goal_xy"], hand_projection(ee[end]), atol=1e-4)


# ------------------------------------------------------------------------------ fractal


def hand_actions(actions, start, end):
    """A clip's per-step actions by hand: steps start..end-1 with the (absolute) gripper
    command, then no-ops (no motion, the last command held) up to H * STRIDE steps."""
    absolute = actions.copy()
    t = np.arange(len(actions))
    absolute[:, 6] = 1.0 - ((t >= F.FRACTAL_CLOSE - 1) & (t < F.FRACTAL_OPEN - 1))
    out = np.zeros((H * STRIDE, 7), np.float32)
    out[:end - start] = absolute[start:end]
    out[end - start:, 6] = absolute[end - 1, 6]
    return out.reshape(H, STRIDE, 7)


def test_fractal_actions_segments_and_statistics(sources, fractal_out):
    out, meta = fractal_out
    fx = sources["fractal"]
    assert meta.action_dim == 7 and meta.gripper_dims == [6]
    want_bounds = [(0, F.FRACTAL_CLOSE), (F.FRACTAL_CLOSE, 11), (11, F.FRACTAL_OPEN),
                   (F.FRACTAL_OPEN, F.FRACTAL_STEPS - 1)]  # gripper changes + pause middle
    train_labels = []
    for split in ("train", "validation"):
        rs = records(out, split)
        by_episode = segments_of(rs)
        for r in rs:
            episode, start, end, _ = clip_segment(r)
            # world_vector, rotation_delta, gripper_closedness_action, in that order.
            want = hand_actions(fx.episodes[episode].actions, start,
                                min(start + H * STRIDE, end))
            np.testing.assert_allclose(r["actions"], want, atol=1e-5)
            if split == "train":
                train_labels.append(want[r["action_valid"]])
        assert all(b == want_bounds for b in by_episode.values())
    stats = clip_dataset.load_statistics(out)
    labels = np.concatenate(train_labels).astype(np.float64)
    np.testing.assert_allclose(stats.mean, labels.mean(0), atol=1e-5)
    np.testing.assert_allclose(stats.std, labels.std(0), atol=1e-5)
    assert stats.normalize_mask.tolist() == [True] * 6 + [False]


def test_fractal_holdout_crop_and_missing_instruction(fractal_out):
    out, meta = fractal_out
    held = rlds.holdout_indices(F.FRACTAL_EPISODES, 0.05, 0)
    assert len(held) == 1 and held == rlds.holdout_indices(F.FRACTAL_EPISODES, 0.05, 0)
    episodes = {s: {int(r["episode_id"]) for r in records(out, s)} for s in meta.splits}
    assert episodes["validation"] == set(held)
    assert episodes["train"] == set(range(F.FRACTAL_EPISODES)) - set(held)
    for split in meta.splits:
        for r in records(out, split):
            assert int(r["episode_id"]) == clip_segment(r)[0]
            # The 48x64 camera's blue side bands are cropped away, the square is kept whole.
            assert np.all(r["frames"][..., 2] == 64) and np.all(r["context"][..., 2] == 64)
            e = int(r["episode_id"])
            assert r["text"].decode() == ("" if e == F.FRACTAL_NO_TEXT else f"pick coke can {e}")
            assert not r["sgg_valid"]


# ------------------------------------------------------------------------------- errors


def test_wrong_key_lists_available_keys(sources, tmp_path):
    for field, key in (("image_key", "observation/image"),
                       ("wrist_image_key", "observation/wrist_image"),
                       ("action_keys", ("action/world_vector",)),
                       ("instruction_key", "observation/natural_language_instruction")):
        with pytest.raises(rlds.RldsError) as err:
            rlds.ingest(bridge_spec(**{field: key}), sources["bridge"].path, tmp_path / "x",
                        **SHAPE)
        message = str(err.value)
        assert field in message and "names no feature" in message
        for available in ("observation/image_0", "observation/state", "language_instruction",
                          "episode_metadata/has_language"):
            assert available in message
    assert not (tmp_path / "x").exists()
    with pytest.raises(rlds.RldsError, match="gripper_dims"):
        rlds.ingest(bridge_spec(gripper_dims=(7,)), sources["bridge"].path, tmp_path / "x",
                    **SHAPE)
    with pytest.raises(rlds.RldsError, match="unknown spec field"):
        rlds.check_spec({**bridge_spec().to_dict(), "image_kye": "x"})


def test_existing_output_is_not_overwritten(sources, tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(clip_dataset.DatasetError, match="already exists"):
        rlds.ingest(bridge_spec(), sources["bridge"].path, out, **SHAPE)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_corrupt_records_name_file_and_index(sources, tmp_path):
    src = sources["bridge"].path
    shard_name = "bridge_dataset-train.tfrecord-00000-of-00001"
    # Damaged data in record 0 (its bytes no longer parse).
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    data = bytearray((broken / shard_name).read_bytes())
    data[12:40] = b"\xff" * 28
    (broken / shard_name).write_bytes(bytes(data))
    with pytest.raises(rlds.RldsError, match=rf"{shard_name}: record 0 "):
        rlds.ingest(bridge_spec(), broken, tmp_path / "o1", **SHAPE)
    # A file cut inside record 1.
    cut = tmp_path / "cut"
    shutil.copytree(src, cut)
    data = (cut / shard_name).read_bytes()
    first = int.from_bytes(data[:8], "little") + 16
    (cut / shard_name).write_bytes(data[:first + 100])
    with pytest.raises(rlds.RldsError, match=rf"{shard_name}: record 1 .*truncated") as e:
        rlds.ingest(bridge_spec(), cut, tmp_path / "o2", **SHAPE)
    assert f"copy or download {shard_name} again" in str(e.value)
    # A damaged length field in record 1 (its CRC no longer matches).
    (cut / shard_name).write_bytes(data[:first] + bytes([data[first] ^ 1]) + data[first + 1:])
    with pytest.raises(rlds.RldsError, match=rf"{shard_name}: record 1 .*length field") as e:
        rlds.ingest(bridge_spec(), cut, tmp_path / "o3", **SHAPE)
    assert f"copy or download {shard_name} again" in str(e.value)
    assert all(_nothing_written(tmp_path / o) for o in ("o1", "o2", "o3"))


def _bridge_copy(sources, tmp_path, name: str) -> tuple[pathlib.Path, pathlib.Path, bytes]:
    """A copy of the Bridge source: its directory, its train shard's path and bytes."""
    copy = tmp_path / name
    shutil.copytree(sources["bridge"].path, copy)
    shard = copy / "bridge_dataset-train.tfrecord-00000-of-00001"
    return copy, shard, shard.read_bytes()


def _nothing_written(out: pathlib.Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_a_changed_value_in_an_intact_record_stops_ingestion(sources, tmp_path):
    # One action float of episode 1 (record 1 of the train shard) becomes 1e6; the framing
    # (length field and its CRC) is untouched, only the payload's CRC no longer matches.
    copy, shard, data = _bridge_copy(sources, tmp_path, "changed")
    record_1 = int.from_bytes(data[:8], "little") + 16  # byte offset of record 1
    value = np.float32(F.bridge_episode(1)[1].actions[3, 0]).tobytes()
    at = data.index(value, record_1)
    shard.write_bytes(data[:at] + np.float32(1e6).tobytes() + data[at + 4:])
    out = tmp_path / "clips"
    with pytest.raises(rlds.RldsError) as error:
        rlds.ingest(bridge_spec(), copy, out, **SHAPE)
    message = str(error.value)
    assert f"{shard}: record 1 (byte {record_1}) is corrupt" in message
    assert "payload fails its CRC-32C check" in message
    assert f"copy or download {shard.name} again" in message
    assert _nothing_written(out)


def test_an_undecodable_image_names_the_record_and_the_fix(sources, tmp_path):
    # A record stored with a broken JPEG (its CRCs rewritten to match: it was written so).
    copy, shard, data = _bridge_copy(sources, tmp_path, "bad_jpeg")
    length = int.from_bytes(data[:8], "little")
    record = bytearray(data[12:12 + length])
    jpeg = record.index(b"\xff\xd8\xff")  # the first JPEG image (a frame of image_0)
    record[jpeg:jpeg + 64] = b"\x00" * 64
    framed = (data[:12] + bytes(record)
              + np.uint32(rlds.masked_crc32c(bytes(record))).tobytes())
    shard.write_bytes(framed + data[16 + length:])
    out = tmp_path / "clips"
    with pytest.raises(rlds.RldsError, match=rf"{shard.name}: record 0 cannot be decoded") as e:
        rlds.ingest(bridge_spec(), copy, out, **SHAPE)
    assert "pass their checksum" in str(e.value) and "copy or download" in str(e.value)
    assert _nothing_written(out)


def test_missing_source_and_spec_file(tmp_path):
    with pytest.raises(rlds.RldsError, match="no RLDS dataset"):
        rlds.ingest(bridge_spec(), tmp_path / "nothing", tmp_path / "o", **SHAPE)
    with pytest.raises(rlds.RldsError, match="RLDS spec: config file .*nope.py.* not found"):
        rlds.load_spec(tmp_path / "nope.py")


# -------------------------------------------------------------------- episodes and points


def test_fixed_windows_when_no_signals_are_sgg_invalid():
    n = 21  # 20 steps
    ep = rlds.Episode(frames=np.zeros((n, 4, 4, 3), np.uint8),
                      actions=np.ones((n - 1, 2), np.float32), instructions=["go"] * n,
                      gripper=None, ee_position=None,
                      start_xy=np.ones((n, 2), np.float32), goal_xy=np.ones((n, 2), np.float32),
                      projected_xy=None)
    spec = rlds.check_spec({"name": "x", "image_key": "i", "action_keys": ["a"]})
    clips = rlds.episode_clips(ep, episode_id=3, spec=spec, horizon=4, frame_stride=2,
                               context_frames=1, image_size=4)
    assert [c.segment_index for c in clips] == [0, 1, 2]
    assert [c.actions[..., 0].sum() for c in clips] == [8, 8, 4]  # windows (0,8) (8,16) (16,20)
    assert not any(c.sgg_valid for c in clips)


def test_square_frame_and_point_move_together():
    img = np.zeros((40, 60, 3), np.uint8)
    img[10, 25] = 255  # source pixel (x=25, y=10): centre (25.5, 10.5)
    frame = rlds.square_frame(img, 40)
    assert frame.shape == (40, 40, 3) and frame[10, 15, 0] == 255  # crop starts at x=10
    np.testing.assert_allclose(rlds.square_point([25.5, 10.5], 40, 60, 40), [15.5, 10.5])
    np.testing.assert_allclose(rlds.square_point([25.5, 10.5], 40, 60, 20), [7.75, 5.25])
    uv, front = project_points(np.array([[0.0, 0.0, 2.0], [0, 0, -1]]), np.array(K),
                                    np.eye(4))
    np.testing.assert_allclose(uv[0], [32.5, 32.5])
    assert front.tolist() == [True, False]


def test_relative_gripper_commands_become_absolute():
    got = rlds.relative_to_absolute_gripper(np.array([0, 0, 1, 0, 0, -1, 0, 1.0]))
    np.testing.assert_array_equal(got, [1, 1, 0, 0, 0, 1, 1, 0])  # starts open: first closes
    got = rlds.relative_to_absolute_gripper(np.array([0, -1, 0, 0.0]))
    np.testing.assert_array_equal(got, [0, 1, 1, 1])
    np.testing.assert_array_equal(rlds.relative_to_absolute_gripper(np.zeros(3)), [1, 1, 1])


# ----------------------------------------------------------------------------- segmenter


def test_segmenter_cuts_at_gripper_changes():
    g = np.array([1] * 5 + [0] * 6 + [1] * 5, float)  # 16 frames, 15 steps
    seg = S.segment_episode(15, gripper=g, window=8)
    assert seg.from_signals and seg.bounds == [(0, 5), (5, 11), (11, 15)]
    # A continuous reading binarised at the threshold; (N, 1) shapes work the same.
    seg = S.segment_episode(15, gripper=(0.2 + 0.6 * g)[:, None], window=8,
                            config=S.SegmenterConfig(gripper_threshold=0.5))
    assert seg.bounds == [(0, 5), (5, 11), (11, 15)]


def test_segmenter_cuts_at_interior_pauses_only():
    speeds = [0] * 4 + [1] * 5 + [0] * 4 + [1] * 5 + [0] * 2 + [1] * 4 + [0] * 5  # 29 steps
    x = np.concatenate([[0.0], np.cumsum(speeds)]) * 0.01
    pos = np.stack([x, np.zeros_like(x)], 1)
    seg = S.segment_episode(29, ee_position=pos, window=8,
                            config=S.SegmenterConfig(pause_speed=1e-3, pause_steps=3,
                                                     min_segment_steps=2))
    # Pauses: steps 0-3 (start: idle, no cut), 9-12 (cut at frame 11), 18-19 (too short),
    # 24-28 (end: no cut).
    assert seg.bounds == [(0, 11), (11, 29)]
    np.testing.assert_array_equal(S.pause_frames(pos, 1e-3, 2), [11, 19])


def test_segmenter_merges_short_segments():
    g = np.array([1] * 6 + [0] + [1] * 9, float)  # a one-frame flicker at frame 6
    seg = S.segment_episode(15, gripper=g, window=8, config=S.SegmenterConfig(min_segment_steps=3))
    assert seg.bounds == [(0, 7), (7, 15)]  # (6, 7) merged into its shorter neighbour (0, 6)
    assert S.merge_short(np.array([2, 4, 10]), 12, 3) == [(0, 4), (4, 12)]
    assert S.merge_short(np.array([1]), 12, 3) == [(0, 12)]
    assert S.merge_short(np.array([]), 2, 3) == [(0, 2)]  # a short episode stays whole


def test_segmenter_fallback_windows_and_combined_signals():
    seg = S.segment_episode(20, window=8)
    assert not seg.from_signals and seg.bounds == [(0, 8), (8, 16), (16, 20)]
    assert S.segment_episode(17, window=8).bounds == [(0, 8), (8, 17)]  # 1-step tail merged
    g = np.array([1] * 10 + [0] * 11, float)
    pos = np.stack([np.concatenate([np.arange(15), [14] * 6])], 1) * 0.1  # still from frame 14
    seg = S.segment_episode(20, gripper=g, ee_position=pos, window=8)
    assert seg.bounds == [(0, 10), (10, 20)]  # the final stillness is not a cut
    pos = np.stack([np.concatenate([np.arange(5), [4] * 5, np.arange(5, 16)])], 1) * 0.1
    seg = S.segment_episode(20, gripper=g, ee_position=pos, window=8)
    assert seg.bounds == [(0, 6), (6, 10), (10, 20)]  # pause frames 4..9 -> 6, gripper -> 10
    with pytest.raises(ValueError, match="one value per frame"):
        S.segment_episode(20, gripper=g[:-1], window=8)
