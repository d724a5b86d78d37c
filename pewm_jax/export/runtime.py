"""Running an export bundle (`bundle.py`) with jax, numpy, safetensors and `tokenizers` only.

Besides those it uses only the project's numpy-only data contracts (the tokenizer encoding and
`ActionStats`). No Flax, no model code and no training imports: a robot installs jax and
these few packages, copies the bundle directory and calls `BundlePolicy.step`. `load_bundle`
checks every file against the manifest's size and sha256 first and refuses a bundle that does
not match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np
import safetensors.numpy
import tokenizers
from jax import export

from data_loaders.clips import ActionStats
from data_loaders.tokenizer import encode_batch

BUNDLE_FORMAT = 1
WEIGHTS, STEP, CONFIG, STATS, TOKENIZER, MANIFEST = (
    "weights.safetensors", "policy_step.jaxexport", "config.json", "dataset_stats.json",
    "tokenizer.json", "manifest.json")


class BundleError(ValueError):
    """The bundle is missing, modified or from an unknown format; the message says which file."""


class Command(Protocol):
    """A primitive to imagine (`pewm_jax.control.policy.PrimitiveCommand` is one)."""

    text: str
    start_xy: tuple[float, float]
    goal_xy: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A verified bundle, loaded: weights on the default device, the deserialized step."""

    path: pathlib.Path
    manifest: dict[str, Any]
    config: dict[str, Any]
    weights: dict[str, jax.Array]
    policy_step: export.Exported
    tokenizer: tokenizers.Tokenizer
    action_stats: dict[str, Any]


def file_sha256(path: pathlib.Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks (weights can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_file(root: pathlib.Path, name: str, expected: dict[str, Any]) -> None:
    path = root / name
    if not path.is_file():
        raise BundleError(f"bundle {root} lacks {name}, which its manifest lists. Fix: copy the "
                          "whole bundle directory again.")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise BundleError(f"{path} has {size} bytes but the manifest says {expected['bytes']}: "
                          "the file is truncated or modified. Fix: copy the bundle again.")
    if file_sha256(path) != expected["sha256"]:
        raise BundleError(f"{path} does not match the sha256 in the manifest: the file was "
                          "modified. Fix: copy the bundle again, or export it again.")


def load_bundle(path: str | pathlib.Path) -> Bundle:
    """Verifies and loads the bundle directory `path`; raises BundleError when it is not one."""
    root = pathlib.Path(path)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{root} has no readable {MANIFEST} ({e}); it is not an export "
                          "bundle. Fix: point at the directory `pewm export` wrote.") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{root / MANIFEST} is bundle format {manifest.get('format')!r}; this "
                          f"runtime reads format {BUNDLE_FORMAT}. Fix: export the run again.")
    for name in (WEIGHTS, STEP, CONFIG, STATS, TOKENIZER):
        if name not in manifest.get("files", {}):
            raise BundleError(f"{root / MANIFEST} lists no {name}. Fix: export the run again.")
        _check_file(root, name, manifest["files"][name])
    weights = {k: jax.numpy.asarray(v)
               for k, v in safetensors.numpy.load_file(str(root / WEIGHTS)).items()}
    return Bundle(root, manifest, json.loads((root / CONFIG).read_text()), weights,
                  export.deserialize(bytearray((root / STEP).read_bytes())),
                  tokenizers.Tokenizer.from_file(str(root / TOKENIZER)),
                  json.loads((root / STATS).read_text()))


@dataclasses.dataclass(frozen=True)
class BundleStep:
    """What one bundle policy step produced for its B commands."""

    clips: np.ndarray  # (B, H, N, N, 3) uint8 imagined future frames
    actions: np.ndarray  # (B, H, A) float32 actions in the dataset's units
    seconds: float  # the exported step's device time (clip sampling + action decoding)


class BundlePolicy:
    """The primitive policy of a bundle: `step(observations, commands)` -> clips and actions,
    the same numbers as `PrimitivePolicy.step` of the checkpoints it was exported from."""

    def __init__(self, bundle: Bundle, *, seed: int = 0):
        self.bundle, self.seed = bundle, seed
        shapes = bundle.manifest["policy_step"]
        self.image_size, self.context_frames = shapes["image_size"], shapes["context_frames"]
        self.max_text_tokens, self.action_dim = shapes["max_text_tokens"], shapes["action_dim"]
        self.stats = ActionStats.from_json(bundle.action_stats)

    def step(self, observations: np.ndarray, commands: Sequence[Command], *,
             step_index: int, use_sgg: bool = True) -> BundleStep:
        """Clips and actions for uint8 observations (B, N, N, 3) and B commands (any B >= 1);
        `step_index` seeds the sampler's noise as in `PrimitivePolicy.step`."""
        observations = np.asarray(observations)
        b, n = len(commands), self.image_size
        if b < 1 or observations.shape != (b, n, n, 3) or observations.dtype != np.uint8:
            raise ValueError(f"expected {max(b, 1)} uint8 observations of shape ({n}, {n}, 3) "
                             f"for {b} commands, got {observations.dtype} {observations.shape}")
        tokens, mask = encode_batch(self.bundle.tokenizer, [c.text for c in commands],
                                    self.max_text_tokens)
        context = np.repeat(observations[:, None], self.context_frames, axis=1)  # (B, C, N, N, 3)
        start = time.perf_counter()
        clips, normalised = self.bundle.policy_step.call(
            self.bundle.weights, context, tokens, mask,
            np.array([c.start_xy for c in commands], np.float32),
            np.array([c.goal_xy for c in commands], np.float32), np.full((b,), use_sgg),
            np.uint32(self.seed), np.int32(step_index))
        clips, normalised = np.asarray(clips), np.asarray(normalised)  # waits for the device
        seconds = time.perf_counter() - start
        return BundleStep(clips, self.stats.denormalize(normalised[..., :self.action_dim]),
                          seconds)
