"""Scores of the toy's samples against its data: a 1-D curve in a 2-D plane inside D dimensions.

numpy only: they run once per cell on a few thousand points. manifold_distance says how close samples
are to the curve, sliced_w1 whether they also cover it evenly, off_manifold how far D-dim samples leave
the plane that holds the data.
"""

from __future__ import annotations

import numpy as np


def manifold_distance(samples: np.ndarray, curve: np.ndarray, block: int = 500) -> float:
    """Mean distance from each 2-D sample to its nearest reference point on the curve. Chunked so the
    (samples x curve) distance matrix never exceeds block x len(curve) floats."""
    samples = np.asarray(samples, np.float64)
    curve = np.asarray(curve, np.float64)
    curve_sq = np.sum(curve**2, axis=1)
    nearest = []
    for start in range(0, len(samples), block):
        s = samples[start:start + block]
        d2 = np.sum(s**2, axis=1)[:, None] - 2.0 * s @ curve.T + curve_sq[None, :]
        nearest.append(np.sqrt(np.maximum(d2.min(axis=1), 0.0)))
    return float(np.mean(np.concatenate(nearest)))


def sliced_w1(a: np.ndarray, b: np.ndarray, num_directions: int, seed: int) -> float:
    """Sliced Wasserstein-1 between two equal-size 2-D point sets: in 1-D, W1 between empirical
    measures of equal size is the mean |difference| of the sorted values, averaged over directions.
    Unlike manifold_distance it also penalises samples that pile onto one part of the curve."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f'sliced_w1 needs equal-size sets; got {a.shape} and {b.shape}')
    angles = np.random.default_rng(seed).uniform(0.0, np.pi, num_directions)
    dirs = np.stack([np.cos(angles), np.sin(angles)], axis=0)  # f64[2, k]
    pa = np.sort(a @ dirs, axis=0)
    pb = np.sort(b @ dirs, axis=0)
    return float(np.mean(np.abs(pa - pb)))


def off_manifold(xd: np.ndarray, proj: np.ndarray) -> float:
    """Mean ||x - P P^T x||: how far D-dim samples leave the plane that holds the data. eps- and v-pred
    fail here first, because the noise they must predict lives in all D dimensions."""
    xd = np.asarray(xd, np.float64)
    proj = np.asarray(proj, np.float64)
    resid = xd - (xd @ proj) @ proj.T
    return float(np.mean(np.linalg.norm(resid, axis=1)))
