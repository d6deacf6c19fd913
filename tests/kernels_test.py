"""jit_jax.kernels: every hand-written backward equals plain autodiff, and config_lib picks them per platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jit_jax import config_lib, kernels
from jit_jax import model as model_lib

CUSTOM, PLAIN = kernels.ops(True), kernels.ops(False)


def _close(got, want, rtol=1e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = max(float(np.max(np.abs(w))), 1e-12)
        assert float(np.max(np.abs(np.asarray(g) - np.asarray(w)))) <= rtol * scale


def _check_vjp(custom, plain, *args, rtol=1e-5):
    """Same forward, and the same gradient of a random projection of the output."""
    out = plain(*args)
    proj = jax.random.normal(jax.random.key(9), out.shape, out.dtype)
    _close(custom(*args), out, rtol)
    grad = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * proj), argnums=tuple(range(len(args))))(*args)
    _close(grad(custom), grad(plain), rtol)


def _rand(*shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize('din,dout', [(8, 24), (24, 8)])  # both orientations of the weight-gradient matmul
def test_dense(din, dout):
    dims = (((2,), (0,)), ((), ()))
    _check_vjp(lambda x, w: CUSTOM.dot_general(x, w, dims), lambda x, w: PLAIN.dot_general(x, w, dims),
               _rand(2, 5, din), _rand(din, dout, seed=1))


def test_rms_norm():
    _check_vjp(lambda x, w: CUSTOM.rms_norm(x, w, jnp.float32), lambda x, w: PLAIN.rms_norm(x, w, jnp.float32),
               _rand(2, 5, 16), 1.0 + 0.1 * _rand(16, seed=1))


def test_swiglu_gate():
    _check_vjp(CUSTOM.swiglu_gate, PLAIN.swiglu_gate, _rand(2, 5, 12), _rand(2, 5, 12, seed=1))


def test_attention():
    q, k, v = (_rand(2, 6, 3, 8, seed=s) for s in range(3))
    assert jax.default_backend() == 'cpu'  # where impl None takes the hand-written attention
    _check_vjp(lambda *a: CUSTOM.attention(*a, None), lambda *a: PLAIN.attention(*a, None), q, k, v)


@pytest.mark.parametrize('remat', ['block', 'dots'])
def test_remat(remat):
    def fn(state, x, c):
        return jnp.tanh(x @ state['w'] + c) * state['b']

    state = {'w': _rand(8, 8), 'b': _rand(8, seed=1)}
    for late in (True, False):
        _check_vjp(lambda s, x, c, late=late: kernels.remat(fn, remat, late)(s, x, c), fn, state,
                   _rand(3, 8, seed=2), _rand(8, seed=3))
    assert kernels.remat(fn, 'none', True) is fn and kernels.remat(fn, 'none', False) is fn


def _tiny(custom_vjp, **overrides):
    cfg = model_lib.JiTConfig(input_size=8, patch_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=3,
                              bottleneck_dim=8, in_context_len=2, in_context_start=1, custom_vjp=custom_vjp,
                              **overrides)
    return model_lib.JiT(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('overrides', [{}, dict(scan_blocks=True, remat='block')])
def test_full_model_loss_and_grads(overrides):
    """custom_vjp on and off: the same loss and the same gradients for every parameter."""
    x, t, y = _rand(2, 8, 8, 3), jnp.array([0.3, 0.8]), jnp.array([0, 2])
    models = [_tiny(flag, **overrides) for flag in (True, False)]
    for m in models:  # adaLN starts at zero; randomise it so every path carries gradient
        for path, p in nnx.iter_graph(m):
            if isinstance(p, nnx.Param):
                p[...] = 0.1 * _rand(*p.shape, seed=hash(path) % 1000)
    loss = lambda m: jnp.mean((m(x, t, y) - x) ** 2)
    (l_on, g_on), (l_off, g_off) = (nnx.value_and_grad(loss)(m) for m in models)
    np.testing.assert_allclose(l_on, l_off, rtol=1e-5)
    _close(nnx.to_pure_dict(g_on), nnx.to_pure_dict(g_off), rtol=1e-4)


def test_custom_vjp_must_be_a_bool():
    with pytest.raises(ValueError, match='custom_vjp'):
        model_lib.JiTConfig(custom_vjp='off')  # a string must not pass for a bool
    with pytest.raises(ValueError, match='attention_impl'):
        model_lib.JiTConfig(custom_vjp=False, attention_impl='own')  # 'own' is a hand-written backward


def test_off_really_turns_them_off():
    config = config_lib.base()
    config.model.custom_vjp = 'off'
    cfg = config_lib.model_config(config, platform='cpu')
    assert cfg.custom_vjp is False
    net = _tiny(cfg.custom_vjp)
    x, t, y = _rand(1, 8, 8, 3), jnp.array([0.5]), jnp.array([1])
    jaxpr = str(jax.make_jaxpr(nnx.grad(lambda m: jnp.sum(m(x, t, y))))(net))
    assert 'custom_vjp' not in jaxpr
    on = str(jax.make_jaxpr(nnx.grad(lambda m: jnp.sum(m(x, t, y))))(_tiny(True)))
    assert 'custom_vjp' in on  # the check above can fail
