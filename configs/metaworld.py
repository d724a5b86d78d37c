"""Meta-World: the primitive world model and action decoder on the benchmark's expert
demonstrations (needs `pip install -e '.[metaworld]'`).

    pewm run --config=configs/metaworld.py --workdir=runs/metaworld          # CPU, 64 px
    pewm run --config=configs/metaworld.py:128 --workdir=runs/metaworld_128  # the protocol's size

`pewm run` generates the demonstrations (11 tasks x 20 seeds x 3 cameras; resumable), then trains
the world model and the action decoder on their primitive clips. The argument is the rendered
frame size; the models' patches grow with it so the token count stays the same.
"""

import ml_collections

from pewm_jax.config import ConfigError, default_config

SIZES = {"64": 8, "128": 16}  # frame size -> patch size of the world model and action decoder


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The Meta-World config; `arg` is the frame size, 64 (default) or 128."""
    size = arg or "64"
    if size not in SIZES:
        raise ConfigError(f"configs/metaworld.py takes a frame size, one of {list(SIZES)}; got "
                          f"{arg!r}. Fix: --config=configs/metaworld.py:128")
    config = default_config()
    config.data.generator = "metaworld"
    config.world.image_size = int(size)
    config.model.patch_size = config.action_decoder.patch_size = SIZES[size]

    # Expert segments last 5-60 steps: 8 frames every 4 steps cover most of one.
    config.data.horizon = 8
    config.data.frame_stride = 4
    config.data.max_text_tokens = 16
    config.metaworld.train_seeds = 20
    config.metaworld.val_seeds = 2
    config.metaworld.test_seeds = 2

    # The quickstart's world model, a little wider: the scenes are richer than the tabletop's.
    config.model.width = 128
    config.model.depth = 2
    config.model.num_heads = 4
    config.model.text_width = 64
    config.model.text_depth = 1
    config.model.text_num_heads = 2
    config.diffusion.num_steps = 8

    config.train.steps = 600
    config.train.global_batch_size = 8
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 50
    config.train.checkpoint_every = 200
    config.train.keep_checkpoints = 2
    config.train.log_every = 20
    config.train.sample_every = 200

    config.action_decoder.train.steps = 500
    config.action_decoder.train.global_batch_size = 16
    config.action_decoder.train.checkpoint_every = 250
    config.action_decoder.train.sample_every = 250

    config.action_decoder.eval_splits = ("test",)
    config.run.stages = ("data", "train", "actions")
    return config
