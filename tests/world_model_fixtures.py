"""Shared helpers for the world-model tests: a tiny text encoder, configs, synthetic clips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from conftest import tiny_config
from pewm_jax.diffusion import loss_fn
from pewm_jax.models import WorldModel

VOCAB = 32
TEXT_TOKENS = 4


class EmbeddingTextEncoder(nnx.Module):
    """A stand-in for the project's TextEncoder (same call signature): a token embedding table."""

    def __init__(self, width: int, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, width, rngs=rngs)

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        return self.embed(tokens) * mask[..., None]  # (B, L, width)


def small_config(*overrides: str, image: int = 16, horizon: int = 4, patch: int = 4,
                 width: int = 32, depth: int = 1):
    """The quickstart config shrunk to a model that compiles in seconds on a CPU."""
    return tiny_config(f"world.image_size={image}", f"data.horizon={horizon}",
                       f"model.patch_size={patch}", f"model.width={width}", f"model.depth={depth}",
                       f"model.text_width={width}", "model.num_heads=2",
                       f"data.max_text_tokens={TEXT_TOKENS}", *overrides)


def make_model(config, seed: int = 0) -> WorldModel:
    """A world model for `config` around the embedding text encoder."""
    rngs = nnx.Rngs(seed)
    return WorldModel.from_config(config, rngs,
                                  text_encoder=EmbeddingTextEncoder(config.model.text_width, rngs))


def randomize(module: nnx.Module, seed: int, scale: float = 0.2) -> None:
    """Adds Gaussian noise to every parameter of `module` in place, like training would: the
    zero-initialised gates and output head stop being zero, so outputs depend on the inputs."""
    rng = np.random.default_rng(seed)  # numpy: no per-shape compilation of random ops
    params = nnx.state(module, nnx.Param)
    noisy = jax.tree.map(lambda x: jnp.asarray(
        np.asarray(x) + scale * rng.standard_normal(x.shape), x.dtype), params)
    nnx.update(module, noisy)


def moving_square_clips(num: int, image: int, horizon: int, seed: int = 0,
                        max_move: float | None = None) -> dict[str, np.ndarray]:
    """`num` clips (BatchSpec keys): a 5x5 square of a clip-specific colour moving in a straight
    line from a start to a goal point (at most `max_move` pixels away per axis if given) over
    the horizon, on a clip-specific grey background. The context frame shows the square at the
    start; text token = clip index + 1 (modulo the vocabulary)."""
    rng = np.random.default_rng(seed)
    start = rng.uniform(3, image - 3, (num, 2)).astype(np.float32)
    goal = rng.uniform(3, image - 3, (num, 2)).astype(np.float32)
    if max_move is not None:
        goal = np.clip(start + rng.uniform(-max_move, max_move, (num, 2)), 3, image - 3)
        goal = goal.astype(np.float32)
    colours = rng.integers(120, 256, (num, 3))
    backgrounds = rng.integers(0, 80, (num,))
    frames = np.zeros((num, horizon + 1, image, image, 3), np.uint8)
    ys, xs = np.mgrid[0:image, 0:image] + 0.5
    for i in range(num):
        for f in range(horizon + 1):
            cx, cy = start[i] + (goal[i] - start[i]) * f / horizon
            inside = (np.abs(xs - cx) <= 2) & (np.abs(ys - cy) <= 2)
            frames[i, f] = backgrounds[i]
            frames[i, f][inside] = colours[i]
    tokens = np.zeros((num, TEXT_TOKENS), np.int32)
    tokens[:, 0] = np.arange(num) % (VOCAB - 1) + 1
    mask = tokens != 0
    return {"context": frames[:, :1], "frames": frames[:, 1:], "text_tokens": tokens,
            "text_mask": mask, "start_xy": start, "goal_xy": goal,
            "sgg_valid": np.ones((num,), bool),
            "actions": np.zeros((num, horizon, 2, 4), np.float32),
            "action_valid": np.ones((num, horizon, 2), bool),
            "action_mask": np.ones((num, 4), bool), "gripper_mask": np.zeros((num, 4), bool),
            "dataset_id": np.zeros((num,), np.int32)}


def train(model: WorldModel, config, batch_fn, steps: int, learning_rate: float,
          seed: int = 0) -> list[float]:
    """Trains `model` in place with AdamW on `batch_fn(step)` batches; returns the losses."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, learning_rate, 20, steps),
                      b2=0.95, weight_decay=0.0)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch, key):
        def loss(p):
            return loss_fn(nnx.merge(graphdef, p, rest), batch, key, config)[0]
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    losses = []
    for i in range(steps):
        params, opt_state, value = step(params, opt_state, batch_fn(i),
                                        jax.random.fold_in(jax.random.key(seed), i))
        losses.append(float(value))
    nnx.update(model, params)
    return losses


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    return float(10 * np.log10(1.0 / max(np.mean((np.asarray(a) - np.asarray(b)) ** 2), 1e-12)))


def moving_dot_clips(num: int, image: int, horizon: int,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`num` clips of a white dot (radius 1.5 px) on black travelling in a straight line from a
    random start point to a random goal point; the same text for every clip, so only SGG
    tells where the dot goes. The context frame shows the dot at the start."""
    start = rng.uniform(2, image - 2, (num, 2)).astype(np.float32)
    goal = rng.uniform(2, image - 2, (num, 2)).astype(np.float32)
    ys, xs = np.mgrid[0:image, 0:image] + 0.5
    frames = np.zeros((num, horizon + 1, image, image, 3), np.uint8)
    for f in range(horizon + 1):
        centre = start + (goal - start) * f / horizon  # (num, 2)
        d2 = ((xs[None] - centre[:, 0, None, None]) ** 2
              + (ys[None] - centre[:, 1, None, None]) ** 2)  # (num, image, image)
        frames[:, f] = (255 * (d2 <= 1.5 ** 2))[..., None].astype(np.uint8)
    tokens = np.zeros((num, TEXT_TOKENS), np.int32)
    tokens[:, 0] = 1
    return {"context": frames[:, :1], "frames": frames[:, 1:], "text_tokens": tokens,
            "text_mask": tokens != 0, "start_xy": start, "goal_xy": goal,
            "sgg_valid": np.ones((num,), bool)}


def dot_position(frame: np.ndarray) -> np.ndarray:
    """(x, y) pixel centre of the brightest 3x3 neighbourhood of an (N, N, 3) frame."""
    grey = frame.mean(-1)
    n = grey.shape[0]
    padded = np.pad(grey, 1)
    blur = sum(padded[i:i + n, j:j + n] for i in range(3) for j in range(3))
    row, col = np.unravel_index(np.argmax(blur), grey.shape)
    return np.array([col + 0.5, row + 0.5])
