"""Inverse dynamics: a clip's frames -> the per-step actions between consecutive frames.

The clip contract (DESIGN.md "Clip"): frame j of a clip follows frame j - 1 by `s` environment
steps (frame 0 being the last context frame), and the clip carries the action of each of those
steps, `batch['actions'][:, j - 1]` of shape (s, A): continuous dimensions normalised with the
dataset statistics, gripper dimensions as the command (1 high, 0 low; `gripper_mask`). The
controller plays the decoded actions as they are.

Why this architecture: the actions of a frame interval are fixed by *where* the gripper and the
objects are in the frames around it (a displacement to within a fraction of a pixel, whether
the fingers closed, whether an object moved with the gripper or was pushed), not by what the
images look like. So each frame goes through a small convolutional encoder whose last layer
is read out as keypoints by a spatial soft-argmax (Levine et al. 2016, "End-to-End Training of
Deep Visuomotor Policies"): the expected (x, y) of each of K feature maps, sub-pixel precise on
anti-aliased frames, plus the mean of the features (grip state, what is held). Keypoint 0 is
tied to the gripper: the start point of a clip is where the gripper is in its context frame
(DESIGN.md), so training pulls that keypoint onto it (`action_decoder.locate_weight`; 0.14 px
RMS after 1000 quickstart steps), and the encoder, shared by every frame, then finds the
gripper in all of them. A shared MLP reads, for each interval, the encodings of the frames
before, at the end of and after it, of the context frame, the primitive's start and goal
points, and the gripper's motion in and after the interval and its offset from the goal
(where an interval's motion stops and the gripper command changes: a pick closes on
arrival), and writes the interval's `s` actions.

The gripper commands come from a second MLP that reads none of the frames' appearance after
the interval's first: the primitive's words (a bag of learned word embeddings: "pick" closes
on arrival, "place" opens, "grasp" closes at once), the encodings of the interval's first frame
and of the context frame, the points, and the gripper keypoint's motion. Under closed-loop
tracking both encodings are of live observations, so the commands do not hang on how sharply
an imagined clip draws the fingers (measured: decoded from the world model's clips, the motion
head's gripper commands were 62-74% right against 99.5% from true frames). Which action
dimensions are gripper commands is fixed by the data (`gripper_dims`).

Shapes: B batch, H horizon (intervals), S image side, C channels, K keypoints, E = 2K + C
(one frame's encoding), D MLP width, s steps per interval, A action size, L text tokens, T word
embedding width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from pewm_jax.models.layers import Dense, constrain, make_param


@dataclasses.dataclass(frozen=True)
class ActionDecoderSpec:
    """The architecture (config.action_decoder plus the data's image, stride and action sizes)."""

    image_size: int  # S
    frame_stride: int  # s: actions per frame interval
    channels: int  # C: convolution channels
    keypoints: int  # K: soft-argmax keypoints per frame
    width: int  # D: MLP width
    depth: int  # hidden layers of the MLP
    action_dim: int  # A: the largest action size of the mixture
    gripper_dims: tuple[int, ...]  # action dimensions that are gripper commands (any dataset)
    vocab_size: int  # V: the tokenizer's vocabulary
    text_width: int  # T: word embedding width

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, action_dim: int,
                    gripper_dims: Sequence[int], vocab_size: int) -> "ActionDecoderSpec":
        a = config.action_decoder
        return cls(image_size=config.world.image_size, frame_stride=config.data.frame_stride,
                   channels=a.channels, keypoints=a.keypoints, width=a.width, depth=a.depth,
                   action_dim=action_dim, gripper_dims=tuple(sorted(int(d) for d in gripper_dims)),
                   vocab_size=vocab_size, text_width=a.text_width)

    @property
    def encoding(self) -> int:
        return 2 * self.keypoints + self.channels  # E


class Conv(nnx.Module):
    """A 2-D convolution over NHWC images, 'SAME' padded (replicated: the decoder is small)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, *,
                 rngs: nnx.Rngs, dtype, param_dtype):
        init = nnx.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
        self.kernel = make_param(init, (None, None, None, None), rngs.params(),
                                 (kernel, kernel, in_channels, out_channels), param_dtype)
        self.bias = make_param(nnx.initializers.zeros_init(), (None,), rngs.params(),
                               (out_channels,), param_dtype)
        self.stride, self.dtype = stride, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride,) * 2,
            "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(self.dtype)


class FrameEncoder(nnx.Module):
    """(M, S, S, 3) frames in [-1, 1] -> (M, E): K soft-argmax keypoints and C mean features."""

    def __init__(self, spec: ActionDecoderSpec, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        c = spec.channels
        self.conv1 = Conv(5, c, 5, 2, **kw)  # frame + 2 coordinate channels, to S/2
        self.conv2 = Conv(c, c, 3, 1, **kw)
        self.conv3 = Conv(c, c, 3, 1, **kw)
        self.keypoint_maps = Conv(c, spec.keypoints, 1, 1, **kw)
        self.dtype = dtype

    def __call__(self, frames: jax.Array) -> jax.Array:
        m, s = frames.shape[0], frames.shape[1]
        axis = (jnp.arange(s, dtype=jnp.float32) + 0.5) / s * 2.0 - 1.0  # pixel centres
        coords = jnp.broadcast_to(jnp.stack(jnp.meshgrid(axis, axis), -1), (m, s, s, 2))
        x = jnp.concatenate([frames.astype(jnp.float32), coords], -1)  # (M, S, S, 5)
        x = jax.nn.relu(self.conv1(x))  # (M, S/2, S/2, C)
        x = jax.nn.relu(self.conv2(x))
        x = jax.nn.relu(self.conv3(x)) + x
        maps = self.keypoint_maps(x).astype(jnp.float32)  # (M, S/2, S/2, K)
        n = maps.shape[1]
        weights = jax.nn.softmax(maps.reshape(m, n * n, -1), axis=1)  # (M, S/2 * S/2, K)
        grid = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n * 2.0 - 1.0
        gx, gy = jnp.meshgrid(grid, grid)  # (S/2, S/2) each
        keypoints = jnp.stack([jnp.einsum("mpk,p->mk", weights, gx.reshape(-1)),
                               jnp.einsum("mpk,p->mk", weights, gy.reshape(-1))], -1)  # (M, K, 2)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # (M, C)
        return jnp.concatenate([keypoints.reshape(m, -1), pooled], -1)  # (M, E)


class ActionDecoder(nnx.Module):
    """`model(context, frames, start_xy, goal_xy, sgg_valid, text_tokens, text_mask)` ->
    (B, H, s, A) per-step actions (normalised continuous dimensions; gripper logits) between
    consecutive frames."""

    def __init__(self, spec: ActionDecoderSpec, *, rngs: nnx.Rngs,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32):
        if spec.image_size % 2:
            raise ValueError(f"the action decoder needs an even image size, got {spec.image_size}")
        if any(not 0 <= d < spec.action_dim for d in spec.gripper_dims):
            raise ValueError(f"gripper dimensions {spec.gripper_dims} outside the "
                             f"{spec.action_dim} action dimensions")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.spec, self.dtype = spec, dtype
        self.encoder = FrameEncoder(spec, **kw)
        self.word_embed = make_param(nnx.initializers.normal(1.0), (None, None), rngs.params(),
                                     (spec.vocab_size, spec.text_width), param_dtype)  # (V, T)
        self.hidden = _mlp(_mlp_inputs(spec), spec, **kw)
        self.head = Dense(spec.width, (spec.frame_stride, spec.action_dim), ("embed", None, None),
                          **kw)
        self.gripper_hidden = _mlp(_gripper_inputs(spec), spec, **kw)
        self.gripper_head = Dense(spec.width, (spec.frame_stride, spec.action_dim),
                                  ("embed", None, None), **kw)

    def __call__(self, context: jax.Array, frames: jax.Array, start_xy: jax.Array,
                 goal_xy: jax.Array, sgg_valid: jax.Array, text_tokens: jax.Array,
                 text_mask: jax.Array) -> jax.Array:
        """context (B, C', S, S, 3) and frames (B, H, S, S, 3), uint8 or [-1, 1] floats; points
        (B, 2) pixels, sgg_valid (B,), the primitive's tokens (B, L) and their mask (B, L) ->
        actions (B, H, s, A): interval j takes frame j - 1 (the last context frame for j = 0)
        to frame j."""
        return self.decode(context, frames, start_xy, goal_xy, sgg_valid, text_tokens,
                           text_mask)[0]

    def decode(self, context: jax.Array, frames: jax.Array, start_xy: jax.Array,
               goal_xy: jax.Array, sgg_valid: jax.Array, text_tokens: jax.Array,
               text_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`__call__`'s actions (B, H, s, A) and the gripper keypoint of every frame (B, H + 1, 2)
        in pixels (frame 0 the last context frame), which training ties to the start point."""
        video = jnp.concatenate([_unit(context[:, -1:]), _unit(frames)], axis=1)
        return self.read(self.encode(video), start_xy, goal_xy, sgg_valid, text_tokens,
                         text_mask)

    def encode(self, video: jax.Array) -> jax.Array:
        """(B, F, S, S, 3) frames, uint8 or [-1, 1] floats -> (B, F, E) encodings, each frame
        on its own (so a controller can swap one frame's encoding for a live observation's)."""
        b, f, s = video.shape[0], video.shape[1], self.spec.image_size
        return self.encoder(_unit(video).reshape(b * f, s, s, 3)).reshape(b, f, -1)

    def words(self, text_tokens: jax.Array, text_mask: jax.Array) -> jax.Array:
        """(B, L) tokens and mask -> (B, T): the mean of the real tokens' embeddings."""
        mask = text_mask.astype(jnp.float32)[..., None]  # (B, L, 1)
        embedded = self.word_embed[...].astype(jnp.float32)[text_tokens]  # (B, L, T)
        return jnp.sum(embedded * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1.0)

    def read(self, codes: jax.Array, start_xy: jax.Array, goal_xy: jax.Array,
             sgg_valid: jax.Array, text_tokens: jax.Array, text_mask: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
        """`decode` from the encodings (B, H + 1, E) of the context frame and the H frames."""
        b, h, s = codes.shape[0], codes.shape[1] - 1, self.spec.image_size
        gripper = codes[..., :2]  # (B, H + 1, 2) keypoint 0, in [-1, 1]
        before, after = codes[:, :-1], codes[:, 1:]  # (B, H, E) each
        following = jnp.concatenate([codes[:, 2:], codes[:, -1:]], axis=1)  # (B, H, E)
        first = jnp.broadcast_to(codes[:, :1], before.shape)  # the context frame
        valid = sgg_valid.astype(jnp.float32)[:, None]
        start, goal = start_xy / s * 2.0 - 1.0, goal_xy / s * 2.0 - 1.0  # (B, 2) each
        points = jnp.concatenate([start * valid, goal * valid, valid], -1)  # (B, 5)
        # The gripper's motion and where it stands to the goal, in pixels / 8: what fixes how
        # an interval's motion splits over its steps (the close of a pick comes on arrival).
        scale = s / 16.0
        g0, g1 = gripper[:, :-1], gripper[:, 1:]  # (B, H, 2) before / after each interval
        g2 = jnp.concatenate([gripper[:, 2:], gripper[:, -1:]], axis=1)
        relative = jnp.concatenate([g1 - g0, g2 - g1, (goal[:, None] - g0) * valid[:, None],
                                    (goal[:, None] - g1) * valid[:, None]], -1) * scale
        words = self.words(text_tokens, text_mask)  # (B, T)
        shared = jnp.concatenate([  # (B, H, T + 13): words, points and the gripper's motion
            jnp.broadcast_to(words[:, None], (b, h, words.shape[-1])),
            jnp.broadcast_to(points[:, None], (b, h, 5)), relative], -1)
        x = jnp.concatenate([before, after, following, first, after - before, shared], -1)
        motion = self.head(_run(self.hidden, x, self.dtype)).astype(jnp.float32)  # (B, H, s, A)
        x = jnp.concatenate([before, first, shared], -1)  # (B, H, 2E + T + 13)
        grip = self.gripper_head(_run(self.gripper_hidden, x, self.dtype)).astype(jnp.float32)
        is_gripper = np.zeros(self.spec.action_dim, bool)
        is_gripper[list(self.spec.gripper_dims)] = True
        return jnp.where(is_gripper, grip, motion), (gripper + 1.0) * (s / 2.0)


def _mlp(inputs: int, spec: ActionDecoderSpec, **kw) -> nnx.List:
    """`spec.depth` Dense layers of width D, the first reading `inputs` features."""
    return nnx.List([Dense(inputs if i == 0 else spec.width, spec.width,
                           (None, "mlp") if i == 0 else ("embed", "mlp"), **kw)
                     for i in range(spec.depth)])


def _run(layers: nnx.List, x: jax.Array, dtype) -> jax.Array:
    """(B, H, in) -> (B, H, D) through GELU layers."""
    x = constrain(x.astype(dtype), ("batch", "frames", None))
    for layer in layers:
        x = jax.nn.gelu(layer(x))
    return x


def build_action_decoder(config: ml_collections.ConfigDict, action_dim: int,
                         gripper_dims: Sequence[int], vocab_size: int,
                         rngs: nnx.Rngs) -> ActionDecoder:
    """A randomly initialised action decoder of config.action_decoder for the data's action
    size, gripper dimensions and vocabulary."""
    a = config.action_decoder
    return ActionDecoder(ActionDecoderSpec.from_config(config, action_dim, gripper_dims,
                                                       vocab_size), rngs=rngs,
                         dtype=jnp.dtype(a.dtype), param_dtype=jnp.dtype(a.param_dtype))


def action_decoder_flops(spec: ActionDecoderSpec, batch_size: int, horizon: int) -> float:
    """Matmul and convolution FLOPs of one training step (forward + backward = 3 x forward) on
    `batch_size` clips of `horizon` intervals: the encoder on H + 1 frames, the two MLP heads
    on H."""
    n, c = (spec.image_size // 2) ** 2, spec.channels
    per_frame = n * (25 * 5 * c + 2 * 9 * c * c + c * spec.keypoints + 2 * spec.keypoints)
    per_interval = sum(inputs * spec.width + (spec.depth - 1) * spec.width ** 2
                       + spec.width * spec.frame_stride * spec.action_dim
                       for inputs in (_mlp_inputs(spec), _gripper_inputs(spec)))
    return 3.0 * 2.0 * batch_size * ((horizon + 1) * per_frame + horizon * per_interval)


def _mlp_inputs(spec: ActionDecoderSpec) -> int:
    """Motion head features per interval: 4 frames' encodings and a difference, the words,
    start, goal, sgg_valid, and 4 gripper vectors (motion in and after the interval, the goal
    from before and after it)."""
    return 5 * spec.encoding + spec.text_width + 5 + 8


def _gripper_inputs(spec: ActionDecoderSpec) -> int:
    """Gripper head features per interval: the interval's first frame's and the context frame's
    encodings, the words, the points and the 4 gripper vectors."""
    return 2 * spec.encoding + spec.text_width + 5 + 8


def _unit(video: jax.Array) -> jax.Array:
    """uint8 pixels -> [-1, 1]; floats are taken as already there (sampled clips)."""
    if jnp.issubdtype(video.dtype, jnp.integer):
        return video.astype(jnp.float32) / 127.5 - 1.0
    return video.astype(jnp.float32)


def decode_batch(model: ActionDecoder, batch: Mapping[str, jax.Array]) -> jax.Array:
    """The decoder's (B, H, s, A) outputs for a batch's clips, points and words."""
    return model(batch["context"], batch["frames"], batch["start_xy"], batch["goal_xy"],
                 batch["sgg_valid"], batch["text_tokens"], batch["text_mask"])


def action_errors(predicted: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-step errors of (B, H, s, A) outputs against the batch's actions: squared error of the
    normalised continuous dimensions, binary cross-entropy and accuracy of the gripper commands
    (each a mean over the real dimensions and steps)."""
    target = batch["actions"]
    shape = target.shape
    real = jnp.broadcast_to(batch["action_mask"][:, None, None, :], shape)
    grip = jnp.broadcast_to(batch["gripper_mask"][:, None, None, :], shape)
    cont = (real & ~grip).astype(jnp.float32)
    grip = grip.astype(jnp.float32)
    mse = jnp.sum(jnp.square(predicted - target) * cont) / jnp.maximum(jnp.sum(cont), 1.0)
    bce = jnp.sum(optax.sigmoid_binary_cross_entropy(predicted, target) * grip) / jnp.maximum(
        jnp.sum(grip), 1.0)
    right = ((predicted > 0) == (target > 0.5)).astype(jnp.float32)
    accuracy = jnp.sum(right * grip) / jnp.maximum(jnp.sum(grip), 1.0)
    return {"action_mse": mse, "gripper_bce": bce, "gripper_accuracy": accuracy}


def gripper_error(keypoints: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Mean squared pixel distance between the context frame's gripper keypoint (B, H + 1, 2)
    and the start point, over clips whose points are valid: the start point is where the
    gripper is in the context frame (DESIGN.md), so keypoint 0 learns to find the gripper."""
    valid = batch["sgg_valid"].astype(jnp.float32)
    err = jnp.sum(jnp.square(keypoints[:, 0] - batch["start_xy"]), -1)
    return jnp.sum(err * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def action_loss(model: ActionDecoder, batch: Mapping[str, jax.Array], rng: jax.Array | None,
                config: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Squared error of the continuous dimensions plus cross-entropy of the gripper commands,
    over every step of every interval (padding steps are no-ops to decode too), plus
    `action_decoder.locate_weight` x the gripper keypoint's squared pixel error."""
    del rng  # deterministic
    weight = config.action_decoder.locate_weight
    predicted, keypoints = model.decode(batch["context"], batch["frames"], batch["start_xy"],
                                        batch["goal_xy"], batch["sgg_valid"],
                                        batch["text_tokens"], batch["text_mask"])
    errors = action_errors(predicted, batch)
    located = gripper_error(keypoints, batch)
    loss = errors["action_mse"] + errors["gripper_bce"] + weight * located
    return loss, {"loss": loss, "gripper_px2": located, **errors}
