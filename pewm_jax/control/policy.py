"""The primitive policy: the world model and action decoder with their transforms.

One policy step turns B observations and B primitive commands (words + start/goal points in
pixels of the observation) into an imagined clip per row and the action chunk that plays it:

    words -> tokenizer -> text tokens      points -> SGG heatmaps (inside the jitted sampler)
    observation + tokens + points -> world model samples H future frames (few ODE steps)
    observation + sampled frames + points + tokens -> action decoder -> (H, s) per-step
                                         actions (normalised; gripper logits) -> dataset units

Every call runs at the fixed batch size given at construction (rows beyond the commands are
padding), so the sampler and decoder compile once and are reused for every control step.
Timings of generation and decoding are measured around their device work.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import tokenizers
from flax import nnx

from data_loaders.clips import ActionStats
from pewm_jax.text.tokenizer import encode_batch
from pewm_jax.diffusion.samplers import sample_from_config
from pewm_jax.models.action_decoder import ActionDecoder
from pewm_jax.models.video_dit import WorldModel
from pewm_jax.text.plan import PlanStep


@dataclasses.dataclass(frozen=True)
class PrimitiveCommand:
    """One primitive to imagine: its words and start/goal (x, y) pixels of the observation."""

    text: str
    start_xy: tuple[float, float]
    goal_xy: tuple[float, float]

    @classmethod
    def from_plan_step(cls, step: PlanStep, scale: float) -> PrimitiveCommand:
        """A planner's step as a command: its points (pixels of the planner's image) times
        `scale`, the observation's size over the planner's."""
        return cls(step.text, (float(step.start_xy[0]) * scale, float(step.start_xy[1]) * scale),
                   (float(step.goal_xy[0]) * scale, float(step.goal_xy[1]) * scale))


@dataclasses.dataclass(frozen=True)
class PolicyOutput:
    """What one policy step produced for its B commands."""

    clips: np.ndarray  # (B, H, N, N, 3) uint8 imagined future frames
    actions: np.ndarray  # (B, H, s, A) float32 per-step actions in the dataset's units (the
    # clip contract: the s actions that take frame j-1 to frame j)
    generate_s: float  # seconds of clip sampling (the whole padded batch)
    decode_s: float  # seconds of action decoding (the whole padded batch)


@nnx.jit
def _decode(model: ActionDecoder, context: jax.Array, frames: jax.Array, start_xy: jax.Array,
            goal_xy: jax.Array, sgg_valid: jax.Array, text_tokens: jax.Array,
            text_mask: jax.Array) -> jax.Array:
    return model(context, frames, start_xy, goal_xy, sgg_valid, text_tokens,
                 text_mask)  # (B, H, s, A) model units


@nnx.jit
def _encode(model: ActionDecoder, video: jax.Array) -> jax.Array:
    return model.encode(video)  # (B, H + 1, E)


@nnx.jit
def _decode_interval(model: ActionDecoder, codes: jax.Array, observations: jax.Array,
                     j: jax.Array, start_xy: jax.Array, goal_xy: jax.Array,
                     sgg_valid: jax.Array, text_tokens: jax.Array, text_mask: jax.Array
                     ) -> jax.Array:
    """(B, s, A) model units: interval j of the clip whose encodings (B, H + 1, E) have entry j
    (the frame before interval j) replaced by the observations' (B, N, N, 3)."""
    live = model.encode(observations[:, None])  # (B, 1, E)
    codes = jax.lax.dynamic_update_slice_in_dim(codes, live.astype(codes.dtype), j, axis=1)
    actions, _ = model.read(codes, start_xy, goal_xy, sgg_valid, text_tokens,
                            text_mask)  # (B, H, s, A)
    return jax.lax.dynamic_index_in_dim(actions, j, axis=1, keepdims=False)


class PrimitivePolicy:
    """World model + action decoder + tokenizer + action statistics (module docstring)."""

    def __init__(self, world_model: WorldModel | None, config: ml_collections.ConfigDict,
                 tokenizer: tokenizers.Tokenizer | None, action_decoder: ActionDecoder,
                 action_stats: ActionStats, *, batch_size: int, seed: int = 0):
        """`config` is the world model's training config (clip horizon, sampler settings);
        `tokenizer` the clip dataset's, which both models read words with; `action_stats` the
        statistics of the dataset whose actions the decoder reads. Without a world model it
        only decodes given clips (`decode`), with `config` the decoder's own."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        decoder_size = action_decoder.spec.image_size
        self.image_size = int(config.world.image_size)
        if decoder_size != self.image_size:
            raise ValueError(f"the action decoder reads {decoder_size}-pixel frames but the world "
                             f"model makes {self.image_size}-pixel ones: train both on the same "
                             "config.world.image_size")
        self.world_model, self.action_decoder = world_model, action_decoder
        self.config, self.tokenizer, self.stats = config, tokenizer, action_stats
        self.batch_size, self.seed = batch_size, seed
        self.horizon = int(config.data.horizon)
        self.context_frames = int(config.data.context_frames)
        self.action_dim = len(action_stats.mean)

    def step(self, observations: np.ndarray, commands: Sequence[PrimitiveCommand], *,
             step_index: int, use_sgg: bool = True, decode: bool = True) -> PolicyOutput:
        """Clips and actions for uint8 observations (B, N, N, 3) and B commands, B <= batch_size.

        `step_index` seeds the sampler's noise (same index, same clips); `use_sgg` False samples
        with the start/goal heatmaps dropped (the text-only ablation); `decode` False leaves
        the actions empty (B, 0, s, A), for a controller that decodes each interval from its
        live observation.
        """
        if self.world_model is None:
            raise ValueError("this policy has no world model: it decodes given clips only")
        observations = np.asarray(observations)
        b = len(commands)
        n = self.image_size
        if observations.shape != (b, n, n, 3) or observations.dtype != np.uint8:
            raise ValueError(f"expected {b} uint8 observations of shape ({n}, {n}, 3), got "
                             f"{observations.dtype} {observations.shape}")
        if not 1 <= b <= self.batch_size:
            raise ValueError(f"a policy step takes 1 to {self.batch_size} commands, got {b}")
        context = self.context(observations)
        tokens, mask = self._tokens([c.text for c in commands])
        cond = {"context": context, "text_tokens": tokens, "text_mask": mask,
                "start_xy": np.array([c.start_xy for c in commands], np.float32),
                "goal_xy": np.array([c.goal_xy for c in commands], np.float32),
                "sgg_valid": np.full((b,), use_sgg)}
        cond = {k: self._padded(v) for k, v in cond.items()}
        rng = jax.random.fold_in(jax.random.key(self.seed), step_index)
        start = time.perf_counter()
        unit = sample_from_config(self.world_model, cond, rng, self.config,
                                  horizon=self.horizon)  # (B', H, N, N, 3) in [0, 1]
        clips = np.asarray(jax.device_get(
            (unit * 255.0 + 0.5).clip(0, 255).astype(np.uint8)))  # (B', H, N, N, 3)
        generated = time.perf_counter()
        if decode:
            actions = self._decode_rows(cond["context"], clips, cond["start_xy"],
                                        cond["goal_xy"], cond["sgg_valid"], tokens, mask, rows=b)
        else:
            actions = np.zeros((b, 0, self.action_decoder.spec.frame_stride, self.action_dim),
                               np.float32)
        decoded = time.perf_counter()
        return PolicyOutput(clips[:b], actions, generated - start, decoded - generated)

    def decode(self, context: np.ndarray, frames: np.ndarray, start_xy: np.ndarray,
               goal_xy: np.ndarray, sgg_valid: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """(B, H, s, A) per-step actions in the dataset's units for clips of uint8 frames
        (B, H, N, N, 3) after context (B, C, N, N, 3), with their points (B, 2), sgg_valid (B,)
        and primitives' words, B <= batch_size: what the controller plays for imagined clips,
        and for true ones (`true_video`)."""
        return self._decode_rows(context, frames, start_xy, goal_xy, sgg_valid,
                                 *self._tokens(texts), rows=len(frames))

    def _decode_rows(self, *inputs: np.ndarray, rows: int) -> np.ndarray:
        """`decode` of its inputs with the words already tokenised (B, L), padded to the batch
        size; the first `rows` rows' actions in the dataset's units."""
        padded = [self._padded(np.asarray(x)) for x in inputs]
        out = np.asarray(jax.device_get(_decode(self.action_decoder, *padded)))  # (B', H, s, A')
        return self.stats.from_model(out[:rows, ..., :self.action_dim])

    def encode_clips(self, first: np.ndarray, clips: np.ndarray) -> np.ndarray:
        """(B, H + 1, E) the action decoder's encodings of uint8 observations (B, N, N, 3) and
        the clips (B, H, N, N, 3) imagined from them, for `decode_interval`."""
        b = len(clips)
        video = np.concatenate([np.asarray(first)[:, None], clips], axis=1)
        return np.asarray(jax.device_get(_encode(self.action_decoder, self._padded(video))))[:b]

    def decode_interval(self, codes: np.ndarray, observations: np.ndarray, j: int,
                        start_xy: np.ndarray, goal_xy: np.ndarray, sgg_valid: np.ndarray,
                        texts: Sequence[str]) -> np.ndarray:
        """(B, s, A) per-step actions from live uint8 observations (B, N, N, 3) to frame j of
        clips encoded by `encode_clips` (B, H + 1, E), with start_xy (B, 2) the gripper's place
        in the observation each clip was imagined from. Decoded as in training, from the whole
        clip, with the frame before interval j swapped for the live observation (the world may
        have drifted from the clip): what `decode` gives for that clip, at interval j."""
        b = len(codes)
        inputs = [self._padded(np.asarray(x)) for x in (codes, observations, start_xy, goal_xy,
                                                          sgg_valid, *self._tokens(texts))]
        out = np.asarray(jax.device_get(_decode_interval(
            self.action_decoder, inputs[0], inputs[1], np.int32(j), *inputs[2:])))  # (B', s, A')
        return self.stats.from_model(out[:b, ..., :self.action_dim])

    def _tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(B, L) token ids and mask of B primitives' words."""
        return encode_batch(self.tokenizer, list(texts), int(self.config.data.max_text_tokens))

    def context(self, observations: np.ndarray) -> np.ndarray:
        """(B, C, N, N, 3): observations (B, N, N, 3) as the models' C context frames."""
        return np.repeat(np.asarray(observations)[:, None], self.context_frames, axis=1)

    def _padded(self, rows: np.ndarray) -> np.ndarray:
        """`rows` (B, ...) padded to the fixed batch size with copies of the first row, so the
        jitted sampler and decoder compile once."""
        pad = self.batch_size - len(rows)
        return np.concatenate([rows, np.repeat(rows[:1], pad, axis=0)]) if pad else rows
