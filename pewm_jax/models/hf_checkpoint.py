"""Reading Hugging Face safetensors checkpoints from a local directory into our NNX variables.

Shared by the SigLIP text tower (`models/text_encoder.py`) and the PaliGemma planner
(`recipes/paligemma_checkpoints.py`): each declares a table from our parameter paths to checkpoint tensor names
and a conversion kind; `SafetensorsIndex.load` checks the whole table against the checkpoint
(every missing, unexpected or mis-shaped tensor named in one error) and then streams the
tensors in one at a time, so peak host memory stays near one copy of the weights.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Collection, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

Shape = tuple[int, ...]
# How a checkpoint tensor becomes our parameter and back: (its checkpoint shape given our shape,
# our array given the tensor and our shape, the tensor given our array). torch.nn.Linear stores
# (out, in); Conv2d stores (out, in, kh, kw).
CONVERSIONS: dict[str, tuple[Callable[[Shape], Shape], Callable[[Any, Shape], Any],
                             Callable[[np.ndarray], np.ndarray]]] = {
    "copy": (lambda s: s, lambda w, s: w, lambda a: a),
    "linear": (lambda s: s[::-1], lambda w, s: w.T, lambda a: a.T),  # (out, in) <-> (in, out)
    "linear_to_heads": (lambda s: (s[1] * s[2], s[0]), lambda w, s: w.T.reshape(s),
                        lambda a: a.reshape(a.shape[0], -1).T),  # (H*E, D) <-> (D, H, E)
    "bias_to_heads": (lambda s: (s[0] * s[1],), lambda w, s: w.reshape(s),
                      lambda a: a.reshape(-1)),  # (H*E,) <-> (H, E)
    "linear_from_heads": (lambda s: (s[2], s[0] * s[1]), lambda w, s: w.T.reshape(s),
                          lambda a: a.reshape(-1, a.shape[-1]).T),  # (D, H*E) <-> (H, E, D)
    "conv_to_patch": (lambda s: (s[3], s[2], s[0], s[1]), lambda w, s: w.transpose(2, 3, 1, 0),
                      lambda a: a.transpose(3, 2, 0, 1)),  # (Dv, C, p, p) <-> (p, p, C, Dv)
}


# A SigLIP encoder layer (`layers.EncoderBlock`, in both towers): our path inside the block ->
# (Hugging Face tensor name inside `encoder.layers.{i}.`, conversion).
SIGLIP_ENCODER_LAYER: dict[tuple[str, ...], tuple[str, str]] = {
    ("norm1", "scale"): ("layer_norm1.weight", "copy"),
    ("norm1", "bias"): ("layer_norm1.bias", "copy"),
    ("norm2", "scale"): ("layer_norm2.weight", "copy"),
    ("norm2", "bias"): ("layer_norm2.bias", "copy"),
    ("attn", "query", "kernel"): ("self_attn.q_proj.weight", "linear_to_heads"),
    ("attn", "query", "bias"): ("self_attn.q_proj.bias", "bias_to_heads"),
    ("attn", "key", "kernel"): ("self_attn.k_proj.weight", "linear_to_heads"),
    ("attn", "key", "bias"): ("self_attn.k_proj.bias", "bias_to_heads"),
    ("attn", "value", "kernel"): ("self_attn.v_proj.weight", "linear_to_heads"),
    ("attn", "value", "bias"): ("self_attn.v_proj.bias", "bias_to_heads"),
    ("attn", "out", "kernel"): ("self_attn.out_proj.weight", "linear_from_heads"),
    ("attn", "out", "bias"): ("self_attn.out_proj.bias", "copy"),
    ("mlp", "up", "kernel"): ("mlp.fc1.weight", "linear"),
    ("mlp", "up", "bias"): ("mlp.fc1.bias", "copy"),
    ("mlp", "down", "kernel"): ("mlp.fc2.weight", "linear"),
    ("mlp", "down", "bias"): ("mlp.fc2.bias", "copy"),
}


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


class SafetensorsIndex:
    """Where each tensor of a checkpoint directory lives and its shape (no tensor is read)."""

    def __init__(self, path: pathlib.Path):
        self.files = tensor_files(path)
        self.where: dict[str, pathlib.Path] = {}  # tensor name -> its file
        self.shapes: dict[str, Shape] = {}
        for file in self.files:
            with safe_open(file, framework="flax") as f:
                for name in f.keys():
                    self.where[name] = file
                    self.shapes[name] = tuple(f.get_slice(name).get_shape())

    def load(self, variables: Mapping[tuple, nnx.Variable], table: Mapping[tuple, tuple[str, str]],
             *, skipped: Collection[str], describe: str, param_dtype: Any) -> None:
        """Sets every variable (our path -> abstract variable) from the tensor `table` names for
        it, converted by its kind (our path -> (tensor name, CONVERSIONS kind)).

        Checks first: raises CheckpointMismatchError, message `describe: <problems>`, listing
        missing, unexpected (not in the table nor `skipped`) and mis-shaped tensors.
        """
        missing, misshaped = [], []
        for our_path, variable in variables.items():
            name, kind = table[our_path]
            expected = CONVERSIONS[kind][0](tuple(variable.shape))
            if name not in self.where:
                missing.append(name)
            elif self.shapes[name] != expected:
                misshaped.append(f"{name} has shape {self.shapes[name]}, expected {expected}")
        used = {table[p][0] for p in variables}
        unexpected = sorted(set(self.where) - used - set(skipped))
        problems = [f"{label}: {', '.join(items)}" for label, items in (
            ("missing tensors", sorted(missing)), ("unexpected tensors", unexpected),
            ("mis-shaped tensors", sorted(misshaped))) if items]
        if problems:
            raise CheckpointMismatchError(f"{describe}: " + "; ".join(problems))
        for file in self.files:
            with safe_open(file, framework="flax") as f:
                for our_path, variable in variables.items():
                    name, kind = table[our_path]
                    if self.where[name] == file:
                        value = CONVERSIONS[kind][1](f.get_tensor(name), tuple(variable.shape))
                        variable.set_value(jnp.asarray(value, param_dtype))
