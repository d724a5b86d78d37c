"""Closed-loop evaluation of a run directory: how often long tasks succeed, and why they fail.

`evaluate_run(config, workdir, dataset_dir)` restores only the models its conditions need, onto
whatever devices it runs on, and runs `config.eval.episodes_per_template` episodes of every task
template on every split of `config.eval.splits` under each condition, on the same fixed seeds,
`config.eval.parallel_envs` environments in lockstep. Conditions (`CONDITIONS`):

    pewm          VLM planner, imagined clip -> decoded actions, closed loop: the system
    open_loop     the same, planned once from the first frame
    no_sgg        the same as pewm with the start/goal heatmaps dropped (text-only clips)
    world_plan    the world's own task decomposition instead of the planner (no planner error)
    expert_gripper  world_plan with the expert's gripper commands in place of the decoded ones
                  (the decoded motion of the imagined clip is played): the decoder's gripper
                  commands on imagined clips
    true_video    the world's decomposition, the expert's true future frames (simulated on a
                  copy of the world) -> decoded actions (no world-model error: the decoder's)
    replay        the world's decomposition, the expert's own per-step actions in clip form,
                  played by the executor (the clip contract's and the executor's; = oracle)
    vlm_scripted  the planner's primitives run by the scripted expert (no world-model error)
    oracle        the world's decomposition + scripted primitives: the harness's upper bound
    whole_task    the non-primitive baseline: one clip for the whole task from the first frame
                  and the task's words (no points), decoded and played open loop; its model
                  had the world model's training FLOPs (`pewm whole_task`)

The chain `oracle -> replay -> true_video -> expert_gripper -> world_plan -> pewm` feeds one
more link with a model's output at each step (DESIGN.md "Evaluation chain"); `chain_table`
prints it with 95% intervals and per-primitive success, so the first link that breaks is plain.
`config.eval.execute_frames` (k) plays k frames of each clip, then observes and imagines again;
`config.eval.track` decodes each frame interval from the live observation (the default) or each
clip once from its own frames. The clip models sample as the given config's `diffusion` says
(`SAMPLING_KEYS`: sampler, steps, text and SGG guidance scales are evaluation choices, so one
trained model serves every sampler ablation). A condition whose models are missing from the run directory is listed as skipped, with the
command that trains them. Every figure sits beside its baseline: success beside the oracle's,
sampled clips beside copying the context frame (PSNR, SSIM, goal reach), decoded actions beside
the mean action, planned points beside the image-centre guess.

Writes `<workdir>/eval/report.json`, rollout GIFs of the first condition's first episodes
(`[observation | imagined frame]`), and the scalars to TensorBoard (`<workdir>/tensorboard/eval`).
Evaluation seeds start at 2**40, above every dataset seed (DESIGN.md data splits).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import pathlib
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from data_loaders.clip_dataset import DatasetError
from pewm_jax.config import SAMPLING_KEYS
from pewm_jax.control.controller import ControlSettings, Controller, EpisodeResult
from pewm_jax.control.policy import PrimitivePolicy
from pewm_jax.control.tabletop import EpisodeSpec, TabletopControlEnv
from pewm_jax.recipes import action_scores as actions_eval
from pewm_jax.recipes import imagined_clips
from pewm_jax.recipes import video_scores as video_quality
from pewm_jax.sim.tasks import TEMPLATE_NAMES
from pewm_jax.train.checkpoint import CheckpointError
from pewm_jax.train.metrics import MetricWriter
from pewm_jax.recipes import planner_scores as planner_eval
from pewm_jax.recipes.restore import Trained, restore, with_sampling
from pewm_jax.vlm.finetune import make_planner
from pewm_jax.vlm.planner import Planner

CONDITIONS: dict[str, ControlSettings] = {
    "pewm": ControlSettings("vlm", "decoded", "closed"),
    "open_loop": ControlSettings("vlm", "decoded", "open"),
    "no_sgg": ControlSettings("vlm", "decoded", "closed", sgg=False),
    "world_plan": ControlSettings("world", "decoded", "closed"),
    "expert_gripper": ControlSettings("world", "decoded", "closed", gripper="expert"),
    "true_video": ControlSettings("world", "true_video", "closed"),
    "replay": ControlSettings("world", "replay", "closed"),
    "vlm_scripted": ControlSettings("vlm", "scripted", "closed"),
    "oracle": ControlSettings("world", "scripted", "closed"),
    "whole_task": ControlSettings("task", "decoded", "open", sgg=False),
}
# The evaluation chain (DESIGN.md): each condition feeds one more link with a model's output.
CHAIN = ("oracle", "replay", "true_video", "expert_gripper", "world_plan", "pewm")
# The command that trains each model into a run directory.
TRAIN_COMMAND = {"world_model": "pewm train", "action_decoder": "pewm actions",
                 "planner": "pewm planner", "whole_task": "pewm whole_task"}
_SEED_BASE = 2 ** 40
_GIF_SCALE = 3


def episode_specs(eval_config: ml_collections.ConfigDict) -> list[EpisodeSpec]:
    """The evaluation episodes: every split x template x episode, with fixed seeds."""
    e = eval_config
    return [EpisodeSpec(_SEED_BASE + ((e.seed * 3 + s) * len(TEMPLATE_NAMES) + t) * 10_000 + i,
                        split, name)
            for s, split in enumerate(e.splits) for t, name in enumerate(TEMPLATE_NAMES)
            for i in range(e.episodes_per_template)]


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a success rate (sound at 0 and n successes)."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (
        1 + z * z / trials)
    return (max(0.0, centre - half), min(1.0, centre + half))


def clip_model(settings: ControlSettings) -> str | None:
    """The run-directory model that imagines a condition's clips (None: it imagines none)."""
    if settings.executor != "decoded":
        return None
    return "whole_task" if settings.planner == "task" else "world_model"


def needs(settings: ControlSettings) -> tuple[str, ...]:
    """The run-directory models a condition restores."""
    clips = clip_model(settings)
    return (("planner",) if settings.planner == "vlm" else ()) + (
        (clips,) if clips else ()) + (("action_decoder",) if settings.uses_decoder else ())


def success_rate(successes: Sequence[bool]) -> dict:
    """Episodes, successes, success rate and its 95% Wilson interval, for a report."""
    n, wins = len(successes), int(sum(successes))
    return {"episodes": n, "successes": wins, "success": wins / max(n, 1),
            "success_ci95": list(wilson_interval(wins, n))}


def split_scores(results: Sequence[EpisodeResult]) -> dict:
    """Success (with its 95% interval), chain length, per-template and per-primitive success,
    goal reach of imagined clips (overall and per primitive), per primitive the medians of the
    world's outcome measures and of follow_px (`PrimitiveRecord`), how episodes ended, and,
    where the world names its decompositions, per primitive kind the success of the tasks that
    need it and of those that do not (`by_needed_kind`: a kind that always fails caps success
    at the second), for one split's episodes."""
    n = len(results)
    per_template = defaultdict(list)
    per_kind = defaultdict(list)
    kind_reach = defaultdict(list)
    outcomes: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    reach = []
    for r in results:
        per_template[r.template].append(r.success)
        for p in r.primitives:
            per_kind[p.kind or "unnamed"].append(bool(p.success))
            for key, value in p.outcome.items():
                outcomes[p.kind or "unnamed"][key].append(value)
            if p.follow_px is not None:
                outcomes[p.kind or "unnamed"]["follow_px"].append(p.follow_px)
            if p.goal_reached is not None:
                reach.append(p.goal_reached)
                kind_reach[p.kind or "unnamed"].append(p.goal_reached)
    return {
        **success_rate([r.success for r in results]),
        "chain_length": float(np.mean([r.chain_length for r in results])) if n else 0.0,
        "task_length": float(np.mean([r.task_length for r in results])) if n else 0.0,
        "primitives_run": float(np.mean([len(r.primitives) for r in results])) if n else 0.0,
        "per_template": {k: float(np.mean(v)) for k, v in sorted(per_template.items())},
        "per_primitive": {k: {"success": float(np.mean(v)), "runs": len(v),
                              **({"goal_reach": float(np.mean(kind_reach[k]))}
                                 if kind_reach.get(k) else {}),
                              **({"median": {m: float(np.median(x))
                                             for m, x in sorted(outcomes[k].items())}}
                                 if outcomes.get(k) else {})}
                          for k, v in sorted(per_kind.items())},
        "goal_reach": float(np.mean(reach)) if reach else None,
        "ends": dict(Counter(r.end for r in results)),
        "by_needed_kind": _by_needed_kind(results),
    }


def _by_needed_kind(results: Sequence[EpisodeResult]) -> dict[str, dict[str, float | int]]:
    """Per primitive kind of the tasks' decompositions: how many tasks need it, the success of
    those and of the rest (None when every task needs it)."""
    out = {}
    for kind in sorted({k for r in results for k in r.task_kinds}):
        need = [r.success for r in results if kind in r.task_kinds]
        rest = [r.success for r in results if r.task_kinds and kind not in r.task_kinds]
        out[kind] = {"tasks": len(need), "success": float(np.mean(need)),
                     "success_without": float(np.mean(rest)) if rest else None}
    return out


def verdict(name: str, splits: dict, oracle: dict | None) -> str:
    """One sentence a person can read: how the condition did, against the oracle."""
    wins = sum(s["successes"] for s in splits.values())
    n = sum(s["episodes"] for s in splits.values())
    lo, hi = wilson_interval(wins, n)
    said = (f"{name} fails: it solves none of {n} tasks (95% CI 0-{hi:.0%})" if wins == 0 else
            f"{name} solves {wins} of {n} tasks ({wins / n:.0%}, 95% CI {lo:.0%}-{hi:.0%})")
    if oracle is not None and name != "oracle":
        o_wins = sum(s["successes"] for s in oracle.values())
        o_n = sum(s["episodes"] for s in oracle.values())
        said += f"; the oracle solves {o_wins} of {o_n}"
    return said


class RunModels:
    """The run directory's models, each restored on first use (only what conditions need)."""

    def __init__(self, workdir: pathlib.Path, parallel: int, seed: int, *,
                 steps: dict[str, int] | None = None,
                 sampler: ml_collections.ConfigDict | None = None,
                 dirs: dict[str, str | pathlib.Path] | None = None):
        """`steps` picks a saved step of a model (e.g. {"world_model": 500}); others: newest.
        `sampler` (a config.diffusion) sets how the clip models sample (SAMPLING_KEYS: the
        sampler, its steps and guidance scales are choices of evaluation, not of training);
        None keeps what each model was trained with. `dirs` restores a model from another
        run directory (e.g. {"action_decoder": "runs/other"})."""
        self.workdir, self.parallel, self.seed = workdir, parallel, seed
        self._pinned = dict(steps or {})
        self._dirs = {name: pathlib.Path(path) for name, path in (dirs or {}).items()}
        self._sampler = sampler
        self._loaded: dict[str, object] = {}
        self.missing: dict[str, str] = {}
        self.steps: dict[str, int] = {}

    def pin(self, name: str, step: int) -> None:
        """Uses saved step `step` of model `name` from now on: it and the policies built on it
        are restored again when next needed, the other models stay as loaded."""
        self._pinned[name] = step
        self._loaded.pop(name, None)
        self.missing.pop(name, None)
        for key in [k for k in self._loaded if k.startswith("policy/")]:
            del self._loaded[key]

    def get(self, name: str):
        """The restored model bundle `name`, or None (reason in `missing`)."""
        if name not in self._loaded and name not in self.missing:
            try:
                self._loaded[name] = self._load(name)
            except CheckpointError as e:
                self.missing[name] = (f"{e}; train it with `{TRAIN_COMMAND[name]}` into this "
                                      "--workdir")
        return self._loaded.get(name)

    def _load(self, name: str) -> Trained | Planner:
        path = self._dirs.get(name, self.workdir)
        if name in self._pinned:
            path = path / name / str(self._pinned[name])
            if not path.is_dir():
                raise CheckpointError(f"{path.parent} has no step {self._pinned[name]}")
        trained = restore(path, name)
        self.steps[name] = trained.step
        if self._sampler is not None and name in ("world_model", "whole_task"):
            trained = with_sampling(trained, self._sampler)
        if name == "planner":
            return make_planner(trained.model, trained.tokenizer, trained.config)
        return trained

    def policy(self, clips: str | None) -> PrimitivePolicy | None:
        """The policy around the `clips` model (world_model or whole_task; None: the decoder
        alone, for given clips) and the decoder."""
        decoder = self.get("action_decoder")
        world = self.get(clips) if clips else None
        if decoder is None or (clips and world is None):
            return None
        if f"policy/{clips}" not in self._loaded:
            if world and world.tokenizer.to_str() != decoder.tokenizer.to_str():
                raise ValueError(f"the {clips} model and the action decoder restored for "
                                 f"{self.workdir} read words with different tokenizers; train "
                                 "the decoder on the clip model's dataset (`pewm actions` with "
                                 "its config.data)")
            self._loaded[f"policy/{clips}"] = PrimitivePolicy(
                world.model if world else None, world.config if world else decoder.config,
                decoder.tokenizer, decoder.model, decoder.stats[0],
                batch_size=self.parallel, seed=self.seed)
        return self._loaded[f"policy/{clips}"]


def evaluate_run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                 dataset_dir: str | pathlib.Path) -> dict:
    """Runs the evaluation (module docstring), writes its artefacts and returns the report."""
    workdir = pathlib.Path(workdir)
    out = workdir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    e = config.eval
    models = RunModels(workdir, e.parallel_envs, e.seed, sampler=config.diffusion)
    world_model = models.get("world_model")
    # The world and clip settings the models saw (the given config when there is no model).
    trained = world_model.config if world_model is not None else config
    world = trained.world
    specs = episode_specs(e)
    report: dict = {
        "workdir": str(workdir), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "settings": e.to_dict(), "world": world.to_dict(),
        "sampler": {k: config.diffusion[k] for k in SAMPLING_KEYS}, "conditions": {}}
    frames_of: list[EpisodeResult] = []
    for name in e.conditions:
        report["conditions"][name], results = run_condition(
            name, config, models, specs, trained, record=0 if frames_of else e.rollout_videos)
        if not frames_of:
            frames_of = [r for r in results if r.frames]
    oracle = report["conditions"].get("oracle", {}).get("splits")
    for name, cond in report["conditions"].items():
        if "splits" in cond:
            cond["verdict"] = verdict(name, cond["splits"], oracle)
    report["models"] = {"steps": models.steps, "missing": models.missing}
    report.update(_component_scores(config, models, dataset_dir))
    report["rollouts"] = [str(_write_gif(r, out / f"rollout_{k}.gif"))
                          for k, r in enumerate(frames_of)]
    (out / "report.json").write_text(json.dumps(report, indent=1))
    _write_tensorboard(report, workdir / "tensorboard" / "eval",
                       models.steps.get("world_model", 0))
    return report


def run_condition(name: str, config: ml_collections.ConfigDict, models: RunModels,
                  specs: Sequence[EpisodeSpec], trained: ml_collections.ConfigDict, *,
                  record: int = 0) -> tuple[dict, list[EpisodeResult]]:
    """Condition `name`'s report entry (or why it was skipped) on `specs` under config.eval,
    in the world and clip settings `trained` (the world model's training config), and its
    episodes (the first `record` with frames)."""
    e, world = config.eval, trained.world
    settings = CONDITIONS[name]
    for model in needs(settings):
        models.get(model)
    lacking = [m for m in needs(settings) if m in models.missing]
    if lacking:
        return {"settings": dataclasses.asdict(settings),
                "skipped": "; ".join(models.missing[m] for m in lacking)}, []
    controller = Controller(
        dataclasses.replace(settings, max_replans=e.max_replans,
                            execute_frames=e.execute_frames or None, track=e.track),
        lambda: TabletopControlEnv(world.image_size,
                                   (world.num_objects_min, world.num_objects_max),
                                   world.max_delta, world.primitive_max_steps, e.max_replans),
        horizon=int(trained.data.horizon), frame_stride=int(trained.data.frame_stride),
        policy=models.policy(clip_model(settings)) if settings.uses_decoder else None,
        planner=models.get("planner") if settings.planner == "vlm" else None,
        goal_reach_px=e.goal_reach_px)
    start = time.perf_counter()
    results = controller.run(specs, parallel=e.parallel_envs, record=record)
    return {"settings": dataclasses.asdict(controller.settings),
            "splits": {split: split_scores([r for r in results if r.spec.split == split])
                       for split in e.splits},
            "latency": controller.latency.summary(),
            "seconds": round(time.perf_counter() - start, 2)}, results


def _component_scores(config: ml_collections.ConfigDict, models: RunModels,
                      dataset_dir: str | pathlib.Path) -> dict:
    """Held-out scores of each restored model beside its baseline."""
    e = config.eval
    out = {}
    world = models.get("world_model")
    if world is not None and e.video_clips:
        try:
            out["video_quality"] = dataclasses.asdict(video_quality.evaluate_video(
                world.model, world.config, e.video_split, max_clips=e.video_clips,
                batch_size=e.parallel_envs, goal_reach_px=e.goal_reach_px, seed=e.seed))
        except DatasetError as err:
            out["video_quality"] = {"skipped": str(err)}
    decoder = models.get("action_decoder")
    if decoder is not None and e.video_clips:
        try:
            out["actions"] = dataclasses.asdict(actions_eval.evaluate_action_decoder(
                decoder.model, decoder.config, e.video_split, batch_size=e.parallel_envs,
                max_clips=e.video_clips))
        except DatasetError as err:
            out["actions"] = {"skipped": str(err)}
    if world is not None and decoder is not None and "mse" in out.get("actions", {}):
        out["actions_on_imagined"] = dataclasses.asdict(actions_eval.evaluate_action_decoder(
            decoder.model, decoder.config, e.video_split, batch_size=e.parallel_envs,
            max_clips=e.video_clips,
            imagine=_imagined_frames(world, e.seed, e.parallel_envs)))
    planner = models.get("planner")
    if planner is not None:
        try:
            out["planner"] = dataclasses.asdict(planner_eval.evaluate_planner(
                planner, dataset_dir, e.video_split, batch_size=e.parallel_envs,
                max_episodes=e.episodes_per_template * len(TEMPLATE_NAMES)))
        except DatasetError as err:
            out["planner"] = {"skipped": str(err)}
    return out


def _imagined_frames(world: Trained, seed: int, batch_size: int
                     ) -> Callable[[dict[str, np.ndarray], int], np.ndarray]:
    """(batch, first row) -> the world model's uint8 samples of the batch's clips: padded and
    seeded as `video_scores.evaluate_video` does, so they are the clips whose goal reach and
    PSNR the report gives."""
    sample = imagined_clips.clip_sampler(world, batch_size)
    return lambda batch, first: sample(batch, jax.random.fold_in(jax.random.key(seed), first))


def _write_gif(result: EpisodeResult, path: pathlib.Path) -> pathlib.Path:
    """An episode's [observation | imagined frame] pairs as an animated GIF."""
    frames = [Image.fromarray(f).resize((f.shape[1] * _GIF_SCALE, f.shape[0] * _GIF_SCALE),
                                        Image.Resampling.NEAREST) for f in result.frames]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=80, loop=0)
    return path


def _write_tensorboard(report: dict, logdir: pathlib.Path, step: int) -> None:
    """The report's scalars under eval/<condition>/<split>/... and eval/<component>/..."""
    scalars = {}
    for name, cond in report["conditions"].items():
        for split, s in cond.get("splits", {}).items():
            for key in ("success", "chain_length", "goal_reach"):
                if s[key] is not None:
                    scalars[f"eval/{name}/{split}/{key}"] = s[key]
    for part in ("video_quality", "actions", "actions_on_imagined", "planner"):
        for key, value in report.get(part, {}).items():
            if isinstance(value, float) and math.isfinite(value):
                scalars[f"eval/{part}/{key}"] = value
    writer = MetricWriter(logdir)
    try:
        writer.scalars(step, scalars)
    finally:
        writer.close()


def headline(report: dict) -> str:
    """The report's headline numbers for a terminal, whatever they are."""
    lines = [f"{'condition':<16}{'split':<22}{'success':>9}{'95% CI':>14}{'chain':>7}"
             f"{'goal reach':>12}"]
    for name, cond in report["conditions"].items():
        if "skipped" in cond:
            lines.append(f"{name:<16}skipped: {cond['skipped']}")
            continue
        for split, s in cond["splits"].items():
            reach = "-" if s["goal_reach"] is None else f"{s['goal_reach']:.0%}"
            lo, hi = s["success_ci95"]
            lines.append(f"{name:<16}{split:<22}{s['success']:>9.0%}{f'{lo:.0%}-{hi:.0%}':>14}"
                         f"{s['chain_length']:>7.2f}{reach:>12}")
    v = report.get("video_quality", {})
    if "psnr" in v:
        lines.append(f"clips ({v['split']}, {v['clips']}): PSNR {v['psnr']:.2f} dB vs copy-context "
                     f"{v['copy_psnr']:.2f}; SSIM {v['ssim']:.3f} vs {v['copy_ssim']:.3f}; goal "
                     f"reach {v['goal_reach']:.0%} vs {v['copy_goal_reach']:.0%} (truth "
                     f"{v['true_goal_reach']:.0%}); on the way, gripper {v['path_px']:.1f} px "
                     f"from the truth vs {v['jump_path_px']:.1f} for its end drawn from the "
                     f"start (shown in {v['path_found']:.0%} of those frames)")
    for key, frames in (("actions", "true frames"), ("actions_on_imagined", "imagined frames")):
        a = report.get(key, {})
        if "mse" in a:
            lines.append(f"actions from {frames} ({a['split']}, per step): mse {a['mse']:.3f} vs "
                         f"mean action {a['mean_action_mse']:.3f}; gripper commands "
                         f"{a['gripper_accuracy']:.1%} vs majority "
                         f"{a['majority_gripper_accuracy']:.1%}, "
                         f"{a['gripper_change_accuracy']:.1%} of {a['gripper_changes']} changes")
    p = report.get("planner", {})
    if "exact_match" in p:
        lines.append(f"planner ({p['split']}): exact match {p['exact_match']:.0%}; point error "
                     f"{p['point_error_px']:.1f} px vs image centre {p['centre_error_px']:.1f}"
                     + (f"; goal error by kind (median px): "
                        f"{planner_eval.goal_errors_line(p['goal_error_px_by_kind'])}"
                        if p.get("goal_error_px_by_kind") else ""))
    pewm = report["conditions"].get("pewm", {}).get("latency", {})
    if pewm:
        lines.append("latency per primitive (s): " + ", ".join(
            f"{k} {v['seconds_per_primitive']:.3f}" for k, v in pewm.items()))
    lines += [c["verdict"] for c in report["conditions"].values() if "verdict" in c]
    chain = chain_table(report)
    return "\n".join(lines + ([chain] if chain else []))


def chain_table(report: dict) -> str:
    """The evaluation chain (`CHAIN`) as one table: per split, each link's success with its
    95% interval and per-primitive success, beside the oracle's; '' when fewer than two links
    ran."""
    conditions = report["conditions"]
    ran = [n for n in CHAIN if "splits" in conditions.get(n, {})]
    if len(ran) < 2:
        return ""
    kinds = sorted({k for n in ran for s in conditions[n]["splits"].values()
                    for k in s["per_primitive"]})
    lines = ["evaluation chain (each link feeds one more part with a model's output):",
             f"{'link':<16}{'split':<22}{'success':>9}{'95% CI':>12}"
             + "".join(f"{k:>9}" for k in kinds)]
    for name in ran:
        for split, s in conditions[name]["splits"].items():
            lo, hi = s["success_ci95"]
            cells = "".join(f"{s['per_primitive'][k]['success']:>9.0%}"
                            if k in s["per_primitive"] else f"{'-':>9}" for k in kinds)
            lines.append(f"{name:<16}{split:<22}{s['success']:>9.0%}{f'{lo:.0%}-{hi:.0%}':>12}"
                         + cells)
    reaching = [(name, split, s) for name in ran
                for split, s in conditions[name]["splits"].items() if s["goal_reach"] is not None]
    if reaching:  # links with imagined clips: where their first clip ended, per primitive
        lines.append("imagined clips whose last frame shows the gripper at its goal:")
        for name, split, s in reaching:
            cells = "".join(f"{s['per_primitive'][k]['goal_reach']:>9.0%}"
                            if "goal_reach" in s["per_primitive"].get(k, {}) else f"{'-':>9}"
                            for k in kinds)
            lines.append(f"{name:<16}{split:<22}{s['goal_reach']:>9.0%}{'':>12}" + cells)
    return "\n".join(lines + _needed_kind_lines(conditions, ran) + _outcome_lines(conditions, ran))


def _needed_kind_lines(conditions: dict, ran: Sequence[str]) -> list[str]:
    """Per link and split, for each primitive kind: the success of the tasks that need it /
    of the tasks that do not ('-' where none or all do); [] where the world names no
    decompositions."""
    rows = [(name, split, s.get("by_needed_kind") or {}) for name in ran
            for split, s in conditions[name]["splits"].items()]
    kinds = sorted({k for _, _, by in rows for k in by})
    if not kinds:
        return []
    lines = ["success of the tasks that need each kind / of those that do not:",
             f"{'link':<16}{'split':<22}" + "".join(f"{k:>13}" for k in kinds)]
    for name, split, by in rows:
        cells = ""
        for k in kinds:
            v = by.get(k)
            cell = "-" if v is None else (f"{v['success']:.0%} / " + (
                "-" if v["success_without"] is None else f"{v['success_without']:.0%}"))
            cells += f"{cell:>13}"
        lines.append(f"{name:<16}{split:<22}" + cells)
    return lines


def _outcome_lines(conditions: dict, ran: Sequence[str]) -> list[str]:
    """Per primitive kind with outcome measures (`ControlEnv.outcome`, and follow_px where the
    first clip shows the gripper), their medians per link and split: how far each link's
    attempts ended from their aim, and from what their clip drew."""
    lines = []
    kinds = sorted({k for n in ran for s in conditions[n]["splits"].values()
                    for k, v in s["per_primitive"].items() if "median" in v})
    for kind in kinds:
        lines.append(f"{kind} outcomes (median of attempts):")
        for name in ran:
            for split, s in conditions[name]["splits"].items():
                median = s["per_primitive"].get(kind, {}).get("median")
                if median:
                    lines.append(f"  {name:<16}{split:<22}" + ", ".join(
                        f"{m} {v:.2f}" for m, v in median.items()))
    return lines
