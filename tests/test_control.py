"""The closed loop: the harness solves tasks with oracle plans and scripted primitives, the
expert's actions replayed in clip form equal the oracle, the controller's planning choices pick
the right primitive, the policy step is batched and repeatable, and a random-weight model fails
and is reported as failing."""

import dataclasses

import numpy as np
import pytest
from flax import nnx
from world_model_fixtures import randomize, small_config

from data_loaders.clips import ActionStats, frame_indices, step_actions
from pewm_jax.text.tokenizer import build_tokenizer
from pewm_jax.config import EVAL_CONDITIONS
from pewm_jax.control.controller import (ControlSettings, Controller, EpisodeResult,
                                         PrimitiveRecord, Rollout)
from pewm_jax.control.policy import PrimitiveCommand, PrimitivePolicy
from pewm_jax.control.tabletop import EpisodeSpec, TabletopControlEnv
from pewm_jax.evaluate import closed_loop
from pewm_jax.models import WorldModel
from pewm_jax.models.action_decoder import ActionDecoder, ActionDecoderSpec
from pewm_jax.models.text_encoder import make_text_encoder
from pewm_jax.sim import TabletopEnv
from pewm_jax.sim.render import locate_gripper, render
from pewm_jax.sim.world import OBJECT_NAMES, sample_scene
from pewm_jax.text.plan import Plan, PlanStep

def _controller(settings: ControlSettings, image_size: int = 64, **kw) -> Controller:
    """A controller of the built-in world (quickstart clips: H = 8, s = 4)."""
    return Controller(settings, lambda: TabletopControlEnv(image_size), horizon=8,
                      frame_stride=4, **kw)


def _specs(per_template: int = 2, splits=("train", "holdout_composition")):
    config = small_config(f"eval.episodes_per_template={per_template}",
                          f"eval.splits={tuple(splits)!r}".replace(" ", ""))
    return closed_loop.episode_specs(config.eval)


def test_oracle_plans_with_scripted_primitives_solve_the_tasks():
    """Harness correctness: the world's decomposition run by the scripted experts solves >= 95%
    of seen and held-out tasks, in closed and open loop, whatever the parallel width."""
    specs = _specs()
    for loop, parallel in (("closed", 7), ("open", 16)):
        controller = _controller(ControlSettings("world", "scripted", loop))
        results = controller.run(specs, parallel=parallel)
        assert len(results) == len(specs) and [r.spec for r in results] == specs
        assert np.mean([r.success for r in results]) >= 0.95
        assert all(r.chain_length == r.task_length for r in results if r.success)
        scores = closed_loop.split_scores(results)
        assert scores["success_ci95"][0] > 0.85 and scores["per_primitive"]["pick"]["runs"] > 0


@pytest.mark.parametrize("execute_frames", [None, 3])
def test_the_experts_actions_replayed_in_clip_form_equal_the_oracle(execute_frames):
    """The clip contract and the executor, fed with truth: the expert's per-step actions for
    each planned primitive, cut into (H, s, A) clips and played as decoded ones are (whole
    clips, or 3 frames at a time with the expert continued), solve every task the oracle
    solves, on the same seeds. (A summed label per frame interval failed most picks.)"""
    specs = _specs()
    oracle = _controller(ControlSettings("world", "scripted")).run(specs, parallel=8)
    replay = _controller(ControlSettings("world", "replay", execute_frames=execute_frames)).run(
        specs, parallel=8)
    assert [r.success for r in replay] == [r.success for r in oracle] and all(
        r.success for r in oracle)
    rounds = 1 if execute_frames is None else 3  # ceil(8 / 3) clips per primitive
    assert all(p.rounds == rounds for r in replay for p in r.primitives[:-1])  # the last: until
    # the task succeeded
    table = closed_loop.chain_table({"conditions": {
        "oracle": {"splits": {"train": closed_loop.split_scores(oracle)}},
        "replay": {"splits": {"train": closed_loop.split_scores(replay)}}}})
    assert "oracle" in table and "replay" in table and "100%" in table and "pick" in table
    # Pushes report how far the object ended from its target, as the oracle's own pushes end.
    def pushes(results):
        return [p.outcome["object_error_px"] for r in results for p in r.primitives
                if p.kind == "push"]

    assert pushes(replay) and np.allclose(pushes(replay), pushes(oracle), atol=1e-6)
    assert "push outcomes (median of attempts):" in table and "object_error_side_px" in table


def test_goal_reach_is_scored_per_primitive_kind_and_printed_in_the_chain():
    """Where imagined clips ended, per primitive kind (the chain's diagnostic of which
    primitives the world model draws to their goal), from the attempts that imagined one."""
    def record(kind, reached):
        return PrimitiveRecord(kind, kind, (0.0, 0.0), (1.0, 1.0), bool(reached), 8, 1, reached)

    def episode(*records):
        return EpisodeResult(None, "t", "task", "train", 2, 1, False, "budget", 16, 0, 0,
                             list(records), [])

    scores = closed_loop.split_scores([episode(record("pick", True), record("push", False)),
                                       episode(record("pick", False), record("push", False))])
    assert scores["goal_reach"] == 0.25
    assert scores["per_primitive"]["pick"]["goal_reach"] == 0.5
    assert scores["per_primitive"]["push"]["goal_reach"] == 0.0
    oracle = closed_loop.split_scores([episode(record("pick", None))])
    assert "goal_reach" not in oracle["per_primitive"]["pick"]
    table = closed_loop.chain_table({"conditions": {"oracle": {"splits": {"train": oracle}},
                                                    "world_plan": {"splits": {"train": scores}}}})
    line = table.split("at its goal:\n")[1].splitlines()[0].split()
    assert line == ["world_plan", "train", "25%", "50%", "0%"]


def test_tasks_are_scored_by_the_primitive_kinds_they_need():
    """Which kind caps success: per kind of the world's decompositions, the success of the
    tasks that need it and of those that do not, in the report and the chain table."""
    def episode(success, *kinds):
        return EpisodeResult(None, "t", "task", "train", len(kinds), 0, success, "budget", 16,
                             0, 0, [], [], kinds)

    results = [episode(False, "push", "pick", "place"), episode(False, "push", "push"),
               episode(True, "pick", "place"), episode(True, "reach", "reach"),
               episode(False, "pick", "place")]
    by = closed_loop.split_scores(results)["by_needed_kind"]
    assert by["push"] == {"tasks": 2, "success": 0.0, "success_without": pytest.approx(2 / 3)}
    assert by["pick"] == {"tasks": 3, "success": pytest.approx(1 / 3), "success_without": 0.5}
    assert by["reach"] == {"tasks": 1, "success": 1.0, "success_without": 0.25}
    everywhere = closed_loop.split_scores([episode(True, "reach")])["by_needed_kind"]
    assert everywhere["reach"]["success_without"] is None
    table = closed_loop.chain_table({"conditions": {
        name: {"splits": {"train": closed_loop.split_scores(results)}}
        for name in ("oracle", "world_plan")}})
    rows = table.split("of those that do not:\n")[1].splitlines()
    assert rows[0].split() == ["link", "split", "pick", "place", "push", "reach"]
    assert rows[2].split() == ["world_plan", "train", "33%", "/", "50%", "33%", "/", "50%",
                               "0%", "/", "67%", "100%", "/", "25%"]
    without = closed_loop.split_scores([episode(True), episode(False)])  # no kinds named
    assert without["by_needed_kind"] == {}


def test_push_and_place_outcomes_say_where_the_object_ended():
    env = TabletopControlEnv(64)
    env.reset(EpisodeSpec(2 ** 40, "train", "push_two"))
    for index in (0, 1):  # the approach, then the push
        expert = env.expert(env.world_command(index, fresh=True))
        while (action := env.expert_action(expert)) is not None:
            env.step(action)
    assert env.outcome(expert)["object_error_px"] < 1e-4  # float32 actions
    move = expert.plan.ops[0][1] - expert.plan.start  # the push's one straight move
    along = move / np.linalg.norm(move)
    side = np.array([-along[1], along[0]])
    env.env.state.positions[expert.plan.obj_index] += (-1.5 * along + 2.0 * side) / 64
    out = env.outcome(expert)
    assert out["object_error_along_px"] == pytest.approx(-1.5)  # short of the target
    assert out["object_error_side_px"] == pytest.approx(2.0)
    assert out["object_error_px"] == pytest.approx(2.5)
    env.reset(EpisodeSpec(2 ** 40, "train", "bin_one"))
    pick = env.expert(env.world_command(0, fresh=True))
    while (action := env.expert_action(pick)) is not None:
        env.step(action)
    place = env.expert(env.world_command(1, fresh=True))
    while (action := env.expert_action(place))[2] > 0:  # carried closed, up to the opening
        env.step(action)
    assert place.plan.primitive.kind == "place"
    carried = env.outcome(place)  # at the spot, the gripper not yet opened
    assert carried["object_error_px"] < 1e-3 and carried["still_held"] == 1.0
    env.step(action)  # opens
    env.env.state.positions[place.plan.obj_index] += np.array([3.0, 4.0]) / 64
    assert env.outcome(place)["object_error_px"] == pytest.approx(5.0)
    assert env.outcome(place)["still_held"] == 0.0
    env.reset(EpisodeSpec(2 ** 40, "train", "touch_two"))
    reach = env.expert(env.world_command(0, fresh=False))
    goal_px = reach.plan.goal * 64
    assert env.outcome(reach) == {  # not a push: the gripper's miss only
        "gripper_error_px": pytest.approx(np.hypot(*(env.env.state.gripper * 64 - goal_px)))}
    while (action := env.expert_action(reach)) is not None:
        env.step(action)
    assert env.outcome(reach)["gripper_error_px"] < 1e-4


class _FirstPushLiftsEnv(TabletopControlEnv):
    """The built-in world whose first push only opens the gripper: a push that failed and
    undid its approach."""

    def __init__(self, image_size: int):
        super().__init__(image_size)
        self.lifted = None

    def expert_action(self, expert):
        if self.lifted is None and expert.plan.primitive.kind == "push":
            self.lifted = expert
        if expert is self.lifted:
            return np.array([0.0, 0.0, -1.0], np.float32) if self.env.state.closed else None
        return super().expert_action(expert)


def test_the_world_planner_goes_back_to_the_approach_a_failed_push_undid():
    spec = EpisodeSpec(2 ** 40, "train", "push_two")
    result = Controller(ControlSettings("world", "scripted"), lambda: _FirstPushLiftsEnv(64),
                        horizon=8, frame_stride=4).run([spec], parallel=1)[0]
    assert [(p.kind, p.success) for p in result.primitives] == [
        ("approach", True), ("push", False), ("approach", True), ("push", True),
        ("approach", True), ("push", True)]
    assert result.success


class _FirstPickStallsEnv(TabletopControlEnv):
    """The built-in world whose first pick's clip holds still: a whole failed attempt."""

    def __init__(self, image_size: int, spare_primitives: int):
        super().__init__(image_size, spare_primitives=spare_primitives)
        self.stalled = False

    def rollout(self, expert, steps, render):
        if self.stalled or expert.plan.primitive.kind != "pick":
            return super().rollout(expert, steps, render)
        self.stalled = True
        return Rollout(self.image[None], np.zeros((0, 3), np.float32), [expert])


@pytest.mark.parametrize("spare", [0, 2])
def test_the_step_budget_leaves_room_to_retry_a_failed_primitive(spare):
    """An attempt plays a whole clip (H * s = 32 steps, world.primitive_max_steps): without
    spare primitives in the budget, a retried pick leaves no steps for the place."""
    spec = EpisodeSpec(2 ** 40, "train", "bin_one")
    result = Controller(ControlSettings("world", "replay"),
                        lambda: _FirstPickStallsEnv(64, spare), horizon=8,
                        frame_stride=4).run([spec], parallel=1)[0]
    assert [(p.kind, p.success) for p in result.primitives][:2] == [("pick", False),
                                                                    ("pick", True)]
    assert (result.success, result.end) == ((True, "success") if spare else
                                            (False, "out_of_steps"))
    with pytest.raises(ValueError, match="spare_primitives"):
        TabletopEnv(64, spare_primitives=-1)


def test_words_naming_an_object_not_in_the_scene_get_no_expert():
    """A planner may name an object the scene lacks: the attempt runs without an expert (and
    fails its check) instead of stopping the evaluation."""
    env = TabletopControlEnv(64)
    env.reset(EpisodeSpec(2 ** 40, "train", "bin_one"))
    absent = next(n for n in OBJECT_NAMES if n not in env.env.state.object_names())
    assert env.expert(PrimitiveCommand(f"pick up the {absent}", (0.0, 0.0), (1.0, 1.0))) is None


def test_evaluation_seeds_are_fixed_distinct_and_outside_the_dataset_ranges():
    specs = _specs(3)
    assert specs == _specs(3)
    assert len({s.seed for s in specs}) == len(specs) and min(s.seed for s in specs) >= 2 ** 40
    assert {s.split for s in specs} == {"train", "holdout_composition"}


def test_wilson_interval_matches_reference_values():
    assert closed_loop.wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert closed_loop.wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-4)
    assert closed_loop.wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-4)


def test_conditions_are_the_configs_and_name_the_models_they_need():
    assert tuple(closed_loop.CONDITIONS) == EVAL_CONDITIONS
    assert closed_loop.needs(closed_loop.CONDITIONS["oracle"]) == ()
    assert set(closed_loop.needs(closed_loop.CONDITIONS["pewm"])) == {
        "planner", "world_model", "action_decoder"}
    assert closed_loop.needs(closed_loop.CONDITIONS["replay"]) == ()
    assert closed_loop.needs(closed_loop.CONDITIONS["true_video"]) == ("action_decoder",)


def test_locate_gripper_finds_the_palm_in_rendered_frames():
    rng = np.random.default_rng(0)
    for seed in range(50):
        state = sample_scene(np.random.default_rng(seed), 5)
        state.gripper = rng.uniform(0.05, 0.95, 2)
        state.closed = bool(seed % 2)
        found = locate_gripper(render(state, 64))
        assert np.hypot(*(found - state.gripper * 64)) < 0.5
    assert locate_gripper(np.full((64, 64, 3), 200, np.uint8)) is None


class _ScriptedPlanner:
    """A planner double that returns the expert's plan of each environment's task: the whole
    task, or only the primitives left after `done[i]` of them (plans_remaining)."""

    image_size = 64

    def __init__(self, envs_by_task: dict, plans_remaining: bool):
        self.envs_by_task, self.plans_remaining = envs_by_task, plans_remaining
        self.calls = 0

    def plan_batch(self, images, tasks):
        self.calls += 1
        plans = []
        for task in tasks:
            env = self.envs_by_task[task]
            steps = [PlanStep(p.text(), tuple(plan.start * 64), tuple(plan.goal * 64))
                     for p, plan in zip(env.task.primitives, env.setup.plans)]
            left = sum(env._progress.reached) if self.plans_remaining else 0
            plans.append(Plan(tuple(steps[left:] or steps[-1:])))
        return plans


@pytest.mark.parametrize("plans_remaining", [False, True])
def test_vlm_planning_runs_the_primitive_at_its_position_or_the_first_left(plans_remaining,
                                                                           monkeypatch):
    """A whole-task plan is followed by position; a plan of the primitives left by its first
    step; either way a correct plan with scripted primitives solves the task. Closed loop
    replans every round, open loop once."""
    specs = [EpisodeSpec(2 ** 40 + i, "train", t) for i, t in
             enumerate(("bin_two", "touch_two", "push_then_bin", "lift_release"))]
    by_task = {}
    original = TabletopEnv.reset

    def reset(env, **kw):
        out = original(env, **kw)
        by_task[env.task.text] = env
        return out

    monkeypatch.setattr(TabletopEnv, "reset", reset)
    for loop in ("closed", "open"):
        planner = _ScriptedPlanner(by_task, plans_remaining)
        controller = _controller(ControlSettings("vlm", "scripted", loop), planner=planner)
        results = controller.run(specs, parallel=4)
        assert all(r.success for r in results), [(r.task, r.end) for r in results]
        assert [len(r.primitives) for r in results] == [r.task_length for r in results]
        longest = max(r.task_length for r in results)
        assert planner.calls == (longest if loop == "closed" else 1)


def test_settings_and_missing_models_get_clear_errors():
    with pytest.raises(ValueError, match="executor must be one of"):
        ControlSettings(executor="dreamed")
    for executor in ("decoded", "true_video"):
        with pytest.raises(ValueError, match=f"'{executor}' executor needs a PrimitivePolicy"):
            _controller(ControlSettings("world", executor))
    with pytest.raises(ValueError, match="needs a Planner"):
        _controller(ControlSettings("vlm", "scripted"))
    with pytest.raises(ValueError, match="execute_frames = 9 exceeds the clip's 8 frames"):
        _controller(ControlSettings("world", "replay", execute_frames=9))
    with pytest.raises(ValueError, match="execute_frames must be >= 1"):
        ControlSettings(execute_frames=0)


@pytest.fixture(scope="module")
def random_policy():
    """A random-weight world model and action decoder (16-pixel world) as a policy of 3 rows."""
    config = small_config("eval.parallel_envs=3")
    tokenizer = build_tokenizer(["move to the red cube", "pick up the blue disc"])
    rngs = nnx.Rngs(0)
    with nnx.use_eager_sharding(False):
        encoder = make_text_encoder(config, rngs, tokenizer.get_vocab_size())
    model = WorldModel.from_config(config, rngs, encoder)
    randomize(model, 1, scale=0.02)
    decoder = ActionDecoder(ActionDecoderSpec(16, config.data.frame_stride, 8, 4, 32, 1, 3, (2,),
                                              tokenizer.get_vocab_size(), 8), rngs=nnx.Rngs(1))
    randomize(decoder, 2)
    stats = ActionStats.compute(np.random.default_rng(0).normal(0, 0.05, (100, 3)), [2])
    return PrimitivePolicy(model, config, tokenizer, decoder, stats, batch_size=3), config


def test_policy_step_is_repeatable_and_rows_do_not_depend_on_padding(random_policy):
    policy, config = random_policy
    obs = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    commands = [PrimitiveCommand("move to the red cube", (3.0, 4.0), (12.0, 9.0)),
                PrimitiveCommand("pick up the blue disc", (8.0, 8.0), (2.0, 2.0)),
                PrimitiveCommand("move to the red cube", (1.0, 1.0), (15.0, 15.0))]
    full = policy.step(obs, commands, step_index=5)
    assert full.clips.shape == (3, config.data.horizon, 16, 16, 3)
    assert full.clips.dtype == np.uint8 and full.actions.shape == (
        3, config.data.horizon, config.data.frame_stride, 3)
    grips = {np.float32(policy.stats.low[2]), np.float32(policy.stats.high[2])}
    assert set(np.unique(full.actions[..., 2])) <= grips  # gripper: one of its two commands
    again = policy.step(obs[:2], commands[:2], step_index=5)
    np.testing.assert_array_equal(again.clips, full.clips[:2])
    np.testing.assert_allclose(again.actions, full.actions[:2], atol=1e-6)
    other = policy.step(obs, commands, step_index=6)
    assert np.abs(other.clips.astype(int) - full.clips).max() > 0
    with pytest.raises(ValueError, match="uint8 observations"):
        policy.step(obs[:, :8, :8], commands, step_index=0)


def test_tracked_decoding_of_an_interval_equals_decoding_its_clip_with_the_live_frame(
        random_policy):
    """Interval j decoded from a live observation is what the decoder gives, as in training,
    for the whole clip after the observation it was imagined from with frame j - 1 (the
    interval's first frame) swapped for the live one; rows do not depend on padding."""
    policy, config = random_policy
    rng = np.random.default_rng(3)
    h = config.data.horizon
    first = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    clips = rng.integers(0, 256, (2, h, 16, 16, 3), dtype=np.uint8)
    live = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    start, goal = np.array([[3, 4], [8, 8]], np.float32), np.array([[12, 9], [2, 2]], np.float32)
    valid = np.array([True, False])
    texts = ["move to the red cube", "pick up the blue disc"]
    codes = policy.encode_clips(first, clips)
    for j in (0, 1, h - 1):
        observed = first if j == 0 else live  # the clip starts at the observation
        frames = clips.copy()
        if j:
            frames[:, j - 1] = live
        want = policy.decode(policy.context(first), frames, start, goal, valid, texts)[:, j]
        got = policy.decode_interval(codes, observed, j, start, goal, valid, texts)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        one = policy.decode_interval(codes[1:], observed[1:], j, start[1:], goal[1:], valid[1:],
                                     texts[1:])
        np.testing.assert_allclose(one, want[1:], rtol=1e-5, atol=1e-5)


class _RecordingDecoder:
    """A policy double for the true-video executor: each clip's "encoding" is its frames after
    the observation it starts from, every call is recorded, and each step moves the gripper
    0.01 to the right with the gripper open."""

    horizon, context_frames, batch_size = 8, 1, 2
    context = PrimitivePolicy.context

    def __init__(self):
        self.calls = []

    def encode_clips(self, first, clips):
        return np.concatenate([first[:, None], clips], axis=1)  # (B, H + 1, N, N, 3)

    @staticmethod
    def _steps(*leading: int) -> np.ndarray:
        """(*leading, s, A) steps 0.01 to the right with the gripper open."""
        actions = np.zeros((*leading, 4, 3), np.float32)
        actions[..., 0], actions[..., 2] = 0.01, -1.0
        return actions

    def decode_interval(self, codes, observations, j, start_xy, goal_xy, sgg_valid, texts):
        self.calls.append((codes.copy(), observations.copy(), j, start_xy.copy()))
        return self._steps(len(codes))  # (B, s, A)

    def decode(self, context, frames, start_xy, goal_xy, sgg_valid, texts):
        self.calls.append((context.copy(), frames.copy(), None, start_xy.copy()))
        return self._steps(len(frames), frames.shape[1])  # (B, H, s, A)


@pytest.mark.parametrize("track, execute_frames", [(True, 3), (True, None), (False, 3)])
def test_tracking_decodes_each_interval_from_the_live_observation(track, execute_frames):
    """With tracking, interval j is decoded from the live observation (not the clip's frame
    j - 1) within the true clip after the round's first observation, with that observation's
    gripper as the start point; without, the whole clip is decoded once from the first
    observation."""
    spec = EpisodeSpec(2 ** 40 + 3, "train", "bin_one")
    policy = _RecordingDecoder()
    controller = Controller(
        ControlSettings("world", "true_video", track=track, execute_frames=execute_frames),
        lambda: TabletopControlEnv(64), horizon=8, frame_stride=4, policy=policy)
    env = TabletopControlEnv(64)
    env.reset(spec)
    roll = env.rollout(env.expert(env.world_command(0, True)), 32, render=True)
    truth = roll.frames[frame_indices(0, len(roll.actions), 8, 4)]  # (8, 64, 64, 3)
    controller.run([spec], parallel=1)
    first_round = policy.calls[:execute_frames or 8] if track else policy.calls[:1]
    for j, (clip, observed, index, start_xy) in enumerate(first_round):
        np.testing.assert_allclose(start_xy[0], env.gripper_xy(), atol=1e-3)
        if not track:  # (context, frames): the clip decoded once
            np.testing.assert_array_equal(clip[0, 0], env.image)
            np.testing.assert_array_equal(observed[0], truth)
            continue
        assert index == j
        np.testing.assert_array_equal(clip[0], np.concatenate([env.image[None], truth]))
        if j == 0:
            np.testing.assert_array_equal(observed[0], env.image)
        else:  # the live world after j intervals of 0.01-steps, not the expert's frame
            assert not np.array_equal(observed[0], truth[j - 1])
            assert not np.array_equal(observed[0], first_round[j - 1][1][0])
    assert len(policy.calls) > len(first_round)


class _RecordingEnv(TabletopControlEnv):
    """The built-in world, recording every action it is given."""

    def __init__(self, image_size: int):
        super().__init__(image_size)
        self.played = []

    def step(self, action):
        self.played.append(np.array(action))
        return super().step(action)


@pytest.mark.parametrize("gripper", ["decoded", "expert"])
def test_expert_gripper_plays_the_experts_gripper_commands_with_the_decoded_motion(gripper):
    """The expert_gripper link: the first clip plays the decoder's motion (0.01 to the right)
    with the expert's own gripper commands for the primitive in clip form (a pick: open, then
    closed on arrival, held through the padding); decoded, the double's open gripper."""
    spec = EpisodeSpec(2 ** 40 + 3, "train", "bin_one")
    env = TabletopControlEnv(64)
    env.reset(spec)
    roll = env.rollout(env.expert(env.world_command(0, True)), 32, render=False)
    expert, _ = step_actions(roll.actions, 0, len(roll.actions), 8, 4, env.gripper_dims)
    envs = []

    def make_env():
        envs.append(_RecordingEnv(64))
        return envs[-1]

    Controller(ControlSettings("world", "true_video", gripper=gripper), make_env, horizon=8,
               frame_stride=4, policy=_RecordingDecoder()).run([spec], parallel=1)
    played = np.stack(envs[0].played[:32])  # the first clip: H * s steps
    np.testing.assert_allclose(played[:, 0], 0.01)
    want = expert.reshape(32, -1)[:, 2] if gripper == "expert" else np.full(32, -1.0)
    np.testing.assert_array_equal(played[:, 2], want)
    assert gripper == "decoded" or len(set(want)) == 2  # the pick closes on the way
    with pytest.raises(ValueError, match="decodes none"):
        ControlSettings("world", "replay", gripper="expert")


class _ActionsDecoder(_RecordingDecoder):
    """A policy double whose interval j is interval j of the given actions (H, s, A)."""

    def __init__(self, actions: np.ndarray):
        super().__init__()
        self.actions = actions

    def decode_interval(self, codes, observations, j, start_xy, goal_xy, sgg_valid, texts):
        self.calls.append(j)
        return np.repeat(self.actions[j][None], len(codes), 0)  # (B, s, A)


def test_follow_px_tells_actions_that_carry_out_their_clip_from_ones_that_do_not():
    """follow_px, the real gripper's mean distance from where the first clip draws it: the
    expert's own actions with its true future frames (true_video) follow the clip within a
    pixel; the double's steps 0.01 to the right leave the pick's drawn gripper pixels away, and
    the split's scores give its median per primitive."""
    spec = EpisodeSpec(2 ** 40 + 3, "train", "bin_one")
    env = TabletopControlEnv(64)
    env.reset(spec)
    roll = env.rollout(env.expert(env.world_command(0, True)), 32, render=False)
    expert, _ = step_actions(roll.actions, 0, len(roll.actions), 8, 4, env.gripper_dims)

    def first_primitive(policy):
        controller = Controller(ControlSettings("world", "true_video"),
                                lambda: TabletopControlEnv(64), horizon=8, frame_stride=4,
                                policy=policy)
        return controller.run([spec], parallel=1)[0]

    followed = first_primitive(_ActionsDecoder(expert))
    assert followed.primitives[0].kind == "pick" and followed.primitives[0].follow_px < 1.0
    drifted = first_primitive(_RecordingDecoder())
    assert drifted.primitives[0].follow_px > 3.0
    scores = closed_loop.split_scores([drifted])
    picks = [p.follow_px for p in drifted.primitives if p.kind == "pick"]
    assert scores["per_primitive"]["pick"]["median"]["follow_px"] == pytest.approx(
        np.median(picks))


def test_random_weight_models_fail_and_the_verdict_says_so(random_policy):
    """Decoded actions from random models do not solve tasks; the report says it fails, beside
    the oracle on the same seeds."""
    policy, config = random_policy
    specs = [EpisodeSpec(2 ** 40 + i, "train", t) for i, t in
             enumerate(("bin_one", "touch_two", "push_two"))]
    results = _controller(ControlSettings("world", "decoded"), 16, policy=policy).run(
        specs, parallel=3, record=1)
    oracle = _controller(ControlSettings("world", "scripted"), 16).run(specs, parallel=3)
    assert not any(r.success for r in results) and all(r.success for r in oracle)
    assert results[0].frames and results[0].frames[0].shape == (16, 32, 3)
    h, stride = config.data.horizon, config.data.frame_stride
    assert all(r.env_steps <= max(32, h * stride) * r.task_length for r in results)
    verdict = closed_loop.verdict("world_plan", {"train": closed_loop.split_scores(results)},
                                  {"train": closed_loop.split_scores(oracle)})
    assert verdict.startswith("world_plan fails") and "oracle solves 3 of 3" in verdict
    assert dataclasses.asdict(results[0].primitives[0])["goal_reached"] in (True, False)
