"""The toy experiment's data: a 2-D spiral, embedded isometrically into D dimensions.

A 1-D manifold of zero thickness, so "distance to the data" is well defined (curve_scores measures it), and a
fixed column-orthogonal P (D x 2) hides it in D dimensions without changing any distance: x_D = P x_2,
x_2 = P^T x_D.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# The spiral: 1.5 turns, theta in [THETA_MIN, THETA_MAX], radius proportional to theta and scaled so that
# the outer end sits at SPIRAL_RADIUS. With radius 2 the 2-D data has roughly unit std per axis, like
# images in [-1, 1], and neighbouring arms are 1.0 apart: well separated against N(0, 1) noise at t=0.
THETA_MIN = math.pi
THETA_MAX = 4.0 * math.pi
SPIRAL_RADIUS = 2.0


def spiral_points(u: jax.Array) -> jax.Array:  # f32[n] in [0, 1] -> f32[n, 2]
    """Maps u uniformly to arc length (approximately): theta grows like sqrt(u) because the arc element
    of r ~ theta is ~theta dtheta, so uniform u gives evenly spread points instead of a dense centre."""
    theta = jnp.sqrt(THETA_MIN**2 + u * (THETA_MAX**2 - THETA_MIN**2))
    radius = SPIRAL_RADIUS * theta / THETA_MAX
    return jnp.stack([radius * jnp.cos(theta), radius * jnp.sin(theta)], axis=-1)


def sample_spiral(key: jax.Array, n: int) -> jax.Array:  # -> f32[n, 2]
    """n i.i.d. points on the (noise-free) spiral: a 1-D manifold, so distances to it are well defined."""
    return spiral_points(jax.random.uniform(key, (n,)))


def reference_curve(n: int) -> np.ndarray:  # -> f32[n, 2]
    """Dense, evenly parameterised points on the curve, the yardstick of manifold_distance."""
    return np.asarray(spiral_points(jnp.linspace(0.0, 1.0, n)))


def projection(dim: int, seed: int) -> np.ndarray:  # -> f32[dim, 2]
    """Column-orthogonal embedding: QR of a Gaussian, so P^T P = I and x_D = P x_2 preserves distances.
    Computed in float64 numpy so that the orthogonality holds to ~1e-7 in float32."""
    gauss = np.random.default_rng([seed, dim]).standard_normal((dim, 2))
    q, r = np.linalg.qr(gauss)
    q = q * np.sign(np.diag(r))[None, :]  # fix the sign so P does not depend on the LAPACK build
    return q.astype(np.float32)


def embed(x2: jax.Array, proj: jax.Array) -> jax.Array:  # f32[n, 2], f32[D, 2] -> f32[n, D]
    return x2 @ proj.T


def unembed(xd: jax.Array, proj: jax.Array) -> jax.Array:  # f32[n, D], f32[D, 2] -> f32[n, 2]
    return xd @ proj
