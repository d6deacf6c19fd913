"""The flow-matching core of JiT: the noise path, x/eps/v conversions, t sampling and the loss.

Conventions (paper and official code):

* t in [0, 1], t = 0 is pure noise and t = 1 is clean data (the reverse of many rectified-flow write-ups).
* z_t = t * x + (1 - t) * e with e = noise_scale * N(0, I); the velocity is v = dz/dt = x - e.
* The network sees (z_t, t, y) and its output lives in one of three spaces, ``pred`` in {'x', 'eps', 'v'};
  the loss is a mean squared error in a possibly different space ``loss`` in {'x', 'eps', 'v'}.
  The default, and the only one that works at 256 px and above, is x-pred with a v-loss.

Everything here is a pure function of arrays plus a frozen `FlowSpec`, so the jitted train step can
close over the spec as a static argument. Images are NHWC; t is f32[b].

Division rule (the t_eps clamp). The conversions of paper Table 1 divide by (1 - t) (x-pred) or by t
(eps-pred). The official code only ever divides by 1 - t and always through max(1 - t, t_eps). We clamp
both divisors: max(1 - t, t_eps) and max(t, t_eps). The second clamp is ours: the sampler starts at
t = 0, where an eps-pred network's implied x = (z - (1 - t) eps) / t would be a division by zero.

Target rule. The training target in the loss space is the *true* value in the prediction space pushed
through the same conversion as the prediction (`target`). Both sides therefore share the same clamped
denominator, exactly as the official x-pred / v-loss code does with v = (x - z) / max(1 - t, t_eps);
the loss is then a pred-space squared error times the square of a bounded conversion factor, and the
clean x (or the true e, v) is still its minimiser even where the clamp is active. Without a clamp the
target is simply x, e or x - e; the two forms only differ for t > 1 - t_eps (x-pred) or t < t_eps
(eps-pred).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

SPACES = ('x', 'eps', 'v')


def _check_space(value: str, field: str) -> None:
    """Raise a ValueError naming the config field unless ``value`` is one of x / eps / v."""
    if value not in SPACES:
        raise ValueError(f"{field}={value!r}: expected one of 'x', 'eps', 'v'")


def _check_t_eps(value: float, field: str) -> None:
    """t_eps caps the conversion factors at 1/t_eps, so it must lie strictly inside (0, 1)."""
    if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise ValueError(f'{field}={value!r}: expected a number strictly between 0 and 1 (official 0.05)')


def _config_to_dict(cfg: Any) -> dict[str, Any]:
    """Accept an ml_collections ConfigDict, a plain mapping or any object with attributes."""
    if cfg is None:
        return {}
    if hasattr(cfg, 'to_dict'):
        return dict(cfg.to_dict())
    if isinstance(cfg, Mapping):
        return dict(cfg)
    return dict(vars(cfg))


@dataclasses.dataclass(frozen=True)
class FlowSpec:
    """Static settings of the training objective, built once from ``config.diffusion``.

    Frozen and hashable so a jitted train step can take it as a static argument. Field names follow
    the config fields (``config.diffusion.<field>``); the official PyTorch flags are P_mean, P_std,
    t_eps, noise_scale, label_drop_prob.
    """

    pred: str = 'x'  # space of the network output
    loss: str = 'v'  # space in which the squared error is taken
    p_mean: float = -0.8  # logit-normal t: t = sigmoid(p_std * n + p_mean), n ~ N(0, 1)
    p_std: float = 0.8
    t_eps: float = 0.05  # clamp of every division by 1 - t (and by t, see the module docstring)
    noise_scale: float = 1.0  # e = noise_scale * N(0, 1); image_size / 256 in the paper
    label_drop_prob: float = 0.1  # probability of replacing a label by the null class (for CFG)

    def __post_init__(self):
        _check_space(self.pred, 'config.diffusion.pred')
        _check_space(self.loss, 'config.diffusion.loss')
        for name in ('p_mean', 'p_std', 't_eps', 'noise_scale', 'label_drop_prob'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f'config.diffusion.{name}={value!r}: expected a finite number')
            # Store floats so FlowSpec(noise_scale=2) and FlowSpec(noise_scale=2.0) hash alike.
            object.__setattr__(self, name, float(value))
        if self.p_std < 0:
            raise ValueError(f'config.diffusion.p_std={self.p_std!r}: a standard deviation must be >= 0')
        _check_t_eps(self.t_eps, 'config.diffusion.t_eps')
        if self.noise_scale <= 0:
            raise ValueError(f'config.diffusion.noise_scale={self.noise_scale!r}: expected > 0 '
                             '(1.0 at 256 px, 2.0 at 512 px)')
        if not 0.0 <= self.label_drop_prob <= 1.0:
            raise ValueError(f'config.diffusion.label_drop_prob={self.label_drop_prob!r}: '
                             'expected a probability in [0, 1]')

    @classmethod
    def from_config(cls, cfg: Any) -> FlowSpec:
        """Build from ``config.diffusion``; fields it lacks keep their defaults, unrelated ones are ignored."""
        values = _config_to_dict(cfg)
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: values[name] for name in names if name in values})


def _expand_t(t: jax.Array, like: jax.Array) -> jax.Array:
    """Reshape t (scalar or f32[b]) so it broadcasts against an image batch f32[b, h, w, c]."""
    t = jnp.asarray(t, jnp.float32)
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


def interpolate(x: jax.Array, e: jax.Array, t: jax.Array) -> jax.Array:
    """z_t = t * x + (1 - t) * e: t = 1 is the clean image, t = 0 pure noise.

    Written with the same operation order as the official code so that float32 results match it.
    """
    t = _expand_t(t, x)  # f32[b, 1, 1, 1]
    return t * x + (1.0 - t) * e  # f32[b, h, w, c]


def convert_output(out: jax.Array, z: jax.Array, t: jax.Array, *, pred: str, space: str,
                   t_eps: float = 0.05) -> jax.Array:
    """Re-express a network output given in ``pred`` space as the matching value in ``space``.

    Paper Table 1 with z = t x + (1 - t) e and v = x - e, every divisor clamped by t_eps:

    * x-pred:   x = out;  eps = (z - t out) / max(1-t, t_eps);  v = (out - z) / max(1-t, t_eps).
    * eps-pred: x = (z - (1-t) out) / max(t, t_eps);  eps = out;  v = (z - out) / max(t, t_eps).
    * v-pred:   x = z + (1-t) out;  eps = z - t out;  v = out.

    The conversion is affine in ``out`` for fixed (z, t); that is why guiding v in the sampler is the
    same as guiding the raw output, and why `target` uses it too. Computed in float32 whatever the
    network's dtype (a bf16 x-pred divided by 0.05 would lose most of its mantissa).
    """
    _check_space(pred, 'pred')
    _check_space(space, 'space')
    out = jnp.asarray(out, jnp.float32)
    z = jnp.asarray(z, jnp.float32)
    t = _expand_t(t, z)  # f32[b, 1, 1, 1]
    if pred == space:
        return out
    if pred == 'x':
        one_minus_t = jnp.maximum(1.0 - t, t_eps)  # near t = 1 we would divide by ~0
        if space == 'eps':
            return (z - t * out) / one_minus_t
        return (out - z) / one_minus_t  # v: the official v_pred
    if pred == 'eps':
        t_clamped = jnp.maximum(t, t_eps)  # our clamp: the sampler's first call is at t = 0
        if space == 'x':
            return (z - (1.0 - t) * out) / t_clamped
        return (z - out) / t_clamped  # v
    # pred == 'v': no division at all.
    if space == 'x':
        return z + (1.0 - t) * out
    return z - t * out  # eps


def true_value(x: jax.Array, e: jax.Array, *, space: str) -> jax.Array:
    """The exact, unclamped quantity in ``space``: x, e, or v = x - e."""
    _check_space(space, 'space')
    if space == 'x':
        return jnp.asarray(x, jnp.float32)
    if space == 'eps':
        return jnp.asarray(e, jnp.float32)
    return jnp.asarray(x, jnp.float32) - jnp.asarray(e, jnp.float32)


def target(x: jax.Array, e: jax.Array, z: jax.Array, t: jax.Array, *, space: str, pred: str = 'x',
           t_eps: float = 0.05) -> jax.Array:
    """The regression target in the loss ``space`` for a network that predicts in ``pred`` space.

    It is `convert_output` applied to the true pred-space value (x, e or x - e), so prediction and
    target pass through the same clamped denominator. The nine cases:

    * pred == space: the true value itself (x, e, or x - e).
    * x-pred:   eps-loss (z - t x) / max(1-t, t_eps);  v-loss (x - z) / max(1-t, t_eps), exactly the
      official v_target (NOT x - e: they differ by the factor (1-t)/t_eps when t > 1 - t_eps).
    * eps-pred: x-loss (z - (1-t) e) / max(t, t_eps);  v-loss (z - e) / max(t, t_eps).
    * v-pred:   x-loss z + (1-t)(x - e);  eps-loss z - t (x - e)  (equal to x and e up to rounding).

    Using the bare x / e / x - e instead would, where a clamp is active, leave a residual that no
    network output can remove (e.g. x-pred, v-loss: (x - z)/t_eps - (x - e) != 0 at x_hat = x), which
    biases the minimiser; this form keeps the true value the exact minimiser.
    """
    _check_space(pred, 'pred')
    return convert_output(true_value(x, e, space=pred), z, t, pred=pred, space=space, t_eps=t_eps)


class Draws(NamedTuple):
    """The random quantities of one training step (all from one explicit key)."""

    t: jax.Array  # f32[b], logit-normal in (0, 1)
    e: jax.Array  # f32[b, h, w, c], already multiplied by noise_scale
    drop_mask: jax.Array  # bool[b], True -> the label becomes the null class


def logit_normal_t(n: jax.Array, *, p_mean: float, p_std: float) -> jax.Array:
    """t = sigmoid(p_std * n + p_mean) from standard normal draws n (the official sample_t).

    p_mean < 0 puts most t near the noisy end (t = 0). Kept apart from the RNG so parity tests can feed
    the official normal draws.
    """
    return jax.nn.sigmoid(jnp.asarray(n, jnp.float32) * p_std + p_mean)


def sample_t(key: jax.Array, batch: int, *, p_mean: float, p_std: float) -> jax.Array:
    """f32[batch] logit-normal times drawn from ``key``."""
    return logit_normal_t(jax.random.normal(key, (batch,), jnp.float32), p_mean=p_mean, p_std=p_std)


def draw(key: jax.Array, x: jax.Array, spec: FlowSpec) -> Draws:
    """Draw t, noise and the label-drop mask for a batch x f32[b, h, w, c] from one key.

    The key is split inside (t, noise, label drop), so the caller only has to plumb one key per step.
    """
    k_t, k_e, k_drop = jax.random.split(key, 3)
    batch = x.shape[0]
    t = sample_t(k_t, batch, p_mean=spec.p_mean, p_std=spec.p_std)  # f32[b]
    e = spec.noise_scale * jax.random.normal(k_e, x.shape, jnp.float32)  # f32[b, h, w, c]
    drop_mask = jax.random.uniform(k_drop, (batch,), jnp.float32) < spec.label_drop_prob  # bool[b]
    return Draws(t=t, e=e, drop_mask=drop_mask)


class LossTerms(NamedTuple):
    """Everything `loss_terms_given_draws` computed, for tests and diagnostics (a pytree)."""

    z: jax.Array  # f32[b, h, w, c] network input
    labels: jax.Array  # i32[b] labels the network saw (dropped ones = null class)
    net_out: jax.Array  # f32[b, h, w, c] raw network output (in pred space)
    prediction: jax.Array  # f32[b, h, w, c] network output converted to the loss space
    target: jax.Array  # f32[b, h, w, c]
    loss_per_sample: jax.Array  # f32[b] mean over (h, w, c)
    loss: jax.Array  # f32[] batch mean


def loss_terms_given_draws(model: Any, x: jax.Array, y: jax.Array, t: jax.Array, e: jax.Array,
                           drop_mask: jax.Array, *, pred: str = 'x', loss: str = 'v', t_eps: float = 0.05,
                           dropout_key: jax.Array | None = None) -> LossTerms:
    """`loss_given_draws` plus its intermediate values (same arguments, see there)."""
    _check_space(pred, 'pred')
    _check_space(loss, 'loss')
    x = jnp.asarray(x, jnp.float32)  # f32[b, h, w, c]
    e = jnp.asarray(e, jnp.float32)
    t = jnp.asarray(t, jnp.float32).reshape(x.shape[0])  # f32[b]
    null = jnp.asarray(model.num_classes, jnp.int32)
    labels = jnp.where(jnp.asarray(drop_mask, bool), null, jnp.asarray(y, jnp.int32))  # i32[b]
    z = interpolate(x, e, t)
    if dropout_key is None:
        net_out = model(z, t, labels)
    else:
        net_out = model(z, t, labels, dropout_key=dropout_key)
    net_out = jnp.asarray(net_out, jnp.float32)  # loss math in f32 even for a bf16 network
    prediction = convert_output(net_out, z, t, pred=pred, space=loss, t_eps=t_eps)
    goal = target(x, e, z, t, space=loss, pred=pred, t_eps=t_eps)
    loss_per_sample = jnp.mean(jnp.square(goal - prediction), axis=tuple(range(1, x.ndim)))  # f32[b]
    return LossTerms(z=z, labels=labels, net_out=net_out, prediction=prediction, target=goal,
                     loss_per_sample=loss_per_sample, loss=jnp.mean(loss_per_sample))


def loss_given_draws(model: Any, x: jax.Array, y: jax.Array, t: jax.Array, e: jax.Array,
                     drop_mask: jax.Array, *, pred: str = 'x', loss: str = 'v', t_eps: float = 0.05,
                     dropout_key: jax.Array | None = None) -> jax.Array:
    """Training loss for given random draws: the official Denoiser.forward without its RNG.

    Args:
        model: callable ``model(z, t, y[, dropout_key=])`` -> f32[b, h, w, c] in ``pred`` space, with
            ``model.num_classes`` = the null label id.
        x: f32[b, h, w, c] clean images in [-1, 1].
        y: i32[b] labels.
        t: f32[b] times (1 = clean).
        e: f32[b, h, w, c] noise, already multiplied by noise_scale.
        drop_mask: bool[b]; True replaces the label by ``model.num_classes``.
        dropout_key: passed to the model only when given (no dropout otherwise).

    Returns:
        f32[] the batch mean of the per-sample mean over (h, w, c) of the squared error in ``loss``
        space. Kept separate from the draws so parity tests can feed the official draws.
    """
    return loss_terms_given_draws(model, x, y, t, e, drop_mask, pred=pred, loss=loss, t_eps=t_eps,
                                  dropout_key=dropout_key).loss


def loss(model: Any, x: jax.Array, y: jax.Array, key: jax.Array, spec: FlowSpec,
         dropout_key: jax.Array | None = None) -> jax.Array:
    """Draw (t, e, drop mask) from ``key`` with ``spec`` and return the scalar training loss.

    Meant for ``nnx.value_and_grad(diffusion.loss)(model, x, y, key, spec)`` inside a jitted step with
    ``spec`` static. x f32[b, h, w, c], y i32[b]. ``dropout_key`` is positional-or-keyword on purpose:
    nnx.value_and_grad rejects functions with keyword-only parameters.
    """
    draws = draw(key, x, spec)
    return loss_given_draws(model, x, y, draws.t, draws.e, draws.drop_mask, pred=spec.pred,
                            loss=spec.loss, t_eps=spec.t_eps, dropout_key=dropout_key)
