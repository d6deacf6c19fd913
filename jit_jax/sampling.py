"""ODE sampling for JiT: Euler / Heun from t = 0 (noise) to t = 1 (data) with interval CFG.

What the official `Denoiser.generate` does, and what we keep :

* Grid t_i = linspace(0, 1, num_steps + 1) in float32, built with torch's CPU formula (from 0 for the
  first half, from 1 for the second half) so the float32 grid points, and therefore every strict
  interval comparison, are the official ones.
* Steps 0 .. num_steps - 2 use the chosen method; the last step (t = 1 - 1/num_steps -> 1) is always a
  plain Euler step, also for Heun, so the network is never evaluated at t = 1 (where v = (x - z)/(1 - t)
  would need the t_eps clamp in earnest).
* Guided velocity V(z, t) = v_u + w(t) (v_c - v_u), with w(t) = cfg_scale if t < interval_max and
  (interval_min == 0 or t > interval_min), else 1; strict comparisons in float32.

What we do differently, without changing the numbers:

* Conditional and unconditional passes share ONE network call of batch 2B. The rows are interleaved
  (sample i's conditional row, then its unconditional row) rather than concatenated as [z; z]: with the
  batch sharded over a mesh, each device then finds both copies of its own samples locally, so no
  resharding is needed around the network call.
* With ``skip_uncond`` (default) the unconditional half is skipped at steps where w(t) == 1 (CFG off,
  outside the interval): a `lax.cond` on the scalar t chooses between a batch-B and a batch-2B call
  inside the compiled program. Where w == 1 both paths return v_c itself (up to the network's
  batch-size rounding, about 1e-6 here).
* The whole trajectory is one compiled program: one `lax.scan` over the network evaluations (see
  `Schedule`), so the network appears once in the program whatever the method and step count.
* The network output is converted to a velocity with `diffusion.convert_output`, so x-, eps- and
  v-prediction networks all sample.

Entry points, one per job, each taking a `SamplerSpec` (which validated itself when built):
`sample_with_spec` (from given noise), `sample_from_seed` (noise drawn from a key, laid out like the
labels), `sample_step` (one ODE step, for per-step parity); `sample` is the stable keyword form of
`sample_with_spec` for external tools.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jit_jax import config_lib, diffusion

METHODS = ('heun', 'euler')
_SAMPLER = config_lib.base().sampler  # the one source of defaults
_DIFFUSION = config_lib.base().diffusion
# config.sampler fields that the training loop reads, not the sampler.
LOOP_FIELDS = ('ema', 'num_images')


def _check(name: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f'config.sampler.{name}={value!r}: expected {expected}')


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """Static sampler settings (``config.sampler`` plus t_eps and pred from ``config.diffusion``).

    Frozen and hashable: it is a static argument of the compiled sampler. Defaults are config_lib.base()'s.
    Official flags: sampling_method, num_sampling_steps, cfg, interval_min, interval_max.
    """

    method: str = _SAMPLER.method
    num_steps: int = _SAMPLER.num_steps
    cfg_scale: float = _SAMPLER.cfg_scale
    interval_min: float = _SAMPLER.interval_min
    interval_max: float = _SAMPLER.interval_max
    t_eps: float = _DIFFUSION.t_eps
    pred: str = _DIFFUSION.pred

    def __post_init__(self):
        _check('method', self.method, self.method in METHODS, "'heun' or 'euler'")
        steps = self.num_steps
        _check('num_steps', steps, isinstance(steps, (int, np.integer)) and not isinstance(steps, bool)
               and steps >= 1, 'an integer >= 1')
        object.__setattr__(self, 'num_steps', int(steps))
        for name in ('cfg_scale', 'interval_min', 'interval_max'):
            _check(name, getattr(self, name), _is_number(getattr(self, name)), 'a finite number')
            object.__setattr__(self, name, float(getattr(self, name)))
        _check('cfg_scale', self.cfg_scale, self.cfg_scale >= 0, '>= 0 (1.0 = no guidance)')
        _check('interval_min', self.interval_min, 0 <= self.interval_min <= self.interval_max,
               f'in [0, config.sampler.interval_max={self.interval_max}]: the CFG interval must not be empty')
        _check('interval_max', self.interval_max, self.interval_max <= 1, '<= 1')
        for name in ('t_eps', 'pred'):  # config.diffusion fields, checked by their one rule
            object.__setattr__(self, name, diffusion.checked(name, getattr(self, name)))

    @classmethod
    def from_config(cls, sampler_cfg: Any, diffusion_cfg: Any) -> SamplerSpec:
        """Build from ``config.sampler`` and ``config.diffusion`` (t_eps, pred), strictly.

        Every field must be there; a field the groups should not have is an error naming it.
        """
        shared = ('t_eps', 'pred')
        own = tuple(f.name for f in dataclasses.fields(cls) if f.name not in shared)
        flow = tuple(f.name for f in dataclasses.fields(diffusion.FlowSpec) if f.name not in shared)
        return cls(**diffusion.config_fields(sampler_cfg, 'sampler', own, LOOP_FIELDS),
                   **diffusion.config_fields(diffusion_cfg, 'diffusion', shared, flow))


def time_grid(num_steps: int) -> np.ndarray:
    """The official float32 grid linspace(0, 1, num_steps + 1), bit for bit as torch's CPU kernel.

    torch fills the first half as 0 + step * i and the second half as 1 - step * (n - 1 - i) with
    step = 1 / num_steps in float32; e.g. its 4/6 is 0.6666666, not the correctly rounded 0.6666667.
    Matching it keeps the strict interval tests on the official side of every boundary.
    """
    n = num_steps + 1
    step = np.float32(1.0) / np.float32(num_steps)
    i = np.arange(n, dtype=np.float32)
    first = np.float32(0.0) + step * i
    second = np.float32(1.0) - step * (np.float32(n - 1) - i)
    return np.where(np.arange(n) < n // 2, first, second).astype(np.float32)  # f32[num_steps + 1]


def guidance_weight(t: jax.Array, spec: SamplerSpec) -> jax.Array:
    """w(t) = cfg_scale inside the (strict, float32) interval, else 1; ``interval_min == 0`` includes t = 0."""
    t = jnp.asarray(t, jnp.float32)
    active = t < np.float32(spec.interval_max)
    if spec.interval_min != 0.0:
        active = active & (t > np.float32(spec.interval_min))
    return jnp.where(active, np.float32(spec.cfg_scale), np.float32(1.0))


def _velocity(net: Any, z: jax.Array, t: jax.Array, labels: jax.Array, spec: SamplerSpec) -> jax.Array:
    """Network output at (z, t, labels) as a velocity; t is a scalar shared by the batch."""
    t_batch = jnp.full((z.shape[0],), t, jnp.float32)  # f32[b]
    out = net(z, t_batch, labels)
    return diffusion.convert_output(out, z, t, pred=spec.pred, space='v', t_eps=spec.t_eps)


def guided_velocity(model: Any, z: jax.Array, labels: jax.Array, t: jax.Array, spec: SamplerSpec, *,
                    skip_uncond: bool = True, net: Any = None) -> jax.Array:
    """V(z, t) = v_u + w(t) (v_c - v_u) for z f32[b, h, w, c], labels i32[b] and a scalar t.

    Both passes run as one batch-2B call (interleaved rows, see the module docstring). With
    ``skip_uncond`` a ``lax.cond`` runs only the conditional batch-B call where w(t) == 1. ``net``
    (default: the model) is the network to call, with z in its layout (see diffusion.pixel_layout);
    ``model`` gives the null label ``model.num_classes``.
    """
    net = model if net is None else net
    z = jnp.asarray(z, jnp.float32)
    t = jnp.asarray(t, jnp.float32)
    w = guidance_weight(t, spec)  # f32[]

    def both() -> jax.Array:
        b = z.shape[0]
        null = jnp.full_like(labels, model.num_classes)
        z2 = jnp.stack([z, z], axis=1).reshape((2 * b,) + z.shape[1:])  # f32[2b, ...] in the layout of z
        y2 = jnp.stack([labels, null], axis=1).reshape(2 * b)  # i32[2b]: label, null, label, null ...
        v2 = _velocity(net, z2, t, y2, spec).reshape((b, 2) + z.shape[1:])
        v_cond, v_uncond = v2[:, 0], v2[:, 1]
        # Where w == 1 return v_cond itself, the value the skip_uncond path returns (v_u + 1 * (v_c - v_u)
        # would add a rounding); the two paths then differ only by the network's batch-size rounding.
        return jnp.where(w == 1.0, v_cond, v_uncond + w * (v_cond - v_uncond))

    def cond_only() -> jax.Array:
        return _velocity(net, z, t, labels, spec)

    if not skip_uncond:
        return both()  # the official behaviour: always both passes
    if spec.cfg_scale == 1.0:
        return cond_only()  # w == 1 everywhere
    return jax.lax.cond(w != 1.0, both, cond_only)


class Schedule(NamedTuple):
    """The sampler unrolled into guided-velocity evaluations, one scan iteration each.

    A Heun step is a predictor evaluation (Euler move, remembering the start point) followed by a
    corrector evaluation at t_next; an Euler step is a lone predictor. Scanning over evaluations rather
    than steps puts a single copy of the network (two with the skip_uncond cond) in the compiled
    program instead of two (four) per Heun step, which roughly halves compile time.
    """

    t: np.ndarray  # f32[E] time at which the velocity is evaluated
    dt: np.ndarray  # f32[E] t_next - t of the step the evaluation belongs to
    correct: np.ndarray  # bool[E] True for a Heun corrector evaluation
    step_start: np.ndarray  # i32[S] evaluation index at which each ODE step starts
    step_end: np.ndarray  # i32[S] evaluation index that produces each step's output


def schedule(spec: SamplerSpec) -> Schedule:
    """Steps 0 .. S-2 with ``spec.method``, then the final step t_{S-1} -> 1 as a plain Euler step."""
    grid = time_grid(spec.num_steps)
    t, dt, correct, starts, ends = [], [], [], [], []
    for i in range(spec.num_steps):
        h = grid[i + 1] - grid[i]  # float32 subtraction, as the official t_next - t
        starts.append(len(t))
        t.append(grid[i])
        dt.append(h)
        correct.append(False)
        if spec.method == 'heun' and i < spec.num_steps - 1:  # corrector at t_next, same dt
            t.append(grid[i + 1])
            dt.append(h)
            correct.append(True)
        ends.append(len(t) - 1)
    return Schedule(t=np.asarray(t, np.float32), dt=np.asarray(dt, np.float32), correct=np.asarray(correct),
                    step_start=np.asarray(starts, np.int32), step_end=np.asarray(ends, np.int32))


def _integrate(model: Any, z: jax.Array, labels: jax.Array, t: jax.Array, dt: jax.Array, correct: jax.Array,
               spec: SamplerSpec, *, skip_uncond: bool, record: bool):
    """Run the evaluations (t, dt, correct): f32[E] each) from z f32[b, h, w, c] in one lax.scan.

    Heun, as the official code: z_e = z + dt v0; z' = z + dt * 0.5 (v0 + v1), with v1 taken at (z_e, t_next).
    With ``record``, also returns every evaluation's input and output state (f32[E, b, h, w, c] each).
    The states are carried in the model's own pixel layout (patch tokens for JiT), as in training.
    """
    to_net, net, from_net = diffusion.pixel_layout(model)

    def body(carry, xs):
        z_cur, z_base, v_prev = carry  # z_base: the step's start point; v_prev: the predictor's velocity
        t_i, dt_i, correct_i = xs
        v = guided_velocity(model, z_cur, labels, t_i, spec, skip_uncond=skip_uncond, net=net)
        z_new = jnp.where(correct_i, z_base + dt_i * (0.5 * (v_prev + v)), z_cur + dt_i * v)
        z_base = jnp.where(correct_i, z_base, z_cur)
        return (z_new, z_base, v), ((z_cur, z_new) if record else None)

    z = to_net(z)
    init = (z, z, jnp.zeros_like(z))
    (z, _, _), states = jax.lax.scan(body, init, (t, dt, correct))
    return from_net(z), (jax.tree.map(jax.vmap(from_net), states) if record else None)


@nnx.jit(static_argnames=('spec', 'heun', 'skip_uncond'))
def sample_step(model: Any, z: jax.Array, labels: jax.Array, t: jax.Array, t_next: jax.Array,
                spec: SamplerSpec, *, heun: bool, skip_uncond: bool = True) -> jax.Array:
    """One jitted ODE step t -> t_next (Heun or Euler): for per-step parity with the official trajectory."""
    t = jnp.asarray(t, jnp.float32).reshape(())
    t_next = jnp.asarray(t_next, jnp.float32).reshape(())
    dt = t_next - t
    if heun:
        ts, dts, correct = jnp.stack([t, t_next]), jnp.stack([dt, dt]), jnp.array([False, True])
    else:
        ts, dts, correct = t[None], dt[None], jnp.array([False])
    z_out, _ = _integrate(model, jnp.asarray(z, jnp.float32), jnp.asarray(labels, jnp.int32), ts, dts, correct,
                          spec, skip_uncond=skip_uncond, record=False)
    return z_out


@nnx.jit(static_argnames=('spec', 'skip_uncond', 'return_trajectory'))
def _sample_jit(model: Any, noise: jax.Array, labels: jax.Array, spec: SamplerSpec, skip_uncond: bool,
                return_trajectory: bool):
    plan = schedule(spec)  # numpy constants, baked into the program
    z0 = jnp.asarray(noise, jnp.float32)  # f32[b, h, w, c]
    z, states = _integrate(model, z0, jnp.asarray(labels, jnp.int32), jnp.asarray(plan.t), jnp.asarray(plan.dt),
                           jnp.asarray(plan.correct), spec, skip_uncond=skip_uncond, record=return_trajectory)
    if not return_trajectory:
        return z
    grid = time_grid(spec.num_steps)
    trajectory = {
        'z_in': states[0][plan.step_start],  # f32[S, b, h, w, c] state entering each ODE step
        'z_out': states[1][plan.step_end],  # f32[S, b, h, w, c] state leaving it
        't': jnp.asarray(grid[:-1]),  # f32[S]
        't_next': jnp.asarray(grid[1:]),  # f32[S]
    }
    return z, trajectory


def sample_with_spec(model: Any, noise: jax.Array, labels: jax.Array, spec: SamplerSpec, *,
                     skip_uncond: bool = True, return_trajectory: bool = False):
    """`sample` with the settings already gathered in a `SamplerSpec`."""
    noise_shape = np.shape(noise)
    if len(noise_shape) != 4:
        raise ValueError(f'noise must be NHWC f32[b, h, w, c]; got shape {noise_shape}')
    if np.shape(labels) != noise_shape[:1]:
        raise ValueError(f'labels must be i32[b] with b = {noise_shape[0]} (the noise batch); '
                         f'got shape {np.shape(labels)}')
    if not hasattr(model, 'num_classes'):
        raise ValueError('the model must expose num_classes (the null label id used for CFG)')
    return _sample_jit(model, noise, labels, spec=spec, skip_uncond=bool(skip_uncond),
                       return_trajectory=bool(return_trajectory))


def sample(model: Any, noise: jax.Array, labels: jax.Array, *, method: str = SamplerSpec.method,
           num_steps: int = SamplerSpec.num_steps, cfg_scale: float = SamplerSpec.cfg_scale,
           interval_min: float = SamplerSpec.interval_min, interval_max: float = SamplerSpec.interval_max,
           t_eps: float = SamplerSpec.t_eps, pred: str = SamplerSpec.pred, skip_uncond: bool = True,
           return_trajectory: bool = False):
    """Integrate dz/dt = V(z, t) from t = 0 to t = 1 in one compiled program; returns NHWC images.

    The stable keyword form of `sample_with_spec` for external tools.

    Args:
        model: NNX module ``model(z, t, y)`` -> f32[b, h, w, c] in ``pred`` space, with
            ``model.num_classes`` = the null label id.
        noise: f32[b, h, w, c] NHWC starting point z_0, ALREADY scaled by noise_scale exactly as the
            official generator does it: z_0 = noise_scale * N(0, 1) (this function does not scale it).
            It may carry a NamedSharding over the batch; it is not moved to one device.
        labels: i32[b] class labels (``model.num_classes`` gives an unconditional sample).
        method, num_steps, cfg_scale, interval_min, interval_max, t_eps, pred: see `SamplerSpec` (the
            defaults are config_lib.base()'s: Heun 50 steps, CFG 3.0 on [0.1, 1]).
        skip_uncond: skip the unconditional pass where w(t) == 1 (same results, fewer forwards).
        return_trajectory: also return the per-step states.

    Returns:
        f32[b, h, w, c] images in the model's output range (not clipped; `to_uint8` maps them), or
        (images, trajectory) with trajectory = {'z_in', 'z_out': f32[S, b, h, w, c], 't', 't_next': f32[S]}.
    """
    spec = SamplerSpec(method=method, num_steps=num_steps, cfg_scale=cfg_scale, interval_min=interval_min,
                       interval_max=interval_max, t_eps=t_eps, pred=pred)
    return sample_with_spec(model, noise, labels, spec, skip_uncond=skip_uncond,
                            return_trajectory=return_trajectory)


def _batch_sharding(labels: jax.Array, ndim: int) -> NamedSharding | None:
    """The sharding for an ndim-array whose batch axis is laid out like the (sharded) labels."""
    sharding = getattr(labels, 'sharding', None)
    if not isinstance(sharding, NamedSharding):
        return None
    batch_axes = sharding.spec[0] if len(sharding.spec) else None
    return NamedSharding(sharding.mesh, PartitionSpec(batch_axes, *([None] * (ndim - 1))))


@functools.lru_cache(maxsize=32)
def _noise_fn(shape: tuple[int, ...], noise_scale: float, sharding: NamedSharding | None):
    """A cached jitted noise draw; with a sharding it is generated already split over the mesh."""

    def draw(key: jax.Array) -> jax.Array:
        return np.float32(noise_scale) * jax.random.normal(key, shape, jnp.float32)

    return jax.jit(draw) if sharding is None else jax.jit(draw, out_shardings=sharding)


def sample_from_seed(model: Any, labels: jax.Array, key: jax.Array, spec: SamplerSpec,
                     image_shape: tuple[int, int, int], noise_scale: float, *, skip_uncond: bool = True,
                     return_trajectory: bool = False):
    """Sample from z_0 = noise_scale * N(0, 1) drawn from ``key``: reproducible from a seed.

    image_shape is (h, w, c). If labels carry a NamedSharding, the noise is created with the same
    batch sharding (generated sharded, never gathered on one device).
    """
    noise_scale = diffusion.checked('noise_scale', noise_scale)
    shape = (int(np.shape(labels)[0]),) + tuple(int(s) for s in image_shape)
    if len(shape) != 4:
        raise ValueError(f'image_shape must be (h, w, c); got {image_shape}')
    noise = _noise_fn(shape, float(noise_scale), _batch_sharding(labels, 4))(key)  # f32[b, h, w, c]
    return sample_with_spec(model, noise, labels, spec, skip_uncond=skip_uncond,
                            return_trajectory=return_trajectory)


def to_uint8(images: jax.Array) -> jax.Array:
    """Official image export: (x + 1) / 2 * 255, round (half to even), clip to [0, 255], uint8."""
    x = jnp.asarray(images, jnp.float32)
    return jnp.clip(jnp.round((x + 1.0) / 2.0 * 255.0), 0.0, 255.0).astype(jnp.uint8)
