"""The planner policy: constrained decoding of a random tiny PaliGemma always gives a valid plan."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pewm_jax.text.tokenizer import EOS, PAD, build_tokenizer
from pewm_jax.vlm.paligemma import PaliGemma, StepState
from pewm_jax.text.plan import Plan, PlanParseError, plan_prompt
from pewm_jax.vlm.planner import Planner, preprocess_images, tiny_planner_spec
from test_plan import MAX_STEPS, MAX_WORDS, TEXTS

BATCH, IMAGE_SIZE = 8, 16


def _tasks() -> list[str]:
    """Tasks of one prompt length (one compilation per decoding mode): two chained wordings."""
    rng = np.random.default_rng(0)
    tasks = [f"{a} then {b}" for a, b in zip(rng.permutation(TEXTS), rng.permutation(TEXTS))]
    length = collections.Counter(len(t.split()) for t in tasks).most_common(1)[0][0]
    return [t for t in tasks if len(t.split()) == length]


TASKS = _tasks()


@pytest.fixture(scope="module")
def planner() -> Planner:
    """A random-weight tiny planner over the built-in world's vocabulary (prompts included)."""
    tok = build_tokenizer(TEXTS + [plan_prompt(t) for t in TASKS])
    with nnx.use_eager_sharding(False):
        model = PaliGemma(tiny_planner_spec(tok.get_vocab_size(), IMAGE_SIZE, width=32,
                                            num_layers=1), rngs=nnx.Rngs(0))
    return Planner(model, tok, max_steps=MAX_STEPS, max_words=MAX_WORDS)


def _batch(seed: int) -> tuple[np.ndarray, list[str]]:
    """Random uint8 images of a size other than the planner's, and tasks."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (BATCH, 24, 20, 3), np.uint8)
    return images, [TASKS[i] for i in rng.choice(len(TASKS), BATCH)]


def _dfa_walk(planner: Planner, ids: np.ndarray) -> list[int]:
    """The grammar states after each token of `ids` (numpy); asserts each token is allowed."""
    state, states = planner.grammar.initial_state, []
    for i, token in enumerate(ids):
        state = int(planner.grammar.next_state[state, token])
        assert state >= 0, f"token {i} ({planner.tokenizer.id_to_token(int(token))}) rejected"
        states.append(state)
    return states


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constrained_plans_always_parse(planner, seed, temperature):
    images, tasks = _batch(seed)
    rng = jax.random.key(seed) if temperature else None
    ids = planner.generate_ids(images, tasks, temperature=temperature, rng=rng)
    plans = planner.plan(images, tasks, temperature=temperature, rng=rng)
    assert len(plans) == BATCH
    pad = planner.tokenizer.token_to_id(PAD)
    for row, plan in zip(ids, plans, strict=True):
        states = _dfa_walk(planner, row)
        assert states[-1] == planner.grammar.terminal_state
        end = int(np.flatnonzero(row == planner.tokenizer.token_to_id(EOS))[0])
        assert np.all(row[end + 1:] == pad)
        assert isinstance(plan, Plan) and 1 <= len(plan.steps) <= MAX_STEPS
        assert plan == planner.parse(row)
        for step in plan.steps:
            assert all(0 <= v <= IMAGE_SIZE for v in step.start_xy + step.goal_xy)


def test_sampling_is_seeded_and_varies(planner):
    images, tasks = _batch(0)
    a, b, c = (planner.generate_ids(images, tasks, temperature=1.0, rng=jax.random.key(k))
               for k in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_unconstrained_output_is_a_plan_or_raises(planner):
    images, tasks = _batch(0)
    outcomes = []
    for row in planner.generate_ids(images, tasks, constrained=False):
        try:
            outcomes.append(planner.parse(row))
        except PlanParseError as err:
            outcomes.append(err)
    assert all(isinstance(o, (Plan, PlanParseError)) for o in outcomes)
    # A random model over ~1100 tokens almost never starts with one of the ~60 words.
    assert any(isinstance(o, PlanParseError) for o in outcomes)
    bad = next(i for i, o in enumerate(outcomes) if isinstance(o, PlanParseError))
    with pytest.raises(PlanParseError):
        planner.plan(images[bad], tasks[bad], constrained=False)


def test_hook_advances_the_grammar_state(planner):
    """Replaying decoded tokens through the hook: its state is the DFA walk, lagging one step."""
    images, tasks = _batch(1)
    ids = planner.generate_ids(images, tasks, temperature=1.0, rng=jax.random.key(3))
    walks = np.array([_dfa_walk(planner, row) for row in ids])  # (B, T): state after token t
    hook, tokens = planner.hook, jnp.zeros(ids.shape, jnp.int32)
    user = hook.initial_state(BATCH)
    for step in range(ids.shape[1]):
        logits = jnp.zeros((BATCH, planner.model.spec.vocab_size))
        masked, user = hook(logits, StepState(jnp.int32(step), tokens, user))
        want = (np.full(BATCH, planner.grammar.initial_state) if step == 0
                else walks[:, step - 1])
        np.testing.assert_array_equal(user, want)
        assert np.all(np.isfinite(np.asarray(masked)[np.arange(BATCH), ids[:, step]]))
        tokens = tokens.at[:, step].set(ids[:, step])


def test_single_image_and_input_checks(planner):
    images, tasks = _batch(2)
    plan = planner.plan(images[0], tasks[0])
    assert isinstance(plan, Plan)
    assert plan == planner.plan(images[:1], tasks[:1])[0]
    with pytest.raises(ValueError, match="single task"):
        planner.plan(images, tasks[0])
    with pytest.raises(ValueError, match="uint8"):
        planner.plan(images[0].astype(np.float32), tasks[0])
    with pytest.raises(ValueError, match="8 images but 2"):
        planner.plan(images, tasks[:2])
    pixels = preprocess_images(np.array([[[[0, 255, 0]]]], np.uint8), 2)
    assert pixels.shape == (1, 2, 2, 3) and pixels.min() == -1 and pixels.max() == 1


def test_prompt_starts_with_bos_and_tasks_of_other_lengths(planner):
    assert planner.tokenizer.id_to_token(int(planner.prompt_ids(TASKS[0])[0])) == "<bos>"
    images, _ = _batch(3)
    tasks = [TASKS[0], "pick up the red cube", TASKS[1]]  # two prompt lengths, one batch
    lengths = {int(np.sum(planner.prompt_ids(t) != planner.tokenizer.token_to_id("<pad>")))
               for t in tasks}
    assert len(lengths) == 2
    batched = planner.plan(images[:3], tasks)
    # Every row plans as it does alone: padding and the other rows change nothing.
    assert batched == [planner.plan(images[i], tasks[i]) for i in range(3)]


def test_tiny_spec():
    spec = tiny_planner_spec(1100, 32)
    assert spec.vocab_size == 1101 and spec.image_token_id == 1100
    assert spec.num_image_tokens == 16 and not spec.gemma2
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_planner_spec(1100, 30)
