"""Closed-loop evaluation on Meta-World with the AVDC protocol (`pewm eval` when
data.generator is 'metaworld').

Episodes: every task of `metaworld.eval_tasks` x camera of `metaworld.eval_cameras` x seed
0 .. `metaworld.eval_seeds` - 1 (the benchmark's seeded variations; the full protocol is the 11
tasks, 3 cameras and 25 seeds). An episode succeeds when the task's own check holds within
500 environment steps. Every condition (`CONDITIONS`) runs the one controller
(`pewm_jax.control.controller`) on `MetaWorldControlEnv`, on the same episodes:

    pewm               VLM planner, imagined clip -> decoded actions, closed loop: the system
    open_loop          the same, planned once from the first frame
    no_sgg             pewm with the start/goal heatmaps dropped (text-only clips)
    oracle_primitives  the expert's own primitives for that seed and camera (words + points)
                       instead of the planner: no planner error
    true_video         the oracle primitives, the expert's true future frames (simulated on a
                       copy of the world) -> decoded actions: no world-model error, the decoder's
    replay             the oracle primitives, the expert's own per-step actions in clip form,
                       played as decoded ones are: the clip contract's and the executor's
    expert             the benchmark's scripted expert: the harness's upper bound

The chain `expert -> replay -> true_video -> oracle_primitives -> pewm` feeds one more link
with a model's output at each step (DESIGN.md "Evaluation chain"); `headline` prints it as one
table, so the first link that breaks is plain. Replay equals the expert when the clip contract
holds (its rollouts reproduce the expert's trajectory exactly).

A plan is followed one primitive per attempt: the clip's per-step actions are played, then, in
closed loop, the planner plans again from the new frame. When a plan runs out without success,
the controller plans afresh, at most `metaworld.max_replans` times (AVDC's replanning); the
oracle plan restarts from its first primitive. `eval.execute_frames` (k) plays k frames of each
clip, then observes and imagines again; `eval.track` decodes each frame interval from the live
observation. A plan that does not parse (constrained decoding cut off
at `planner.max_tokens`) is counted in the report and never acted on. The report gives per-task
and mean success with 95% Wilson intervals, per-camera success, the histogram of replans used,
how episodes ended, and latency.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import time
from collections import Counter
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from pewm_jax.config import METAWORLD_CONDITIONS
from pewm_jax.control.controller import ControlSettings, Controller, EpisodeResult
from pewm_jax.evaluate import closed_loop
from pewm_jax.evaluate.closed_loop import RunModels, clip_model, needs, success_rate
from pewm_jax.control.metaworld import EpisodeSpec, MetaWorldControlEnv
from pewm_jax.metaworld.env import MAX_EPISODE_STEPS

# The built-in world's conditions where they mean the same; the world's own decomposition is
# the expert's primitives here, and the scripted expert runs the whole task.
_SAME = {"oracle_primitives": "world_plan"} | {n: n for n in ("pewm", "open_loop", "no_sgg",
                                                              "true_video", "replay")}
CONDITIONS: dict[str, ControlSettings] = {
    name: (closed_loop.CONDITIONS[_SAME[name]] if name in _SAME
           else ControlSettings("task", "scripted", "closed"))  # expert
    for name in METAWORLD_CONDITIONS}
# The evaluation chain: each condition feeds one more link with a model's output.
CHAIN = ("expert", "replay", "true_video", "oracle_primitives", "pewm")
# Published closed-loop mean success on the same 11 tasks (Meta-World v2; AVDC, Ko et al. 2023,
# learns from videos without action labels, using optical flow and depth).
PUBLISHED = {"AVDC": 0.431, "UniPi": 0.061}


def protocol_specs(mw: ml_collections.ConfigDict) -> list[EpisodeSpec]:
    """Every (task, camera, seed) episode of the protocol that `mw` (config.metaworld) sets."""
    return [EpisodeSpec(task, camera, seed) for task in mw.eval_tasks
            for camera in mw.eval_cameras for seed in range(mw.eval_seeds)]


def condition_scores(results: Sequence[EpisodeResult], max_replans: int) -> dict:
    """Per-task, mean-over-tasks and per-camera success (95% Wilson intervals), the histogram
    of replans used, how episodes ended and the planner errors."""
    def rate(rs: Sequence[EpisodeResult]) -> dict:
        return success_rate([r.success for r in rs])

    tasks = list(dict.fromkeys(r.spec.task for r in results))
    cameras = list(dict.fromkeys(r.spec.camera for r in results))
    per_task = {t: rate([r for r in results if r.spec.task == t]) for t in tasks}
    replans = Counter(r.replans for r in results)
    return {"per_task": per_task,
            "mean_success": float(np.mean([s["success"] for s in per_task.values()])),
            "overall": rate(results),
            "per_camera": {c: rate([r for r in results if r.spec.camera == c]) for c in cameras},
            "replans": {str(k): replans.get(k, 0) for k in range(max_replans + 1)},
            "ends": dict(Counter(r.end for r in results)),
            "planner_errors": sum(r.planner_errors for r in results),
            "primitives_run": float(np.mean([len(r.primitives) for r in results])),
            "env_steps": float(np.mean([r.env_steps for r in results]))}


def evaluate_run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Runs the protocol of `config.metaworld` under `config.metaworld.eval_conditions` with the
    run directory's models; writes `<workdir>/eval/metaworld_report.json` and returns it."""
    workdir = pathlib.Path(workdir)
    mw, e = config.metaworld, config.eval
    models = RunModels(workdir, e.parallel_envs, e.seed)
    world_model = models.get("world_model")
    trained = world_model.config if world_model is not None else config
    image_size = int(trained.world.image_size)
    specs = protocol_specs(mw)
    report: dict = {
        "workdir": str(workdir), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "protocol": {"tasks": list(mw.eval_tasks), "cameras": list(mw.eval_cameras),
                     "seeds": mw.eval_seeds, "max_env_steps": MAX_EPISODE_STEPS,
                     "max_replans": mw.max_replans, "image_size": image_size},
        "published_mean_success": PUBLISHED, "conditions": {}}
    for name in mw.eval_conditions:
        settings = dataclasses.replace(CONDITIONS[name], max_replans=mw.max_replans,
                                       execute_frames=e.execute_frames or None, track=e.track)
        for model in needs(settings):
            models.get(model)
        lacking = [m for m in needs(settings) if m in models.missing]
        if lacking:
            report["conditions"][name] = {"settings": dataclasses.asdict(settings),
                                          "skipped": "; ".join(models.missing[m]
                                                               for m in lacking)}
            continue
        controller = Controller(
            settings,
            lambda: MetaWorldControlEnv(image_size, min_segment_steps=mw.min_segment_steps),
            horizon=int(trained.data.horizon), frame_stride=int(trained.data.frame_stride),
            policy=models.policy(clip_model(settings)) if settings.uses_decoder else None,
            planner=models.get("planner") if settings.planner == "vlm" else None)
        start = time.perf_counter()
        results = controller.run(specs, parallel=e.parallel_envs)
        seconds = time.perf_counter() - start
        report["conditions"][name] = {
            "settings": dataclasses.asdict(settings), **condition_scores(results, mw.max_replans),
            "latency": controller.latency.summary(), "seconds": round(seconds, 2),
            "env_steps_per_s": sum(r.env_steps for r in results) / seconds}
    report["models"] = {"steps": models.steps, "missing": models.missing}
    out = workdir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metaworld_report.json").write_text(json.dumps(report, indent=1))
    return report


def _success_table(report: dict, names: Sequence[str]) -> list[str]:
    """Rows of per-task success with 95% intervals for the conditions `names`, then their mean
    over tasks (with the interval of all their episodes: the tasks have equal episodes)."""
    conditions = report["conditions"]

    def cell(success: float, ci95: Sequence[float]) -> str:
        return f"{f'{success:.0%} ({ci95[0]:.0%}-{ci95[1]:.0%})':>19}"

    lines = [f"{'task':<22}" + "".join(f"{n:>19}" for n in names)]
    for task in report["protocol"]["tasks"]:
        scores = [conditions[n]["per_task"][task] for n in names]
        lines.append(f"{task:<22}" + "".join(cell(s["success"], s["success_ci95"])
                                             for s in scores))
    lines.append(f"{'mean':<22}" + "".join(
        cell(conditions[n]["mean_success"], conditions[n]["overall"]["success_ci95"])
        for n in names))
    return lines


def chain_table(report: dict) -> str:
    """The evaluation chain (`CHAIN`, the links that ran) as one table of per-task and mean
    success with 95% intervals; '' when fewer than two links ran."""
    ran = [n for n in CHAIN if "per_task" in report["conditions"].get(n, {})]
    if len(ran) < 2:
        return ""
    return "\n".join([f"evaluation chain {' -> '.join(ran)} (each link feeds one more part "
                      "with a model's output):"] + _success_table(report, ran))


def headline(report: dict) -> str:
    """Per-task and mean success of every condition beside the published means, then the
    evaluation chain."""
    conditions = report["conditions"]
    ran = [n for n, c in conditions.items() if "skipped" not in c]
    lines = _success_table(report, ran)
    lines += [f"{n}: replans used {conditions[n]['replans']}, ends {conditions[n]['ends']}, "
              f"planner errors {conditions[n]['planner_errors']}" for n in ran]
    lines += [f"{n}: skipped: {c['skipped']}" for n, c in conditions.items() if "skipped" in c]
    lines.append("published mean success (Meta-World v2, not like for like): "
                 + ", ".join(f"{k} {v:.1%}" for k, v in report["published_mean_success"].items()))
    chain = chain_table(report)
    return "\n".join(lines + ([chain] if chain else []))
