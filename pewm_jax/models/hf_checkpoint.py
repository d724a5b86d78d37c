"""Reading Hugging Face safetensors checkpoints from a local directory (shared by the SigLIP
text tower and the PaliGemma planner converters)."""

from __future__ import annotations

import json
import pathlib


class CheckpointMismatchError(ValueError):
    """A checkpoint lacks tensors the model needs, has ones it does not know, or mis-shaped ones."""


def tensor_files(path: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of a checkpoint: the shards of its index, or model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / shard for shard in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
