"""Experiment configuration: the schema with defaults, its validation, and loading.

Configs are ml-collections `ConfigDict`s written big_vision style: each file under `configs/`
has `get_config(arg=None)` that starts from `default_config()` and sets what differs. The
default config is the schema: `validate` rejects any key it does not have, any value whose type
differs from its default's, and values that cannot work together, with one message that names
the dotted key and says how to fix it. The CLI parses `--config=configs/x.py --config.a.b=v`
with absl `config_flags` and then calls `validate`; `load_config` does the same for programs
and tests.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections.config_flags import tuple_parser

from pewm_jax import paths


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or holds a value that cannot work."""


_PROJECT_ROOT = Path(__file__).resolve().parents[1]
MESH_AXES = ("data", "fsdp", "tensor")
# Logical axis names models put on params and activations; every one needs a rule.
LOGICAL_AXES = ("batch", "frames", "tokens", "embed", "heads", "mlp", "vocab", "kv")
# The stages a `pewm run` can execute, in pipeline order.
RUN_STAGES = ("preview", "data", "train", "whole_task", "actions", "planner", "eval", "curves",
              "ablations", "export")
DTYPES = ("float32", "bfloat16")
# Closed-loop evaluation conditions (pewm_jax.evaluate.closed_loop.CONDITIONS) and task splits
# of the built-in world (pewm_jax.sim.tasks.SPLITS; 'train' = seen compositions, new scenes).
EVAL_CONDITIONS = ("pewm", "open_loop", "no_sgg", "world_plan", "expert_gripper", "true_video",
                   "replay", "vlm_scripted", "oracle", "whole_task")
# config.diffusion keys that are choices of sampling, not of training: evaluation sets them on
# the restored clip models, and a run may change them on resume.
SAMPLING_KEYS = ("sampler", "num_steps", "text_guidance", "sgg_guidance", "guidance_min_t")
# Conditions whose clips the world model imagines: what a learning curve can follow.
CURVE_CONDITIONS = ("pewm", "open_loop", "no_sgg", "world_plan")
# Ablations (`pewm ablations`): a variant is "name: key=value, key=value", the keys evaluation
# choices (ABLATION_KEYS) or a model restored from another run directory (ABLATION_MODELS,
# e.g. "action_decoder=runs/other"); "name:" alone is the run as configured.
ABLATION_KEYS = (*(f"diffusion.{key}" for key in SAMPLING_KEYS), "eval.execute_frames",
                 "eval.track")
ABLATION_MODELS = ("world_model", "action_decoder", "planner")
ABLATION_VARIANTS = (
    "as configured:",
    "SGG guidance off: diffusion.sgg_guidance=1.0",
    "SGG guidance 2: diffusion.sgg_guidance=2.0",
    "SGG guidance 4: diffusion.sgg_guidance=4.0",
    "guidance on every step: diffusion.guidance_min_t=0.0",
    "text guidance 2: diffusion.text_guidance=2.0",
    "4 sampler steps: diffusion.num_steps=4",
    "16 sampler steps: diffusion.num_steps=16",
    "Heun sampler: diffusion.sampler=heun",
    "receding horizon, 2 frames: eval.execute_frames=2",
    "untracked decoding: eval.track=False",
)
EVAL_SPLITS = ("train", "holdout_primitive", "holdout_composition")
REMAT_POLICIES = ("none", "full", "dots")
DATA_GENERATORS = ("tabletop", "metaworld")
# Meta-World tasks with primitive words (pewm_jax.metaworld.experts.TASKS): the AVDC protocol's.
METAWORLD_TASKS = ("door-open", "door-close", "basketball", "shelf-place", "button-press",
                   "button-press-topdown", "faucet-close", "faucet-open", "handle-press",
                   "hammer", "assembly")
METAWORLD_CAMERAS = ("corner", "corner2", "corner3")
# Meta-World closed-loop conditions (pewm_jax.evaluate.metaworld.CONDITIONS).
METAWORLD_CONDITIONS = ("pewm", "open_loop", "no_sgg", "oracle_primitives", "true_video",
                        "replay", "expert")
SAMPLERS = ("euler", "heun")
DIFFUSION_TARGETS = ("frames", "residual")
DIFFUSION_PREDICTIONS = ("velocity", "clean")
# The world has 4 colours x 2 shapes, and every object in a scene is unique.
MAX_OBJECTS = 8
MIN_IMAGE_SIZE = 16
# The only keys that may hold None (meaning given in the comment in `default_config`).
NULLABLE_KEYS = frozenset({"train.grad_clip"})

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", tuple: "a tuple (or list)",
               bool: "True or False"}

_POSITIVE = (
    "world.primitive_max_steps",
    "data.horizon",
    "data.frame_stride",
    "data.context_frames",
    "data.max_text_tokens",
    "data.num_train_episodes",
    "data.num_val_episodes",
    "data.num_test_episodes",
    "data.num_holdout_episodes",
    "model.patch_size",
    "model.tubelet",
    "model.width",
    "model.depth",
    "model.num_heads",
    "model.mlp_ratio",
    "model.text_width",
    "model.text_depth",
    "model.text_num_heads",
    "diffusion.num_steps",
    "diffusion.sgg_sigma_px",
    "planner.grounding_sigma_px",
    "diffusion.time_logit_std",
    "diffusion.residual_scale",
    "train.steps",
    "train.global_batch_size",
    "train.learning_rate",
    "train.grad_clip",
    "train.grad_accum_steps",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.sample_every",
    "eval.episodes_per_template",
    "whole_task.horizon",
    "eval.parallel_envs",
    "eval.goal_reach_px",
    "planner.image_size",
    "planner.patch_size",
    "planner.width",
    "planner.depth",
    "planner.kv_heads",
    "planner.max_tokens",
    "planner.prompt_tokens",
    "action_decoder.channels",
    "action_decoder.keypoints",
    "action_decoder.width",
    "action_decoder.text_width",
    "action_decoder.depth",
    "planner.max_steps",
    "planner.max_words",
    "run.preview_episodes",
    "run.preview_episodes_per_template",
    "run.preview_scenes_per_primitive",
    "metaworld.min_segment_steps",
    "metaworld.eval_seeds",
    "metaworld.train_seeds",
)
_NON_NEGATIVE = (
    "eval.execute_frames",
    "action_decoder.locate_weight",
    "action_decoder.imagined_clips",
    "data.generation_workers",
    "data.color_jitter",
    "data.prefetch",
    "seed",
    "data.num_workers",
    "train.warmup_steps",
    "train.weight_decay",
    "train.sample_clips",
    "train.keep_period",
    "train.peak_flops_per_device",
    "diffusion.text_guidance",
    "diffusion.motion_weight",
    "diffusion.sgg_guidance",
    "eval.seed",
    "eval.max_replans",
    "eval.video_clips",
    "eval.rollout_videos",
    "planner.location_sigma_px",
    "planner.location_input_noise_px",
    "planner.shift_px",
    "planner.grounding_weight",
    "metaworld.val_seeds",
    "metaworld.test_seeds",
    "metaworld.max_replans",
)
_CHOICES = {
    "data.generator": DATA_GENERATORS,
    "model.text_encoder": ("trainable", "siglip"),
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "model.remat": REMAT_POLICIES,
    "diffusion.sampler": SAMPLERS,
    "diffusion.target": DIFFUSION_TARGETS,
    "diffusion.prediction": DIFFUSION_PREDICTIONS,
    "planner.dtype": DTYPES,
    "planner.param_dtype": DTYPES,
    "action_decoder.dtype": DTYPES,
    "action_decoder.param_dtype": DTYPES,
}
# Sections with the `train_defaults` keys; checks of 'train.*' keys apply to each of them.
TRAIN_SECTIONS = ("train", "planner.train", "action_decoder.train")
# (key, low, low inclusive, high, high inclusive)
_INTERVALS = (
    ("data.crop_scale_min", 0.0, False, 1.0, True),
    ("world.max_delta", 0.0, False, 1.0, True),
    ("diffusion.cond_dropout", 0.0, True, 1.0, False),
    ("diffusion.guidance_min_t", 0.0, True, 1.0, False),
    ("action_decoder.imagined_weight", 0.0, True, 1.0, False),
    ("train.ema_decay", 0.0, True, 1.0, False),
    ("train.final_lr_fraction", 0.0, True, 1.0, True),
    ("train.adam_b2", 0.0, True, 1.0, False),
    ("planner.mid_task_fraction", 0.0, True, 1.0, True),
)


def train_defaults() -> ml_collections.ConfigDict:
    """The training settings of one model (`config.train`, `config.planner.train`).

    Both sections have these keys, so one trainer reads either; the planner's defaults then
    differ where `default_config` says."""
    t = ml_collections.ConfigDict()
    t.steps = 10_000  # optimizer steps in the run
    t.global_batch_size = 32  # examples per step, all devices (divisible by data * fsdp)
    t.learning_rate = 1e-4  # peak AdamW learning rate
    t.warmup_steps = 500  # linear warmup steps before cosine decay
    t.weight_decay = 0.0  # AdamW decoupled weight decay
    t.grad_clip = 1.0  # global-norm gradient clip; None disables clipping
    t.ema_decay = 0.999  # decay of the EMA copy of the parameters, in [0, 1)
    t.grad_accum_steps = 1  # microbatches per step (divides global_batch_size)
    t.checkpoint_every = 1000  # steps between Orbax checkpoints
    t.keep_checkpoints = 3  # most recent checkpoints kept on disk
    t.log_every = 50  # steps between scalar metric logs
    t.sample_every = 1000  # steps between previews (EMA weights) of validation examples
    # Validation examples previewed: world model clips sampled beside the truth, planner
    # plans decoded beside the truth (TensorBoard); 0: none.
    t.sample_clips = 4
    t.final_lr_fraction = 0.1  # cosine decay ends at this fraction of learning_rate, [0, 1]
    t.adam_b2 = 0.999  # AdamW second-moment decay, in [0, 1)
    # Regular expressions over '/'-joined parameter paths (e.g. 'text_encoder/.*') whose
    # parameters the optimizer leaves unchanged; pretrained SigLIP weights are always frozen.
    t.frozen = ()
    t.keep_period = 0  # also keep every checkpoint whose step is a multiple of this; 0: none
    t.async_checkpoints = True  # write checkpoints in the background while training goes on
    # Peak FLOP/s of one device for MFU; 0: the vendor figure for known TPUs/GPUs, else measured
    # (on CPU: a jitted matmul at start-up, for the whole host).
    t.peak_flops_per_device = 0.0
    return t


def default_config() -> ml_collections.ConfigDict:
    """Every config key with its default value: the schema that `validate` checks against."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # master seed: data generation, parameter init and training noise derive from it

    c.world = ml_collections.ConfigDict()  # the built-in tabletop world (pewm_jax/sim)
    c.world.image_size = 64  # rendered frame height = width in pixels (>= 16)
    c.world.num_objects_min = 3  # fewest objects in a scene (1..8: 4 colours x 2 shapes)
    c.world.num_objects_max = 5  # most objects in a scene (num_objects_min..8)
    c.world.max_delta = 0.08  # max gripper displacement per env step, workspace units [0, 1]
    c.world.primitive_max_steps = 32  # env steps a scripted primitive may take before it is cut off

    c.data = ml_collections.ConfigDict()  # episodes, clips and the input pipeline
    c.data.horizon = 8  # H: future frames per training clip
    c.data.frame_stride = 4  # s: env steps between consecutive clip frames (actions sum over them)
    c.data.context_frames = 1  # clean observation frames the model is conditioned on
    c.data.max_text_tokens = 16  # primitive text is padded / truncated to this many tokens
    c.data.num_train_episodes = 1000  # generated episodes in the train split
    c.data.num_val_episodes = 100  # generated episodes in the validation split
    c.data.num_test_episodes = 100  # generated episodes in the test split (seen compositions)
    c.data.num_holdout_episodes = 100  # episodes of held-out compositions (compositional eval)
    c.data.num_workers = 0  # Grain worker processes; 0 loads in the main process
    c.data.dataset_dir = ""  # where the dataset lives; '' means inside the run's --workdir
    # Weighted mixture of clip dataset directories, (("dir", weight), ...); empty: dataset_dir alone.
    c.data.mixture = ()
    c.data.tokenizer = ""  # tokenizer.json path; '' means the (first) dataset's own tokenizer
    # What `pewm data` generates: 'tabletop' (the built-in world) or 'metaworld' (Meta-World
    # expert demonstrations; the `metaworld` extra and config.metaworld).
    c.data.generator = "tabletop"
    c.data.generation_workers = 2  # processes generating episodes (`pewm data`)
    c.data.augment = True  # random crop-and-resize + colour jitter, points moved with the pixels
    c.data.crop_scale_min = 0.85  # smallest crop side as a fraction of the frame (augmentation)
    c.data.color_jitter = 0.1  # max relative brightness / contrast change (augmentation)
    c.data.skip_corrupt = False  # skip (and count) records that fail to decode instead of raising
    c.data.prefetch = 2  # batches prefetched per worker

    c.model = ml_collections.ConfigDict()  # the space-time video DiT and its text encoder
    c.model.patch_size = 8  # spatial patch side in pixels (divides world.image_size)
    c.model.tubelet = 1  # frames per space-time patch (divides data.horizon)
    c.model.width = 256  # token embedding width (divisible by num_heads)
    c.model.depth = 4  # number of DiT blocks
    c.model.num_heads = 4  # attention heads per DiT block
    c.model.mlp_ratio = 4.0  # MLP hidden width / width
    c.model.text_width = 256  # text encoder width (divisible by text_num_heads)
    c.model.text_depth = 2  # text encoder layers
    c.model.text_num_heads = 4  # text encoder attention heads
    # 'trainable': a small encoder over the dataset tokenizer; 'siglip': a frozen pretrained
    # SigLIP text tower loaded from model.text_encoder_path (a local Hugging Face checkpoint).
    c.model.text_encoder = "trainable"
    c.model.text_encoder_path = ""  # local Hugging Face checkpoint directory for 'siglip'
    c.model.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16'
    c.model.param_dtype = "float32"  # stored parameter dtype: 'float32' or 'bfloat16'
    c.model.remat = "none"  # activation rematerialisation per block: 'none', 'full' or 'dots'

    c.diffusion = ml_collections.ConfigDict()  # flow-matching objective and sampling
    c.diffusion.sampler = "euler"  # ODE sampler: 'euler' or 'heun'
    c.diffusion.num_steps = 4  # sampler steps per generated clip
    c.diffusion.text_guidance = 1.0  # guidance scale on text (1 = none, 0 = ignore text)
    c.diffusion.sgg_guidance = 1.0  # guidance scale on start/goal heatmaps (1 = none)
    # Guidance acts only at flow times t >= this (the noisy steps that lay out the clip); the
    # steps below it use the conditional prediction alone (Kynkaanniemi et al. 2024), in [0, 1).
    c.diffusion.guidance_min_t = 0.0
    c.diffusion.cond_dropout = 0.1  # training probability of dropping each condition, in [0, 1)
    c.diffusion.sgg_sigma_px = 2.0  # standard deviation of the start/goal Gaussians in pixels
    # Mean of the logit-normal training time distribution; > 0 favours the noisier half, where a
    # clean-predicting model learns the layout (JiT uses the same bias).
    c.diffusion.time_logit_mean = 0.8
    c.diffusion.time_logit_std = 1.0  # standard deviation of the logit-normal time distribution
    # What is diffused: 'frames' (the clip's pixels) or 'residual' (its change from the last
    # context frame, times residual_scale: the still scene is copied exactly).
    c.diffusion.target = "residual"
    c.diffusion.residual_scale = 1.0  # > 0; scales the residual towards unit variance
    # What the network outputs: 'velocity' or 'clean' (the target x0; best for pixel models).
    c.diffusion.prediction = "clean"
    # Loss weight of the pixels a clip changes (flow.motion_weights): 1 + this where a future
    # frame differs from the context frame, 1 elsewhere; 0 weighs every pixel alike.
    c.diffusion.motion_weight = 0.0

    c.train = train_defaults()  # the world model's optimisation, checkpoints and logging

    # The planner VLM (pewm_jax/vlm): a PaliGemma that reads the first frame and the task and
    # writes the plan; `pewm planner` fine-tunes it into <workdir>/planner and evaluates it.
    c.planner = ml_collections.ConfigDict()
    c.planner.image_size = 64  # the frame is resized to this square input (a multiple of patch_size)
    c.planner.patch_size = 8  # SigLIP patch side in pixels
    c.planner.width = 128  # SigLIP and Gemma width (a multiple of the 4 heads)
    c.planner.depth = 2  # SigLIP and Gemma layers
    c.planner.kv_heads = 1  # Gemma key/value heads (1, 2 or 4 of its 4 query heads)
    # A converted model's architecture: a local Hugging Face PaliGemma config.json (or the
    # directory holding it); then image_size..depth above are not used. '': the small planner
    # above, trained from scratch over the dataset's tokenizer.
    c.planner.hf_config = ""
    c.planner.tokenizer = ""  # a converted model's own tokenizer.json; '': the dataset's
    c.planner.prompt_tokens = 32  # <bos> + task prompt, padded with <pad>: the fixed prefix
    c.planner.max_tokens = 112  # prefix + plan + <eos> per training example (longest plan)
    # Location-token targets are a Gaussian over neighbouring bins with this standard deviation
    # (pixels of the planner's image), so a near miss costs less than a far one; 0: one-hot.
    c.planner.location_sigma_px = 1.0
    # Training moves the plan's location tokens, where they are inputs, by Gaussian noise of
    # this standard deviation (pixels), so the planner looks at the image instead of recalling
    # a training scene from exact earlier points; 0: no noise.
    c.planner.location_input_noise_px = 1.0
    # Training images move by a random translation of up to this many pixels (the plan's points
    # with them), so a planner trained from scratch learns to find things; 0: no augmentation.
    c.planner.shift_px = 6
    # Weight of the grounding loss (finetune.grounding_loss): while writing a point, the last
    # layer's first head is taught to look at the image patches at that point's anchor; 0: off.
    c.planner.grounding_weight = 0.3
    # Ground each point on its anchor (`Primitive.goal_anchor`: an approach's goal, a gap behind
    # its object, on that object; README "Fine-tuning and evaluating the planner"); False: on
    # the point itself. Measured with 8-pixel patches (the head's target half a patch wide:
    # 4 px), anchors put 56% of approach goals within the line-up tolerance against 21%; with
    # 4-pixel patches (2 px), 10% against 28% (so the planners use 8-pixel patches).
    c.planner.ground_anchors = True
    # Standard deviation (pixels of the planner's image) of the Gaussian over the image patches
    # that the grounding loss targets: half of the default 8-pixel patch.
    c.planner.grounding_sigma_px = 4.0
    # This share of training examples starts at a later primitive boundary of its episode (the
    # primitives left), so the planner can replan mid-task in closed loop; 0: first frames only.
    c.planner.mid_task_fraction = 0.0
    c.planner.max_steps = 8  # most primitives in a plan (the plan grammar)
    c.planner.max_words = 16  # most words in one primitive's text (the plan grammar)
    c.planner.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16'
    c.planner.param_dtype = "float32"  # stored parameter dtype: 'float32' or 'bfloat16'
    c.planner.train = train_defaults()  # its optimisation, checkpoints and logging
    c.planner.train.steps = 3000
    c.planner.train.learning_rate = 1e-3
    c.planner.train.warmup_steps = 100
    c.planner.train.weight_decay = 1e-4
    c.planner.train.ema_decay = 0.99
    c.planner.train.checkpoint_every = 500
    c.planner.train.log_every = 50
    c.planner.train.sample_every = 500
    # Splits `pewm planner` evaluates after training (exact match, point error in pixels).
    c.planner.eval_splits = ("test", "holdout_composition", "holdout_primitive")

    # The action decoder (pewm_jax/models/action_decoder.py): inverse dynamics from a clip's
    # frames to the frame_stride per-step actions of each frame interval; `pewm actions`
    # trains it into <workdir>/action_decoder and scores it on held-out clips.
    c.action_decoder = ml_collections.ConfigDict()
    c.action_decoder.channels = 32  # convolution channels of the frame encoder
    c.action_decoder.keypoints = 16  # soft-argmax keypoints read from each frame
    c.action_decoder.width = 512  # MLP width (the motion head's and the gripper head's)
    c.action_decoder.text_width = 32  # width of the word embeddings the heads read
    c.action_decoder.depth = 3  # MLP hidden layers
    # Weight of the gripper keypoint's squared pixel error against the start point (the
    # gripper's place in the context frame): it teaches the encoder to find the gripper.
    c.action_decoder.locate_weight = 0.1
    # Share of its training clips that are the world model's own samples of train clips,
    # labelled with their true actions (pewm_jax/recipes/imagined_clips.py; `pewm actions`
    # samples them first, with config.diffusion's sampling settings), so that it learns to read
    # the frames the world model draws; 0: rendered clips only. In [0, 1).
    c.action_decoder.imagined_weight = 0.0
    c.action_decoder.imagined_clips = 0  # train clips imagined (the first ones); 0: all
    c.action_decoder.imagined_dir = ""  # where they are written; '': <workdir>/imagined
    c.action_decoder.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16'
    c.action_decoder.param_dtype = "float32"  # stored parameter dtype
    c.action_decoder.train = train_defaults()  # its optimisation, checkpoints and logging
    c.action_decoder.train.steps = 2000
    c.action_decoder.train.learning_rate = 3e-3  # 1e-3 needs twice the steps (measured)
    c.action_decoder.train.warmup_steps = 100
    c.action_decoder.train.weight_decay = 1e-4
    c.action_decoder.train.ema_decay = 0.99
    c.action_decoder.train.checkpoint_every = 500
    c.action_decoder.train.sample_every = 500
    c.action_decoder.train.sample_clips = 0  # no previews: its validation error is logged
    # Splits `pewm actions` scores after training (error beside the mean-action baseline).
    c.action_decoder.eval_splits = ("test", "holdout_composition")

    # The non-primitive baseline (`pewm whole_task`): the world model's architecture and
    # optimiser settings (config.train) generating one clip per whole task from the first frame
    # and the task's words, at the same frame stride, trained for the world model's training
    # FLOPs (steps = train.steps x its FLOPs per step / the whole-task model's).
    c.whole_task = ml_collections.ConfigDict()
    c.whole_task.horizon = 16  # frames per whole-task clip (16 x stride 4 = 64 steps >= ~55)

    c.mesh = ml_collections.ConfigDict()  # device mesh; one axis may be -1 = fill from device count
    c.mesh.data = -1  # data-parallel axis size
    c.mesh.fsdp = 1  # fully-sharded data-parallel axis size (params sharded, batch split)
    c.mesh.tensor = 1  # tensor-parallel axis size
    # (logical axis, mesh axis | tuple of mesh axes | None = replicated) pairs, MaxText style.
    c.mesh.logical_axis_rules = (
        ("batch", ("data", "fsdp")),
        ("frames", None),
        ("tokens", None),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("kv", None),
    )

    c.eval = ml_collections.ConfigDict()  # closed-loop evaluation (`pewm eval`)
    c.eval.episodes_per_template = 10  # evaluation episodes per task template and split
    c.eval.seed = 1234  # seed of the evaluation episodes (scenes never drawn for the dataset)
    # Task splits of the world to evaluate: seen compositions (new scenes) and the hold-outs.
    c.eval.splits = ("train", "holdout_composition")
    # Conditions, each beside the others on the same seeds (pewm_jax/evaluate/closed_loop.py):
    # the full system, open loop, no SGG, the world's own plans, true future frames decoded,
    # the expert's actions replayed, scripted primitives, the oracle, the whole-task baseline.
    c.eval.conditions = EVAL_CONDITIONS
    # Frames of each clip played before observing and imagining again (receding horizon within
    # a primitive), 1 .. data.horizon; 0 plays whole clips.
    c.eval.execute_frames = 0
    # True: the action decoder reads each frame interval from the live observation (closed-loop
    # tracking of the clip); False: it decodes the whole clip once from its own frames.
    c.eval.track = True
    c.eval.parallel_envs = 16  # environments run in lockstep (the models' batch size)
    # Primitives an episode may run beyond its task's length; its step budget holds them too
    # (world.primitive_max_steps each), so a failed primitive can be tried again.
    c.eval.max_replans = 2
    c.eval.goal_reach_px = 4.0  # a clip reaches its goal: gripper this close in its last frame
    c.eval.video_split = "test"  # dataset split whose clips score PSNR / SSIM
    c.eval.video_clips = 64  # held-out clips sampled for PSNR / SSIM (0: none)
    c.eval.rollout_videos = 3  # episodes of the first condition saved as GIFs

    # Learning curves (`pewm curves`, the run stage 'curves'): every kept world-model checkpoint
    # (train.keep_period) scored for goal reach of imagined clips and the closed-loop success of
    # these conditions (from CURVE_CONDITIONS; empty: clips only) on config.eval's episodes.
    c.curves = ml_collections.ConfigDict()
    c.curves.conditions = ("world_plan", "pewm")
    c.curves.steps = ()  # world-model steps to score; empty: every saved one

    # Ablations (`pewm ablations`, the run stage 'ablations'): these conditions (from
    # EVAL_CONDITIONS) on config.eval's episodes, same models and seeds, under each variant of
    # the evaluation's choices (ABLATION_VARIANTS' syntax), as one table.
    c.ablations = ml_collections.ConfigDict()
    c.ablations.conditions = ("world_plan", "pewm")
    c.ablations.variants = ABLATION_VARIANTS

    # Meta-World demonstrations (data.generator 'metaworld'), rendered at world.image_size.
    c.metaworld = ml_collections.ConfigDict()
    c.metaworld.tasks = METAWORLD_TASKS  # tasks to demonstrate
    c.metaworld.cameras = METAWORLD_CAMERAS  # each demonstration is stored once per camera
    c.metaworld.train_seeds = 20  # seeded task variations per task in the train split
    c.metaworld.val_seeds = 2  # ... in the validation split
    c.metaworld.test_seeds = 2  # ... in the test split (0 leaves the split out)
    c.metaworld.min_segment_steps = 4  # expert phases shorter than this merge into a neighbour
    # Closed-loop evaluation (`pewm eval` with data.generator 'metaworld'): the AVDC protocol,
    # every eval task x camera x seed 0 .. eval_seeds - 1, success within 500 env steps.
    c.metaworld.eval_tasks = METAWORLD_TASKS
    c.metaworld.eval_cameras = METAWORLD_CAMERAS
    c.metaworld.eval_seeds = 25
    c.metaworld.max_replans = 5  # fresh plans after the first one runs out without success
    c.metaworld.eval_conditions = METAWORLD_CONDITIONS  # each beside the others, same episodes

    c.run = ml_collections.ConfigDict()  # what `pewm run` executes
    c.run.stages = ("preview", "data", "train")  # stages to run, from RUN_STAGES, in that order
    c.run.preview_episodes = 6  # preview: expert episodes drawn as a GIF grid and PNG strip
    c.run.preview_episodes_per_template = 20  # preview: episodes per task template for expert stats
    c.run.preview_scenes_per_primitive = 50  # preview: scenes per primitive for expert stats
    return c


def resolve_mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes for `num_devices` devices, filling in the one axis that is -1.

    Raises ConfigError when the sizes cannot make a mesh of exactly `num_devices` devices.
    """
    if num_devices < 1:
        raise ValueError(f"num_devices must be at least 1, got {num_devices}")
    shape = _mesh_dims(config)
    fixed = math.prod(size for size in shape.values() if size > 0)
    described = " x ".join(f"{axis}={size}" for axis, size in shape.items())
    if num_devices % fixed:
        raise ConfigError(
            f"config.mesh ({described}): the fixed axis sizes multiply to {fixed}, which does not "
            f"divide the {num_devices} available devices. Fix: choose sizes whose product divides "
            f"{num_devices}, and set one axis to -1 to take the rest."
        )
    fill = [axis for axis, size in shape.items() if size == -1]
    if fill:
        shape[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"config.mesh ({described}) uses {fixed} devices but {num_devices} are available. "
            f"Fix: make the sizes multiply to {num_devices}, or set one axis to -1."
        )
    return shape


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises ConfigError naming the first key that is unknown, mistyped or cannot work.

    With `num_devices`, the mesh is resolved and checked against it; without, checks that need
    the device count (a -1 mesh axis) are skipped.
    """
    schema = default_config()
    _check_keys_and_types(config, schema, schema, prefix="")
    for key in _in_train_sections(_POSITIVE):
        value = _get(config, key)
        if value is not None and value <= 0:
            raise _error(key, value, "must be positive", f"set config.{key} to a value > 0")
    for key in _in_train_sections(_NON_NEGATIVE):
        value = _get(config, key)
        if value < 0:
            raise _error(key, value, "must not be negative", f"set config.{key} to a value >= 0")
    for key, choices in _CHOICES.items():
        value = _get(config, key)
        if value not in choices:
            raise _error(key, value, f"must be one of {', '.join(map(repr, choices))}", "pick one")
    for key, low, low_closed, high, high_closed in _INTERVALS + tuple(
            (f"planner.{k}", *rest) for k, *rest in _INTERVALS if k.startswith("train.")):
        value = _get(config, key)
        above_low = value >= low if low_closed else value > low
        below_high = value <= high if high_closed else value < high
        if not (above_low and below_high):
            interval = f"{'[' if low_closed else '('}{low}, {high}{']' if high_closed else ')'}"
            raise _error(key, value, f"must lie in {interval}", f"set config.{key} inside it")
    _check_world(config)
    _check_model(config)
    _check_planner(config)
    _check_action_decoder(config)
    for section in TRAIN_SECTIONS:
        _check_mesh_and_batch(config, num_devices, section)
        _check_frozen(_get(config, section).frozen, section)
    _check_names("run.stages", config.run.stages, RUN_STAGES, "stage")
    _check_names("eval.conditions", config.eval.conditions, EVAL_CONDITIONS, "condition")
    _check_names("eval.splits", config.eval.splits, EVAL_SPLITS, "split")
    if config.curves.conditions:
        _check_names("curves.conditions", config.curves.conditions, CURVE_CONDITIONS,
                     "condition")
    if any(not isinstance(v, int) or v < 1 for v in config.curves.steps):
        raise _error("curves.steps", tuple(config.curves.steps), "must be positive step numbers",
                     "name saved world-model steps, or () for all of them")
    _check_names("ablations.conditions", config.ablations.conditions, EVAL_CONDITIONS,
                 "condition")
    _check_ablation_variants(config, num_devices)
    _check_names("metaworld.tasks", config.metaworld.tasks, METAWORLD_TASKS, "task")
    _check_names("metaworld.cameras", config.metaworld.cameras, METAWORLD_CAMERAS, "camera")
    _check_names("metaworld.eval_tasks", config.metaworld.eval_tasks, METAWORLD_TASKS, "task")
    _check_names("metaworld.eval_cameras", config.metaworld.eval_cameras, METAWORLD_CAMERAS,
                 "camera")
    _check_names("metaworld.eval_conditions", config.metaworld.eval_conditions,
                 METAWORLD_CONDITIONS, "condition")


def parse_variant(text: str) -> tuple[str, list[str], dict[str, str]]:
    """(name, config overrides, {model: run directory}) of one ablation variant,
    "name: key=value, key=value"; ConfigError naming what is wrong."""
    name, sep, settings = str(text).partition(":")
    example = "'SGG guidance off: diffusion.sgg_guidance=1.0'"
    if not sep or not name.strip():
        raise ConfigError(f"ablation variant {text!r} has no 'name:'. Fix: write it as "
                          f"'name: key=value, ...', e.g. {example}")
    overrides, models = [], {}
    for item in filter(None, (part.strip() for part in settings.split(","))):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not value:
            raise ConfigError(f"ablation variant {text!r}: {item!r} is not key=value. Fix: "
                              f"e.g. {example}")
        if key in ABLATION_MODELS:
            models[key] = value
        elif key in ABLATION_KEYS:
            overrides.append(f"{key}={value}")
        else:
            raise ConfigError(
                f"ablation variant {text!r}: {key!r} is not a choice of evaluation. Fix: set "
                f"one of {ABLATION_KEYS}, or restore one of {ABLATION_MODELS} from another run "
                "directory (e.g. action_decoder=runs/other)")
    return name.strip(), overrides, models


def variant_config(config: ml_collections.ConfigDict, overrides: Sequence[str]
                   ) -> ml_collections.ConfigDict:
    """A copy of `config` with one variant's overrides set (and no variants of its own)."""
    copy = ml_collections.ConfigDict(config.to_dict())
    copy.ablations.variants = ()
    schema = default_config()
    for override in overrides:
        _apply_override(copy, schema, override)
    return copy


def _check_ablation_variants(config: ml_collections.ConfigDict, num_devices: int | None) -> None:
    """Each variant parses, names distinct, and its config is valid."""
    names = []
    for text in config.ablations.variants:
        try:
            name, overrides, _ = parse_variant(text)
            validate(variant_config(config, overrides), num_devices)
        except ConfigError as e:
            raise _error("ablations.variants", text, f"is not a valid variant ({e})",
                         "fix that variant (the syntax: ABLATION_VARIANTS in pewm_jax/config.py)") from None
        names.append(name)
    if len(set(names)) != len(names):
        raise _error("ablations.variants", tuple(names), "repeats a name", "name each once")


def _in_train_sections(keys: Sequence[str]) -> list[str]:
    """`keys` with each 'train.x' also named in every other section of TRAIN_SECTIONS."""
    return list(keys) + [f"{section}.{key.removeprefix('train.')}" for key in keys
                         if key.startswith("train.") for section in TRAIN_SECTIONS[1:]]


def apply_topology_preset(config: ml_collections.ConfigDict,
                          presets: Mapping[str, tuple[int, int, int, int, str]],
                          arg: str | None, path: str) -> ml_collections.ConfigDict:
    """Sets a pod config's topology preset `arg` (default: the first of `presets`): the mesh
    (data, fsdp, tensor), the global batch of every train section, and model.remat."""
    preset = arg or next(iter(presets))
    if preset not in presets:
        raise ConfigError(
            f"{path}: unknown topology preset {preset!r}; the presets are {', '.join(presets)}. "
            f"Fix: --config={path}:{next(iter(presets))}")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor, batch, config.model.remat = (
        presets[preset])
    # The planner and the action decoder train on the same mesh: their batches split over the
    # same data axes.
    for section in TRAIN_SECTIONS:
        _get(config, section).global_batch_size = batch
    return config


def config_file_function(path: str, example: str):
    """The `get_config` function of a Python config file (big_vision style).

    A relative path that does not exist from the current directory is also looked up from the
    project root, so `configs/x.py` works from anywhere.
    """
    if not Path(path).is_file() and (_PROJECT_ROOT / path).is_file():
        path = str(_PROJECT_ROOT / path)
    if not Path(path).is_file():
        raise ConfigError(f"config file {path!r} not found. Fix: pass a path such as {example}.")
    spec = importlib.util.spec_from_file_location(f"pewm_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {path!r} has no get_config() function.")
    return module.get_config


def load_config(
    path_with_arg: str,
    overrides: Sequence[str] = (),
    num_devices: int | None = None,
) -> ml_collections.ConfigDict:
    """Loads `path[:arg]`, applies `key=value` overrides, validates, and returns it locked.

    The same spec and override syntax as the CLI's `--config=path:arg --config.key=value`;
    values parse with the type of the key's default, with the parsers absl config_flags uses.
    Locking means a later typo such as `config.train.stpes = 5` raises instead of adding a key.
    """
    path, _, arg = path_with_arg.partition(":")
    get_config = config_file_function(path, "configs/quickstart.py")
    config = get_config(arg) if arg else get_config()
    schema = default_config()
    for override in overrides:
        _apply_override(config, schema, override)
    validate(config, num_devices)
    resolve_paths(config)
    config.lock()
    return config


# Keys that hold a local path or a remote URL: resolved against the current directory when the
# config is loaded (pewm_jax/paths.py), so nothing below sees a relative one.
PATH_KEYS = ("data.dataset_dir", "data.tokenizer", "model.text_encoder_path",
             "planner.hf_config", "planner.tokenizer", "action_decoder.imagined_dir")


def resolve_paths(config: ml_collections.ConfigDict) -> None:
    """Makes every path in `config` (PATH_KEYS and the data.mixture directories) absolute
    against the current directory, `~` expanded; empty and remote (`gs://`) paths stay."""
    for key in PATH_KEYS:
        group, leaf = key.split(".")
        config[group][leaf] = paths.resolve(config[group][leaf])
    # Malformed mixture entries are left for the pipeline to name (pipeline.mixture_entries).
    config.data.mixture = tuple(
        (paths.resolve(entry[0]), *entry[1:])
        if isinstance(entry, (tuple, list)) and entry and isinstance(entry[0], str) else entry
        for entry in config.data.mixture)


def _apply_override(
    config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, override: str
) -> None:
    """Sets one `key=value` (also written `--config.key=value`), parsed by the key's type."""
    key, sep, raw = override.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    if not sep:
        raise ConfigError(
            f"override {override!r} has no '='. Fix: write it as key=value, e.g. train.steps=50."
        )
    *groups, leaf = key.split(".")
    holder, schema_holder, walked = config, schema, []
    for name in groups:
        walked.append(name)
        if not isinstance(schema_holder.get(name), ml_collections.ConfigDict):
            raise _unknown_key_error(".".join(walked), schema)
        holder, schema_holder = holder[name], schema_holder[name]
    if leaf not in schema_holder:
        raise _unknown_key_error(key, schema)
    default = schema_holder[leaf]
    if isinstance(default, ml_collections.ConfigDict):
        raise ConfigError(
            f"config.{key} is a group of keys, not a value. Fix: override one of its keys, "
            f"e.g. {key}.{next(iter(default.keys()))}=..."
        )
    parser = {
        int: flags.IntegerParser().parse,
        float: flags.FloatParser().parse,
        str: str,
        tuple: tuple_parser.TupleParser().parse,
        bool: flags.BooleanParser().parse,
    }[type(default)]
    type_name = _TYPE_NAMES[type(default)]
    if key in NULLABLE_KEYS and raw.strip() == "None":
        holder[leaf] = None
        return
    try:
        holder[leaf] = parser(raw)
    except ValueError as e:
        raise ConfigError(
            f"config.{key}: cannot parse {raw!r} as {type_name} ({e}). "
            f"Fix: give {type_name}, e.g. {key}={default!r}."
        ) from None


def _check_keys_and_types(
    config: ml_collections.ConfigDict,
    schema: ml_collections.ConfigDict,
    root: ml_collections.ConfigDict,
    prefix: str,
) -> None:
    """Walks config against schema (a group of root): unknown keys, missing keys, then types."""
    for name in config.keys():
        if name not in schema:
            raise _unknown_key_error(prefix + name, root)
    for name, default in schema.items():
        key = prefix + name
        if name not in config:
            raise ConfigError(
                f"config.{key} is missing. Fix: start the config from "
                f"pewm_jax.config.default_config(), which sets it to {default!r}."
            )
        value = config[name]
        if not isinstance(default, ml_collections.ConfigDict):
            _check_type(key, value, default)
        elif isinstance(value, ml_collections.ConfigDict):
            _check_keys_and_types(value, default, root, key + ".")
        else:
            example = f"config.{key}.{next(iter(default.keys()))}"
            raise _error(key, value, "must be a group of keys", f"set keys inside it, e.g. {example}")


def _check_type(key: str, value: object, default: object) -> None:
    """Raises unless value has default's type (int counts as float; list as tuple; never bool)."""
    expected = type(default)
    name = _TYPE_NAMES[expected]
    if value is None:
        if key in NULLABLE_KEYS:
            return
        nullable = ", ".join(f"config.{k}" for k in sorted(NULLABLE_KEYS))
        raise _error(
            key, value, f"must be {name}; only {nullable} may be None", f"set it to e.g. {default!r}"
        )
    if isinstance(value, bool):
        ok = expected is bool
    elif expected is float:
        ok = isinstance(value, (int, float))
    elif expected is tuple:
        ok = isinstance(value, (tuple, list))
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise _error(
            key, value, f"must be {name}, not {type(value).__name__}", f"set it to e.g. {default!r}"
        )


def _check_world(config: ml_collections.ConfigDict) -> None:
    world = config.world
    if world.image_size < MIN_IMAGE_SIZE:
        raise _error(
            "world.image_size",
            world.image_size,
            f"is below the smallest frame the world renders, {MIN_IMAGE_SIZE} pixels",
            f"set it to {MIN_IMAGE_SIZE} or more, e.g. 64",
        )
    for key in ("num_objects_min", "num_objects_max"):
        if not 1 <= world[key] <= MAX_OBJECTS:
            raise _error(
                f"world.{key}",
                world[key],
                f"must lie in 1..{MAX_OBJECTS} (4 colours x 2 shapes = {MAX_OBJECTS} unique objects)",
                f"set it between 1 and {MAX_OBJECTS}",
            )
    if world.num_objects_min > world.num_objects_max:
        raise _error(
            "world.num_objects_min",
            world.num_objects_min,
            f"exceeds config.world.num_objects_max = {world.num_objects_max}",
            "make num_objects_min <= num_objects_max",
        )


def _check_model(config: ml_collections.ConfigDict) -> None:
    model, image_size, horizon = config.model, config.world.image_size, config.data.horizon
    if image_size % model.patch_size:
        raise _error(
            "model.patch_size",
            model.patch_size,
            f"does not divide config.world.image_size = {image_size}",
            f"choose a divisor of {image_size}",
        )
    for key, frames in (("data.horizon", horizon), ("whole_task.horizon",
                                                    config.whole_task.horizon)):
        if frames % model.tubelet:
            raise _error(
                key,
                frames,
                f"is not divisible by config.model.tubelet = {model.tubelet}",
                "make the horizon a multiple of the tubelet, or set model.tubelet=1",
            )
    for width, heads in (("width", "num_heads"), ("text_width", "text_num_heads")):
        if model[width] % model[heads]:
            raise _error(
                f"model.{width}",
                model[width],
                f"is not divisible by config.model.{heads} = {model[heads]}",
                f"make {width} a multiple of {heads}",
            )


def _check_planner(config: ml_collections.ConfigDict) -> None:
    p = config.planner
    if p.prompt_tokens >= p.max_tokens:
        raise _error("planner.prompt_tokens", p.prompt_tokens,
                     f"leaves no room for the plan in config.planner.max_tokens = {p.max_tokens}",
                     "make max_tokens larger")
    if p.hf_config:
        if not p.tokenizer:
            raise _error("planner.tokenizer", p.tokenizer, "is empty while planner.hf_config "
                         "names a converted model, whose token ids are its own",
                         "point it at that model's tokenizer.json")
        return
    if p.image_size % p.patch_size:
        raise _error("planner.image_size", p.image_size,
                     f"is not a multiple of config.planner.patch_size = {p.patch_size}",
                     "make it one")
    if p.width % 4:
        raise _error("planner.width", p.width, "is not a multiple of the planner's 4 heads",
                     "use a multiple of 4")
    if 4 % p.kv_heads:
        raise _error("planner.kv_heads", p.kv_heads, "does not divide the planner's 4 heads",
                     "use 1, 2 or 4")


def _check_action_decoder(config: ml_collections.ConfigDict) -> None:
    """The decoder's frame size and how much of its clips the controller plays."""
    if config.world.image_size % 2:
        raise _error("world.image_size", config.world.image_size, "is odd; the action decoder's "
                     "encoder halves it", "use an even image size")
    if config.eval.execute_frames > config.data.horizon:
        raise _error("eval.execute_frames", config.eval.execute_frames,
                     f"exceeds the clips' data.horizon = {config.data.horizon}",
                     f"use 1 to {config.data.horizon}, or 0 to play whole clips")


def _mesh_dims(config: ml_collections.ConfigDict) -> dict[str, int]:
    """The configured mesh axis sizes, checked: each positive or -1, and at most one -1."""
    shape = {axis: config.mesh[axis] for axis in MESH_AXES}
    for axis, size in shape.items():
        if size < 1 and size != -1:
            raise _error(
                f"mesh.{axis}",
                size,
                "must be a positive axis size, or -1 to fill in from the device count",
                "set it to a positive size or -1",
            )
    fill = [axis for axis, size in shape.items() if size == -1]
    if len(fill) > 1:
        raise _error(
            f"mesh.{fill[1]}",
            -1,
            f"is the second -1 axis (config.mesh.{fill[0]} is -1 too); only one may be",
            "give all but one axis a positive size",
        )
    return shape


def _check_mesh_and_batch(config: ml_collections.ConfigDict, num_devices: int | None,
                          section: str = "train") -> None:
    if num_devices is None:
        shape = _mesh_dims(config)
    else:
        shape = resolve_mesh_shape(config, num_devices)
    _check_axis_rules(config.mesh.logical_axis_rules)
    train = _get(config, section)
    batch, accum = train.global_batch_size, train.grad_accum_steps
    if batch % accum:
        raise _error(
            f"{section}.global_batch_size",
            batch,
            f"is not divisible by config.{section}.grad_accum_steps = {accum}",
            "make it a multiple of grad_accum_steps",
        )
    if shape["data"] == -1 or shape["fsdp"] == -1:
        return  # the data-parallel size depends on the device count, which was not given
    data_parallel = shape["data"] * shape["fsdp"]
    if (batch // accum) % data_parallel:
        split = "" if accum == 1 else f"split into {accum} microbatches of {batch // accum} "
        devices = "" if num_devices is None else f" on {num_devices} devices"
        raise _error(
            f"{section}.global_batch_size",
            batch,
            f"{split}is not divisible by the data-parallel size config.mesh.data * "
            f"config.mesh.fsdp = {shape['data']} * {shape['fsdp']} = {data_parallel}{devices}",
            f"use a multiple of {data_parallel * accum}, or change the mesh",
        )


def _check_axis_rules(rules: Sequence) -> None:
    key = "mesh.logical_axis_rules"
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise _error(
                f"{key}[{i}]", rule, "must be a (logical_name, mesh_axes) pair",
                "write it like ('embed', 'fsdp')",
            )
        targets = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
        if rule[1] is not None and not all(t in MESH_AXES for t in targets):
            raise _error(
                f"{key}[{i}]",
                rule,
                f"must map to a mesh axis in {MESH_AXES}, a tuple of them, or None",
                "use only those names",
            )
    missing = [name for name in LOGICAL_AXES if name not in {rule[0] for rule in rules}]
    if missing:
        raise ConfigError(
            f"config.{key} has no rule for logical axis {missing[0]!r}; every one of "
            f"{LOGICAL_AXES} needs one. Fix: add a pair such as ({missing[0]!r}, None) to "
            "replicate it."
        )


def _check_names(key: str, names: Sequence, known: Sequence[str], what: str) -> None:
    """A non-empty tuple of distinct names from `known` (stages, conditions, splits)."""
    if not names:
        raise _error(key, names, "is empty", f"name at least one of {tuple(known)}")
    for name in names:
        if name not in known:
            hint = ""
            if "," in str(name):
                hint = (f" (several {what}s are a tuple: --config.{key}=\"('{known[0]}',"
                        f"'{known[1]}')\")")
            raise _error(
                key,
                tuple(names),
                f"has unknown {what} {name!r}; the {what}s are {', '.join(known)}{hint}",
                "use only those names",
            )
    if len(set(names)) != len(names):
        raise _error(key, tuple(names), f"names a {what} twice", f"list each {what} once")


def _check_frozen(patterns: Sequence, section: str = "train") -> None:
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            raise _error(f"{section}.frozen[{i}]", pattern, "must be a string",
                         "write regular expressions over parameter paths, e.g. 'text_encoder/.*'")
        try:
            re.compile(pattern)
        except re.error as e:
            raise _error(f"{section}.frozen[{i}]", pattern, f"is not a regular expression ({e})",
                         "fix the pattern") from None


def _get(config: ml_collections.ConfigDict, key: str) -> object:
    """The value at a dotted key such as 'train.steps'."""
    value = config
    for name in key.split("."):
        value = value[name]
    return value


def _dotted_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every group and leaf key of config, dotted."""
    keys = []
    for name, value in config.items():
        keys.append(prefix + name)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_dotted_keys(value, prefix + name + "."))
    return keys


def _unknown_key_error(key: str, schema: ml_collections.ConfigDict) -> ConfigError:
    """Error for a key the schema lacks, suggesting the same name in another group
    (`train.patch_size` -> `model.patch_size`), else the closest sibling, else the closest name."""
    parent, _, name = key.rpartition(".")
    siblings = list((_get(schema, parent) if parent else schema).keys())
    by_name = {}
    for dotted in sorted(_dotted_keys(schema), key=lambda k: k.count(".")):
        by_name.setdefault(dotted.rpartition(".")[2], dotted)
    if name in by_name:
        close = [by_name[name]]
    else:
        close = [
            f"{parent}.{match}" if parent else match
            for match in difflib.get_close_matches(name, siblings, n=1)
        ]
        close = close or [by_name[m] for m in difflib.get_close_matches(name, list(by_name), n=1)]
    if close:
        fix = f"did you mean config.{close[0]}?"
    else:
        fix = f"the keys of {'config.' + parent if parent else 'config'} are: {', '.join(siblings)}."
    return ConfigError(
        f"config.{key} is not a known key; {fix} "
        "(All keys and their defaults: pewm_jax/config.py default_config().)"
    )


def _error(key: str, value: object, problem: str, fix: str) -> ConfigError:
    """One message: the dotted key, its value, what is wrong, and how to fix it."""
    return ConfigError(f"config.{key} = {value!r} {problem}. Fix: {fix}.")
