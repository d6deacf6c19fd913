"""The ODE sampler: official grid and guidance rule, parity with the official generate(), and sharding."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from toynet import ToyNet
from conftest import load_golden, nhwc
from jit_jax import config_lib, convert, sampling

SPACES = ('x', 'eps', 'v')


def toy_numpy(net: ToyNet, z, t, y) -> np.ndarray:
    mix, emb, t_w = (np.asarray(p[...], np.float64) for p in (net.mix, net.emb, net.t_w))
    return np.tanh(np.einsum('bhwc,cd->bhwd', z, mix) + emb[y][:, None, None, :] + t[:, None, None, None] * t_w)


def np_velocity(out, z, t, pred, t_eps=0.05):
    """Paper Table 1, column 'to v', in float64 with clamped divisors."""
    if pred == 'x':
        return (out - z) / max(1 - t, t_eps)
    if pred == 'eps':
        return (z - out) / max(t, t_eps)
    return out


def np_sample(net, z, y, *, method, steps, cfg, interval_min, interval_max, pred):
    """The official generate() loop written plainly in float64 (always both passes, Python loop)."""
    grid = np.linspace(0.0, 1.0, steps + 1)
    null = np.full_like(y, net.num_classes)

    def velocity(z, t):
        tb = np.full(len(y), t)
        v_c = np_velocity(toy_numpy(net, z, tb, y), z, t, pred)
        v_u = np_velocity(toy_numpy(net, z, tb, null), z, t, pred)
        t32 = np.float32(t)
        on = t32 < np.float32(interval_max) and (interval_min == 0 or t32 > np.float32(interval_min))
        return v_u + (cfg if on else 1.0) * (v_c - v_u)

    for i in range(steps):
        t, t_next = grid[i], grid[i + 1]
        v0 = velocity(z, t)
        if method == 'heun' and i < steps - 1:
            v1 = velocity(z + (t_next - t) * v0, t_next)
            z = z + (t_next - t) * 0.5 * (v0 + v1)
        else:
            z = z + (t_next - t) * v0
    return z


def toy_inputs(batch: int = 4, seed: int = 1):
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(batch, 4, 4, 3)).astype(np.float32)
    labels = (np.arange(batch) % 5).astype(np.int32)
    return noise, labels


# ------------------------------------------------------------------ SamplerSpec, grid, guidance rule


def test_samplerspec_from_config_takes_t_eps_and_pred_from_diffusion():
    sampler_cfg = ml_collections.ConfigDict(dict(method='euler', num_steps=7, cfg_scale=2.5, interval_min=0.1,
                                                 interval_max=0.9, ema='ema1', num_images=16))
    diffusion_cfg = ml_collections.ConfigDict(dict(pred='v', loss='v', p_mean=-0.8, p_std=0.8, t_eps=0.1,
                                                   noise_scale=1.0, label_drop_prob=0.1))
    spec = sampling.SamplerSpec.from_config(sampler_cfg, diffusion_cfg)
    assert spec == sampling.SamplerSpec(method='euler', num_steps=7, cfg_scale=2.5, interval_min=0.1,
                                        interval_max=0.9, t_eps=0.1, pred='v')


def test_samplerspec_defaults_are_base_config():
    base = config_lib.base()
    assert sampling.SamplerSpec() == sampling.SamplerSpec.from_config(base.sampler, base.diffusion)
    assert sampling.SamplerSpec() == sampling.SamplerSpec(method='heun', num_steps=50, cfg_scale=3.0,
                                                          interval_min=0.1, interval_max=1.0, t_eps=0.05, pred='x')


@pytest.mark.parametrize('group,edit,message', [
    ('sampler', lambda d: d.pop('cfg_scale'), r'missing field\(s\) config\.sampler\.cfg_scale'),
    ('sampler', lambda d: d.update(cfg_scael=2.0), r'unknown field\(s\) config\.sampler\.cfg_scael'),
    ('diffusion', lambda d: d.pop('t_eps'), r'missing field\(s\) config\.diffusion\.t_eps'),
    ('diffusion', lambda d: d.update(ema='ema1'), r'unknown field\(s\) config\.diffusion\.ema'),
])
def test_samplerspec_from_config_is_strict(group, edit, message):
    groups = {name: config_lib.base()[name].to_dict() for name in ('sampler', 'diffusion')}
    edit(groups[group])
    with pytest.raises(ValueError, match=message):
        sampling.SamplerSpec.from_config(groups['sampler'], groups['diffusion'])


@pytest.mark.parametrize('kwargs,field', [
    (dict(method='ddim'), 'config.sampler.method'),
    (dict(num_steps=0), 'config.sampler.num_steps'),
    (dict(num_steps=2.5), 'config.sampler.num_steps'),
    (dict(cfg_scale=-1.0), 'config.sampler.cfg_scale'),
    (dict(interval_min=0.6, interval_max=0.5), 'config.sampler.interval_min'),
    (dict(interval_min=-0.1), 'config.sampler.interval_min'),
    (dict(interval_max=float('nan')), 'config.sampler.interval_max'),
    (dict(interval_max=1.5), 'config.sampler.interval_max'),
    (dict(t_eps=0.0), 'config.diffusion.t_eps'),
    (dict(pred='z'), 'config.diffusion.pred'),
])
def test_invalid_settings_name_the_config_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sampling.SamplerSpec(**kwargs)
    noise, labels = toy_inputs()
    with pytest.raises(ValueError, match=field):
        sampling.sample(ToyNet(), noise, labels, **kwargs)


def test_bad_shapes_are_rejected():
    noise, labels = toy_inputs()
    with pytest.raises(ValueError, match='NHWC'):
        sampling.sample(ToyNet(), noise[0], labels)
    with pytest.raises(ValueError, match='labels'):
        sampling.sample(ToyNet(), noise, labels[:3])


@pytest.mark.parametrize('name', ['sampler_heun_cfg', 'sampler_euler_cfg'])
def test_time_grid_is_the_official_float32_linspace(name):
    ref = load_golden(name)
    steps = ref['config']['hparams']['steps']
    grid = sampling.time_grid(steps)
    assert grid.dtype == np.float32
    np.testing.assert_array_equal(grid, ref['timesteps'])  # bit for bit
    for s in (1, 2, 10, 50, 333):
        g = sampling.time_grid(s)
        assert len(g) == s + 1 and g[0] == 0 and g[-1] == 1 and (np.diff(g) > 0).all()
        np.testing.assert_allclose(g, np.linspace(0, 1, s + 1), atol=1e-7)


def test_schedule_never_evaluates_at_t_equal_one():
    heun = sampling.schedule(sampling.SamplerSpec(method='heun', num_steps=50))
    assert len(heun.t) == 99 and heun.t.max() < 1 and heun.correct.sum() == 49  # 49 Heun steps + final Euler
    euler = sampling.schedule(sampling.SamplerSpec(method='euler', num_steps=5))
    assert len(euler.t) == 5 and not euler.correct.any()
    single = sampling.schedule(sampling.SamplerSpec(method='heun', num_steps=1))
    assert len(single.t) == 1 and single.t[0] == 0 and single.dt[0] == 1


def test_guidance_weight_uses_strict_float32_comparisons():
    spec = sampling.SamplerSpec(cfg_scale=2.0, interval_min=0.2, interval_max=0.8)
    w = lambda t, s=spec: float(sampling.guidance_weight(np.float32(t), s))  # noqa: E731
    assert [w(0.0), w(0.2), w(0.5), w(0.8), w(0.9)] == [1.0, 1.0, 2.0, 1.0, 1.0]
    # float32(0.1) is slightly above 0.1 in float64; compared in float32 it is not inside (0.1, 1).
    assert w(0.1, sampling.SamplerSpec(cfg_scale=2.0, interval_min=0.1)) == 1.0
    # interval_min == 0 includes t = 0.
    assert w(0.0, sampling.SamplerSpec(cfg_scale=2.0, interval_min=0.0, interval_max=0.5)) == 2.0


@pytest.mark.parametrize('name', ['sampler_heun_cfg', 'sampler_euler_cfg'])
def test_guidance_rule_matches_the_official_calls(name):
    ref = load_golden(name)
    hp = ref['config']['hparams']
    spec = sampling.SamplerSpec(cfg_scale=hp['cfg'], interval_min=hp['interval_min'], interval_max=hp['interval_max'])
    active = np.asarray(sampling.guidance_weight(ref['call_t'][:, 0], spec)) != 1.0
    np.testing.assert_array_equal(active, ref['call_cfg_active'][:, 0])
    assert active.any() and not active.all(), 'the case must have steps inside and outside the interval'
    plan = sampling.schedule(sampling.SamplerSpec(method=hp['method'], num_steps=hp['steps']))
    np.testing.assert_array_equal(plan.t, ref['call_t'][:, 0])  # same evaluations, same order


# ------------------------------------------------------------------ against a plain float64 loop


@pytest.mark.parametrize('pred', SPACES)
@pytest.mark.parametrize('method', ['heun', 'euler'])
def test_sampler_matches_a_plain_numpy_loop(method, pred):
    net = ToyNet()
    noise, labels = toy_inputs()
    kw = dict(method=method, steps=5, cfg=2.0, interval_min=0.3, interval_max=0.9, pred=pred)
    got = sampling.sample(net, noise, labels, method=method, num_steps=5, cfg_scale=2.0, interval_min=0.3,
                          interval_max=0.9, pred=pred)
    want = np_sample(net, noise.astype(np.float64), labels, **kw)
    assert got.shape == noise.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_skip_uncond_runs_fewer_rows_and_changes_nothing():
    calls = []
    net = ToyNet(calls=calls)
    noise, labels = toy_inputs()
    kw = dict(method='heun', num_steps=6, cfg_scale=3.0, interval_min=0.2, interval_max=0.8)
    skipped = sampling.sample(net, noise, labels, **kw)
    jax.effects_barrier()
    rows_skipped, calls[:] = sum(n for n, _ in calls), []
    full = sampling.sample(net, noise, labels, skip_uncond=False, **kw)
    jax.effects_barrier()
    rows_full, t_max = sum(n for n, _ in calls), max(t for _, t in calls)
    # 11 evaluations; CFG is on at t = 1/3, 1/2, 2/3 (twice each), off at the other 5.
    b = len(labels)
    assert rows_full == 11 * 2 * b and rows_skipped == 6 * 2 * b + 5 * b
    assert t_max < 1.0  # the network never sees t = 1
    np.testing.assert_allclose(skipped, full, rtol=0, atol=1e-6)


TRAJECTORY_SPEC = sampling.SamplerSpec(method='heun', num_steps=4, cfg_scale=1.5, interval_min=0.3)


def test_trajectory_is_consistent_and_sample_step_reproduces_it():
    net = ToyNet()
    noise, labels = toy_inputs()
    spec = TRAJECTORY_SPEC
    images, traj = sampling.sample_with_spec(net, noise, labels, spec, return_trajectory=True)
    assert traj['z_in'].shape == (4,) + noise.shape and traj['z_out'].shape == (4,) + noise.shape
    np.testing.assert_array_equal(traj['z_in'][0], noise)
    np.testing.assert_array_equal(traj['z_in'][1:], traj['z_out'][:-1])
    np.testing.assert_array_equal(traj['z_out'][-1], images)
    np.testing.assert_array_equal(traj['t'], sampling.time_grid(4)[:-1])
    np.testing.assert_array_equal(traj['t_next'], sampling.time_grid(4)[1:])
    for s in range(4):
        z = sampling.sample_step(net, traj['z_in'][s], labels, traj['t'][s], traj['t_next'][s], spec, heun=s < 3)
        np.testing.assert_allclose(z, traj['z_out'][s], atol=1e-6)


def test_exact_velocity_lands_on_the_data_point():
    """With the data a single image x*, the ideal x- and v-pred networks make every Euler step exact."""
    target = np.random.default_rng(2).uniform(-1, 1, (4, 4, 3)).astype(np.float32)

    class Oracle(nnx.Module):
        def __init__(self, pred: str):
            self.num_classes, self.pred = 5, pred

        def __call__(self, z, t, y):
            t = t[:, None, None, None]
            return target + 0 * z if self.pred == 'x' else (target - z) / (1 - t)

    noise, labels = toy_inputs()
    for pred in ('x', 'v'):
        out = sampling.sample(Oracle(pred), noise, labels, method='euler', num_steps=8, pred=pred)
        np.testing.assert_allclose(out, np.broadcast_to(target, out.shape), atol=1e-5)


# ------------------------------------------------------------------ seeds, sharding, export


def test_sample_from_seed_is_reproducible_and_scales_the_noise():
    net = ToyNet()
    _, labels = toy_inputs()
    spec = TRAJECTORY_SPEC  # shares its compiled program with the trajectory test
    key = jax.random.key(7)
    a, traj = sampling.sample_from_seed(net, labels, key, spec, (4, 4, 3), 2.0, return_trajectory=True)
    b, _ = sampling.sample_from_seed(net, labels, key, spec, (4, 4, 3), 2.0, return_trajectory=True)
    c, _ = sampling.sample_from_seed(net, labels, jax.random.key(8), spec, (4, 4, 3), 2.0, return_trajectory=True)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_allclose(traj['z_in'][0], 2.0 * jax.random.normal(key, (4, 4, 4, 3)), rtol=1e-6)


def test_batch_sharded_sampling_matches_one_device():
    n = min(jax.device_count(), 4)
    mesh = jax.make_mesh((n,), ('data',), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])
    batch = NamedSharding(mesh, PartitionSpec('data'))
    net = ToyNet()
    noise, labels = toy_inputs(batch=8)
    kw = dict(method='heun', num_steps=3, cfg_scale=2.0, interval_min=0.3)
    want = sampling.sample(net, noise, labels, **kw)
    with jax.set_mesh(mesh):
        got = sampling.sample(net, jax.device_put(noise, batch), jax.device_put(labels, batch), **kw)
        seeded = sampling.sample_from_seed(net, jax.device_put(labels, batch), jax.random.key(0),
                                           sampling.SamplerSpec(**kw), (4, 4, 3), 1.0)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert len(got.sharding.device_set) == n and not got.sharding.is_fully_replicated
    assert len(seeded.sharding.device_set) == n and not seeded.sharding.is_fully_replicated
    # The noise drawn sharded is the same draw as on one device.
    unsharded = sampling.sample(net, jax.random.normal(jax.random.key(0), noise.shape), labels, **kw)
    np.testing.assert_allclose(seeded, unsharded, atol=1e-6)


def test_to_uint8_is_the_official_export():
    x = np.array([-1.5, -1.0, 0.0, 1.0, 2.0, 0.5, -0.003], np.float32)
    got = np.asarray(sampling.to_uint8(x))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.clip(np.round((x + 1) / 2 * 255), 0, 255).astype(np.uint8))
    assert got[1] == 0 and got[3] == 255 and got[0] == 0 and got[4] == 255


# ------------------------------------------------------------------ golden: the official Denoiser.generate


@pytest.fixture(scope='module', params=['sampler_heun_cfg', 'sampler_euler_cfg'])
def sampler_case(request):
    ref = load_golden(request.param)
    hp = ref['config']['hparams']
    net = convert.model_from_torch(ref['params'], ref['config'])
    spec = sampling.SamplerSpec(method=hp['method'], num_steps=hp['steps'], cfg_scale=hp['cfg'],
                                interval_min=hp['interval_min'], interval_max=hp['interval_max'], t_eps=hp['t_eps'])
    z0 = np.float32(hp['noise_scale']) * nhwc(ref['noise'])  # the sampler takes noise already scaled
    np.testing.assert_array_equal(z0, nhwc(ref['z0']))
    images, traj = sampling.sample_with_spec(net, z0, ref['y'], spec, return_trajectory=True)
    return request.param, ref, net, spec, images, traj


def test_golden_sample_matches_pytorch(sampler_case):
    name, ref, _, _, images, traj = sampler_case
    err = float(np.abs(images - nhwc(ref['out'])).max())
    traj_err = max(float(np.abs(traj['z_in'] - nhwc(ref['step_z_in'])).max()),
                   float(np.abs(traj['z_out'] - nhwc(ref['step_z_out'])).max()))
    print(f'{name}: final image max abs error {err:.2e}, whole-trajectory {traj_err:.2e}')
    np.testing.assert_array_equal(traj['t'], ref['step_t'])
    np.testing.assert_array_equal(traj['t_next'], ref['step_t_next'])
    assert err <= 1e-4 and traj_err <= 1e-4


def test_golden_steps_from_saved_states(sampler_case):
    """Each official step replayed from its saved input state (errors cannot accumulate here)."""
    name, ref, net, spec, _, _ = sampler_case
    errors = []
    for s in range(len(ref['step_t'])):
        z = sampling.sample_step(net, nhwc(ref['step_z_in'][s]), ref['y'], ref['step_t'][s], ref['step_t_next'][s],
                                 spec, heun=bool(ref['step_is_heun'][s]), skip_uncond=False)
        errors.append(float(np.abs(z - nhwc(ref['step_z_out'][s])).max()))
    print(f'{name}: per-step max abs errors {["%.1e" % e for e in errors]}')
    assert max(errors) <= 1e-5


def test_golden_skip_uncond_changes_nothing(sampler_case):
    name, ref, net, spec, images, _ = sampler_case
    full = sampling.sample_with_spec(net, nhwc(ref['z0']), ref['y'], spec, skip_uncond=False)
    diff = float(np.abs(full - images).max())
    print(f'{name}: skip_uncond on vs off max abs difference {diff:.2e}')
    assert diff <= 1e-5
