"""The `pewm` command: one sub-command per job, each with its own `--help`.

    pewm run     --config=configs/quickstart.py --workdir=runs/quickstart
    pewm data    --config=configs/quickstart.py --workdir=runs/quickstart --config.seed=3
    pewm train   --config=configs/quickstart.py --workdir=runs/quickstart --resume
    pewm whole_task --config=configs/quickstart.py --workdir=runs/quickstart
    pewm actions --config=configs/quickstart.py --workdir=runs/quickstart
    pewm planner --config=configs/quickstart.py --workdir=runs/quickstart
    pewm eval    --config=configs/quickstart.py --workdir=runs/quickstart
    pewm ingest  --config=configs/quickstart.py --workdir=runs/bridge \\
                 --spec=configs/rlds/bridge.py --source=/data/bridge_dataset/1.0.0
    pewm export  --config=configs/quickstart.py --workdir=runs/quickstart --out=bundles/q1

Every job takes `--config` (an ml-collections config file, `path.py[:arg]`, with
`--config.<key>=<value>` overrides) and `--workdir`. The config is loaded and validated by
`pewm_jax.config.load_config` before anything runs; a bad file, key or value stops the job with
one message naming the key (exit code 2). Bad data gets the same treatment: one message saying
what is wrong and how to fix it, and nothing already on disk is replaced without --overwrite.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import app, flags
from absl import logging as absl_logging

from pewm_jax import config as config_lib
from pewm_jax import paths
from pewm_jax.parallel import distributed

JOBS: dict[str, str] = {
    "run": "the main job: every stage in config.run.stages (preview, data, train, whole_task, "
           "actions, planner, eval) into --workdir",
    "preview": "run the world's task experts; write a GIF/PNG of episodes and expert statistics",
    "data": "generate the built-in world's dataset (or Meta-World's, data.generator="
            "'metaworld'): RLDS episodes, primitive clips, statistics, tokenizer (into "
            "config.data.dataset_dir, default <workdir>/data)",
    "train": "train the world model on the run's dataset: sharded over the config's mesh, Orbax "
             "checkpoints in <workdir>/world_model, TensorBoard logs in <workdir>/tensorboard",
    "whole_task": "train the non-primitive baseline (<workdir>/whole_task): the world model "
                  "generating each whole task as one clip, for the world model's training FLOPs",
    "actions": "train the action decoder (inverse dynamics) on the run's clips "
               "(<workdir>/action_decoder), then score it beside the mean action on "
               "config.action_decoder.eval_splits (<workdir>/actions_eval.json)",
    "planner": "fine-tune the planner VLM on the run's task decompositions (<workdir>/planner), "
               "then score its plans on config.planner.eval_splits (<workdir>/planner_eval.json)",
    "eval": "closed-loop evaluation of the run's checkpoints (whatever it has of world_model/, "
            "action_decoder/, planner/) on config.eval: success with 95% intervals beside the "
            "oracle and ablations, clip quality, latency (<workdir>/eval/report.json, GIFs); "
            "for Meta-World, the AVDC protocol of config.metaworld "
            "(<workdir>/eval/metaworld_report.json)",
    "curves": "learning curves of the world model: every kept checkpoint of <workdir>/"
              "world_model (config.train.keep_period) scored for goal reach of imagined "
              "held-out clips and closed-loop success of config.curves.conditions, against "
              "steps and FLOPs (<workdir>/curves/curves.json and curves.png, TensorBoard)",
    "ablations": "closed-loop conditions config.ablations.conditions under each variant of "
                 "the evaluation's choices in config.ablations.variants (guidance, sampler "
                 "steps, receding horizon, tracking, another run's decoder), same models and "
                 "episodes, as one table (<workdir>/eval/ablations.md and ablations.json)",
    "ingest": "convert an RLDS / Open X-Embodiment dataset into primitive clips (--spec, --source)",
    "export": "export the run's world model, action decoder and planner as a bundle for "
              "robots (safetensors weights, StableHLO policy and planner steps for "
              "cpu/cuda/tpu, tokenizers, statistics, the planner in Hugging Face format, "
              "manifest with hashes; --out, default <workdir>/export)",
}


# Jobs that train (and may run on several processes); `run` trains through its stages.
TRAINING_JOBS = ("run", "train", "whole_task", "actions", "planner")


def _usage() -> str:
    lines = ["usage: pewm <job> --config=configs/<name>.py --workdir=<dir> [--config.<key>=<value>]",
             "", "jobs:"]
    lines += [f"  {name:<9} {text}" for name, text in JOBS.items()]
    lines += ["", "`pewm <job> --help` lists the flags of a job."]
    return "\n".join(lines)


def _define_flags(job: str) -> None:
    flags.DEFINE_string("config", None, "Config file `configs/<name>.py[:arg]`; override keys "
                        "with --config.<key>=<value> (e.g. --config.train.steps=50).")
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, pictures, reports.")
    flags.DEFINE_bool("overwrite", False, "Replace outputs that exist but were made differently "
                      "(train: delete the run's checkpoints and TensorBoard logs, start afresh).")
    required = ["config", "workdir"]
    if job in TRAINING_JOBS:
        flags.DEFINE_bool("resume", False, "Continue the newest committed checkpoint in "
                          "<workdir>/world_model (actions: <workdir>/action_decoder, planner: "
                          "<workdir>/planner); start at step 0 if there is none.")
        flags.DEFINE_integer("resume_step", None, "Continue from this checkpoint step; newer "
                             "checkpoints are moved aside to <workdir>/superseded, not deleted.")
        flags.DEFINE_string("init_from", None, "Start from the parameters of another run (its "
                            "workdir, checkpoint directory or step directory; for the planner "
                            "also a converted Hugging Face checkpoint) with a fresh optimizer; "
                            "the train section's frozen patterns stay fixed. In `run` it "
                            "applies to the world model.")
        flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0 "
                            f"(default ${distributed.ENV_COORDINATOR}).")
        flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes "
                             f"(default ${distributed.ENV_NUM_PROCESSES}).")
        flags.DEFINE_integer("process_id", None, "Multi-process: this process's id in "
                             f"[0, num_processes) (default ${distributed.ENV_PROCESS_ID}).")
        flags.DEFINE_bool("multihost", None, "Multi-process with JAX's cluster auto-detection "
                          f"(Cloud TPU pods, SLURM) (default ${distributed.ENV_MULTIHOST}=1).")
    if job == "ingest":
        flags.DEFINE_string("spec", None, "Dataset spec file mapping the RLDS keys, e.g. "
                            "configs/rlds/bridge.py.")
        flags.DEFINE_string("source", None, "RLDS dataset directory (a TFDS version directory "
                            "or its parent); local or gs://.")
        flags.DEFINE_string("out", None, "Clip dataset directory to write; default "
                            "<workdir>/data_<spec name>.")
        required += ["spec", "source"]
    if job == "export":
        flags.DEFINE_string("out", None, "Bundle directory to write (must not exist); default "
                            "<workdir>/export.")
        flags.DEFINE_bool("raw_params", False, "Export the raw parameters instead of the EMA "
                          "ones.")
        flags.DEFINE_string("world_model", None, "A world_model step directory to export "
                            "instead of the newest step in <workdir>/world_model.")
        flags.DEFINE_string("action_decoder", None, "An action_decoder step directory to export "
                            "instead of the newest step in <workdir>/action_decoder.")
        flags.DEFINE_string("planner", None, "A planner step directory to export instead of "
                            "the newest step in <workdir>/planner (exported when there is one).")
    flags.mark_flags_as_required(required)


# Flags that hold a path (each job defines some of them): resolved against the current
# directory before anything runs, so no module below sees a relative path. (--config and
# --spec are read right here, from the current directory or else the project root:
# config.config_file_function.)
PATH_FLAGS = ("workdir", "out", "source", "init_from", "world_model", "action_decoder",
              "planner")


def _resolve_path_flags() -> None:
    """Makes the job's path flags absolute (`~` expanded; gs:// and other URLs untouched)."""
    for name in PATH_FLAGS:
        if name in flags.FLAGS and flags.FLAGS[name].value:
            flags.FLAGS[name].value = paths.resolve(flags.FLAGS[name].value)


def _fail(message: str) -> None:
    print(f"pewm: {message}", file=sys.stderr)
    sys.exit(2)


def _start_processes(job: str) -> None:
    """Joins a multi-process job when flags or environment ask for one (training jobs only)."""
    if job not in TRAINING_JOBS:
        return
    f = flags.FLAGS
    try:
        distributed.initialize(distributed.spec_from(
            coordinator_address=f.coordinator_address, num_processes=f.num_processes,
            process_id=f.process_id, multihost=f.multihost))
    except distributed.DistributedInitError as e:
        _fail(f"multi-process start failed: {e}")


def _load_config(overrides: list[str]):
    """Loads --config with the overrides and validates it; exits 2 with the message if bad."""
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no "no TPU" chatter
    import jax  # the device count decides the data-parallel size behind mesh entries of -1

    try:
        return config_lib.load_config(flags.FLAGS.config, overrides, jax.device_count())
    except config_lib.ConfigError as e:
        _fail(f"bad config: {e}")


def dataset_dir(config, workdir: pathlib.Path) -> pathlib.Path:
    """Where a run's dataset lives: config.data.dataset_dir, or <workdir>/data."""
    return pathlib.Path(config.data.dataset_dir or workdir / "data")


def _preview_stage(config, workdir: pathlib.Path, job: str) -> None:
    from pewm_jax import preview

    print(f"[preview] expert episodes of the built-in world -> {workdir / 'preview'}")
    preview.print_summary(preview.run_preview(config, workdir))


def _data_stage(config, workdir: pathlib.Path, job: str) -> None:
    from data_loaders import clip_dataset

    out = dataset_dir(config, workdir)
    if config.data.generator == "metaworld":
        try:
            from data_loaders import metaworld as generator
        except ImportError as e:
            _fail(f"data.generator 'metaworld' could not load Meta-World ({e}). Fix: "
                  "pip install -e '.[metaworld]'; for rendering without a GPU also "
                  "apt-get install libegl1 libgl1-mesa-dri")
        print(f"[data] Meta-World expert demonstrations -> {out}")
    else:
        from data_loaders import tabletop as generator
        print(f"[data] built-in world dataset -> {out}")
    try:
        meta, generated = clip_dataset.ensure_dataset(generator, config, out,
                                                      overwrite=flags.FLAGS.overwrite)
    except clip_dataset.DatasetError as e:
        _fail(str(e))
    print(f"  {'generated' if generated else 'reused'}: clips per split {meta.splits}")
    print(f"  statistics and tokenizer: {out / clip_dataset.STATS_FILE}, "
          f"{out / clip_dataset.TOKENIZER_FILE}")


def _ingest_job(config, workdir: pathlib.Path) -> None:
    from data_loaders import clip_dataset, rlds

    try:
        spec = rlds.load_spec(flags.FLAGS.spec)
        out = pathlib.Path(flags.FLAGS.out or workdir / f"data_{spec.name}")
        print(f"[ingest] {flags.FLAGS.source} ({spec.name}) -> {out}")
        meta = rlds.ingest(spec, flags.FLAGS.source, out, horizon=config.data.horizon,
                           frame_stride=config.data.frame_stride,
                           context_frames=config.data.context_frames,
                           image_size=config.world.image_size, overwrite=flags.FLAGS.overwrite)
    except clip_dataset.DatasetError as e:
        _fail(str(e))
    print(rlds.ingest_summary(meta, spec.fallback_instruction))
    print(f"  clips per split {meta.splits}; statistics and tokenizer beside them in {out}")


def _train(config: ml_collections.ConfigDict, model: str, init_from: str | None):
    """Trains `model` (a `kinds.KINDS` name); exits 2 on bad input, 3 on divergence."""
    from data_loaders.clip_dataset import DatasetError
    from pewm_jax.recipes import kinds
    from pewm_jax.train import checkpoint, loop

    f = flags.FLAGS
    try:
        # The flag's own string: pathlib would turn gs://bucket/run into gs:/bucket/run.
        return loop.train(config, f.workdir, resume=f.resume, resume_step=f.resume_step,
                          overwrite=f.overwrite, init_from=init_from, kind=kinds.KINDS[model])
    except (checkpoint.CheckpointError, config_lib.ConfigError, DatasetError,
            FileNotFoundError) as e:
        _fail(str(e))
    except loop.TrainingDivergedError as e:
        print(f"pewm: training diverged: {e}", file=sys.stderr)
        sys.exit(3)


def _train_stage(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                 job: str) -> bool:
    """Trains the world model; False when preempted (it saved; later stages must not run)."""
    return _train(config, "world_model", flags.FLAGS.init_from).status != "preempted"


def _whole_task_stage(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                      job: str) -> bool:
    """Trains the whole-task baseline; False when preempted."""
    return _train(config, "whole_task", flags.FLAGS.init_from if job == "whole_task"
                  else None).status != "preempted"


def _train_and_score(config: ml_collections.ConfigDict, workdir: pathlib.Path, job: str, *,
                     stage: str, model: str, splits: Sequence[str],
                     scorer: Callable[[pathlib.Path], Callable[[str], Any]],
                     table: Callable[[list], str]) -> bool:
    """Trains `model` (with --init_from when the job is this `stage`), then scores it on
    `splits` with `scorer(checkpoint_dir)(split)`, prints `table` and writes
    <workdir>/<stage>_eval.json. Scoring runs on one process: several processes score with
    `pewm <stage>` on one host, which reuses the finished run. False when preempted."""
    import json

    import jax

    from data_loaders.clip_dataset import DatasetError

    result = _train(config, model, flags.FLAGS.init_from if job == stage else None)
    if result.status == "preempted":
        return False
    if jax.process_count() > 1:
        print(f"[{stage}] evaluation runs on one process: run `pewm {stage}` with the same "
              "config on one host (it reuses the finished run)")
        return True
    score = scorer(result.checkpoint_dir)
    scores = []
    for split in splits:
        try:
            scores.append(score(split))
        except DatasetError as e:
            print(f"[{stage}] not scoring {split!r}: {e}")
    print(table(scores))
    report = workdir / f"{stage}_eval.json"
    report.write_text(json.dumps([dataclasses.asdict(s) for s in scores], indent=1))
    print(f"[{stage}] scores written to {report}")
    return True


def _planner_stage(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                   job: str) -> bool:
    """Fine-tunes the planner, then scores its plans on config.planner.eval_splits."""
    from pewm_jax.recipes import planner_scores as evaluation
    from pewm_jax.recipes.restore import restore
    from pewm_jax.vlm.finetune import make_planner

    def scorer(checkpoint_dir: pathlib.Path) -> Callable[[str], Any]:
        trained = restore(checkpoint_dir, "planner")
        planner = make_planner(trained.model, trained.tokenizer, trained.config)
        return lambda split: evaluation.evaluate_planner(planner, dataset_dir(config, workdir),
                                                         split)

    return _train_and_score(config, workdir, job, stage="planner", model="planner",
                            splits=config.planner.eval_splits, scorer=scorer,
                            table=evaluation.scores_table)


def _actions_stage(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                   job: str) -> bool:
    """Trains the action decoder (after sampling the world model's imagined clips when
    config.action_decoder.imagined_weight > 0), then scores it beside the mean action on
    config.action_decoder.eval_splits."""
    from pewm_jax.recipes import action_scores as actions_eval
    from pewm_jax.recipes.restore import restore

    if config.action_decoder.imagined_weight > 0:
        config = _imagine(config, workdir)

    def scorer(checkpoint_dir: pathlib.Path) -> Callable[[str], Any]:
        decoder = restore(checkpoint_dir, "action_decoder")
        return lambda split: actions_eval.evaluate_action_decoder(decoder.model, decoder.config,
                                                                  split)

    return _train_and_score(config, workdir, job, stage="actions", model="action_decoder",
                            splits=config.action_decoder.eval_splits, scorer=scorer,
                            table=actions_eval.scores_table)


def _imagine(config: ml_collections.ConfigDict, workdir: pathlib.Path
             ) -> ml_collections.ConfigDict:
    """`config` naming the run's imagined clips (action_decoder.imagined_dir), sampled by its
    world model into them first unless already there (process 0 writes; the others wait)."""
    import jax
    from jax.experimental import multihost_utils

    from data_loaders.clip_dataset import DatasetError
    from pewm_jax.recipes import imagined_clips
    from pewm_jax.train.checkpoint import CheckpointError

    config = ml_collections.ConfigDict(config.to_dict())
    config.data.dataset_dir = str(dataset_dir(config, workdir))
    config.action_decoder.imagined_dir = str(imagined_clips.imagined_dir(config, workdir))
    if jax.process_index() == 0:
        try:
            meta, made = imagined_clips.ensure_imagined_dataset(config, workdir,
                                                               flags.FLAGS.overwrite)
        except (CheckpointError, DatasetError) as e:
            _fail(f"action_decoder.imagined_weight > 0 needs the world model's imagined clips: "
                  f"{e}")
        print(f"[actions] imagined clips ({'sampled' if made else 'reused'}): "
              f"{meta.splits['train']} in {config.action_decoder.imagined_dir}, "
              f"{config.action_decoder.imagined_weight:.0%} of the decoder's training clips")
    multihost_utils.sync_global_devices("pewm_imagined_clips")
    return config


def _eval_stage(config: ml_collections.ConfigDict, workdir: pathlib.Path, job: str) -> None:
    """Evaluates the run's checkpoints in closed loop and prints the headline numbers."""
    if config.data.generator == "metaworld":
        from pewm_jax.evaluate import metaworld as metaworld_eval

        mw = config.metaworld
        print(f"[eval] Meta-World closed loop of {workdir}: {len(mw.eval_tasks)} tasks x "
              f"{len(mw.eval_cameras)} cameras x {mw.eval_seeds} seeds, conditions "
              f"{mw.eval_conditions}")
        print(metaworld_eval.headline(metaworld_eval.evaluate_run(config, workdir)))
        print(f"[eval] report: {workdir / 'eval' / 'metaworld_report.json'}")
        return
    from pewm_jax.evaluate import closed_loop

    print(f"[eval] closed-loop evaluation of {workdir} on {config.eval.splits} "
          f"({config.eval.episodes_per_template} episodes per template and split)")
    report = closed_loop.evaluate_run(config, workdir, dataset_dir(config, workdir))
    print(closed_loop.headline(report))
    print(f"[eval] report: {workdir / 'eval' / 'report.json'}; rollouts: "
          f"{', '.join(report['rollouts']) or 'none'}")


def _curves_stage(config: ml_collections.ConfigDict, workdir: pathlib.Path, job: str) -> None:
    """Scores the run's kept world-model checkpoints and draws the learning curves."""
    from pewm_jax.evaluate import curves
    from pewm_jax.train.checkpoint import CheckpointError

    if config.data.generator == "metaworld":
        _fail("pewm curves scores the built-in world's closed loop; Meta-World runs have none "
              "(set data.generator='tabletop')")
    print(f"[curves] world-model checkpoints of {workdir} "
          f"({tuple(config.curves.steps) or 'every saved step'}): goal reach on "
          f"{config.eval.video_clips} {config.eval.video_split} clips, closed loop "
          f"{tuple(config.curves.conditions)}")
    try:
        curves.learning_curves(config, workdir)
    except CheckpointError as e:
        _fail(str(e))
    print(f"[curves] {workdir / 'curves' / 'curves.png'}, {workdir / 'curves' / 'curves.json'};"
          f" TensorBoard: {workdir / 'tensorboard' / 'curves'}")


def _ablations_stage(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                     job: str) -> None:
    """Runs the evaluation's ablations on the run's models and prints their table."""
    from pewm_jax.evaluate import ablations
    from pewm_jax.train.checkpoint import CheckpointError

    if config.data.generator == "metaworld":
        _fail("pewm ablations runs the built-in world's closed loop; for Meta-World use pewm "
              "eval with --config.metaworld.eval_conditions (set data.generator='tabletop')")
    print(f"[ablations] {len(config.ablations.variants)} variants x "
          f"{tuple(config.ablations.conditions)} on {config.eval.splits} "
          f"({config.eval.episodes_per_template} episodes per template and split)")
    try:
        report = ablations.run_ablations(config, workdir)
    except CheckpointError as e:
        _fail(str(e))
    print(ablations.ablation_table(report))
    print(f"[ablations] {workdir / 'eval' / 'ablations.md'}, "
          f"{workdir / 'eval' / 'ablations.json'}")


def _export_job(workdir: pathlib.Path) -> None:
    """Writes the run's export bundle and prints where and what it holds."""
    from pewm_jax.export import bundle

    f = flags.FLAGS
    out = pathlib.Path(f.out or workdir / "export")
    try:
        manifest = bundle.export_bundle(workdir, out, world_model=f.world_model,
                                        action_decoder=f.action_decoder, planner=f.planner,
                                        use_ema=not f.raw_params)
    except bundle.ExportError as e:
        _fail(str(e))
    steps = ", ".join(f"{k} step {v}" for k, v in manifest["source"]["steps"].items())
    planner = (f"planner steps and the planner in Hugging Face format ({out}/planner_hf)"
               if manifest["planner"] else "no planner (the run has none: the closed loop "
               "needs one, `pewm planner`)")
    print(f"[export] {out}: {steps} ({manifest['source']['params']}); policy step, {planner}; "
          f"lowered for {'/'.join(manifest['policy_step']['platforms'])}. Run it with "
          "pewm_jax.export.runtime (load_bundle, BundleController) or serve it: python -m "
          f"pewm_jax.export.server --bundle={out}")


def _run_stage(stage: str, config: ml_collections.ConfigDict, workdir: pathlib.Path,
               job: str) -> bool:
    """Runs one stage; with several processes only training runs on all of them, the other
    stages on process 0 while the rest wait. False when the run must stop (preempted)."""
    import jax
    from jax.experimental import multihost_utils

    if stage in ("train", "whole_task", "actions", "planner") or jax.process_count() == 1:
        return _STAGES[stage](config, workdir, job) is not False
    if jax.process_index() == 0:
        _STAGES[stage](config, workdir, job)
    multihost_utils.sync_global_devices(f"pewm_stage_{stage}")
    return True


_STAGES = {"preview": _preview_stage, "data": _data_stage, "train": _train_stage,
           "whole_task": _whole_task_stage,
           "actions": _actions_stage, "planner": _planner_stage, "eval": _eval_stage,
           "curves": _curves_stage, "ablations": _ablations_stage}


def _job(job: str, overrides: list[str]):
    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        if not flags.FLAGS["verbosity"].present:  # library INFO logs only on request (-v 0)
            absl_logging.set_verbosity(absl_logging.WARNING)
        _resolve_path_flags()
        _start_processes(job)
        config = _load_config(overrides)
        workdir = pathlib.Path(flags.FLAGS.workdir)
        if job == "ingest":
            _ingest_job(config, workdir)
            return
        if job == "export":
            _export_job(workdir)
            return
        minutes: dict[str, float] = {}
        for stage in config.run.stages if job == "run" else (job,):
            if stage not in _STAGES:
                _fail(f"stage {stage!r} is not available in this version; set "
                      f"--config.run.stages to a subset of {tuple(_STAGES)}")
            start = time.perf_counter()
            finished = _run_stage(stage, config, workdir, job)
            minutes[stage] = (time.perf_counter() - start) / 60
            if not finished:
                print(f"[{stage}] stopped early (preempted); rerun with --resume to continue")
                return
        if job == "run":  # what a run's budget goes to (issue 25 asks for it printed)
            print("[run] wall time (minutes): " + ", ".join(
                f"{stage} {m:.1f}" for stage, m in minutes.items())
                + f"; total {sum(minutes.values()):.1f}")
    return run


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `pewm` console script."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    job = argv[1]
    if job not in JOBS:
        _fail(f"unknown job {job!r}\n\n{_usage()}")
    _define_flags(job)
    if {"-h", "--help", "-help"} & set(argv[2:]):
        print(f"pewm {job}: {JOBS[job]}\n\n{__doc__.strip()}\n\nflags:"
              f"{flags.FLAGS.module_help(__name__).split(':', 1)[1]}")
        sys.exit(0)
    overrides = [a.removeprefix("--config.") for a in argv[2:] if a.startswith("--config.")]
    rest = [a for a in argv[2:] if not a.startswith("--config.")]
    app.run(_job(job, overrides), argv=[f"pewm {job}"] + rest)


if __name__ == "__main__":
    main()
