"""JiT: a plain ViT over large pixel patches that predicts the clean image.

The network follows the official PyTorch definition (LTH14/JiT, model_jit.py) number for number, so that
released weights load through `jit_jax.convert` and give the same outputs. Images are NHWC here; the
official code is NCHW. The pieces, in the order data flows through them:

  bottleneck patch embed (p*p*c -> bottleneck -> d, a low-rank linear map) + fixed 2-D sin-cos positions
  -> blocks (RMSNorm, adaLN-zero, attention with qk RMSNorm and 2-D RoPE, SwiGLU)
     with `in_context_len` class tokens prepended before block `in_context_start`
  -> final adaLN layer -> per-patch pixels -> unpatchify.

Nothing here holds sharding or mode state: dropout runs only when a `dropout_key` is passed, and parameter
layout across devices is decided by `jit_jax.sharding` from the parameter paths.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jit_jax import sharding

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
_REMAT_POLICIES = {
    'none': None,
    'block': jax.checkpoint_policies.nothing_saveable,
    # Linear layers with hand-written backward passes (custom_vjp) hide their dot from the policy: they name
    # their outputs 'dense' instead.
    'dots': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names('dense')),
}
_RMS_EPS = 1e-6
_TIME_FEATURES = 256


@dataclasses.dataclass(frozen=True)
class JiTConfig:
    """Architecture and numerics of one JiT network.

    The first thirteen fields carry the official constructor's names and defaults, so a config dict from the
    PyTorch code maps onto this one directly. The rest are JAX-side choices that leave the maths unchanged
    (up to rounding): compute / parameter dtypes, the attention kernel, scanning and rematerialising blocks.
    """

    input_size: int = 256
    patch_size: int = 16
    in_channels: int = 3
    hidden_size: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    num_classes: int = 1000
    bottleneck_dim: int = 128
    in_context_len: int = 32
    in_context_start: int = 8
    dtype: str = 'float32'  # compute dtype of matmuls; norms, softmax and the residual stream stay fp32
    param_dtype: str = 'float32'
    # jax.nn.dot_product_attention's `implementation`: None (on CPU with custom_vjp: our unfused attention with a
    # hand-written backward), 'xla', 'cudnn' (GPU only); or 'own': our attention on any backend (custom_vjp only).
    attention_impl: str | None = None
    scan_blocks: bool = False  # stack blocks and lax.scan over them: compile time independent of depth
    remat: str = 'none'  # 'none' | 'block' (recompute everything) | 'dots' (keep matmul outputs)
    # Hand-written backward passes (linear layers, RMSNorm, SwiGLU gate, attention): the forward is unchanged,
    # gradients equal autodiff's up to float rounding, fewer activations are saved and the weight-gradient
    # matmuls run in the orientation CPU matmul kernels are fast at. False = plain JAX autodiff.
    custom_vjp: bool = True

    def __post_init__(self):
        def fail(field: str, expected: str):
            raise ValueError(f'JiTConfig.{field}={getattr(self, field)!r}: expected {expected}')

        for field in ('input_size', 'patch_size', 'in_channels', 'hidden_size', 'depth', 'num_heads',
                      'bottleneck_dim', 'num_classes'):
            if not isinstance(getattr(self, field), (int, np.integer)) or getattr(self, field) < 1:
                fail(field, 'a positive integer')
        if self.input_size % self.patch_size:
            fail('input_size', f'a multiple of patch_size={self.patch_size} (the image must tile into patches)')
        if self.hidden_size % self.num_heads:
            fail('hidden_size', f'a multiple of num_heads={self.num_heads}')
        if self.head_dim % 4:
            fail('num_heads', f'a head count giving a head dim divisible by 4 for 2-D RoPE '
                              f'(hidden_size/num_heads = {self.head_dim})')
        if self.hidden_size % 4:
            fail('hidden_size', 'a multiple of 4 (the 2-D sin-cos position table splits it in four)')
        if self.in_context_len < 0:
            fail('in_context_len', 'a non-negative integer')
        if self.in_context_len and not 0 <= self.in_context_start < self.depth:
            fail('in_context_start', f'a block index in [0, depth={self.depth}) where the class tokens join')
        for field in ('attn_drop', 'proj_drop'):
            if not 0.0 <= getattr(self, field) < 1.0:
                fail(field, 'a dropout rate in [0, 1)')
        for field in ('dtype', 'param_dtype'):
            if getattr(self, field) not in _DTYPES:
                fail(field, f'one of {sorted(_DTYPES)}')
        if self.attention_impl not in (None, 'own', 'xla', 'cudnn'):
            fail('attention_impl', "None, 'own', 'xla' or 'cudnn'")
        if self.attention_impl == 'own' and not self.custom_vjp:
            fail('attention_impl', "None, 'xla' or 'cudnn' with custom_vjp False ('own' is a hand-written backward)")
        if self.remat not in _REMAT_POLICIES:
            fail('remat', f'one of {sorted(_REMAT_POLICIES)}')

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU width: the official int(int(d * mlp_ratio) * 2 / 3), e.g. 2730 for d = 1024."""
        return int(int(self.hidden_size * self.mlp_ratio) * 2 / 3)

    @property
    def patch_dim(self) -> int:
        return self.patch_size ** 2 * self.in_channels

    def dropout_active(self, block: int) -> bool:
        """The official code enables dropout only in the middle half of the blocks."""
        return self.depth // 4 <= block < self.depth // 4 * 3


# Sizes per model from the paper (Table 9 / the official presets); G is not in the official code and takes
# the paper's configuration (its in-context start of 10 is unconfirmed). proj_drop: 0 for B (official README),
# 0.2 for H (official README); L = 0 and G = 0.2 follow the paper's Table 9 as reported (unconfirmed).
_SIZES = {
    'B': dict(depth=12, hidden_size=768, num_heads=12, bottleneck_dim=128, in_context_start=4, proj_drop=0.0),
    'L': dict(depth=24, hidden_size=1024, num_heads=16, bottleneck_dim=128, in_context_start=8, proj_drop=0.0),
    'H': dict(depth=32, hidden_size=1280, num_heads=16, bottleneck_dim=256, in_context_start=10, proj_drop=0.2),
    'G': dict(depth=40, hidden_size=1664, num_heads=16, bottleneck_dim=256, in_context_start=10, proj_drop=0.2),
}
# Patch size follows resolution so every model sees 16 x 16 = 256 tokens.
PRESETS: dict[str, JiTConfig] = {
    f'JiT-{size}/{patch}': JiTConfig(input_size=16 * patch, patch_size=patch, in_context_len=32, **dims)
    for size, dims in _SIZES.items() for patch in (16, 32, 64)
}


def preset(name: str, **overrides: Any) -> JiTConfig:
    """A paper model by name ('JiT-B/16' ... 'JiT-G/64'), with any field replaced."""
    if name not in PRESETS:
        raise ValueError(f'unknown JiT preset {name!r}; expected one of {sorted(PRESETS)}')
    return dataclasses.replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------------------------------------
# Fixed tables. Built in numpy once per shape, so they enter compiled programs as constants.


@functools.lru_cache(maxsize=None)
def pos_embed_table(dim: int, grid: int) -> np.ndarray:
    """MAE-style 2-D sin-cos table, f64[grid*grid, dim].

    Channels [0, dim/2) encode the token's column, [dim/2, dim) its row; each half is [sin, cos] over
    frequencies 10000^(-i / (dim/4)). Built in float64 like the official code, which then casts to float32.
    """
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.divmod(np.arange(grid * grid, dtype=np.float64), grid)

    def half(pos):
        angles = pos[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([half(cols), half(rows)], axis=1)


@functools.lru_cache(maxsize=None)
def rope_tables(head_dim: int, grid: int, num_prefix: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """2-D rotary tables (cos, sin), f32[num_prefix + grid*grid, head_dim].

    The first head_dim/2 channels rotate by the token's row, the rest by its column; each frequency
    10000^(-2j / (head_dim/2)) serves an adjacent (interleaved) channel pair. `num_prefix` identity rows
    (cos 1, sin 0) lead the table for the in-context class tokens, which the official code leaves unrotated.
    Computed in float32, as the official code does.
    """
    dim = head_dim // 2
    freqs = (1.0 / 10000 ** (np.arange(0, dim, 2, dtype=np.float32)[: dim // 2] / np.float32(dim)))
    freqs = np.repeat(freqs.astype(np.float32), 2)  # f32[dim]: one angle per channel pair
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    angles = np.concatenate([rows[:, None].astype(np.float32) * freqs, cols[:, None].astype(np.float32) * freqs],
                            axis=1).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    if num_prefix:
        cos = np.concatenate([np.ones((num_prefix, head_dim), np.float32), cos])
        sin = np.concatenate([np.zeros((num_prefix, head_dim), np.float32), sin])
    return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x * cos + rot(x) * sin with rot(a, b) = (-b, a) on adjacent pairs.  x: [b, n, heads, hd]; cos: [n, hd]."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


def timestep_features(t: jax.Array, dim: int = _TIME_FEATURES, max_period: float = 10000.0) -> jax.Array:
    """[cos(t f), sin(t f)] with f_k = max_period^(-k / (dim/2)); t enters raw in [0, 1], not scaled by 1000."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def patchify(x: jax.Array, p: int) -> jax.Array:
    """f[b, h, w, c] -> f[b, (h/p)*(w/p), p*p*c], tokens row-major, features ordered (p_row, p_col, c)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, p: int, channels: int) -> jax.Array:
    """Inverse of `patchify` for a square grid: f[b, n, p*p*c] -> f[b, h, w, c]."""
    b, n, _ = x.shape
    g = math.isqrt(n)
    x = x.reshape(b, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * p, g * p, channels)


def _dropout(x: jax.Array, rate, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; `rate` may be traced (scanned blocks carry their own rate)."""
    if key is None or (isinstance(rate, float) and rate == 0.0):
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Hand-written backward passes (JiTConfig.custom_vjp). Each forward computes exactly what the plain version
# computes; only what is saved for the backward, and how the backward is written, differs.


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


def _rms_norm_plain(x, weight, out_dtype):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + _RMS_EPS)
    return (normed * weight.astype(jnp.float32)).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x, weight, out_dtype):
    return _rms_norm_plain(x, weight, out_dtype)


def _rms_norm_fwd(x, weight, out_dtype):
    """Saves the input and one f32 statistic per row; autodiff keeps three full-width intermediates."""
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + _RMS_EPS)
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
    return jax.nn.silu(gate) * value


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
    'block' lowered the peak by 3%). Here the saved residuals are read as r + min(|dy[0]|, 0) -- r itself
    (NaN only if dy already is) but not computable before dy -- so the recomputation has to wait.
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


def _own_attention(impl: str | None) -> bool:
    """attention_impl 'own', or None on CPU: our unfused attention, whose backward saves the probabilities once
    (jax.nn.dot_product_attention's XLA path is the same maths but keeps exp(logits) as well: +19% peak memory
    at B/16, same speed). On GPU / TPU, None still lets jax.nn.dot_product_attention pick its kernel."""
    return impl == 'own' or (impl is None and jax.default_backend() == 'cpu')


def gathered(state: Any, dtype: str) -> Any:
    """A layer's weights as it computes with them, whole on every device (the FSDP all-gather; see
    jit_jax.sharding.gather_for_use). Linear kernels and biases are cast to the compute dtype first, as
    nnx.Linear would, so the gather moves bf16 and the gradient is reduce-scattered before its cast back."""
    if sharding.fsdp_size() == 1:
        return state

    def cast(path, a):
        linear = path[-2:-1] and getattr(path[-2], 'key', None) in ('kernel', 'bias')
        return a.astype(_DTYPES[dtype]) if linear and jnp.issubdtype(a.dtype, jnp.floating) else a

    return sharding.gather_for_use(jax.tree_util.tree_map_with_path(cast, state))


def _gathered_module(module: nnx.Module, dtype: str) -> nnx.Module:
    """`module` with `gathered` weights (the layers outside the blocks)."""
    if sharding.fsdp_size() == 1:
        return module
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, gathered(state, dtype))


# ---------------------------------------------------------------------------------------------------------
# Modules.


def _linear(din: int, dout: int, cfg: JiTConfig, rngs: nnx.Rngs, *, use_bias: bool = True,
            kernel_init=nnx.initializers.xavier_uniform()) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=kernel_init, bias_init=nnx.initializers.zeros,
                      dtype=_DTYPES[cfg.dtype], param_dtype=_DTYPES[cfg.param_dtype], rngs=rngs,
                      dot_general=_dense_dot_general if cfg.custom_vjp else jax.lax.dot_general)


_zeros = nnx.initializers.zeros
_normal02 = nnx.initializers.normal(0.02)


class RMSNorm(nnx.Module):
    """w * x / sqrt(mean(x^2) + 1e-6), statistics in float32 whatever the compute dtype (as officially)."""

    def __init__(self, dim: int, cfg: JiTConfig):
        self.weight = nnx.Param(jnp.ones((dim,), _DTYPES[cfg.param_dtype]))
        self.dtype = _DTYPES[cfg.dtype]
        self.custom_vjp = cfg.custom_vjp

    def __call__(self, x: jax.Array) -> jax.Array:
        norm = _rms_norm if self.custom_vjp else _rms_norm_plain
        return norm(x, self.weight[...], self.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: JiTConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.impl = cfg.attention_impl
        self.custom_vjp = cfg.custom_vjp
        self.qkv = _linear(d, 3 * d, cfg, rngs)
        self.q_norm = RMSNorm(cfg.head_dim, cfg)
        self.k_norm = RMSNorm(cfg.head_dim, cfg)
        self.proj = _linear(d, d, cfg, rngs)

    def __call__(self, x, cos, sin, *, attn_drop=0.0, proj_drop=0.0, key=None):  # f[b, n, d] -> f[b, n, d]
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q = apply_rope(self.q_norm(qkv[:, :, 0]), cos, sin)
        k = apply_rope(self.k_norm(qkv[:, :, 1]), cos, sin)
        v = qkv[:, :, 2]
        keys = jax.random.split(key, 2) if key is not None else (None, None)
        if keys[0] is not None and not (isinstance(attn_drop, float) and attn_drop == 0.0):
            # Fused kernels take no dropout: attention dropout (0 in every official config) runs unfused.
            logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
            probs = jax.nn.softmax(logits / math.sqrt(q.shape[-1]), axis=-1)
            out = jnp.einsum('bhqk,bkhd->bqhd', _dropout(probs, attn_drop, keys[0]).astype(v.dtype), v)
        elif self.custom_vjp and _own_attention(self.impl):
            out = _attention(q, k, v)  # float32 logits and softmax, as below
        else:
            # Logits and softmax run in float32 inside (as the official code insists, for stability).
            out = jax.nn.dot_product_attention(q, k, v, implementation=self.impl)
        return _dropout(self.proj(out.reshape(b, n, d)), proj_drop, keys[1])


class SwiGLU(nnx.Module):
    """One fused input linear (gate half first, then value half), SiLU gate, output linear."""

    def __init__(self, cfg: JiTConfig, rngs: nnx.Rngs):
        self.w12 = _linear(cfg.hidden_size, 2 * cfg.mlp_hidden, cfg, rngs)
        self.w3 = _linear(cfg.mlp_hidden, cfg.hidden_size, cfg, rngs)
        self.custom_vjp = cfg.custom_vjp

    def __call__(self, x, *, drop=0.0, key=None):
        gate, value = jnp.split(self.w12(x), 2, axis=-1)
        hidden = _swiglu_gate(gate, value) if self.custom_vjp else nnx.silu(gate) * value
        return self.w3(_dropout(hidden, drop, key))


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class Block(nnx.Module):
    """Pre-norm transformer block whose norms are shifted, scaled and gated by the conditioning (adaLN-zero)."""

    def __init__(self, cfg: JiTConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.norm1 = RMSNorm(d, cfg)
        self.attn = Attention(cfg, rngs)
        self.norm2 = RMSNorm(d, cfg)
        self.mlp = SwiGLU(cfg, rngs)
        self.adaLN_modulation = _linear(d, 6 * d, cfg, rngs, kernel_init=_zeros)

    def __call__(self, x, c, cos, sin, *, attn_drop=0.0, proj_drop=0.0, key=None):
        mod = self.adaLN_modulation(nnx.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        keys = jax.random.split(key, 2) if key is not None else (None, None)
        h = self.attn(_modulate(self.norm1(x), shift_msa, scale_msa), cos, sin,
                      attn_drop=attn_drop, proj_drop=proj_drop, key=keys[0])
        x = x + gate_msa[:, None, :] * h
        h = self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp), drop=proj_drop, key=keys[1])
        return x + gate_mlp[:, None, :] * h


class FinalLayer(nnx.Module):
    def __init__(self, cfg: JiTConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.norm_final = RMSNorm(d, cfg)
        self.adaLN_modulation = _linear(d, 2 * d, cfg, rngs, kernel_init=_zeros)
        self.linear = _linear(d, cfg.patch_dim, cfg, rngs, kernel_init=_zeros)

    def __call__(self, x, c):
        shift, scale = jnp.split(self.adaLN_modulation(nnx.silu(c)), 2, axis=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class TimestepEmbedder(nnx.Module):
    def __init__(self, cfg: JiTConfig, rngs: nnx.Rngs):
        self.mlp0 = _linear(_TIME_FEATURES, cfg.hidden_size, cfg, rngs, kernel_init=_normal02)
        self.mlp2 = _linear(cfg.hidden_size, cfg.hidden_size, cfg, rngs, kernel_init=_normal02)

    def __call__(self, t):
        return self.mlp2(nnx.silu(self.mlp0(timestep_features(t))))


class PatchEmbed(nnx.Module):
    """Patch -> bottleneck (no bias) -> width. The official p x p / 1 x 1 convolutions as two matmuls."""

    def __init__(self, cfg: JiTConfig, rngs: nnx.Rngs):
        self.patch_size = cfg.patch_size
        self.proj1 = _linear(cfg.patch_dim, cfg.bottleneck_dim, cfg, rngs, use_bias=False)
        self.proj2 = _linear(cfg.bottleneck_dim, cfg.hidden_size, cfg, rngs)

    def __call__(self, x):  # f[b, h, w, c] -> f[b, n, d]
        return self.proj2(self.proj1(patchify(x, self.patch_size)))


class JiT(nnx.Module):
    """The JiT denoiser network: (z_t NHWC, t, label) -> predicted clean image NHWC (float32)."""

    def __init__(self, cfg: JiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.t_embedder = TimestepEmbedder(cfg, rngs)
        self.y_embedder = nnx.Embed(cfg.num_classes + 1, cfg.hidden_size, embedding_init=_normal02,
                                    param_dtype=_DTYPES[cfg.param_dtype], rngs=rngs)
        self.x_embedder = PatchEmbed(cfg, rngs)
        if cfg.in_context_len:
            self.in_context_posemb = nnx.Param(_normal02(rngs.params(), (cfg.in_context_len, cfg.hidden_size),
                                                         _DTYPES[cfg.param_dtype]))
        if cfg.scan_blocks:
            @nnx.split_rngs(splits=cfg.depth)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(rngs):
                return Block(cfg, rngs)

            self.blocks = stacked(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg, rngs)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, *, dropout_key: jax.Array | None = None,
                 return_activations: bool = False):
        """x: f[b, h, w, c] (z_t), t: f[b] (1 = clean), y: i[b] (num_classes = null) -> x_hat f32[b, h, w, c].

        With `return_activations`, also returns the intermediates the parity tests compare: t_emb, y_emb,
        patch_embed (before positions), block_XX (every block's output, class tokens included) and
        final_tokens (per-patch pixels before unpatchify).
        """
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1:] != (cfg.input_size, cfg.input_size, cfg.in_channels):
            raise ValueError(f'JiT input has shape {x.shape}; expected NHWC [batch, {cfg.input_size}, '
                             f'{cfg.input_size}, {cfg.in_channels}] (JiTConfig.input_size / in_channels)')
        acts = {} if return_activations else None
        t_emb = _gathered_module(self.t_embedder, cfg.dtype)(jnp.asarray(t, jnp.float32).reshape(x.shape[0]))
        y_emb = _gathered_module(self.y_embedder, cfg.dtype)(jnp.asarray(y, jnp.int32).reshape(x.shape[0]))
        c = t_emb + y_emb
        patches = _gathered_module(self.x_embedder, cfg.dtype)(x)
        tokens = patches + jnp.asarray(pos_embed_table(cfg.hidden_size, cfg.grid), jnp.float32)

        start = cfg.in_context_start if cfg.in_context_len else cfg.depth
        keys = jax.random.split(dropout_key, cfg.depth) if dropout_key is not None else None
        tokens = self._run_blocks(tokens, c, 0, start, keys, num_prefix=0, acts=acts)
        if cfg.in_context_len:
            context = y_emb[:, None, :] + sharding.gather_for_use(self.in_context_posemb[...])[None]
            tokens = jnp.concatenate([context.astype(tokens.dtype), tokens], axis=1)
            tokens = self._run_blocks(tokens, c, start, cfg.depth, keys, num_prefix=cfg.in_context_len, acts=acts)
            tokens = tokens[:, cfg.in_context_len:]
        final = _gathered_module(self.final_layer, cfg.dtype)(tokens, c)
        out = unpatchify(final, cfg.patch_size, cfg.in_channels).astype(jnp.float32)
        if acts is None:
            return out
        acts.update(t_emb=t_emb, y_emb=y_emb, patch_embed=patches, final_tokens=final)
        return out, acts

    def _run_blocks(self, x, c, lo: int, hi: int, keys, *, num_prefix: int, acts: dict | None):
        """Blocks lo..hi-1, all on one token layout: `num_prefix` unrotated class tokens, then the image."""
        cfg = self.cfg
        if lo == hi:
            return x
        cos, sin = (jnp.asarray(a) for a in rope_tables(cfg.head_dim, cfg.grid, num_prefix))
        rates = [(cfg.attn_drop, cfg.proj_drop) if cfg.dropout_active(i) else (0.0, 0.0) for i in range(cfg.depth)]

        def apply(graphdef, state, x, key, attn_drop, proj_drop):
            block = nnx.merge(graphdef, gathered(state, cfg.dtype))
            return block(x, c, cos, sin, attn_drop=attn_drop, proj_drop=proj_drop, key=key)

        if cfg.remat != 'none' and cfg.custom_vjp:
            def apply(graphdef, state, x, key, attn_drop, proj_drop):
                def fn(state, x, c):
                    block = nnx.merge(graphdef, gathered(state, cfg.dtype))
                    return block(x, c, cos, sin, attn_drop=attn_drop, proj_drop=proj_drop, key=key)
                return _remat_late(fn, _REMAT_POLICIES[cfg.remat])(state, x, c)
        elif cfg.remat != 'none':
            apply = jax.checkpoint(apply, policy=_REMAT_POLICIES[cfg.remat], static_argnums=(0,))

        if not cfg.scan_blocks:
            for i in range(lo, hi):
                graphdef, state = nnx.split(self.blocks[i])
                x = apply(graphdef, state, x, None if keys is None else keys[i], *rates[i])
                if acts is not None:
                    acts[f'block_{i:02d}'] = x
            return x

        graphdef, state = nnx.split(self.blocks)
        segment = jax.tree.map(lambda a: a[lo:hi], state)
        drops = jnp.asarray(rates[lo:hi], jnp.float32)

        def body(x, xs):
            layer_state, key, drop = xs
            x = apply(graphdef, layer_state, x, key, drop[0], drop[1])
            return x, (x if acts is not None else None)

        x, per_block = jax.lax.scan(body, x, (segment, None if keys is None else keys[lo:hi], drops))
        if acts is not None:
            acts.update({f'block_{i:02d}': per_block[i - lo] for i in range(lo, hi)})
        return x


# ---------------------------------------------------------------------------------------------------------
# Self-description: sizes and compute without allocating anything.


def param_count(cfg: JiTConfig) -> int:
    """Trainable parameters, counted on an abstract model (jax.eval_shape: nothing is allocated).

    The official state_dict also holds the frozen pos_embed (num_patches * hidden_size); here it is a constant.
    """
    abstract = nnx.eval_shape(lambda: JiT(cfg, rngs=nnx.Rngs(0)))
    return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def forward_macs(cfg: JiTConfig) -> int:
    """Multiply-accumulates of one forward pass for one image (what the paper's "Gflops" count).

    Matmuls only: patch embed, the per-block qkv / attention / projection / SwiGLU / adaLN, the final layer and
    the timestep MLP. Elementwise work (norms, RoPE, softmax) is a rounding error at these sizes.
    """
    d, f, n = cfg.hidden_size, cfg.mlp_hidden, cfg.num_patches
    macs = n * (cfg.patch_dim * cfg.bottleneck_dim + cfg.bottleneck_dim * d)
    macs += _TIME_FEATURES * d + d * d
    for i in range(cfg.depth):
        tokens = n + (cfg.in_context_len if cfg.in_context_len and i >= cfg.in_context_start else 0)
        macs += tokens * (4 * d * d + 3 * d * f) + 2 * tokens * tokens * d + 6 * d * d
    macs += n * d * cfg.patch_dim + 2 * d * d
    return macs


def describe(names=None) -> str:
    """A table of presets: shape, parameters and forward G MACs, as the paper's Tables 5/7 report them."""
    rows = [f"{'preset':10s} {'res':>5s} {'depth':>5s} {'width':>5s} {'heads':>5s} {'bneck':>5s} "
            f"{'params':>14s} {'GMACs':>7s}"]
    for name in names or PRESETS:
        cfg = PRESETS[name]
        rows.append(f'{name:10s} {cfg.input_size:5d} {cfg.depth:5d} {cfg.hidden_size:5d} {cfg.num_heads:5d} '
                    f'{cfg.bottleneck_dim:5d} {param_count(cfg):14,d} {forward_macs(cfg) / 1e9:7.1f}')
    return '\n'.join(rows)


if __name__ == '__main__':
    print(describe())
