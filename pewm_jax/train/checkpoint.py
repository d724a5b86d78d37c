"""Orbax checkpoints of a run: the item layout of DESIGN.md, exact resume, restore on any mesh.

One Orbax `CheckpointManager` directory per model of a run (`<workdir>/world_model/`), one
numbered step directory per checkpoint, each with the same items:

    params, ema_params, opt_state   sharded arrays (StandardSave); restored against abstract
                                    arrays carrying the *target* shardings, so a checkpoint
                                    written on one mesh restores onto any other whose axes
                                    divide the arrays, one device included
    meta                            step, base RNG key, process count, mesh, library versions
    data_iter                       the Grain iterator state of every process
    config                          the run's config, checked on resume (`check_config`)
    dataset_stats, tokenizer        what the data was normalised and tokenised with, so the
                                    checkpoint alone is enough to evaluate or export

Saves are asynchronous (training continues while arrays are written) and atomic: Orbax writes
into a temporary directory and commits it by renaming, so a killed save leaves the previous
checkpoints intact and a `<step>.orbax-checkpoint-tmp-*` directory that restore ignores and
reports. A committed checkpoint that cannot be read raises `CheckpointError` naming it and the
other steps to fall back to (`--resume_step`); nothing ever silently starts from scratch.

Content is verified, not only structure: `meta` records a fingerprint of every array
(`fingerprint.py`: layout-independent, so it holds on any mesh), the sha256 of each JSON item
and of every process's data iterator state, and a seal of itself, all in the same atomic
commit. Every restore checks what it read against them before anything uses it; a mismatch
raises `CorruptCheckpointError` naming the step, what changed, and the newest other step that
verifies. (Orbax offers no data checksums: its zarr3 layout has a CRC-32C for shard indices
only, and a per-file manifest would have to be written after Orbax's commit, or read every file
twice on each process of a pod.)
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from pewm_jax.config import SAMPLING_KEYS, TRAIN_SECTIONS, default_config
from pewm_jax.train import fingerprint
from pewm_jax.train.state import StateLayout, TrainState

MODEL_DIRS = ("world_model", "action_decoder", "planner")
ARRAY_ITEMS = ("params", "ema_params", "opt_state")
JSON_ITEMS = ("meta", "config", "dataset_stats", "tokenizer")
ITEMS = ARRAY_ITEMS + ("meta", "data_iter", "config", "dataset_stats", "tokenizer")
# Config keys that may differ between a checkpoint and the run resuming it: where and how the
# run executes and reports, never what it computes. A key ending in '.' covers its group.
# Keys of a train section (config.train, config.planner.train) that may change on resume.
_RESUMABLE_TRAIN_KEYS = (
    "steps",  # total steps (the cosine schedule stretches to the new total)
    "log_every", "sample_every", "sample_clips", "peak_flops_per_device",
    "checkpoint_every", "keep_checkpoints", "keep_period", "async_checkpoints",
)
RESUMABLE_KEYS = (
    "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.logical_axis_rules",  # topology
    *(f"{section}.{key}" for section in TRAIN_SECTIONS for key in _RESUMABLE_TRAIN_KEYS),
    "data.num_workers", "data.prefetch", "data.generation_workers",  # input parallelism
    # Paths whose content is checked otherwise may move: the data (by the data order's
    # fingerprint), the tokenizer (compared with the checkpoint's), the SigLIP weights (the
    # checkpoint holds them).
    "data.dataset_dir", "data.tokenizer", "model.text_encoder_path", "planner.tokenizer",
    "run.", "eval.", "curves.", "ablations.", "planner.eval_splits",
    # How clips are sampled (previews only; evaluation sets its own).
    *(f"diffusion.{key}" for key in SAMPLING_KEYS),
)
_VERSIONED = ("jax", "flax", "optax", "orbax-checkpoint", "grain", "pewm-jax")


class IteratorState(Protocol):
    """What the data_iter item saves: a Grain iterator or a snapshot of its state (JSON bytes)."""

    def get_state(self) -> Any: ...


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the run that wants it."""


class CorruptCheckpointError(CheckpointError):
    """A committed checkpoint whose content differs from the checksums recorded at its save."""


def digest(value: Any) -> str:
    """sha256 of a JSON value's canonical text (sorted keys): a JSON item's checksum."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _sealed(meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` with the digest of its own content, so a change to meta itself is found too."""
    return {**meta, "seal": digest(meta)}


def _all_processes(data: bytes) -> list[str]:
    """sha256 of `data` (this process's data iterator state) on every process, in order."""
    mine = np.frombuffer(hashlib.sha256(data).digest(), np.uint8)
    if jax.process_count() == 1:
        return [mine.tobytes().hex()]
    return [bytes(row).hex() for row in np.asarray(multihost_utils.process_allgather(mine))]


class _StateBytes:
    """An iterator's state as the bytes saved, captured at save time: the checkpoint holds
    exactly that state (the iterator may move on while Orbax writes) and its checksum."""

    def __init__(self, iterator: IteratorState):
        state = iterator.get_state()
        self.data = state if isinstance(state, bytes) else json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self.data


class _VerifiedIterator:
    """What Grain's checkpoint handler restores into: checks the saved state's bytes against
    their recorded sha256 (None: not recorded), then sets the iterator from them."""

    def __init__(self, iterator: grain.DatasetIterator, expected: str | None,
                 corrupt: Callable[[], Exception]):
        self.iterator, self.expected, self.corrupt = iterator, expected, corrupt

    def set_state(self, data: bytes) -> None:
        if self.expected is not None and hashlib.sha256(data).hexdigest() != self.expected:
            raise self.corrupt()
        self.iterator.set_state(json.loads(data))

    def start_prefetch(self) -> None:
        self.iterator.start_prefetch()


def flatten_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """Dotted key -> value, with tuples as lists (the form a JSON round trip gives)."""
    tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    flat: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for name, value in node.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{name}.")
            else:
                flat[prefix + name] = json.loads(json.dumps(value))

    walk(tree, "")
    return flat


def config_differences(saved: Mapping[str, Any], current: ml_collections.ConfigDict,
                       unrelated: Sequence[str] = ()) -> list[str]:
    """'key: saved -> current' for every key that differs and is neither in RESUMABLE_KEYS
    nor in `unrelated` (keys, or prefixes ending in '.', that the model does not depend on).
    A key added to the schema after the checkpoint was written differs only when set to other
    than its default (which is what the saved run did)."""
    old, new = flatten_config(saved), flatten_config(current)
    defaults = flatten_config(default_config().to_dict())
    diffs = []
    for key in sorted(set(old) | set(new)):
        if any(key == k or (k.endswith(".") and key.startswith(k))
               for k in (*RESUMABLE_KEYS, *unrelated)):
            continue
        if key not in old and key in defaults and new[key] == defaults[key]:
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            diffs.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    return diffs


def versions() -> dict[str, str]:
    """Installed versions of the libraries a checkpoint's format depends on."""
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    handlers: dict[str, ocp.CheckpointHandler] = {k: ocp.StandardCheckpointHandler()
                                                  for k in ARRAY_ITEMS}
    handlers.update({k: ocp.JsonCheckpointHandler() for k in JSON_ITEMS})
    handlers["data_iter"] = grain.checkpoint.CheckpointHandler()
    return handlers


def _tree_problems(saved: Any, target: Any, item: str) -> list[str]:
    """Paths missing, unexpected or of another shape/dtype between saved metadata and target."""
    def by_path(tree: Any) -> dict[str, Any]:
        leaves = jax.tree_util.tree_leaves_with_path(
            tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
        return {jax.tree_util.keystr(p, simple=True, separator="/"): leaf for p, leaf in leaves}

    old, new = by_path(saved), by_path(target)
    problems = [f"{item}/{p} is in the checkpoint but not in the model" for p in old.keys() - new.keys()]
    problems += [f"{item}/{p} is in the model but not in the checkpoint" for p in new.keys() - old.keys()]
    for p in sorted(old.keys() & new.keys()):
        if tuple(old[p].shape) != tuple(new[p].shape) or np.dtype(old[p].dtype) != np.dtype(new[p].dtype):
            problems.append(f"{item}/{p}: checkpoint {old[p].dtype}{list(old[p].shape)}, model "
                            f"{new[p].dtype}{list(new[p].shape)}")
    return sorted(problems)


class RunCheckpoints:
    """The checkpoints of one model of a run (e.g. `<workdir>/world_model`), save and restore.

    `max_to_keep` newest checkpoints are kept, plus every step divisible by `keep_period`.
    """

    def __init__(self, directory: str | epath.PathLike, *, max_to_keep: int | None = None,
                 keep_period: int = 0, async_save: bool = True, read_only: bool = False):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_period or None,
            enable_async_checkpointing=async_save, read_only=read_only, create=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=_handlers())

    def steps(self) -> list[int]:
        """Committed checkpoint steps, oldest first."""
        return sorted(self.manager.all_steps())

    def uncommitted(self) -> list[str]:
        """Names of half-written (uncommitted) checkpoint directories, which restore ignores."""
        if not self.directory.exists():
            return []
        pattern = re.compile(r"^\d+" + re.escape(ocp.step.TMP_DIR_SUFFIX))
        return sorted(p.name for p in self.directory.iterdir() if pattern.match(p.name))

    def step_path(self, step: int) -> epath.Path:
        """The directory of committed checkpoint `step`."""
        return self.directory / str(step)

    def save(self, step: int, state: TrainState, data_iter: IteratorState, *,
             config: ml_collections.ConfigDict, dataset_stats: Mapping[str, Any],
             tokenizer: Mapping[str, Any], mesh_shape: Mapping[str, int],
             metrics_window: Mapping[str, Sequence[float]] | None = None) -> None:
        """Starts writing checkpoint `step` (asynchronously; `wait` blocks until committed).

        `meta` records checksums of everything written: a fingerprint of every array
        (`fingerprint.py`, from each host's own shards), the digest of each JSON item and of every
        process's data iterator state, and its own digest; `restore` and `read_json` verify
        them. They ride in the same atomic commit as what they describe. `metrics_window`:
        the metrics of the steps since the last logged one, so a resumed run logs the same
        averages as an uninterrupted one.
        """
        rng = np.asarray(state.rng.addressable_data(0)).tolist()
        arrays = {name: getattr(state, name) for name in ARRAY_ITEMS}
        items = {"config": config.to_dict(), "dataset_stats": dict(dataset_stats),
                 "tokenizer": dict(tokenizer)}
        data_iter = _StateBytes(data_iter)
        checksums = {"arrays": fingerprint.fingerprints(arrays),
                     "json": {name: digest(value) for name, value in items.items()},
                     "data_iter": _all_processes(data_iter.data)}
        meta = _sealed({"step": step, "rng": rng, "process_count": jax.process_count(),
                        "mesh": dict(mesh_shape), "versions": versions(),
                        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                        "metrics_window": {k: list(v) for k, v in (metrics_window or {}).items()},
                        "checksums": checksums})
        self.manager.save(step, force=True, args=ocp.args.Composite(
            **{name: ocp.args.StandardSave(value) for name, value in arrays.items()},
            meta=ocp.args.JsonSave(meta),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
            **{name: ocp.args.JsonSave(value) for name, value in items.items()}))

    def save_params(self, step: int, params: Any, config: Mapping[str, Any]) -> None:
        """Writes a checkpoint of parameters and their config alone (a converted model that
        --init_from and `restore_module` read), with their checksums; waits for the commit."""
        meta = _sealed({"step": step, "versions": versions(), "checksums": {
            "arrays": fingerprint.fingerprints({"params": params}),
            "json": {"config": digest(dict(config))}}})
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(dict(config)),
            meta=ocp.args.JsonSave(meta)))
        self.wait()

    def wait(self) -> None:
        """Blocks until every started save is committed (raises if one failed)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        self.manager.close()

    def read_json(self, step: int, item: str, *, check_others: bool = True) -> Any:
        """One JSON item (meta, config, dataset_stats, tokenizer) of checkpoint `step`,
        verified against the digest its save recorded; CorruptCheckpointError if it differs,
        naming (with `check_others`) the newest other step whose item is intact."""
        try:
            value = self.manager.restore(step, args=ocp.args.Composite(
                **{item: ocp.args.JsonRestore()}))[item]
        except Exception as e:
            raise self._unreadable(step, item, e) from e
        if item == "meta":
            recorded, content = value.get("seal"), {k: v for k, v in value.items() if k != "seal"}
        else:
            recorded, content = self._checksums(step).get("json", {}).get(item), value
        if recorded is not None and digest(content) != recorded:
            raise self._corrupt(step, f"its {item} item (under {self.step_path(step) / item})",
                                (lambda s: self.read_json(s, item, check_others=False))
                                if check_others else None)
        return value

    def _checksums(self, step: int) -> dict[str, Any]:
        """What checkpoint `step`'s save recorded (empty for checkpoints written before
        checksums were recorded, which are restored unverified)."""
        return self.read_json(step, "meta").get("checksums", {})

    def check_config(self, step: int, config: ml_collections.ConfigDict,
                     unrelated: Sequence[str] = ()) -> None:
        """Raises CheckpointError listing config keys that differ and may not change on resume
        (`unrelated`: keys the model does not depend on, see `config_differences`)."""
        diffs = config_differences(self.read_json(step, "config"), config, unrelated)
        if diffs:
            raise CheckpointError(
                f"the config differs from the one checkpoint {self.step_path(step)} was trained "
                f"with, in keys that change what is computed:\n  " + "\n  ".join(diffs) +
                "\nFix: resume with the saved values (they are in the checkpoint's config item), "
                "or start a new run in another --workdir (or --init_from this one for its "
                "weights). Keys that may change on resume: " + ", ".join(RESUMABLE_KEYS))

    def restore(self, step: int, layout: StateLayout,
                data_iter: grain.DatasetIterator | None) -> tuple[TrainState, dict[str, Any]]:
        """The train state of checkpoint `step` on `layout`'s mesh, and its meta.

        `data_iter` (or None to skip) gets the saved iterator state of this process when the
        checkpoint was written by as many processes (`data_iter_restorable`); otherwise the
        pipeline, opened at the step, continues the same global order.
        """
        meta = self.read_json(step, "meta")
        targets = {name: getattr(layout.abstract, name) for name in ARRAY_ITEMS}
        restored = self._restore_arrays(step, targets, meta=meta)
        if data_iter is not None and data_iter_restorable(meta):
            self._restore_data_iter(step, data_iter, meta)
        rng = jax.device_put(np.asarray(meta["rng"], np.uint32), layout.shardings.rng)
        count = jax.device_put(np.asarray(step, np.int32), layout.shardings.step)
        state = TrainState(count, restored["params"], restored["ema_params"],
                           restored["opt_state"], rng)
        return state, meta

    def _restore_arrays(self, step: int, targets: Mapping[str, Any], *,
                        meta: Mapping[str, Any] | None = None,
                        check_others: bool = True) -> dict[str, Any]:
        """The array items `targets` names (abstract trees carrying the target shardings) of
        checkpoint `step`, verified against their fingerprints before anything uses them;
        CorruptCheckpointError naming (with `check_others`) the newest other step that is
        intact. `meta`: the step's meta, when the caller has read it already."""
        self._check_structure(step, targets)
        args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
        try:
            restored = dict(self.manager.restore(step, args=ocp.args.Composite(**args)))
        except Exception as e:
            raise self._unreadable(step, ", ".join(args), e) from e
        meta = self.read_json(step, "meta") if meta is None else meta
        recorded = meta.get("checksums", {}).get("arrays")
        if recorded is None:
            _warn_unverified(self.step_path(step))
            return restored
        got = fingerprint.fingerprints(restored)
        bad = sorted(path for path, value in got.items() if recorded.get(path) != value)
        if bad:
            del restored
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            item = bad[0].split("/")[0]
            raise self._corrupt(step, f"array {shown} (data under {self.step_path(step) / item})",
                                (lambda s: self._restore_arrays(s, targets, check_others=False))
                                if check_others else None)
        return restored

    def _restore_data_iter(self, step: int, data_iter: grain.DatasetIterator,
                           meta: Mapping[str, Any]) -> None:
        """Sets `data_iter` to this process's saved state, verified against its recorded
        sha256; a pipeline that would not continue the saved data order (other data, seed or
        batch size) is named as such."""
        recorded = meta.get("checksums", {}).get("data_iter")
        expected = recorded[jax.process_index()] if recorded else None
        verified = _VerifiedIterator(data_iter, expected, lambda: self._corrupt(
            step, f"process {jax.process_index()}'s data iterator state (under "
            f"{self.step_path(step) / 'data_iter'})"))
        try:
            self.manager.restore(step, args=ocp.args.Composite(
                data_iter=grain.checkpoint.CheckpointRestore(verified)))
        except CheckpointError:
            raise
        except (FileNotFoundError, OSError) as e:
            raise self._unreadable(step, "data_iter", e) from e
        except ValueError as e:
            raise CheckpointError(
                f"the input pipeline cannot continue the data order of checkpoint "
                f"{self.step_path(step)}: {e}. Fix: resume with the dataset, seed and batch size "
                "the run was trained with.") from e

    def restore_params(self, step: int, abstract_params: Any, *, item: str = "params") -> Any:
        """Only the parameters (`params` or `ema_params`) of checkpoint `step`, on the target
        shardings `abstract_params` carries (for --init_from), verified like `restore`'s."""
        return self._restore_arrays(step, {item: abstract_params})[item]

    def restore_module(self, step: int, abstract_module: nnx.Module, *,
                       item: str = "params") -> nnx.Module:
        """`abstract_module` (e.g. from `nnx.eval_shape`) with the parameters of item `item`
        of checkpoint `step`, as arrays on the default device."""
        graphdef, params = nnx.split(abstract_module, nnx.Param)
        # An explicit target sharding: without one Orbax would restore onto the saved mesh.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device),
                              nnx.to_pure_dict(params))
        nnx.replace_by_pure_dict(params, self.restore_params(step, target, item=item))
        return nnx.merge(graphdef, params)

    def _check_structure(self, step: int, targets: Mapping[str, Any]) -> None:
        try:
            saved = self.manager.item_metadata(step)
        except Exception as e:
            raise self._unreadable(step, "metadata", e) from e
        problems = []
        for item, target in targets.items():
            if saved.get(item) is None:
                raise self._unreadable(step, item, FileNotFoundError(f"no item {item!r}"))
            problems += _tree_problems(saved[item].tree, target, item)
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise CheckpointError(
                f"checkpoint {self.step_path(step)} does not fit this model:\n  {shown}{more}\n"
                f"Fix: {self._layout_fix(step)}")

    def _layout_fix(self, step: int) -> str:
        """How to load a checkpoint whose parameter tree differs from the model's: the saved
        config, unless another pewm-jax wrote it (parameter layouts change between versions)."""
        fix = "use the config it was trained with (its config item), or a matching checkpoint."
        try:
            saved = self.read_json(step, "meta", check_others=False)["versions"]["pewm-jax"]
        except (CheckpointError, KeyError, TypeError):
            return fix
        ours = versions()["pewm-jax"]
        if saved == ours:
            return fix
        return (f"it was written by pewm-jax {saved} and this is {ours}, whose parameter layout "
                f"may differ: load it with pewm-jax {saved}, or train it again with this one. "
                f"Otherwise {fix}")

    def _unreadable(self, step: int, what: str, cause: Exception) -> CheckpointError:
        """The error for a committed checkpoint that cannot be read: the fix first, then the
        first line of the cause (TensorStore's are kilobytes long)."""
        others = [s for s in self.steps() if s != step]
        fallback = (f"Fix: resume from another checkpoint with --resume_step N, N one of {others}"
                    if others else "No other committed checkpoint exists in this directory")
        detail = (str(cause).strip().splitlines() or [""])[0]
        detail = detail if len(detail) <= 300 else detail[:300] + " ..."
        return CheckpointError(
            f"checkpoint {self.step_path(step)} is committed but cannot be read ({what}). "
            f"{fallback}; the unreadable one is left in place. Cause: "
            f"{type(cause).__name__}: {detail}")

    def _corrupt(self, step: int, what: str,
                 check: Callable[[int], Any] | None = None) -> CorruptCheckpointError:
        """The error for content that differs from its recorded checksums. With `check` (reads
        and verifies the same items of another step, raising CheckpointError if they are bad),
        the other steps are checked, newest first, and the first intact one is named."""
        def intact(other: int) -> bool:
            try:
                check(other)
            except CheckpointError:
                return False
            return True

        others = sorted((s for s in self.steps() if s != step), reverse=True)
        good = next((s for s in others if intact(s)), None) if check else None
        if good is not None:
            fix = (f"Fix: resume from step {good}, which is intact (checked): --resume_step "
                   f"{good} (newer steps are then moved aside to <workdir>/superseded, not "
                   "deleted)")
        elif others and check:
            fix = (f"No other step is intact ({others} checked): start afresh in another "
                   "--workdir, or with --overwrite")
        elif others:
            fix = f"Fix: resume from an older step with --resume_step N, N one of {others}"
        else:
            fix = ("No other committed checkpoint exists: start afresh in another --workdir, or "
                   "with --overwrite")
        return CorruptCheckpointError(
            f"checkpoint {self.step_path(step)} is corrupt: {what} differs from the checksum "
            f"recorded when it was saved (its files changed on disk after the commit). {fix}. "
            "The corrupt checkpoint is left in place.")


_WARNED: set[str] = set()


def _warn_unverified(path: epath.Path) -> None:
    """Says once per checkpoint that it has no recorded checksums (written by an older version
    of pewm-jax), so it is restored without verification."""
    if str(path) not in _WARNED:
        _WARNED.add(str(path))
        logging.warning("checkpoint %s records no checksums (written before pewm-jax recorded "
                        "them): restored without verification", path)


def find_checkpoint(path: str | epath.PathLike, model: str = "world_model"
                    ) -> tuple[RunCheckpoints, int]:
    """The checkpoint directory and step `path` names, for --init_from.

    `path` may be a step directory (`.../world_model/300`), a checkpoint directory (its
    newest committed step) or a run's workdir (its `<model>/` directory).
    """
    path = epath.Path(path)
    if not path.exists():
        raise CheckpointError(f"--init_from {path}: no such directory")
    if (path / "params").exists() and path.name.isdigit():
        return RunCheckpoints(path.parent, read_only=True), int(path.name)
    if (path / model).is_dir():
        path = path / model
    checkpoints = RunCheckpoints(path, read_only=True)
    steps = checkpoints.steps()
    if not steps:
        raise CheckpointError(
            f"--init_from {path}: no committed checkpoint there. Fix: pass a run's --workdir, "
            f"its {model}/ directory, or one step directory inside it.")
    return checkpoints, steps[-1]


def data_iter_restorable(meta: Mapping[str, Any]) -> bool:
    """True when the saved Grain states are per-process states of the current process layout."""
    return int(meta.get("process_count", 1)) == jax.process_count()
