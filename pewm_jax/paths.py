"""Paths a user types: resolved once, at the command-line edge, against the current directory.

Orbax, TensorStore and the worker processes of data generation need absolute local paths, and a
relative one would mean something else to a process started in another directory. So the CLIs
(`pewm`, `pewm-compile`, the policy server) and `config.load_config` pass every path a user
gives through `resolve`, and no module below them sees a relative path. Remote paths
(`gs://...`, any `scheme://`) are left as they are. Standard library only: the bundle runtime
and the server import this without any training package.
"""

from __future__ import annotations

import os


def is_remote(path: str) -> bool:
    """Whether `path` names a remote location (`gs://bucket/x`, `s3://...`), not a local file."""
    return "://" in path


def resolve(path: str | os.PathLike | None) -> str | None:
    """`path` as an absolute local path (`~` expanded, `..` folded), or unchanged when it is
    remote, empty or None. Symlinks are kept: a run directory reached through one stays there."""
    if path is None:
        return None
    text = os.fspath(path)
    if not text or is_remote(text):
        return text
    return os.path.abspath(os.path.expanduser(text))
