"""Parallelism: how batches and parameters are laid out on the device mesh.

The package itself imports nothing, so `pewm-compile` can set JAX's environment before JAX
loads (`topologies` does not import JAX)."""
