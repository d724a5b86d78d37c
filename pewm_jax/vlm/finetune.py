"""What the trainer needs to fine-tune the planner: its architecture, its loss, its FLOPs.

The planner is a `PaliGemma` whose architecture comes from the config: a converted model's
Hugging Face config.json (`config.planner.hf_config`, its weights then come with
`--init_from`), or the small planner of `tiny_planner_spec` trained from scratch over the
dataset's tokenizer. The loss is the plan's negative log-likelihood given image and prompt
(prefix-LM: image and prompt attended both ways, the plan causally), averaged over the plan
tokens of the batch (`PlanBatchSpec`), with soft targets for location tokens, plus a
grounding loss on where the planner looks while it writes a point.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tokenizers
from flax import nnx

from pewm_jax.text.tokenizer import NUM_LOCATION_BINS, SPECIALS
from pewm_jax.config import ConfigError
from pewm_jax.vlm.paligemma import PaliGemma, PaliGemmaSpec, read_paligemma_config
from pewm_jax.vlm.planner import Planner, tiny_planner_spec, unit_pixels


# The project tokenizer's layout: the specials, then <loc0000>..<loc1023>.
LOCATION_BASE = len(SPECIALS)


def planner_spec(config: ml_collections.ConfigDict, vocab_size: int) -> PaliGemmaSpec:
    """The planner architecture of `config` for a tokenizer of `vocab_size` ids.

    Raises ConfigError when a converted model's embedding table cannot hold the tokenizer.
    """
    p = config.planner
    if not p.hf_config:
        return tiny_planner_spec(vocab_size, p.image_size, p.patch_size, p.width, p.depth,
                                 p.kv_heads)
    spec = PaliGemmaSpec.from_hf_config(read_paligemma_config(p.hf_config))
    if vocab_size > spec.vocab_size:
        raise ConfigError(
            f"config.planner.tokenizer {p.tokenizer!r} has {vocab_size} ids but the model of "
            f"config.planner.hf_config {p.hf_config!r} embeds only {spec.vocab_size}. Fix: use "
            "the tokenizer that came with that model.")
    return spec


def fourier_features(positions: jax.Array, width: int, scale: float) -> jax.Array:
    """(P,) positions in [0, 1] -> (P, width): sines and cosines at width / 2 frequencies from
    1/2 to 64 cycles over [0, 1], with rms `scale`. Near positions get near features."""
    freqs = jnp.geomspace(0.5, 64.0, width // 2)  # (width / 2,)
    angles = 2 * jnp.pi * positions[:, None] * freqs[None]  # (P, width / 2)
    features = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # (P, width)
    return features * scale * jnp.sqrt(2.0)  # sin/cos have rms 1/sqrt(2)


def location_embeddings(width: int, scale: float) -> jax.Array:
    """(1024, width) embeddings of the location bins: `fourier_features` of the bin centres.

    Neighbouring bins get similar embeddings, so what the planner learns about one bin carries
    to its neighbours (random rows would have to be learnt bin by bin, 16 bins to a pixel).
    """
    return fourier_features((jnp.arange(NUM_LOCATION_BINS) + 0.5) / NUM_LOCATION_BINS, width,
                            scale)


def patch_position_embeddings(grid: int, width: int, scale: float) -> jax.Array:
    """(grid * grid, width) position embeddings of row-major patches: `fourier_features` of
    the patch centre's x in the first half of the width and of its y in the second, the same
    frequencies as `location_embeddings`, so 'where' in the image and 'where' in a plan start
    out in the same terms."""
    centres = (jnp.arange(grid) + 0.5) / grid
    x = fourier_features(jnp.tile(centres, grid), width // 2, scale)  # column of each patch
    y = fourier_features(jnp.repeat(centres, grid), width - width // 2, scale)  # its row
    return jnp.concatenate([x, y], axis=-1)


def build_planner(config: ml_collections.ConfigDict, vocab_size: int,
                  rngs: nnx.Rngs) -> PaliGemma:
    """A randomly initialised planner of `config`'s architecture (weights come later, if any).

    The from-scratch planner's location-token embeddings (ids 5..1028 of the project
    tokenizer, `pewm_jax.text.tokenizer`) start as `location_embeddings` at the random rows'
    scale and its patch position embeddings as `patch_position_embeddings`; a converted model
    keeps its own.
    """
    model = PaliGemma(planner_spec(config, vocab_size), rngs=rngs,
                      dtype=jnp.dtype(config.planner.dtype),
                      param_dtype=jnp.dtype(config.planner.param_dtype))
    if not config.planner.hf_config:
        table = model.text.embed[...]  # (V, D), initialised normal(0.02)
        rows = location_embeddings(table.shape[1], 0.02).astype(table.dtype)
        model.text.embed[...] = table.at[LOCATION_BASE:LOCATION_BASE + NUM_LOCATION_BINS].set(
            rows)
        pos = model.vision.pos_embed  # (N, Dv): as strong as the patch embedding's output
        grid = model.spec.image_size // model.spec.patch_size
        pos[...] = patch_position_embeddings(grid, pos.shape[1], 0.5).astype(pos.dtype)
    return model


def make_planner(model: PaliGemma, tokenizer: tokenizers.Tokenizer,
                 config: ml_collections.ConfigDict) -> Planner:
    """The `Planner` policy around a fine-tuned `model`: prompts padded and plans bounded as
    in its fine-tuning data (config.planner)."""
    p = config.planner
    return Planner(model, tokenizer, max_steps=p.max_steps, max_words=p.max_words,
                   prompt_tokens=p.prompt_tokens, max_new_tokens=p.max_tokens - p.prompt_tokens,
                   plans_remaining=p.get("mid_task_fraction", 0.0) > 0)  # older runs: 0


def plan_loss(model: PaliGemma, batch: Mapping[str, jax.Array], rng: jax.Array,
              config: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of the plan tokens (`target_mask`) given image and prompt, and the
    token accuracy of greedy next-token prediction (teacher forcing).

    A location token's target is a Gaussian over the neighbouring bins (standard deviation
    config.planner.location_sigma_px pixels of the planner's image; `target_bins` says which
    tokens are locations), so that a prediction one bin off costs little and learning where
    things are gets a gradient that points the right way; 0 gives one-hot targets. The plan's
    location tokens are also inputs (teacher forcing); with `rng` they are moved by
    config.planner.location_input_noise_px pixels of Gaussian noise (targets stay exact).
    With config.planner.grounding_weight > 0 the loss adds that times `grounding_loss` of the
    last decoder layer's first head, on the batch's `ground_bins` (the target's standard
    deviation config.planner.grounding_sigma_px). Metrics: `loss` (what is minimised), its
    parts `plan_nll` and `grounding_loss`, and `token_accuracy`.
    """
    image = unit_pixels(batch["image"]).astype(model.text.dtype)  # (B, S, S, 3)
    tokens = batch["tokens"]  # (B, L)
    inputs = tokens
    noise_px = config.planner.location_input_noise_px
    if noise_px > 0 and rng is not None:
        # The plan's own location tokens, as inputs, moved by Gaussian noise: exact earlier
        # points would let the model recall a training scene from them instead of looking.
        bins = batch["target_bins"]  # (B, L)
        shift = jnp.round(jax.random.normal(rng, bins.shape) * noise_px * NUM_LOCATION_BINS
                          / model.spec.image_size).astype(tokens.dtype)
        moved = tokens + jnp.clip(bins + shift, 0, NUM_LOCATION_BINS - 1) - bins
        inputs = jnp.where(bins >= 0, moved, tokens)
    weight = config.planner.get("grounding_weight", 0.0)
    if weight > 0:
        logits, scores = model.with_scores(image, inputs, batch["prefix_len"],
                                           layer=model.spec.num_layers - 1)
    else:
        logits = model(image, inputs, batch["prefix_len"])  # (B, N + L, V)
    predicted = logits[:, model.spec.num_image_tokens:-1]  # (B, L - 1, V): next-token logits
    labels, mask = tokens[:, 1:], batch["target_mask"][:, 1:].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(predicted, labels)  # (B, L - 1)
    sigma_px = config.planner.location_sigma_px
    if sigma_px > 0:
        sigma = sigma_px * NUM_LOCATION_BINS / model.spec.image_size  # in bins
        offsets = jnp.arange(-int(np.ceil(3 * sigma)), int(np.ceil(3 * sigma)) + 1)  # (K,)
        bins = batch["target_bins"][:, 1:, None] + offsets  # (B, L - 1, K)
        weights = jnp.exp(-0.5 * (offsets / sigma) ** 2) * (
            (bins >= 0) & (bins < NUM_LOCATION_BINS))
        weights = weights / jnp.maximum(jnp.sum(weights, -1, keepdims=True), 1e-9)
        ids = jnp.clip(labels[..., None] + offsets, 0, predicted.shape[-1] - 1)  # consecutive
        log_p = (jnp.take_along_axis(predicted, ids, axis=-1)
                 - jax.nn.logsumexp(predicted, axis=-1, keepdims=True))  # (B, L - 1, K)
        soft = -jnp.sum(weights * log_p, axis=-1)
        ce = jnp.where(batch["target_bins"][:, 1:] >= 0, soft, ce)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    loss = jnp.sum(ce * mask) / count
    accuracy = jnp.sum((jnp.argmax(predicted, axis=-1) == labels) * mask) / count
    metrics = {"plan_nll": loss, "token_accuracy": accuracy}
    if weight > 0:
        metrics["grounding_loss"] = grounding_loss(
            scores[:, 0], batch["ground_bins"], model.spec, config.planner.grounding_sigma_px)
        loss = loss + weight * metrics["grounding_loss"]
    return loss, {"loss": loss, **metrics}


def grounding_loss(scores: jax.Array, ground_bins: jax.Array, spec: PaliGemmaSpec,
                   sigma_px: float) -> jax.Array:
    """Cross-entropy of where one attention head looks when the planner writes a point.

    scores (B, N + L, N + L): a head's attention logits over image + text. The rows that
    predict a point's two location tokens (y, then x) should put their weight on the image
    patches at the point's anchor, `ground_bins` (B, L) (the batch's: the point itself, or
    for an approach's goal, a gap behind an object, that object): the target is a Gaussian
    over patch centres (standard deviation `sigma_px` pixels of the planner's image). A
    planner trained from scratch otherwise takes thousands of steps to find this readout by
    itself (README "Fine-tuning and evaluating the planner"); with it, the plan's points
    follow the image. Anchored on the empty gap itself, the head had nothing to find there,
    and approach goals landed near their objects instead (README "Fine-tuning and evaluating
    the planner").
    """
    n, grid = spec.num_image_tokens, spec.image_size // spec.patch_size
    b, length = ground_bins.shape
    is_loc = ground_bins >= 0  # (B, L)
    is_y = is_loc & (jnp.cumsum(is_loc, axis=1) % 2 == 1)  # y tokens are the odd-numbered ones
    y = jnp.where(is_y, ground_bins, jnp.roll(ground_bins, 1, axis=1))  # each point's y bin
    x = jnp.where(is_y, jnp.roll(ground_bins, -1, axis=1), ground_bins)  # and x bin, (B, L)
    centres = (jnp.arange(grid) + 0.5) / grid  # (G,) patch centres in [0, 1]
    scale = spec.image_size / sigma_px  # (B, L, G) offsets below in standard deviations
    dy = ((y[..., None] + 0.5) / NUM_LOCATION_BINS - centres) * scale
    dx = ((x[..., None] + 0.5) / NUM_LOCATION_BINS - centres) * scale
    target = jnp.exp(-0.5 * (dy[..., :, None] ** 2 + dx[..., None, :] ** 2))
    target = target.reshape(b, length, n)
    target = target / jnp.sum(target, axis=-1, keepdims=True)  # (B, L, N)
    rows = scores[:, n - 1:n + length - 1]  # (B, L, N + L): the rows predicting text token t
    log_w = jax.nn.log_softmax(rows, axis=-1)[..., :n]  # (B, L, N) on the image patches
    ce = -jnp.sum(target * log_w, axis=-1)  # (B, L)
    return jnp.sum(ce * is_loc) / jnp.maximum(jnp.sum(is_loc), 1)


def planner_flops(spec: PaliGemmaSpec, batch_size: int, max_tokens: int) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3 x forward) on `batch_size`
    examples of `max_tokens` text tokens: SigLIP over the patches, the projector, the Gemma
    decoder over image + text tokens (attention scores included) and the LM head."""
    n = spec.num_image_tokens
    t = n + max_tokens
    patch = spec.patch_size ** 2 * spec.num_channels * spec.vision_width
    vision_layer = 4 * spec.vision_width ** 2 + 2 * spec.vision_width * spec.vision_mlp_dim
    vision = n * (patch + spec.vision_layers * vision_layer) + 2 * n * n * spec.vision_width \
        * spec.vision_layers
    heads = spec.num_heads * spec.head_dim
    text_layer = spec.width * (2 * heads + 2 * spec.num_kv_heads * spec.head_dim) \
        + 3 * spec.width * spec.mlp_dim
    text = t * spec.num_layers * text_layer + 2 * t * t * heads * spec.num_layers
    head = t * spec.width * spec.vocab_size
    forward = 2 * batch_size * (vision + n * spec.vision_width * spec.width + text + head)
    return 3.0 * forward
