"""Tiny RLDS datasets in the real Bridge (`bridge_dataset`) and fractal (`fractal20220817_data`)
feature layouts, written with TFDS, for the RLDS ingestion tests.

Every frame encodes where it came from, so a test can tell which source frame a clip holds:
red = 5 + 10 * step, green = 10 + 20 * episode (uniform over the camera's visible square). The
fractal camera is 48x64 (like its real 256x320, wider than tall): its side bands, which a centre
crop removes, are blue 255 instead of 64.

TFRecord writing needs TensorFlow in TFDS; when TensorFlow is not installed, the writer is
replaced (during the write only) by a small pure-Python TFRecord writer producing the standard
format (length, masked CRC-32C of the length, data, masked CRC-32C of the data).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import pathlib
import struct

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_loaders.rlds import masked_crc32c

NUM_STEPS = 21  # steps per bridge episode (frames 0..20, 20 actions)
FRACTAL_STEPS = 20

# Bridge: gripper opening per frame changes at these frames (1 open -> 0 closed -> 1 ...).
BRIDGE_CHANGES = {0: [7, 14], 1: [12], 2: [5, 15], 3: [8]}
BRIDGE_TEXTS = {0: "put the carrot in the pot", 1: "open the drawer", 2: "", 3: "wipe the table"}
BRIDGE_SPLITS = {"train": [0, 1, 2], "val": [3]}
BRIDGE_NO_ANNOTATION = 1  # this episode's point annotations are missing (-1)
# A known camera for the 64x64 Bridge image: world-to-camera is a translation.
CAMERA_K = [[50.0, 0.0, 32.0], [0.0, 50.0, 32.0], [0.0, 0.0, 1.0]]
CAMERA_T = (-0.3, -0.15, 0.5)
CAMERA_E = [[1.0, 0.0, 0.0, CAMERA_T[0]], [0.0, 1.0, 0.0, CAMERA_T[1]],
            [0.0, 0.0, 1.0, CAMERA_T[2]], [0.0, 0.0, 0.0, 1.0]]

# Fractal: gripper closed from frame 5 to 15, arm still over frames 9..13 (pause -> cut at 11).
FRACTAL_CLOSE, FRACTAL_OPEN, FRACTAL_PAUSE = 5, 16, (9, 13)
FRACTAL_EPISODES = 6
FRACTAL_NO_TEXT = 3


def red(step: int) -> int:
    return 5 + 10 * step


def green(episode: int) -> int:
    return 10 + 20 * episode


def decode_colour(frame: np.ndarray) -> tuple[int, int]:
    """(episode, step) of a fixture frame (from its centre pixel)."""
    r, g = (float(v) for v in frame[frame.shape[0] // 2, frame.shape[1] // 2, :2])
    return round((g - 10) / 20), round((r - 5) / 10)


@dataclasses.dataclass
class FixtureEpisode:
    """Ground truth of one written episode."""

    episode: int
    actions: np.ndarray  # (N, 7): the spec's assembled action, before gripper conversion
    ee: np.ndarray  # (N, 3) end-effector position
    gripper: np.ndarray  # (N,) gripper state per frame
    text: str
    points: np.ndarray | None = None  # (N, 2) annotated (x, y) in source pixels (-1: missing)


@dataclasses.dataclass
class Fixture:
    path: pathlib.Path  # the TFDS version directory
    episodes: dict[int, FixtureEpisode]
    splits: dict[str, list[int]]


def _uniform(height: int, width: int, episode: int, step: int, band: int = 0) -> np.ndarray:
    img = np.empty((height, width, 3), np.uint8)
    img[...] = (red(step), green(episode), 64)
    if band:
        img[:, :band, 2] = 255
        img[:, width - band:, 2] = 255
    return img


# ------------------------------------------------------------------------------ bridge


def bridge_episode(e: int) -> tuple[dict, FixtureEpisode]:
    rng = np.random.default_rng(100 + e)
    t = np.arange(NUM_STEPS)
    gripper = np.ones(NUM_STEPS, np.float32)
    for i, c in enumerate(BRIDGE_CHANGES[e]):
        gripper[c:] = float(i % 2 == 1)  # first change closes (0), second opens (1)
    ee = np.stack([0.20 + 0.01 * t, -0.05 + 0.02 * t, 0.10 + 0.005 * t], 1).astype(np.float32)
    actions = rng.normal(0, 0.01, (NUM_STEPS, 7)).astype(np.float32)
    actions[:-1, 6] = gripper[1:]  # command at step t: the gripper state at frame t+1
    actions[-1, 6] = gripper[-1]
    points = np.stack([10.0 + t, 20.0 + 0.5 * t], 1).astype(np.float32)
    if e == BRIDGE_NO_ANNOTATION:
        points[:] = -1.0
    text = BRIDGE_TEXTS[e]
    steps = []
    for i in range(NUM_STEPS):
        state = np.concatenate([ee[i], np.zeros(3, np.float32), [gripper[i]]]).astype(np.float32)
        steps.append({
            "observation": {
                "image_0": Image.fromarray(_uniform(64, 64, e, i)),
                "image_1": Image.fromarray(np.full((64, 64, 3), 7 * i % 256, np.uint8)),
                "state": state,
                "tcp_point_2d": points[i],  # an ECoT-style annotation (not in real Bridge)
            },
            "action": actions[i],
            "language_instruction": text,
            "language_embedding": np.zeros(8, np.float32),
            "is_first": i == 0, "is_last": i == NUM_STEPS - 1, "is_terminal": i == NUM_STEPS - 1,
            "reward": float(i == NUM_STEPS - 1), "discount": 1.0,
        })
    example = {"steps": steps, "episode_metadata": {
        "file_path": f"/raw/bridge/{e}/out.npy", "episode_id": e, "has_image_0": True,
        "has_image_1": True, "has_language": bool(text),
        "camera_intrinsics": np.asarray(CAMERA_K, np.float32),
        "camera_extrinsics": np.asarray(CAMERA_E, np.float32)}}
    return example, FixtureEpisode(e, actions, ee, gripper, text, points)


class _BridgeDataset(tfds.core.GeneratorBasedBuilder):
    """The `bridge_dataset` layout (rail-berkeley release), 64x64 cameras."""

    name = "bridge_dataset"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        t = tfds.features
        image = lambda fmt: t.Image(shape=(64, 64, 3), dtype=np.uint8, encoding_format=fmt)
        # disable_shuffling: the episodes stay in generation order.
        return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                     features=t.FeaturesDict({
            "steps": t.Dataset({
                "observation": t.FeaturesDict({
                    "image_0": image("jpeg"),
                    "image_1": image("png"),
                    "state": t.Tensor(shape=(7,), dtype=np.float32),
                    "tcp_point_2d": t.Tensor(shape=(2,), dtype=np.float32),
                }),
                "action": t.Tensor(shape=(7,), dtype=np.float32),
                "language_instruction": t.Text(),
                "language_embedding": t.Tensor(shape=(8,), dtype=np.float32),
                "is_first": t.Scalar(dtype=np.bool_),
                "is_last": t.Scalar(dtype=np.bool_),
                "is_terminal": t.Scalar(dtype=np.bool_),
                "reward": t.Scalar(dtype=np.float32),
                "discount": t.Scalar(dtype=np.float32),
            }),
            "episode_metadata": t.FeaturesDict({
                "file_path": t.Text(),
                "episode_id": t.Scalar(dtype=np.int32),
                "has_image_0": t.Scalar(dtype=np.bool_),
                "has_image_1": t.Scalar(dtype=np.bool_),
                "has_language": t.Scalar(dtype=np.bool_),
                # A calibration (not in real Bridge), for projection from keys.
                "camera_intrinsics": t.Tensor(shape=(3, 3), dtype=np.float32),
                "camera_extrinsics": t.Tensor(shape=(4, 4), dtype=np.float32),
            }),
        }))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(eps) for split, eps in BRIDGE_SPLITS.items()}

    def _generate_examples(self, episodes):
        for e in episodes:
            yield f"episode_{e}", bridge_episode(e)[0]


# ----------------------------------------------------------------------------- fractal


def fractal_episode(e: int) -> tuple[dict, FixtureEpisode]:
    rng = np.random.default_rng(200 + e)
    n = FRACTAL_STEPS
    gripper = np.zeros(n, np.float32)  # gripper_closed
    gripper[FRACTAL_CLOSE:FRACTAL_OPEN] = 1.0
    speed = np.full(n - 1, 0.02)
    speed[FRACTAL_PAUSE[0]:FRACTAL_PAUSE[1]] = 0.0  # frames 9..13 at the same pose
    x = np.concatenate([[0.5], 0.5 + np.cumsum(speed)])
    ee = np.stack([x, np.full(n, 0.1), np.full(n, 0.3)], 1).astype(np.float32)
    world = rng.normal(0, 0.05, (n, 3)).astype(np.float32)
    rot = rng.normal(0, 0.1, (n, 3)).astype(np.float32)
    grip_cmd = np.zeros((n, 1), np.float32)  # relative: +1 close, -1 open
    grip_cmd[FRACTAL_CLOSE - 1] = 1.0
    grip_cmd[FRACTAL_OPEN - 1] = -1.0
    text = "" if e == FRACTAL_NO_TEXT else f"pick coke can {e}"
    steps = []
    for i in range(n):
        pose = np.concatenate([ee[i], [0, 0, 0, 1]]).astype(np.float32)
        steps.append({
            "observation": {
                "image": Image.fromarray(_uniform(48, 64, e, i, band=8)),
                "natural_language_instruction": text,
                "natural_language_embedding": np.zeros(8, np.float32),
                "base_pose_tool_reached": pose,
                "gripper_closed": gripper[i:i + 1],
                "height_to_bottom": np.array([0.2], np.float32),
            },
            "action": {
                "world_vector": world[i], "rotation_delta": rot[i],
                "gripper_closedness_action": grip_cmd[i],
                "terminate_episode": np.array([0, 1, 0], np.int32),
                "base_displacement_vector": np.zeros(2, np.float32),
                "base_displacement_vertical_rotation": np.zeros(1, np.float32),
            },
            "is_first": i == 0, "is_last": i == n - 1, "is_terminal": i == n - 1,
            "reward": float(i == n - 1),
        })
    actions = np.concatenate([world, rot, grip_cmd], 1)
    return {"steps": steps}, FixtureEpisode(e, actions, ee, gripper, text)


class _Fractal(tfds.core.GeneratorBasedBuilder):
    """The `fractal20220817_data` layout (Open X-Embodiment RT-1 release), 48x64 camera."""

    name = "fractal20220817_data"
    VERSION = tfds.core.Version("0.1.0")

    def _info(self) -> tfds.core.DatasetInfo:
        t = tfds.features
        # disable_shuffling: the episodes stay in generation order.
        return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                     features=t.FeaturesDict({
            "steps": t.Dataset({
                "observation": t.FeaturesDict({
                    "image": t.Image(shape=(48, 64, 3), dtype=np.uint8),
                    "natural_language_instruction": t.Tensor(shape=(), dtype=np.str_),
                    "natural_language_embedding": t.Tensor(shape=(8,), dtype=np.float32),
                    "base_pose_tool_reached": t.Tensor(shape=(7,), dtype=np.float32),
                    "gripper_closed": t.Tensor(shape=(1,), dtype=np.float32),
                    "height_to_bottom": t.Tensor(shape=(1,), dtype=np.float32),
                }),
                "action": t.FeaturesDict({
                    "world_vector": t.Tensor(shape=(3,), dtype=np.float32),
                    "rotation_delta": t.Tensor(shape=(3,), dtype=np.float32),
                    "gripper_closedness_action": t.Tensor(shape=(1,), dtype=np.float32),
                    "terminate_episode": t.Tensor(shape=(3,), dtype=np.int32),
                    "base_displacement_vector": t.Tensor(shape=(2,), dtype=np.float32),
                    "base_displacement_vertical_rotation": t.Tensor(shape=(1,),
                                                                    dtype=np.float32),
                }),
                "is_first": t.Tensor(shape=(), dtype=np.bool_),
                "is_last": t.Tensor(shape=(), dtype=np.bool_),
                "is_terminal": t.Tensor(shape=(), dtype=np.bool_),
                "reward": t.Scalar(dtype=np.float32),
            }),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(range(FRACTAL_EPISODES))}

    def _generate_examples(self, episodes):
        for e in episodes:
            yield f"episode_{e}", fractal_episode(e)[0]


# ------------------------------------------------------------------------------ writing


def _write_tfrecord(cls, path, iterator):
    """Pure-Python stand-in for TFDS's tf.io.TFRecordWriter (standard TFRecord framing)."""
    del cls
    with open(os.fspath(path), "wb") as f:
        for _, record in iterator:
            length = struct.pack("<Q", len(record))
            f.write(length + struct.pack("<I", masked_crc32c(length)) + record
                    + struct.pack("<I", masked_crc32c(record)))


@contextlib.contextmanager
def _tfrecord_writer():
    if importlib.util.find_spec("tensorflow") is not None:
        yield  # TFDS's own writer
        return
    adapter = tfds.core.file_adapters.TfRecordFileAdapter
    original = adapter.__dict__["write_examples"]
    adapter.write_examples = classmethod(_write_tfrecord)
    try:
        yield
    finally:
        adapter.write_examples = original


def write_builder(builder_cls, root: pathlib.Path, file_format: str) -> pathlib.Path:
    """Writes a TFDS builder's dataset under `root` (TFRecord without TensorFlow as well);
    returns its version directory."""
    builder = builder_cls(data_dir=str(root), file_format=file_format)
    with _tfrecord_writer():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(verify_ssl=False))
    return pathlib.Path(builder.data_dir)


def write_bridge(root: pathlib.Path, file_format: str = "tfrecord") -> Fixture:
    """Writes the Bridge-layout fixture under `root`; its version directory and ground truth."""
    path = write_builder(_BridgeDataset, root, file_format)
    episodes = {e: bridge_episode(e)[1] for e in BRIDGE_CHANGES}
    return Fixture(path, episodes, dict(BRIDGE_SPLITS))


def write_fractal(root: pathlib.Path) -> Fixture:
    """Writes the fractal-layout fixture (train split only) under `root`."""
    path = write_builder(_Fractal, root, "tfrecord")
    episodes = {e: fractal_episode(e)[1] for e in range(FRACTAL_EPISODES)}
    return Fixture(path, episodes, {"train": list(range(FRACTAL_EPISODES))})
