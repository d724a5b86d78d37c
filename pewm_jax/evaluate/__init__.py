"""Evaluation from checkpoints: the action decoder's error on held-out clips (closed-loop
evaluation joins it)."""
