"""RLDS ingestion: any RLDS dataset directory -> a primitive clip dataset (`clip_dataset`).

    meta = ingest(load_spec("configs/rlds/bridge.py"), "/data/bridge_dataset/1.0.0", "/data/clips",
                  horizon=8, frame_stride=2, context_frames=1, image_size=64)

The source is read with `tfds.builder_from_directory` and its own feature spec; records are
read shard by shard through `etils.epath` (so a `gs://` path reads the same way) and decoded
with NumPy and PIL: TensorFlow is not needed. Both TFRecord (the Open X-Embodiment releases)
and array_record shards are read.

A small per-dataset spec (an ml_collections `get_config()` file, `configs/rlds/*.py`) says
where things are. Key paths name a feature inside each step (`observation/image_0`,
`action/world_vector`); a path whose first part is not a step feature but an episode feature
(`episode_metadata/...`) is read once per episode. A path may end in an index or slice of its
last axis: `observation/state[6]`, `observation/state[0:3]`. Fields (defaults in `SPEC_DEFAULTS`):

    name                 dataset name (DatasetMeta.name)
    image_key            the camera the clips are cut from (an Image, or a uint8 HxWx3 Tensor)
    wrist_image_key      optional wrist camera: checked to exist, not used for clips
    action_keys          action parts concatenated in this order (scalars count as one dim)
    gripper_dims         dims of the concatenated action that are gripper commands
    gripper_actions      'absolute' (a gripper state command) or 'relative' (+1 close, -1 open,
                         0 keep: converted to absolute, 1 open / 0 closed)
    instruction_key      the instruction ('' : none); read at each segment's first step
    fallback_instruction text used where an episode has no (or an empty) instruction
    gripper_state_key    optional gripper reading per step, for the segmenter
    ee_position_key      optional end-effector position per step (segmenter, projection)
    start_point_key,     optional start/goal point annotations ((2,) pixels of the camera
    goal_point_key         image, origin top-left, pixel centres at +0.5), read at a segment's
                           first and last frame; a non-finite or negative value is "missing"
    point_order          'xy' or 'yx': the order of the annotation's two numbers
    camera_intrinsics    optional 3x3 matrix (pixels of the camera image), or a key
    camera_extrinsics    optional 4x4 world-to-camera matrix (frame of ee_position), or a key
    segmenter            SegmenterConfig thresholds (pewm_jax/segmenter.py)
    val_fraction         episodes held out for validation when the source has only 'train'
    split_seed           seed of that hold-out

Segments come from the shared segmenter (gripper changes, end-effector pauses); without either
signal an episode is cut into fixed windows of horizon * frame_stride steps, with
`sgg_valid=False`. Start/goal points, in order: the annotation when present; else the
end-effector position at the segment's first and last frame projected with the calibration
(OpenCV pinhole convention, pixel centres at integers, shifted by +0.5 to ours); else
`sgg_valid=False`. Frames are centre-cropped to a square and resized to `image_size`; points
move with them, and a point outside the crop leaves the clip `sgg_valid=False`.

Splits: source 'train' -> train; 'val', 'validation' and 'test' -> validation. When the source
has only 'train', `val_fraction` of its episodes (a seeded permutation: deterministic) are held
out as validation. An RLDS episode of N steps gives N frames and N-1 actions (step i's action
leads from frame i to frame i+1; the last step's action has no next frame and is dropped).
A clip's text is its episode's instruction at the segment's first step (or the fallback); the
tokenizer is built from the train clips' texts plus the fallback, so it holds the train split's
task instructions.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
import struct
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import google_crc32c
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tqdm import tqdm

from pewm_jax import segmenter as segmenter_lib
from pewm_jax.camera import project_points
from data_loaders import transforms
from data_loaders.clip_dataset import DatasetError, DatasetMeta, write_dataset
from data_loaders.clips import Clip, clip_bounds, cut_clips
from pewm_jax import config as config_lib

SPLIT_MAP = {"train": "train", "val": "validation", "validation": "validation",
             "test": "validation"}

SPEC_DEFAULTS: dict[str, Any] = {
    "name": "",
    "image_key": "",
    "wrist_image_key": "",
    "action_keys": (),
    "gripper_dims": (),
    "gripper_actions": "absolute",
    "instruction_key": "",
    "fallback_instruction": "",
    "gripper_state_key": "",
    "ee_position_key": "",
    "start_point_key": "",
    "goal_point_key": "",
    "point_order": "xy",
    "camera_intrinsics": "",
    "camera_extrinsics": "",
    "segmenter": dataclasses.asdict(segmenter_lib.SegmenterConfig()),
    "val_fraction": 0.05,
    "split_seed": 0,
}
_REQUIRED = ("name", "image_key", "action_keys")


class RldsError(DatasetError):
    """A spec that does not fit its source, or a source that cannot be read."""


# --------------------------------------------------------------------------------- the spec


def load_spec(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Loads a spec file (a Python file with `get_config()`), fills defaults and checks it."""
    path = os.fspath(path)
    try:
        get_config = config_lib.config_file_function(path, "configs/rlds/bridge.py")
    except config_lib.ConfigError as e:
        raise RldsError(f"RLDS spec: {e}") from None
    return check_spec(get_config(), where=path)


def check_spec(spec: Mapping[str, Any] | ml_collections.ConfigDict,
               where: str = "the spec") -> ml_collections.ConfigDict:
    """The spec with defaults filled in; RldsError naming unknown, missing or invalid fields."""
    given = spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else dict(spec)
    unknown = sorted(set(given) - set(SPEC_DEFAULTS))
    if unknown:
        raise RldsError(f"{where}: unknown spec field(s) {unknown}; the fields are "
                        f"{sorted(SPEC_DEFAULTS)}")
    merged = {**SPEC_DEFAULTS, **given}
    seg = {**SPEC_DEFAULTS["segmenter"], **dict(given.get("segmenter", {}))}
    unknown_seg = sorted(set(seg) - set(SPEC_DEFAULTS["segmenter"]))
    if unknown_seg:
        raise RldsError(f"{where}: unknown segmenter field(s) {unknown_seg}; the fields are "
                        f"{sorted(SPEC_DEFAULTS['segmenter'])}")
    merged["segmenter"] = seg
    for field in _REQUIRED:
        if not merged[field]:
            raise RldsError(f"{where}: spec field {field!r} is required")
    if isinstance(merged["action_keys"], str):
        merged["action_keys"] = (merged["action_keys"],)
    merged["action_keys"] = tuple(merged["action_keys"])
    merged["gripper_dims"] = tuple(int(d) for d in merged["gripper_dims"])
    if merged["gripper_actions"] not in ("absolute", "relative"):
        raise RldsError(f"{where}: gripper_actions must be 'absolute' or 'relative', got "
                        f"{merged['gripper_actions']!r}")
    if merged["point_order"] not in ("xy", "yx"):
        raise RldsError(f"{where}: point_order must be 'xy' or 'yx', got "
                        f"{merged['point_order']!r}")
    if bool(merged["start_point_key"]) != bool(merged["goal_point_key"]):
        raise RldsError(f"{where}: give both start_point_key and goal_point_key, or neither")
    if bool(_given(merged["camera_intrinsics"])) != bool(_given(merged["camera_extrinsics"])):
        raise RldsError(f"{where}: give both camera_intrinsics and camera_extrinsics, or neither")
    if _given(merged["camera_intrinsics"]) and not merged["ee_position_key"]:
        raise RldsError(f"{where}: projecting points with the camera calibration needs "
                        "ee_position_key")
    if not 0.0 <= float(merged["val_fraction"]) < 1.0:
        raise RldsError(f"{where}: val_fraction must be in [0, 1), got {merged['val_fraction']}")
    try:
        segmenter_lib.SegmenterConfig(**seg)
    except (TypeError, ValueError) as e:
        raise RldsError(f"{where}: segmenter: {e}") from e
    return ml_collections.ConfigDict(merged)


def _given(value: Any) -> bool:
    """Whether an optional spec value (key string or matrix) is set."""
    return bool(value) if isinstance(value, str) else value is not None and len(value) > 0


# ----------------------------------------------------------------------- keys and features

_KEY_RE = re.compile(r"^(?P<path>[^\[\]]+?)(?:\[(?P<a>-?\d*)(?P<colon>:)?(?P<b>-?\d*)\])?$")


@dataclasses.dataclass(frozen=True)
class _Key:
    """A resolved key path: where the value lives and which part of its last axis to take."""

    text: str  # as the spec wrote it
    path: tuple[str, ...]
    episode_level: bool  # read from the episode, not from each step
    index: int | slice | None
    feature: Any  # the tfds feature

    def take(self, value: Any) -> np.ndarray:
        """The (indexed) numpy value: text decoded to str, scalars as 0-d arrays."""
        if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "OSU":
            value = value.item()
        if isinstance(value, bytes):
            return np.asarray(value.decode("utf-8"))
        value = np.asarray(value)
        if self.index is not None:
            value = value[..., self.index]
        return value

    def get(self, tree: Mapping[str, Any]) -> np.ndarray:
        for part in self.path:
            tree = tree[part]
        return self.take(tree)


def _leaves(feature: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(feature, tfds.features.FeaturesDict):
        for name in feature.keys():
            yield from _leaves(feature[name], prefix + (name,))
    else:
        yield prefix, feature


class _Features:
    """The step and episode features of an RLDS source, for resolving spec keys."""

    def __init__(self, features: tfds.features.FeaturesDict, source: str):
        self.source = source
        if "steps" not in features.keys() or not isinstance(features["steps"],
                                                               tfds.features.Dataset):
            raise RldsError(f"{source} is not an RLDS dataset: it has no 'steps' Dataset "
                            f"feature (top-level features: {sorted(features.keys())})")
        self.step = dict(_leaves(features["steps"].feature))
        self.episode = {p: f for p, f in _leaves(features) if p[0] != "steps"}

    def listing(self) -> str:
        step = ", ".join("/".join(p) for p in sorted(self.step))
        episode = ", ".join("/".join(p) for p in sorted(self.episode)) or "(none)"
        return f"its step features are: {step}; its episode features are: {episode}"

    def resolve(self, field: str, text: str) -> _Key:
        match = _KEY_RE.match(text.strip())
        if not match:
            raise RldsError(f"spec field {field}={text!r} is not a key path like "
                            "'observation/state' or 'observation/state[0:3]'")
        path = tuple(p for p in match["path"].split("/") if p)
        if path and path[0] == "steps":
            path = path[1:]
        index: int | slice | None = None
        if match["colon"]:
            index = slice(int(match["a"]) if match["a"] else None,
                          int(match["b"]) if match["b"] else None)
        elif match["a"]:
            index = int(match["a"])
        if path in self.step:
            return _Key(text, path, False, index, self.step[path])
        if path in self.episode:
            return _Key(text, path, True, index, self.episode[path])
        raise RldsError(f"spec field {field}={text!r} names no feature of {self.source}; "
                        f"{self.listing()}")


def _shape(key: _Key) -> tuple[int | None, ...]:
    """Shape of one value of `key` after its index."""
    shape = tuple(getattr(key.feature, "shape", ()) or ())
    if key.index is None:
        return shape
    if not shape:
        raise RldsError(f"{key.text!r}: cannot index a scalar feature")
    n = shape[-1]
    if isinstance(key.index, int):
        if n is not None and not -n <= key.index < n:
            raise RldsError(f"{key.text!r}: index {key.index} is out of range for shape {shape}")
        return shape[:-1]
    if n is None:
        raise RldsError(f"{key.text!r}: cannot slice an axis of unknown length")
    return shape[:-1] + (len(range(n)[key.index]),)


def _is_image(key: _Key) -> bool:
    if isinstance(key.feature, tfds.features.Image):
        return True
    shape = getattr(key.feature, "shape", ())
    return (isinstance(key.feature, tfds.features.Tensor) and len(shape) == 3
            and np.dtype(key.feature.np_dtype) == np.uint8)


@dataclasses.dataclass
class _Resolved:
    """Everything the spec names, resolved against one source."""

    image: _Key
    actions: list[_Key]
    action_dim: int
    instruction: _Key | None
    gripper: _Key | None
    ee: _Key | None
    start: _Key | None
    goal: _Key | None
    intrinsics: _Key | np.ndarray | None
    extrinsics: _Key | np.ndarray | None
    skip_decoding: dict  # decoders: leave unused images encoded


def _resolve(spec: ml_collections.ConfigDict, features: _Features) -> _Resolved:
    def opt(field: str) -> _Key | None:
        return features.resolve(field, spec[field]) if spec[field] else None

    image = features.resolve("image_key", spec.image_key)
    if not _is_image(image) or image.index is not None or image.episode_level:
        raise RldsError(f"image_key {spec.image_key!r} is not a per-step RGB image "
                        f"(it is {image.feature!r})")
    if len(getattr(image.feature, "shape", ())) != 3 or image.feature.shape[-1] != 3:
        raise RldsError(f"image_key {spec.image_key!r} has shape {image.feature.shape}; "
                        "clips need 3-channel RGB frames")
    wrist = opt("wrist_image_key")
    if wrist is not None and not _is_image(wrist):
        raise RldsError(f"wrist_image_key {spec.wrist_image_key!r} is not an image "
                        f"(it is {wrist.feature!r})")
    actions, dim = [], 0
    for i, text in enumerate(spec.action_keys):
        key = features.resolve(f"action_keys[{i}]", text)
        shape = _shape(key)
        if len(shape) > 1 or (shape and shape[0] is None) or key.episode_level:
            raise RldsError(f"action key {text!r} must be a per-step scalar or vector; it has "
                            f"shape {shape}")
        actions.append(key)
        dim += shape[0] if shape else 1
    bad = [d for d in spec.gripper_dims if not 0 <= d < dim]
    if bad:
        raise RldsError(f"gripper_dims {list(spec.gripper_dims)} are not all dims of the "
                        f"{dim}-D action assembled from {list(spec.action_keys)}")
    ee = opt("ee_position_key")
    if ee is not None and (ee.episode_level or len(_shape(ee)) != 1):
        raise RldsError(f"ee_position_key {spec.ee_position_key!r} must be a per-step vector")
    start, goal = opt("start_point_key"), opt("goal_point_key")
    for key in (start, goal):
        if key is not None and _shape(key)[-1:] != (2,):
            raise RldsError(f"point key {key.text!r} must hold 2 numbers, has shape "
                            f"{_shape(key)}")
    calib = []
    for field, size in (("camera_intrinsics", 3), ("camera_extrinsics", 4)):
        value = spec[field]
        if not _given(value):
            calib.append(None)
        elif isinstance(value, str):
            calib.append(features.resolve(field, value))
        else:
            matrix = np.asarray(value, np.float64)
            if matrix.shape != (size, size):
                raise RldsError(f"{field} must be a {size}x{size} matrix, got shape "
                                f"{matrix.shape}")
            calib.append(matrix)
    if calib[0] is not None and ee is not None and (_shape(ee)[0] or 3) < 3:
        raise RldsError(f"projecting needs a 3-D ee position; {spec.ee_position_key!r} has "
                        f"shape {_shape(ee)}")
    skip = {}
    for path, feature in features.step.items():
        if path != image.path and isinstance(feature, (tfds.features.Image, tfds.features.Video)):
            node = skip.setdefault("steps", {})
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = tfds.decode.SkipDecoding()
    return _Resolved(image, actions, dim, opt("instruction_key"), opt("gripper_state_key"), ee,
                     start, goal, calib[0], calib[1], skip)


# ------------------------------------------------------------------------ frames and points


def centre_crop_box(height: int, width: int) -> tuple[int, int, int]:
    """(x0, y0, side) of the centred square crop of a height x width image."""
    side = min(height, width)
    return (width - side) // 2, (height - side) // 2, side


def square_frame(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crops an (H, W, 3) uint8 image to a square and resizes it to (size, size, 3)."""
    x0, y0, side = centre_crop_box(*image.shape[:2])
    crop = np.ascontiguousarray(image[y0:y0 + side, x0:x0 + side, :3])
    if side == size:
        return crop
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR))


def square_point(xy: np.ndarray, height: int, width: int, size: int) -> np.ndarray:
    """Pixel (x, y) of the source image -> pixel of the square frame (same transform)."""
    return transforms.CropBox(*centre_crop_box(height, width)).map_points(xy, size)


def relative_to_absolute_gripper(commands: np.ndarray) -> np.ndarray:
    """Relative gripper commands (+1 close, -1 open, ~0 keep) -> absolute (1 open, 0 closed).

    Before the first command the gripper is taken to be in the state opposite to it (the first
    command changes something), open if there is none.
    """
    c = np.asarray(commands, np.float64)
    moves = np.where(c < -0.1, 1.0, np.where(c > 0.1, -1.0, 0.0))  # +1 opens, -1 closes
    nonzero = np.flatnonzero(moves)
    state = -moves[nonzero[0]] if len(nonzero) else 1.0
    out = np.empty_like(moves)
    for i, move in enumerate(moves):
        state = move if move else state
        out[i] = state
    return ((out + 1.0) / 2.0).astype(np.float32)


# ----------------------------------------------------------------------------- episodes


@dataclasses.dataclass
class Episode:
    """One source episode, read and squared: N frames, N-1 actions."""

    frames: np.ndarray  # (N, S, S, 3) uint8
    actions: np.ndarray  # (N-1, A) float32 (gripper dims absolute)
    instructions: list[str]  # per step, '' where none
    gripper: np.ndarray | None  # (N,) or None
    ee_position: np.ndarray | None  # (N, D) or None
    start_xy: np.ndarray | None  # (N, 2) in square-frame pixels (NaN where missing)
    goal_xy: np.ndarray | None
    projected_xy: np.ndarray | None  # (N, 2) ee projected to square-frame pixels (NaN: behind)


def _read_episode(example: Mapping[str, Any], res: _Resolved, spec: ml_collections.ConfigDict,
                  image_size: int) -> Episode:
    steps = example["steps"]
    n = len(steps)
    frames = np.empty((n, image_size, image_size, 3), np.uint8)
    actions = np.empty((n, res.action_dim), np.float32)
    instructions, grip, ee, starts, goals = [], [], [], [], []
    src_hw = None

    def value(key: _Key, step: Mapping[str, Any]) -> np.ndarray:
        return key.get(example) if key.episode_level else key.get(step)

    for i in range(n):
        try:
            step = steps[i]  # decodes the step's features (TFDS decodes steps lazily)
        except Exception as e:  # pylint: disable=broad-except
            raise _StepDecodeError(f"step {i}") from e
        image = res.image.get(step)
        if image.ndim != 3 or image.shape[-1] < 3:
            raise ValueError(f"step {i}: camera image has shape {image.shape}, not (H, W, 3)")
        src_hw = src_hw or image.shape[:2]
        frames[i] = square_frame(image, image_size)
        actions[i] = np.concatenate([np.asarray(k.get(step), np.float32).reshape(-1)
                                     for k in res.actions])
        if res.instruction is not None:
            instructions.append(str(value(res.instruction, step)).strip())
        else:
            instructions.append("")
        if res.gripper is not None:
            grip.append(float(np.asarray(value(res.gripper, step), np.float64).reshape(-1)[0]))
        if res.ee is not None:
            ee.append(np.asarray(res.ee.get(step), np.float64).reshape(-1))
        if res.start is not None:
            starts.append(np.asarray(value(res.start, step), np.float64).reshape(2))
            goals.append(np.asarray(value(res.goal, step), np.float64).reshape(2))
    if spec.gripper_actions == "relative":
        for d in spec.gripper_dims:
            actions[:, d] = relative_to_absolute_gripper(actions[:, d])

    def to_frame(points: list[np.ndarray]) -> np.ndarray | None:
        if not points:
            return None
        p = np.stack(points)
        if spec.point_order == "yx":
            p = p[:, ::-1]
        missing = ~np.all(np.isfinite(p) & (p >= 0), axis=1)
        out = square_point(np.where(missing[:, None], 0.0, p), *src_hw, image_size)
        out[missing] = np.nan
        return out

    def calibration(matrix: _Key | np.ndarray, size: int) -> np.ndarray:
        """A fixed matrix, or one read from the episode (or its first step)."""
        if isinstance(matrix, _Key):
            matrix = value(matrix, steps[0])
        return np.asarray(matrix, np.float64).reshape(size, size)

    projected = None
    if res.intrinsics is not None and ee:
        k, e = calibration(res.intrinsics, 3), calibration(res.extrinsics, 4)
        uv, in_front = project_points(np.stack(ee)[:, :3], k, e)
        projected = square_point(uv, *src_hw, image_size)
        projected[~in_front] = np.nan
    return Episode(frames=frames, actions=actions[:-1], instructions=instructions,
                   gripper=np.asarray(grip) if grip else None,
                   ee_position=np.stack(ee) if ee else None,
                   start_xy=to_frame(starts), goal_xy=to_frame(goals), projected_xy=projected)


def _inside(xy: np.ndarray, size: int) -> bool:
    return bool(np.all(np.isfinite(xy)) and np.all(xy >= 0) and np.all(xy <= size))


def segment_points(ep: Episode, start: int, end: int,
                   image_size: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Start/goal of segment [start, end]: annotation, else projection, else invalid."""
    for s_all, g_all in ((ep.start_xy, ep.goal_xy), (ep.projected_xy, ep.projected_xy)):
        if s_all is not None and _inside(s_all[start], image_size) and _inside(g_all[end],
                                                                               image_size):
            return s_all[start], g_all[end], True
    return np.zeros(2, np.float32), np.zeros(2, np.float32), False


def episode_clips(ep: Episode, *, episode_id: int, spec: ml_collections.ConfigDict,
                  horizon: int, frame_stride: int, context_frames: int,
                  image_size: int) -> list[Clip]:
    """Segments one episode with the shared segmenter and cuts its clips."""
    num_steps = len(ep.actions)
    seg = segmenter_lib.segment_episode(
        num_steps, gripper=ep.gripper, ee_position=ep.ee_position, window=horizon * frame_stride,
        config=segmenter_lib.SegmenterConfig(**spec.segmenter.to_dict()))
    clips = []
    for index, (start, end) in enumerate(seg.bounds):
        if seg.from_signals:
            start_xy, goal_xy, valid = segment_points(ep, start, end, image_size)
        else:
            start_xy, goal_xy, valid = np.zeros(2, np.float32), np.zeros(2, np.float32), False
        text = ep.instructions[start] or spec.fallback_instruction
        # A long segment's later clips start from the projected gripper where it is known.
        track = ep.projected_xy if valid and ep.projected_xy is not None else None
        if track is not None and not all(_inside(track[a], image_size) for a, _ in
                                         clip_bounds(start, end, horizon, frame_stride)):
            track = None
        clips += cut_clips(ep.frames, ep.actions, start, end, horizon=horizon,
                           stride=frame_stride, context_frames=context_frames,
                           gripper_dims=spec.gripper_dims, text=text, start_xy=start_xy,
                           goal_xy=goal_xy, sgg_valid=valid, episode_id=episode_id,
                           segment_index=index, track_xy=track)
    return clips


# ------------------------------------------------------------------------------- records

_U64_CRC = struct.Struct("<QI")
_REFETCH = ("The shard is damaged (an interrupted or corrupted copy or download); nothing was "
            "written. Fix: copy or download {name} again from the dataset's source, then rerun "
            "the same command.")


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data` (google-crc32c's C implementation)."""
    c = google_crc32c.value(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_tfrecord(path: epath.Path, verify_data: bool = True) -> Iterator[tuple[int, bytes]]:
    """(index, record) of a TFRecord file; RldsError naming the file, the record, its byte
    offset and the fix when the file is damaged.

    Both CRCs of the framing are checked: the length field's (a corrupt or misaligned file
    fails there) and the payload's (a changed byte inside a record fails there, before it is
    decoded). `verify_data=False` skips the payload's, for measuring what it costs.
    """
    refetch = _REFETCH.format(name=epath.Path(path).name)
    with epath.Path(path).open("rb") as f:
        index, offset = 0, 0
        while True:
            header = f.read(12)
            if not header:
                return
            where = f"{path}: record {index} (byte {offset})"
            if len(header) < 12:
                raise RldsError(f"{where} is truncated: the file ends inside its header. "
                                f"{refetch}")
            length, crc = _U64_CRC.unpack(header)
            if masked_crc32c(header[:8]) != crc:
                raise RldsError(f"{where} is corrupt: its length field fails its CRC-32C "
                                f"check. {refetch}")
            data = f.read(length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                raise RldsError(f"{where} is truncated: {length} bytes announced, the file "
                                f"ends first. {refetch}")
            if verify_data and masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                raise RldsError(f"{where} is corrupt: its {length}-byte payload fails its "
                                f"CRC-32C check. {refetch}")
            yield index, data
            index += 1
            offset += 16 + length


def read_array_record(path: epath.Path) -> Iterator[tuple[int, bytes]]:
    """(index, record) of an array_record file."""
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

    refetch = _REFETCH.format(name=epath.Path(path).name)
    try:
        reader = array_record_module.ArrayRecordReader(os.fspath(path))
    except Exception as e:  # pylint: disable=broad-except
        raise RldsError(f"{path}: cannot be opened as array_record ({e}). {refetch}") from e
    try:
        for index in range(reader.num_records()):
            try:
                record = reader.read([index])[0]
            except Exception as e:  # pylint: disable=broad-except
                raise RldsError(f"{path}: record {index} cannot be read ({e}). {refetch}") from e
            yield index, record
    finally:
        reader.close()


# ----------------------------------------------------------------------------- ingestion


def _version_dir(source_dir: str | os.PathLike) -> epath.Path:
    """The TFDS version directory: `source_dir` itself, or its highest version subdirectory."""
    path = epath.Path(source_dir)
    if (path / "dataset_info.json").exists():
        return path
    if not path.exists():
        raise RldsError(f"no RLDS dataset at {path}: the directory does not exist")
    versions = sorted((p for p in path.iterdir() if (p / "dataset_info.json").exists()),
                      key=lambda p: tuple(int(x) if x.isdigit() else 0
                                          for x in p.name.split(".")))
    if not versions:
        raise RldsError(f"no RLDS dataset at {path}: no dataset_info.json there or in a version "
                        "subdirectory (point --source at e.g. .../bridge_dataset/1.0.0)")
    return versions[-1]


def holdout_indices(num_episodes: int, fraction: float, seed: int) -> frozenset[int]:
    """Deterministic validation hold-out: round(fraction * n) episode indices (at least one if
    fraction > 0 and n >= 2; never all)."""
    if fraction <= 0 or num_episodes < 2:
        return frozenset()
    k = min(max(1, round(fraction * num_episodes)), num_episodes - 1)
    return frozenset(int(i) for i in np.random.default_rng(seed).permutation(num_episodes)[:k])


@dataclasses.dataclass
class _Part:
    """Episodes of one source split feeding one output split."""

    source_split: str
    first_id: int  # episode_id of the split's first episode
    keep: Callable[[int], bool]
    count: int


def _plan(builder: tfds.core.DatasetBuilder, spec: ml_collections.ConfigDict
          ) -> dict[str, list[_Part]]:
    splits = builder.info.splits
    names = sorted(splits.keys(), key=lambda s: (s != "train", s))
    if "train" not in names:
        raise RldsError(f"{builder.data_dir} has no 'train' split; it has {names}")
    first_id, offsets = 0, {}
    for name in names:
        offsets[name] = first_id
        first_id += splits[name].num_examples
    plan: dict[str, list[_Part]] = {"train": [], "validation": []}
    for name in names:
        if name not in SPLIT_MAP:
            logging.warning("RLDS source split %r is not train/val/validation/test: skipped", name)
            continue
        n = splits[name].num_examples
        plan[SPLIT_MAP[name]].append(_Part(name, offsets[name], lambda i: True, n))
    if not plan["validation"]:
        held = holdout_indices(splits["train"].num_examples, float(spec.val_fraction),
                               int(spec.split_seed))
        n = splits["train"].num_examples
        plan["train"] = [_Part("train", 0, lambda i: i not in held, n - len(held))]
        plan["validation"] = [_Part("train", 0, lambda i: i in held, len(held))] if held else []
    return {split: parts for split, parts in plan.items() if parts}


class _StepDecodeError(Exception):
    """A step whose features (its images, mostly) do not decode; raised from its cause."""


def _undecodable(shard: str | os.PathLike, index: int, error: BaseException) -> str:
    """The message for a record whose bytes pass their checksum but do not decode."""
    cause = error.__cause__ if isinstance(error, _StepDecodeError) else error
    return (f"{shard}: record {index} cannot be decoded ({error}: {type(cause).__name__}: "
            f"{cause}). Its bytes pass their checksum, so it was stored this way (e.g. an image "
            f"that is not valid JPEG or PNG). Fix: copy or download {epath.Path(shard).name} "
            "again; if a fresh copy fails the same way, the release itself is broken at this "
            "record: report it to the dataset's maintainers. Nothing was written.")


def _source_episodes(builder: tfds.core.DatasetBuilder, part: _Part, res: _Resolved
                     ) -> Iterator[tuple[int, Any, str, int]]:
    """(episode index in split, decoded example, shard, record index) of a part's episodes."""
    file_format = builder.info.file_format
    if file_format == tfds.core.FileFormat.TFRECORD:
        read = read_tfrecord
    elif file_format == tfds.core.FileFormat.ARRAY_RECORD:
        read = read_array_record
    else:
        raise RldsError(f"{builder.data_dir}: file format {file_format} is not supported "
                        "(tfrecord and array_record are)")
    features = builder.info.features
    episode = 0
    for shard in builder.info.splits[part.source_split].filepaths:
        for index, record in read(shard):
            if part.keep(episode):
                try:
                    example = features.deserialize_example_np(record, decoders=res.skip_decoding)
                except Exception as e:  # pylint: disable=broad-except
                    raise RldsError(_undecodable(shard, index, e)) from e
                yield episode, example, os.fspath(shard), index
            episode += 1


def ingest(spec: ml_collections.ConfigDict | Mapping[str, Any], source_dir: str | os.PathLike,
           out_dir: str | os.PathLike, *, horizon: int, frame_stride: int, context_frames: int,
           image_size: int, overwrite: bool = False) -> DatasetMeta:
    """Converts an RLDS dataset into a clip dataset directory (module docstring).

    Args:
      spec: the dataset's spec (`load_spec`), checked again here.
      source_dir: the TFDS version directory of the RLDS dataset (or its parent); local or gs://.
      out_dir: the clip dataset directory to write; an existing one is an error unless
        `overwrite`.
      horizon, frame_stride, context_frames: clip shape (DESIGN.md "Clip").
      image_size: side of the stored square frames.

    Returns:
      The written dataset's DatasetMeta: clip counts per split, and per split the episodes
      read, those without an instruction, those too short to cut (skipped) and the clips left
      without text (no instruction and no fallback).
    """
    spec = check_spec(spec)
    for name, v in (("horizon", horizon), ("frame_stride", frame_stride),
                    ("context_frames", context_frames), ("image_size", image_size)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    out_path = pathlib.Path(out_dir)  # written locally (clip_dataset)
    if out_path.exists() and not overwrite:  # before reading anything
        raise DatasetError(f"{out_path} already exists; it is left as it is. Choose another "
                           "directory, or pass --overwrite to replace it.")
    version_dir = _version_dir(source_dir)
    try:
        builder = tfds.builder_from_directory(os.fspath(version_dir))
    except Exception as e:  # pylint: disable=broad-except
        raise RldsError(f"{version_dir} cannot be opened as a TFDS dataset: {e}") from e
    res = _resolve(spec, _Features(builder.info.features, os.fspath(version_dir)))
    plan = _plan(builder, spec)

    # What each split read, kept in the dataset's meta (DatasetMeta.episodes) and printed.
    summary = {split: dict.fromkeys(("episodes", "without_instruction", "too_short",
                                     "clips_without_text"), 0) for split in plan}

    def clips_of(split: str) -> Iterator[Clip]:
        total, counts = sum(p.count for p in plan[split]), summary[split]
        with tqdm(total=total, desc=f"{spec.name} {split}", unit="episode",
                  disable=total == 0, file=sys.stderr) as bar:
            for part in plan[split]:
                for episode, example, shard, index in _source_episodes(builder, part, res):
                    try:
                        ep = _read_episode(example, res, spec, image_size)
                    except RldsError:
                        raise
                    except _StepDecodeError as e:
                        raise RldsError(_undecodable(shard, index, e)) from e
                    except Exception as e:  # pylint: disable=broad-except
                        raise RldsError(
                            f"{shard}: record {index} (episode {episode} of split "
                            f"{part.source_split!r}) cannot be read: {type(e).__name__}: {e}. "
                            f"Fix: check that the spec's keys ({spec.image_key!r}, "
                            f"{list(spec.action_keys)}) fit this record's features. Nothing "
                            "was written.") from e
                    bar.update(1)
                    counts["episodes"] += 1
                    counts["without_instruction"] += not any(ep.instructions)
                    if len(ep.actions) < 1:
                        counts["too_short"] += 1
                        logging.warning("%s: record %d has fewer than 2 steps: skipped", shard,
                                        index)
                        continue
                    for clip in episode_clips(ep, episode_id=part.first_id + episode, spec=spec,
                                              horizon=horizon, frame_stride=frame_stride,
                                              context_frames=context_frames,
                                              image_size=image_size):
                        counts["clips_without_text"] += not clip.text
                        yield clip

    meta = DatasetMeta(name=spec.name, image_size=int(image_size), horizon=int(horizon),
                       frame_stride=int(frame_stride), context_frames=int(context_frames),
                       action_dim=res.action_dim, gripper_dims=list(spec.gripper_dims),
                       source=os.fspath(version_dir), episodes=summary)
    split_clips = {split: (lambda s=split: clips_of(s)) for split in plan}
    # Every train clip's text (its episode's instruction, or the fallback) goes into the
    # tokenizer as it is written; the fallback is added even when no clip uses it.
    return write_dataset(out_dir, meta, split_clips,
                         tokenizer_texts=[spec.fallback_instruction], overwrite=overwrite)


def ingest_summary(meta: DatasetMeta, fallback_instruction: str = "") -> str:
    """Lines saying what an ingestion read per split: episodes, clips, and what was missing
    (episodes without an instruction, too short to cut, clips left without text)."""
    lines = []
    for split, c in meta.episodes.items():
        line = (f"  {split}: {c['episodes']} episodes -> {meta.splits.get(split, 0)} clips")
        if c["without_instruction"]:
            line += (f"; {c['without_instruction']} episodes without an instruction (their clips "
                     + (f"use the fallback {fallback_instruction!r})" if fallback_instruction
                        else f"have no text: {c['clips_without_text']} clips; set the spec's "
                             "fallback_instruction to give them one)"))
        if c["too_short"]:
            line += f"; {c['too_short']} episodes with fewer than 2 steps skipped"
        lines.append(line)
    return "\n".join(lines)
