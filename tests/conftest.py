"""Shared test set-up: 8 fake CPU devices (for sharding tests) and the golden reference files."""

import json
import os
import pathlib

# Must precede the first use of the JAX backend; harmless for single-device tests.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
# Tests run on CPU; libtpu (the 'test' extra) is there only for ahead-of-time TPU compiles (tests/aot_test.py).
# These keep JAX off the TPU plugin and libtpu from probing for a TPU host.
from jit_jax import LIBTPU_PLACEHOLDERS  # noqa: E402

for _key, _value in LIBTPU_PLACEHOLDERS + (('JAX_PLATFORMS', 'cpu'), ('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')):
    os.environ.setdefault(_key, _value)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')  # parity tolerances assume exact fp32 matmuls

GOLDEN = pathlib.Path(__file__).resolve().parent / 'golden'


def load_golden(name: str) -> dict:
    """A golden .npz as a dict, with `config` parsed and `params` holding the state_dict (no `param/`)."""
    path = GOLDEN / f'{name}.npz'
    if not path.is_file():
        raise FileNotFoundError(f'golden file {path} is missing (tests/golden ships with the repository)')
    with np.load(path) as data:
        out = {k: data[k] for k in data.files}
    out['config'] = json.loads(str(out.pop('config_json')))
    out['params'] = {k[len('param/'):]: v for k, v in out.items() if k.startswith('param/')}
    return out


def nhwc(x: np.ndarray) -> np.ndarray:
    """Golden images are NCHW (the PyTorch layout); jit_jax is NHWC. Works on leading extra axes too."""
    return np.moveaxis(x, -3, -1)


def rel_err(got, want) -> float:
    """max |got - want| / max |want|: the relative error figure the parity tests report."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


@pytest.fixture
def golden():
    return load_golden
