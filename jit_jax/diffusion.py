"""The flow-matching core of JiT: the noise path, x/eps/v conversions, t sampling and the loss.

Conventions (paper and official code):

* t in [0, 1], t = 0 is pure noise and t = 1 is clean data (the reverse of many rectified-flow write-ups).
* z_t = t * x + (1 - t) * e with e = noise_scale * N(0, I); the velocity is v = dz/dt = x - e.
* The network sees (z_t, t, y) and its output lives in one of three spaces, ``pred`` in {'x', 'eps', 'v'};
  the loss is a mean squared error in a possibly different space ``loss`` in {'x', 'eps', 'v'}.
  The default, and the only one that works at 256 px and above, is x-pred with a v-loss.

Everything here is a pure function of arrays plus a frozen `FlowSpec`, so the jitted train step can
close over the spec as a static argument. The spec validates its fields once, when it is built; the
array functions trust it. Images are NHWC; t is f32[b]. One entry point per job: `draw` (the random
quantities of a step), `loss_terms` / `loss` (the objective given draws or a key), plus
`loss_given_draws`, the stable keyword form of `loss` used by external tools.

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
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jit_jax import config_lib

SPACES = ('x', 'eps', 'v')


def _number(test: Callable[[float], bool], expected: str):
    def check(value: Any) -> float | None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        # Floats, so FlowSpec(noise_scale=2) and FlowSpec(noise_scale=2.0) hash alike.
        return float(value) if ok and test(value) else None
    return check, expected


def _space(value: Any) -> str | None:
    return value if value in SPACES else None


# config.diffusion field -> (check returning the normalised value or None, what is expected).
_RULES: dict[str, tuple[Callable[[Any], Any], str]] = {
    'pred': (_space, "one of 'x', 'eps', 'v'"),
    'loss': (_space, "one of 'x', 'eps', 'v'"),
    'p_mean': _number(lambda v: True, 'a finite number'),
    'p_std': _number(lambda v: v >= 0, 'a finite number >= 0 (a standard deviation)'),
    't_eps': _number(lambda v: 0.0 < v < 1.0, 'a number strictly between 0 and 1 (official 0.05): it clamps '
                     'every division by 1 - t'),
    'noise_scale': _number(lambda v: v > 0, 'a number > 0 (1.0 at 256 px, 2.0 at 512 px)'),
    'label_drop_prob': _number(lambda v: 0.0 <= v <= 1.0, 'a probability in [0, 1]'),
}


def checked(name: str, value: Any) -> Any:
    """`value` of config.diffusion.<name>, normalised (numbers as float), or a ValueError naming the field.

    The one place diffusion settings are checked: FlowSpec uses it for every field, SamplerSpec for the
    two it shares (pred, t_eps).
    """
    check, expected = _RULES[name]
    normalised = check(value)
    if normalised is None:
        raise ValueError(f'config.diffusion.{name}={value!r}: expected {expected}')
    return normalised


def config_fields(cfg: Any, group: str, names: tuple[str, ...], others: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields `names` of config group `group` (a ConfigDict or mapping), strictly.

    A missing field or one that is neither in `names` nor in `others` (fields of the group that another
    consumer reads) is a ValueError naming it: a spec is never silently built from defaults.
    """
    if not isinstance(cfg, Mapping) and not hasattr(cfg, 'items'):
        raise ValueError(f'config.{group} is a {type(cfg).__name__}: expected a ConfigDict or mapping')
    values = dict(cfg.items())
    missing = [f'config.{group}.{name}' for name in names if name not in values]
    unknown = [f'config.{group}.{name}' for name in values if name not in names and name not in others]
    if missing or unknown:
        raise ValueError(' and '.join(filter(None, [
            f"missing field(s) {', '.join(missing)}" if missing else '',
            f"unknown field(s) {', '.join(unknown)}" if unknown else ''])) + f' (expected {names + others})')
    return {name: values[name] for name in names}


_DEFAULTS = config_lib.base().diffusion  # the one source of defaults


@dataclasses.dataclass(frozen=True)
class FlowSpec:
    """Static settings of the training objective, built once from ``config.diffusion``.

    Frozen and hashable so a jitted train step can take it as a static argument. Field names follow
    the config fields (``config.diffusion.<field>``) and the defaults are config_lib.base()'s; the
    official PyTorch flags are P_mean, P_std, t_eps, noise_scale, label_drop_prob.
    """

    pred: str = _DEFAULTS.pred  # space of the network output
    loss: str = _DEFAULTS.loss  # space in which the squared error is taken
    p_mean: float = _DEFAULTS.p_mean  # logit-normal t: t = sigmoid(p_std * n + p_mean), n ~ N(0, 1)
    p_std: float = _DEFAULTS.p_std
    t_eps: float = _DEFAULTS.t_eps  # clamp of every division by 1 - t (and by t, see the module docstring)
    noise_scale: float = _DEFAULTS.noise_scale  # e = noise_scale * N(0, 1); image_size / 256 in the paper
    label_drop_prob: float = _DEFAULTS.label_drop_prob  # probability of a label becoming the null class

    def __post_init__(self):
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, checked(field.name, getattr(self, field.name)))

    @classmethod
    def from_config(cls, cfg: Any) -> FlowSpec:
        """Build from ``config.diffusion``: every field must be there, and nothing else."""
        return cls(**config_fields(cfg, 'diffusion', tuple(f.name for f in dataclasses.fields(cls))))


def _expand_t(t: jax.Array, like: jax.Array) -> jax.Array:
    """Reshape t (scalar or f32[b]) so it broadcasts against a batch: images f32[b, h, w, c] or patches."""
    t = jnp.asarray(t, jnp.float32)
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


def interpolate(x: jax.Array, e: jax.Array, t: jax.Array) -> jax.Array:
    """z_t = t * x + (1 - t) * e: t = 1 is the clean image, t = 0 pure noise.

    Written with the same operation order as the official code so that float32 results match it.
    """
    t = _expand_t(t, x)  # f32[b, 1, ...]
    return t * x + (1.0 - t) * e  # shaped like x


# (pred, space) -> the value in `space` of a network output `out` in `pred` space (paper Table 1).
_CONVERSIONS = {
    ('x', 'eps'): lambda out, z, t, t_eps: (z - t * out) / jnp.maximum(1.0 - t, t_eps),
    ('x', 'v'): lambda out, z, t, t_eps: (out - z) / jnp.maximum(1.0 - t, t_eps),  # the official v_pred
    ('eps', 'x'): lambda out, z, t, t_eps: (z - (1.0 - t) * out) / jnp.maximum(t, t_eps),  # our clamp
    ('eps', 'v'): lambda out, z, t, t_eps: (z - out) / jnp.maximum(t, t_eps),
    ('v', 'x'): lambda out, z, t, t_eps: z + (1.0 - t) * out,  # v-pred: no division at all
    ('v', 'eps'): lambda out, z, t, t_eps: z - t * out,
}


def convert_output(out: jax.Array, z: jax.Array, t: jax.Array, *, pred: str, space: str,
                   t_eps: float = _DEFAULTS.t_eps) -> jax.Array:
    """Re-express a network output given in ``pred`` space as the matching value in ``space``.

    Paper Table 1 with z = t x + (1 - t) e and v = x - e, every divisor clamped by t_eps:

    * x-pred:   x = out;  eps = (z - t out) / max(1-t, t_eps);  v = (out - z) / max(1-t, t_eps).
    * eps-pred: x = (z - (1-t) out) / max(t, t_eps);  eps = out;  v = (z - out) / max(t, t_eps).
    * v-pred:   x = z + (1-t) out;  eps = z - t out;  v = out.

    The conversion is affine in ``out`` for fixed (z, t); that is why guiding v in the sampler is the
    same as guiding the raw output, and why `target` uses it too. Computed in float32 whatever the
    network's dtype (a bf16 x-pred divided by 0.05 would lose most of its mantissa).
    """
    out = jnp.asarray(out, jnp.float32)
    if pred == space:
        return out
    if (pred, space) not in _CONVERSIONS:
        raise ValueError(f'pred={pred!r}, space={space!r}: expected spaces from {SPACES}')
    z = jnp.asarray(z, jnp.float32)
    return _CONVERSIONS[pred, space](out, z, _expand_t(t, z), t_eps)


def true_value(x: jax.Array, e: jax.Array, *, space: str) -> jax.Array:
    """The exact, unclamped quantity in ``space``: x, e, or v = x - e."""
    x, e = jnp.asarray(x, jnp.float32), jnp.asarray(e, jnp.float32)
    return {'x': lambda: x, 'eps': lambda: e, 'v': lambda: x - e}[space]()


def target(x: jax.Array, e: jax.Array, z: jax.Array, t: jax.Array, *, space: str, pred: str = 'x',
           t_eps: float = _DEFAULTS.t_eps) -> jax.Array:
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
    """Everything `loss_terms` computed, for tests and diagnostics (a pytree)."""

    z: jax.Array  # f32[b, h, w, c] network input
    labels: jax.Array  # i32[b] labels the network saw (dropped ones = null class)
    net_out: jax.Array  # f32[b, h, w, c] raw network output (in pred space)
    prediction: jax.Array  # f32[b, h, w, c] network output converted to the loss space
    target: jax.Array  # f32[b, h, w, c]
    loss_per_sample: jax.Array  # f32[b] mean over (h, w, c)
    loss: jax.Array  # f32[] batch mean


def loss_terms(model: Any, x: jax.Array, y: jax.Array, draws: Draws | jax.Array, spec: FlowSpec,
               dropout_key: jax.Array | None = None) -> LossTerms:
    """The training objective and its intermediate values: the official Denoiser.forward.

    Args:
        model: callable ``model(z, t, y[, dropout_key=])`` -> f32[b, h, w, c] in ``spec.pred`` space,
            with ``model.num_classes`` = the null label id; one with a patch-token entry (JiT) is called
            on patches instead (`pixel_layout`), with the same results up to summation order.
        x: f32[b, h, w, c] clean images in [-1, 1].
        y: i32[b] labels.
        draws: the step's `Draws` (t f32[b], e f32[b, h, w, c] already times noise_scale, drop_mask
            bool[b]), or a PRNG key to `draw` them from with ``spec``. Given draws let parity tests feed
            the official ones and let the train step split one batch's draws into micro-batches.
        spec: the objective (pred, loss, t_eps; the draw settings when ``draws`` is a key).
        dropout_key: passed to the model only when given (no dropout otherwise). Positional-or-keyword
            on purpose: nnx.value_and_grad rejects functions with keyword-only parameters.
    """
    x = jnp.asarray(x, jnp.float32)  # f32[b, h, w, c]
    t, e, drop_mask = draws if isinstance(draws, Draws) else draw(draws, x, spec)
    e = jnp.asarray(e, jnp.float32)
    t = jnp.asarray(t, jnp.float32).reshape(x.shape[0])  # f32[b]
    null = jnp.asarray(model.num_classes, jnp.int32)
    labels = jnp.where(jnp.asarray(drop_mask, bool), null, jnp.asarray(y, jnp.int32))  # i32[b]
    to_net, net, from_net = pixel_layout(model)
    x, e = to_net(x), to_net(e)
    z = interpolate(x, e, t)
    net_out = net(z, t, labels) if dropout_key is None else net(z, t, labels, dropout_key=dropout_key)
    net_out = jnp.asarray(net_out, jnp.float32)  # loss math in f32 even for a bf16 network
    prediction = convert_output(net_out, z, t, pred=spec.pred, space=spec.loss, t_eps=spec.t_eps)
    goal = target(x, e, z, t, space=spec.loss, pred=spec.pred, t_eps=spec.t_eps)
    loss_per_sample = jnp.mean(jnp.square(goal - prediction), axis=tuple(range(1, x.ndim)))  # f32[b]
    return LossTerms(z=from_net(z), labels=labels, net_out=from_net(net_out), prediction=from_net(prediction),
                     target=from_net(goal), loss_per_sample=loss_per_sample, loss=jnp.mean(loss_per_sample))


def pixel_layout(model: Any) -> tuple[Callable, Callable, Callable]:
    """(images -> the model's pixel layout, the model on that layout, back to images).

    A model with a patch-token entry (JiT.denoise_patches) is trained and sampled on its patches: the
    objective and the ODE update are elementwise (the loss's mean over pixels only changes its summation
    order), and a program then holds no image-shaped tensor but its inputs and outputs (on TPU those cost
    4-8 times their bytes in padding; docs/tpu.md). LossTerms and samples are images either way: a
    program that reads only the loss drops the conversions back.
    """
    if hasattr(model, 'denoise_patches'):
        return model.to_patches, model.denoise_patches, model.from_patches
    return (lambda a: a), model, (lambda a: a)


def loss(model: Any, x: jax.Array, y: jax.Array, draws: Draws | jax.Array, spec: FlowSpec,
         dropout_key: jax.Array | None = None) -> jax.Array:
    """f32[] training loss, `loss_terms(...).loss`: e.g. ``nnx.value_and_grad(loss)(model, x, y, key, spec)``."""
    return loss_terms(model, x, y, draws, spec, dropout_key).loss


def loss_given_draws(model: Any, x: jax.Array, y: jax.Array, t: jax.Array, e: jax.Array,
                     drop_mask: jax.Array, *, pred: str = _DEFAULTS.pred, loss: str = _DEFAULTS.loss,
                     t_eps: float = _DEFAULTS.t_eps, dropout_key: jax.Array | None = None) -> jax.Array:
    """Training loss for given random draws (the official Denoiser.forward without its RNG), by keyword.

    The stable form for external tools; the same as ``loss(model, x, y, Draws(t, e, drop_mask),
    FlowSpec(pred=pred, loss=loss, t_eps=t_eps), dropout_key)``. Shapes as in `loss_terms`. Returns the
    batch mean of the per-sample mean over (h, w, c) of the squared error in ``loss`` space.
    """
    spec = FlowSpec(pred=pred, loss=loss, t_eps=t_eps)
    return loss_terms(model, x, y, Draws(t, e, drop_mask), spec, dropout_key).loss
