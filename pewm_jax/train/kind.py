"""What the trainer trains: the `ModelKind` protocol, one kind per model of the run directory.

The train state, step, checkpoints and loop (`state`, `checkpoint`, `loop`) are shared; a kind
says what differs between the models (the concrete kinds live in `pewm_jax.recipes.kinds`):

    name          its directory in the run (DESIGN.md "Run directory") and TensorBoard run
    section       where its training settings live: config.train, config.planner.train,
                  config.action_decoder.train
    unrelated     config keys it does not depend on (they may change when it resumes)
    build, loss   the randomly initialised nnx module; (module, batch, rng, config) ->
                  (loss, metrics holding 'loss')
    iterator      its Grain input pipeline (data-order contract) at a global step
    previews      what it shows in TensorBoard every sample_every steps
    batch_shapes  its global batch's shapes and dtypes (ahead-of-time compiles)
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from flax import nnx

from data_loaders import pipeline
from pewm_jax.train import metrics as metrics_lib
from pewm_jax.train.state import StateLayout, TrainState

Previews = Callable[[int, TrainState, metrics_lib.MetricWriter], None]


class ModelKind(abc.ABC):
    """A model the trainer can train (module docstring); subclasses fill in the parts."""

    name: str
    section: str
    unrelated: tuple[str, ...] = ()

    def train(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """Its training settings (the `train_defaults` keys)."""
        section = config
        for part in self.section.split("."):
            section = section[part]
        return section

    @abc.abstractmethod
    def compute_dtype(self, config: ml_collections.ConfigDict) -> str:
        """Its compute dtype name (what MFU's peak is taken for)."""

    @abc.abstractmethod
    def build(self, config: ml_collections.ConfigDict, vocab_size: int,
              rngs: nnx.Rngs) -> nnx.Module:
        """A randomly initialised model for a tokenizer of `vocab_size` ids."""

    @abc.abstractmethod
    def loss(self, model: nnx.Module, batch: Mapping[str, jax.Array], rng: jax.Array,
             config: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss, metrics holding 'loss') of one global batch; `rng` is the step's key."""

    def build_restored(self, config: ml_collections.ConfigDict, vocab_size: int,
                       stats: Sequence[Any], rngs: nnx.Rngs) -> nnx.Module:
        """The model to restore a checkpoint into, from what the checkpoint holds (its config,
        its tokenizer's size, its datasets' action statistics): `build` unless the kind needs
        the statistics (the action decoder's action size)."""
        del stats
        return self.build(config, vocab_size, rngs)

    def frozen(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        """Patterns of parameters that always stay fixed (pretrained parts), added to the train
        section's `frozen` patterns (default: none)."""
        del config
        return ()

    def trained_config(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """The config a restored model is used with (default: the saved one)."""
        return config

    def load_pretrained(self, config: ml_collections.ConfigDict, state: TrainState,
                        layout: StateLayout) -> TrainState:
        """`state` with the parts that come pretrained from the config filled in (default:
        none; `--init_from` is the trainer's own way to start from other weights)."""
        del config, layout
        return state

    @abc.abstractmethod
    def tokenizer_path(self, config: ml_collections.ConfigDict) -> str:
        """The tokenizer.json it reads text with (saved into every checkpoint)."""

    @abc.abstractmethod
    def iterator(self, config: ml_collections.ConfigDict, vocab_size: int, split: str,
                 start_step: int) -> pipeline.ClipBatchIterator:
        """This process's checkpointable batch iterator of `split` from `start_step`."""

    @abc.abstractmethod
    def flops_per_step(self, config: ml_collections.ConfigDict, vocab_size: int) -> float:
        """Matmul FLOPs of one train step (forward and backward) on the global batch."""

    @abc.abstractmethod
    def batch_shapes(self, config: ml_collections.ConfigDict, vocab_size: int
                     ) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Each key of its global batch -> (shape, dtype): what an ahead-of-time compile of its
        train step is lowered for."""

    def remat(self, config: ml_collections.ConfigDict) -> str | None:
        """Its rematerialisation policy (None: it has no remat setting)."""
        del config
        return None

    @abc.abstractmethod
    def previews(self, config: ml_collections.ConfigDict, layout: StateLayout
                 ) -> Previews | None:
        """What to draw every sample_every steps, or None (nothing to preview)."""
