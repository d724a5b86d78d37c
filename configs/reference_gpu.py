"""Reference GPU: every model of the closed loop trained and evaluated in one 10-minute command on
one H100 (the time a lent GPU allows a command):

    pewm run --config=configs/reference_gpu.py --workdir=runs/reference_gpu

Sized by FLOPs, not yet measured (no GPU has been lent to this project so far): the world model
(64x64 frames in 4x4 patches: 256 tokens per frame, width 384, 8 blocks) costs 10.2 TFLOP per
train step of 32 clips (`pewm_jax.models.flops`), so 3000 steps are 31 PFLOP, 1.7 minutes at 30%
of the H100's dense bfloat16 peak (989 TFLOP/s); the whole-task baseline spends the same FLOPs;
the action decoder and planner are small beside them. With data generation, compilation and
the evaluation (5 episodes per template and split, every condition) the estimate is 6 to 8
minutes. Its report goes into the README's results table, with the command, hardware and date,
once it has run.
"""

import ml_collections

from pewm_jax.config import ConfigError, default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The reference GPU config; it takes no `:arg`."""
    if arg:
        raise ConfigError(f"configs/reference_gpu.py takes no ':arg', got {arg!r}.")
    config = default_config()
    config.run.stages = ("data", "train", "whole_task", "actions", "planner", "eval")

    config.data.num_train_episodes = 2000
    config.data.num_val_episodes = 50
    config.data.num_test_episodes = 50
    config.data.num_holdout_episodes = 50
    config.data.generation_workers = 8
    config.data.num_workers = 4

    config.model.patch_size = 4
    config.model.width = 384
    config.model.depth = 8
    config.model.num_heads = 6
    config.model.dtype = "bfloat16"

    config.train.steps = 3000
    config.train.global_batch_size = 32
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 200
    config.train.checkpoint_every = 1000
    config.train.sample_every = 1000
    config.train.log_every = 50

    config.action_decoder.train.steps = 2000
    config.action_decoder.train.global_batch_size = 64
    config.action_decoder.dtype = "bfloat16"

    config.planner.train.steps = 3000
    config.planner.train.global_batch_size = 64
    config.planner.dtype = "bfloat16"

    config.eval.episodes_per_template = 5
    config.eval.parallel_envs = 32
    config.eval.video_clips = 128
    return config
