"""The paper's toy experiment: a 2-D spiral hidden in D dimensions, x- vs eps- vs v-prediction.

JiT's argument (Li & He 2025, Sec. 3 and Fig. 2) is that clean data lies on a low-dimensional manifold
while noise and velocity fill the whole space, so a network whose width is below the ambient dimension
can still output x but cannot output eps or v. This module reproduces that claim at toy scale: a 2-D
spiral is embedded into D dimensions by a fixed column-orthogonal P (D x 2; experiments.spiral), a
5-layer ReLU MLP with 256 hidden units is trained as a flow model with each prediction target (same loss
space for all), and the ODE samples are projected back with P^T and scored against the true spiral.

    python -m jit_jax.experiments.toy --out /tmp/toy

writes toy.png (rows D, columns prediction space) and results.json (settings, per-cell scores, wall and
CPU time). Everything but the data and the MLP is the project's own: the loss is `diffusion.loss`, the
optimizer `train.make_optimizer`'s (AdamW, warmup + cosine; EMA by `optax.incremental_update` as in
`train.train_step`), and the samples come from `sampling.sample_with_spec` (Heun, last step Euler) with
the MLP behind the JiT call signature model(z, t, y) on 1 x 1 x D "images". Time convention as in the
rest of jit_jax: t = 0 is noise, t = 1 is data, z = t*x + (1-t)*e.

The defaults, and why (x-prediction's manifold distance at D = 2 / 512 with one setting changed, in data
units: the spiral's outer radius is 2, so 0.02 is 1%; docs/experiments.md has the full table):
- t ~ uniform[0, 1], not JiT's logit-normal(-0.8, 0.8): the data is a curve of zero thickness whose fine
  structure is learnt only near t = 1, which the noisy-end prior rarely draws (logit-normal: 0.16 / 0.18
  against 0.0025 / 0.0134 with everything else equal).
- t_eps = 0.02 = 1 / solver_steps: the sampler's last (Euler) step from t = 1 - 1/50 then lands exactly on
  x-pred's output, v = (x_hat - z) / max(1 - t, t_eps) with 1 - t = t_eps. With JiT's 0.05 the clamp
  leaves 60% of that step's residual noise in every sample (0.027 / 0.030).
- 8000 steps at batch 256, lr 3e-3 warmed up over 100 steps and cosine-decayed to 1%: the decay removes
  the optimizer noise that otherwise blurs the samples (constant lr: 0.021 / 0.050). No EMA: the decayed
  schedule already settles the weights, and EMA 0.999 was worse in 3000-step runs.
- Heun with 50 steps (JiT's sampler), 2000 samples per cell.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jit_jax import config_lib, diffusion, sampling, train
from jit_jax.experiments import spiral
from jit_jax.experiments.curve_scores import manifold_distance, off_manifold, sliced_w1

PREDS = ('x', 'eps', 'v')
SPACES = ('x', 'eps', 'v')
T_DISTS = ('logit_normal', 'uniform')
SOLVERS = sampling.METHODS

@dataclasses.dataclass(frozen=True)
class ToySettings:
    """Every knob of the experiment; written verbatim into results.json so a run can be repeated.
    docs/experiments.md says why each default is what it is."""

    dims: tuple[int, ...] = (2, 8, 16, 512)
    preds: tuple[str, ...] = PREDS
    loss: str = 'v'  # loss space shared by all prediction targets; JiT's default is v-loss
    steps: int = 8000  # optimizer steps per cell
    batch_size: int = 256
    lr: float = 3e-3  # peak of the warmup + cosine schedule
    warmup_steps: int = 100
    end_lr_ratio: float = 0.01  # cosine ends at lr * end_lr_ratio
    ema_decay: float = 0.0  # 0 = sample with the raw weights
    hidden: int = 256
    depth: int = 5  # number of Linear layers (4 hidden ReLU layers + output)
    t_dist: str = 'uniform'
    p_mean: float = -0.8
    p_std: float = 0.8
    t_eps: float = 0.02  # <= 1 / solver_steps, so the sampler's last Euler step lands on x-pred's x
    solver: str = 'heun'
    solver_steps: int = 50
    num_samples: int = 2000
    num_ref_points: int = 20000  # dense points on the true curve for manifold_distance
    num_directions: int = 512  # sliced Wasserstein directions
    chunk_steps: int = 250  # training steps per jitted call (and per progress line)
    seed: int = 0

    def validate(self) -> None:
        """Fail before any compilation, naming the flag that is wrong."""
        for pred in self.preds:
            if pred not in PREDS:
                raise ValueError(f'--preds contains {pred!r}; expected a subset of {PREDS}')
        if not self.preds:
            raise ValueError('--preds is empty; expected at least one of x, eps, v')
        if self.loss not in SPACES:
            raise ValueError(f'--loss={self.loss!r}; expected one of {SPACES}')
        if not self.dims or any(d < 2 for d in self.dims):
            raise ValueError(f'--dims={self.dims}; expected dimensions >= 2 (the spiral is 2-D)')
        if self.t_dist not in T_DISTS:
            raise ValueError(f't_dist={self.t_dist!r}; expected one of {T_DISTS}')
        if self.solver not in SOLVERS:
            raise ValueError(f'--solver={self.solver!r}; expected one of {SOLVERS}')
        if min(self.steps, self.chunk_steps, self.solver_steps, self.batch_size) < 1:
            raise ValueError(f'--steps={self.steps}, --batch-size={self.batch_size}, chunk_steps='
                             f'{self.chunk_steps}, --solver-steps={self.solver_steps}: all must be >= 1')
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f'warmup_steps={self.warmup_steps}; expected in [0, --steps={self.steps})')
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f'--ema-decay={self.ema_decay}; expected in [0, 1) (0 = no EMA)')
        if self.num_samples < 2:
            raise ValueError(f'--num-samples={self.num_samples}; expected >= 2')


# The reduced setting of --quick (tests, smoke runs): the two extreme dimensions, ~1/20 of the work.
QUICK = dict(dims=(2, 512), steps=600, warmup_steps=50, num_samples=500,
             solver_steps=25, num_ref_points=5000, num_directions=128, chunk_steps=200)


# ----------------------------------------------------------------------------------------------------
# Model, training and sampling


class MLP(nnx.Module):
    """The paper's toy denoiser behind JiT's call signature model(z, t, y) -> f32[b, 1, 1, D].

    A D-vector is held as a 1 x 1 "image" with D channels, so `diffusion.loss` and the sampler treat it
    exactly like a JiT batch. Linear layers with ReLU in between, input (z, t) with t as a raw extra
    input as in the paper's toy; the hidden width (256) is the bottleneck that makes eps/v-prediction
    impossible once D > 256. Unconditional: num_classes = 0 and the labels are ignored.
    """

    num_classes = 0

    def __init__(self, dim: int, hidden: int, depth: int, *, rngs: nnx.Rngs):
        widths = [dim + 1] + [hidden] * (depth - 1) + [dim]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])

    def __call__(self, z: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
        # z f32[b, 1, 1, D], t f32[b]; y unused
        h = jnp.concatenate([z.reshape(z.shape[0], -1), t.reshape(-1, 1).astype(z.dtype)], axis=-1)
        for layer in self.layers[:-1]:
            h = jax.nn.relu(layer(h))
        return self.layers[-1](h).reshape(z.shape)


def as_images(v: jax.Array) -> jax.Array:  # f32[n, D] -> f32[n, 1, 1, D]
    return v.reshape(v.shape[0], 1, 1, v.shape[-1])


def sample_t(key: jax.Array, n: int, settings: ToySettings) -> jax.Array:  # -> f32[n]
    """JiT's logit-normal (diffusion.sample_t) or uniform; docs/experiments.md says why the toy differs."""
    if settings.t_dist == 'uniform':
        return jax.random.uniform(key, (n,))
    return diffusion.sample_t(key, n, p_mean=settings.p_mean, p_std=settings.p_std)


def make_optimizer(settings: ToySettings) -> optax.GradientTransformation:
    """The trainer's own optimizer (train.make_optimizer): AdamW, linear warmup, cosine decay to
    lr * end_lr_ratio. Adam's b2 = 0.999 instead of JiT's 0.95, and no weight decay (JiT's default too;
    decay 0.5 or 2 made D = 512 worse)."""
    config = config_lib.base()
    config.train.num_steps = settings.steps
    config.optim.update(lr=settings.lr, b2=0.999, weight_decay=0.0, warmup_steps=settings.warmup_steps,
                        schedule='cosine', min_lr=settings.lr * settings.end_lr_ratio, grad_clip=0.0)
    return train.make_optimizer(config)[0]


def init_state(params: dict, tx: optax.GradientTransformation, num_targets: int) -> dict:
    """{params, opt, ema}, one entry per target, all from the same initial weights (EMA starts there too)."""
    state = {'params': [params] * num_targets, 'opt': [tx.init(params)] * num_targets,
             'ema': [params] * num_targets}
    return jax.tree.map(jnp.array, state)  # distinct buffers: the chunk donates its input


def make_train_chunk(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, settings: ToySettings, dim: int):
    """One jitted program that advances every prediction target by a chunk of steps.

    The state is a pure pytree {params, opt, ema} holding one entry per target, as train.train_step
    holds one model. The targets share each step's (x, t, e) draws, so the comparison is paired, and
    one program per D avoids a Python dispatch per step, which would be felt at D=2 where a step
    takes a few ms.
    """
    specs = [diffusion.FlowSpec(pred=p, loss=settings.loss, t_eps=settings.t_eps, label_drop_prob=0.0)
             for p in settings.preds]

    def loss_fn(params, x, y, draws, spec):
        return diffusion.loss(nnx.merge(graphdef, params), x, y, draws, spec)

    def step(state: dict, key: jax.Array, proj: jax.Array) -> tuple[dict, jax.Array]:
        k_x, k_t, k_e = jax.random.split(key, 3)
        b = settings.batch_size
        x = as_images(spiral.embed(spiral.sample_spiral(k_x, b), proj))  # f32[b, 1, 1, D]
        draws = diffusion.Draws(t=sample_t(k_t, b, settings), e=jax.random.normal(k_e, x.shape),
                                drop_mask=jnp.zeros((b,), bool))
        y = jnp.zeros((b,), jnp.int32)
        new, losses = {'params': [], 'opt': [], 'ema': []}, []
        for i, spec in enumerate(specs):
            params = state['params'][i]
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y, draws, spec)
            updates, opt = tx.update(grads, state['opt'][i], params)
            params = optax.apply_updates(params, updates)
            new['params'].append(params)
            new['opt'].append(opt)
            new['ema'].append(optax.incremental_update(params, state['ema'][i], 1.0 - settings.ema_decay))
            losses.append(loss)
        return new, jnp.stack(losses)

    @functools.partial(jax.jit, static_argnames='num_steps', donate_argnums=0)
    def chunk(state: dict, key: jax.Array, proj: jax.Array, num_steps: int) -> tuple[dict, jax.Array]:
        state, losses = jax.lax.scan(lambda s, k: step(s, k, proj), state, jax.random.split(key, num_steps))
        return state, losses.mean(axis=0)  # f32[num_preds]

    return chunk


def sampler_spec(settings: ToySettings, pred: str) -> sampling.SamplerSpec:
    """The project's sampler without guidance (an unconditional model): cfg 1 on the whole interval."""
    return sampling.SamplerSpec(method=settings.solver, num_steps=settings.solver_steps, cfg_scale=1.0,
                                interval_min=0.0, interval_max=1.0, t_eps=settings.t_eps, pred=pred)


def sample(model: Any, noise: jax.Array, spec: sampling.SamplerSpec) -> jax.Array:  # f32[n, D] -> f32[n, D]
    """ODE samples of a vector model (MLP or anything with its call signature) via sampling.sample_with_spec."""
    labels = jnp.zeros((noise.shape[0],), jnp.int32)
    return sampling.sample_with_spec(model, as_images(noise), labels, spec).reshape(noise.shape)


def run(settings: ToySettings, out_dir: pathlib.Path | None = None, log=print) -> dict[str, Any]:
    """Trains and evaluates every (D, pred) cell; writes results.json and toy.png when out_dir is set."""
    from clu import periodic_actions  # pylint: disable=import-outside-toplevel  (imports TensorFlow)

    settings.validate()
    # Steps/s and ETA over the whole run (all D); D=512 steps cost ~2x the others, so the ETA is rough.
    # It is called once per chunk, so it reports at chunk ends (on_steps), not every_steps.
    total = len(settings.dims) * settings.steps
    ends = {i * settings.steps + min(k, settings.steps) for i in range(len(settings.dims))
            for k in range(settings.chunk_steps, settings.steps + settings.chunk_steps, settings.chunk_steps)}
    report = periodic_actions.ReportProgress(num_train_steps=total, on_steps=ends, every_steps=None,
                                             every_secs=None)
    start, cpu_start = time.time(), time.process_time()
    curve = spiral.reference_curve(settings.num_ref_points)
    k_true, k_init, k_train, k_noise = jax.random.split(jax.random.key(settings.seed), 4)
    true_2d = np.asarray(spiral.sample_spiral(k_true, settings.num_samples))
    tx = make_optimizer(settings)
    cells: list[dict[str, Any]] = []
    samples_2d: dict[tuple[int, str], np.ndarray] = {}
    steps_done = 0

    for dim in settings.dims:
        proj_np = spiral.projection(dim, settings.seed)
        proj = jnp.asarray(proj_np)
        # Same initial weights for every target: they differ only in what the output means.
        graphdef, params = nnx.split(MLP(dim, settings.hidden, settings.depth,
                                         rngs=nnx.Rngs(params=jax.random.fold_in(k_init, dim))))
        state = init_state(nnx.to_pure_dict(params), tx, len(settings.preds))
        chunk = make_train_chunk(graphdef, tx, settings, dim)
        key = jax.random.fold_in(k_train, dim)
        step = 0
        while step < settings.steps:
            key, sub = jax.random.split(key)
            num_steps = min(settings.chunk_steps, settings.steps - step)
            state, losses = chunk(state, sub, proj, num_steps)
            losses = np.asarray(losses)  # waits for the chunk
            step += num_steps
            steps_done += num_steps
            report(steps_done)
            log(f'D={dim} step {step}/{settings.steps} loss[{settings.loss}] '
                + ' '.join(f'{p}={l:.4f}' for p, l in zip(settings.preds, losses))
                + f' elapsed {time.time() - start:.0f}s')
        weights = state['ema'] if settings.ema_decay else state['params']
        noise = jax.random.normal(jax.random.fold_in(k_noise, dim), (settings.num_samples, dim))
        for pred, p in zip(settings.preds, weights):
            model = nnx.merge(graphdef, p)
            xd = np.asarray(sample(model, noise, sampler_spec(settings, pred)))
            x2 = xd @ proj_np
            # A diverged sampler gets null metrics (strict JSON has no Infinity), never a fake number.
            finite = bool(np.all(np.isfinite(xd)))
            cell = {
                'D': dim,
                'pred': pred,
                'manifold_distance': manifold_distance(x2, curve) if finite else None,
                'sliced_w1': (sliced_w1(x2, true_2d, settings.num_directions, settings.seed)
                              if finite else None),
                'off_manifold': off_manifold(xd, proj_np) if finite else None,
            }
            cells.append(cell)
            samples_2d[(dim, pred)] = x2
            log(f'  D={dim} pred={pred}: ' + ' '.join(
                f'{name} {cell[name]:.4f}' if finite else f'{name} null (non-finite samples)'
                for name in ('manifold_distance', 'sliced_w1', 'off_manifold')))

    timing = {'wall_seconds': round(time.time() - start, 1),
              'cpu_seconds': round(time.process_time() - cpu_start, 1)}
    results = {'settings': _settings_json(settings), 'cells': cells, 'timing': timing}
    log(f'done in {timing["wall_seconds"]:.0f}s wall, {timing["cpu_seconds"]:.0f}s CPU')
    if out_dir is not None:
        from jit_jax.experiments import plots  # pylint: disable=import-outside-toplevel

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / 'results.json').write_text(json.dumps(results, indent=2, allow_nan=False) + '\n')
        plots.toy_grid(samples_2d, curve, settings.dims, settings.preds, cells, out_dir / 'toy.png',
                       half_width=spiral.SPIRAL_RADIUS * 1.35,
                       caption=f'{settings.loss}-loss, {settings.steps} steps, {settings.solver} '
                               f'{settings.solver_steps} steps')
        log(f'wrote {out_dir / "results.json"} and {out_dir / "toy.png"}')
    return results


def _settings_json(settings: ToySettings) -> dict[str, Any]:
    out = dataclasses.asdict(settings)
    out['dims'] = list(settings.dims)
    out['preds'] = list(settings.preds)
    return out


# ----------------------------------------------------------------------------------------------------
# CLI

_FLAGS = {'dims': int, 'preds': str, 'loss': str, 'steps': int, 'batch_size': int, 'lr': float,
          'warmup_steps': int, 'end_lr_ratio': float, 'ema_decay': float, 't_dist': str, 't_eps': float,
          'seed': int, 'num_samples': int, 'solver': str, 'solver_steps': int}


def _parse(argv: Sequence[str] | None) -> tuple[ToySettings, pathlib.Path]:
    parser = argparse.ArgumentParser(prog='python -m jit_jax.experiments.toy', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = ToySettings()
    parser.add_argument('--out', required=True, type=pathlib.Path, help='output directory')
    for field, kind in _FLAGS.items():
        parser.add_argument('--' + field.replace('_', '-'), type=kind,
                            nargs='+' if field in ('dims', 'preds') else None,
                            help=f'default {getattr(defaults, field)}')
    parser.add_argument('--quick', action='store_true',
                        help=f'reduced setting for tests: {QUICK}; explicit flags still override it')
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    for field in _FLAGS:
        value = getattr(args, field)
        if value is not None:
            overrides[field] = tuple(value) if isinstance(value, list) else value
    settings = dataclasses.replace(defaults, **overrides)
    settings.validate()
    return settings, args.out


def main(argv: Sequence[str] | None = None) -> int:
    from absl import logging  # pylint: disable=import-outside-toplevel

    logging.set_verbosity(logging.INFO)  # clu's ReportProgress logs steps/s and ETA at INFO
    settings, out = _parse(argv)
    print(f'toy experiment: {json.dumps(_settings_json(settings))}', flush=True)
    run(settings, out, log=lambda msg: print(msg, flush=True))
    return 0


if __name__ == '__main__':
    sys.exit(main())
