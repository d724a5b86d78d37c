"""Scoring from checkpoints: the closed loop and its report (`closed_loop`), sampled clips
against the truth (`video_quality`), the action decoder on held-out clips (`actions`)."""
