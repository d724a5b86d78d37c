"""Flax NNX models: the space-time video DiT, the SGG conditioner and the world model."""

from pewm_jax.models.sgg_conditioner import SGGConditioner
from pewm_jax.models.video_dit import VideoDiT, WorldModel

__all__ = ["SGGConditioner", "VideoDiT", "WorldModel"]
