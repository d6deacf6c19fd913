"""`python -m jit_jax.bench eval`: throughput of the evaluation loop against its upper bounds.

Three figures, each through the code an evaluation runs:
  * eval loop images/s: `evaluate.Evaluator.generate` over --eval-chunks chunks (sampling, Inception
    features queued behind it on the same devices, chunk files and PNGs written in background threads),
    timed after one warm-up chunk that compiles everything;
  * sampling-only images/s (the same loop with no Inception and nothing written) and the pure-forward
    upper bound: images/s if the sampler cost nothing but its network forwards (one jitted forward of a
    chunk, timed, times the forwards per image the sampler runs);
  * Inception images/s on random uint8 images of the model's size (resize to 299 included).
The host share is the time the loop's main thread spends on host work (copying results, queueing
writes, waiting for a full write queue) over the loop's time; below 10 % the devices never wait on the host.
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from jit_jax import evaluate, model as model_lib, sampling, sharding, train
from jit_jax.fid import extractor as extractor_lib, weights


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def run(config: Any, mesh: jax.sharding.Mesh, *, inception: str | None, chunks: int, model_state) -> dict:
    chunk = config.data.global_batch_size
    with config.unlocked():
        config.eval.chunk_size = chunk
        config.eval.inception_batch_size = chunk  # one Inception call per chunk
    trainer = train.Trainer(config, mesh=mesh)
    cfg = trainer.model_config
    graphdef, state = model_state
    model = nnx.merge(graphdef, jax.device_put(state, sharding.replicated(mesh)))
    if inception:
        extractor = extractor_lib.load_inception(inception, batch_size=config.eval.inception_batch_size,
                                                 devices=list(mesh.devices.flat))
    else:  # the real network's shapes and cost, random values
        params = weights.random_weights(width=1.0)
        extractor = extractor_lib.InceptionExtractor(extractor_lib.build_model(params, {'width': 1.0}),
                                                     batch_size=config.eval.inception_batch_size,
                                                     devices=list(mesh.devices.flat), meta={'source': 'random'})
    run_ = evaluate.Run('ema1', float(config.sampler.cfg_scale))
    full = evaluate.Evaluator(config, trainer, extractor)
    bare = evaluate.Evaluator(config, trainer, None)
    bare.extractor = None
    n = chunks * chunk
    with tempfile.TemporaryDirectory() as tmp:
        full.generate(model, run_, chunk, pathlib.Path(tmp, 'warm'), png=True)  # compiles sampler + Inception
        loop = full.generate(model, run_, n, pathlib.Path(tmp, 'timed'), png=True)
    bare.generate(model, run_, chunk)
    sampler_only = bare.generate(model, run_, n)

    spec = dataclasses.replace(trainer.sampler)
    _, forwards, _ = _forwards(spec, chunk)
    x = jax.device_put(np.zeros((chunk,) + bare.image_shape, np.float32), sharding.batch_sharding(mesh))
    t = jax.device_put(np.full((chunk,), 0.5, np.float32), sharding.batch_sharding(mesh))
    y = jax.device_put(np.arange(chunk, dtype=np.int32) % cfg.num_classes, sharding.batch_sharding(mesh))
    forward = jax.jit(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y))
    params = nnx.state(model)
    with jax.set_mesh(mesh):
        t_forward = _best_of(lambda: forward(params, x, t, y), 3)
    upper = chunk / (t_forward * forwards / chunk)

    images = np.random.default_rng(0).integers(0, 256, (2 * extractor.batch_size,) + bare.image_shape, np.uint8)
    extractor.outputs(images[:extractor.batch_size])
    t_inception = _best_of(lambda: extractor.outputs(images), 2)
    return {
        'mode': 'eval', 'model_config': dataclasses.asdict(cfg), 'chunk_size': chunk, 'timed_chunks': chunks,
        'sampler': dataclasses.asdict(spec), 'forwards_per_image': forwards / chunk,
        'backend': mesh.devices.flat[0].platform, 'num_devices': mesh.devices.size,
        'eval_loop_images_per_s': loop['images_per_sec'],
        'eval_loop_host_share': loop['host_seconds'] / loop['seconds'],
        'sampling_only_images_per_s': sampler_only['images_per_sec'],
        'pure_forward_upper_bound_images_per_s': upper,
        'eval_loop_vs_upper_bound': loop['images_per_sec'] / upper,
        'inception_images_per_s': len(images) / t_inception,
        'inception_source': extractor.meta.get('source'),
        'params': model_lib.param_count(cfg),
    }


def _forwards(spec: sampling.SamplerSpec, batch: int) -> tuple[int, int, int]:
    from jit_jax import bench  # pylint: disable=import-outside-toplevel

    return bench.forwards_run(spec, batch, skip_uncond=True)


def format_table(r: dict) -> str:
    rows = [('model', f"{r['params'] / 1e6:.1f}M params, {r['model_config']['input_size']} px"),
            ('sampler', f"{r['sampler']['method']} {r['sampler']['num_steps']} steps, cfg {r['sampler']['cfg_scale']}, "
                        f"{r['forwards_per_image']:.0f} forwards/image"),
            ('devices / chunk', f"{r['num_devices']} x {r['backend']} / {r['chunk_size']} images x {r['timed_chunks']}"),
            ('eval loop images/s', f"{r['eval_loop_images_per_s']:.4g}"),
            ('  host share of the loop', f"{100 * r['eval_loop_host_share']:.1f} %"),
            ('sampling only images/s', f"{r['sampling_only_images_per_s']:.4g}"),
            ('pure-forward upper bound images/s', f"{r['pure_forward_upper_bound_images_per_s']:.4g}"),
            ('eval loop / upper bound', f"{100 * r['eval_loop_vs_upper_bound']:.1f} %"),
            ('Inception images/s', f"{r['inception_images_per_s']:.4g} ({r['inception_source']})")]
    width = max(len(k) for k, _ in rows)
    return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)
