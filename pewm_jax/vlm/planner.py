"""The planner as a policy: a PaliGemma model plus the transforms around it (openpi style).

`Planner.plan(image, task)` does what the planner does at run time:

1. input transform: the uint8 RGB image is resized (bicubic, to a square, as Hugging Face's
   SigLIP image processor does) to the model's `image_size` and scaled to [-1, 1] (SigLIP's
   mean 0.5, std 0.5); the prompt is `<bos>` + the project tokenizer's ids of
   `plan_prompt(task)` (PaliGemma's prefix: image tokens, <bos>, prompt), padded with <pad>
   to a fixed length for a fine-tuned planner (what its training data looked like);
2. `paligemma.generate` for `PlanGrammar.max_length` tokens, greedy or sampled; constrained
   decoding masks, at every step, the tokens the plan grammar forbids (`GrammarHook`);
3. output transform: the generated ids up to and including the first <eos> are read by
   `parse_generated` into a `Plan` whose points are pixels of the planner's `image_size` image.
   Anything malformed raises `PlanParseError`: a bad plan is never read as a wrong one.

Constrained output always parses (the grammar is the parser's language); unconstrained output
of an untrained or undertrained model usually does not, and raises.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from data_loaders.transforms import resize_bicubic
from pewm_jax.vlm.paligemma import FULL, PaliGemma, PaliGemmaSpec, StepState, generate
from pewm_jax.text.plan import (DEFAULT_MAX_STEPS, DEFAULT_MAX_WORDS, Plan, PlanGrammar,
                               PlanParseError, parse_generated, prompt_ids)


@dataclasses.dataclass(frozen=True, eq=False)
class GrammarHook:
    """`generate`'s `logits_mask_fn` for a `PlanGrammar`; its user state is the (B,) DFA state.

    `StepState` shows the tokens chosen so far but not the one chosen after the hook returns, so
    the hook advances lazily: at step s > 0 it first advances the state with token s - 1, then
    masks the logits of step s with the new state. Start it at `initial_state(batch)`. Hashed by
    identity (a static argument of the jitted decoder): keep one per grammar so it compiles once.
    """

    grammar: PlanGrammar

    def initial_state(self, batch: int) -> jax.Array:
        """The DFA state (B,) before the first generated token."""
        return jnp.full((batch,), self.grammar.initial_state, jnp.int32)

    def __call__(self, logits: jax.Array, state: StepState) -> tuple[jax.Array, jax.Array]:
        """Masks logits (B, V) for step `state.step`; returns them and the DFA state they used."""
        previous = jax.lax.dynamic_index_in_dim(state.tokens, jnp.maximum(state.step - 1, 0),
                                                axis=1, keepdims=False)  # (B,)
        dfa = jnp.where(state.step > 0, self.grammar.advance(state.user, previous), state.user)
        return self.grammar.mask_logits(logits, dfa), dfa


def tiny_planner_spec(vocab_size: int, image_size: int, patch_size: int = 8, width: int = 128,
                      num_layers: int = 2, kv_heads: int = 1) -> PaliGemmaSpec:
    """A small PaliGemma (Gemma 1 decoder) to train from scratch over the project tokenizer.

    `vocab_size` is the tokenizer's (`tok.get_vocab_size()`); the model gets one more row, id
    `vocab_size`, for PaliGemma's <image> placeholder, which only a Hugging Face export reads
    (the plan grammar never allows it). SigLIP and Gemma both get `width` and `num_layers`,
    4 heads and an MLP of 4 x width; the decoder has `kv_heads` key/value heads (1: shared by
    all heads, as in Gemma 2B). `image_size` must be a multiple of `patch_size`.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    if width % 4:
        raise ValueError(f"width {width} is not a multiple of the 4 heads")
    return PaliGemmaSpec(
        image_size=image_size, patch_size=patch_size, num_channels=3, vision_width=width,
        vision_mlp_dim=4 * width, vision_layers=num_layers, vision_heads=4, vision_eps=1e-6,
        text_model_type="gemma", vocab_size=vocab_size + 1, width=width, mlp_dim=4 * width,
        num_layers=num_layers, num_heads=4, num_kv_heads=kv_heads, head_dim=width // 4,
        rms_eps=1e-6,
        rope_theta=10000.0, attention_bias=False, query_pre_attn_scalar=width // 4,
        attn_logit_softcapping=None, final_logit_softcapping=None, sliding_window=None,
        layer_types=(FULL,) * num_layers, tie_word_embeddings=True, image_token_id=vocab_size)


def unit_pixels(images: jax.Array | np.ndarray) -> jax.Array:
    """uint8 RGB -> float32 in [-1, 1] (SigLIP's mean 0.5, std 0.5); jittable."""
    return jnp.asarray(images).astype(jnp.float32) / 127.5 - 1.0


def preprocess_images(images: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 RGB (B, H, W, 3) -> float32 (B, image_size, image_size, 3) in [-1, 1] (bicubic)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images (B, H, W, 3), got {images.dtype} "
                         f"{images.shape}")
    return np.asarray(unit_pixels(resize_bicubic(images, image_size)))


class Planner:
    """A PaliGemma planner with its tokenizer and plan grammar: image + task -> `Plan`."""

    def __init__(self, model: PaliGemma, tokenizer: tokenizers.Tokenizer, *,
                 max_steps: int = DEFAULT_MAX_STEPS, max_words: int = DEFAULT_MAX_WORDS,
                 prompt_tokens: int | None = None, max_new_tokens: int | None = None,
                 plans_remaining: bool = False):
        """`prompt_tokens`: pad every prompt to this length, as the fine-tuning data does
        (one compiled decoder for every task); None: unpadded prompts. `max_new_tokens`:
        decode at most this many plan tokens (default: the grammar's longest plan).
        `plans_remaining`: the model learnt mid-task examples, so a plan from a later frame
        lists only the primitives left; False: it plans the whole task from any frame."""
        self.model, self.tokenizer = model, tokenizer
        self.image_size = model.spec.image_size
        self.grammar = PlanGrammar.from_tokenizer(tokenizer, max_steps, max_words,
                                                  model.spec.vocab_size)
        self.hook = GrammarHook(self.grammar)
        self.prompt_tokens = prompt_tokens
        self.plans_remaining = plans_remaining
        self.max_new_tokens = min(max_new_tokens or self.grammar.max_length,
                                  self.grammar.max_length)

    def prompt_ids(self, task_text: str) -> np.ndarray:
        """The prompt ids (L,) int32: <bos>, the tokens of `plan_prompt(task_text)`, and
        <pad> up to `prompt_tokens` if set."""
        return np.asarray(prompt_ids(self.tokenizer, task_text, self.prompt_tokens), np.int32)

    def generate_ids(self, images: np.ndarray, task_texts: Sequence[str], *,
                     constrained: bool = True, temperature: float = 0.0,
                     rng: jax.Array | None = None) -> np.ndarray:
        """Raw output ids (B, max_new_tokens) for uint8 images (B, H, W, 3) and B tasks.

        Rows are batched by prompt length (one batch when prompts are padded); each length
        group samples with its own key folded from `rng`.
        """
        if len(images) != len(task_texts):
            raise ValueError(f"{len(images)} images but {len(task_texts)} task texts")
        pixels = preprocess_images(images, self.image_size)
        prompts = [self.prompt_ids(t) for t in task_texts]
        out = np.zeros((len(prompts), self.max_new_tokens), np.int32)
        for length in sorted({len(p) for p in prompts}):
            rows = [i for i, p in enumerate(prompts) if len(p) == length]
            key = None if rng is None else jax.random.fold_in(rng, length)
            out[rows] = np.asarray(generate(
                self.model, jnp.asarray(pixels[rows]),
                jnp.asarray(np.stack([prompts[i] for i in rows])), self.max_new_tokens,
                temperature=temperature, rng=key,
                logits_mask_fn=self.hook if constrained else None,
                mask_state=self.hook.initial_state(len(rows)) if constrained else None))
        return out

    def parse(self, ids: np.ndarray) -> Plan:
        """One row of output ids as a Plan (`parse_generated`; raises PlanParseError)."""
        return parse_generated(ids, self.image_size, self.tokenizer,
                               max_steps=self.grammar.max_steps, max_words=self.grammar.max_words)

    def plan_batch(self, images: np.ndarray, task_texts: Sequence[str]) -> list[Plan | None]:
        """Greedy constrained plans of uint8 images (B, H, W, 3) and B tasks; None where the
        token budget ran out before <eos> (the only constrained output that does not parse),
        so a caller can count it instead of acting on a guess."""
        plans: list[Plan | None] = []
        for row in self.generate_ids(images, task_texts):
            try:
                plans.append(self.parse(row))
            except PlanParseError:
                plans.append(None)
        return plans

    def plan(self, image: np.ndarray, task_text: str | list[str], *, constrained: bool = True,
             temperature: float = 0.0, rng: jax.Array | None = None) -> Plan | list[Plan]:
        """The plan for a uint8 image (H, W, 3) and a task, or plans for (B, H, W, 3) and B tasks.

        Greedy at temperature 0, else sampled (needs `rng`). Points are pixels of the planner's
        `image_size` image. Raises PlanParseError on malformed (unconstrained) output.
        """
        single = isinstance(task_text, str)
        image = np.asarray(image)
        if single != (image.ndim == 3):
            raise ValueError(f"a single task needs one image (H, W, 3) and a list of tasks a "
                             f"batch (B, H, W, 3); got {type(task_text).__name__} and "
                             f"{image.shape}")
        ids = self.generate_ids(image[None] if single else image,
                                [task_text] if single else task_text, constrained=constrained,
                                temperature=temperature, rng=rng)
        plans = [self.parse(row) for row in ids]
        return plans[0] if single else plans
