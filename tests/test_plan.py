"""The planner's text interface: format/parse round trip, errors, the grammar DFA, decoding."""

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from pewm_jax.text.tokenizer import (EOS, LOCATION_TOKENS, NUM_LOCATION_BINS, PAD, SEP,
                                    build_tokenizer)
from pewm_jax.sim.primitives import all_primitives
from pewm_jax.text.plan import (Plan, PlanGrammar, PlanParseError, PlanStep, format_plan,
                               parse_plan, plan_prompt)

MAX_STEPS, MAX_WORDS = 4, 8  # a small grammar keeps walks and decoding short
SETTINGS = settings(max_examples=60, deadline=None)


def _primitive_texts() -> list[str]:
    """Every wording of every primitive of the built-in world."""
    return [prim.text(p) for prim in all_primitives() for p in range(prim.num_paraphrases())]


TEXTS = _primitive_texts()


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TEXTS)


@functools.lru_cache(maxsize=None)
def _grammar(vocab_size: int | None = None) -> PlanGrammar:
    return PlanGrammar.from_tokenizer(build_tokenizer(TEXTS), MAX_STEPS, MAX_WORDS, vocab_size)


@functools.lru_cache(maxsize=None)
def _words() -> list[str]:
    vocab = build_tokenizer(TEXTS).get_vocab()
    return sorted(t for t in vocab if not t.startswith("<"))


def _dfa_reject_position(grammar: PlanGrammar, tok, tokens: list[str]) -> int | None:
    """Index where the DFA rejects `tokens` (len(tokens) if it stops early); None if accepted."""
    state = grammar.initial_state
    for i, t in enumerate(tokens):
        tid = tok.token_to_id(t)
        state = -1 if tid is None else int(grammar.next_state[state, tid])
        if state < 0:
            return i
    return None if state == grammar.terminal_state else len(tokens)


points = st.tuples(st.floats(0, 1), st.floats(0, 1))
steps = st.tuples(st.sampled_from(TEXTS), points, points)


@SETTINGS
@given(st.lists(steps, min_size=1, max_size=8), st.sampled_from([64, 100, 224]))
def test_round_trip(tok, raw_steps, image_size):
    plan = Plan(tuple(PlanStep(text, np.multiply(a, image_size), np.multiply(b, image_size))
                      for text, a, b in raw_steps))
    text = format_plan(plan, image_size)
    parsed = parse_plan(text, image_size)
    assert parse_plan(tok.encode(text, add_special_tokens=False).ids, image_size, tok) == parsed
    half_bin = 0.5 * image_size / NUM_LOCATION_BINS
    for want, got in zip(plan.steps, parsed.steps, strict=True):
        assert got.text == want.text
        for w, g in ((want.start_xy, got.start_xy), (want.goal_xy, got.goal_xy)):
            bins = np.clip(np.floor(np.divide(w, image_size) * NUM_LOCATION_BINS), 0, 1023)
            np.testing.assert_allclose(g, (bins + 0.5) * image_size / NUM_LOCATION_BINS)
            assert np.all(np.abs(np.subtract(g, w)) <= half_bin + 1e-9)


@st.composite
def valid_tokens(draw) -> list[list[str]]:
    """A valid plan of the small grammar as a list of steps, each a list of token strings."""
    out = []
    for _ in range(draw(st.integers(1, MAX_STEPS))):
        words = draw(st.lists(st.sampled_from(_words()), min_size=1, max_size=MAX_WORDS))
        locs = draw(st.lists(st.sampled_from(LOCATION_TOKENS), min_size=4, max_size=4))
        out.append(words + locs)
    return out


def _join(plan_steps: list[list[str]], end: list[str] = (EOS,)) -> list[str]:
    tokens = []
    for i, step in enumerate(plan_steps):
        tokens += ([SEP] if i else []) + step
    return tokens + list(end)


MUTATIONS = ("drop_loc", "extra_points", "word_after_points", "loc_in_words", "missing_eos",
             "empty", "unknown", "eos_early", "too_many_words", "too_many_steps", "after_eos")


@st.composite
def malformed_tokens(draw) -> list[str]:
    """A valid plan broken in one of the MUTATIONS ways."""
    plan_steps = draw(valid_tokens())
    kind = draw(st.sampled_from(MUTATIONS))
    i = draw(st.integers(0, len(plan_steps) - 1))
    step = plan_steps[i]
    n_words = len(step) - 4
    loc = draw(st.sampled_from(LOCATION_TOKENS))
    word = draw(st.sampled_from(_words()))
    if kind == "drop_loc":
        del step[n_words + draw(st.integers(0, 3))]
    elif kind == "extra_points":
        step += [loc, loc]
    elif kind == "word_after_points":
        step.append(word)
    elif kind == "loc_in_words":
        step[draw(st.integers(0, n_words - 1))] = loc
    elif kind == "missing_eos":
        return _join(plan_steps, end=draw(st.sampled_from([[], [PAD]])))
    elif kind == "empty":
        return draw(st.sampled_from([[], [EOS], [EOS, PAD], [SEP, EOS]]))
    elif kind == "unknown":
        tokens = _join(plan_steps)
        tokens.insert(draw(st.integers(0, len(tokens))), draw(st.sampled_from(["<unk>", "<foo>"])))
        return tokens
    elif kind == "eos_early":
        plan_steps[i] = step[:draw(st.integers(0, len(step) - 1))]
        return _join(plan_steps[:i + 1])
    elif kind == "too_many_words":
        plan_steps[i] = [word] * (MAX_WORDS + 1) + step[n_words:]
    elif kind == "too_many_steps":
        plan_steps += [step] * (MAX_STEPS + 1 - len(plan_steps))
    else:  # after_eos
        return _join(plan_steps, end=[EOS, PAD, draw(st.sampled_from([word, loc, SEP, EOS]))])
    return _join(plan_steps)


@SETTINGS
@given(malformed_tokens())
def test_malformed_plans_raise_naming_the_position(tok, tokens):
    with pytest.raises(PlanParseError) as err:
        parse_plan(tokens, 64, max_steps=MAX_STEPS, max_words=MAX_WORDS)
    e = err.value
    assert isinstance(e, ValueError)
    assert f"at token {e.position}" in str(e) and "expected" in str(e)
    assert e.position == _dfa_reject_position(_grammar(), tok, tokens)  # parser and DFA agree
    if e.position < len(tokens):
        assert e.token == tokens[e.position]


@SETTINGS
@given(valid_tokens())
def test_valid_token_lists_parse_and_dfa_accepts(tok, plan_steps):
    tokens = _join(plan_steps, end=[EOS, PAD, PAD])
    plan = parse_plan(tokens, 64, max_steps=MAX_STEPS, max_words=MAX_WORDS)
    assert [s.text for s in plan.steps] == [" ".join(s[:-4]) for s in plan_steps]
    assert _dfa_reject_position(_grammar(), tok, tokens) is None


def test_text_errors_name_the_token():
    with pytest.raises(PlanParseError, match=r"token 3 \('<eos>'\).*start x"):
        parse_plan("pick up <loc0001><eos>", 64)
    with pytest.raises(PlanParseError, match=r"token 1 \('<foo>'\)"):
        parse_plan("pick <foo>", 64)
    with pytest.raises(TypeError, match="tokenizer"):
        parse_plan([5, 6], 64)


@pytest.mark.parametrize("seed", range(20))
def test_random_walks_parse_and_eos_needs_a_complete_step(tok, seed):
    grammar, rng = _grammar(), np.random.default_rng(seed)
    eos, sep = tok.token_to_id(EOS), tok.token_to_id(SEP)
    state, ids = grammar.initial_state, []
    while state != grammar.terminal_state:
        # <eos> is allowed exactly where the prefix is a complete plan; <sep> too, below the limit.
        try:
            parse_plan(ids + [eos], 64, tok, max_steps=MAX_STEPS, max_words=MAX_WORDS)
            complete = True
        except PlanParseError:
            complete = False
        assert (grammar.next_state[state, eos] >= 0) == complete
        below_limit = ids.count(sep) + 1 < MAX_STEPS
        assert (grammar.next_state[state, sep] >= 0) == (complete and below_limit)
        token = int(rng.choice(grammar.allowed(state)))
        ids.append(token)
        state = int(grammar.next_state[state, token])
        assert state >= 0
    assert list(grammar.allowed(state)) == [tok.token_to_id(PAD)]
    assert len(ids) <= grammar.max_length
    parse_plan(ids + [0, 0], 64, tok, max_steps=MAX_STEPS, max_words=MAX_WORDS)


@pytest.mark.parametrize("sample", [False, True])
def test_constrained_decoding_under_scan_always_parses(tok, sample):
    vocab_size = tok.get_vocab_size() + 7  # the model's logits may be wider than the vocabulary
    grammar, batch = _grammar(vocab_size), 16

    @jax.jit
    def decode(key):
        def body(state, key_t):
            k_logits, k_sample = jax.random.split(key_t)
            logits = grammar.mask_logits(jax.random.normal(k_logits, (batch, vocab_size)) * 3,
                                         state)
            token = (jax.random.categorical(k_sample, logits) if sample
                     else jnp.argmax(logits, -1)).astype(jnp.int32)
            return grammar.advance(state, token), token

        state0 = jnp.full((batch,), grammar.initial_state, jnp.int32)
        return jax.lax.scan(body, state0, jax.random.split(key, grammar.max_length + 3))

    final, tokens = decode(jax.random.key(0))
    assert bool(jnp.all(grammar.is_done(final)))
    for row in np.asarray(tokens).T:
        plan = parse_plan(row, 64, tok, max_steps=MAX_STEPS, max_words=MAX_WORDS)
        assert 1 <= len(plan.steps) <= MAX_STEPS


def test_mask_and_advance_reject_disallowed(tok):
    grammar = _grammar()
    state = jnp.array([grammar.initial_state, -1], jnp.int32)
    masked = grammar.mask_logits(jnp.zeros((2, grammar.next_state.shape[1])), state)
    eos = tok.token_to_id(EOS)
    assert bool(jnp.isneginf(masked[0, eos])) and bool(jnp.all(jnp.isneginf(masked[1])))
    assert grammar.advance(state, jnp.array([eos, eos])).tolist() == [-1, -1]
    with pytest.raises(ValueError, match="vocab_size"):
        grammar.mask_logits(jnp.zeros((1, 3)), state[:1])


def test_default_table_is_compact(tok):
    grammar = PlanGrammar.from_tokenizer(tok)
    assert grammar.next_state.dtype == np.int32
    assert grammar.next_state.shape == (8 * (16 + 5) + 1, tok.get_vocab_size())
    assert grammar.next_state.nbytes < 1 << 20


def test_format_rejects_bad_steps():
    with pytest.raises(ValueError, match="non-word"):
        format_plan(Plan((PlanStep("pick <loc0001>", (1, 1), (2, 2)),)), 64)
    with pytest.raises(ValueError, match="outside"):
        format_plan(Plan((PlanStep("pick", (1, 65), (2, 2)),)), 64)
    with pytest.raises(ValueError):
        PlanStep("pick", (np.nan, 1), (2, 2))
    with pytest.raises(ValueError):
        Plan(())
