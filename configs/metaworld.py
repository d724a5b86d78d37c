"""Meta-World: the primitive world model, action decoder and planner on the benchmark's expert
demonstrations, evaluated in closed loop (needs `pip install -e '.[metaworld]'`).

    pewm run --config=configs/metaworld.py --workdir=runs/metaworld          # CPU, reduced
    pewm run --config=configs/metaworld.py:128 --workdir=runs/metaworld_128  # GPU, full protocol

`pewm run` generates the demonstrations (resumable), trains the world model, the action decoder
and the planner on them, then runs the closed-loop evaluation.
- Default (a CPU): 64-pixel frames; demonstrations and the reduced protocol cover 3 tasks
  (door-open, button-press-topdown, handle-press) from the `corner` camera, 5 seeds each.
- `:128`: the AVDC protocol's frames and episodes: 11 tasks x 3 cameras x 25 seeds, and
  demonstrations of all of them; the models' patches grow with the frame so the token count
  stays the same. Sized for a GPU host.
"""

import ml_collections

from pewm_jax.config import ConfigError, default_config

SIZES = {"64": 8, "128": 16}  # frame size -> patch size of the world model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The Meta-World config; `arg` is the frame size, 64 (default) or 128."""
    size = arg or "64"
    if size not in SIZES:
        raise ConfigError(f"configs/metaworld.py takes a frame size, one of {list(SIZES)}; got "
                          f"{arg!r}. Fix: --config=configs/metaworld.py:128")
    config = default_config()
    config.data.generator = "metaworld"
    config.world.image_size = int(size)
    config.model.patch_size = SIZES[size]

    # Expert segments last 5-60 steps: 8 frames every 4 steps cover most of one.
    config.data.horizon = 8
    config.data.frame_stride = 4
    config.data.max_text_tokens = 16
    config.metaworld.train_seeds = 20
    config.metaworld.val_seeds = 2
    config.metaworld.test_seeds = 2
    if size == "64":  # the reduced protocol, and demonstrations of just what it evaluates
        config.metaworld.tasks = ("door-open", "button-press-topdown", "handle-press")
        config.metaworld.cameras = ("corner",)
        config.metaworld.eval_tasks = config.metaworld.tasks
        config.metaworld.eval_cameras = config.metaworld.cameras
        config.metaworld.eval_seeds = 5

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

    config.planner.train.steps = 1000
    config.planner.train.global_batch_size = 16
    config.planner.train.checkpoint_every = 500
    config.planner.train.sample_every = 500
    config.planner.eval_splits = ("test",)

    config.eval.parallel_envs = 5
    config.run.stages = ("data", "train", "actions", "planner", "eval")
    return config
