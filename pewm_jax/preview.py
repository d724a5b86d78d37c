"""The `preview` stage: expert episodes of the built-in world as pictures, plus expert statistics.

Writes into `<workdir>/preview/`:
- `expert_episodes.gif`: a grid of expert episodes (one template after another), animated;
- `expert_episodes.png`: the same episodes as rows of evenly spaced frames;
- `summary.json`: task-expert success per template and primitive-expert success per kind, each
  with the share of scenes the rejection rule discarded (pewm_jax.sim.tasks); per kind also the
  expert's median steps and the clip frames they span at `data.frame_stride` (how much of a
  clip's `data.horizon` frames show the motion, the rest holding its end).
"""

from __future__ import annotations

import json
import pathlib
import time

import ml_collections
import numpy as np
from PIL import Image

from pewm_jax.sim import TabletopEnv, expert_episode
from pewm_jax.sim.episodes import Episode, primitive_trial
from pewm_jax.sim.primitives import KINDS
from pewm_jax.sim.tasks import TEMPLATE_NAMES

_STRIP_FRAMES = 8
_PIXELS = 192  # displayed size of one frame in the pictures
_BORDER = 4


def make_env(config: ml_collections.ConfigDict) -> TabletopEnv:
    """The tabletop environment that `config.world` describes."""
    w = config.world
    return TabletopEnv(w.image_size, (w.num_objects_min, w.num_objects_max), w.max_delta,
                       w.primitive_max_steps)


def _upscale(frame: np.ndarray) -> np.ndarray:
    img = Image.fromarray(frame).resize((_PIXELS, _PIXELS), Image.Resampling.NEAREST)
    return np.pad(np.asarray(img), ((_BORDER,) * 2, (_BORDER,) * 2, (0, 0)), constant_values=255)


def write_pictures(episodes: list[Episode], out_dir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes the episodes as an animated GIF grid and a PNG strip; returns both paths."""
    strip = np.concatenate([
        np.concatenate([_upscale(ep.frames[i]) for i in
                        np.linspace(0, len(ep.frames) - 1, _STRIP_FRAMES).round().astype(int)], 1)
        for ep in episodes], 0)
    png = out_dir / "expert_episodes.png"
    Image.fromarray(strip).save(png)
    length = max(len(ep.frames) for ep in episodes)
    cols = min(len(episodes), 3)
    rows = -(-len(episodes) // cols)
    blank = np.full_like(_upscale(episodes[0].frames[0]), 255)
    frames = []
    for t in range(length):
        tiles = [_upscale(ep.frames[min(t, len(ep.frames) - 1)]) for ep in episodes]
        tiles += [blank] * (rows * cols - len(tiles))
        frames.append(Image.fromarray(np.concatenate(
            [np.concatenate(tiles[r * cols:(r + 1) * cols], 1) for r in range(rows)], 0)))
    gif = out_dir / "expert_episodes.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=120, loop=0)
    return gif, png


def expert_statistics(config: ml_collections.ConfigDict, episodes_per_template: int,
                      scenes_per_primitive: int) -> dict:
    """Success and rejection rates of the task experts (per template) and primitive experts."""
    w = config.world
    env = make_env(config)
    tasks = {}
    for k, name in enumerate(TEMPLATE_NAMES):
        eps = [expert_episode(env, config.seed + 1000 * k + i, template=name)
               for i in range(episodes_per_template)]
        drawn = sum(ep.rejected_scenes + 1 for ep in eps)
        tasks[name] = {"success": float(np.mean([ep.success for ep in eps])),
                       "rejected_scenes": 1 - len(eps) / drawn, "episodes": len(eps)}
    prims = {}
    for kind in KINDS:
        trials = [primitive_trial(kind, config.seed + i, num_objects=(w.num_objects_min, w.num_objects_max),
                                  max_delta=w.max_delta, primitive_max_steps=w.primitive_max_steps)
                  for i in range(scenes_per_primitive)]
        run = [t for t in trials if not t.rejected]
        steps = float(np.median([t.steps for t in run])) if run else 0.0
        prims[kind] = {"success": float(np.mean([t.success for t in run])) if run else 0.0,
                       "rejected_scenes": 1 - len(run) / len(trials), "scenes": len(run),
                       "median_steps": steps,
                       "clip_frames": int(np.ceil(steps / config.data.frame_stride))}
    return {"task_experts": tasks, "primitive_experts": prims}


def run_preview(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    """Runs the preview stage (module docstring) and returns the summary it wrote."""
    out_dir = workdir / "preview"
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = make_env(config)
    episodes = [expert_episode(env, config.seed + i, template=TEMPLATE_NAMES[i % len(TEMPLATE_NAMES)])
                for i in range(config.run.preview_episodes)]
    gif, png = write_pictures(episodes, out_dir)
    summary = {
        "episodes": [{"seed": ep.seed, "task": ep.task, "success": ep.success,
                      "primitives": [s.text for s in ep.segments]} for ep in episodes],
        **expert_statistics(config, config.run.preview_episodes_per_template,
                            config.run.preview_scenes_per_primitive),
        "gif": str(gif), "png": str(png), "seconds": 0.0}
    summary["seconds"] = round(time.perf_counter() - start, 2)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def print_summary(summary: dict) -> None:
    """Prints the preview's headline numbers for a person at a terminal."""
    for ep in summary["episodes"]:
        print(f"  seed {ep['seed']:>3}  {'ok  ' if ep['success'] else 'FAIL'}  {ep['task']}")
    print(f"  {'task template':<22} {'expert success':>14} {'rejected scenes':>16}")
    for name, s in summary["task_experts"].items():
        print(f"  {name:<22} {s['success']:>14.0%} {s['rejected_scenes']:>16.0%}")
    print(f"  {'primitive':<22} {'expert success':>14} {'rejected scenes':>16} "
          f"{'median steps':>13} {'clip frames':>12}")
    for name, s in summary["primitive_experts"].items():
        print(f"  {name:<22} {s['success']:>14.0%} {s['rejected_scenes']:>16.0%} "
              f"{s['median_steps']:>13g} {s['clip_frames']:>12d}")
    print(f"  pictures: {summary['gif']}\n            {summary['png']}")
