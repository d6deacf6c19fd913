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

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jit_jax import kernels, sharding
from jit_jax.presets import (  # noqa: F401  (JiTConfig, PRESETS, preset, forward_macs are re-exported)
    DTYPES, PRESETS, TIME_FEATURES, JiTConfig, forward_macs, preset)

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


def timestep_features(t: jax.Array, dim: int = TIME_FEATURES, max_period: float = 10000.0) -> jax.Array:
    """[cos(t f), sin(t f)] with f_k = max_period^(-k / (dim/2)); t enters raw in [0, 1], not scaled by 1000."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def patchify(x: jax.Array, p: int) -> jax.Array:
    """f[b, h, w, c] -> f[b, (h/p)*(w/p), p*p*c], tokens row-major, features ordered (p_row, p_col, c).

    A patch row's (p_col, c) pixels are contiguous in the image and in the patch alike, so they move as one
    axis of p*c. XLA:TPU pads the minor dimensions of the transposed intermediate to whole tiles, which
    (p, c) = (32, 3) filled far worse: at 512 px the train step's image-path temporaries shrank by a
    third (docs/tpu.md).
    """
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p * c).transpose(0, 1, 3, 2, 4)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, p: int, channels: int) -> jax.Array:
    """Inverse of `patchify` for a square grid: f[b, n, p*p*c] -> f[b, h, w, c]."""
    b, n, _ = x.shape
    g = math.isqrt(n)
    x = x.reshape(b, g, g, p, p * channels).transpose(0, 1, 3, 2, 4)
    return x.reshape(b, g * p, g * p, channels)


def _dropout(x: jax.Array, rate, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; `rate` may be traced (scanned blocks carry their own rate)."""
    if key is None or (isinstance(rate, float) and rate == 0.0):
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# FSDP: weights are gathered where they are used.


def gathered(state, dtype: str):
    """A layer's weights as it computes with them, whole on every device (the FSDP all-gather; see
    jit_jax.sharding.gather_for_use). Linear kernels and biases are cast to the compute dtype first, as
    nnx.Linear would, so the gather moves bf16 (and the gradient
    sum comes back in bf16 before its cast back)."""
    if sharding.fsdp_size() == 1:
        return state

    def cast(path, a):
        linear = path[-2:-1] and getattr(path[-2], 'key', None) in ('kernel', 'bias')
        return a.astype(DTYPES[dtype]) if linear and jnp.issubdtype(a.dtype, jnp.floating) else a

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
                      dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype], rngs=rngs,
                      dot_general=kernels.ops(cfg.custom_vjp).dot_general)


_zeros = nnx.initializers.zeros
_normal02 = nnx.initializers.normal(0.02)


class RMSNorm(nnx.Module):
    """w * x / sqrt(mean(x^2) + 1e-6), statistics in float32 whatever the compute dtype (as officially)."""

    def __init__(self, dim: int, cfg: JiTConfig):
        self.weight = nnx.Param(jnp.ones((dim,), DTYPES[cfg.param_dtype]))
        self.dtype = DTYPES[cfg.dtype]
        self.ops = kernels.ops(cfg.custom_vjp)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.ops.rms_norm(x, self.weight[...], self.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: JiTConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.impl = cfg.attention_impl
        self.ops = kernels.ops(cfg.custom_vjp)
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
        else:
            out = self.ops.attention(q, k, v, self.impl)  # float32 logits and softmax inside
        return _dropout(self.proj(out.reshape(b, n, d)), proj_drop, keys[1])


class SwiGLU(nnx.Module):
    """One fused input linear (gate half first, then value half), SiLU gate, output linear."""

    def __init__(self, cfg: JiTConfig, rngs: nnx.Rngs):
        self.w12 = _linear(cfg.hidden_size, 2 * cfg.mlp_hidden, cfg, rngs)
        self.w3 = _linear(cfg.mlp_hidden, cfg.hidden_size, cfg, rngs)
        self.ops = kernels.ops(cfg.custom_vjp)

    def __call__(self, x, *, drop=0.0, key=None):
        gate, value = jnp.split(self.w12(x), 2, axis=-1)
        hidden = self.ops.swiglu_gate(gate, value)
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
        self.mlp0 = _linear(TIME_FEATURES, cfg.hidden_size, cfg, rngs, kernel_init=_normal02)
        self.mlp2 = _linear(cfg.hidden_size, cfg.hidden_size, cfg, rngs, kernel_init=_normal02)

    def __call__(self, t):
        return self.mlp2(nnx.silu(self.mlp0(timestep_features(t))))


class PatchEmbed(nnx.Module):
    """Patch -> bottleneck (no bias) -> width. The official p x p / 1 x 1 convolutions as two matmuls."""

    def __init__(self, cfg: JiTConfig, rngs: nnx.Rngs):
        self.proj1 = _linear(cfg.patch_dim, cfg.bottleneck_dim, cfg, rngs, use_bias=False)
        self.proj2 = _linear(cfg.bottleneck_dim, cfg.hidden_size, cfg, rngs)

    def __call__(self, x):  # f[b, n, p*p*c] (patchified pixels) -> f[b, n, d]
        return self.proj2(self.proj1(x))


class JiT(nnx.Module):
    """The JiT denoiser network: (z_t NHWC, t, label) -> predicted clean image NHWC (float32)."""

    def __init__(self, cfg: JiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.t_embedder = TimestepEmbedder(cfg, rngs)
        self.y_embedder = nnx.Embed(cfg.num_classes + 1, cfg.hidden_size, embedding_init=_normal02,
                                    param_dtype=DTYPES[cfg.param_dtype], rngs=rngs)
        self.x_embedder = PatchEmbed(cfg, rngs)
        if cfg.in_context_len:
            self.in_context_posemb = nnx.Param(_normal02(rngs.params(), (cfg.in_context_len, cfg.hidden_size),
                                                         DTYPES[cfg.param_dtype]))
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
        out = self.denoise_patches(self.to_patches(x), t, y, dropout_key=dropout_key,
                                   return_activations=return_activations)
        if not return_activations:
            return self.from_patches(out)
        return self.from_patches(out[0]), out[1]

    def to_patches(self, x: jax.Array) -> jax.Array:
        """f[b, h, w, c] -> f[b, n, p*p*c]: images in the layout `denoise_patches` takes and returns."""
        return patchify(x, self.cfg.patch_size)

    def from_patches(self, x: jax.Array) -> jax.Array:
        """f[b, n, p*p*c] -> f[b, h, w, c], the inverse of `to_patches`."""
        return unpatchify(x, self.cfg.patch_size, self.cfg.in_channels)

    def denoise_patches(self, x: jax.Array, t: jax.Array, y: jax.Array, *, dropout_key: jax.Array | None = None,
                        return_activations: bool = False):
        """`__call__` on patchified pixels, f[b, n, p*p*c] -> f32[b, n, p*p*c] (see `to_patches`).

        The training objective runs here (jit_jax.diffusion.loss_terms): its squared error is a mean over
        pixels, indifferent to their order, and image-shaped tensors are expensive on TPU, where XLA lays
        an image out with its height in the 128-wide lanes, so every patch reshape leaves lanes empty
        (docs/tpu.md).
        """
        cfg = self.cfg
        if x.ndim != 3 or x.shape[1:] != (cfg.num_patches, cfg.patch_dim):
            raise ValueError(f'JiT patch input has shape {x.shape}; expected [batch, {cfg.num_patches}, '
                             f'{cfg.patch_dim}] (JiT.to_patches of an image)')
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
        out = final.astype(jnp.float32)
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
            def block(state, x, c):
                block = nnx.merge(graphdef, gathered(state, cfg.dtype))  # inside remat: re-gathered, not kept
                return block(x, c, cos, sin, attn_drop=attn_drop, proj_drop=proj_drop, key=key)
            return kernels.remat(block, cfg.remat, cfg.remat_late)(state, x, c)

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
