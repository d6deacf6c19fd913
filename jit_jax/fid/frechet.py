"""Fréchet distance, Inception Score and the mu/sigma statistics files they are computed from.

The statistics file format is the one torch-fidelity's `fid_statistics_file` and the official JiT
evaluation (`fid_stats/jit_in256_stats.npz`) use: an .npz with `mu` (f64[d]) and `sigma` (f64[d, d]),
the mean and the unbiased (ddof = 1, `np.cov(rowvar=False)`) covariance of pool3 features. Such a file
works here as is, and ours work there.
"""

from __future__ import annotations

import os

import numpy as np
from etils import epath

from jit_jax.fid import storage


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric
    matrix S1^(1/2) S2 S1^(1/2) (same spectrum as S1 S2). Two symmetric eigendecompositions replace the
    general (Schur-based) sqrtm: about 10x faster at d = 2048, and exact to rounding on rank-deficient
    covariances (fewer samples than dimensions), where sqrtm(S1 S2) returns complex noise. Round-off that
    makes an eigenvalue of a positive semi-definite matrix slightly negative is clipped to 0.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    for name, value, shape in (('mu1', mu1, (d,)), ('mu2', mu2, (d,)), ('sigma1', sigma1, (d, d)),
                               ('sigma2', sigma2, (d, d))):
        if value.shape != shape:
            raise ValueError(f'frechet_distance: {name} has shape {value.shape}; expected {shape} '
                             f'(mu1 has {d} dimensions)')
        if not np.all(np.isfinite(value)):
            raise ValueError(f'frechet_distance: {name} holds NaN or infinite values')
    sigma1 = 0.5 * (sigma1 + sigma1.T)
    sigma2 = 0.5 * (sigma2 + sigma2.T)
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S1^(1/2)
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh(0.5 * (middle + middle.T))
    tr_covmean = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def stats_from_features(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of f32[n, d] features, exactly as torch-fidelity computes them (float64, ddof = 1)."""
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f'features must be [n, d] with n >= 2; got shape {features.shape}')
    return np.mean(features, axis=0, dtype=np.float64), np.cov(features, rowvar=False)


class RunningStats:
    """mu and sigma accumulated batch by batch in float64, so 50k x 2048 features never sit in memory.

    Sums are taken around a shift (the first batch's mean) to keep the covariance's cancellation small;
    the result equals `stats_from_features` of all rows to about 1e-12 relative.
    """

    def __init__(self):
        self.count = 0
        self._shift = None
        self._sum = None
        self._outer = None

    def add(self, features: np.ndarray) -> None:
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f'features must be [n, d]; got shape {x.shape}')
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros_like(self._shift)
            self._outer = np.zeros((x.shape[1], x.shape[1]))
        x = x - self._shift
        self.count += x.shape[0]
        self._sum += x.sum(axis=0)
        self._outer += x.T @ x

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f'statistics need at least 2 feature rows; got {self.count}')
        mean = self._sum / self.count
        sigma = (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return self._shift + mean, 0.5 * (sigma + sigma.T)


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> epath.Path:
    """Write the torch-fidelity / official .npz (keys mu, sigma; float64) to a local or gs:// path."""
    return storage.save_npz(path, {'mu': np.asarray(mu, np.float64), 'sigma': np.asarray(sigma, np.float64)})


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a statistics .npz (official `fid_stats/*.npz`, torch-fidelity, or save_stats)."""
    path = storage.as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f'reference statistics {path}: no such file')
    data = storage.load_npz(path)
    missing = [k for k in ('mu', 'sigma') if k not in data]
    if missing:
        raise ValueError(f'reference statistics {path}: missing key(s) {missing}; expected an .npz with '
                         f'mu [d] and sigma [d, d] (found {sorted(data)})')
    mu, sigma = np.asarray(data['mu'], np.float64), np.asarray(data['sigma'], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f'reference statistics {path}: mu has shape {mu.shape} and sigma {sigma.shape}; '
                         'expected [d] and [d, d]')
    return mu, sigma


def inception_score(logits: np.ndarray, splits: int = 10, shuffle: bool = True,
                    seed: int = 2020) -> tuple[float, float]:
    """(mean, std) of exp(E_x KL(p(y|x) || p(y))) over `splits` chunks, as torch-fidelity computes it.

    `logits` are torch-fidelity's 'logits_unbiased' (pool3 @ fc.weight^T, no bias), the layer its IS
    uses; rows are shuffled with np.random.RandomState(2020) first, as there.
    """
    x = np.asarray(logits, np.float64)
    if x.ndim != 2 or x.shape[0] < splits:
        raise ValueError(f'logits must be [n, classes] with n >= splits={splits}; got shape {x.shape}')
    n = x.shape[0]
    if shuffle:
        x = x[np.random.RandomState(seed).permutation(n)]
    log_p = x - np.max(x, axis=1, keepdims=True)
    log_p = log_p - np.log(np.sum(np.exp(log_p), axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        q = p[lo:hi].mean(axis=0, keepdims=True)
        kl = np.sum(p[lo:hi] * (log_p[lo:hi] - np.log(q)), axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
