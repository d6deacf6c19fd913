"""Read PyTorch files (torch.save state dicts, TorchScript archives) into numpy, without torch.

Two container formats exist:
  zip (torch >= 1.6 and every TorchScript archive): `<root>/data.pkl` is a pickle whose tensors refer,
      through pickle persistent ids ('storage', <StorageClass>, key, location, numel), to raw
      little-endian storages stored as `<root>/data/<key>`;
  legacy (torch.save before 1.6, e.g. older released .pth files): a stream of pickles (magic number,
      protocol, system info, the object, the storage keys) followed by each storage as an int64 element
      count and its bytes.
In both, a tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`, which becomes a
strided numpy view of the storage. TorchScript modules (`__torch__.*` classes) become `ScriptObject`s
holding their attribute dict. Any other class in the pickle is refused (nothing else gets executed).
"""

from __future__ import annotations

import pathlib
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class ScriptObject:
    """A TorchScript module from an archive: `type_name` ('__torch__.inceptionv3.Conv2dLayer') + attributes."""

    type_name = ''

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {'state': state})

    def __repr__(self) -> str:
        return f'ScriptObject({self.type_name})'


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *unused) -> np.ndarray:
    size, stride = tuple(size), tuple(stride)
    if not size:
        return storage[offset].copy()
    if any(s == 0 for s in size):
        return np.zeros(size, storage.dtype)
    itemsize = storage.dtype.itemsize
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if extent > storage.size:
        raise ValueError(f'tensor of size {size} / stride {stride} at offset {offset} overruns its storage '
                         f'of {storage.size} elements')
    # A view: a legacy file's storage bytes are read after the pickle; load() copies at the end.
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * itemsize for s in stride), writeable=False)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
    return data


# TorchScript pickles wrap typed lists and tagged values in these helpers; the values pass through.
_SCRIPT_HELPERS = {'build_intlist': list, 'build_doublelist': list, 'build_boollist': list,
                   'build_tensorlist': list, 'build_genericlist': list,
                   'restore_type_tag': lambda value, type_str: value}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, load_storage, path):
        super().__init__(file)
        self._load_storage = load_storage
        self._path = path
        self._script_types: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == 'collections' and name == 'OrderedDict':
            import collections  # pylint: disable=import-outside-toplevel
            return collections.OrderedDict
        if module == 'torch._utils' and name == '_rebuild_tensor_v2':
            return _rebuild_tensor
        if module == 'torch._utils' and name == '_rebuild_parameter':
            return _rebuild_parameter
        if module == 'torch.jit._pickle' and name in _SCRIPT_HELPERS:
            return _SCRIPT_HELPERS[name]
        if module == 'torch' and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module.startswith('__torch__'):
            full = f'{module}.{name}'
            if full not in self._script_types:
                self._script_types[full] = type(name, (ScriptObject,), {'type_name': full})
            return self._script_types[full]
        raise pickle.UnpicklingError(
            f'{self._path}: refusing to load {module}.{name}; only tensors, state dicts and TorchScript '
            'modules are read (save a state_dict(), not a whole nn.Module)')

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage'):
            raise pickle.UnpicklingError(f'{self._path}: unexpected persistent id {pid!r}')
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f'{self._path}: unsupported storage type {storage_type!r}')
        return self._load_storage(str(key), storage_type.dtype, int(numel))


def _load_zip(path: pathlib.Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
        if not pickles:
            raise ValueError(f'{path}: a zip without <root>/data.pkl is not a PyTorch file')
        root = pickles[0][:-len('data.pkl')]
        order = archive.read(f'{root}byteorder').decode() if f'{root}byteorder' in names else 'little'
        if order != 'little':
            raise ValueError(f'{path}: big-endian storages are not supported')
        cache: dict[str, np.ndarray] = {}

        def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            if key not in cache:
                raw = archive.read(f'{root}data/{key}')
                if len(raw) < numel * dtype.itemsize:
                    raise ValueError(f'{path}: storage {key} holds {len(raw)} bytes, fewer than {numel} '
                                     f'elements of {dtype}')
                cache[key] = np.frombuffer(raw, dtype, count=numel)
            return cache[key]

        with archive.open(f'{root}data.pkl') as f:
            return _Unpickler(f, load_storage, path).load()


def _load_legacy(path: pathlib.Path) -> Any:
    with open(path, 'rb') as f:
        try:
            magic = pickle.load(f)
        except Exception as error:  # pylint: disable=broad-except
            raise ValueError(f'{path}: neither a zip nor a legacy torch.save file ({error})') from None
        if magic != _LEGACY_MAGIC:
            raise ValueError(f'{path}: not a PyTorch file (bad magic number)')
        if pickle.load(f) != _LEGACY_PROTOCOL:
            raise ValueError(f'{path}: unsupported legacy torch.save protocol')
        pickle.load(f)  # system info (endianness, type sizes)
        pending: dict[str, tuple[np.dtype, int, np.ndarray]] = {}

        def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            # Filled in place once the raw bytes, which follow the object pickle, have been read.
            if key not in pending:
                pending[key] = (dtype, numel, np.empty(numel, dtype))
            return pending[key][2]

        obj = _Unpickler(f, load_storage, path).load()
        keys = pickle.load(f)
        for key in keys:
            dtype, numel, buffer = pending[str(key)]
            (count,) = struct.unpack('<q', f.read(8))
            if count != numel:
                raise ValueError(f'{path}: storage {key} has {count} elements, expected {numel}')
            buffer[...] = np.frombuffer(f.read(numel * dtype.itemsize), dtype, count=numel)
    return obj


def _copy_tensors(obj: Any) -> Any:
    """Replace every storage view by its own contiguous copy (views share one buffer per storage)."""
    if isinstance(obj, np.ndarray):
        return np.array(obj)
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _copy_tensors(obj[k])
        return obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_tensors(v) for v in obj)
    if isinstance(obj, ScriptObject):
        obj.__dict__.update({k: _copy_tensors(v) for k, v in obj.__dict__.items()})
    return obj


def load(path: str | pathlib.Path) -> Any:
    """The object a .pt / .pth file holds, tensors as numpy arrays (TorchScript modules as ScriptObjects)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: no such file')
    return _copy_tensors(_load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path))


def named_tensors(obj: Any, prefix: str = '') -> dict[str, np.ndarray]:
    """Flatten a state dict or a TorchScript module tree into {'a.b.weight': array}."""
    out: dict[str, np.ndarray] = {}
    items = obj.__dict__.items() if isinstance(obj, ScriptObject) else obj.items() if isinstance(obj, dict) else ()
    for key, value in items:
        name = f'{prefix}{key}'
        if isinstance(value, np.ndarray):
            out[name] = value
        elif isinstance(value, (dict, ScriptObject)):
            out.update(named_tensors(value, f'{name}.'))
    return out


def script_attributes(obj: Any, prefix: str = '') -> dict[str, Any]:
    """Non-tensor attributes of a TorchScript module tree ({'layers.conv.stride': 2, ...})."""
    out: dict[str, Any] = {}
    if not isinstance(obj, ScriptObject):
        return out
    for key, value in obj.__dict__.items():
        name = f'{prefix}{key}'
        if isinstance(value, ScriptObject):
            out.update(script_attributes(value, f'{name}.'))
        elif not isinstance(value, np.ndarray):
            out[name] = value
    return out
