"""One way to load a trained model: `restore(path, kind)` -> `Trained`.

Every checkpoint of a run directory holds the model's training config, the tokenizer and the
action statistics of the data it was trained on (`pewm_jax.train.checkpoint`), so a trained
model comes back with everything that using it needs, verified as it is read, onto the default
device (EMA weights unless asked otherwise). Evaluation, control, export and the CLIs all load
models through here; `pewm_jax.control.policy.PrimitivePolicy` and
`pewm_jax.vlm.finetune.make_planner` then wrap them with their transforms.
"""

from __future__ import annotations

import dataclasses
import json

import ml_collections
import tokenizers
from etils import epath
from flax import nnx

from data_loaders.clips import ActionStats
from pewm_jax.config import SAMPLING_KEYS
from pewm_jax.recipes.kinds import KINDS
from pewm_jax.train.checkpoint import find_checkpoint
from pewm_jax.train.kind import ModelKind


@dataclasses.dataclass(frozen=True)
class Trained:
    """A trained model with what using it needs."""

    kind: str  # its directory in the run: world_model, whole_task, action_decoder, planner
    model: nnx.Module
    config: ml_collections.ConfigDict  # its training config (whole_task: its clip horizon as
    # data.horizon)
    tokenizer: tokenizers.Tokenizer  # the tokenizer its text was encoded with
    stats: tuple[ActionStats, ...]  # action statistics of each dataset it was trained on
    step: int


def restore(path: str | epath.PathLike, kind: str | ModelKind, *,
            use_ema: bool = True) -> Trained:
    """The `kind` model of `path`: a run's workdir, its `<kind>/` directory or one step
    directory (newest committed step unless a step directory is given)."""
    kind = KINDS[kind] if isinstance(kind, str) else kind
    checkpoints, step = find_checkpoint(path, model=kind.name)
    try:
        config = ml_collections.ConfigDict(checkpoints.read_json(step, "config"))
        tokenizer = tokenizers.Tokenizer.from_str(
            json.dumps(checkpoints.read_json(step, "tokenizer")))
        stats = tuple(ActionStats.from_json(d["statistics"])
                      for d in checkpoints.read_json(step, "dataset_stats")["datasets"])
        with nnx.use_eager_sharding(False):  # no mesh: restore_module places the arrays
            abstract = nnx.eval_shape(lambda: kind.build_restored(
                config, tokenizer.get_vocab_size(), stats, nnx.Rngs(0)))
        model = checkpoints.restore_module(step, abstract,
                                           item="ema_params" if use_ema else "params")
    finally:
        checkpoints.close()
    return Trained(kind.name, model, kind.trained_config(config), tokenizer, stats, step)


def with_sampling(trained: Trained, diffusion: ml_collections.ConfigDict) -> Trained:
    """A clip model `trained` that samples with `diffusion`'s (a config.diffusion) sampler,
    steps and guidance scales (SAMPLING_KEYS: choices of evaluation, not of training)."""
    config = ml_collections.ConfigDict(trained.config.to_dict())
    for key in SAMPLING_KEYS:
        config.diffusion[key] = diffusion[key]
    return dataclasses.replace(trained, config=config)
