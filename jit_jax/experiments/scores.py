"""Figures that score a trained JiT on the synthetic shapes without any downloaded network.

1. Held-out x-space denoising MSE at t in T_GRID: the network's output converted to x (Table 1), on the
   same held-out images and the same noise for every model. It is what the paper's argument is about: can
   the network recover the clean image from z_t.
2. Sample quality of class-conditional CFG samples (same labels and start noise for every model):
   * nn_rmse: per-pixel RMSE from each sample to its nearest neighbour among `num_reference` real images.
     Noise left in a sample, or a broken shape, moves it off the data manifold and raises this; a good
     sample sits as close to the reference set as a held-out real image does (the `real` baseline).
   * fd_rp: Frechet distance between samples and reference images in a fixed random orthonormal
     projection of pixel space (RP_DIM dims). A random projection weighs all frequencies alike, so it
     sees residual noise (too much variance), blur or collapse (too little) and colour shifts (means),
     which the nearest-neighbour figure does not: it is about the distribution, not single images.
   * nn_label_acc: the fraction of samples whose nearest real neighbour has the requested class; a
     weak, background-dominated check that conditioning works, reported with its real baseline.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jit_jax import diffusion, sampling
from jit_jax.data import synthetic

T_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)
# Data seeds of jit_jax.data.synthetic.SyntheticShapes: training uses seed 0 (the pipeline's source), so
# these streams hold images the network never saw.
HELDOUT_SEED = 1
REFERENCE_SEED = 2
NOISE_SEED = 1234  # held-out denoising noise
SAMPLE_SEED = 4321  # sampler start noise
PROJECTION_SEED = 99
RP_DIM = 64


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Sizes of the evaluation."""

    num_heldout: int = 200  # held-out images for the denoising MSE and the real baselines (20 per class)
    num_reference: int = 5000  # real images the samples are compared with
    samples_per_class: int = 20  # 200 samples, the same count as the held-out baseline
    sampler_steps: int = 0  # 0 = the config's sampler.num_steps
    strip_per_class: int = 1  # samples per class shown in the figure


def render_set(seed: int, count: int, num_classes: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """count images of the synthetic stream `seed` in [-1, 1] (the pipeline's scaling), labels balanced."""
    source = synthetic.SyntheticShapes(num_examples=count, image_size=image_size, num_classes=num_classes,
                                       seed=seed)
    examples = [source[i] for i in range(count)]
    images = np.stack([e['image'] for e in examples]).astype(np.float32) / np.float32(127.5) - 1.0
    return images, np.array([e['label'] for e in examples], np.int32)  # f32[n, h, w, c], i32[n]


def random_projection(dim: int, out_dim: int, seed: int) -> np.ndarray:
    """f64[dim, out_dim] with orthonormal columns: a fixed random subspace of pixel space."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, out_dim)))
    return q.astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) for features a f[n, k], b f[m, k].

    The symmetric form needs only eigh (no scipy sqrtm), and stays real for rank-deficient covariances.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, u = np.linalg.eigh(cov_a)
    root_a = (u * np.sqrt(np.clip(w, 0.0, None))) @ u.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sum(np.sqrt(np.clip(cross, 0.0, None)))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)


def nearest_neighbours(queries: np.ndarray, reference: np.ndarray,
                       block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per query (f[n, d]) the per-pixel RMSE to its nearest reference row (f[m, d]) and that row's index."""
    q = np.asarray(queries, np.float64)
    r = np.asarray(reference, np.float64)
    r_sq = np.sum(r * r, axis=1)
    dists, index = [], []
    for start in range(0, len(q), block):
        chunk = q[start:start + block]
        d2 = np.sum(chunk * chunk, axis=1)[:, None] + r_sq[None] - 2.0 * chunk @ r.T  # f[b, m]
        best = np.argmin(d2, axis=1)
        index.append(best)
        dists.append(np.sqrt(np.clip(d2[np.arange(len(chunk)), best], 0.0, None) / q.shape[1]))
    return np.concatenate(dists), np.concatenate(index)


@functools.partial(nnx.jit, static_argnames=('pred', 't_eps'))
def _denoise(model: Any, x: jax.Array, e: jax.Array, t: jax.Array, y: jax.Array, *, pred: str,
             t_eps: float) -> jax.Array:
    """The network's estimate of x from z_t = t x + (1 - t) e, whatever space it predicts in (Table 1)."""
    z = diffusion.interpolate(x, e, t)  # f32[b, h, w, c]
    return diffusion.convert_output(model(z, t, y), z, t, pred=pred, space='x', t_eps=t_eps)


class Scorer:
    """Real data and the fixed draws every model is scored against (built once per run)."""

    def __init__(self, image_size: int, num_classes: int, settings: EvalSettings):
        self.settings = settings
        self.num_classes = num_classes
        heldout = settings.num_heldout - settings.num_heldout % num_classes
        if heldout < num_classes:
            raise ValueError(f'num_heldout={settings.num_heldout} must hold at least one image per class '
                             f'({num_classes})')
        self.heldout, self.heldout_labels = render_set(HELDOUT_SEED, heldout, num_classes, image_size)
        self.reference, self.reference_labels = render_set(REFERENCE_SEED, settings.num_reference, num_classes,
                                                           image_size)
        self.noise = np.random.default_rng(NOISE_SEED).normal(size=self.heldout.shape).astype(np.float32)
        dim = int(np.prod(self.heldout.shape[1:]))
        self.projection = random_projection(dim, min(RP_DIM, dim), PROJECTION_SEED)
        self.reference_flat = self.reference.reshape(len(self.reference), -1)
        self.reference_features = self.reference_flat @ self.projection
        self.sample_labels = np.repeat(np.arange(num_classes, dtype=np.int32), settings.samples_per_class)
        # The floor of the sample figures: held-out real images scored exactly like samples. Same count
        # as the samples (when possible), so the small-sample bias of the Frechet distance is shared.
        floor = self.heldout[:len(self.sample_labels)]
        self.real = self.image_figures(floor, self.heldout_labels[:len(floor)])

    def image_figures(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """nn_rmse, nn_label_acc and fd_rp of images f32[n, h, w, c] in [-1, 1] with requested labels."""
        flat = images.reshape(len(images), -1).astype(np.float64)
        dist, index = nearest_neighbours(flat, self.reference_flat)
        return {'nn_rmse': float(np.mean(dist)),
                'nn_label_acc': float(np.mean(self.reference_labels[index] == labels)),
                'fd_rp': frechet_distance(flat @ self.projection, self.reference_features)}

    def denoising_mse(self, model: Any, flow: diffusion.FlowSpec) -> dict[str, float]:
        """Mean x-space squared error per t on the held-out set (same images and noise for every model)."""
        out = {}
        for t in T_GRID:
            x_hat = _denoise(model, jnp.asarray(self.heldout), jnp.asarray(flow.noise_scale * self.noise),
                             jnp.full((len(self.heldout),), t, jnp.float32), jnp.asarray(self.heldout_labels),
                             pred=flow.pred, t_eps=flow.t_eps)
            out[f'{t:g}'] = float(np.mean((np.asarray(x_hat, np.float64) - self.heldout) ** 2))
        return out

    def score(self, model: Any, flow: diffusion.FlowSpec, spec: sampling.SamplerSpec,
              image_shape: tuple[int, int, int]) -> tuple[dict[str, Any], np.ndarray]:
        """Every figure of `model` (call under the model's mesh); returns (figures, samples u8[n, h, w, c])."""
        figures: dict[str, Any] = {'mse': self.denoising_mse(model, flow)}
        figures['mse_mean'] = float(np.mean(list(figures['mse'].values())))
        if self.settings.sampler_steps:
            spec = dataclasses.replace(spec, num_steps=self.settings.sampler_steps)
        out = sampling.sample_from_seed(model, jnp.asarray(self.sample_labels), jax.random.key(SAMPLE_SEED), spec,
                                        image_shape, flow.noise_scale)
        pixels = np.asarray(jax.device_get(sampling.to_uint8(out)))
        # Score the exported uint8 images, the same quantisation the real images have.
        figures.update(self.image_figures(pixels.astype(np.float32) / np.float32(127.5) - 1.0, self.sample_labels))
        return figures, pixels
