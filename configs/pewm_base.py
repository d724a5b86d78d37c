"""PEWM base: the full-scale world model, for a TPU pod slice or a GPU node.

`get_config(arg)` takes a topology preset (default 'v5p-128'):
    v5p-128  64 TPU v5p chips: mesh data -1 (= 4) x fsdp 16, global batch 512, remat 'dots'
    v5e-256  256 TPU v5e chips: mesh data -1 (= 16) x fsdp 16, global batch 512, remat 'full'
    h100x8   8 H100 GPUs:      mesh fsdp 8,              global batch 64,  remat 'full'
Used by, e.g. on every host of a v5p-128 slice (see launch/):
    pewm run --config=configs/pewm_base.py:v5p-128 --workdir=gs://BUCKET/runs/pewm_base

Parameter count (w = width 1024, t = text_width 768, 24 blocks): per block, adaLN-zero
modulation 9w^2 + spatial, temporal and cross-attention 12w^2 + MLP 8w^2 + SGG injection w^2
= 30w^2 ~ 31.5M; 24 blocks ~ 755M; text encoder 6 layers x 12t^2 ~ 42M. pewm-compile counts
807M: 3.2 GB in float32, ~13 GB with EMA and two Adam moments, sharded by fsdp. Its report for
each preset (memory per chip, FLOPs, projected clips/s) is in the README ("Pod readiness").
"""

import ml_collections

from pewm_jax.config import apply_topology_preset, default_config

# preset -> (mesh data, mesh fsdp, mesh tensor, global batch, remat policy)
PRESETS = {
    "v5p-128": (-1, 16, 1, 512, "dots"),
    "v5e-256": (-1, 16, 1, 512, "full"),
    "h100x8": (-1, 8, 1, 64, "full"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The base config for topology preset `arg` ('v5p-128' when not given)."""
    config = default_config()

    # 256x256 frames in 16x16 patches: 256 tokens per frame, 17 frames per clip (1 context + 16).
    config.world.image_size = 256
    config.data.horizon = 16
    config.data.frame_stride = 2  # 16 frames x 2 steps = world.primitive_max_steps
    config.data.num_train_episodes = 100_000
    config.data.num_val_episodes = 1000
    config.data.num_test_episodes = 1000
    config.data.num_holdout_episodes = 1000
    config.data.num_workers = 8

    config.model.patch_size = 16
    config.model.width = 1024
    config.model.depth = 24
    config.model.num_heads = 16
    config.model.text_width = 768
    config.model.text_depth = 6
    config.model.text_num_heads = 12
    config.model.dtype = "bfloat16"

    config.diffusion.sgg_sigma_px = 8.0  # 2 px at 64x64, scaled to 256x256
    config.whole_task.horizon = 32  # the whole-task baseline: 32 frames x 2 steps = 64 steps

    config.train.steps = 200_000
    config.train.warmup_steps = 5000
    config.train.ema_decay = 0.9999
    config.train.checkpoint_every = 2000
    config.train.keep_checkpoints = 5
    config.train.log_every = 100
    config.train.sample_every = 5000

    config.planner.dtype = "bfloat16"
    config.action_decoder.dtype = "bfloat16"
    return apply_topology_preset(config, PRESETS, arg, "configs/pewm_base.py")
