"""Ablations: closed-loop conditions under variants of the evaluation's choices, on the same
models and the same episodes, as one table.

`run_ablations(config, workdir)` runs each of `config.ablations.conditions` on config.eval's
episodes once per variant of `config.ablations.variants` ("name: key=value, ...",
`pewm_jax.config.parse_variant`): SGG and text guidance scales, sampler and its steps, receding
horizon (`eval.execute_frames`), tracked decoding, or a model restored from another run
directory (`action_decoder=<workdir>`: e.g. a decoder also trained on imagined clips). A
variant changes only what it names, so each row differs from the first ("as configured") in
one choice. Writes <workdir>/eval/ablations.json and ablations.md (the table it prints).
"""

from __future__ import annotations

import json
import pathlib

import ml_collections
import numpy as np

from pewm_jax import paths
from pewm_jax.config import parse_variant, variant_config
from pewm_jax.evaluate.closed_loop import RunModels, episode_specs, run_condition
from pewm_jax.train.checkpoint import CheckpointError

SPLIT_NAMES = {"train": "seen", "holdout_composition": "hold-out",
               "holdout_primitive": "new primitive"}


def run_ablations(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Runs every variant (module docstring), writes the report and table, returns the report.
    CheckpointError when a variant's models are missing."""
    workdir = pathlib.Path(workdir)
    e = config.eval
    specs = episode_specs(e)
    rows = []
    for text in config.ablations.variants:
        name, overrides, models = parse_variant(text)
        variant = variant_config(config, overrides)
        dirs = {model: paths.resolve(path) for model, path in models.items()}
        run = RunModels(workdir, e.parallel_envs, e.seed, sampler=variant.diffusion, dirs=dirs)
        world = run.get("world_model")
        if world is None:
            raise CheckpointError(run.missing["world_model"])
        row = {"variant": name, "overrides": overrides, "models": dirs, "conditions": {}}
        for condition in config.ablations.conditions:
            entry, _ = run_condition(condition, variant, run, specs, world.config)
            if "skipped" in entry:
                raise CheckpointError(f"ablation {name!r}: condition {condition!r} cannot run: "
                                      f"{entry['skipped']}")
            row["conditions"][condition] = {
                split: {k: scores[k] for k in ("success", "success_ci95", "successes",
                                               "episodes", "goal_reach")}
                for split, scores in entry["splits"].items()}
        print(f"[ablations] {name}: " + "; ".join(
            f"{c} " + " / ".join(f"{s['success']:.0%}" for s in splits.values())
            for c, splits in row["conditions"].items()))
        rows.append(row)
    report = {"workdir": str(workdir), "splits": list(e.splits),
              "episodes_per_template": e.episodes_per_template,
              "conditions": list(config.ablations.conditions), "variants": rows}
    out = workdir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablations.json").write_text(json.dumps(report, indent=1))
    (out / "ablations.md").write_text(ablation_table(report) + "\n")
    return report


def ablation_table(report: dict) -> str:
    """Markdown: a row per variant, per condition its success on each split and the share of
    its imagined clips that reached their goal (over both splits)."""
    splits = report["splits"]
    split_names = " / ".join(SPLIT_NAMES.get(s, s) for s in splits)
    head = ["variant"] + [f"`{c}` {split_names} (goal reach)" for c in report["conditions"]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in report["variants"]:
        cells = [row["variant"]]
        for condition in report["conditions"]:
            scores = row["conditions"][condition]
            reach = [scores[s]["goal_reach"] for s in splits
                     if scores[s]["goal_reach"] is not None]
            cells.append(" / ".join(f"{scores[s]['success']:.0%}" for s in splits)
                         + (f" ({np.mean(reach):.0%})" if reach else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
