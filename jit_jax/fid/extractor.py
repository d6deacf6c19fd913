"""`load_inception(FILE)`: uint8 images of any size and batch -> pool3 features, on every local device.

Two jitted programs: the preprocessing (cast, TF1 resize to 299, scale), compiled once per input size
and cheap to compile, and the network, compiled once for a fixed chunk of `batch_size` rows. Each chunk
is split over a one-axis mesh of this process's devices (NamedSharding on the batch axis, weights
replicated); the last chunk is zero-padded to the chunk size, so any number of images reuses the same
program. A call with fewer images than a chunk is padded only to the next power of two (times the device
count) instead: on 2 CPU cores a 200-row chunk takes about 25 s whatever it holds, so 25 images padded to
200 would cost 8x their own time; each such size compiles once. Chunks are dispatched ahead and their
results copied to the host two chunks behind, so the device never waits for a host copy. In a multi-host run every process embeds its own images with its
own devices; no collective is involved.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jit_jax.fid import inception, weights

_LAG = 2  # chunks in flight before the oldest result is copied to the host


class InceptionExtractor:
    """Callable: images u8[n, h, w, 3] (numpy or jax) -> f32[n, d] pool3 features (d = 2048).

    `extractor(images, logits=True)` returns (features, logits) where logits are torch-fidelity's
    'logits_unbiased' (the input of its Inception Score); only weights with the fc layer have them
    (`has_logits`), otherwise IS is unavailable and asking for logits is an error.
    """

    def __init__(self, model: inception.InceptionV3, *, batch_size: int = 200, devices=None,
                 meta: dict[str, Any] | None = None):
        devices = list(jax.local_devices() if devices is None else devices)
        self.mesh = Mesh(np.array(devices), ('batch',))
        n = len(devices)
        self.batch_size = max(n, -(-int(batch_size) // n) * n)  # a multiple of the device count
        self.meta = dict(meta or {})
        self.has_logits = model.fc is not None
        self.num_features = model.num_features
        self._rows = NamedSharding(self.mesh, P('batch'))
        replicated = NamedSharding(self.mesh, P())
        graphdef, params = nnx.split(model)
        self._params = jax.device_put(params, replicated)

        def forward(params, x):
            return nnx.merge(graphdef, params)(x)

        self._forward = jax.jit(forward, in_shardings=(replicated, self._rows), out_shardings=self._rows)
        self._preprocess = jax.jit(inception.preprocess, out_shardings=self._rows)

    def _check(self, images: Any) -> tuple[int, ...]:
        shape = tuple(np.shape(images))
        dtype = np.dtype(getattr(images, 'dtype', np.asarray(images).dtype))
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f'Inception input must be NHWC RGB images u8[n, h, w, 3]; got shape {shape}')
        if dtype != np.uint8:
            raise ValueError(f'Inception input must be uint8 (0..255, as written to PNG); got {dtype}. '
                             'Convert samples with jit_jax.sampling.to_uint8 first')
        return shape

    def chunk_size(self, num_images: int) -> int:
        """Rows per network call for `num_images`: the full chunk, or for a smaller call the next power
        of two multiple of the device count that holds it."""
        devices = self.mesh.devices.size
        size = devices
        while size < min(num_images, self.batch_size):
            size *= 2
        return min(size, self.batch_size)

    def _chunks(self, images: Any):
        n = np.shape(images)[0]
        size = self.chunk_size(n)
        for start in range(0, n, size):
            chunk = images[start:start + size]
            rows = chunk.shape[0]
            if rows < size:
                pad = [(0, size - rows)] + [(0, 0)] * 3
                chunk = np.pad(np.asarray(chunk), pad) if isinstance(chunk, np.ndarray) else \
                    jax.numpy.pad(chunk, pad)
            yield rows, jax.device_put(chunk, self._rows)

    @property
    def output_keys(self) -> tuple[str, ...]:
        return ('pool3', 'logits_unbiased', 'logits') if self.has_logits else ('pool3',)

    def dispatch(self, images: Any) -> list[tuple[int, dict]]:
        """Start the network on `images` (validated); returns handles for `collect`, without waiting.

        Lets a caller queue the Inception behind other device work (the sampler) and fetch it later.
        """
        self._check(images)
        with jax.set_mesh(self.mesh):
            return [(rows, self._forward(self._params, self._preprocess(chunk))) for rows, chunk in
                    self._chunks(images)]

    def collect(self, pending: list[tuple[int, dict]]) -> dict[str, np.ndarray]:
        keys = self.output_keys
        if not pending:
            return {k: np.zeros((0, self.num_features if k == 'pool3' else inception.NUM_LOGITS), np.float32)
                    for k in keys}
        fetched = [(rows, jax.device_get({k: out[k] for k in keys})) for rows, out in pending]
        return {k: np.concatenate([np.asarray(out[k])[:rows] for rows, out in fetched]).astype(np.float32)
                for k in keys}

    def outputs(self, images: Any) -> dict[str, np.ndarray]:
        """Every output the weights have: 'pool3' and, with fc, 'logits_unbiased' and 'logits'."""
        self._check(images)
        collected: list[dict[str, np.ndarray]] = []
        pending: list[tuple[int, dict]] = []
        with jax.set_mesh(self.mesh):
            for rows, chunk in self._chunks(images):
                pending.append((rows, self._forward(self._params, self._preprocess(chunk))))
                if len(pending) > _LAG:  # copy the oldest result while later chunks run
                    collected.append(self.collect(pending[:1]))
                    pending = pending[1:]
        collected.append(self.collect(pending))
        return {k: np.concatenate([c[k] for c in collected]) for k in self.output_keys}

    def __call__(self, images: Any, *, logits: bool = False):
        if logits and not self.has_logits:
            raise ValueError(f"Inception weights {self.meta.get('path', '')} have no fc layer, so logits "
                             'and the Inception Score are unavailable (convert torch-fidelity or pytorch-fid '
                             '.pth weights to get them)')
        out = self.outputs(images)
        return (out['pool3'], out['logits_unbiased']) if logits else out['pool3']


def build_model(params: dict[str, np.ndarray], meta: dict[str, Any], precision: str = 'highest'
                ) -> inception.InceptionV3:
    """The NNX network holding `params` (names and shapes already checked by weights.load)."""
    model = nnx.eval_shape(lambda: inception.InceptionV3(width=float(meta.get('width', 1.0)),
                                                         logits='fc.kernel' in params, precision=precision))
    graphdef, state = nnx.split(model)
    nested = traverse_util.unflatten_dict({tuple(k.split('.')): v for k, v in params.items()})
    nnx.replace_by_pure_dict(state, nested)
    return nnx.merge(graphdef, state)


def load_inception(path: str | os.PathLike, *, batch_size: int = 200, precision: str = 'highest',
                   devices=None) -> InceptionExtractor:
    """The FID feature extractor from a weights file (local or gs://) made by `python -m jit_jax.fid
    prepare|convert`.

    precision: matmul / convolution precision; 'highest' keeps float32 on TPUs and GPUs (whose defaults
    use bfloat16 / TF32 passes, which move FID in the second decimal).
    """
    params, meta = weights.load(path)
    meta['path'] = str(path)
    return InceptionExtractor(build_model(params, meta, precision), batch_size=batch_size, devices=devices,
                              meta=meta)
