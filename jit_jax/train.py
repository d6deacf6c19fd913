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
import os
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
from jit_jax import config_lib, diffusion, images, preemption, sampling, sharding, writers
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
    return state_from_weights(nnx.to_pure_dict(nnx.state(model)), {}, tx, ema_decays, seed)


def state_from_weights(params: Any, emas: dict, tx: optax.GradientTransformation, ema_decays, seed: int) -> dict:
    """Step-0 state around given weights: fresh optimizer moments; each EMA copy from `emas` when it has
    that name, else the weights."""
    return {'params': params, 'opt': tx.init(params),
            'ema': {n: emas.get(n, params) for n in ema_names(ema_decays)},
            'step': jnp.zeros((), jnp.int32), 'rng': jax.random.key_data(jax.random.key(seed + 1))}


def _loss(params, graphdef, x, y, draws: diffusion.Draws, dropout_key, spec: StepSpec):
    model = nnx.merge(graphdef, params)
    return diffusion.loss(model, x, y, draws, spec.flow, dropout_key if spec.dropout else None)


def train_step(state: dict, batch: dict, *, graphdef: Any, tx: optax.GradientTransformation,
               spec: StepSpec, param_shardings: Any = None) -> tuple[dict, dict]:
    """One optimizer step on the global batch.

    param_shardings (the parameters' layout) pins the gradients to it as soon as they exist, so under FSDP
    each device keeps only its shard of every gradient. For fsdp groups of 8 chips or more XLA:TPU still moves
    the sums as full-size all-reduces rather than reduce-scatters, as it does an explicit psum_scatter
    (docs/tpu.md, H/16 and G/16 on v5p-128).

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
    if param_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    updates, opt = tx.update(grads, state['opt'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    ema = {name: optax.incremental_update(params, state['ema'][name], 1.0 - decay)
           for name, decay in zip(ema_names(spec.ema_decays), spec.ema_decays)}
    new_state = {'params': params, 'opt': opt, 'ema': ema, 'step': state['step'] + 1, 'rng': state['rng']}
    return new_state, {'loss': loss, 'grad_norm': optax.tree.norm(grads)}


@jax.jit
def _accumulate(acc: dict, metrics: dict, step: jax.Array) -> dict:
    """Running sums on the device, so the loop never waits for a step to finish before the next.

    A step is bad when its loss or its gradient norm is not finite (the norm can overflow while the
    loss is still finite; the update would then write inf into the weights). bad_loss records which.
    """
    bad_loss = ~jnp.isfinite(metrics['loss'])
    bad = bad_loss | ~jnp.isfinite(metrics['grad_norm'])
    first = bad & (acc['first_bad_step'] < 0)
    return {'loss': acc['loss'] + metrics['loss'], 'grad_norm': acc['grad_norm'] + metrics['grad_norm'],
            'count': acc['count'] + 1, 'first_bad_step': jnp.where(first, step, acc['first_bad_step']),
            'bad_loss': jnp.where(first, bad_loss, acc['bad_loss'])}


def _empty_metrics() -> dict:
    return {'loss': jnp.zeros(()), 'grad_norm': jnp.zeros(()), 'count': jnp.zeros((), jnp.int32),
            'first_bad_step': -jnp.ones((), jnp.int32), 'bad_loss': jnp.zeros((), bool)}


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm stopped being finite; `step` is the first such step (1-based; a sweep
    records it and goes on)."""

    def __init__(self, message: str, *, step: int):
        super().__init__(message)
        self.step = step


def raise_if_not_finite(acc: dict, checkpointer: ckpt_lib.Checkpointer) -> None:
    """NonFiniteLossError naming the first bad step (1-based) once the pending checkpoint is written."""
    bad = int(acc['first_bad_step'])
    if bad >= 0:
        checkpointer.wait()
        what = 'loss' if bool(acc['bad_loss']) else 'gradient norm (the loss was still finite)'
        raise NonFiniteLossError(
            f'non-finite {what} at step {bad + 1}; stopping. The last good checkpoint '
            f'(step {checkpointer.latest_step()}) in {checkpointer.directory} is kept.', step=bad + 1)


class Trainer:
    """Everything a run needs, built once from the config: mesh, model graph, optimizer, jitted step."""

    def __init__(self, config: config_dict.ConfigDict, mesh: jax.sharding.Mesh | None = None):
        config_lib.validate(config, num_devices=jax.device_count() if mesh is None else mesh.devices.size)
        self.config = config
        self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
        # Numerics defaults follow the mesh's devices (a TPU topology compiled ahead of time included).
        self.model_config = config_lib.model_config(config, platform=self.mesh.devices.flat[0].platform)
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
            functools.partial(train_step, graphdef=self.graphdef, tx=self.tx, spec=self.spec,
                              param_shardings=self.state_shardings['params']),
            in_shardings=(self.state_shardings, {'image': batch_sharding, 'label': batch_sharding}),
            out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
            donate_argnums=0)

    def init(self) -> dict:
        with jax.set_mesh(self.mesh):
            return self._init()

    def init_from(self, directory: str) -> dict:
        """Step-0 state from the weights of a `python -m jit_jax.convert` output (fine-tuning).

        The model weights come from its 'params' (or its 'ema1' when it has no raw weights), each EMA copy
        from the converted copy of the same name when there is one; optimizer moments start fresh.
        """
        abstract = ckpt_lib.abstract_with_shardings(self.abstract_state['params'], self.state_shardings['params'])
        names = ('params', *ema_names(self.spec.ema_decays))
        weights = ckpt_lib.load_weights(directory, self.model_config, dict.fromkeys(names, abstract))
        params = weights.pop('params', None)
        params = weights['ema1'] if params is None else params
        build = jax.jit(functools.partial(state_from_weights, tx=self.tx, ema_decays=self.spec.ema_decays,
                                          seed=self.config.seed), out_shardings=self.state_shardings)
        with jax.set_mesh(self.mesh):
            return build(params, weights)

    def sampling_model(self, state: dict) -> model_lib.JiT:
        """The network with the weights config.sampler.ema names ('ema1', 'ema2' or the raw 'model')."""
        which = self.config.sampler.ema
        params = state['params'] if which == 'model' else state['ema'][which]
        return nnx.merge(self.graphdef, params)

    def sample_grid(self, state: dict, num_images: int, seed: int) -> np.ndarray:
        """u8 grid of samples; column j shows class j (cycling when there are more columns than classes)."""
        columns = min(self.model_config.num_classes, num_images)
        labels = np.arange(num_images, dtype=np.int32) % columns
        return images.make_grid(self.sample_images(state, labels, seed), columns)

    def sample_images(self, state: dict, labels: np.ndarray, seed: int) -> np.ndarray:
        """u8[n, h, w, c] samples of the classes `labels` (int32[n]), on every host."""
        num_images = len(labels)
        if num_images % sharding.data_parallel_size(self.mesh) == 0:
            labels = jax.device_put(labels, sharding.batch_sharding(self.mesh))
        size = self.model_config.input_size
        with jax.set_mesh(self.mesh):
            out = sampling.sample_from_seed(self.sampling_model(state), labels, jax.random.key(seed), self.sampler,
                                            (size, size, self.model_config.in_channels), self.flow.noise_scale)
        pixels = sampling.to_uint8(out)
        if not pixels.is_fully_addressable:  # multi-host: every host holds only its rows
            pixels = multihost_utils.process_allgather(pixels, tiled=True)
        return np.asarray(jax.device_get(pixels))


def _meta(trainer: Trainer, step: int) -> dict:
    return {'step': step, 'architecture': ckpt_lib.architecture(trainer.model_config),
            'resume': ckpt_lib.resume_fields(trainer.config, jax.process_count()),
            'config': json.loads(trainer.config.to_json_best_effort())}


def _start(trainer: Trainer, checkpointer: ckpt_lib.Checkpointer, data: Any) -> tuple[int, dict]:
    """(step, state): the newest checkpoint that restores, else config.train.init_from's weights, else init."""
    def check(meta, step):
        ckpt_lib.check_compatible(meta, trainer.model_config, checkpointer.directory, step)
        ckpt_lib.check_resumable(meta, trainer.config, jax.process_count(), checkpointer.directory, step)

    restored = checkpointer.restore_latest(ckpt_lib.abstract_with_shardings(
        trainer.abstract_state, trainer.state_shardings), data, check)
    if restored is not None:
        logging.info('resumed from %s at step %d', checkpointer.directory, restored[0])
        return restored
    if trainer.config.train.init_from:
        logging.info('no checkpoint in %s: starting from the weights in %s', checkpointer.directory,
                     trainer.config.train.init_from)
        return 0, trainer.init_from(trainer.config.train.init_from)
    logging.info('no checkpoint in %s: starting from scratch', checkpointer.directory)
    return 0, trainer.init()


class _Profile:
    """jax.profiler trace of config.train.profile_steps steps after the first (compiling) one of this run,
    into workdir/plugins/profile/<run>/ (TensorBoard's profile plugin layout)."""

    def __init__(self, workdir: Any, start: int, num_steps: int):
        self.workdir, self.first, self.last = workdir, start + 1, start + 1 + num_steps
        self.active = False

    def step(self, step: int, state: Any) -> None:
        """Called before `step` runs (0-based, as the loop counts)."""
        if self.first == self.last:
            return
        if step == self.first:
            jax.block_until_ready(state)
            jax.profiler.start_trace(os.fspath(self.workdir))
            self.active = True
        elif step == self.last:
            self.stop(state)

    def stop(self, state: Any = None) -> None:
        """Ends the trace after `state` is computed (None: at once, e.g. while an error propagates)."""
        if self.active:
            if state is not None:
                jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            logging.info('profile of steps %d-%d written to %s/plugins/profile', self.first + 1, self.last,
                         self.workdir)


def train_and_evaluate(config: config_dict.ConfigDict, workdir: str | os.PathLike, *,
                       hooks: Sequence[Callable[..., Any]] = ()) -> dict:
    """Train (resuming from the latest checkpoint in workdir), log, sample; returns final metrics.

    Each hook is called after every step as hook(step, trainer=..., state=..., writer=...), the protocol of
    clu.periodic_actions (e.g. PeriodicCallback(every_steps=n, callback_fn=fn) calls fn(step, t, trainer,
    state, writer) every n steps); writer is the run's metric writer, for hooks that log.
    """
    workdir = ckpt_lib.as_path(workdir)
    trainer = Trainer(config)
    cfg_train = config.train
    num_steps = cfg_train.num_steps
    is_main = jax.process_index() == 0
    checkpointer = ckpt_lib.Checkpointer(workdir / 'checkpoints', keep=cfg_train.keep_checkpoints,
                                         keep_every_steps=cfg_train.keep_every_steps)
    data = pipeline.make_train_iterator(config.data, seed=config.seed)

    start, state = _start(trainer, checkpointer, data)

    writer, report = writers.create(workdir, just_logging=not is_main, num_steps=num_steps,
                                    every_steps=cfg_train.log_every_steps)
    if start == 0 and is_main:
        writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
        (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
    stopper = preemption.Preemption(checkpointer.reached_preemption, sync_every=cfg_train.log_every_steps)
    profile = _Profile(workdir, start, cfg_train.profile_steps)
    acc, window_start, last = _empty_metrics(), time.time(), {}
    global_batch = config.data.global_batch_size
    ckpt_every = cfg_train.ckpt_every_steps  # 0 = never

    try:
        with jax.set_mesh(trainer.mesh):
            for step in range(start, num_steps):
                profile.step(step, state)
                batch = sharding.global_batch(next(data), trainer.mesh)
                with jax.profiler.StepTraceAnnotation('train', step_num=step):
                    state, metrics = trainer.step_fn(state, batch)
                acc = _accumulate(acc, metrics, jnp.int32(step))
                done = step + 1
                report(done)
                for hook in hooks:
                    hook(done, trainer=trainer, state=state, writer=writer)
                stop = stopper.should_stop(done)
                if done % cfg_train.log_every_steps == 0 or done == num_steps or stop:
                    acc = jax.device_get(acc)
                    raise_if_not_finite(acc, checkpointer)
                    elapsed = time.time() - window_start
                    last = {'loss': float(acc['loss'] / acc['count']), 'lr': float(trainer.schedule(step)),
                            'grad_norm': float(acc['grad_norm'] / acc['count']),
                            'images_per_sec': float(acc['count'] * global_batch / elapsed)}
                    writer.write_scalars(done, dict(last))  # a copy: the writer is asynchronous, last grows below
                    acc, window_start = _empty_metrics(), time.time()
                if ckpt_every and (done % ckpt_every == 0 or done == num_steps or stop):
                    raise_if_not_finite(jax.device_get(acc), checkpointer)
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
                    logging.warning('preempted at step %d: %s, exiting', done,
                                    'checkpoint written' if ckpt_every else 'no checkpoint (ckpt_every_steps=0)')
                    last['preempted_at'] = done
                    break
        profile.stop(state)
    finally:
        profile.stop()
        checkpointer.wait()
        checkpointer.close()
        writer.flush()
        stopper.close()
    return last


def _flatten(tree: dict, prefix: str = '') -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
