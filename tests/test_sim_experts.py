"""Scripted experts, success checks, start/goal annotations and compositional hold-outs."""

import numpy as np
import pytest

from pewm_jax import sim
from pewm_jax.sim import primitives as P
from pewm_jax.sim import render as render_lib
from pewm_jax.sim import tasks as T
from pewm_jax.sim import world as W
from pewm_jax.sim.episodes import primitive_trial

SEEDS = range(200)


@pytest.mark.parametrize("kind", P.KINDS)
def test_primitive_expert_succeeds_in_99_percent_of_200_scenes(kind):
    trials = [primitive_trial(kind, 10_000 + s) for s in SEEDS]
    run = [t for t in trials if not t.rejected]
    rejection = 1 - len(run) / len(trials)
    print(f"{kind}: rejected {rejection:.1%} of scenes")
    assert rejection < 0.6  # the rejection rule must not hide most scenes
    assert all(t.finished for t in run)  # within the fixed horizon
    assert sum(t.success for t in run) >= 0.99 * len(run)


@pytest.mark.parametrize("name", T.TEMPLATE_NAMES)
def test_task_expert_succeeds_in_95_percent_of_100(name):
    wins = 0
    for seed in range(100):
        setup = T.sample_episode_setup(seed, num_objects=(3, 5), max_delta=0.08,
                                       primitive_max_steps=32, template_name=name)
        assert 2 <= len(setup.task.primitives) <= 6
        progress = T.TaskProgress(setup.task, setup.plans)
        done = []
        final, _ = T.plan_with_expert(setup.state, setup.task, 0.08, 32,
                                      on_step=lambda k, plan, a, s: done.append(progress.update(s)))
        wins += done[-1]
    assert wins >= 95


def _run_plan(state, primitive):
    plan = primitive.plan(state)
    expert = P.Expert(plan, 0.08)
    while not expert.done:
        W.step_state(state, expert.act(state))
    assert plan.success(state)
    return plan


def _scene():
    kinds = np.array([W.OBJECT_NAMES.index(n) for n in ("red cube", "blue disc")])
    return W.WorldState(np.array([0.5, 0.3]), False, -1, kinds, np.array([[0.3, 0.45], [0.7, 0.45]]))


def test_success_checks_reject_near_misses():
    s = _scene()
    plan = _run_plan(s, P.Primitive("reach", "red cube"))
    miss = s.copy()
    miss.gripper = miss.gripper + [P.REACH_TOLERANCE + 0.005, 0.0]
    assert not plan.success(miss)

    s = _scene()
    approach = _run_plan(s, P.Primitive("approach", "blue disc", "right"))
    miss = s.copy()
    miss.gripper = miss.gripper + [0.0, P.LINEUP_TOLERANCE + 0.005]
    assert not approach.success(miss)
    raised = s.copy()
    raised.closed = False
    assert not approach.success(raised)
    plan = _run_plan(s, P.Primitive("push", "blue disc", "right"))
    miss = s.copy()
    miss.positions[1] += [0.0, P.PUSH_TOLERANCE + 0.005]
    assert not plan.success(miss)

    s = _scene()
    _run_plan(s, P.Primitive("pick", "red cube"))
    plan = _run_plan(s, P.Primitive("place", "red cube", "left bin"))
    miss = s.copy()
    miss.positions[0] = [W.ZONES["left bin"].x1 + 0.005, W.ZONES["left bin"].center[1]]
    assert not plan.success(miss)
    still_held = s.copy()
    still_held.closed, still_held.held = True, 0
    assert not plan.success(still_held)


def test_a_push_starts_only_lined_up_behind_its_object():
    s = _scene()
    with pytest.raises(P.Infeasible, match="approach it"):
        P.Primitive("push", "blue disc", "right").plan(s)  # the gripper is up, away from it
    approach = _run_plan(s, P.Primitive("approach", "blue disc", "right"))
    assert s.closed and s.held == -1
    np.testing.assert_allclose(s.positions[1], [0.7, 0.45])  # lowering there moved nothing
    push = P.Primitive("push", "blue disc", "right").plan(s)
    np.testing.assert_allclose(push.start, approach.goal)
    assert [op for op, _ in push.ops] == ["move", "grip"]  # one straight move, then open
    with pytest.raises(P.Infeasible, match="approach it"):
        P.Primitive("push", "blue disc", "left").plan(s)  # lined up for the other way
    moved = s.copy()
    moved.gripper = moved.gripper + [0.0, P.LINEUP_TOLERANCE + 0.005]
    with pytest.raises(P.Infeasible, match="approach it"):
        P.Primitive("push", "blue disc", "right").plan(moved)


def test_an_approach_goal_is_anchored_on_its_object():
    """An approach ends in the gap behind its object; its goal's anchor (what a planner looks
    at to write it) is that object's centre, for every direction and zone. Other goals are
    their own anchors."""
    kinds = np.array([W.OBJECT_NAMES.index("green cube")])
    checked = 0
    for y in (0.3, 0.4, 0.55):
        for x in (0.35, 0.5, 0.65):
            state = W.WorldState(np.array([0.5, 0.2]), False, -1, kinds, np.array([[x, y]]))
            for target in (*P.DIRECTIONS, "top edge", "left bin", "right bin"):
                try:
                    goal = P.Primitive("approach", "green cube", target).plan(state).goal
                except P.Infeasible:
                    continue
                assert np.hypot(*(goal - state.positions[0])) > W.OBJECT_RADIUS  # off the object
                anchor = P.Primitive("approach", "green cube", target).goal_anchor(goal)
                np.testing.assert_allclose(anchor, state.positions[0], atol=1e-12)
                checked += 1
    assert checked >= 40
    for primitive in (P.Primitive("pick", "red cube"), P.Primitive("push", "red cube", "left"),
                      P.Primitive("place", "red cube", "left bin")):
        np.testing.assert_array_equal(primitive.goal_anchor(np.array([0.2, 0.7])), [0.2, 0.7])


def test_task_check_rejects_a_perturbed_success():
    setup = T.sample_episode_setup(3, num_objects=(3, 5), max_delta=0.08, primitive_max_steps=32,
                                   template_name="bin_then_push")
    progress = T.TaskProgress(setup.task, setup.plans)
    final, _ = T.plan_with_expert(setup.state, setup.task, 0.08, 32,
                                  on_step=lambda k, p, a, s: progress.update(s))
    assert progress.update(final)
    pushed = setup.plans[-1].obj_index
    near = final.copy()
    near.positions[pushed] += [P.PUSH_TOLERANCE + 0.01, 0.0]
    assert not T.TaskProgress(setup.task, setup.plans).update(near)
    # An approach only prepares its push: the task does not ask for its lowering point.
    assert [p.kind for p in setup.task.primitives][-2:] == ["approach", "push"]
    approach, states = setup.plans[-2], []
    T.plan_with_expert(setup.state, setup.task, 0.08, 32,
                       on_step=lambda k, p, a, s: states.append(s.copy()))
    skipped = T.TaskProgress(setup.task, setup.plans)
    seen = [skipped.update(s) for s in states if not approach.success(s)]
    assert len(seen) < len(states) and seen[-1]  # success without the lowering point's states
    # "touch A, then touch B": ending on B without ever touching A is not a success.
    setup = T.sample_episode_setup(4, num_objects=(3, 5), max_delta=0.08, primitive_max_steps=32,
                                   template_name="touch_two")
    only_b = setup.state.copy()
    only_b.gripper = only_b.positions[setup.plans[1].obj_index].copy()
    assert not T.TaskProgress(setup.task, setup.plans).update(only_b)


def _palm_center(image: np.ndarray) -> np.ndarray:
    """Centroid of the gripper palm's colour in pixel coordinates (x right, y down)."""
    dist = np.linalg.norm(image.astype(float) - render_lib.PALM_RGB, axis=-1)
    ys, xs = np.nonzero(dist < 40)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


def test_start_goal_annotations_match_the_gripper_in_the_frames():
    env = sim.TabletopEnv(64)
    checked = 0
    for seed in range(40):
        ep = sim.expert_episode(env, seed)
        for seg in ep.segments:
            assert seg.start_xy.dtype == np.float32 and seg.start_xy.shape == (2,)
            np.testing.assert_allclose(_palm_center(ep.frames[seg.start_frame]), seg.start_xy, atol=1.0)
            np.testing.assert_allclose(_palm_center(ep.frames[seg.end_frame]), seg.goal_xy, atol=1.0)
            assert np.all((seg.goal_xy >= 0) & (seg.goal_xy < 64))
            checked += 1
    assert checked > 80


def test_held_out_pairs_and_compositions_never_in_train():
    env = sim.TabletopEnv(64)
    for seed in range(60):
        ep = sim.expert_episode(env, seed, split="train")
        assert ep.split == "train"
        for seg in ep.segments:
            assert (T.SKILL_OF_KIND[seg.kind], seg.obj) not in T.HELD_OUT_PAIRS
    held = T.held_out_compositions()
    train_primitives = set()
    for tmpl in T.TEMPLATES:
        instances = T.all_instances(tmpl)
        assert any(t.key in held for t in instances), tmpl.name  # every template has some
        train_primitives |= {p for t in instances if t.split() == "train" for p in t.primitives}
    for tmpl in T.TEMPLATES:
        for t in T.all_instances(tmpl):
            if t.split() == "holdout_composition":
                assert set(t.primitives) <= train_primitives
    ep = sim.expert_episode(env, 0, split="holdout_primitive")
    assert any((T.SKILL_OF_KIND[s.kind], s.obj) in T.HELD_OUT_PAIRS for s in ep.segments)
    ep = sim.expert_episode(env, 0, split="holdout_composition")
    assert T.Task(ep.template, ep.task, tuple(
        P.Primitive(s.kind, s.obj, _target_of(s.text)) for s in ep.segments)).key in held


def _target_of(text: str):
    for target in list(W.ZONES) + list(P.DIRECTIONS):
        if text.endswith(" " + target):
            return target
    return None


def test_paraphrases_and_bad_primitives():
    p = P.Primitive("push", "red cube", "top edge")
    assert p.text() == "push the red cube to the top edge"
    assert len({p.text(i) for i in range(p.num_paraphrases())}) == p.num_paraphrases()
    assert P.Primitive("place", "blue disc", "left bin").text(1) == "put the blue disc in the left bin"
    kinds_of_first_word = {}
    for kind, forms in P.WORDS.items():
        for form in forms:
            kinds_of_first_word.setdefault(form.split()[0], set()).add(kind)
    assert all(len(k) == 1 for k in kinds_of_first_word.values()), kinds_of_first_word
    with pytest.raises(ValueError, match="unknown object"):
        P.Primitive("pick", "purple cube")
    with pytest.raises(ValueError, match="needs a target"):
        P.Primitive("push", "red cube")
