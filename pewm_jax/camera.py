"""Pinhole camera projection: world points to image pixels (DESIGN.md "Coordinates": pixel
centres at +0.5). Bottom layer, numpy only: RLDS ingestion projects the end effector with it,
Meta-World's environment its tool centre and objects."""

from __future__ import annotations

import numpy as np


def project_points(points: np.ndarray, intrinsics: np.ndarray,
                   extrinsics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World (N, 3) -> pixels (N, 2) (x, y; pixel centres at +0.5) and (N,) in-front mask."""
    p = np.asarray(points, np.float64).reshape(-1, 3)
    cam = (np.asarray(extrinsics) @ np.concatenate([p, np.ones((len(p), 1))], 1).T).T[:, :3]
    in_front = cam[:, 2] > 1e-9
    uvw = (np.asarray(intrinsics) @ cam.T).T
    z = np.where(in_front, uvw[:, 2], 1.0)
    return (uvw[:, :2] / z[:, None] + 0.5), in_front
