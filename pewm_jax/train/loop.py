"""The train loop: start or resume, step, log, preview, checkpoint, survive preemption.

One loop for every model of the run directory (`kinds`: the world model, the planner); each
trains in `<workdir>/<kind.name>/` with its own settings section. Reads top to bottom as a
run does:
  1. where to start: a fresh state, the latest (--resume) or a chosen (--resume_step)
     checkpoint, or another run's weights (--init_from); an existing run is never replaced
     without --overwrite, and a checkpoint that cannot be restored raises;
  2. the sharded state on the config's mesh, the Grain iterator at the start step;
  3. per step: this process's rows -> one global batch -> the jitted step;
  4. every log_every steps: loss, learning rate, gradient norm, steps/s, examples/s and MFU to
     TensorBoard, metrics.jsonl and the progress bar; a NaN or Inf loss stops the run naming
     the step, before any checkpoint of that state is written;
  5. every sample_every steps: the kind's previews with EMA weights (sampled clips, or decoded
     plans, beside the truth);
  6. every checkpoint_every steps and at the end: an asynchronous Orbax checkpoint;
  7. on SIGTERM (a preemption notice): a checkpoint at a step all hosts agree on, exit 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from data_loaders import clip_dataset, pipeline
from pewm_jax.text import tokenizer as tokenizer_lib
from pewm_jax import config as config_lib
from pewm_jax.parallel import mesh as mesh_lib
from pewm_jax.parallel.global_batch import make_global_batch
from pewm_jax.train import checkpoint as ckpt_lib
from pewm_jax.train import metrics as metrics_lib
from pewm_jax.train.metrics import log
from pewm_jax.train import state as state_lib
from pewm_jax.train.kind import ModelKind

TENSORBOARD_DIR = "tensorboard"
SUPERSEDED_DIR = "superseded"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf; the run stopped without checkpointing the bad state."""


@dataclasses.dataclass
class TrainResult:
    """What a call of `train` did."""

    status: str  # 'completed', 'preempted' (SIGTERM; checkpoint written) or 'reused' (done before)
    step: int  # the step the state is at
    losses: dict[int, float]  # loss of every step this call ran
    checkpoint_dir: epath.Path
    log_dir: epath.Path
    state: state_lib.TrainState | None = None  # the final state (None when reused)
    run_seconds: float = 0.0  # wall time from the end of the first (compiling) step to the last
    checkpoint_seconds: float = 0.0  # of that, time the loop was blocked starting async saves
    final_wait_seconds: float = 0.0  # after the loop, waiting for the last saves to commit


class Preemption:
    """Whether a preemption notice (SIGTERM) has arrived, agreed on by every process.

    One process: a SIGTERM handler sets a flag the loop reads at each step boundary. Several:
    JAX's preemption sync manager (started by jax.distributed.initialize) catches SIGTERM and
    `reached_preemption_sync_point` returns True on every process at the same step.
    """

    def __init__(self):
        self.multi_process = jax.process_count() > 1
        self._flag = threading.Event()
        self._previous = None
        if not self.multi_process:
            if threading.current_thread() is not threading.main_thread():
                log("[train] not on the main thread: SIGTERM cannot be caught, so a preemption "
                     "notice will not save a checkpoint")
                return
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())

    def reached(self, step: int) -> bool:
        """True at the step boundary where the run should save and stop."""
        if self.multi_process:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # jax_enable_preemption_service is off: no notices arrive
                return False
        return self._flag.is_set()

    def close(self) -> None:
        """Puts the previous SIGTERM handler back."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _data_artifacts(config: ml_collections.ConfigDict, kind: ModelKind
                    ) -> tuple[str, dict, dict]:
    """(tokenizer path, tokenizer JSON, dataset statistics per dataset) of the run's data."""
    entries = pipeline.mixture_entries(config)
    stats = {"datasets": []}
    for directory, weight in entries:
        root = clip_dataset.require_dataset(directory)
        stats["datasets"].append({"dir": str(directory), "weight": weight, "statistics":
                                  json.loads((root / clip_dataset.STATS_FILE).read_text())})
    tokenizer_path = kind.tokenizer_path(config)
    tokenizer_lib.load_tokenizer(tokenizer_path)  # a clear error if it is missing or broken
    return tokenizer_path, json.loads(epath.Path(tokenizer_path).read_text()), stats


def _with_dataset_dir(config: ml_collections.ConfigDict, workdir: epath.Path
                      ) -> ml_collections.ConfigDict:
    """`config` with data.dataset_dir set to the run's own `<workdir>/data` when it names no
    dataset (where `pewm data` writes), so the saved config says which data was used."""
    if config.data.dataset_dir or config.data.mixture:
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.dataset_dir = str(workdir / "data")
    config.lock()
    return config


def peak_flops(config: ml_collections.ConfigDict, kind: ModelKind
               ) -> tuple[float, int]:
    """(peak FLOP/s of one device, how many such devices the run has), MFU's denominator: the
    train section's peak_flops_per_device, else the vendor figure for the kind's compute
    dtype, else a measured matmul peak."""
    if kind.train(config).peak_flops_per_device:
        return kind.train(config).peak_flops_per_device, jax.device_count()
    device, dtype = jax.devices()[0], jnp.dtype(kind.compute_dtype(config))
    known = metrics_lib.device_peak_flops(device, dtype)
    if known:
        return known, jax.device_count()
    measured = metrics_lib.measured_matmul_peak(dtype)
    if device.platform == "cpu":  # fake CPU devices share the host: the peak is per host
        return measured, jax.process_count()
    return measured, jax.device_count()


def _divergence_fix(checkpoints: ckpt_lib.RunCheckpoints, kind: ModelKind, bad: int) -> str:
    """Advice that works after a NaN/Inf at step `bad`: the learning rate cannot change on
    --resume, so start a new run from the last good weights, or this one afresh. The state
    after step bad - 1 gave the bad value, so the last good one is at most step bad - 2."""
    check = f"Fix: check the data and keep {kind.section}.grad_clip on, then"
    lower = f"--config.{kind.section}.learning_rate=<lower>"
    restart = f"start this run afresh: --overwrite {lower}"
    good = [s for s in checkpoints.steps() if s <= bad - 2]
    if not good:
        return f"{check} {restart} (no checkpoint before step {bad - 1} exists)."
    return (f"{check} continue from the last good weights in a new run directory: --init_from="
            f"{checkpoints.step_path(good[-1])} --workdir=<new dir> {lower} (the learning rate "
            f"cannot change on --resume); or {restart}.")


def _start_step(checkpoints: ckpt_lib.RunCheckpoints, config: ml_collections.ConfigDict,
                kind: ModelKind, *, resume: bool, resume_step: int | None) -> int | None:
    """The checkpoint step to resume from, None to start afresh, or -1 when already trained."""
    steps = checkpoints.steps()
    if resume_step is not None:
        if resume_step not in steps:
            raise ckpt_lib.CheckpointError(
                f"--resume_step {resume_step}: no committed checkpoint of that step in "
                f"{checkpoints.directory}; its committed steps are {steps or 'none'}.")
        return resume_step
    if resume:
        if not steps:
            log(f"[train] --resume: no committed checkpoint in {checkpoints.directory}; "
                 "starting from step 0")
            return None
        return steps[-1]
    if not steps:
        return None
    latest = steps[-1]
    if latest >= kind.train(config).steps and not ckpt_lib.config_differences(
            checkpoints.read_json(latest, "config"), config, kind.unrelated):
        return -1
    raise ckpt_lib.CheckpointError(
        f"{checkpoints.directory} already holds checkpoints (steps {steps}) of a run. Fix: pass "
        "--resume to continue it, --resume_step N to continue from step N, or --overwrite to "
        "delete them and start afresh (or use another --workdir).")


def _move_newer_aside(checkpoints: ckpt_lib.RunCheckpoints, step: int,
                      workdir: epath.Path, kind: ModelKind) -> None:
    """--resume_step: moves checkpoints newer than `step` to <workdir>/superseded (not deleted),
    so the run can save its own steps; done only after `step` restored successfully."""
    newer = [s for s in checkpoints.steps() if s > step]
    _sync("pewm_superseded_listed")  # every process listed before any is moved
    if not newer:
        return
    aside = workdir / SUPERSEDED_DIR / kind.name / time.strftime("%Y%m%d-%H%M%S")
    log(f"[train] resuming from step {step}: moving the newer checkpoints {newer} aside to "
         f"{aside} (nothing is deleted)")
    if jax.process_index() == 0:
        aside.mkdir(parents=True, exist_ok=True)
        for s in newer:
            checkpoints.step_path(s).rename(aside / str(s))
    _sync("pewm_superseded_moved")
    checkpoints.manager.reload()


def _remove_run(workdir: epath.Path, kind: ModelKind) -> None:
    """--overwrite: delete this model's checkpoints and TensorBoard logs (process 0)."""
    if jax.process_index() == 0:
        for path in (workdir / kind.name, workdir / TENSORBOARD_DIR / kind.name):
            if path.exists():
                log(f"[train] --overwrite: deleting {path}")
                path.rmtree()
    _sync("pewm_overwrite")


def train(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, *,
          resume: bool = False, resume_step: int | None = None, overwrite: bool = False,
          init_from: str | None = None, kind: ModelKind,
          hooks: Sequence[Callable[[int], None]] = ()) -> TrainResult:
    """Trains the `kind` model of `config` in `workdir/<kind.name>` (see the module docstring).

    `hooks` are called with the step number after each step is dispatched (e.g. for custom
    evaluation). Raises ckpt_lib.CheckpointError for a checkpoint that cannot be used (or
    --overwrite combined with a flag that needs the old run), TrainingDivergedError for a
    NaN/Inf loss or gradient, config_lib.ConfigError for a config that does not fit.
    """
    workdir = epath.Path(workdir)
    config_lib.validate(config, jax.device_count())
    config = _with_dataset_dir(config, workdir)
    if overwrite and (resume or resume_step is not None or init_from):
        raise ckpt_lib.CheckpointError(
            "--overwrite deletes the run's checkpoints, so it cannot be combined with --resume, "
            "--resume_step or --init_from. Fix: drop --overwrite, or the other flag.")
    preemption = Preemption()  # from the start: a notice during set-up still saves or exits 0
    checkpoint_dir = workdir / kind.name
    if overwrite:
        _remove_run(workdir, kind)
    t = kind.train(config)
    created = not checkpoint_dir.exists()  # removed again if the run stops before any save
    checkpoints = ckpt_lib.RunCheckpoints(checkpoint_dir, max_to_keep=t.keep_checkpoints,
                                          keep_period=t.keep_period,
                                          async_save=t.async_checkpoints)
    try:
        for name in checkpoints.uncommitted():
            log(f"[train] ignoring the uncommitted (half-written) checkpoint "
                 f"{checkpoint_dir / name}, left by a save that was interrupted")
        start = _start_step(checkpoints, config, kind, resume=resume, resume_step=resume_step)
        if start == -1:
            step = checkpoints.steps()[-1]
            log(f"[train] {checkpoint_dir} already holds the finished run (step {step}); "
                 "reusing it")
            return TrainResult("reused", step, {}, checkpoint_dir,
                               workdir / TENSORBOARD_DIR / kind.name)
        return _train_from(config, kind, workdir, checkpoints, preemption, start,
                           resume_step=resume_step, init_from=init_from, hooks=hooks)
    finally:
        preemption.close()
        checkpoints.close()
        if created and jax.process_index() == 0 and checkpoint_dir.exists() and not any(
                checkpoint_dir.iterdir()):
            checkpoint_dir.rmdir()  # e.g. a missing dataset: leave no empty run behind


def _initial_state(config: ml_collections.ConfigDict, workdir: epath.Path,
                   checkpoints: ckpt_lib.RunCheckpoints, layout: state_lib.StateLayout,
                   iterator: pipeline.ClipBatchIterator, start: int | None,
                   tokenizer: tuple[str, dict], *, resume_step: int | None,
                   init_from: str | None) -> tuple[state_lib.TrainState, dict]:
    """The state to train from and the checkpoint's meta ({} when fresh): restored from
    checkpoint `start`, or fresh (with --init_from's parameters). A checkpoint that does not
    fit, cannot be read or fails its checksums raises; never a fresh start."""
    if start is None:
        state = state_lib.create_train_state(config, layout)
        if init_from:
            source, source_step = ckpt_lib.find_checkpoint(init_from, model=layout.kind.name)
            try:
                params = source.restore_params(source_step, layout.abstract.params)
            finally:
                source.close()
            state = state.replace(params=params,
                                  ema_params=state_lib.copy_tree(params, layout.shardings.ema_params))
            log(f"[train] parameters from {source.step_path(source_step)}; fresh optimizer")
        return state, {}
    checkpoints.check_config(start, config, layout.kind.unrelated)
    tokenizer_path, tokenizer_json = tokenizer
    if checkpoints.read_json(start, "tokenizer") != tokenizer_json:
        key = "planner.tokenizer" if layout.kind.section != "train" else "data.tokenizer"
        raise ckpt_lib.CheckpointError(
            f"the tokenizer at {tokenizer_path} differs from the one checkpoint "
            f"{checkpoints.step_path(start)} was trained with, so text would map to other ids. "
            f"Fix: point config.{key} at the run's tokenizer.")
    state, meta = checkpoints.restore(start, layout, iterator)
    if not ckpt_lib.data_iter_restorable(meta):
        log(f"[train] checkpoint written by {meta['process_count']} processes, resuming on "
             f"{jax.process_count()}: the data order continues from step {start}")
    if resume_step is not None:
        _move_newer_aside(checkpoints, start, workdir, layout.kind)
    log(f"[train] resumed from {checkpoints.step_path(start)} (step {start})")
    return state, meta


def _train_from(config: ml_collections.ConfigDict, kind: ModelKind, workdir: epath.Path,
                checkpoints: ckpt_lib.RunCheckpoints, preemption: Preemption, start: int | None,
                *, resume_step: int | None, init_from: str | None,
                hooks: Sequence[Callable[[int], None]]) -> TrainResult:
    """Set-up, the step loop, and its logging, previews and checkpointing."""
    t = kind.train(config)
    checkpoint_dir, log_dir = workdir / kind.name, workdir / TENSORBOARD_DIR / kind.name
    tokenizer_path, tokenizer_json, dataset_stats = _data_artifacts(config, kind)
    vocab_size = tokenizer_lib.load_tokenizer(tokenizer_path).get_vocab_size()
    mesh = mesh_lib.make_mesh(config)
    layout = state_lib.state_layout(config, vocab_size, mesh, kind)
    iterator = kind.iterator(config, vocab_size, "train", start or 0)
    first = start or 0
    is_main = jax.process_index() == 0
    writer = bar = None
    losses: dict[int, float] = {}
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    # The metrics of every step since the last logged one: logged as their mean, and saved in
    # each checkpoint so a resumed run logs the same means as an uninterrupted one.
    window: dict[str, list[float]] = {}

    def drain() -> None:
        """Fetches the pending steps' metrics into `window`; stops at the first non-finite loss
        or gradient (a non-finite gradient makes that step's update, and the state saved after
        it, bad)."""
        for s, m in pending:
            values = {k: float(metrics_lib.host_value(v)) for k, v in m.items()}
            bad = [k for k in ("loss", "grad_norm") if not math.isfinite(values[k])]
            if bad:
                raise TrainingDivergedError(
                    f"the {bad[0]} is {values[bad[0]]} at step {s}; the run stopped there and "
                    f"wrote no checkpoint of that state. {_divergence_fix(checkpoints, kind, s)}")
            losses[s] = values["loss"]
            for k, v in values.items():
                window.setdefault(k, []).append(v)
        pending.clear()

    try:
        state, meta = _initial_state(config, workdir, checkpoints, layout, iterator, start,
                                     (tokenizer_path, tokenizer_json), resume_step=resume_step,
                                     init_from=init_from)
        window.update(meta.get("metrics_window", {}))
        # From step 0 too: a run killed before its first checkpoint left rows to drop.
        writer = metrics_lib.MetricWriter(log_dir, enabled=is_main, resumed_at=first)
        step_fn = state_lib.TrainStep(config, layout)
        previews = kind.previews(config, layout)
        flops_per_step = kind.flops_per_step(config, vocab_size)
        peak, peak_devices = peak_flops(config, kind)
        if first == 0:
            writer.text(0, "config", f"```\n{config.to_json_best_effort(indent=2)}\n```")
        log(f"[train] {kind.name}: mesh {dict(mesh.shape)} over {jax.device_count()} devices "
             f"({jax.process_count()} processes); steps {first} -> {t.steps}; "
             f"checkpoints: {checkpoint_dir}; TensorBoard: {log_dir}")
        bar = metrics_lib.ProgressBar(t.steps, first, enabled=is_main)

        status, step = "completed", first
        blocked = run_start = 0.0
        mark_time, mark_step = 0.0, first
        for step in range(first + 1, t.steps + 1):
            batch = make_global_batch(next(iterator), mesh)
            state, step_metrics = step_fn(state, batch)
            pending.append((step, step_metrics))
            for hook in hooks:
                hook(step)
            if step == first + 1:  # exclude compilation from the rates
                jax.block_until_ready(step_metrics)
                run_start = mark_time = time.perf_counter()
                mark_step = step
            preempted = preemption.reached(step)
            log_now = step % t.log_every == 0 or step == t.steps
            save_now = step % t.checkpoint_every == 0 or step == t.steps or preempted
            if log_now or save_now:
                drain()
            if log_now:
                values = {k: float(np.mean(v)) for k, v in window.items()}
                window.clear()
                now = time.perf_counter()
                if step > mark_step:
                    rate = (step - mark_step) / (now - mark_time)
                    values |= {"steps_per_sec": rate,
                               "examples_per_sec": rate * t.global_batch_size,
                               "mfu": metrics_lib.mfu(flops_per_step, 1 / rate, peak,
                                                      peak_devices)}
                    mark_time, mark_step = now, step
                writer.scalars(step, values)
                bar.update(step, loss=values["loss"],
                           **{"steps/s": values.get("steps_per_sec", 0.0)})
            if previews is not None and (step % t.sample_every == 0 or step == t.steps):
                previews(step, state, writer)
            if save_now:
                began = time.perf_counter()
                checkpoints.save(step, state, iterator, config=config,
                                 dataset_stats=dataset_stats, tokenizer=tokenizer_json,
                                 mesh_shape=mesh.shape, metrics_window=window)
                blocked += time.perf_counter() - began
            if preempted:
                status = "preempted"
                log(f"[train] preemption notice: saved step {step} and stopping")
                break
        loop_end = time.perf_counter()
        checkpoints.wait()
        final_wait = time.perf_counter() - loop_end
    except BaseException:
        checkpoints.wait()  # saves already started hold good states: let them commit
        raise
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        iterator.close()
    run_seconds = loop_end - run_start if run_start else 0.0
    log(f"[train] {status} at step {step}: checkpoints in {checkpoint_dir}, TensorBoard logs in "
         f"{log_dir} (tensorboard --logdir {workdir / TENSORBOARD_DIR})")
    return TrainResult(status, step, losses, checkpoint_dir, log_dir, state, run_seconds, blocked,
                       final_wait)
