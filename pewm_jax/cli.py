"""The `pewm` command: one sub-command per job, each with its own `--help`.

    pewm run     --config=configs/quickstart.py --workdir=runs/quickstart
    pewm preview --config=configs/quickstart.py --workdir=runs/quickstart --config.seed=3

Every job takes `--config` (an ml-collections config file, `path.py[:arg]`, with
`--config.<key>=<value>` overrides) and `--workdir`. The config is loaded and validated by
`pewm_jax.config.load_config` before anything runs; a bad file, key or value stops the job with
one message naming the key (exit code 2).
"""

from __future__ import annotations

import logging
import pathlib
import sys
from collections.abc import Callable

from absl import app, flags

from pewm_jax import config as config_lib

JOBS: dict[str, str] = {
    "run": "the main job: every stage in config.run.stages (now: preview) into --workdir",
    "preview": "run the world's task experts; write a GIF/PNG of episodes and expert statistics",
}


def _usage() -> str:
    lines = ["usage: pewm <job> --config=configs/<name>.py --workdir=<dir> [--config.<key>=<value>]",
             "", "jobs:"]
    lines += [f"  {name:<9} {text}" for name, text in JOBS.items()]
    lines += ["", "`pewm <job> --help` lists the flags of a job."]
    return "\n".join(lines)


def _define_common_flags() -> None:
    flags.DEFINE_string("config", None, "Config file `configs/<name>.py[:arg]`; override keys "
                        "with --config.<key>=<value> (e.g. --config.train.steps=50).")
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, pictures, reports.")
    flags.mark_flags_as_required(["config", "workdir"])


def _load_config(overrides: list[str]):
    """Loads --config with the overrides and validates it; exits 2 with the message if bad."""
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no "no TPU" chatter
    import jax  # the device count decides the data-parallel size behind mesh entries of -1

    try:
        return config_lib.load_config(flags.FLAGS.config, overrides, jax.device_count())
    except config_lib.ConfigError as e:
        print(f"pewm: bad config: {e}", file=sys.stderr)
        sys.exit(2)


def _run_stages(stages: tuple[str, ...], overrides: list[str]) -> Callable[[list[str]], None]:
    def job(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        config = _load_config(overrides)
        workdir = pathlib.Path(flags.FLAGS.workdir)
        for stage in stages or config.run.stages:
            if stage == "preview":
                from pewm_jax import preview
                print(f"[preview] expert episodes of the built-in world -> {workdir / 'preview'}")
                preview.print_summary(preview.run_preview(config, workdir))
            else:
                raise app.UsageError(f"stage {stage!r} is not available in this version; "
                                     f"set --config.run.stages to a subset of ('preview',)")
    return job


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `pewm` console script."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    job = argv[1]
    if job not in JOBS:
        print(f"pewm: unknown job {job!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    _define_common_flags()
    if {"-h", "--help", "-help"} & set(argv[2:]):
        print(f"pewm {job}: {JOBS[job]}\n\n{__doc__.strip()}\n\nflags:"
              f"{flags.FLAGS.module_help(__name__).split(':', 1)[1]}")
        sys.exit(0)
    stages = () if job == "run" else (job,)
    overrides = [a.removeprefix("--config.") for a in argv[2:] if a.startswith("--config.")]
    rest = [a for a in argv[2:] if not a.startswith("--config.")]
    app.run(_run_stages(stages, overrides), argv=[f"pewm {job}"] + rest)


if __name__ == "__main__":
    main()
