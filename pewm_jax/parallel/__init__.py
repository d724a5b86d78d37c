"""Parallelism: how batches and parameters are laid out on the device mesh."""

from pewm_jax.parallel.global_batch import batch_sharding, make_global_batch

__all__ = ["batch_sharding", "make_global_batch"]
