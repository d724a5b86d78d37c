"""Closed-loop evaluation on Meta-World with the AVDC protocol (`pewm eval` when
data.generator is 'metaworld').

Episodes: every task of `metaworld.eval_tasks` x camera of `metaworld.eval_cameras` x seed
0 .. `metaworld.eval_seeds` - 1 (the benchmark's seeded variations; the full protocol is the 11
tasks, 3 cameras and 25 seeds). An episode succeeds when the task's own check holds within
500 environment steps. Conditions (`CONDITIONS`), each on the same episodes:

    pewm               VLM planner, imagined clip -> decoded actions, closed loop: the system
    open_loop          the same, planned once from the first frame
    no_sgg             pewm with the start/goal heatmaps dropped (text-only clips)
    oracle_primitives  the expert's own primitives for that seed and camera (words + points)
                       instead of the planner: no planner error
    expert             the benchmark's scripted expert: the harness's upper bound

A plan is followed one primitive per round: the world model imagines the primitive's clip from
the current frame and the action decoder reads its actions, each played as `frame_stride`
environment steps (DESIGN.md "Clip"). In closed loop the planner plans again from every new
frame and the primitive at the attempt's position runs. When an attempt runs out of primitives
without success, the controller replans from the current frame and starts again, at most
`metaworld.max_replans` times (AVDC's replanning). A plan that does not parse (constrained
decoding cut off at `planner.max_tokens`) is counted in the report and ends its attempt: no
command is guessed from it. The report gives per-task and mean success
with 95% Wilson intervals, per-camera success, and the histogram of replans used.
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
from metaworld.policies import ENV_POLICY_MAP

from pewm_jax.control.controller import Latency
from pewm_jax.control.policy import PrimitiveCommand, PrimitivePolicy
from pewm_jax.evaluate.closed_loop import RunModels, success_rate
from pewm_jax.metaworld.env import MAX_EPISODE_STEPS, MetaWorldEnv
from pewm_jax.metaworld.experts import run_expert, task_words
from pewm_jax.vlm.planner import Planner

# (plan source, loop, sgg)
CONDITIONS: dict[str, tuple[str, str, bool]] = {
    "pewm": ("vlm", "closed", True),
    "open_loop": ("vlm", "open", True),
    "no_sgg": ("vlm", "closed", False),
    "oracle_primitives": ("oracle", "closed", True),
    "expert": ("expert", "closed", True),
}
# Published closed-loop mean success on the same 11 tasks (Meta-World v2; AVDC, Ko et al. 2023,
# learns from videos without action labels, using optical flow and depth).
PUBLISHED = {"AVDC": 0.431, "UniPi": 0.061}


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
    """One protocol episode: task, camera and the benchmark's seed."""

    task: str
    camera: str
    seed: int


@dataclasses.dataclass
class EpisodeResult:
    """How one episode went."""

    spec: EpisodeSpec
    success: bool
    end: str  # 'success', 'out_of_steps', 'replans' (every attempt used up)
    env_steps: int
    replans: int  # attempts started after the first
    primitives: list[str]  # words of the primitives run, in order
    planner_errors: int  # plans that did not parse (each ends its attempt, none is guessed)


def protocol_specs(mw: ml_collections.ConfigDict) -> list[EpisodeSpec]:
    """Every (task, camera, seed) episode of the protocol that `mw` (config.metaworld) sets."""
    return [EpisodeSpec(task, camera, seed) for task in mw.eval_tasks
            for camera in mw.eval_cameras for seed in range(mw.eval_seeds)]


def oracle_plan(spec: EpisodeSpec, image_size: int,
                min_segment_steps: int) -> list[PrimitiveCommand]:
    """The expert's primitives on this seed (segmented as the training data was), with its
    tool-centre points in this camera."""
    demo = run_expert(spec.task, spec.seed, cameras=(spec.camera,), image_size=image_size,
                      min_segment_steps=min_segment_steps)
    xy = demo.tcp_xy[spec.camera]
    return [PrimitiveCommand(s.text, tuple(map(float, xy[s.start])), tuple(map(float, xy[s.end])))
            for s in demo.segments]


class _Slot:
    """One environment's running episode."""

    def __init__(self, spec: EpisodeSpec, image_size: int, max_steps: int):
        self.spec = spec
        self.env = MetaWorldEnv(spec.task, camera=spec.camera, image_size=image_size,
                                max_episode_steps=max_steps)
        obs, _ = self.env.reset(seed=spec.seed)
        self.image = obs["image"]
        self.plan: list[PrimitiveCommand] | None = None
        self.position = 0  # primitives of the current attempt run so far
        self.attempt_length = 0  # primitives in the attempt's first plan
        self.replans = 0
        self.env_steps = 0
        self.primitives: list[str] = []
        self.planner_errors = 0
        self.end: str | None = None

    def result(self) -> EpisodeResult:
        return EpisodeResult(self.spec, self.end == "success", self.end, self.env_steps,
                             self.replans, self.primitives, self.planner_errors)


class MetaWorldController:
    """Runs protocol episodes under one condition, `parallel` environments in lockstep."""

    def __init__(self, condition: str, *, image_size: int, frame_stride: int, max_replans: int,
                 policy: PrimitivePolicy | None = None, planner: Planner | None = None,
                 max_steps: int = MAX_EPISODE_STEPS, min_segment_steps: int = 4):
        """`min_segment_steps`: how the oracle's expert episodes are cut (the data's
        config.metaworld.min_segment_steps)."""
        if condition not in CONDITIONS:
            raise ValueError(f"unknown condition {condition!r}; known: {list(CONDITIONS)}")
        self.source, self.loop, self.sgg = CONDITIONS[condition]
        if self.source != "expert" and policy is None:
            raise ValueError(f"condition {condition!r} needs the world model and action decoder")
        if self.source == "vlm" and planner is None:
            raise ValueError(f"condition {condition!r} needs the planner")
        self.policy, self.planner = policy, planner
        self.image_size, self.frame_stride = image_size, frame_stride
        self.max_replans, self.max_steps = max_replans, max_steps
        self.min_segment_steps = min_segment_steps
        # A planner trained on mid-task examples lists the primitives left: closed loop runs
        # the first of each fresh plan (as the built-in world's controller does).
        self.first_of_plan = (self.loop == "closed" and planner is not None
                              and planner.plans_remaining)
        self.latency = Latency()
        self._round = 0

    def run(self, specs: Sequence[EpisodeSpec], *, parallel: int) -> list[EpisodeResult]:
        """Every episode of `specs`, `parallel` at a time (at most the policy's batch size)."""
        if self.policy is not None and parallel > self.policy.batch_size:
            raise ValueError(f"parallel={parallel} exceeds the policy's batch size "
                             f"{self.policy.batch_size}")
        results = []
        for first in range(0, len(specs), parallel):
            slots: list[_Slot] = []
            try:
                for spec in specs[first:first + parallel]:
                    slots.append(_Slot(spec, self.image_size, self.max_steps))
                if self.source == "expert":
                    for slot in slots:
                        self._run_expert(slot)
                while active := [s for s in slots if s.end is None]:
                    self._round_of(active)
            finally:  # the environments' renderers hold GL contexts: always released
                for slot in slots:
                    slot.env.close()
            results += [s.result() for s in slots]
        return results

    def _run_expert(self, slot: _Slot) -> None:
        policy = ENV_POLICY_MAP[f"{slot.spec.task}-v3"]()
        while slot.end is None:
            action = policy.get_action(slot.env.raw_observation.copy())
            self._step(slot, np.clip(action, -1, 1).astype(np.float32))
        slot.primitives.append("scripted expert")

    def _plan(self, slots: list[_Slot]) -> None:
        """A fresh plan for each of `slots` from its current frame."""
        if self.source == "oracle":
            for slot in slots:
                slot.plan = slot.plan or oracle_plan(slot.spec, self.image_size,
                                                     self.min_segment_steps)
            return
        rows = slots + [slots[0]] * (self.policy.batch_size - len(slots))  # one compiled shape
        start = time.perf_counter()
        plans = self.planner.plan_batch(np.stack([s.image for s in rows]),
                                        [task_words(s.spec.task).instruction for s in rows])
        self.latency.planner.append((time.perf_counter() - start, len(slots)))
        scale = self.image_size / self.planner.image_size
        for slot, plan in zip(slots, plans):
            if plan is None:  # cut off at max_tokens: this attempt has no plan
                slot.planner_errors += 1
            slot.plan = [PrimitiveCommand.from_plan_step(step, scale)
                         for step in (plan.steps if plan is not None else ())]

    def _round_of(self, slots: list[_Slot]) -> None:
        """Plans (as the loop asks) and runs one primitive in every slot."""
        for slot in slots:
            if slot.plan is not None and slot.position >= (
                    slot.attempt_length if self.first_of_plan else len(slot.plan)):
                # This attempt is used up without success: replan and start again, or stop.
                if slot.replans >= self.max_replans:
                    slot.end = "replans"
                else:
                    slot.replans += 1
                    slot.position, slot.plan = 0, None
        slots = [s for s in slots if s.end is None]
        need = [s for s in slots if s.plan is None or (self.loop == "closed" and s.position)]
        if need:
            self._plan(need)
            for slot in need:
                if slot.position == 0:
                    slot.attempt_length = len(slot.plan)
        # A fresh closed-loop plan may be shorter than the attempt so far: next round ends it.
        index = (lambda s: 0) if self.first_of_plan else (lambda s: s.position)
        running = [(s, s.plan[index(s)]) for s in slots if index(s) < len(s.plan)]
        if not running:
            return
        out = self.policy.step(np.stack([s.image for s, _ in running]), [c for _, c in running],
                               step_index=self._round, use_sgg=self.sgg)
        self.latency.generation.append((out.generate_s, len(running)))
        self.latency.action_decoding.append((out.decode_s, len(running)))
        start = time.perf_counter()
        for i, (slot, command) in enumerate(running):
            slot.primitives.append(command.text)
            slot.position += 1
            for action in self.policy.stats.step_actions(out.actions[i], self.frame_stride):
                for _ in range(self.frame_stride):
                    if slot.end is None:
                        self._step(slot, action)
        self.latency.env.append((time.perf_counter() - start, len(running)))
        self._round += 1

    def _step(self, slot: _Slot, action: np.ndarray) -> None:
        obs, _, terminated, truncated, _ = slot.env.step(action)
        slot.image, slot.env_steps = obs["image"], slot.env_steps + 1
        if terminated:
            slot.end = "success"
        elif truncated:
            slot.end = "out_of_steps"


def condition_scores(results: Sequence[EpisodeResult], max_replans: int) -> dict:
    """Per-task, mean-over-tasks and per-camera success (95% Wilson intervals) and the
    histogram of replans used."""
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
            "env_steps": float(np.mean([r.env_steps for r in results]))}


def evaluate_run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Runs the protocol of `config.metaworld` under `config.metaworld.eval_conditions` with the
    run directory's models; writes `<workdir>/eval/metaworld_report.json` and returns it."""
    workdir = pathlib.Path(workdir)
    mw, e = config.metaworld, config.eval
    models = RunModels(workdir, e.parallel_envs, e.seed)
    world_model = models.get("world_model")
    trained = world_model[1] if world_model is not None else config
    specs = protocol_specs(mw)
    report: dict = {
        "workdir": str(workdir), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "protocol": {"tasks": list(mw.eval_tasks), "cameras": list(mw.eval_cameras),
                     "seeds": mw.eval_seeds, "max_env_steps": MAX_EPISODE_STEPS,
                     "max_replans": mw.max_replans, "image_size": trained.world.image_size},
        "published_mean_success": PUBLISHED, "conditions": {}}
    for name in mw.eval_conditions:
        source = CONDITIONS[name][0]
        wanted = (() if source == "expert" else ("world_model", "action_decoder")) + (
            ("planner",) if source == "vlm" else ())
        for model in wanted:
            models.get(model)
        lacking = [m for m in wanted if m in models.missing]
        if lacking:
            report["conditions"][name] = {"skipped": "; ".join(models.missing[m]
                                                               for m in lacking)}
            continue
        controller = MetaWorldController(
            name, image_size=trained.world.image_size,
            frame_stride=int(trained.data.frame_stride), max_replans=mw.max_replans,
            policy=models.policy("world_model") if wanted else None,
            planner=models.get("planner") if source == "vlm" else None,
            min_segment_steps=mw.min_segment_steps)
        start = time.perf_counter()
        results = controller.run(specs, parallel=e.parallel_envs)
        seconds = time.perf_counter() - start
        report["conditions"][name] = condition_scores(results, mw.max_replans) | {
            "latency": controller.latency.summary(), "seconds": round(seconds, 2),
            "env_steps_per_s": sum(r.env_steps for r in results) / seconds}
    report["models"] = {"steps": models.steps, "missing": models.missing}
    out = workdir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metaworld_report.json").write_text(json.dumps(report, indent=1))
    return report


def headline(report: dict) -> str:
    """Per-task and mean success of every condition beside the published means."""
    conditions = report["conditions"]
    ran = [n for n, c in conditions.items() if "skipped" not in c]
    lines = [f"{'task':<22}" + "".join(f"{n:>19}" for n in ran)]
    for task in report["protocol"]["tasks"]:
        cells = []
        for n in ran:
            s = conditions[n]["per_task"][task]
            lo, hi = s["success_ci95"]
            cells.append(f"{s['success']:>6.0%} ({lo:.0%}-{hi:.0%})")
        lines.append(f"{task:<22}" + "".join(f"{c:>19}" for c in cells))
    lines.append(f"{'mean':<22}" + "".join(f"{conditions[n]['mean_success']:>19.1%}"
                                           for n in ran))
    lines += [f"{n}: replans used {conditions[n]['replans']}" for n in ran]
    lines += [f"{n}: skipped: {c['skipped']}" for n, c in conditions.items() if "skipped" in c]
    lines.append("published mean success (Meta-World v2, not like for like): "
                 + ", ".join(f"{k} {v:.1%}" for k, v in report["published_mean_success"].items()))
    return "\n".join(lines)
