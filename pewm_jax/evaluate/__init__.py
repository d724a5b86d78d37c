"""Closed-loop evaluation from checkpoints: the built-in world's conditions and report
(`closed_loop`); Meta-World's is `pewm_jax.evaluate.metaworld`."""
