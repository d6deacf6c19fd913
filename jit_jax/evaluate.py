"""python -m jit_jax.evaluate --config configs/<file>.py --workdir DIR [--config.eval.x=value ...]

FID-50K (and IS when the Inception weights have the fc layer) of a checkpoint, as the official
evaluation computes it: config.eval.num_samples class-balanced samples (sample i has label
i % num_classes: 50 per class at 50k / 1000 classes), from the EMA weights (config.eval.weights:
ema1, ema2, the raw model, or a comma list), Heun / CFG as config.sampler, scored with torch-fidelity's
Inception features against config.eval.reference_stats.

Every (weights, CFG scale) pair of the sweep (config.eval.weights x config.eval.cfg_scales) samples the
same noise: sample i starts from noise_scale * N(0, 1) drawn from fold_in(key(config.eval.seed), i),
whatever the chunking, device count or host count. Work is cut into chunks of config.eval.chunk_size
images, sampled over all devices, and each chunk is written atomically (images, labels, features) under
DIR/eval/<weights>_cfg<scale>/chunks; a killed evaluation restarts at the first missing chunk and
produces the same images. Results go to DIR/eval/<run>/report.json, the scalars to DIR/eval (TensorBoard
event files, metrics.jsonl), and, for a sweep, DIR/eval/sweep.{md,json} (+ sweep.png with matplotlib).
DIR, config.eval.inception and config.eval.reference_stats may be local or gs:// (etils.epath).

The same loop, in memory and on config.eval.train_num_samples images, is the periodic FID of training
(`training_hooks`, config.eval.every_steps).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_dict

from jit_jax import config_lib, sampling, sharding, train
from jit_jax.fid import frechet, samples, storage

IS_UNAVAILABLE = 'unavailable: the Inception weights have no fc layer (convert a torch-fidelity .pth)'


@dataclasses.dataclass(frozen=True)
class Run:
    weights: str
    cfg_scale: float

    @property
    def name(self) -> str:
        return f'{self.weights}_cfg{self.cfg_scale:g}'


def runs(config: config_dict.ConfigDict) -> list[Run]:
    scales = tuple(config.eval.cfg_scales) or (config.sampler.cfg_scale,)
    return [Run(w, float(s)) for w in config_lib.eval_weights(config) for s in scales]


@functools.lru_cache(maxsize=8)
def _noise_fn(shape: tuple[int, ...], noise_scale: float, batch: NamedSharding):
    """Noise of sample i from fold_in(key, i): independent of how samples are grouped into batches."""

    def draw(key, indices):
        one = lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)  # noqa: E731
        return np.float32(noise_scale) * jax.vmap(one)(indices)

    return jax.jit(draw, in_shardings=(None, batch), out_shardings=batch)


@functools.lru_cache(maxsize=2)
def _load_inception(path: str, batch_size: int):
    """One extractor (and one compiled Inception) per weights file per process, shared by evaluations."""
    from jit_jax import fid  # pylint: disable=import-outside-toplevel

    return fid.load_inception(path, batch_size=batch_size)


class Evaluator:
    """Samples, scores and stores evaluations of one config with one Trainer (mesh, graph, sampler)."""

    def __init__(self, config: config_dict.ConfigDict, trainer: train.Trainer | None = None,
                 extractor: Any = None):
        self.config = config
        self.trainer = trainer if trainer is not None else train.Trainer(config)
        self.mesh = self.trainer.mesh
        ev = config.eval
        if extractor is None and ev.inception:
            extractor = _load_inception(ev.inception, ev.inception_batch_size)
        self.extractor = extractor
        self.reference = frechet.load_stats(ev.reference_stats) if ev.reference_stats else None
        cfg = self.trainer.model_config
        self.image_shape = (cfg.input_size, cfg.input_size, cfg.in_channels)
        self.num_classes = cfg.num_classes
        parallel = sharding.data_parallel_size(self.mesh)
        self.padded = -(-ev.chunk_size // parallel) * parallel  # rows per sampling call (one compile)
        self._batch = sharding.batch_sharding(self.mesh)

    # ---- weights
    def load_models(self, workdir: epath.Path, names: tuple[str, ...]) -> tuple[int, dict[str, Any]]:
        """(step, {name: network}) from config.eval.checkpoint or the newest checkpoint of workdir."""
        replicated = NamedSharding(self.mesh, P())
        if self.config.eval.checkpoint:
            from jit_jax import convert  # pylint: disable=import-outside-toplevel

            out = {}
            for name in names:
                graphdef, state = nnx.split(convert.load_converted(self.config.eval.checkpoint,
                                                                   'params' if name == 'model' else name))
                out[name] = nnx.merge(graphdef, jax.device_put(state, replicated))
            return 0, out
        from jit_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel

        checkpointer = ckpt_lib.Checkpointer(workdir / 'checkpoints', asynchronous=False)
        step = checkpointer.latest_step()
        if step is None:
            raise FileNotFoundError(f'no checkpoint in {checkpointer.directory}: train first, or set '
                                    'config.eval.checkpoint to a `python -m jit_jax.convert` output directory')
        ckpt_lib.check_compatible(checkpointer.read_meta(step), self.trainer.model_config,
                                  checkpointer.directory, step)
        state = checkpointer.restore(step, ckpt_lib.abstract_with_shardings(
            self.trainer.abstract_state, self.trainer.state_shardings), None)
        checkpointer.close()
        return step, {n: nnx.merge(self.trainer.graphdef, state['params'] if n == 'model' else state['ema'][n])
                      for n in names}

    # ---- sampling
    def _launch(self, model: Any, spec: sampling.SamplerSpec, start: int) -> tuple[jax.Array, Any]:
        """Dispatch one chunk (sampling, then the Inception) without waiting for either."""
        indices = np.arange(start, start + self.padded, dtype=np.int32)
        labels = jax.device_put(indices % self.num_classes, self._batch)
        noise = _noise_fn(self.image_shape, float(self.trainer.flow.noise_scale), self._batch)(
            jax.random.key(self.config.eval.seed), jax.device_put(indices, self._batch))
        with jax.set_mesh(self.mesh):
            pixels = sampling.to_uint8(sampling.sample_with_spec(model, noise, labels, spec))
        features = None
        if self.extractor is not None and pixels.is_fully_addressable:
            features = self.extractor.dispatch(pixels)  # queued behind the sampler on the same devices
        return pixels, features

    def _finish(self, pixels: jax.Array, features: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if pixels.is_fully_addressable:
            host = np.asarray(jax.device_get(pixels))
            return host, (self.extractor.collect(features) if features is not None else {})
        host = np.asarray(multihost_utils.process_allgather(pixels, tiled=True))  # every host: all rows
        if self.extractor is None:
            return host, {}
        share = len(host) // jax.process_count()  # padded is a multiple of the device count
        mine = self.extractor.outputs(host[jax.process_index() * share:][:share])
        return host, {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in mine.items()}

    def generate(self, model: Any, run: Run, num_samples: int, directory: str | os.PathLike | None = None,
                 png: bool = False) -> dict[str, Any]:
        """Sample num_samples images chunk by chunk (resuming from `directory` when given)."""
        spec = dataclasses.replace(self.trainer.sampler, cfg_scale=run.cfg_scale)
        chunk = self.config.eval.chunk_size
        starts = list(range(0, num_samples, chunk))
        is_main = jax.process_index() == 0
        done = [directory is not None and samples.chunk_path(directory, i).is_file() for i in range(len(starts))]
        done = list(np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(done, np.int32))).astype(bool)) \
            if jax.process_count() > 1 else done
        todo = [i for i in range(len(starts)) if not done[i]]
        if len(todo) < len(starts):
            logging.info('%s: %d of %d chunks already in %s, resuming', run.name, len(starts) - len(todo),
                         len(starts), directory)
        writer = samples.SampleWriter(directory, png) if directory is not None and is_main else None
        kept: dict[str, list[np.ndarray]] = {}
        t0, made = time.time(), 0
        host_s = 0.0
        pending = self._launch(model, spec, starts[todo[0]]) if todo else None
        for k, i in enumerate(todo):
            following = self._launch(model, spec, starts[todo[k + 1]]) if k + 1 < len(todo) else None
            pixels, outputs = self._finish(*pending)
            t_host = time.time()
            rows = min(chunk, num_samples - starts[i])
            arrays = {'images': pixels[:rows], 'labels': (np.arange(starts[i], starts[i] + rows) %
                                                         self.num_classes).astype(np.int32),
                      **{k_: v[:rows] for k_, v in outputs.items()}}
            if writer is not None:
                writer.submit(i, starts[i], arrays)
            elif directory is None:
                for key in ('pool3', 'logits_unbiased'):
                    if key in arrays:
                        kept.setdefault(key, []).append(arrays[key])
            host_s += time.time() - t_host
            made += rows
            rate = made / max(time.time() - t0, 1e-9)
            remaining = sum(min(chunk, num_samples - starts[j]) for j in todo[k + 1:])
            logging.info('%s: chunk %d/%d, %d images, %.2f images/s, ETA %.0f s', run.name, i + 1, len(starts),
                         made, rate, remaining / max(rate, 1e-9))
            pending = following
        if writer is not None:
            writer.close()
        seconds = time.time() - t0
        return {'kept': kept, 'num_chunks': len(starts), 'new_images': made, 'seconds': seconds,
                'images_per_sec': made / seconds if made else None, 'host_seconds': host_s}

    # ---- scoring
    def score(self, pool3: np.ndarray | frechet.RunningStats, logits: np.ndarray | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.reference is not None:
            stats = pool3 if isinstance(pool3, frechet.RunningStats) else None
            if stats is None:
                stats = frechet.RunningStats()
                stats.add(pool3)
            out['fid'] = frechet.frechet_distance(*stats.result(), *self.reference)
        if self.extractor is not None:
            if logits is not None and len(logits):
                out['inception_score_mean'], out['inception_score_std'] = frechet.inception_score(logits)
            else:
                out['inception_score'] = IS_UNAVAILABLE
        return out

    def evaluate_run(self, model: Any, run: Run, directory: epath.Path, step: int) -> dict[str, Any]:
        ev = self.config.eval
        outputs = {x.strip() for x in ev.output.split(',') if x.strip()}
        info = self.generate(model, run, ev.num_samples, directory, png='png' in outputs)
        report: dict[str, Any] = {'run': run.name, 'weights': run.weights, 'cfg_scale': run.cfg_scale,
                                  'step': step, 'num_samples': ev.num_samples, 'directory': str(directory)}
        if jax.process_index() == 0:
            n = info['num_chunks']
            stats, logits = frechet.RunningStats(), []
            for i in range(n):
                data = samples.load_chunk(directory, i)
                if 'pool3' in data:
                    stats.add(data['pool3'])
                if 'logits_unbiased' in data:
                    logits.append(data['logits_unbiased'])
            if self.extractor is not None:
                report.update(self.score(stats, np.concatenate(logits) if logits else None))
            if 'npz' in outputs:
                def chunks():
                    for i in range(n):
                        data = samples.load_chunk(directory, i)
                        yield data['images'], data['labels']
                report['npz'] = str(samples.write_npz(directory / 'samples.npz', chunks(), ev.num_samples,
                                                      self.image_shape))
            report.update(images_per_sec=info['images_per_sec'], sampling_seconds=info['seconds'],
                          host_seconds_in_loop=info['host_seconds'],
                          sampler=dataclasses.asdict(dataclasses.replace(self.trainer.sampler,
                                                                         cfg_scale=run.cfg_scale)),
                          inception=getattr(self.extractor, 'meta', None), reference_stats=ev.reference_stats)
            (directory / 'report.json').write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
        return report


def evaluate(config: config_dict.ConfigDict, workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every run of the sweep; returns their reports (and writes them, the table and the scalars: TensorBoard
    event files when TensorFlow is installed, and DIR/eval/metrics.jsonl). `workdir`: local or gs://."""
    from jit_jax import writers  # pylint: disable=import-outside-toplevel

    workdir = storage.as_path(workdir)
    evaluator = Evaluator(config)
    plan = runs(config)
    step, models = evaluator.load_models(workdir, tuple(dict.fromkeys(r.weights for r in plan)))
    is_main = jax.process_index() == 0
    writer, _ = writers.create(workdir / 'eval', just_logging=not is_main, num_steps=1, every_steps=1)
    reports = []
    for run in plan:
        report = evaluator.evaluate_run(models[run.weights], run, workdir / 'eval' / run.name, step)
        scalars = {f'{run.name}/{k}': report[k] for k in ('fid', 'inception_score_mean') if k in report}
        if scalars:
            writer.write_scalars(step, scalars)
        logging.info('%s: %s', run.name, {k: report.get(k) for k in ('fid', 'inception_score_mean')})
        reports.append(report)
    writer.close()
    if is_main and len(plan) > 1:
        write_sweep(workdir / 'eval', reports)
    return reports


def write_sweep(directory: epath.Path, reports: list[dict[str, Any]]) -> epath.Path:
    """sweep.json, a Markdown table of FID (rows: CFG scale, columns: weights) and, with matplotlib, sweep.png."""
    metric = 'fid' if all('fid' in r for r in reports) else None
    (directory / 'sweep.json').write_text(json.dumps(reports, indent=2, sort_keys=True, default=str))
    names = list(dict.fromkeys(r['weights'] for r in reports))
    scales = sorted({r['cfg_scale'] for r in reports})
    table = {(r['weights'], r['cfg_scale']): r for r in reports}
    lines = ['| CFG scale | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
    for s in scales:
        cells = []
        for w in names:
            r = table.get((w, s))
            cells.append('' if r is None else f"{r[metric]:.3f}" if metric else r['directory'])
        lines.append(f'| {s:g} | ' + ' | '.join(cells) + ' |')
    path = directory / 'sweep.md'
    path.write_text(f"{'FID' if metric else 'samples'} by CFG scale and weights\n\n" + '\n'.join(lines) + '\n')
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel

        matplotlib.use('Agg')
        from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
        logging.info('matplotlib is not installed (pip install jit_jax[plots]): table only')
        return path
    if metric:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for w in names:
            pts = sorted((s, table[(w, s)][metric]) for s in scales if (w, s) in table)
            ax.plot(*zip(*pts), marker='o', label=w)
        ax.set_xlabel('CFG scale')
        ax.set_ylabel('FID')
        ax.legend()
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format='png', dpi=120)
        plt.close(fig)
        storage.write_bytes(directory / 'sweep.png', buffer.getvalue())
    return path


class PeriodicFID:
    """Training hook body: FID of config.eval.train_num_samples in-memory samples (config.sampler weights
    and CFG), written through the run's metric writer as 'fid_<n>' at the step. Called as
    fn(step, t, trainer=, state=, writer=) by clu.periodic_actions.PeriodicCallback."""

    def __init__(self, config: config_dict.ConfigDict):
        self.config = config
        self._evaluator: Evaluator | None = None

    def __call__(self, step: int, t: float | None = None, *, trainer: train.Trainer, state: dict,
                 writer: Any = None) -> dict:
        if self._evaluator is None:
            self._evaluator = Evaluator(self.config, trainer)
        run = Run(self.config.sampler.ema, float(self.config.sampler.cfg_scale))
        n = self.config.eval.train_num_samples
        info = self._evaluator.generate(trainer.sampling_model(state), run, n)
        kept = info['kept']
        result = self._evaluator.score(np.concatenate(kept['pool3']), np.concatenate(kept['logits_unbiased'])
                                       if 'logits_unbiased' in kept else None) if kept else {}
        scalars = {f'fid_{n}': result['fid']} if 'fid' in result else {}
        if 'inception_score_mean' in result:
            scalars[f'is_{n}'] = result['inception_score_mean']
        if scalars and writer is not None:
            writer.write_scalars(step, scalars)
            writer.flush()
        logging.info('step %d: periodic %s', step, scalars)
        return result


def training_hooks(config: config_dict.ConfigDict) -> list[Any]:
    """The periodic FID hook when config.eval.every_steps > 0 (validation ensured weights and stats)."""
    if not config.eval.every_steps:
        return []
    from clu import periodic_actions  # pylint: disable=import-outside-toplevel

    return [periodic_actions.PeriodicCallback(every_steps=config.eval.every_steps,
                                              callback_fn=PeriodicFID(config))]


def main(argv: list[str]) -> None:
    from jit_jax import main as main_lib  # the same flags and start-up as training

    reports = evaluate(*main_lib.start(argv))
    main_lib.finish([{k: r.get(k) for k in ('run', 'fid', 'inception_score_mean', 'inception_score',
                                            'images_per_sec', 'directory')} for r in reports])


if __name__ == '__main__':
    from absl import app as _app

    from jit_jax import main as _main_flags  # noqa: F401  (defines --config / --workdir)

    _app.run(main)
