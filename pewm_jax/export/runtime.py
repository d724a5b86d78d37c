"""Running an export bundle (`bundle.py`) with jax, numpy, safetensors and `tokenizers` only.

Besides those it uses only the project's numpy-only contracts: the tokenizer encoding and
`ActionStats` (data_loaders), the plan grammar and parser (`pewm_jax.text.plan`), and Pillow's
bicubic resize when the planner's input size differs from the camera's. No Flax, no model code
and no training imports: a robot installs jax and these few packages, copies the bundle
directory and runs

    bundle = load_bundle(dir)              # checks every file's size and sha256 first
    BundlePolicy(bundle).step(...)         # observation + primitive -> clip and action chunk
    BundlePlanner(bundle).plan(...)        # observation + task -> plan (start/goal points)
    BundleController(bundle).run(...)      # the closed loop: plan -> step -> act -> replan
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np
import safetensors.numpy
import tokenizers
from jax import export

from data_loaders.clips import ActionStats
from pewm_jax.text.tokenizer import PAD, encode_batch
from pewm_jax.text.plan import Plan, PlanGrammar, PlanStep, parse_generated, prompt_ids

BUNDLE_FORMAT = 1
WEIGHTS, STEP, CONFIG, STATS, TOKENIZER, MANIFEST = (
    "weights.safetensors", "policy_step.jaxexport", "config.json", "dataset_stats.json",
    "tokenizer.json", "manifest.json")
PLANNER_PREFILL, PLANNER_DECODE, PLANNER_TOKENIZER, PLANNER_HF = (
    "planner_prefill.jaxexport", "planner_decode.jaxexport", "planner_tokenizer.json",
    "planner_hf")


class BundleError(ValueError):
    """The bundle is missing, modified or from an unknown format; the message says which file."""


class InputError(ValueError):
    """Inputs a bundle step cannot take (shapes, dtypes, counts, texts); the message says which."""


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
    planner_steps: tuple[export.Exported, export.Exported] | None  # (prefill, decode)
    planner_tokenizer: tokenizers.Tokenizer | None

    def weights_of(self, *models: str) -> dict[str, jax.Array]:
        """The weights of `models` (name prefixes): each exported step takes its own models'."""
        return {k: v for k, v in self.weights.items() if k.split(".", 1)[0] in models}

    @property
    def has_planner(self) -> bool:
        """Whether the bundle holds a planner (the run it came from had one)."""
        return self.planner_steps is not None


def file_sha256(path: pathlib.Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks (weights can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """The sha256 of the manifest's content without its own `manifest_sha256` (canonical JSON),
    so an edited manifest is caught like an edited file."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _verified(root: pathlib.Path, name: str, expected: dict[str, Any]) -> bytes:
    """The bytes of root / name, read once, after checking their size and sha256: what is
    loaded is what was checked."""
    path = root / name
    if not path.is_file():
        raise BundleError(f"bundle {root} lacks {name}, which its manifest lists. Fix: copy the "
                          "whole bundle directory again.")
    data = path.read_bytes()
    if len(data) != expected["bytes"]:
        raise BundleError(f"{path} has {len(data)} bytes but the manifest says "
                          f"{expected['bytes']}: the file is truncated or modified. Fix: copy "
                          "the bundle again.")
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise BundleError(f"{path} does not match the sha256 in the manifest: the file was "
                          "modified. Fix: copy the bundle again, or export it again.")
    return data


def _check_listing(root: pathlib.Path, files: dict[str, Any]) -> None:
    """Every listed name lies inside the bundle, and every file in it is listed."""
    inside = root.resolve()
    for name in files:
        parts = pathlib.PurePosixPath(name)
        if (parts.is_absolute() or ".." in parts.parts
                or not (root / name).resolve().is_relative_to(inside)):
            raise BundleError(f"{root / MANIFEST} lists {name!r}, which is outside the bundle. "
                              "Fix: export the run again; never load a manifest edited by hand.")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    unlisted = sorted(present - set(files) - {MANIFEST})
    if unlisted:
        raise BundleError(f"bundle {root} holds files its manifest does not list: "
                          f"{', '.join(unlisted[:5])}. Fix: remove them, or copy the bundle "
                          "again.")


def _read(root: pathlib.Path, name: str, data: bytes, read: Callable[[bytes], Any],
          versions: dict[str, str]) -> Any:
    """read(data), the bytes of root / name, or a BundleError naming the exporter's versions
    and ours."""
    try:
        return read(data)
    except Exception as e:  # deserializers raise many types; all mean "cannot read it here"
        raise BundleError(
            f"{root / name} cannot be read here ({type(e).__name__}: {e}). The bundle was "
            f"exported with {versions}; this runtime has jax {jax.__version__}, tokenizers "
            f"{tokenizers.__version__}. Fix: install the exporter's versions, or export the "
            "run again with these.") from None


def load_bundle(path: str | pathlib.Path) -> Bundle:
    """Verifies and loads the bundle directory `path`; raises BundleError when it is not one,
    is incomplete, holds unlisted files, or any file (the manifest too) was modified.

    The hashes catch corruption and edits, not an attacker who rewrites the manifest's
    hashes as well: sign the bundle directory if that matters.
    """
    root = pathlib.Path(path)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{root} has no readable {MANIFEST} ({e}); it is not an export "
                          "bundle. Fix: point at the directory `pewm export` wrote.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise BundleError(f"{root / MANIFEST} is bundle format {found!r}; this runtime reads "
                          f"format {BUNDLE_FORMAT}. Fix: export the run again.")
    if manifest.get("manifest_sha256") != manifest_sha256(manifest):
        raise BundleError(f"{root / MANIFEST} does not match its own manifest_sha256: the "
                          "manifest was modified. Fix: copy the bundle again, or export it again.")
    files, planner = manifest["files"], manifest["planner"]
    needed = (WEIGHTS, STEP, CONFIG, STATS, TOKENIZER) + (
        (PLANNER_PREFILL, PLANNER_DECODE, PLANNER_TOKENIZER) if planner else ())
    for name in needed:
        if name not in files:
            raise BundleError(f"{root / MANIFEST} lists no {name}. Fix: export the run again.")
    _check_listing(root, files)
    data = {}
    for name, expected in files.items():
        verified = _verified(root, name, expected)
        if name in needed:  # planner_hf/ is for Hugging Face, checked but not loaded here
            data[name] = verified
    versions = manifest["versions"]

    def step(name: str) -> export.Exported:
        return _read(root, name, data[name], lambda b: export.deserialize(bytearray(b)),
                     versions)

    def tokenizer(name: str) -> tokenizers.Tokenizer:
        return _read(root, name, data[name], lambda b: tokenizers.Tokenizer.from_str(
            b.decode()), versions)

    weights = {k: jax.numpy.asarray(v) for k, v in safetensors.numpy.load(data[WEIGHTS]).items()}
    return Bundle(root, manifest, json.loads(data[CONFIG]), weights, step(STEP),
                  tokenizer(TOKENIZER), json.loads(data[STATS]),
                  (step(PLANNER_PREFILL), step(PLANNER_DECODE)) if planner else None,
                  tokenizer(PLANNER_TOKENIZER) if planner else None)


@dataclasses.dataclass(frozen=True)
class BundleStep:
    """What one bundle policy step produced for its B commands."""

    clips: np.ndarray  # (B, H, N, N, 3) uint8 imagined future frames
    actions: np.ndarray  # (B, H, s, A) float32 per-step actions in the dataset's units
    seconds: float  # the exported step's device time (clip sampling + action decoding)


class BundlePolicy:
    """The primitive policy of a bundle: `step(observations, commands)` -> clips and actions,
    the same numbers as `PrimitivePolicy.step` of the checkpoints it was exported from."""

    def __init__(self, bundle: Bundle, *, seed: int = 0):
        if not 0 <= seed < 2 ** 32:
            raise ValueError(f"seed must be in [0, 2**32) (the sampler's uint32 seed), got "
                             f"{seed}")
        self.bundle, self.seed = bundle, seed
        shapes = bundle.manifest["policy_step"]
        self.image_size, self.context_frames = shapes["image_size"], shapes["context_frames"]
        self.max_text_tokens, self.action_dim = shapes["max_text_tokens"], shapes["action_dim"]
        self.stats = ActionStats.from_json(bundle.action_stats)
        self._weights = bundle.weights_of("world_model", "action_decoder")
        self._step = jax.jit(bundle.policy_step.call)  # compiled once per batch size

    def step(self, observations: np.ndarray, commands: Sequence[Command], *,
             step_index: int, use_sgg: bool = True) -> BundleStep:
        """Clips and actions for uint8 observations (B, N, N, 3) and B commands (any B >= 1);
        `step_index` seeds the sampler's noise as in `PrimitivePolicy.step`."""
        observations = np.asarray(observations)
        b, n = len(commands), self.image_size
        if b < 1 or observations.shape != (b, n, n, 3) or observations.dtype != np.uint8:
            raise InputError(f"expected {max(b, 1)} uint8 observations of shape ({n}, {n}, 3) "
                             f"for {b} commands, got {observations.dtype} {observations.shape}")
        tokens, mask = encode_batch(self.bundle.tokenizer, [c.text for c in commands],
                                    self.max_text_tokens)
        context = np.repeat(observations[:, None], self.context_frames, axis=1)  # (B, C, N, N, 3)
        start = time.perf_counter()
        clips, normalised = self._step(
            self._weights, context, tokens, mask,
            np.array([c.start_xy for c in commands], np.float32),
            np.array([c.goal_xy for c in commands], np.float32), np.full((b,), use_sgg),
            np.uint32(self.seed), np.int32(step_index))
        clips, normalised = np.asarray(clips), np.asarray(normalised)  # waits for the device
        seconds = time.perf_counter() - start
        return BundleStep(clips, self.stats.from_model(normalised[..., :self.action_dim]),
                          seconds)


class BundlePlanner:
    """The planner of a bundle: `plan(observations, tasks)` -> plans, the same plans as
    `Planner.plan` of the checkpoint it was exported from (greedy, grammar-constrained), with
    points in pixels of the observation."""

    def __init__(self, bundle: Bundle):
        if not bundle.has_planner:
            raise BundleError(f"bundle {bundle.path} holds no planner. Fix: fine-tune one "
                              "(`pewm planner`) into the run and export it again.")
        self.bundle, self.shapes = bundle, bundle.manifest["planner"]
        self.tokenizer = bundle.planner_tokenizer
        self.image_size = self.shapes["image_size"]
        self.plans_remaining = self.shapes["plans_remaining"]
        self.grammar = PlanGrammar.from_tokenizer(self.tokenizer, self.shapes["max_steps"],
                                                  self.shapes["max_words"],
                                                  self.shapes["vocab_size"])
        self._pad = self.tokenizer.token_to_id(PAD)
        self._weights = bundle.weights_of("planner")
        # Under jax.jit each call takes the compiled fast path: a decode step per token.
        self._steps = tuple(jax.jit(step.call) for step in bundle.planner_steps)

    def generate_ids(self, images: np.ndarray, tasks: Sequence[str]) -> np.ndarray:
        """Plan token ids (B, max_new_tokens) for uint8 images (B, S, S, 3) at the planner's
        size: prefill, then one decode step per token, each choice masked by the grammar;
        stops once every row has ended its plan (the rest is <pad>, all the grammar allows)."""
        prefill, decode = self._steps
        weights = self._weights
        prompts = np.stack([self.prompt_ids(t) for t in tasks])  # (B, L)
        out = np.full((len(tasks), self.shapes["max_new_tokens"]), self._pad, np.int32)
        state = np.full((len(tasks),), self.grammar.initial_state, np.int64)
        logits, keys, values, length = prefill(weights, images, prompts)
        for step in range(out.shape[1]):
            rows = self.grammar.next_state[state]  # (B, V): next state per token, -1 forbidden
            token = np.where(rows >= 0, np.asarray(logits), -np.inf).argmax(-1)  # (B,)
            out[:, step] = token
            state = rows[np.arange(len(state)), token]
            if (state == self.grammar.terminal_state).all():
                break
            logits, keys, values, length = decode(weights, keys, values, length,
                                                  token.astype(np.int32))
        return out

    def prompt_ids(self, task: str) -> np.ndarray:
        """The padded prompt (L,) int32 of `task`; InputError when it is empty or too long."""
        try:
            return np.asarray(prompt_ids(self.tokenizer, task, self.shapes["prompt_tokens"]),
                              np.int32)
        except ValueError as e:
            raise InputError(str(e)) from None

    def plan(self, observations: np.ndarray, tasks: Sequence[str]) -> list[Plan]:
        """Plans for uint8 observations (B, H, W, 3) and B task texts; points in pixels of the
        observation. Raises PlanParseError if a plan does not end within max_new_tokens."""
        observations = np.asarray(observations)
        if (observations.ndim != 4 or observations.shape[0] != len(tasks) or len(tasks) < 1
                or observations.shape[-1] != 3 or observations.dtype != np.uint8):
            raise InputError(f"expected {max(len(tasks), 1)} uint8 RGB observations (B, H, W, "
                             f"3) for {len(tasks)} tasks, got {observations.dtype} "
                             f"{observations.shape}")
        images = observations
        if observations.shape[1:3] != (self.image_size, self.image_size):
            from data_loaders.transforms import resize_bicubic  # Pillow: only when resizing

            images = resize_bicubic(observations, self.image_size)
        # The planner saw the frame squashed to a square: x and y scale back separately.
        scale = (observations.shape[2] / self.image_size, observations.shape[1] / self.image_size)
        plans = []
        for row in self.generate_ids(images, tasks):
            plan = parse_generated(row, self.image_size, self.tokenizer,
                                   max_steps=self.grammar.max_steps,
                                   max_words=self.grammar.max_words)
            plans.append(Plan(tuple(PlanStep(s.text, _scaled(s.start_xy, scale),
                                             _scaled(s.goal_xy, scale)) for s in plan.steps)))
        return plans


class Robot(Protocol):
    """What the closed loop acts on, Gymnasium-style: `step(action)` -> (observation with an
    "image" (N, N, 3) uint8, reward, terminated, truncated, info). The built-in world's
    `TabletopEnv` is one; a real robot wraps its arm and camera in the same call."""

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict]: ...


@dataclasses.dataclass(frozen=True)
class LoopRecord:
    """One primitive the closed loop ran."""

    command: PlanStep  # what the planner asked for (points: pixels of the observation)
    actions: np.ndarray  # (H, s, A) the per-step actions decoded for it, dataset units
    env_steps: int  # robot steps it took (H * frame_stride unless the episode ended)


@dataclasses.dataclass
class LoopResult:
    """A closed-loop episode: what ran, why it stopped, the last observation."""

    records: list[LoopRecord]
    end: str  # 'terminated', 'truncated', 'plan_done' (no step left) or 'budget'
    image: np.ndarray


class BundleController:
    """The closed loop from a bundle alone: plan from the current observation, imagine the
    primitive to run and decode its per-step actions, play them as they are, observe, replan;
    the same loop as `pewm_jax.control.Controller` with the VLM planner, decoded executor,
    closed loop and `track=False` (the clip is decoded once, from its own frames), for one
    robot. Same seed, same actions: primitive k
    samples with step index first_step_index + k, as the Controller's first episode does."""

    def __init__(self, bundle: Bundle, *, seed: int = 0, use_sgg: bool = True):
        self.planner, self.policy = BundlePlanner(bundle), BundlePolicy(bundle, seed=seed)
        self.use_sgg = use_sgg

    def run(self, robot: Robot, image: np.ndarray, task: str, *, max_primitives: int,
            first_step_index: int = 0) -> LoopResult:
        """Runs `task` on `robot` from observation `image` for at most `max_primitives`
        primitives; primitive k samples its clip with step index first_step_index + k."""
        records: list[LoopRecord] = []
        for executed in range(max_primitives):
            plan = self.planner.plan(image[None], [task])[0]
            index = 0 if self.planner.plans_remaining else executed
            if index >= len(plan.steps):
                return LoopResult(records, "plan_done", image)
            command = plan.steps[index]
            out = self.policy.step(image[None], [command], step_index=first_step_index + executed,
                                   use_sgg=self.use_sgg)
            steps, end = 0, None
            for action in out.actions[0].reshape(-1, out.actions.shape[-1]):  # (H * s, A)
                observation, _, terminated, truncated, _ = robot.step(action)
                image, steps = observation["image"], steps + 1
                if terminated or truncated:
                    end = "terminated" if terminated else "truncated"
                    break
            records.append(LoopRecord(command, out.actions[0], steps))
            if end:
                return LoopResult(records, end, image)
        return LoopResult(records, "budget", image)


def _scaled(xy: tuple[float, float], scale: tuple[float, float]) -> tuple[float, float]:
    return float(xy[0]) * scale[0], float(xy[1]) * scale[1]
