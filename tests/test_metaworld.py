"""Meta-World: the environment adapter, the camera projection, expert segmentation and the
demonstration dataset. Needs the `metaworld` extra and software EGL (`.ci/run` installs both
and runs these in their own step)."""

import pathlib

import numpy as np
import pytest

import pewm_jax.metaworld  # noqa: F401  (selects MuJoCo's EGL backend before mujoco loads)

pytest.importorskip("metaworld")

from pewm_jax.metaworld.env import CAMERAS, MetaWorldEnv  # noqa: E402  (before mujoco: EGL)
from pewm_jax.metaworld import experts  # noqa: E402
import mujoco  # noqa: E402

from data_loaders import clip_dataset  # noqa: E402
from data_loaders import metaworld as mw_data  # noqa: E402
from pewm_jax import config as config_lib  # noqa: E402
from pewm_jax.sim.world import ActionError  # noqa: E402

pytestmark = pytest.mark.metaworld


@pytest.fixture
def env():
    e = MetaWorldEnv("door-open", camera="corner", image_size=64)
    yield e
    e.close()


def _rollout(seed: int, actions: np.ndarray) -> np.ndarray:
    e = MetaWorldEnv("basketball", camera="corner2", image_size=64)
    try:
        frames = [e.reset(seed=seed)[0]["image"]]
        frames += [e.step(a)[0]["image"] for a in actions]
        return np.stack(frames)
    finally:
        e.close()


def test_same_seed_same_frames_and_seeds_vary_the_task():
    actions = np.random.default_rng(0).uniform(-1, 1, (6, 4)).astype(np.float32)
    first, again, other = _rollout(3, actions), _rollout(3, actions), _rollout(4, actions)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[0], other[0])  # another seed places the ball elsewhere


def _marker_pixels(env: MetaWorldEnv, camera: str, point: np.ndarray) -> np.ndarray:
    """MuJoCo's own rendering of a small sphere at `point` alone: the (x, y) centroid of its
    pixels in the stored (upright) image."""
    renderer = env._renderer
    renderer.update_scene(env.task_env.data, camera=camera)
    renderer.scene.ngeom = 0
    blank = renderer.render().copy()
    mujoco.mjv_initGeom(renderer.scene.geoms[0], mujoco.mjtGeom.mjGEOM_SPHERE,
                        np.array([0.02, 0, 0]), np.asarray(point, np.float64),
                        np.eye(3).ravel(), np.array([1, 0, 0, 1], np.float32))
    renderer.scene.ngeom = 1
    image = renderer.render()
    if env._up_is_down(camera):
        image, blank = image[::-1, ::-1], blank[::-1, ::-1]
    rows, cols = np.nonzero(np.any(image != blank, axis=-1))
    assert len(rows) >= 3, "the marker is not visible"
    return np.array([cols.mean() + 0.5, rows.mean() + 0.5])


def test_projection_matches_mujocos_rendering_of_a_marker_and_images_are_upright():
    env = MetaWorldEnv("assembly", camera="corner", image_size=128)
    try:
        env.reset(seed=2)
        offsets = np.array([[0, 0, 0], [0.08, 0, 0.1], [-0.1, 0.1, 0], [0.05, -0.05, 0.2]])
        for camera in CAMERAS:
            model = env.camera_model(camera)
            points = env.tcp + offsets
            errors = [np.linalg.norm(_marker_pixels(env, camera, p) - model.project(p))
                      for p in points]
            assert np.mean(errors) < 1.0, (camera, errors)
            # Upright images: a marker higher in the world is drawn higher (smaller y).
            low = _marker_pixels(env, camera, env.tcp)
            high = _marker_pixels(env, camera, env.tcp + [0, 0, 0.15])
            assert high[1] < low[1] - 3, (camera, low, high)
    finally:
        env.close()


def test_actions_outside_bounds_are_clipped(env):
    twin = MetaWorldEnv("door-open", camera="corner", image_size=64)
    try:
        env.reset(seed=1)
        twin.reset(seed=1)
        obs, _, _, _, info = env.step(np.array([3.0, -2.0, 0.5, 9.0], np.float32))
        ref, _, _, _, ref_info = twin.step(np.array([1.0, -1.0, 0.5, 1.0], np.float32))
        assert info["action_clipped"] and not ref_info["action_clipped"]
        np.testing.assert_array_equal(obs["state"], ref["state"])
        np.testing.assert_array_equal(obs["image"], ref["image"])
    finally:
        twin.close()


def test_bad_actions_and_names_raise(env):
    env.reset(seed=0)
    with pytest.raises(ActionError, match="finite action of shape"):
        env.step(np.array([np.nan, 0, 0, 0]))
    with pytest.raises(ActionError, match="shape"):
        env.step(np.zeros(3))
    with pytest.raises(ValueError, match="did you mean"):
        MetaWorldEnv("door-opn")
    with pytest.raises(ValueError, match="camera must be one of"):
        MetaWorldEnv("door-open", camera="topview")


def test_episode_ends_at_success_and_is_truncated_at_the_budget():
    e = MetaWorldEnv("reach", camera="corner", image_size=32, max_episode_steps=5)
    try:
        e.reset(seed=0)
        outcomes = [e.step(np.zeros(4, np.float32))[2:4] for _ in range(5)]
        assert outcomes[-1] == (False, True) and all(o == (False, False) for o in outcomes[:-1])
    finally:
        e.close()


WORDS = experts.TaskWords("do it", "block", ("reach", "lower", "lift"))


def test_segmentation_moves_forward_and_splits_at_gripper_changes():
    branches = np.array([0] * 6 + [1] * 5 + [0, 1] * 3 + [2] * 8)  # oscillates back to 0
    efforts = np.array([-1.0] * 8 + [0.7] * 17)  # closes in the middle of 'lower'
    segments = experts.segment_demo(branches, efforts, WORDS, min_steps=2)
    assert [(s.start, s.end, s.text) for s in segments] == [
        (0, 6, "reach"), (6, 8, "lower"), (8, 17, "grasp the block"), (17, 25, "lift")]


def test_segmentation_merges_short_runs():
    branches = np.array([0] * 2 + [1] * 10 + [2] * 10)
    segments = experts.segment_demo(branches, np.zeros(22), WORDS, min_steps=4)
    assert [(s.start, s.end) for s in segments] == [(0, 12), (12, 22)]
    assert segments[0].text == "reach"  # the episode's first phase names the merged run
    with pytest.raises(ValueError, match="one branch and one effort per step"):
        experts.segment_demo(branches, np.zeros(3), WORDS, min_steps=4)


def test_words_table_covers_the_protocol_tasks():
    assert tuple(experts.TASKS) == config_lib.METAWORLD_TASKS
    with pytest.raises(ValueError, match="no primitive words"):
        experts.task_words("reach")


@pytest.mark.parametrize("task", config_lib.METAWORLD_TASKS)
def test_every_task_segments_into_ordered_primitives_inside_the_image(task):
    successes = 0
    for seed in (0, 1, 2):
        demo = experts.run_expert(task, seed, image_size=32)
        successes += demo.success  # failed demonstrations are segmented too, then dropped
        segments = demo.segments
        assert segments[0].start == 0 and segments[-1].end == len(demo.actions)
        assert all(a.end == b.start for a, b in zip(segments, segments[1:]))
        assert all(s.end > s.start for s in segments)
        words = experts.task_words(task)
        texts = [s.text for s in segments]
        # Branch phrases appear at most once and in the expert's order of first appearance.
        branch_texts = [t for t in texts if t in words.branches]
        assert len(branch_texts) == len(set(branch_texts)), texts
        for camera, xy in demo.tcp_xy.items():
            ends = xy[[i for s in segments for i in (s.start, s.end)]]
            assert np.all((ends >= 0) & (ends <= 32)), (task, seed, camera, ends)
        assert demo.frames["corner"].shape == (len(demo.actions) + 1, 32, 32, 3)
    assert successes >= 2, f"the {task} expert succeeded on {successes} of 3 seeds"


def _tiny_config(**metaworld):
    config = config_lib.default_config()
    config.data.generator = "metaworld"
    config.world.image_size = 32
    config.data.generation_workers = 1
    config.metaworld.tasks = ("button-press-topdown", "handle-press")
    config.metaworld.cameras = ("corner", "corner3")
    config.metaworld.train_seeds, config.metaworld.val_seeds, config.metaworld.test_seeds = 2, 0, 1
    for k, v in metaworld.items():
        config.metaworld[k] = v
    config_lib.validate(config)
    return config


def test_dataset_has_the_built_in_worlds_layout(tmp_path):
    config = _tiny_config()
    meta, generated = clip_dataset.ensure_dataset(mw_data, config, tmp_path / "data")
    assert generated and meta.name == "pewm_metaworld" and meta.gripper_dims == [3]
    assert set(meta.splits) == {"train", "test"} and meta.splits["train"] >= 2 * 2 * 2
    assert not (tmp_path / ".data.demos").exists()  # the cache goes once the dataset is in place
    clips = clip_dataset.clip_source(tmp_path / "data", "train")
    texts = set()
    for i in range(len(clips)):
        clip = clips[i]
        assert clip["frames"].shape == (config.data.horizon, 32, 32, 3)
        h, s = config.data.horizon, config.data.frame_stride
        assert clip["actions"].shape == (h, s, 4) and clip["action_valid"].shape == (h, s)
        assert clip["action_valid"][0, 0]  # a clip starts with its segment's own steps
        for xy in (clip["start_xy"], clip["goal_xy"]):
            assert np.all((xy >= 0) & (xy <= 32))
        texts.add(clip["text"].decode() if isinstance(clip["text"], bytes) else clip["text"])
    assert "press the button down" in texts
    # Same settings: reused, not regenerated. Other settings: refused, the dataset kept.
    assert clip_dataset.ensure_dataset(mw_data, config, tmp_path / "data")[1] is False
    with pytest.raises(clip_dataset.DatasetError, match="other settings"):
        clip_dataset.ensure_dataset(mw_data, _tiny_config(train_seeds=3), tmp_path / "data")
    assert clip_dataset.DatasetMeta.load(tmp_path / "data").splits == meta.splits


def test_demonstration_seeds_stay_within_what_meta_world_accepts():
    config = _tiny_config()
    config.seed = 429
    assert mw_data.demo_seed(config, "test", 999_999) < 2**32
    config.seed = 430
    with pytest.raises(clip_dataset.DatasetError, match="config.seed of at most 429"):
        mw_data.demo_seed(config, "train", 0)


def test_demo_collection_resumes_from_its_cache(tmp_path, monkeypatch):
    config = _tiny_config(tasks=("handle-press",), cameras=("corner",))
    cache = tmp_path / "cache"
    first = mw_data.collect_demos(config, cache)
    assert len(first["train"]) == 2 and len(first["test"]) == 1
    stamps = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    lost = first["train"][1]
    lost.unlink()  # as if the run had stopped before this demonstration
    played = []
    real = mw_data._run_demo
    monkeypatch.setattr(mw_data, "_run_demo", lambda job: played.append(job) or real(job))
    again = mw_data.collect_demos(config, cache)
    assert [pathlib.Path(job[-1]) for job in played] == [lost]
    assert again == first
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()
               if p not in (lost, cache / "settings.json"))
    # Recorded at another frame size: refused, not mixed in; the cache is kept.
    bigger = _tiny_config(tasks=("handle-press",), cameras=("corner",))
    bigger.world.image_size = 64
    with pytest.raises(clip_dataset.DatasetError, match="other settings.*delete that directory"):
        mw_data.collect_demos(bigger, cache)
    assert lost.exists()


# Closed-loop evaluation (pewm_jax.evaluate.metaworld, pewm_jax.control.metaworld).
import dataclasses  # noqa: E402

from data_loaders.clips import frame_indices  # noqa: E402
from pewm_jax.control.controller import Controller  # noqa: E402
from pewm_jax.control.policy import PolicyOutput, PrimitiveCommand, PrimitivePolicy  # noqa: E402
from pewm_jax.evaluate.closed_loop import needs  # noqa: E402
from pewm_jax.evaluate import metaworld as mw_eval  # noqa: E402
from pewm_jax.control.metaworld import (EpisodeSpec, MetaWorldControlEnv,  # noqa: E402
                                            oracle_plan)
from pewm_jax.text.plan import Plan, PlanParseError, PlanStep  # noqa: E402
from pewm_jax.vlm.planner import Planner  # noqa: E402


class _StillPolicy:
    """A policy double whose clips never move: every per-step action is zero. It records the
    commands it imagines for and the true clips it decodes."""

    batch_size, image_size, horizon, context_frames = 4, 32, 2, 1
    context = PrimitivePolicy.context

    def __init__(self, frame_stride: int):
        self.frame_stride = frame_stride
        self.commands, self.decoded = [], []

    def step(self, observations, commands, *, step_index, use_sgg, decode=True):
        self.commands.append((list(commands), use_sgg))
        b = len(commands)
        return PolicyOutput(np.zeros((b, self.horizon, 32, 32, 3), np.uint8),
                            np.zeros((b, self.horizon, self.frame_stride, 4), np.float32),
                            0.0, 0.0)

    def decode(self, context, frames, start_xy, goal_xy, sgg_valid, texts):
        self.decoded.append((context, frames))  # (B, C, N, N, 3), (B, H, N, N, 3)
        return np.zeros((len(frames), self.horizon, self.frame_stride, 4), np.float32)

    def encode_clips(self, first, clips):  # tracked decoding: the clip, with what it follows
        self.decoded.append((first[:, None], clips))  # (B, 1, N, N, 3), (B, H, N, N, 3)
        return np.zeros((len(clips), self.horizon + 1, 1), np.float32)

    def decode_interval(self, codes, observations, j, start_xy, goal_xy, sgg_valid, texts):
        return np.zeros((len(codes), self.frame_stride, 4), np.float32)


class _FixedPlanner:
    """A planner double: the same two-primitive plan for every frame."""

    image_size, plans_remaining = 64, False
    plan_batch = Planner.plan_batch  # the real batching over the double's ids and parse

    def __init__(self):
        self.calls = 0

    def generate_ids(self, images, tasks):
        self.calls += 1
        return np.arange(len(tasks))  # a row "id" per task, read by `parse`

    def parse(self, row):
        step = PlanStep("press the button down", (10.0, 20.0), (30.0, 40.0))
        return Plan((step, step))


def _controller(condition: str, *, frame_stride: int, max_replans: int, policy=None,
                planner=None, horizon: int = 2) -> Controller:
    """The evaluation's controller for `condition` on 32-pixel Meta-World episodes."""
    settings = dataclasses.replace(mw_eval.CONDITIONS[condition], max_replans=max_replans)
    return Controller(settings, lambda: MetaWorldControlEnv(32), horizon=horizon,
                      frame_stride=frame_stride, policy=policy, planner=planner)


def test_protocol_is_tasks_by_cameras_by_seeds():
    mw = config_lib.default_config().metaworld
    specs = mw_eval.protocol_specs(mw)
    assert len(specs) == 11 * 3 * 25
    assert {s.seed for s in specs} == set(range(25)) and len(set(specs)) == len(specs)
    assert tuple(mw_eval.CONDITIONS) == config_lib.METAWORLD_CONDITIONS


def test_conditions_restore_only_the_models_they_use():
    need = {name: set(needs(settings)) for name, settings in mw_eval.CONDITIONS.items()}
    system = {"planner", "world_model", "action_decoder"}
    assert need == {"pewm": system, "open_loop": system, "no_sgg": system,
                    "oracle_primitives": {"world_model", "action_decoder"},
                    "true_video": {"action_decoder"}, "replay": set(), "expert": set()}


@pytest.mark.parametrize("loop", ["pewm", "open_loop"])
def test_failed_attempts_replan_up_to_the_budget(loop):
    policy, planner = _StillPolicy(frame_stride=2), _FixedPlanner()
    controller = _controller(loop, frame_stride=2, max_replans=2, policy=policy, planner=planner)
    specs = [EpisodeSpec("button-press-topdown", "corner", s) for s in (0, 1)]
    results = controller.run(specs, parallel=2)
    for r in results:
        assert not r.success and r.end == "replans" and r.replans == 2
        assert len(r.primitives) == 3 * 2  # 3 plans of 2 primitives
        assert r.env_steps == 6 * 2 * 2  # H = 2 frames x frame_stride steps per primitive
    # Points are scaled from the planner's 64-pixel image to the env's 32.
    first = policy.commands[0][0][0]
    assert first.start_xy == (5.0, 10.0) and first.goal_xy == (15.0, 20.0)
    # Closed loop plans before every primitive; open loop once per plan.
    assert planner.calls == (6 if loop == "pewm" else 3)
    scores = mw_eval.condition_scores(results, 2)
    assert scores["replans"] == {"0": 0, "1": 0, "2": 2} and scores["ends"] == {"replans": 2}
    assert scores["mean_success"] == 0.0 and scores["overall"]["success_ci95"][1] < 1.0


class _RemainingPlanner(_FixedPlanner):
    """A mid-task planner double: it lists the primitives left, so closed loop runs the first."""

    plans_remaining = True

    def parse(self, row):
        return Plan((PlanStep("move the gripper above the handle", (1.0, 2.0), (3.0, 4.0)),
                     PlanStep("press the handle down", (3.0, 4.0), (5.0, 6.0))))


def _handle_press_closed_loop(planner):
    """One closed-loop handle-press episode (one replan allowed) with `planner` and a policy
    double that keeps still: the result and the policy (it records its commands)."""
    policy = _StillPolicy(frame_stride=1)
    controller = _controller("pewm", frame_stride=1, max_replans=1, policy=policy,
                             planner=planner)
    return controller.run([EpisodeSpec("handle-press", "corner", 0)], parallel=1)[0], policy


def test_closed_loop_runs_the_first_primitive_a_mid_task_planner_lists():
    result, _ = _handle_press_closed_loop(_RemainingPlanner())
    # Two plans of the first plan's length (2), each primitive the fresh plan's first.
    assert [p.text for p in result.primitives] == ["move the gripper above the handle"] * 4
    assert result.end == "replans" and result.replans == 1
    assert all(p.success is None and p.goal_reached is None and p.follow_px is None
               for p in result.primitives)  # a Meta-World frame does not show where the gripper is


class _CutOffPlanner(_FixedPlanner):
    """A planner double whose output never parses (as when decoding hits max_tokens)."""

    def parse(self, row):
        raise PlanParseError(80, "<end of plan>", "a location token")


def test_unparsable_plans_are_counted_and_never_acted_on():
    result, policy = _handle_press_closed_loop(_CutOffPlanner())
    assert result.end == "replans" and result.planner_errors == 2 and result.primitives == []
    assert policy.commands == [] and result.env_steps == 0
    assert mw_eval.condition_scores([result], 1)["planner_errors"] == 2


def test_no_sgg_drops_the_heatmaps_and_the_expert_solves_the_tasks():
    policy = _StillPolicy(frame_stride=1)
    controller = _controller("no_sgg", frame_stride=1, max_replans=0, policy=policy,
                             planner=_FixedPlanner())
    controller.run([EpisodeSpec("handle-press", "corner", 0)], parallel=1)
    assert policy.commands and not any(sgg for _, sgg in policy.commands)
    expert = _controller("expert", frame_stride=1, max_replans=0)
    specs = [EpisodeSpec(t, "corner", s) for t in ("door-open", "handle-press") for s in (0, 1)]
    results = expert.run(specs, parallel=2)
    assert all(r.success and r.env_steps < 500 for r in results)
    assert all([p.kind for p in r.primitives] == ["task"] for r in results)
    scores = mw_eval.condition_scores(results, 0)
    assert scores["mean_success"] == 1.0 and set(scores["per_task"]) == {"door-open",
                                                                          "handle-press"}


def test_oracle_primitives_follow_the_experts_segments():
    policy = _StillPolicy(frame_stride=1)
    controller = _controller("oracle_primitives", frame_stride=1, max_replans=0, policy=policy)
    spec = EpisodeSpec("door-open", "corner3", 0)
    result = controller.run([spec], parallel=1)[0]
    plan = oracle_plan(spec, 32, 4)
    assert [p.text for p in result.primitives] == [c.text for c in plan]
    assert [c.text for c in plan] == list(experts.TASKS["door-open"].branches)
    assert result.task_length == len(plan) and result.end == "replans"
    sent = [cmds[0] for cmds, _ in policy.commands]
    assert sent == plan


def test_true_video_decodes_the_experts_true_future_frames():
    """The true-video executor hands the decoder the frames the expert's future shows at the
    clip's frame indices, after the current observation."""
    policy = _StillPolicy(frame_stride=3)
    controller = _controller("true_video", frame_stride=3, max_replans=0, policy=policy)
    spec = EpisodeSpec("button-press-topdown", "corner", 1)
    controller.run([spec], parallel=1)
    env = MetaWorldControlEnv(32)
    try:
        env.reset(spec)
        roll = env.rollout(env.expert(PrimitiveCommand("", (0, 0), (0, 0))), 2 * 3, render=True)
    finally:
        env.close()
    context, frames = policy.decoded[0]
    np.testing.assert_array_equal(context[0, 0], roll.frames[0])
    np.testing.assert_array_equal(frames[0], roll.frames[frame_indices(0, 6, 2, 3)])
    assert not np.array_equal(frames[0, -1], roll.frames[0])  # the expert moved


@pytest.mark.parametrize("task", ["door-open", "assembly"])
def test_rollouts_simulate_a_copy_that_the_live_env_reproduces_exactly(task):
    """`rollout` leaves the live episode as it was, and playing its actions there gives its
    frames exactly (mid-episode, after actions no expert took); it stops when the task
    succeeds."""
    env = MetaWorldControlEnv(32)
    try:
        env.reset(EpisodeSpec(task, "corner2", 0))
        expert = env.expert(PrimitiveCommand("any words", (0, 0), (0, 0)))
        assert np.array_equal(env.hold_action(), [0, 0, 0, -1])  # open before any action
        rng = np.random.default_rng(0)
        for t in range(30):
            env.step(rng.uniform(-1, 1, 4).astype(np.float32) if t < 3 else
                     env.expert_action(expert))
        live = (env.image.copy(), env.env.raw_observation.copy(), env.env.tcp)
        roll = env.rollout(expert, 40, render=True)
        assert roll.frames.shape == (41, 32, 32, 3) and roll.actions.shape == (40, 4)
        assert roll.actions.dtype == np.float32 and len(roll.experts) == 41
        for before, now in zip(live, (env.image, env.env.raw_observation, env.env.tcp)):
            np.testing.assert_array_equal(before, now)
        unrendered = env.rollout(expert, 40, render=False)
        assert unrendered.frames.shape == (1, 32, 32, 3)
        np.testing.assert_array_equal(unrendered.actions, roll.actions)
        for action, frame in zip(roll.actions, roll.frames[1:]):
            assert env.step(action) is None
            np.testing.assert_array_equal(env.image, frame)
        assert env.hold_action()[3] == roll.actions[-1, 3]
        rest = env.rollout(expert, 500, render=False)
        ends = [env.step(action) for action in rest.actions]
        assert len(rest.actions) < 500 - 70 and ends == [None] * (len(ends) - 1) + ["success"]
    finally:
        env.close()


def test_replay_of_the_experts_actions_matches_the_expert():
    """The replay executor (the expert's per-step actions simulated on a copy, cut into clips of
    H = 8 frames x 4 steps and played) succeeds exactly where the expert does, in as many
    steps; the headline's chain table lists both links."""
    specs = [EpisodeSpec(t, "corner", s) for t in ("door-open", "handle-press") for s in (0, 1)]
    results = {name: _controller(name, frame_stride=4, max_replans=5, horizon=8).run(
        specs, parallel=2) for name in ("expert", "replay")}
    expert, replay = results["expert"], results["replay"]
    assert [r.success for r in replay] == [r.success for r in expert] == [True] * 4
    assert [r.env_steps for r in replay] == [r.env_steps for r in expert]
    assert all(p.rounds == 1 and p.env_steps <= 32 for r in replay for p in r.primitives)
    report = {"protocol": {"tasks": ["door-open", "handle-press"]},
              "published_mean_success": mw_eval.PUBLISHED,
              "conditions": {n: mw_eval.condition_scores(r, 5) for n, r in results.items()}}
    table = mw_eval.headline(report).split("evaluation chain expert -> replay")[1].splitlines()
    assert [line.split()[0] for line in table[1:]] == ["task", "door-open", "handle-press", "mean"]
    assert table[-1].split()[1:] == ["100%", "(51%-100%)", "100%", "(51%-100%)"]


def test_evaluation_without_models_runs_the_expert_links_and_skips_the_rest(tmp_path):
    """`evaluate_run` on a run directory without checkpoints: the expert and replay links run
    (they need no model) and agree, every other condition is skipped naming its training
    command, and the report is written."""
    import json

    config = config_lib.default_config()
    config.world.image_size = 32
    config.metaworld.eval_tasks, config.metaworld.eval_cameras = ("handle-press",), ("corner",)
    config.metaworld.eval_seeds, config.eval.parallel_envs = 1, 1
    config_lib.validate(config)
    report = mw_eval.evaluate_run(config, tmp_path)
    assert report == json.loads((tmp_path / "eval" / "metaworld_report.json").read_text())
    conditions = report["conditions"]
    assert list(conditions) == list(config_lib.METAWORLD_CONDITIONS)
    for name in ("expert", "replay"):
        assert conditions[name]["mean_success"] == 1.0, (name, conditions[name])
    assert conditions["replay"]["env_steps"] == conditions["expert"]["env_steps"]
    assert "pewm actions" in conditions["true_video"]["skipped"]
    assert "pewm train" in conditions["oracle_primitives"]["skipped"]
    assert all("skipped" in conditions[n] for n in ("pewm", "open_loop", "no_sgg"))
    assert "evaluation chain expert -> replay (" in mw_eval.headline(report)

@pytest.mark.slow
def test_demos_to_dataset_to_training_to_an_evaluated_episode(tmp_path):
    """`pewm run` on Meta-World end to end: one task's demonstrations, a few steps of every
    model, then one protocol episode per condition, with a finite, well-formed report."""
    import json
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    steps = {f"{s}.{k}": 4 for s in ("train", "action_decoder.train", "planner.train")
             for k in ("steps", "checkpoint_every", "sample_every")}
    overrides = {"metaworld.tasks": "('handle-press',)",
                 "metaworld.eval_tasks": "('handle-press',)",
                 "metaworld.train_seeds": 2, "metaworld.val_seeds": 1, "metaworld.test_seeds": 1,
                 "metaworld.eval_seeds": 1, "metaworld.max_replans": 1, "world.image_size": 32,
                 "model.patch_size": 8, "action_decoder.channels": 8,
                 "planner.image_size": 32, "eval.parallel_envs": 1, **steps}
    out = subprocess.run(
        [sys.executable, "-m", "pewm_jax.cli", "run", f"--config={root / 'configs/metaworld.py'}",
         f"--workdir={tmp_path}", *(f"--config.{k}={v}" for k, v in overrides.items())],
        cwd=root, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "metaworld_report.json").read_text())
    assert report["protocol"]["tasks"] == ["handle-press"] and report["protocol"]["seeds"] == 1
    assert set(report["conditions"]) == set(config_lib.METAWORLD_CONDITIONS)
    for name, c in report["conditions"].items():
        assert "skipped" not in c, (name, c)
        assert 0.0 <= c["mean_success"] <= 1.0 and sum(c["replans"].values()) == 1
        lo, hi = c["per_task"]["handle-press"]["success_ci95"]
        assert 0.0 <= lo <= hi <= 1.0
        # A 4-step planner's plans may not parse: counted, and then nothing moves.
        assert np.isfinite(c["env_steps_per_s"]) and 0 <= c["env_steps"] <= 500
        assert c["planner_errors"] >= 0 and sum(c["ends"].values()) == 1
    for name in ("oracle_primitives", "expert"):
        assert report["conditions"][name]["env_steps"] > 0
    assert report["conditions"]["expert"]["mean_success"] == 1.0
    assert "mean" in out.stdout and "published mean success" in out.stdout
