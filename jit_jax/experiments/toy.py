"""The paper's toy experiment: a 2-D spiral hidden in D dimensions, x- vs eps- vs v-prediction.

JiT's argument (Li & He 2025, Sec. 3 and Fig. 2) is that clean data lies on a low-dimensional manifold
while noise and velocity fill the whole space, so a network whose width is below the ambient dimension
can still output x but cannot output eps or v. This module reproduces that claim at toy scale: a 2-D
spiral is embedded into D dimensions by a fixed column-orthogonal P (D x 2), a 5-layer ReLU MLP with
256 hidden units is trained as a flow model with each prediction target (same loss space for all), and
the ODE samples are projected back with P^T and scored against the true spiral.

    python -m jit_jax.experiments.toy --out /tmp/toy

writes toy.png (rows D, columns prediction space) and results.json. Time convention as in the rest of
jit_jax: t = 0 is noise, t = 1 is data, z = t*x + (1-t)*e.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
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

from jit_jax import diffusion

PREDS = ('x', 'eps', 'v')
SPACES = ('x', 'eps', 'v')
T_DISTS = ('logit_normal', 'uniform')
SOLVERS = ('euler', 'heun')

# The spiral: 1.5 turns, theta in [THETA_MIN, THETA_MAX], radius proportional to theta and scaled so that
# the outer end sits at SPIRAL_RADIUS. With radius 2 the 2-D data has roughly unit std per axis, like
# images in [-1, 1], and neighbouring arms are 1.0 apart: well separated against N(0, 1) noise at t=0.
THETA_MIN = math.pi
THETA_MAX = 4.0 * math.pi
SPIRAL_RADIUS = 2.0


@dataclasses.dataclass(frozen=True)
class ToySettings:
    """Every knob of the experiment; written verbatim into results.json so a run can be repeated."""

    dims: tuple[int, ...] = (2, 8, 16, 512)
    preds: tuple[str, ...] = PREDS
    loss: str = 'v'  # loss space shared by all prediction targets; JiT's default is v-loss
    steps: int = 3000  # Adam steps per cell
    batch_size: int = 128
    lr: float = 1e-3
    hidden: int = 256
    depth: int = 5  # number of Linear layers (4 hidden ReLU layers + output)
    t_dist: str = 'uniform'
    p_mean: float = -0.8
    p_std: float = 0.8
    t_eps: float = 0.05
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
        if self.steps < 1 or self.chunk_steps < 1 or self.solver_steps < 1:
            raise ValueError(
                f'--steps={self.steps}, chunk_steps={self.chunk_steps}, --solver-steps={self.solver_steps};'
                ' all must be >= 1')
        if self.num_samples < 2:
            raise ValueError(f'--num-samples={self.num_samples}; expected >= 2')


# The reduced setting of --quick (tests, smoke runs): the two extreme dimensions, x vs eps, ~1/20 of the work.
QUICK = dict(dims=(2, 512), preds=('x', 'eps'), steps=600, num_samples=500, solver_steps=25,
             num_ref_points=5000, num_directions=128, chunk_steps=200)


# ----------------------------------------------------------------------------------------------------
# Data


def spiral_points(u: jax.Array) -> jax.Array:  # f32[n] in [0, 1] -> f32[n, 2]
    """Maps u uniformly to arc length (approximately): theta grows like sqrt(u) because the arc element
    of r ~ theta is ~theta dtheta, so uniform u gives evenly spread points instead of a dense centre."""
    theta = jnp.sqrt(THETA_MIN**2 + u * (THETA_MAX**2 - THETA_MIN**2))
    radius = SPIRAL_RADIUS * theta / THETA_MAX
    return jnp.stack([radius * jnp.cos(theta), radius * jnp.sin(theta)], axis=-1)


def sample_spiral(key: jax.Array, n: int) -> jax.Array:  # -> f32[n, 2]
    """n i.i.d. points on the (noise-free) spiral: a 1-D manifold, so distances to it are well defined."""
    return spiral_points(jax.random.uniform(key, (n,)))


def reference_curve(n: int) -> np.ndarray:  # -> f32[n, 2]
    """Dense, evenly parameterised points on the curve, the yardstick of manifold_distance."""
    return np.asarray(spiral_points(jnp.linspace(0.0, 1.0, n)))


def projection(dim: int, seed: int) -> np.ndarray:  # -> f32[dim, 2]
    """Column-orthogonal embedding: QR of a Gaussian, so P^T P = I and x_D = P x_2 preserves distances.
    Computed in float64 numpy so that the orthogonality holds to ~1e-7 in float32."""
    gauss = np.random.default_rng([seed, dim]).standard_normal((dim, 2))
    q, r = np.linalg.qr(gauss)
    q = q * np.sign(np.diag(r))[None, :]  # fix the sign so P does not depend on the LAPACK build
    return q.astype(np.float32)


def embed(x2: jax.Array, proj: jax.Array) -> jax.Array:  # f32[n, 2], f32[D, 2] -> f32[n, D]
    return x2 @ proj.T


def unembed(xd: jax.Array, proj: jax.Array) -> jax.Array:  # f32[n, D], f32[D, 2] -> f32[n, 2]
    return xd @ proj


# ----------------------------------------------------------------------------------------------------
# Metrics (numpy: they run once per cell on 2000 points)


def manifold_distance(samples: np.ndarray, curve: np.ndarray, block: int = 500) -> float:
    """Mean distance from each 2-D sample to its nearest reference point on the curve. Chunked so the
    (samples x curve) distance matrix never exceeds block x len(curve) floats."""
    samples = np.asarray(samples, np.float64)
    curve = np.asarray(curve, np.float64)
    curve_sq = np.sum(curve**2, axis=1)
    nearest = []
    for start in range(0, len(samples), block):
        s = samples[start:start + block]
        d2 = np.sum(s**2, axis=1)[:, None] - 2.0 * s @ curve.T + curve_sq[None, :]
        nearest.append(np.sqrt(np.maximum(d2.min(axis=1), 0.0)))
    return float(np.mean(np.concatenate(nearest)))


def sliced_w1(a: np.ndarray, b: np.ndarray, num_directions: int, seed: int) -> float:
    """Sliced Wasserstein-1 between two equal-size 2-D point sets: in 1-D, W1 between empirical
    measures of equal size is the mean |difference| of the sorted values, averaged over directions.
    Unlike manifold_distance it also penalises samples that pile onto one part of the curve."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f'sliced_w1 needs equal-size sets; got {a.shape} and {b.shape}')
    angles = np.random.default_rng(seed).uniform(0.0, np.pi, num_directions)
    dirs = np.stack([np.cos(angles), np.sin(angles)], axis=0)  # f64[2, k]
    pa = np.sort(a @ dirs, axis=0)
    pb = np.sort(b @ dirs, axis=0)
    return float(np.mean(np.abs(pa - pb)))


def off_manifold(xd: np.ndarray, proj: np.ndarray) -> float:
    """Mean ||x - P P^T x||: how far D-dim samples leave the plane that holds the data. eps- and v-pred
    fail here first, because the noise they must predict lives in all D dimensions."""
    xd = np.asarray(xd, np.float64)
    proj = np.asarray(proj, np.float64)
    resid = xd - (xd @ proj) @ proj.T
    return float(np.mean(np.linalg.norm(resid, axis=1)))


# ----------------------------------------------------------------------------------------------------
# Model, training and sampling


class MLP(nnx.Module):
    """The paper's toy denoiser: Linear layers with ReLU in between, input (z, t), output D values.
    t enters as a raw extra input, as in the paper's toy; the hidden width (256) is the bottleneck that
    makes eps/v-prediction impossible once D > 256."""

    def __init__(self, dim: int, hidden: int, depth: int, *, rngs: nnx.Rngs):
        widths = [dim + 1] + [hidden] * (depth - 1) + [dim]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])

    def __call__(self, z: jax.Array, t: jax.Array) -> jax.Array:  # f32[b, D], f32[b, 1] -> f32[b, D]
        h = jnp.concatenate([z, t], axis=-1)
        for layer in self.layers[:-1]:
            h = jax.nn.relu(layer(h))
        return self.layers[-1](h)


def sample_t(key: jax.Array, n: int, settings: ToySettings) -> jax.Array:  # -> f32[n]
    """JiT's logit-normal (diffusion.sample_t) or uniform; see the README section for why the toy
    default differs from JiT's (-0.8, 0.8)."""
    if settings.t_dist == 'uniform':
        return jax.random.uniform(key, (n,))
    return diffusion.sample_t(key, n, p_mean=settings.p_mean, p_std=settings.p_std)


def flow_loss(model: MLP, x: jax.Array, e: jax.Array, t: jax.Array, *, pred: str,
              settings: ToySettings) -> jax.Array:
    """Mean squared error in the shared loss space; each target differs only in what the net outputs."""
    z = diffusion.interpolate(x, e, t)  # f32[b, D]
    out = model(z, t[:, None])
    got = diffusion.convert_output(out, z, t, pred=pred, space=settings.loss, t_eps=settings.t_eps)
    want = diffusion.target(x, e, z, t, space=settings.loss, pred=pred, t_eps=settings.t_eps)
    return jnp.mean(jnp.square(got - want))


def make_train_chunk(graphdef: nnx.GraphDef, settings: ToySettings, dim: int):
    """One jitted program that advances every prediction target by chunk_steps Adam steps.
    The targets share each step's (x, t, e) draws, so the comparison is paired, and one program per D
    avoids a Python dispatch per step, which would be felt at D=2 where a step takes a few ms."""

    def step(state: nnx.State, key: jax.Array, proj: jax.Array) -> tuple[nnx.State, jax.Array]:
        models, opts = nnx.merge(graphdef, state)
        k_x, k_t, k_e = jax.random.split(key, 3)
        x = embed(sample_spiral(k_x, settings.batch_size), proj)  # f32[b, D]
        t = sample_t(k_t, settings.batch_size, settings)  # f32[b]
        e = jax.random.normal(k_e, (settings.batch_size, dim))  # f32[b, D]
        losses = []
        for pred, model, opt in zip(settings.preds, models, opts):
            loss_fn = functools.partial(flow_loss, pred=pred, settings=settings)
            loss, grads = nnx.value_and_grad(loss_fn)(model, x, e, t)
            opt.update(model, grads)
            losses.append(loss)
        return nnx.state((models, opts)), jnp.stack(losses)

    @functools.partial(jax.jit, static_argnames='num_steps')
    def chunk(state: nnx.State, key: jax.Array, proj: jax.Array,
              num_steps: int) -> tuple[nnx.State, jax.Array]:
        keys = jax.random.split(key, num_steps)
        state, losses = jax.lax.scan(lambda s, k: step(s, k, proj), state, keys)
        return state, losses.mean(axis=0)  # f32[num_preds]

    return chunk


def velocity(model: MLP, z: jax.Array, t: jax.Array, *, pred: str, t_eps: float) -> jax.Array:
    """dz/dt from any prediction target, through the same Table-1 conversion the loss uses."""
    tb = jnp.full((z.shape[0],), t, z.dtype)  # f32[n]
    return diffusion.convert_output(model(z, tb[:, None]), z, tb, pred=pred, space='v', t_eps=t_eps)


@nnx.jit(static_argnames=('pred', 'solver', 'num_steps', 't_eps'))
def sample_ode(model: MLP, noise: jax.Array, *, pred: str, solver: str, num_steps: int,
               t_eps: float) -> jax.Array:  # f32[n, D] -> f32[n, D]
    """Integrates t = 0 -> 1 on a uniform grid. Heun follows JiT: second-order steps except the last,
    which is Euler, so the network is never evaluated at t = 1 (where x-pred's conversion would hit
    the t_eps clamp)."""
    dt = 1.0 / num_steps

    def euler(i: jax.Array, z: jax.Array) -> jax.Array:
        return z + dt * velocity(model, z, i * dt, pred=pred, t_eps=t_eps)

    def heun(i: jax.Array, z: jax.Array) -> jax.Array:
        t = i * dt
        v0 = velocity(model, z, t, pred=pred, t_eps=t_eps)
        v1 = velocity(model, z + dt * v0, t + dt, pred=pred, t_eps=t_eps)
        return z + dt * 0.5 * (v0 + v1)

    z = jax.lax.fori_loop(0, num_steps - 1, euler if solver == 'euler' else heun, noise)
    return euler(jnp.asarray(num_steps - 1), z)


def _step_cost(dim: int, settings: ToySettings) -> float:
    """Relative cost of one training step (MLP multiply-adds times targets), for the ETA only."""
    widths = [dim + 1] + [settings.hidden] * (settings.depth - 1) + [dim]
    return float(sum(a * b for a, b in zip(widths[:-1], widths[1:])) + 2e4) * len(settings.preds)


def run(settings: ToySettings, out_dir: pathlib.Path | None = None,
        log=print) -> dict[str, Any]:
    """Trains and evaluates every (D, pred) cell; writes results.json and toy.png when out_dir is set."""
    settings.validate()
    num_cells = len(settings.dims) * len(settings.preds)
    costs = [_step_cost(d, settings) * settings.steps for d in settings.dims]
    timed_cost = timed_wall = 0.0  # chunks without compilation, for the ETA
    start = time.time()
    curve = reference_curve(settings.num_ref_points)
    k_true, k_init, k_train, k_noise = jax.random.split(jax.random.key(settings.seed), 4)
    true_2d = np.asarray(sample_spiral(k_true, settings.num_samples))
    cells: list[dict[str, Any]] = []
    samples_2d: dict[tuple[int, str], np.ndarray] = {}

    for d_index, dim in enumerate(settings.dims):
        proj_np = projection(dim, settings.seed)
        proj = jnp.asarray(proj_np)
        first_cell = d_index * len(settings.preds) + 1
        last_cell = first_cell + len(settings.preds) - 1
        # Same initial weights for every target: they differ only in what the output means.
        init_key = jax.random.fold_in(k_init, dim)
        models = tuple(MLP(dim, settings.hidden, settings.depth, rngs=nnx.Rngs(params=init_key))
                       for _ in settings.preds)
        opts = tuple(nnx.Optimizer(m, optax.adam(settings.lr), wrt=nnx.Param) for m in models)
        graphdef, state = nnx.split((models, opts))
        chunk = make_train_chunk(graphdef, settings, dim)
        key = jax.random.fold_in(k_train, dim)
        step = 0
        while step < settings.steps:
            key, sub = jax.random.split(key)
            num_steps = min(settings.chunk_steps, settings.steps - step)
            chunk_start = time.time()
            state, losses = chunk(state, sub, proj, num_steps)
            losses = np.asarray(losses)  # waits for the chunk, so the timing below is real
            if step > 0 and num_steps == settings.chunk_steps:  # the first chunk of each D compiles
                timed_cost += costs[d_index] * num_steps / settings.steps
                timed_wall += time.time() - chunk_start
            step += num_steps
            left = sum(costs[d_index + 1:]) + costs[d_index] * (settings.steps - step) / settings.steps
            elapsed = time.time() - start
            eta = f'{left * timed_wall / timed_cost:.0f}s' if timed_cost else '?'
            loss_txt = ' '.join(f'{p}={l:.4f}' for p, l in zip(settings.preds, losses))
            log(f'cells {first_cell}-{last_cell}/{num_cells} D={dim} step {step}/{settings.steps} '
                f'loss[{settings.loss}] {loss_txt} elapsed {elapsed:.0f}s ETA(train) {eta}')
        models, _ = nnx.merge(graphdef, state)
        noise = jax.random.normal(jax.random.fold_in(k_noise, dim), (settings.num_samples, dim))
        for pred, model in zip(settings.preds, models):
            xd = np.asarray(sample_ode(model, noise, pred=pred, solver=settings.solver,
                                       num_steps=settings.solver_steps, t_eps=settings.t_eps))
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

    wall = time.time() - start
    results = {'settings': _settings_json(settings), 'cells': cells}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / 'results.json').write_text(json.dumps(results, indent=2, allow_nan=False) + '\n')
        draw_grid(samples_2d, curve, settings, cells).save(out_dir / 'toy.png')
        log(f'wrote {out_dir / "results.json"} and {out_dir / "toy.png"} ({wall:.0f}s)')
    return results


def _settings_json(settings: ToySettings) -> dict[str, Any]:
    out = dataclasses.asdict(settings)
    out['dims'] = list(settings.dims)
    out['preds'] = list(settings.preds)
    return out


# ----------------------------------------------------------------------------------------------------
# Figure (Pillow only, so the experiment never needs matplotlib)


def draw_grid(samples: dict[tuple[int, str], np.ndarray], curve: np.ndarray, settings: ToySettings,
              cells: Sequence[dict[str, Any]] = (), panel: int = 240, margin: int = 28):
    """Rows are D, columns are prediction targets; the true spiral in blue under translucent red samples,
    so density shows. Samples outside a panel's window are clipped to its border (a diverged cell shows
    up as a frame of dots rather than an empty panel), and each panel prints its manifold_distance."""
    from PIL import Image, ImageDraw  # Pillow ships with the venv; imported here to keep import light

    rows, cols = len(settings.dims), len(settings.preds)
    width = margin + cols * panel
    height = margin + rows * panel + 18
    img = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(img, 'RGBA')  # 'RGBA' makes translucent fills blend instead of overwrite
    half = SPIRAL_RADIUS * 1.35  # world half-width of a panel
    scores = {(c['D'], c['pred']): c['manifold_distance'] for c in cells
              if c['manifold_distance'] is not None}

    def to_px(p: np.ndarray, r: int, c: int) -> np.ndarray:  # f[n, 2] world -> f[n, 2] pixels
        inner = panel - 8
        q = np.clip(p, -half, half)
        px = margin + c * panel + 4 + (q[:, 0] + half) / (2 * half) * inner
        py = margin + r * panel + 4 + (half - q[:, 1]) / (2 * half) * inner
        return np.stack([px, py], axis=1)

    for c, pred in enumerate(settings.preds):
        draw.text((margin + c * panel + panel // 2 - 20, 8), f'{pred}-pred', fill='black')
    for r, dim in enumerate(settings.dims):
        draw.text((2, margin + r * panel + panel // 2), f'D={dim}', fill='black')
        for c, pred in enumerate(settings.preds):
            x0, y0 = margin + c * panel, margin + r * panel
            draw.rectangle([x0 + 2, y0 + 2, x0 + panel - 2, y0 + panel - 2], outline=(160, 160, 160))
            draw.line([tuple(map(float, q)) for q in to_px(curve[::8], r, c)], fill=(60, 90, 200), width=1)
            pts = samples.get((dim, pred))
            if pts is not None:
                pts = np.where(np.isfinite(pts), pts, half)
                for px, py in to_px(pts, r, c):
                    draw.ellipse([px - 1.3, py - 1.3, px + 1.3, py + 1.3], fill=(210, 30, 30, 110))
            if (dim, pred) in scores:
                draw.text((x0 + 8, y0 + 6), f'md {scores[(dim, pred)]:.3g}', fill='black')
    draw.text((4, height - 16), f'{settings.loss}-loss, {settings.steps} steps, {settings.solver} '
              f'{settings.solver_steps} steps; blue: true spiral, red: samples P^T x; md: manifold_distance',
              fill='black')
    return img


# ----------------------------------------------------------------------------------------------------
# CLI


def _parse(argv: Sequence[str] | None) -> tuple[ToySettings, pathlib.Path]:
    parser = argparse.ArgumentParser(prog='python -m jit_jax.experiments.toy', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = ToySettings()
    parser.add_argument('--out', required=True, type=pathlib.Path, help='output directory')
    parser.add_argument('--dims', type=int, nargs='+', help=f'ambient dimensions (default {defaults.dims})')
    parser.add_argument('--preds', nargs='+', choices=PREDS, help='prediction targets (default all)')
    parser.add_argument('--loss', choices=SPACES, help=f'shared loss space (default {defaults.loss})')
    parser.add_argument('--steps', type=int, help=f'Adam steps per cell (default {defaults.steps})')
    parser.add_argument('--seed', type=int, help='seed for P, init, data, noise (default 0)')
    parser.add_argument('--num-samples', type=int, help=f'samples per cell (default {defaults.num_samples})')
    parser.add_argument('--solver', choices=SOLVERS, help=f'ODE solver (default {defaults.solver})')
    parser.add_argument('--solver-steps', type=int, help=f'ODE steps (default {defaults.solver_steps})')
    parser.add_argument('--quick', action='store_true',
                        help=f'reduced setting for tests: {QUICK}; explicit flags still override it')
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    for flag, field in [('dims', 'dims'), ('preds', 'preds'), ('loss', 'loss'), ('steps', 'steps'),
                        ('seed', 'seed'), ('num_samples', 'num_samples'), ('solver', 'solver'),
                        ('solver_steps', 'solver_steps')]:
        value = getattr(args, flag)
        if value is not None:
            overrides[field] = tuple(value) if isinstance(value, list) else value
    settings = dataclasses.replace(defaults, **overrides)
    settings.validate()
    return settings, args.out


def main(argv: Sequence[str] | None = None) -> int:
    settings, out = _parse(argv)
    print(f'toy experiment: {json.dumps(_settings_json(settings))}', flush=True)
    run(settings, out, log=lambda msg: print(msg, flush=True))
    return 0


if __name__ == '__main__':
    sys.exit(main())
