"""Procedural class-conditional shapes: the default, offline, zero-download training data.

Why procedural: the repository must train and test with no network and no dataset on disk, on 2 CPU
cores. A pure-numpy source seeded per index is deterministic, needs no storage, works in Grain worker
processes and renders any resolution directly (so no crop is needed for it).

Each example is one antialiased foreground shape on a smooth background. The class picks the shape:

    0 disc      1 ring      2 square    3 triangle   4 plus
    5 star      6 crescent  7 stripes   8 two dots   9 checker (2x2)

The shapes were chosen to stay distinct under *any* rotation (so rotation can be a free latent) and to
be recognisable at 32 px. Example i has label i % num_classes (balanced classes) and is drawn from
np.random.default_rng([seed, i]), so it is the same in every process, worker and run.

Continuous latent parameters (the intrinsic dimension, INTRINSIC_DIMENSION = 18):
    shape pose (4): centre x, centre y, scale, rotation
    foreground colour (3): hue, saturation, value (value is high: the shape is bright)
    background gradient (7): colour A (3: RGB), colour B (3: RGB), gradient direction (1)
    background texture (4): sinusoid amplitude, spatial frequency, direction, phase
The count is an upper bound on the manifold dimension per class: for shapes with rotational symmetry
(disc, ring) rotation is not identifiable, and the discrete class adds no dimension.
"""

from __future__ import annotations

import colorsys

import numpy as np

NUM_SHAPES = 10
CLASS_NAMES = ('disc', 'ring', 'square', 'triangle', 'plus',
               'star', 'crescent', 'stripes', 'two_dots', 'checker')
INTRINSIC_DIMENSION = 4 + 3 + 7 + 4
# Rendering one 32 px image costs 0.25-0.5 ms of numpy, a tenth to a quarter of a default train step's CPU time at
# batch 64 on 2 cores, and a run visits every example several times; so a source keeps what it rendered
# when all of it fits in this many bytes (150 MB for the default 50,000 images at 32 px).
CACHE_BYTES = 1 << 30


def intrinsic_dimension() -> int:
    """Number of continuous latent parameters per image (see the module docstring)."""
    return INTRINSIC_DIMENSION


def _box(px: np.ndarray, py: np.ndarray, hx: float, hy: float) -> np.ndarray:
    """Exact signed distance to an axis-aligned box with half sizes (hx, hy)."""
    qx, qy = np.abs(px) - hx, np.abs(py) - hy
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0)


def _star(px: np.ndarray, py: np.ndarray, outer: float = 1.0, inner: float = 0.45) -> np.ndarray:
    """Signed distance to a 5-point star: fold the angle into one half-spike, measure to its edge."""
    sector = np.pi / 5
    phi = np.abs(np.mod(np.arctan2(py, px), 2 * sector) - sector)  # in [0, pi/5]; 0 = spike tip
    r = np.hypot(px, py)
    qx, qy = r * np.cos(phi), r * np.sin(phi)
    ax, ex, ey = outer, inner * np.cos(sector) - outer, inner * np.sin(sector)
    h = np.clip(((qx - ax) * ex + qy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    dist = np.hypot(qx - ax - ex * h, qy - ey * h)
    inside = ex * qy - ey * (qx - ax) > 0  # same side of the edge as the centre
    return np.where(inside, -dist, dist)


def shape_sdf(label: int, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) of class `label` in its own frame, unit-ish size."""
    if label == 0:
        return np.hypot(px, py) - 1.0
    if label == 1:
        return np.abs(np.hypot(px, py) - 0.72) - 0.28
    if label == 2:
        return _box(px, py, 0.8, 0.8)
    if label == 3:  # equilateral triangle, circumradius 1: max over its three edge half-planes
        angles = np.pi / 2 + np.array([0.0, 2.0, 4.0]) * np.pi / 3
        planes = [-(np.cos(a) * px + np.sin(a) * py) for a in angles]
        return np.maximum(np.maximum(planes[0], planes[1]), planes[2]) - 0.5
    if label == 4:
        return np.minimum(_box(px, py, 0.95, 0.3), _box(px, py, 0.3, 0.95))
    if label == 5:
        return _star(px, py)
    if label == 6:  # a disc with an offset disc cut out
        return np.maximum(np.hypot(px, py) - 1.0, 0.78 - np.hypot(px - 0.5, py))
    if label == 7:  # three parallel bars inside a square
        bars = np.minimum(np.minimum(np.abs(py + 0.6), np.abs(py)), np.abs(py - 0.6)) - 0.19
        return np.maximum(_box(px, py, 0.85, 0.8), bars)
    if label == 8:
        return np.minimum(np.hypot(px - 0.55, py), np.hypot(px + 0.55, py)) - 0.42
    if label == 9:  # two diagonal quadrants of a square
        diagonal = np.where(px * py > 0, -1.0, 1.0) * np.minimum(np.abs(px), np.abs(py))
        return np.maximum(_box(px, py, 0.85, 0.85), diagonal)
    raise ValueError(f'label must be in [0, {NUM_SHAPES}), got {label}')


def render(label: int, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Draws the latents from `rng` and renders one image, uint8[image_size, image_size, 3]."""
    # Latents, in the order listed in the module docstring.
    cx, cy = rng.uniform(-0.3, 0.3, size=2)
    scale = rng.uniform(0.4, 0.6)
    rotation = rng.uniform(0.0, 2 * np.pi)
    fg = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.5, 1.0), rng.uniform(0.75, 1.0)))
    color_a, color_b = rng.uniform(0.0, 0.45, size=(2, 3))
    grad_angle = rng.uniform(0.0, 2 * np.pi)
    tex_amp, tex_freq = rng.uniform(0.0, 0.08), rng.uniform(1.0, 3.0)
    tex_angle, tex_phase = rng.uniform(0.0, 2 * np.pi, size=2)

    coords = (np.arange(image_size, dtype=np.float32) + 0.5) * (2.0 / image_size) - 1.0
    y, x = np.meshgrid(coords, coords, indexing='ij')  # f32[h, w] each, in [-1, 1]

    # Background: a linear gradient from A to B plus a low-frequency sinusoid (smooth, no edges).
    g = 0.5 + 0.5 * (np.cos(grad_angle) * x + np.sin(grad_angle) * y) / np.sqrt(2.0)
    wave = tex_amp * np.sin(np.pi * tex_freq * (np.cos(tex_angle) * x + np.sin(tex_angle) * y)
                            + tex_phase)
    background = color_a + g[..., None] * (color_b - color_a) + wave[..., None]  # f32[h, w, 3]

    # Foreground: pixel -> shape frame (translate, rotate by -rotation, scale), then signed distance.
    c, s = np.cos(rotation), np.sin(rotation)
    dx, dy = x - cx, y - cy
    dist = shape_sdf(label, (c * dx + s * dy) / scale, (-s * dx + c * dy) / scale) * scale
    # Coverage ramps linearly across one pixel width: an antialiased edge at any resolution.
    alpha = np.clip(0.5 - dist * (image_size / 2.0), 0.0, 1.0)[..., None]

    image = background * (1.0 - alpha) + fg * alpha
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


class SyntheticShapes:
    """Random-access source (`len`, `[i]`) of {'image': uint8[s, s, 3], 'label': int32} examples.

    Works directly as a Grain source: `grain.MapDataset.source(SyntheticShapes())`. Images are rendered
    on first access and kept (up to CACHE_BYTES for the whole set); rendering is deterministic, so two
    reader threads that render the same index at once write the same bytes. A copy sent to a Grain worker
    process starts with an empty cache.
    """

    def __init__(self, num_examples: int = 50_000, image_size: int = 32, num_classes: int = 10,
                 seed: int = 0):
        if not 1 <= num_classes <= NUM_SHAPES:
            raise ValueError(f'num_classes must be in [1, {NUM_SHAPES}] for synthetic shapes, '
                             f'got {num_classes} (config.data.num_classes)')
        if num_examples < 1:
            raise ValueError(f'num_examples must be positive, got {num_examples}')
        if image_size < 4:
            raise ValueError(f'image_size must be >= 4, got {image_size} (config.data.image_size)')
        self.num_examples = int(num_examples)
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self._init_cache()

    def _init_cache(self) -> None:
        size = self.num_examples * self.image_size ** 2 * 3
        # np.zeros maps untouched pages lazily: memory grows with what was rendered, not with the set.
        self._cache = np.zeros((self.num_examples, self.image_size, self.image_size, 3), np.uint8) \
            if size <= CACHE_BYTES else None
        self._rendered = np.zeros(self.num_examples, bool)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ('_cache', '_rendered')}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_cache()

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f'index {index} out of range for {self.num_examples} synthetic examples')
        label = index % self.num_classes
        if self._cache is not None and self._rendered[index]:
            return {'image': self._cache[index].copy(), 'label': np.int32(label)}
        image = render(label, np.random.default_rng([self.seed, index]), self.image_size)
        if self._cache is not None:
            self._cache[index] = image
            self._rendered[index] = True
        return {'image': image, 'label': np.int32(label)}

    def __repr__(self) -> str:
        return (f'SyntheticShapes(num_examples={self.num_examples}, image_size={self.image_size}, '
                f'num_classes={self.num_classes}, seed={self.seed})')
