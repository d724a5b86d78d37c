"""Analytic FLOP count of the world model's velocity network (`WorldModel.__call__`).

Counts matrix multiplications and attention (2 FLOPs per multiply-add), the terms that
dominate; norms, activations, softmax and positional encodings are left out (under 1% at
configs/mid.py). The network is the video DiT plus the SGG conditioner, given text embeddings:
the text encoder is not included (it is its own module), and the embeddings are treated as an
input, not differentiated.

Forward, per dense layer with m input rows: 2 m d_in d_out. Per attention: 2 * 2 Q K D (scores
and the weighted sum of values, over all heads). Backward: a dense layer costs 2x its forward
(input gradient and weight gradient), except layers whose input is data (the patch
embeddings of x_t, context and heatmaps, the first time-MLP layer, the text projection), which
need only the weight gradient (1x); attention costs 2x its forward (gradients of both
operands of each product). No rematerialisation: `remat` recomputes the forward in the
backward pass, which this count does not include.

With B clips, C context frames, T' = horizon / tubelet token frames, F = C + T', S patches per
frame, D width, M MLP width, L text tokens (+1 null token), per block forward:
    2 B D 9D                                   adaLN modulation
  + 2 * 4 B F S D^2 + 4 B F S^2 D              spatial attention (q, k, v, out; S x S)
  + 2 * 4 B F S D^2 + 4 B S F^2 D              temporal attention (F x F)
  + 2 * 2 B F S D^2 + 2 * 2 B (L+1) D^2 + 4 B F S (L+1) D    cross-attention to text
  + 2 * 2 B F S D M                            MLP
plus the embeddings, time MLP, SGG conditioner (two layers + one injection per block) and the
output head.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from pewm_jax.models.video_dit import TIME_FEATURES


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward pass and of one forward + backward pass (gradients w.r.t. params)."""

    forward: float
    forward_backward: float


def world_model_flops(config: ml_collections.ConfigDict, batch_size: int, *,
                      horizon: int | None = None, text_tokens: int | None = None,
                      image_size: int | None = None, text_width: int | None = None) -> FlopCount:
    """FLOPs of `WorldModel.__call__` (DiT + SGG conditioner) on `batch_size` clips.

    horizon, text_tokens, image_size and text_width (the text encoder's output width) default
    to config.data.horizon, config.data.max_text_tokens, config.world.image_size and
    config.model.text_width.
    """
    m = config.model
    b, d, p, k = batch_size, m.width, m.patch_size, m.tubelet
    hidden = int(d * m.mlp_ratio)
    n = image_size or config.world.image_size
    frames = (horizon or config.data.horizon) // k  # T'
    f = config.data.context_frames + frames  # F
    s = (n // p) ** 2  # S
    keys = (text_tokens or config.data.max_text_tokens) + 1  # L + 1 (null token)

    dense = []  # (rows, d_in, d_out, input needs a gradient)
    attention = []  # (queries x keys x D summed over the batch)
    dense += [(b * frames * s, k * p * p * 3, d, False),  # video patch embedding
              (b * config.data.context_frames * s, p * p * 3, d, False),  # context embedding
              (b, TIME_FEATURES, d, False), (b, d, d, True),  # time MLP
              (b * (keys - 1), text_width or m.text_width, d, False),  # text projection
              (b * s, p * p * 2, d, False), (b * s, d, d, True)]  # SGG embedding MLP
    dense += [(b * s, d, d, True)] * m.depth  # SGG injections
    for _ in range(m.depth):
        dense += [(b, d, 9 * d, True)]  # adaLN modulation
        dense += [(b * f * s, d, d, True)] * 8  # spatial + temporal q, k, v, out
        dense += [(b * f * s, d, d, True)] * 2 + [(b * keys, d, d, True)] * 2  # cross q, out; k, v
        dense += [(b * f * s, d, hidden, True), (b * f * s, hidden, d, True)]  # MLP
        attention += [b * f * s * s * d, b * s * f * f * d, b * f * s * keys * d]
    dense += [(b, d, 2 * d, True), (b * frames * s, d, k * p * p * 3, True)]  # output head

    forward = sum(2 * r * i * o for r, i, o, _ in dense) + sum(2 * 2 * a for a in attention)
    backward = (sum(2 * r * i * o * (2 if dx else 1) for r, i, o, dx in dense)
                + sum(2 * 2 * 2 * a for a in attention))
    return FlopCount(forward=float(forward), forward_backward=float(forward + backward))
