"""Kernels the JiT blocks call, chosen once per model by `ops(custom_vjp)`.

Every kernel computes the same forward as plain JAX; the `custom_vjp=True` set only changes what is saved for
the backward pass and how the backward is written, so gradients equal autodiff's up to float rounding. They
exist for XLA:CPU, where they were measured to help (fewer saved activations, weight-gradient matmuls in the
orientation CPU matmul kernels are fast at); elsewhere the default follows what was measured per backend
(`jit_jax.config_lib.BACKEND_DEFAULTS`). `remat` serves both sets: its recomputation waits for the backward
pass where the backend's scheduler would hoist it (XLA:CPU and XLA:GPU), plain jax.checkpoint on TPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.ad_checkpoint
import jax.numpy as jnp

RMS_EPS = 1e-6
REMAT_POLICIES = {
    'none': None,
    'block': jax.checkpoint_policies.nothing_saveable,
    # The custom_vjp linear layers hide their dot from the policy: they name their outputs 'dense' instead.
    'dots': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names('dense')),
}


@dataclasses.dataclass(frozen=True)
class Ops:
    """The kernel set one model uses; see `ops`."""

    dot_general: Callable  # nnx.Linear's `dot_general`
    rms_norm: Callable  # (x, weight, out_dtype) -> w * x / rms(x), statistics in float32
    swiglu_gate: Callable  # (gate, value) -> silu(gate) * value
    attention: Callable  # (q, k, v, impl) -> softmax(q k^T / sqrt(hd)) v, q, k, v: [b, n, heads, hd]


@functools.lru_cache(maxsize=None)
def ops(custom_vjp: bool) -> Ops:
    """The one dispatch point: hand-written backward passes (True) or plain JAX autodiff (False)."""
    if not isinstance(custom_vjp, bool):
        raise TypeError(f'kernels.ops(custom_vjp={custom_vjp!r}): expected a bool (resolve "auto" first)')
    if custom_vjp:
        return Ops(_dense_dot_general, _rms_norm, _swiglu_gate, _custom_attention)
    return Ops(jax.lax.dot_general, rms_norm_plain, swiglu_gate_plain, _plain_attention)


# ---------------------------------------------------------------------------------------------------------
# Plain versions: what autodiff differentiates with custom_vjp off, and the forwards the others reproduce.


def rms_norm_plain(x, weight, out_dtype):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + RMS_EPS)
    return (normed * weight.astype(jnp.float32)).astype(out_dtype)


def swiglu_gate_plain(gate, value):
    return jax.nn.silu(gate) * value


def _plain_attention(q, k, v, impl):
    """Logits and softmax run in float32 inside (as the official code insists, for stability)."""
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


def _custom_attention(q, k, v, impl):
    """impl 'own' (or None on CPU): `_attention`, whose backward saves the probabilities once
    (jax.nn.dot_product_attention's XLA path is the same maths but keeps exp(logits) as well: +19% peak memory
    at B/16, same speed). Otherwise jax.nn.dot_product_attention with that implementation (None: JAX picks)."""
    if impl == 'own' or (impl is None and jax.default_backend() == 'cpu'):
        return _attention(q, k, v)
    return _plain_attention(q, k, v, impl)


def remat(fn, policy: str, late: bool):
    """fn(state, x, c) rematerialised per the policy ('none': fn itself); `late` ties the recomputation to the
    backward (`_remat_late`), else plain jax.checkpoint (JiTConfig.remat_late, per platform)."""
    if policy == 'none':
        return fn
    return _remat_late(fn, REMAT_POLICIES[policy]) if late else jax.checkpoint(fn, policy=REMAT_POLICIES[policy])


# ---------------------------------------------------------------------------------------------------------
# Hand-written backward passes. Each forward computes exactly what the plain version computes; only what is
# saved for the backward, and how the backward is written, differs.



@jax.custom_vjp
def _dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x[..., din] @ w[din, dout], as nnx.Linear computes it."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_fwd(x, w):
    return _dense(x, w), (x, w)


def _dense_bwd(res, dy):
    """dx = dy w^T; dw = x^T dy with the smaller of x and dy transposed in memory first.

    Autodiff writes dw as one dot contracting the token axis of both operands, which XLA:CPU runs through a
    transposed-operand kernel at about half the speed of a plain matmul (measured: 18 vs 31 GFLOP/s at
    [1152, 768] x [1152, 4096]). Materialising the transpose of the smaller operand (fenced by an optimisation
    barrier, or XLA folds it straight back into the dot) turns it into a plain row-major matmul; when dy is
    the smaller one, (dy^T x)^T is computed and the final transpose folds into the optimizer's update.
    """
    x, w = res
    dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # [tokens, din], [tokens, dout]
    plain = (((1,), (0,)), ((), ()))
    if x2.shape[1] <= dy2.shape[1]:
        dw = jax.lax.dot_general(jax.lax.optimization_barrier(x2.T), dy2, plain)
    else:
        dw = jax.lax.dot_general(jax.lax.optimization_barrier(dy2.T), x2, plain).T
    return dx, dw.astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """A `dot_general` for nnx.Linear that routes its one contraction pattern through `_dense`."""
    del precision, preferred_element_type  # nnx.Linear passes neither here (default precision, no override)
    if kwargs.get('out_sharding') is not None or dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, **kwargs)
    return jax.ad_checkpoint.checkpoint_name(_dense(lhs, rhs), 'dense')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x, weight, out_dtype):
    return rms_norm_plain(x, weight, out_dtype)


def _rms_norm_fwd(x, weight, out_dtype):
    """Saves the input and one f32 statistic per row; autodiff keeps three full-width intermediates."""
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + RMS_EPS)
    return ((x32 * inv) * weight.astype(jnp.float32)).astype(out_dtype), (x, inv, weight)


def _rms_norm_bwd(out_dtype, res, dy):
    """With xh = x * inv and g = dy * w: dx = inv * (g - xh * mean(g * xh)), dw = sum(dy * xh) over rows."""
    del out_dtype
    x, inv, weight = res
    xh = x.astype(jnp.float32) * inv
    dy32 = dy.astype(jnp.float32)
    g = dy32 * weight.astype(jnp.float32)
    dx = inv * (g - xh * jnp.mean(g * xh, axis=-1, keepdims=True))
    dw = jnp.sum((dy32 * xh).reshape(-1, x.shape[-1]), axis=0)
    return dx.astype(x.dtype), dw.astype(weight.dtype)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@jax.custom_vjp
def _swiglu_gate(gate: jax.Array, value: jax.Array) -> jax.Array:
    return swiglu_gate_plain(gate, value)


def _swiglu_gate_fwd(gate, value):
    """Saves the two halves of w12's output; autodiff of silu(a) * b keeps five arrays of that width."""
    return _swiglu_gate(gate, value), (gate, value)


def _swiglu_gate_bwd(res, dy):
    gate, value = res
    a, b, d = gate.astype(jnp.float32), value.astype(jnp.float32), dy.astype(jnp.float32)
    s = jax.nn.sigmoid(a)
    d_gate = d * b * s * (1.0 + a * (1.0 - s))
    d_value = d * a * s
    return d_gate.astype(gate.dtype), d_value.astype(value.dtype)


_swiglu_gate.defvjp(_swiglu_gate_fwd, _swiglu_gate_bwd)


def _attention_probs(q, k):
    """Softmax(q k^T / sqrt(hd)) in float32, as jax.nn.dot_product_attention's XLA path computes it."""
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), logits.dtype)
    return jax.nn.softmax(logits, axis=-1)  # f32[b, heads, n, n]


@jax.custom_vjp
def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Multi-head attention, q, k, v: [b, n, heads, hd] -> [b, n, heads, hd].

    Without differentiation (sampling) this is jax.nn.dot_product_attention's XLA path, 7% faster on CPU
    than the einsums below; under differentiation `_attention_fwd` computes the same maths keeping the
    probabilities for the backward.
    """
    return jax.nn.dot_product_attention(q, k, v, implementation='xla')


def _attention_fwd(q, k, v):
    """Saves the probabilities once; autodiff of the softmax keeps both exp(logits) and the quotient."""
    probs = _attention_probs(q, k)
    return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v), (q, k, v, probs)


def _attention_bwd(res, d_out):
    q, k, v, probs = res
    p = probs.astype(v.dtype)
    d_v = jnp.einsum('bhqk,bqhd->bkhd', p, d_out)
    d_p = jnp.einsum('bqhd,bkhd->bhqk', d_out, v, preferred_element_type=jnp.float32)
    d_logits = probs * (d_p - jnp.sum(d_p * probs, axis=-1, keepdims=True))
    d_logits = (d_logits * (1.0 / math.sqrt(q.shape[-1]))).astype(q.dtype)
    d_q = jnp.einsum('bhqk,bkhd->bqhd', d_logits, k)
    d_k = jnp.einsum('bhqk,bqhd->bkhd', d_logits, q)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _remat_late(fn, policy):
    """jax.checkpoint(fn, policy) whose recomputation cannot start before the output's cotangent exists.

    jax.checkpoint hands XLA a recomputation that depends on the block's inputs alone. XLA:CPU removes
    optimisation barriers before scheduling, and its scheduler then hoists every block's recomputation into
    the forward pass, where it lives as long as the activations it was meant to replace (measured: remat
    'block' lowered the peak by 3%). XLA:GPU's schedulers do the same (B/16 at 128 per H100, deviceless
    compile: 26.3 GiB without remat, 19.9 with jax.checkpoint's 'block', 7.1 GiB with this). Here the saved
    residuals are read as r + min(|dy[0]|, 0) -- r itself (NaN only if dy already is) but not computable
    before dy -- so the recomputation has to wait. XLA:TPU needs no tie (and its programs were modelled 4-6%
    slower with it).
    fn(state, x, c) -> y; the parameters in `state` are passed through untouched.
    """

    saved_is_param: list[bool] = []  # per residual leaf, filled while the forward is traced

    @jax.custom_vjp
    def run(state, x, c):
        return fn(state, x, c)

    def run_fwd(state, x, c):
        y, pullback = jax.vjp(jax.checkpoint(fn, policy=policy), state, x, c)
        params = {id(leaf) for leaf in jax.tree.leaves(state)}
        saved_is_param[:] = [id(leaf) in params for leaf in jax.tree.leaves(pullback)]
        return y, pullback

    def run_bwd(pullback, dy):
        tie = jnp.minimum(jnp.abs(dy.reshape(-1)[0]), 0)  # 0, but only once dy exists
        leaves, tree = jax.tree.flatten(pullback)
        leaves = [leaf if is_param or not jnp.issubdtype(leaf.dtype, jnp.floating) else leaf + tie.astype(leaf.dtype)
                  for leaf, is_param in zip(leaves, saved_is_param)]
        return jax.tree.unflatten(tree, leaves)(dy)

    run.defvjp(run_fwd, run_bwd)
    return run
