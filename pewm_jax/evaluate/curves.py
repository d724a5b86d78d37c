"""Learning curves of the world model: what more training buys, read from one run's checkpoints.

`learning_curves(config, workdir)` restores each world-model checkpoint the run
kept (`config.train.keep_period` keeps them beyond the newest few; `config.curves.steps` picks
some) and scores it as `pewm eval` does, with the run's newest action decoder and planner:

    goal_reach, copy_goal_reach   imagined held-out clips (config.eval.video_split) whose last
                                  frame shows the gripper at the goal, beside copying the
                                  context frame (`pewm_jax.recipes.video_scores`)
    psnr, copy_psnr               the same clips' PSNR against the true frames
    <condition>/<split>/success   closed-loop success of each of config.curves.conditions on
                                  config.eval's episodes (same seeds at every step)

against training steps and training FLOPs (steps x the FLOPs of one train step,
`pewm_jax.models.flops`). Writes <workdir>/curves/curves.json, <workdir>/curves/curves.png
(one panel per measure, matplotlib) and the scalars to TensorBoard under
<workdir>/tensorboard/curves at each checkpoint's step.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import matplotlib
import ml_collections

from pewm_jax.evaluate.closed_loop import RunModels, episode_specs, run_condition
from pewm_jax.recipes import video_scores
from pewm_jax.recipes.kinds import KINDS
from pewm_jax.train.checkpoint import CheckpointError, RunCheckpoints
from pewm_jax.train.metrics import MetricWriter

matplotlib.use("Agg")  # files only: no display is needed or wanted

from matplotlib import pyplot  # noqa: E402  (after the backend is chosen)


def saved_steps(workdir: pathlib.Path) -> list[int]:
    """The committed world-model steps of a run directory, oldest first."""
    path = workdir / "world_model"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no world model. Fix: train one with `pewm train` into "
                              "this --workdir first")
    checkpoints = RunCheckpoints(path, read_only=True)
    try:
        return checkpoints.steps()
    finally:
        checkpoints.close()


def learning_curves(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Scores every chosen checkpoint (module docstring), writes the artefacts, returns them."""
    workdir = pathlib.Path(workdir)
    steps = saved_steps(workdir)
    wanted = tuple(config.curves.steps)
    if wanted:
        missing = sorted(set(wanted) - set(steps))
        if missing:
            raise CheckpointError(f"config.curves.steps {missing} are not saved in "
                                  f"{workdir / 'world_model'} (saved: {steps}). Fix: pick saved "
                                  "steps, or train with --config.train.keep_period so the run "
                                  "keeps them")
        steps = sorted(wanted)
    e = config.eval
    specs = episode_specs(e)
    points = []
    models = RunModels(workdir, e.parallel_envs, e.seed, sampler=config.diffusion)
    for step in steps:
        models.pin("world_model", step)  # the decoder and planner stay loaded
        world = models.get("world_model")
        if world is None:
            raise CheckpointError(models.missing["world_model"])
        flops = KINDS["world_model"].flops_per_step(world.config, 0) * step
        video = video_scores.evaluate_video(
            world.model, world.config, e.video_split, max_clips=e.video_clips,
            batch_size=e.parallel_envs, goal_reach_px=e.goal_reach_px, seed=e.seed)
        point = {"step": step, "train_flops": flops,
                 **{k: v for k, v in dataclasses.asdict(video).items()
                    if k in ("goal_reach", "copy_goal_reach", "psnr", "copy_psnr")}}
        for name in config.curves.conditions:
            entry, _ = run_condition(name, config, models, specs, world.config)
            if "skipped" in entry:
                raise CheckpointError(f"curves: condition {name!r} cannot run: "
                                      f"{entry['skipped']}")
            for split, scores in entry["splits"].items():
                point[f"{name}/{split}/success"] = scores["success"]
        print(f"[curves] step {step}: " + ", ".join(
            f"{k} {v:.3g}" for k, v in point.items() if k != "step"))
        points.append(point)
    out = workdir / "curves"
    out.mkdir(parents=True, exist_ok=True)
    curves = {"workdir": str(workdir), "video_split": e.video_split,
              "video_clips": e.video_clips,
              "episodes_per_template": e.episodes_per_template, "points": points}
    (out / "curves.json").write_text(json.dumps(curves, indent=1))
    plot_curves(points, out / "curves.png")
    writer = MetricWriter(workdir / "tensorboard" / "curves")
    try:
        for point in points:
            writer.scalars(point["step"], {f"curves/{k}": v for k, v in point.items()
                                           if k != "step"})
    finally:
        writer.close()
    return curves


def plot_curves(points: list[dict], path: pathlib.Path) -> None:
    """One panel per measure against world-model training steps (FLOPs on the top axis):
    goal reach beside copying, PSNR beside copying, success of each condition per split."""
    steps = [p["step"] for p in points]
    success = sorted({k.rsplit("/", 2)[0] for p in points for k in p if k.endswith("/success")})
    panels = 2 + len(success)
    figure, axes = pyplot.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    axes = axes[0]
    pairs = [("goal_reach", "copy_goal_reach", "goal reach of imagined clips"),
             ("psnr", "copy_psnr", "PSNR (dB)")]
    for ax, (key, base, title) in zip(axes, pairs):
        ax.plot(steps, [p[key] for p in points], "o-", label="world model")
        ax.plot(steps, [p[base] for p in points], "--", color="grey",
                label="copy the context frame")
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[0].set_ylim(-0.02, 1.02)
    for ax, name in zip(axes[2:], success):
        for split in sorted({k.split("/")[1] for p in points for k in p
                             if k.startswith(name + "/")}):
            ax.plot(steps, [p[f"{name}/{split}/success"] for p in points], "o-", label=split)
        ax.set_title(f"{name} success")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
    flops_per_step = points[-1]["train_flops"] / max(points[-1]["step"], 1)
    for ax in axes:
        ax.set_xlabel("world-model training steps")
        ax.grid(alpha=0.3)
        top = ax.secondary_xaxis("top", functions=(lambda s: s * flops_per_step / 1e15,
                                                   lambda f: f * 1e15 / flops_per_step))
        top.set_xlabel("training PFLOPs", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
