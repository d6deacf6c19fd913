"""The JiT architecture as data: `JiTConfig`, the paper's presets and the analytic compute per image.

Kept apart from the network (`jit_jax.model`) because config loading, the memory model, the converter and the
benchmarks need sizes and FLOPs without building or tracing a model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from jit_jax import kernels

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
TIME_FEATURES = 256


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
    # remat's recomputation tied to the backward (jit_jax.kernels.remat): XLA:CPU and XLA:GPU would otherwise
    # hoist it into the forward pass; XLA:TPU keeps it late by itself. Resolved per platform (BACKEND_DEFAULTS).
    remat_late: bool = True
    # Hand-written backward passes (`jit_jax.kernels`): same forward, gradients equal autodiff's up to rounding,
    # fewer activations saved on XLA:CPU. False = plain JAX autodiff. The config's 'auto' resolves per platform
    # in `jit_jax.config_lib` (BACKEND_DEFAULTS).
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
            if getattr(self, field) not in DTYPES:
                fail(field, f'one of {sorted(DTYPES)}')
        if self.attention_impl not in (None, 'own', 'xla', 'cudnn'):
            fail('attention_impl', "None, 'own', 'xla' or 'cudnn'")
        if self.attention_impl == 'own' and not self.custom_vjp:
            fail('attention_impl', "None, 'xla' or 'cudnn' with custom_vjp False ('own' is a hand-written backward)")
        if not isinstance(self.custom_vjp, bool):
            fail('custom_vjp', "a bool (jit_jax.config_lib resolves 'auto' / 'on' / 'off' into one)")
        if self.remat not in kernels.REMAT_POLICIES:
            fail('remat', f'one of {sorted(kernels.REMAT_POLICIES)}')

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


def forward_macs(cfg: JiTConfig) -> int:
    """Multiply-accumulates of one forward pass for one image (what the paper's "Gflops" count).

    Matmuls only: patch embed, the per-block qkv / attention / projection / SwiGLU / adaLN, the final layer and
    the timestep MLP. Elementwise work (norms, RoPE, softmax) is a rounding error at these sizes.
    """
    d, f, n = cfg.hidden_size, cfg.mlp_hidden, cfg.num_patches
    macs = n * (cfg.patch_dim * cfg.bottleneck_dim + cfg.bottleneck_dim * d)
    macs += TIME_FEATURES * d + d * d
    for i in range(cfg.depth):
        tokens = n + (cfg.in_context_len if cfg.in_context_len and i >= cfg.in_context_start else 0)
        macs += tokens * (4 * d * d + 3 * d * f) + 2 * tokens * tokens * d + 6 * d * d
    macs += n * d * cfg.patch_dim + 2 * d * d
    return macs
