"""The planner's text interface: prompt, plan grammar, typed plans, parser, constrained decoding.

The planner (DESIGN.md "The planner") reads `plan_prompt(task)` and the first frame and writes
a plan. Over tokens of the project tokenizer (`pewm_jax.text.tokenizer`) a plan is exactly

    plan  := step ( <sep> step )*  <eos>  <pad>*
    step  := word{1..max_words}  loc loc  loc loc        (start y, start x, goal y, goal x)
    word  := any token that is not special (<pad> <unk> <bos> <eos> <sep>), not a location
             token <loc0000>..<loc1023>, and not of the form <...>
    loc   := <locNNNN>, NNNN in 0000..1023

with at most `max_steps` steps. A point is two location tokens, y then x, in 1024 bins of the
planner's input image (PaliGemma order, DESIGN.md "Coordinates"); parsed points are the pixel
centres of their bins, so they lie within half a bin of the points that were written. A step's
text is its words joined by single spaces (lower-cased, as the tokenizer normalises them).
Trailing <pad> after <eos> is allowed so that a batch can keep decoding after a row finished.

`parse_plan` checks all of this and raises `PlanParseError` (naming the token index, the token
and what was expected) on anything else: a malformed plan is never read as a wrong one.
`PlanGrammar` is the same language as a DFA over token ids, with jittable `mask_logits` and
`advance` for constrained decoding.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
import tokenizers

from pewm_jax.text.tokenizer import (BOS, EOS, LOCATION_TOKENS, NUM_LOCATION_BINS, PAD, SEP,
                                    SPECIALS, UNK, location_tokens)

DEFAULT_MAX_STEPS = 8  # the built-in world's tasks chain 2 to 6 primitives
DEFAULT_MAX_WORDS = 16  # its longest primitive wording has 8 words
POINT_NAMES = ("start y", "start x", "goal y", "goal x")
END = "<end of plan>"  # stands for the missing token when the text stops too early

_LOC_RE = re.compile(r"<loc(\d{4})>")
# Angle tokens first, then the Whitespace pre-tokenizer's words and punctuation runs.
_TOKEN_RE = re.compile(r"<[^<>\s]*>|\w+|[^\w\s<]+|<")


class PlanParseError(ValueError):
    """Malformed planner output; `position` is the token index, `token` the token found there."""

    def __init__(self, position: int, token: str, expected: str):
        self.position, self.token, self.expected = position, token, expected
        super().__init__(f"malformed plan at token {position} ({token!r}): expected {expected}")


@dataclasses.dataclass(frozen=True)
class PlanStep:
    """One primitive of a plan: its words and start/goal (x, y) pixels of the planner's image."""

    text: str
    start_xy: tuple[float, float]
    goal_xy: tuple[float, float]

    def __post_init__(self):
        if not isinstance(self.text, str) or not self.text.split():
            raise ValueError(f"a plan step needs words, got {self.text!r}")
        for name in ("start_xy", "goal_xy"):
            xy = np.asarray(getattr(self, name), np.float64)
            if xy.shape != (2,) or not np.all(np.isfinite(xy)):
                raise ValueError(f"{name} must be a finite (x, y) point, got {xy!r}")
            object.__setattr__(self, name, (float(xy[0]), float(xy[1])))


@dataclasses.dataclass(frozen=True)
class Plan:
    """A planner's output: the primitives to run, in order (at least one)."""

    steps: tuple[PlanStep, ...]

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(self.steps))
        if not self.steps or not all(isinstance(s, PlanStep) for s in self.steps):
            raise ValueError(f"a plan needs one or more PlanSteps, got {self.steps!r}")


def plan_prompt(task_text: str) -> str:
    """The planner's text input for a task (the image comes beside it)."""
    if not task_text.strip():
        raise ValueError("the task text is empty")
    return f"plan: {' '.join(task_text.split())}"


def prompt_ids(tokenizer: tokenizers.Tokenizer, task_text: str, length: int | None = None
               ) -> list[int]:
    """The planner's prompt ids: <bos> then the tokens of `plan_prompt(task_text)` (PaliGemma's
    prefix after the image tokens), padded with <pad> to `length` when given (ValueError if
    the prompt is longer)."""
    ids = ([tokenizer.token_to_id(BOS)]
           + tokenizer.encode(plan_prompt(task_text), add_special_tokens=False).ids)
    if length is None:
        return ids
    if len(ids) > length:
        raise ValueError(f"the prompt for task {task_text!r} has {len(ids)} tokens, more than "
                         f"the planner's {length} (config.planner.prompt_tokens); shorten the "
                         "task or raise prompt_tokens and fine-tune with it")
    return ids + [tokenizer.token_to_id(PAD)] * (length - len(ids))


def target_ids(tokenizer: tokenizers.Tokenizer, plan: "Plan", image_size: int) -> list[int]:
    """The ids of `format_plan(plan, image_size)`, ending with <eos>: what the planner learns
    to write after the prompt."""
    return tokenizer.encode(format_plan(plan, image_size), add_special_tokens=False).ids


def _token_kind(token: str) -> str:
    """'loc', 'word', one of the special tokens, or 'unknown' (<unk> and other <...> tokens)."""
    if token in SPECIALS:
        return "unknown" if token == UNK else token
    match = _LOC_RE.fullmatch(token)
    if match:
        return "loc" if int(match.group(1)) < NUM_LOCATION_BINS else "unknown"
    return "unknown" if token.startswith("<") and token.endswith(">") and len(token) > 1 else "word"


def _words(text: str) -> list[str]:
    """The normalised words of `text` as the project tokenizer splits them."""
    return _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower())


def format_plan(plan: Plan, image_size: int) -> str:
    """The plan as planner target text: each step's words, then start and goal location tokens."""
    parts = []
    for i, step in enumerate(plan.steps):
        bad = [w for w in _words(step.text) if _token_kind(w) != "word"]
        if bad:
            raise ValueError(f"step {i} text {step.text!r} holds non-word tokens {bad}")
        for name, xy in (("start_xy", step.start_xy), ("goal_xy", step.goal_xy)):
            if not all(0 <= v <= image_size for v in xy):
                raise ValueError(f"step {i} {name} {xy} lies outside the {image_size}px image")
        parts.append(f"{' '.join(_words(step.text))}"
                     f"{location_tokens(np.asarray(step.start_xy), image_size)}"
                     f"{location_tokens(np.asarray(step.goal_xy), image_size)}")
    return SEP.join(parts) + EOS


def _to_tokens(text_or_tokens: str | Sequence[str] | Sequence[int] | np.ndarray,
               tokenizer: tokenizers.Tokenizer | None) -> list[str]:
    """Token strings of a plan given as text, token strings or token ids (ids need a tokenizer)."""
    if isinstance(text_or_tokens, str):
        if tokenizer is None:
            return _words(text_or_tokens)
        return list(tokenizer.encode(text_or_tokens, add_special_tokens=False).tokens)
    items = list(np.asarray(text_or_tokens).reshape(-1)) if isinstance(
        text_or_tokens, np.ndarray) else list(text_or_tokens)
    if all(isinstance(t, str) for t in items):
        return items
    if tokenizer is None:
        raise TypeError("parsing token ids needs the tokenizer that produced them")
    return [(tokenizer.id_to_token(int(t)) if int(t) >= 0 else None) or f"<id {int(t)}>"
            for t in items]


def parse_plan(text_or_tokens: str | Sequence[str] | Sequence[int] | np.ndarray, image_size: int,
               tokenizer: tokenizers.Tokenizer | None = None, *,
               max_steps: int = DEFAULT_MAX_STEPS, max_words: int = DEFAULT_MAX_WORDS) -> Plan:
    """Reads planner output (text, token strings, or ids with `tokenizer`) into a checked Plan.

    Raises PlanParseError naming the first token that breaks the grammar (module docstring).
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    tokens = _to_tokens(text_or_tokens, tokenizer)

    def at(i: int) -> tuple[str, str]:
        if i >= len(tokens):
            return END, "end"
        if _token_kind(tokens[i]) == "unknown":
            raise PlanParseError(i, tokens[i], "a known token (a word of the vocabulary, "
                                 f"a location token, {SEP}, {EOS} or {PAD})")
        return tokens[i], _token_kind(tokens[i])

    steps: list[PlanStep] = []
    i = 0
    while True:
        words = []
        while at(i)[1] == "word":
            if len(words) == max_words:
                raise PlanParseError(i, at(i)[0], f"a location token: at most {max_words} words "
                                     "per step")
            words.append(at(i)[0])
            i += 1
        if not words:
            raise PlanParseError(i, at(i)[0], "a primitive's first word" +
                                 ("" if steps else " (a plan has at least one step)"))
        bins = []
        for name in POINT_NAMES:
            token, kind = at(i)
            if kind != "loc":
                raise PlanParseError(i, token, f"a location token for the {name} of step "
                                     f"{len(steps)} (two points, start then goal, each y then x)")
            bins.append(int(_LOC_RE.fullmatch(token).group(1)))
            i += 1
        centre = (np.asarray(bins, np.float64) + 0.5) * image_size / NUM_LOCATION_BINS
        steps.append(PlanStep(" ".join(words), (centre[1], centre[0]), (centre[3], centre[2])))
        token, kind = at(i)
        i += 1
        if kind == EOS:
            break
        if kind != SEP:
            raise PlanParseError(i - 1, token, f"{SEP} or {EOS} after the two points of step "
                                 f"{len(steps) - 1}")
        if len(steps) == max_steps:
            raise PlanParseError(i - 1, token, f"{EOS}: at most {max_steps} steps")
    for j in range(i, len(tokens)):
        if at(j)[1] != PAD:
            raise PlanParseError(j, tokens[j], f"only {PAD} after {EOS}")
    return Plan(tuple(steps))


def parse_generated(ids: Sequence[int] | np.ndarray, image_size: int,
                    tokenizer: tokenizers.Tokenizer, *, max_steps: int = DEFAULT_MAX_STEPS,
                    max_words: int = DEFAULT_MAX_WORDS) -> Plan:
    """One row of decoded ids, up to and including its first <eos>, as a Plan (or raises
    PlanParseError). Tokens after <eos> are not output: decoding just ran past the end."""
    ids = np.asarray(ids).reshape(-1)
    ends = np.flatnonzero(ids == tokenizer.token_to_id(EOS))
    return parse_plan(ids[:ends[0] + 1] if len(ends) else ids, image_size, tokenizer,
                      max_steps=max_steps, max_words=max_words)


@dataclasses.dataclass(frozen=True, eq=False)
class PlanGrammar:
    """The plan grammar as a DFA over token ids, for constrained decoding (module docstring).

    States are (step, position in the step): first word, k words read, 1..3 location tokens
    read, step complete; plus one terminal state after <eos> that only <pad> keeps.
    """

    next_state: np.ndarray  # (num_states, vocab) int32, -1 where the token is not allowed
    initial_state: int
    terminal_state: int
    max_steps: int
    max_words: int

    @classmethod
    def from_tokenizer(cls, tok: tokenizers.Tokenizer, max_steps: int = DEFAULT_MAX_STEPS,
                       max_words: int = DEFAULT_MAX_WORDS, vocab_size: int | None = None
                       ) -> "PlanGrammar":
        """Builds the tables for `tok`'s ids; `vocab_size` pads them to the model's logit width."""
        if max_steps < 1 or max_words < 1:
            raise ValueError(f"max_steps and max_words must be >= 1, got {max_steps}, {max_words}")
        vocab = tok.get_vocab(with_added_tokens=True)
        size = max(vocab.values()) + 1
        vocab_size = size if vocab_size is None else vocab_size
        if vocab_size < size:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {size}")
        missing = [t for t in (PAD, EOS, SEP) + LOCATION_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks plan tokens {missing[:5]}")
        kinds = {t: _token_kind(t) for t in vocab}
        words = np.array([i for t, i in vocab.items() if kinds[t] == "word"], np.int64)
        locs = np.array([i for t, i in vocab.items() if kinds[t] == "loc"], np.int64)
        per_step = max_words + 5  # first word, k = 1..max_words words, 1..3 locs, complete
        done = max_steps * per_step
        table = np.full((done + 1, vocab_size), -1, np.int32)
        for s in range(max_steps):
            base, complete = s * per_step, s * per_step + max_words + 4
            table[base, words] = base + 1
            for k in range(1, max_words + 1):
                if k < max_words:
                    table[base + k, words] = base + k + 1
                table[base + k, locs] = base + max_words + 1
            for j in range(1, 4):
                table[base + max_words + j, locs] = base + max_words + j + 1
            if s + 1 < max_steps:
                table[complete, vocab[SEP]] = base + per_step
            table[complete, vocab[EOS]] = done
        table[done, vocab[PAD]] = done
        return cls(table, 0, done, max_steps, max_words)

    @property
    def max_length(self) -> int:
        """The most tokens a plan can take, <eos> included: decode this long and every row ends."""
        return self.max_steps * (self.max_words + 5)

    def allowed(self, state: int) -> np.ndarray:
        """Token ids allowed in `state` (numpy, for tests and host-side decoding)."""
        return np.flatnonzero(self.next_state[state] >= 0)

    def mask_logits(self, logits: jnp.ndarray, state: jnp.ndarray) -> jnp.ndarray:
        """(B, V) logits with tokens the grammar forbids in each row's state set to -inf."""
        if logits.shape[-1] != self.next_state.shape[1]:
            raise ValueError(f"logits have {logits.shape[-1]} entries, the grammar "
                             f"{self.next_state.shape[1]}; pass vocab_size to from_tokenizer")
        return jnp.where(self._rows(state) >= 0, logits, -jnp.inf)

    def advance(self, state: jnp.ndarray, token: jnp.ndarray) -> jnp.ndarray:
        """Next states after `token` (same shape as `state`); -1 where it was not allowed."""
        return jnp.take_along_axis(self._rows(state), token[..., None].astype(jnp.int32),
                                   axis=-1)[..., 0]

    def is_done(self, state: jnp.ndarray) -> jnp.ndarray:
        """True where the plan is complete (<eos> was read)."""
        return state == self.terminal_state

    def _rows(self, state: jnp.ndarray) -> jnp.ndarray:
        """Table rows for `state`; a rejected state (-1) allows nothing."""
        state = jnp.asarray(state, jnp.int32)
        rows = jnp.asarray(self.next_state)[jnp.maximum(state, 0)]
        return jnp.where((state >= 0)[..., None], rows, -1)
