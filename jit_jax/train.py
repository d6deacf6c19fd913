"""Training: the train state, one jitted train step over the device mesh, and the loop around it.

The state is a plain pytree, {params, opt, ema: {ema1, ema2}, step, rng}, with params as the NNX model's
pure dict; the model's graph definition is static. That keeps the step a pure function that is jitted once
with explicit in/out shardings and a donated state, and makes checkpoints a single Orbax item.

Per-step randomness (t, noise, label drop, dropout) is fold_in(rng, step): a resumed run draws exactly
what an uninterrupted one would, with nothing to carry but the step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from flax import nnx
from ml_collections import config_dict

from jit_jax import checkpoint as ckpt_lib
from jit_jax import config_lib, diffusion, images, sampling, sharding
from jit_jax import model as model_lib
from jit_jax.data import pipeline


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static settings of the train step (hashable, so they are compile-time constants)."""

    flow: diffusion.FlowSpec
    ema_decays: tuple[float, ...] = (0.9999, 0.9996)
    grad_accum_steps: int = 1
    dropout: bool = False  # the model has dropout: feed it a key


def ema_names(decays) -> tuple[str, ...]:
    return tuple(f'ema{i + 1}' for i in range(len(decays)))


def make_optimizer(config: config_dict.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with the official betas; lr warms up linearly from 0 (per step), then stays (or cosine-decays).

    Weight decay skips 1-D parameters (biases, norm scales), as the official parameter groups do.
    """
    peak = config_lib.lr(config)
    warmup = config.optim.warmup_steps
    if config.optim.schedule == 'cosine':
        schedule = optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), max(config.train.num_steps, 1),
                                                      end_value=config.optim.min_lr)
    else:
        schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                        [warmup]) if warmup else optax.constant_schedule(peak)
    tx = optax.adamw(schedule, b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps,
                     weight_decay=config.optim.weight_decay, mask=lambda p: jax.tree.map(lambda a: a.ndim > 1, p))
    if config.optim.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip), tx)
    return tx, schedule


def init_state(graphdef: Any, model_config: model_lib.JiTConfig, tx: optax.GradientTransformation,
               ema_decays, seed: int) -> dict:
    """Fresh state; every EMA copy starts as the initial weights (official: no EMA warmup)."""
    model = model_lib.JiT(model_config, rngs=nnx.Rngs(params=seed))
    params = nnx.to_pure_dict(nnx.state(model))
    return {'params': params, 'opt': tx.init(params), 'ema': {n: params for n in ema_names(ema_decays)},
            'step': jnp.zeros((), jnp.int32), 'rng': jax.random.key_data(jax.random.key(seed + 1))}


def _loss(params, graphdef, x, y, draws: diffusion.Draws, dropout_key, spec: StepSpec):
    model = nnx.merge(graphdef, params)
    return diffusion.loss(model, x, y, draws, spec.flow, dropout_key if spec.dropout else None)


def train_step(state: dict, batch: dict, *, graphdef: Any, tx: optax.GradientTransformation,
               spec: StepSpec) -> tuple[dict, dict]:
    """One optimizer step on the global batch.

    t, noise and label drops are drawn for the whole batch before it is split into grad_accum_steps
    micro-batches, so accumulation changes memory use, not the update (up to summation order).
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
    draw_key, dropout_key = jax.random.split(key)
    x, y = batch['image'], batch['label']
    draws = diffusion.draw(draw_key, x, spec.flow)
    grad_fn = jax.value_and_grad(_loss)
    k = spec.grad_accum_steps
    if k == 1:
        loss, grads = grad_fn(state['params'], graphdef, x, y, draws, dropout_key, spec)
    else:
        # Interleaved split: each device's rows spread evenly over the micro-batches.
        def micro(a):
            return a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1)

        def body(carry, xs):
            xi, yi, draws_i, i = xs
            loss_i, grads_i = grad_fn(state['params'], graphdef, xi, yi, draws_i,
                                      jax.random.fold_in(dropout_key, i), spec)
            return jax.tree.map(jnp.add, carry, (loss_i, grads_i)), None

        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state['params']))
        xs = (micro(x), micro(y), jax.tree.map(micro, draws), jnp.arange(k))
        (loss, grads), _ = jax.lax.scan(body, zero, xs)
        loss, grads = loss / k, jax.tree.map(lambda g: g / k, grads)
    updates, opt = tx.update(grads, state['opt'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    ema = {name: optax.incremental_update(params, state['ema'][name], 1.0 - decay)
           for name, decay in zip(ema_names(spec.ema_decays), spec.ema_decays)}
    new_state = {'params': params, 'opt': opt, 'ema': ema, 'step': state['step'] + 1, 'rng': state['rng']}
    return new_state, {'loss': loss, 'grad_norm': optax.tree.norm(grads)}


@jax.jit
def _accumulate(acc: dict, metrics: dict, step: jax.Array) -> dict:
    """Running sums on the device, so the loop never waits for a step to finish before the next."""
    bad = ~jnp.isfinite(metrics['loss'])
    return {'loss': acc['loss'] + metrics['loss'], 'grad_norm': acc['grad_norm'] + metrics['grad_norm'],
            'count': acc['count'] + 1,
            'first_bad_step': jnp.where(bad & (acc['first_bad_step'] < 0), step, acc['first_bad_step'])}


def _empty_metrics() -> dict:
    return {'loss': jnp.zeros(()), 'grad_norm': jnp.zeros(()), 'count': jnp.zeros((), jnp.int32),
            'first_bad_step': -jnp.ones((), jnp.int32)}


class Trainer:
    """Everything a run needs, built once from the config: mesh, model graph, optimizer, jitted step."""

    def __init__(self, config: config_dict.ConfigDict, mesh: jax.sharding.Mesh | None = None):
        config_lib.validate(config, num_devices=jax.device_count() if mesh is None else mesh.devices.size)
        self.config = config
        self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
        self.model_config = config_lib.model_config(config)
        self.flow = diffusion.FlowSpec.from_config(config.diffusion)
        self.sampler = sampling.SamplerSpec.from_config(config.sampler, config.diffusion)
        self.tx, self.schedule = make_optimizer(config)
        decays = tuple(float(d) for d in config.optim.ema_decays)
        self.spec = StepSpec(flow=self.flow, ema_decays=decays, grad_accum_steps=config.optim.grad_accum_steps,
                             dropout=self.model_config.attn_drop > 0 or self.model_config.proj_drop > 0)
        self.graphdef = nnx.split(nnx.eval_shape(lambda: model_lib.JiT(self.model_config, rngs=nnx.Rngs(0))))[0]
        init = functools.partial(init_state, self.graphdef, self.model_config, self.tx, decays, config.seed)
        self.abstract_state = jax.eval_shape(init)
        self.state_shardings = sharding.state_shardings(self.abstract_state, self.mesh, config.mesh.param_sharding)
        self._init = jax.jit(init, out_shardings=self.state_shardings)
        batch_sharding = sharding.batch_sharding(self.mesh)
        self.step_fn = jax.jit(
            functools.partial(train_step, graphdef=self.graphdef, tx=self.tx, spec=self.spec),
            in_shardings=(self.state_shardings, {'image': batch_sharding, 'label': batch_sharding}),
            out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
            donate_argnums=0)

    def init(self) -> dict:
        with jax.set_mesh(self.mesh):
            return self._init()

    def sampling_model(self, state: dict) -> model_lib.JiT:
        """The network with the weights config.sampler.ema names ('ema1', 'ema2' or the raw 'model')."""
        which = self.config.sampler.ema
        params = state['params'] if which == 'model' else state['ema'][which]
        return nnx.merge(self.graphdef, params)

    def sample_grid(self, state: dict, num_images: int, seed: int) -> np.ndarray:
        """u8 grid of samples; column j shows class j (cycling when there are more columns than classes)."""
        classes = self.model_config.num_classes
        columns = min(classes, num_images)
        labels = np.arange(num_images, dtype=np.int32) % columns
        if num_images % sharding.data_parallel_size(self.mesh) == 0:
            labels = jax.device_put(labels, sharding.batch_sharding(self.mesh))
        size = self.model_config.input_size
        with jax.set_mesh(self.mesh):
            out = sampling.sample_from_seed(self.sampling_model(state), labels, jax.random.key(seed), self.sampler,
                                            (size, size, self.model_config.in_channels), self.flow.noise_scale)
        pixels = sampling.to_uint8(out)
        if not pixels.is_fully_addressable:  # multi-host: every host holds only its rows
            pixels = multihost_utils.process_allgather(pixels, tiled=True)
        return images.make_grid(np.asarray(jax.device_get(pixels)), columns)


def _meta(trainer: Trainer, step: int) -> dict:
    return {'step': step, 'architecture': ckpt_lib.architecture(trainer.model_config),
            'config': json.loads(trainer.config.to_json_best_effort())}


class _Preemption:
    """SIGTERM sets a flag; the loop checkpoints at the next step boundary and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):  # pylint: disable=unused-argument
        logging.warning('SIGTERM received: checkpointing at the next step, then exiting')
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


class NonFiniteLossError(FloatingPointError):
    """The loss stopped being finite; `step` is the first such step (a sweep records it and goes on)."""

    def __init__(self, message: str, *, step: int):
        super().__init__(message)
        self.step = step


def train_and_evaluate(config: config_dict.ConfigDict, workdir: str | pathlib.Path, *,
                       hooks: Sequence[Callable[..., Any]] = ()) -> dict:
    """Train (resuming from the latest checkpoint in workdir), log, sample; returns final metrics.

    Each hook is called after every step as hook(step, trainer=..., state=...), the protocol of
    clu.periodic_actions (e.g. PeriodicCallback(every_steps=n, callback_fn=fn) calls fn(step, t, trainer,
    state) every n steps).
    """
    from clu import metric_writers, periodic_actions  # pylint: disable=import-outside-toplevel

    workdir = pathlib.Path(workdir).resolve()
    trainer = Trainer(config)
    cfg_train = config.train
    num_steps = cfg_train.num_steps
    is_main = jax.process_index() == 0
    checkpointer = ckpt_lib.Checkpointer(workdir / 'checkpoints', keep=cfg_train.keep_checkpoints,
                                         keep_every_steps=cfg_train.keep_every_steps)
    data = pipeline.make_train_iterator(config.data, seed=config.seed)

    start = checkpointer.latest_step()
    if start is None:
        state = trainer.init()
        start = 0
        logging.info('no checkpoint in %s: starting from scratch', checkpointer.directory)
    else:
        ckpt_lib.check_compatible(checkpointer.read_meta(start), trainer.model_config, checkpointer.directory,
                                  start)
        state = checkpointer.restore(start, ckpt_lib.abstract_with_shardings(
            trainer.abstract_state, trainer.state_shardings), data)
        logging.info('resumed from %s at step %d', checkpointer.directory, start)

    writer = metric_writers.create_default_writer(str(workdir), just_logging=not is_main, asynchronous=True)
    if start == 0 and is_main:
        writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
        (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
    report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                             every_steps=cfg_train.log_every_steps)
    preemption = _Preemption()
    acc, window_start, last = _empty_metrics(), time.time(), {}
    global_batch = config.data.global_batch_size

    def check_finite(acc):
        bad = int(acc['first_bad_step'])
        if bad >= 0:
            checkpointer.wait()
            raise NonFiniteLossError(
                f'non-finite loss at step {bad + 1}; stopping. The last good checkpoint '
                f'(step {checkpointer.latest_step()}) in {checkpointer.directory} is kept.', step=bad + 1)

    try:
        with jax.set_mesh(trainer.mesh):
            for step in range(start, num_steps):
                batch = sharding.global_batch(next(data), trainer.mesh)
                state, metrics = trainer.step_fn(state, batch)
                acc = _accumulate(acc, metrics, jnp.int32(step))
                done = step + 1
                report(done)
                for hook in hooks:
                    hook(done, trainer=trainer, state=state)
                stop = preemption.requested or checkpointer.reached_preemption(done)
                if done % cfg_train.log_every_steps == 0 or done == num_steps or stop:
                    acc = jax.device_get(acc)
                    check_finite(acc)
                    elapsed = time.time() - window_start
                    last = {'loss': float(acc['loss'] / acc['count']), 'lr': float(trainer.schedule(step)),
                            'grad_norm': float(acc['grad_norm'] / acc['count']),
                            'images_per_sec': float(acc['count'] * global_batch / elapsed)}
                    writer.write_scalars(done, last)
                    acc, window_start = _empty_metrics(), time.time()
                if done % cfg_train.ckpt_every_steps == 0 or done == num_steps or stop:
                    check_finite(jax.device_get(acc))
                    with report.timed('checkpoint'):
                        checkpointer.save(done, state, data, _meta(trainer, done))
                if cfg_train.sample_every_steps and (done % cfg_train.sample_every_steps == 0 or done == num_steps):
                    with report.timed('sample'):
                        grid = trainer.sample_grid(state, config.sampler.num_images, config.seed)
                    if is_main:
                        path = images.save_png(grid, workdir / 'samples' / f'step_{done:07d}.png', scale=2)
                        writer.write_images(done, {'samples': grid[None]})
                        logging.info('sample grid written to %s', path)
                        last['sample_grid'] = str(path)
                if stop:
                    logging.warning('preempted at step %d: checkpoint written, exiting', done)
                    last['preempted_at'] = done
                    break
    finally:
        checkpointer.wait()
        checkpointer.close()
        writer.flush()
        preemption.restore()
    return last


def _flatten(tree: dict, prefix: str = '') -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
