"""The concrete models the trainer trains, one `ModelKind` each (the protocol and what a kind
says are `pewm_jax.train.kind`'s): the world model, the whole-task baseline (its run directory
is `whole_task/`), the action decoder and the planner. The recipes layer: above the generic
trainer, below control and evaluation. Their previews in TensorBoard every sample_every steps:
sampled clips beside the truth (world model), decoded plans beside the truth (planner), the
validation action error beside the mean action's (action decoder).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from data_loaders import clip_dataset, pipeline, plan_pipeline, tabletop, whole_task_pipeline
from data_loaders.batch_spec import BatchSpec, PlanBatchSpec
from data_loaders.clips import ActionStats
from pewm_jax.text import tokenizer as tokenizer_lib
from pewm_jax.diffusion import loss_fn, sample_from_config
from pewm_jax.recipes import action_scores as actions_eval
from pewm_jax.models import WorldModel, action_decoder
from pewm_jax.models.flops import world_model_flops
from pewm_jax.models.text_encoder import (SiglipTextEncoder, load_siglip_text_encoder,
                                          make_text_encoder, read_siglip_text_spec)
from pewm_jax.parallel import mesh as mesh_lib
from pewm_jax.train import metrics as metrics_lib
from pewm_jax.train.metrics import log
from pewm_jax.train.kind import ModelKind, Previews
from pewm_jax.train.state import StateLayout, TrainState, copy_tree
from pewm_jax.recipes import planner_scores as evaluation
from pewm_jax.vlm import finetune

def clip_tokenizer_path(config: ml_collections.ConfigDict) -> str:
    """config.data.tokenizer, else the (first) clip dataset's own tokenizer."""
    return config.data.tokenizer or str(epath.Path(pipeline.mixture_entries(config)[0][0])
                                        / clip_dataset.TOKENIZER_FILE)


def _validation_clips(config: ml_collections.ConfigDict, count: int
                      ) -> tuple[pipeline.ClipPipeline, dict[str, np.ndarray]] | None:
    """The validation pipeline and its first `count` clips (unaugmented) as one batch, for
    previews; None when count is 0 or there are no validation clips (logged)."""
    if not count:
        return None
    try:
        val = pipeline.ClipPipeline(config, "validation", augment=False, process_index=0,
                                    process_count=1)
    except clip_dataset.DatasetError as e:
        log(f"[train] no validation clips to preview ({e}); previews are off")
        return None
    examples = [val.element(p) for p in range(count)]
    return val, {k: np.stack([c[k] for c in examples]) for k in examples[0]}


# A stand-in action size for compiling without a dataset: the built-in world's (dx, dy, grip).
STAND_IN_ACTION_DIM = 3


class WorldModelKind(ModelKind):
    """The primitive world model: flow matching on clips (DESIGN.md "The primitive world
    model")."""

    name, section = "world_model", "train"
    unrelated = ("planner.", "action_decoder.", "whole_task.")


    def batch_shapes(self, config, vocab_size):
        return BatchSpec.from_config(config, STAND_IN_ACTION_DIM).shapes(
            self.train(config).global_batch_size)

    def remat(self, config):
        return config.model.remat
    def compute_dtype(self, config: ml_collections.ConfigDict) -> str:
        return config.model.dtype

    def build(self, config: ml_collections.ConfigDict, vocab_size: int,
              rngs: nnx.Rngs) -> WorldModel:
        """A randomly initialised world model; with model.text_encoder = 'siglip' the tower is
        built from its checkpoint's config.json (random weights, so the whole model initialises
        inside jit) and `load_pretrained` fills it in."""
        m = config.model
        if m.text_encoder == "siglip":
            encoder = SiglipTextEncoder(read_siglip_text_spec(m.text_encoder_path),
                                        dtype=jnp.dtype(m.dtype),
                                        param_dtype=jnp.dtype(m.param_dtype), rngs=rngs)
        else:
            encoder = make_text_encoder(config, rngs, vocab_size)
        return WorldModel.from_config(config, rngs, encoder)

    def loss(self, model, batch, rng, config):
        return loss_fn(model, batch, rng, config)

    def frozen(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        """A pretrained SigLIP text tower stays as its checkpoint has it."""
        return (r"text_encoder/.*",) if config.model.text_encoder == "siglip" else ()

    def load_pretrained(self, config: ml_collections.ConfigDict, state: TrainState,
                        layout: StateLayout) -> TrainState:
        """With a SigLIP text tower: its checkpoint weights in params and ema_params."""
        if config.model.text_encoder != "siglip":
            return state
        encoder = load_siglip_text_encoder(config.model.text_encoder_path,
                                           dtype=jnp.dtype(config.model.dtype),
                                           param_dtype=jnp.dtype(config.model.param_dtype))
        pretrained = jax.device_put(nnx.to_pure_dict(nnx.state(encoder, nnx.Param)),
                                    layout.shardings.params["text_encoder"])
        params = {**state.params, "text_encoder": pretrained}
        ema = {**state.ema_params, "text_encoder": copy_tree(
            pretrained, layout.shardings.ema_params["text_encoder"])}
        return state.replace(params=params, ema_params=ema)

    def tokenizer_path(self, config: ml_collections.ConfigDict) -> str:
        return clip_tokenizer_path(config)

    def iterator(self, config, vocab_size, split, start_step):
        return pipeline.make_iterator(config, split, start_step=start_step)

    def flops_per_step(self, config, vocab_size):
        return world_model_flops(config, config.train.global_batch_size).forward_backward

    def previews(self, config: ml_collections.ConfigDict, layout: StateLayout
                 ) -> Previews | None:
        """EMA-weight samples of the first sample_clips validation clips beside the truth."""
        val = _validation_clips(config, config.train.sample_clips)
        if val is None:
            return None
        _, batch = val
        repl = mesh_lib.replicated(layout.mesh)
        clips = {k: jax.make_array_from_process_local_data(repl, v) for k, v in batch.items()}
        graphdef = layout.graphdef

        def run(ema_params, clips):
            return sample_from_config(nnx.merge(graphdef, ema_params), clips,
                                      jax.random.key(config.seed), config)

        sampler = jax.jit(run, in_shardings=(layout.shardings.ema_params, None),
                          out_shardings=repl)

        def draw(step: int, state: TrainState, writer: metrics_lib.MetricWriter) -> None:
            with mesh_lib.activate(layout.mesh, layout.rules):
                sampled = metrics_lib.host_value(sampler(state.ema_params, clips))
            context, frames = batch["context"], batch["frames"]
            writer.images(step, {"samples/grid": metrics_lib.clip_grid(context, frames,
                                                                       sampled)})
            writer.videos(step, {"samples/animation": metrics_lib.clip_animation(
                context, frames, sampled)})

        return draw


class PlannerKind(ModelKind):
    """The planner VLM: plan likelihood given first frame and task (DESIGN.md "The
    planner")."""

    name, section = "planner", "planner.train"
    unrelated = ("model.", "diffusion.", "train.", "action_decoder.", "whole_task.",
                 "data.augment",
                 "data.crop_scale_min", "data.color_jitter", "data.max_text_tokens",
                 "data.skip_corrupt", "data.tokenizer")


    def batch_shapes(self, config, vocab_size):
        image_size = finetune.planner_spec(config, vocab_size).image_size
        return PlanBatchSpec.from_config(config, image_size).shapes(
            self.train(config).global_batch_size)
    def compute_dtype(self, config: ml_collections.ConfigDict) -> str:
        return config.planner.dtype

    def build(self, config, vocab_size, rngs):
        return finetune.build_planner(config, vocab_size, rngs)

    def loss(self, model, batch, rng, config):
        return finetune.plan_loss(model, batch, rng, config)

    def tokenizer_path(self, config: ml_collections.ConfigDict) -> str:
        return plan_pipeline.planner_tokenizer_path(config)

    def iterator(self, config, vocab_size, split, start_step):
        image_size = finetune.planner_spec(config, vocab_size).image_size
        return plan_pipeline.make_plan_iterator(config, image_size, split,
                                                start_step=start_step)

    def flops_per_step(self, config, vocab_size):
        return finetune.planner_flops(finetune.planner_spec(config, vocab_size),
                                      config.planner.train.global_batch_size,
                                      config.planner.max_tokens)

    def previews(self, config: ml_collections.ConfigDict, layout: StateLayout
                 ) -> Previews | None:
        """Greedy constrained plans (EMA weights) of the first sample_clips validation
        episodes beside the expert's, and the fraction whose primitives match exactly."""
        count = config.planner.train.sample_clips
        if not count:
            return None
        try:
            source = tabletop.episode_source(pipeline.mixture_entries(config)[0][0],
                                             "validation")
        except clip_dataset.DatasetError as e:
            log(f"[train] no validation episodes to plan ({e}); plan previews are off")
            return None
        examples = [plan_pipeline.episode_plan(source[i]) for i in range(min(count,
                                                                             len(source)))]
        tokenizer = tokenizer_lib.load_tokenizer(self.tokenizer_path(config))

        def draw(step: int, state: TrainState, writer: metrics_lib.MetricWriter) -> None:
            planner = finetune.make_planner(nnx.merge(layout.graphdef, state.ema_params),
                                            tokenizer, config)
            with mesh_lib.activate(layout.mesh, layout.rules):
                plans = evaluation.plan_episodes(planner, examples)
            rows, matches = [], 0
            for example, plan in zip(examples, plans):
                said = ["(ran out of tokens)"] if plan is None else [s.text for s in plan.steps]
                truth = [s.text for s in example.plan.steps]
                matches += said == truth
                rows.append(f"| {example.task} | {'; '.join(said)} | {'; '.join(truth)} |")
            writer.text(step, "plans", "| task | planned | expert |\n|---|---|---|\n"
                        + "\n".join(rows))
            writer.scalars(step, {"val_plan_exact_match": matches / len(examples)})

        return draw


class ActionDecoderKind(ModelKind):
    """The action decoder: inverse dynamics on the clips' frame pairs (DESIGN.md "Clip"),
    trained without augmentation (a crop would rescale the motion its labels measure)."""

    name, section = "action_decoder", "action_decoder.train"
    unrelated = ("model.", "diffusion.", "train.", "planner.", "whole_task.", "data.augment",
                 "data.crop_scale_min", "data.color_jitter")

    def build_restored(self, config, vocab_size, stats, rngs):
        return action_decoder.build_action_decoder(config, *_action_spec(stats), vocab_size, rngs)

    def batch_shapes(self, config, vocab_size):
        return BatchSpec.from_config(config, STAND_IN_ACTION_DIM).shapes(
            self.train(config).global_batch_size)

    def compute_dtype(self, config: ml_collections.ConfigDict) -> str:
        return config.action_decoder.dtype

    def build(self, config, vocab_size, rngs):
        return action_decoder.build_action_decoder(config, *_mixture_actions(config), vocab_size,
                                                   rngs)

    def loss(self, model, batch, rng, config):
        return action_decoder.action_loss(model, batch, rng, config)

    def tokenizer_path(self, config: ml_collections.ConfigDict) -> str:
        return clip_tokenizer_path(config)

    def iterator(self, config, vocab_size, split, start_step):
        if split == "train" and config.action_decoder.imagined_weight > 0:
            config = ml_collections.ConfigDict(config.to_dict())
            config.data.mixture = tuple(decoder_mixture(config))
        return pipeline.make_iterator(config, split, start_step=start_step, augment=False,
                                      train=config.action_decoder.train)

    def flops_per_step(self, config, vocab_size):
        return action_decoder.action_decoder_flops(
            action_decoder.ActionDecoderSpec.from_config(config, *_mixture_actions(config),
                                                         vocab_size),
            config.action_decoder.train.global_batch_size, config.data.horizon)

    def previews(self, config: ml_collections.ConfigDict, layout: StateLayout
                 ) -> Previews | None:
        """The EMA model's per-step action error and gripper-command accuracy on the first
        sample_clips validation clips, beside the mean action's (scalars)."""
        val = _validation_clips(config, config.action_decoder.train.sample_clips)
        if val is None:
            return None
        clip_pipeline, batch = val
        baseline = actions_eval.mean_action_errors(batch, clip_pipeline.mixture.stats)
        repl = mesh_lib.replicated(layout.mesh)
        keys = ("context", "frames", "start_xy", "goal_xy", "sgg_valid", "text_tokens",
                "text_mask", "actions", "action_mask", "gripper_mask")
        clips = {k: jax.make_array_from_process_local_data(repl, batch[k]) for k in keys}
        graphdef = layout.graphdef

        def run(ema_params, clips):
            model = nnx.merge(graphdef, ema_params)
            return action_decoder.action_errors(action_decoder.decode_batch(model, clips), clips)

        errors = jax.jit(run, in_shardings=(layout.shardings.ema_params, None),
                         out_shardings=repl)

        def draw(step: int, state: TrainState, writer: metrics_lib.MetricWriter) -> None:
            with mesh_lib.activate(layout.mesh, layout.rules):
                got = jax.tree.map(metrics_lib.host_value, errors(state.ema_params, clips))
            writer.scalars(step, {"val_action_mse": float(got["action_mse"]),
                                  "val_gripper_accuracy": float(got["gripper_accuracy"]),
                                  "val_mean_action_mse": baseline["action_mse"],
                                  "val_majority_gripper_accuracy": baseline["gripper_accuracy"]})

        return draw


class WholeTaskKind(WorldModelKind):
    """The non-primitive baseline: the world model's architecture and optimiser generating a
    whole task as one clip (`whole_task_pipeline`), trained for the world model's training
    FLOPs: its steps are config.train.steps x the world model's FLOPs per step / its own."""

    name = "whole_task"
    unrelated = ("planner.", "action_decoder.")

    def trained_config(self, config):
        return whole_task_pipeline.whole_task_config(config)

    def batch_shapes(self, config, vocab_size):
        return BatchSpec.from_config(whole_task_pipeline.whole_task_config(config),
                                     STAND_IN_ACTION_DIM).shapes(self.train(config).global_batch_size)

    def train(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """config.train with the FLOP-matched number of steps."""
        batch = config.train.global_batch_size
        budget = config.train.steps * world_model_flops(config, batch).forward_backward
        section = ml_collections.ConfigDict(config.train.to_dict())
        section.steps = max(1, round(budget / self.flops_per_step(config, 0)))
        return section

    def build(self, config, vocab_size, rngs):
        return super().build(whole_task_pipeline.whole_task_config(config), vocab_size, rngs)

    def iterator(self, config, vocab_size, split, start_step):
        return whole_task_pipeline.make_whole_task_iterator(config, split, start_step=start_step)

    def flops_per_step(self, config, vocab_size):
        return world_model_flops(whole_task_pipeline.whole_task_config(config),
                                 config.train.global_batch_size).forward_backward

    def previews(self, config: ml_collections.ConfigDict, layout: StateLayout
                 ) -> Previews | None:
        """None: its clips are judged by the closed-loop evaluation."""
        return None


def decoder_mixture(config: ml_collections.ConfigDict) -> list[tuple[str, float]]:
    """The action decoder's training datasets: config's clips with weight 1 - w, and the world
    model's imagined ones (`imagined_clips`) with w = config.action_decoder.imagined_weight."""
    if not config.action_decoder.imagined_dir:
        raise clip_dataset.DatasetError(
            "config.action_decoder.imagined_weight > 0 needs the imagined clips: train the "
            "decoder with `pewm actions`, which samples them into <workdir>/imagined, or set "
            "config.action_decoder.imagined_dir")
    weight = float(config.action_decoder.imagined_weight)
    entries = pipeline.mixture_entries(config)
    total = sum(w for _, w in entries)
    return ([(path, (1.0 - weight) * w / total) for path, w in entries]
            + [(config.action_decoder.imagined_dir, weight)])


def _mixture_actions(config: ml_collections.ConfigDict) -> tuple[int, tuple[int, ...]]:
    """`_action_spec` of the clip mixture's train datasets."""
    return _action_spec(pipeline.ClipMixture(pipeline.mixture_entries(config), "train").stats)


def _action_spec(stats: Sequence[ActionStats]) -> tuple[int, tuple[int, ...]]:
    """The largest action size of the datasets (what actions are padded to) and the dimensions
    that are a gripper command in any of them."""
    grippers = {int(d) for x in stats for d in np.flatnonzero(~np.asarray(x.normalize_mask))}
    return max(len(x.mean) for x in stats), tuple(sorted(grippers))


WORLD_MODEL = WorldModelKind()
PLANNER = PlannerKind()
ACTION_DECODER = ActionDecoderKind()
WHOLE_TASK = WholeTaskKind()
KINDS: dict[str, ModelKind] = {kind.name: kind for kind in (WORLD_MODEL, PLANNER,
                                                            ACTION_DECODER, WHOLE_TASK)}
# The kinds pewm-compile builds and the golden sharding tables hold (the action decoder's
# batch needs a dataset's action spec; the whole-task model is the world model's architecture).
COMPILED = ("world_model", "planner")

