"""The training objective: Table-1 conversions, targets, draws, the loss, and parity with the official code."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from toynet import ToyNet
from conftest import load_golden, nhwc, rel_err
from jit_jax import config_lib, convert, diffusion

SPACES = ('x', 'eps', 'v')
T_EPS = 0.05


def toy_numpy(net: ToyNet, z, t, y) -> np.ndarray:
    """ToyNet in float64 numpy, for references independent of the JAX code path."""
    mix, emb, t_w = (np.asarray(p[...], np.float64) for p in (net.mix, net.emb, net.t_w))
    h = np.einsum('bhwc,cd->bhwd', z, mix) + emb[y][:, None, None, :] + t[:, None, None, None] * t_w
    return np.tanh(h)


def np_convert(out, z, t, pred, space):
    """Paper Table 1 written out cell by cell in float64, divisors clamped by T_EPS."""
    t = t[:, None, None, None]
    one_minus_t, t_c = np.maximum(1 - t, T_EPS), np.maximum(t, T_EPS)
    table = {
        ('x', 'x'): lambda: out, ('x', 'eps'): lambda: (z - t * out) / one_minus_t,
        ('x', 'v'): lambda: (out - z) / one_minus_t,
        ('eps', 'x'): lambda: (z - (1 - t) * out) / t_c, ('eps', 'eps'): lambda: out,
        ('eps', 'v'): lambda: (z - out) / t_c,
        ('v', 'x'): lambda: z + (1 - t) * out, ('v', 'eps'): lambda: z - t * out, ('v', 'v'): lambda: out,
    }
    return table[pred, space]()


def toy_batch():
    """t covers both clamps: t < t_eps (eps-pred divides by t) and t > 1 - t_eps (x-pred divides by 1 - t)."""
    rng = np.random.default_rng(0)
    t = np.array([0.02, 0.2, 0.5, 0.8, 0.97, 0.999], np.float32)
    x = rng.uniform(-1, 1, (6, 4, 4, 3)).astype(np.float32)
    e = (1.5 * rng.normal(size=x.shape)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 4, 1], np.int32)
    drop = np.array([False, True, False, False, True, False])
    return x, y, t, e, drop


# ------------------------------------------------------------------ FlowSpec


def test_flowspec_defaults_are_official():
    spec = diffusion.FlowSpec()
    assert (spec.pred, spec.loss, spec.p_mean, spec.p_std, spec.t_eps, spec.noise_scale, spec.label_drop_prob) == (
        'x', 'v', -0.8, 0.8, 0.05, 1.0, 0.1)


def test_flowspec_defaults_are_base_config():
    assert diffusion.FlowSpec() == diffusion.FlowSpec.from_config(config_lib.base().diffusion)


def test_flowspec_from_config_reads_every_field():
    cfg = ml_collections.ConfigDict(dict(pred='eps', loss='x', p_mean=0.3, p_std=1.2, t_eps=0.1, noise_scale=2,
                                         label_drop_prob=0.0))
    spec = diffusion.FlowSpec.from_config(cfg)
    assert spec == diffusion.FlowSpec(pred='eps', loss='x', p_mean=0.3, p_std=1.2, t_eps=0.1, noise_scale=2.0,
                                      label_drop_prob=0.0)
    assert isinstance(spec.noise_scale, float) and hash(spec) == hash(diffusion.FlowSpec.from_config(cfg))


def test_flowspec_from_config_is_strict():
    """A missing field is not filled from a default, an unknown one is not ignored: both name the field."""
    values = config_lib.base().diffusion.to_dict()
    with pytest.raises(ValueError, match=r'missing field\(s\) config\.diffusion\.t_eps'):
        diffusion.FlowSpec.from_config({k: v for k, v in values.items() if k != 't_eps'})
    with pytest.raises(ValueError, match=r'unknown field\(s\) config\.diffusion\.p_meen'):
        diffusion.FlowSpec.from_config({**values, 'p_meen': 0.0})


@pytest.mark.parametrize('field,value', [
    ('pred', 'epsilon'), ('loss', 'y'), ('p_std', -0.1), ('t_eps', 0.0), ('t_eps', 1.0), ('t_eps', -0.2),
    ('noise_scale', 0.0), ('label_drop_prob', 1.5), ('label_drop_prob', -0.1), ('p_mean', math.nan),
    ('p_mean', 'high'),
])
def test_flowspec_rejects_bad_settings_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f'config.diffusion.{field}'):
        diffusion.FlowSpec(**{field: value})
    with pytest.raises(ValueError, match=f'config.diffusion.{field}'):
        diffusion.FlowSpec.from_config({**config_lib.base().diffusion.to_dict(), field: value})


# ------------------------------------------------------------------ path and conversions


def test_interpolate_endpoints_and_velocity():
    x, _, _, e, _ = toy_batch()
    np.testing.assert_array_equal(diffusion.interpolate(x, e, np.ones(6, np.float32)), x)  # t = 1 is clean
    np.testing.assert_array_equal(diffusion.interpolate(x, e, np.zeros(6, np.float32)), e)  # t = 0 is noise
    t = np.full(6, 0.3, np.float32)
    dz = (diffusion.interpolate(x, e, t + 1e-3) - diffusion.interpolate(x, e, t - 1e-3)) / 2e-3
    np.testing.assert_allclose(dz, x - e, atol=2e-3)  # v = dz/dt = x - e


@pytest.mark.parametrize('pred', SPACES)
def test_conversions_recover_the_truth_away_from_the_clamps(pred):
    x, _, _, e, _ = toy_batch()
    t = np.array([0.1, 0.3, 0.5, 0.6, 0.8, 0.9], np.float32)
    z = np.asarray(diffusion.interpolate(x, e, t))
    truth = {'x': x, 'eps': e, 'v': x - e}
    for space in SPACES:
        got = diffusion.convert_output(truth[pred], z, t, pred=pred, space=space, t_eps=T_EPS)
        np.testing.assert_allclose(got, truth[space], atol=2e-5, err_msg=f'{pred} -> {space}')


def test_clamps_keep_every_conversion_finite_at_the_ends():
    x, _, _, e, _ = toy_batch()
    t = np.array([0.0, 0.0, 1.0, 1.0, 0.0, 1.0], np.float32)
    z = np.asarray(diffusion.interpolate(x, e, t))
    for pred in SPACES:
        for space in SPACES:
            assert np.isfinite(diffusion.convert_output(x, z, t, pred=pred, space=space, t_eps=T_EPS)).all()
    # At t = 1 the x-pred velocity divides by t_eps, not by 0.
    v = diffusion.convert_output(x + 1.0, z, t, pred='x', space='v', t_eps=T_EPS)
    np.testing.assert_allclose(np.asarray(v)[2], (x[2] + 1.0 - z[2]) / T_EPS, rtol=1e-6)


def test_default_target_is_the_official_clamped_velocity_not_x_minus_e():
    x, _, t, e, _ = toy_batch()
    z = np.asarray(diffusion.interpolate(x, e, t))
    got = np.asarray(diffusion.target(x, e, z, t, space='v', t_eps=T_EPS))  # pred defaults to 'x'
    official = (x - z) / np.maximum(1 - t, T_EPS)[:, None, None, None]
    np.testing.assert_allclose(got, official, rtol=1e-6, atol=1e-6)
    clamped = t > 1 - T_EPS
    assert clamped.any()
    assert not np.allclose(got[clamped], (x - e)[clamped], atol=1e-2), 'with the clamp active it is not x - e'
    np.testing.assert_allclose(got[~clamped], (x - e)[~clamped], atol=1e-4)


# ------------------------------------------------------------------ the nine pred/loss combinations


@pytest.mark.parametrize('pred', SPACES)
@pytest.mark.parametrize('loss_space', SPACES)
def test_loss_matches_numpy_table1(pred, loss_space):
    net = ToyNet()
    x, y, t, e, drop = toy_batch()
    spec = diffusion.FlowSpec(pred=pred, loss=loss_space, t_eps=T_EPS)
    terms = diffusion.loss_terms(net, x, y, diffusion.Draws(t, e, drop), spec)

    x64, e64, t64 = (a.astype(np.float64) for a in (x, e, t))
    z = t64[:, None, None, None] * x64 + (1 - t64[:, None, None, None]) * e64
    labels = np.where(drop, net.num_classes, y)
    out = toy_numpy(net, z, t64, labels)
    truth = {'x': x64, 'eps': e64, 'v': x64 - e64}[pred]
    want_pred = np_convert(out, z, t64, pred, loss_space)
    want_target = np_convert(truth, z, t64, pred, loss_space)
    want_per_sample = np.mean((want_pred - want_target) ** 2, axis=(1, 2, 3))

    np.testing.assert_array_equal(terms.labels, labels)
    assert rel_err(terms.prediction, want_pred) <= 1e-5
    assert rel_err(terms.target, want_target) <= 1e-5
    np.testing.assert_allclose(terms.loss_per_sample, want_per_sample, rtol=2e-5)
    np.testing.assert_allclose(terms.loss, want_per_sample.mean(), rtol=2e-5)
    loss = diffusion.loss_given_draws(net, x, y, t, e, drop, pred=pred, loss=loss_space, t_eps=T_EPS)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(loss, terms.loss, rtol=1e-6)

    # Same clamped denominators on both sides: the loss is a pred-space MSE times a bounded factor^2.
    one_minus_t, t_c = np.maximum(1 - t64, T_EPS), np.maximum(t64, T_EPS)
    factor = {('x', 'eps'): t64 / one_minus_t, ('x', 'v'): 1 / one_minus_t, ('eps', 'x'): (1 - t64) / t_c,
              ('eps', 'v'): 1 / t_c, ('v', 'x'): 1 - t64, ('v', 'eps'): t64}.get((pred, loss_space), 1.0)
    weighted = factor ** 2 * np.mean((out - truth) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(terms.loss_per_sample, weighted, rtol=2e-4)

    # Where no clamp is active the target is the plain x, e or x - e of the loss space.
    free = (t >= T_EPS) & (t <= 1 - T_EPS)
    plain = {'x': x64, 'eps': e64, 'v': x64 - e64}[loss_space]
    np.testing.assert_allclose(np.asarray(terms.target)[free], plain[free], atol=1e-4)


# ------------------------------------------------------------------ draws and the jitted loss


def test_draws_follow_the_spec():
    spec = diffusion.FlowSpec(p_mean=0.3, p_std=1.3, noise_scale=2.0, label_drop_prob=0.25)
    x = jnp.zeros((20000, 2, 2, 1))
    t, e, drop = diffusion.draw(jax.random.key(0), x, spec)
    assert t.shape == (20000,) and e.shape == x.shape and drop.shape == (20000,) and drop.dtype == jnp.bool_
    logit = np.log(np.asarray(t, np.float64)) - np.log1p(-np.asarray(t, np.float64))
    assert abs(logit.mean() - 0.3) < 0.04 and abs(logit.std() - 1.3) < 0.04  # logit-normal
    assert abs(np.asarray(e).std() - 2.0) < 0.03  # noise already times noise_scale
    assert abs(np.asarray(drop).mean() - 0.25) < 0.015
    again = diffusion.draw(jax.random.key(0), x, spec)
    other = diffusion.draw(jax.random.key(1), x, spec)
    np.testing.assert_array_equal(again.t, t)
    assert not np.array_equal(other.t, t)
    never = diffusion.draw(jax.random.key(0), x, diffusion.FlowSpec(label_drop_prob=0.0))
    assert not np.asarray(never.drop_mask).any()


def test_loss_is_loss_given_draws_of_draw_and_trains_under_jit():
    net = ToyNet()
    x, y, _, _, _ = toy_batch()
    spec = diffusion.FlowSpec(pred='x', loss='v', label_drop_prob=0.5)
    key = jax.random.key(3)
    draws = diffusion.draw(key, x, spec)
    want = diffusion.loss_given_draws(net, x, y, *draws, pred='x', loss='v', t_eps=spec.t_eps)

    @nnx.jit(static_argnames='spec')
    def step(model, x, y, key, spec):
        return nnx.value_and_grad(diffusion.loss)(model, x, y, key, spec)

    value, grads = step(net, x, y, key, spec)
    np.testing.assert_allclose(value, want, rtol=1e-6)
    np.testing.assert_allclose(diffusion.loss(net, x, y, draws, spec), want, rtol=1e-6)  # given draws
    assert set(nnx.to_pure_dict(grads)) == {'mix', 'emb', 't_w'}
    assert all(np.abs(np.asarray(g)).sum() > 0 for g in jax.tree.leaves(grads))
    # The dropout key reaches the model only when given.
    with_key = diffusion.loss(net, x, y, key, spec, dropout_key=jax.random.key(9))
    assert not np.isclose(float(with_key), float(value), rtol=1e-6)


def test_bf16_network_output_gives_float32_loss():
    x, y, t, e, drop = toy_batch()
    net = ToyNet(out_dtype=jnp.bfloat16)
    terms = diffusion.loss_terms(net, x, y, diffusion.Draws(t, e, drop), diffusion.FlowSpec())
    assert terms.net_out.dtype == jnp.float32 and terms.loss.dtype == jnp.float32
    assert terms.prediction.dtype == jnp.float32


# ------------------------------------------------------------------ golden: the official Denoiser.forward


@nnx.jit(static_argnames='t_eps')
def _terms_and_grads(model, x, y, t, e, drop, t_eps):
    """Module level, so both golden cases (same model shape, same t_eps) share one compiled program."""
    terms = diffusion.loss_terms(model, x, y, diffusion.Draws(t, e, drop), diffusion.FlowSpec(t_eps=t_eps))
    grads = nnx.grad(lambda m: diffusion.loss_given_draws(m, x, y, t, e, drop, t_eps=t_eps))(model)
    return terms, grads


@pytest.fixture(scope='module', params=['denoiser_loss_default', 'denoiser_loss_custom'])
def loss_case(request):
    ref = load_golden(request.param)
    net = convert.model_from_torch(ref['params'], ref['config'])
    terms, grads = _terms_and_grads(net, nhwc(ref['x']), ref['y'], ref['t'], nhwc(ref['e']), ref['drop_mask'],
                                    t_eps=ref['config']['hparams']['t_eps'])
    return request.param, ref, terms, grads


def test_golden_draw_transforms_match(loss_case):
    """Our t / noise / label-drop formulas applied to the official raw draws give what its network saw."""
    _, ref, _, _ = loss_case
    hp = ref['config']['hparams']
    t = diffusion.logit_normal_t(ref['t_normal'], p_mean=hp['P_mean'], p_std=hp['P_std'])
    assert rel_err(t, ref['t']) <= 1e-6
    np.testing.assert_array_equal(ref['drop_uniform'] < hp['label_drop_prob'], ref['drop_mask'])
    assert rel_err(np.float32(hp['noise_scale']) * ref['e_raw'], ref['e']) <= 1e-7
    spec = diffusion.FlowSpec(p_mean=hp['P_mean'], p_std=hp['P_std'], t_eps=hp['t_eps'],
                              noise_scale=hp['noise_scale'], label_drop_prob=hp['label_drop_prob'])
    assert spec.noise_scale == hp['noise_scale']


def test_golden_loss_matches_pytorch(loss_case):
    name, ref, terms, _ = loss_case
    np.testing.assert_array_equal(terms.labels, ref['y_dropped'])
    errors = {
        'z': rel_err(terms.z, nhwc(ref['z'])),
        'x_pred': rel_err(terms.net_out, nhwc(ref['x_pred'])),
        'v_target': rel_err(terms.target, nhwc(ref['v_target'])),
        'v_pred': rel_err(terms.prediction, nhwc(ref['v_pred'])),
        'loss_per_sample': rel_err(terms.loss_per_sample, ref['loss_per_sample']),
        'loss': rel_err(terms.loss, ref['loss']),
    }
    worst = max((err, key) for key, err in errors.items())
    print(f'{name}: worst relative error {worst[0]:.2e} ({worst[1]}); loss {errors["loss"]:.2e}')
    for key, err in errors.items():
        assert err <= 1e-5, f'{name}: {key} relative error {err:.2e}'


def test_golden_gradients_match_pytorch(loss_case):
    name, ref, _, grads = loss_case
    cfg = convert.config_from_torch(ref['config'])
    flat = {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(grads)}
    ours = convert.params_to_torch(flat, cfg)  # our gradient tree under the official names and layouts
    want = {k[len('grad/'):]: v for k, v in ref.items() if k.startswith('grad/')}
    assert set(ours) == set(want)
    errors = {k: rel_err(ours[k], want[k]) for k in want}
    worst = max((err, k) for k, err in errors.items())
    print(f'{name}: worst gradient relative error {worst[0]:.2e} ({worst[1]}) over {len(errors)} tensors')
    assert worst[0] <= 1e-4
