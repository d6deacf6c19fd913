"""Metric writing for the training loop: clu's writers when TensorFlow is there, a plain fallback when not.

Why two paths: clu.metric_writers (and clu.periodic_actions, which imports it) cannot be imported
without TensorFlow and TensorBoard (its package __init__ imports the TF summary writer), yet the
default run on procedural data needs nothing from TensorFlow. Requiring it made `pip install jit_jax`
pull 1.5 GB of tensorflow-cpu, which also fights the `tensorflow` build Colab ships. So TensorFlow is
the optional extra `jit_jax[tf]` (setup.py) and:

* with TensorFlow + TensorBoard: clu's default writer (console + TensorBoard event files in the workdir)
  and clu's ReportProgress (steps/s, ETA), as before;
* without: console logging and the same progress line, with a one-time warning that no event files
  are written.

Both paths also append every scalar to `<workdir>/metrics.jsonl` (one JSON object per write: step and
values), a file anything can read: the Colab notebook plots its loss curve from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath

METRICS_FILE = 'metrics.jsonl'


def tensorboard_available() -> bool:
    """True when clu.metric_writers imports, i.e. TensorFlow and TensorBoard are installed."""
    try:
        from clu import metric_writers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        return False
    return True


class JsonlWriter:
    """The scalars of a clu MetricWriter as JSON lines in `path` (local or gs://); other summaries are ignored.

    Lines are buffered and appended at flush (clu's writers flush when the loop logs): a local file is opened
    in append mode, a remote one (object stores cannot append) is rewritten with the new lines at its end.
    """

    def __init__(self, path: str | os.PathLike | None):
        self._path = None if path is None else epath.Path(path)  # None: write nothing (hosts but the first)
        self._lines: list[str] = []
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if self._path is not None:
            values = {k: float(np.asarray(v)) for k, v in scalars.items()}
            self._lines.append(json.dumps({'step': int(step), **values}) + '\n')

    def write_summaries(self, step, values, metadata=None):  # pylint: disable=unused-argument
        pass

    def write_images(self, step, images):  # pylint: disable=unused-argument
        pass

    def write_videos(self, step, videos):  # pylint: disable=unused-argument
        pass

    def write_audios(self, step, audios, *, sample_rate):  # pylint: disable=unused-argument
        pass

    def write_texts(self, step, texts):  # pylint: disable=unused-argument
        pass

    def write_histograms(self, step, arrays, num_buckets=None):  # pylint: disable=unused-argument
        pass

    def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):  # pylint: disable=unused-argument
        pass

    def write_hparams(self, hparams):  # pylint: disable=unused-argument
        pass

    def flush(self) -> None:
        if self._path is None or not self._lines:
            return
        new, self._lines = ''.join(self._lines), []
        if '://' not in os.fspath(self._path):
            with open(self._path, 'a', encoding='utf-8') as f:
                f.write(new)
        else:
            self._path.write_text((self._path.read_text() if self._path.exists() else '') + new)

    def close(self) -> None:
        self.flush()


class _LogWriter(JsonlWriter):
    """No TensorFlow: scalars to the console (as clu's LoggingWriter prints them) and to metrics.jsonl."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        logging.info('[%d] %s', step, ', '.join(f'{k}={float(np.asarray(v)):.6g}' for k, v in scalars.items()))
        super().write_scalars(step, scalars)


class _Progress:
    """No TensorFlow: clu ReportProgress's steps/s and ETA line, and its timed(name) context."""

    def __init__(self, num_train_steps: int, writer: Any, every_steps: int):
        self.num_train_steps, self.writer, self.every_steps = num_train_steps, writer, every_steps
        self._last_step, self._last_time, self._timings = None, time.time(), {}

    def __call__(self, step: int) -> None:
        if self._last_step is None:
            self._last_step, self._last_time = step, time.time()
            return
        if step % self.every_steps and step != self.num_train_steps:
            return
        now = time.time()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        eta = (self.num_train_steps - step) / max(rate, 1e-9)
        extra = ''.join(f', {name} {seconds:.1f} s' for name, seconds in self._timings.items())
        logging.info('step %d/%d: %.2f steps/s, ETA %.0f min%s', step, self.num_train_steps, rate, eta / 60, extra)
        self.writer.write_scalars(step, {'steps_per_sec': rate})
        self._last_step, self._last_time, self._timings = step, now, {}

    @contextlib.contextmanager
    def timed(self, name: str):
        start = time.time()
        try:
            yield
        finally:
            self._timings[name] = self._timings.get(name, 0.0) + time.time() - start


def create(workdir: str | os.PathLike, *, just_logging: bool, num_steps: int, every_steps: int) -> tuple[Any, Any]:
    """(writer, progress) for a run in `workdir` (local or gs://; TensorBoard event files go through
    TensorFlow's file system); progress(step) and progress.timed(name) as clu's."""
    jsonl = epath.Path(workdir) / METRICS_FILE
    if tensorboard_available():
        from clu import metric_writers, periodic_actions  # pylint: disable=import-outside-toplevel

        if just_logging:
            writer = metric_writers.create_default_writer(just_logging=True, asynchronous=True)
        else:  # clu's default writer (console + event files), plus metrics.jsonl
            writer = metric_writers.AsyncMultiWriter([
                metric_writers.create_default_writer(os.fspath(workdir), asynchronous=False), JsonlWriter(jsonl)])
        return writer, periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                                       every_steps=every_steps)
    if not just_logging:
        logging.warning('TensorFlow / TensorBoard not installed: no TensorBoard event files; metrics go to the '
                        "console and %s (pip install 'jit_jax[tf]' for TensorBoard)", jsonl)
    writer = _LogWriter(None if just_logging else jsonl)
    return writer, _Progress(num_steps, writer, every_steps)
