"""Mid: the model size benchmarks measure on one CPU or one GPU.

Large enough for realistic step time and MFU, small enough for a single device. Used by:
    pewm run --config=configs/mid.py --workdir=runs/mid
and by the scripts under benchmarks/ (they pass --config=configs/mid.py).
"""

import ml_collections

from pewm_jax.config import ConfigError, default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The mid-size config; it takes no `:arg`."""
    if arg:
        raise ConfigError(f"configs/mid.py takes no ':arg', got {arg!r}.")
    config = default_config()

    # 64x64 frames in 8x8 patches: 64 tokens per frame, 9 frames per clip (1 context + 8).
    config.model.width = 384
    config.model.depth = 8
    config.model.num_heads = 6

    config.train.global_batch_size = 16
    return config
