"""PEWM large: a ~1.7B-parameter world model for a v5p-1024-class pod.

`get_config(arg)` takes a topology preset (default 'v5p-1024'):
    v5p-1024  512 TPU v5p chips: mesh data -1 (= 8) x fsdp 64, global batch 2048, remat 'dots'
Used by, on every host of the slice (see launch/):
    pewm run --config=configs/pewm_large.py:v5p-1024 --workdir=gs://BUCKET/runs/pewm_large
Check that it compiles and fits before queueing (README "Pod readiness"):
    pewm-compile --config=configs/pewm_large.py:v5p-1024 --topology=v5p-1024

The data, diffusion and training settings are pewm_base's; the DiT is wider (1536, 12 heads of
128). Parameters, per block 30w^2 (modulation 9w^2, three attentions 12w^2, MLP 8w^2, SGG w^2),
24 blocks ~ 1.70B, plus the text encoder ~ 42M: pewm-compile prints the exact count.
"""

import pathlib

import ml_collections

from pewm_jax.config import apply_topology_preset, config_file_function

_BASE = str(pathlib.Path(__file__).with_name("pewm_base.py"))

# preset -> (mesh data, mesh fsdp, mesh tensor, global batch, remat policy)
PRESETS = {
    "v5p-1024": (-1, 64, 1, 2048, "dots"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The large config for topology preset `arg` ('v5p-1024' when not given)."""
    config = config_file_function(_BASE, _BASE)()
    config.model.width = 1536
    config.model.num_heads = 12
    return apply_topology_preset(config, PRESETS, arg, "configs/pewm_large.py")
