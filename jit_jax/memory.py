"""A memory model of the JiT train step: predicted peak bytes per device, and the largest batch that fits.

    python -m jit_jax.memory --model JiT-H/16 --batch 256 --data 1 --fsdp 8 --param-sharding fsdp --remat block
    python -m jit_jax.memory --table        # largest per-device batch for B/L/H/G on v5e/v4/H100/v5p/H200

Why a model and not just a measurement: the sizes people plan for (H or G at batch 1024 on 8-256
accelerators) cannot be compiled on the machine doing the planning, and a number per term says what to change
(remat, fsdp, dtype) when it does not fit. `measure_train_memory` compiles the real step (no execution, no
allocation) and reads XLA's own buffer assignment, so the model is checked against the program it describes.

The terms, per device, in bytes:

* state: parameters, both AdamW moments and every EMA copy, all float32 (param_dtype); split over the
  `fsdp` axis by `sharding.state_shardings`' rule when param_sharding == 'fsdp' (small arrays stay whole).
  The step donates its state, so the updated state reuses these buffers instead of doubling them.
* gradients: one float32 copy of the parameters (sharded like them under fsdp), alive by the end of the
  backward pass.
* activations: what the forward pass keeps for the backward, counted tensor by tensor from the block's
  structure (`block_residuals`): every matmul's input, the norms' inputs and statistics, the attention
  probabilities (our attention is unfused: softmax(q k^T) is materialised, [heads, n, n] per image), and
  the gate / scale operands of adaLN. With remat 'block' only each block's input is kept, and one block's
  residuals are rebuilt during its backward; 'dots' keeps the outputs of the weight matmuls.
* transient: the working set of one block's backward (gradients of its widest intermediates), and under fsdp
  the all-gathered compute-dtype weights of the block in flight (kept as residuals without remat).
* dropout: each block where dropout is active keeps its keep-masks (one byte per element) for the backward:
  proj_drop's on the attention projection's output and the MLP's hidden layer, attn_drop's on the probs.

On TPU (platform='tpu') XLA:TPU stores arrays in (8, 128) tiles and lays the attention tensors out with the
token axis minor: q, k, v, the probabilities and their gradients pad the tokens to a multiple of 128
(288 tokens, i.e. 256 patches + 32 class tokens, take 384 lanes), which the model counts (`_lanes`).

On GPU (platform='gpu') XLA:GPU, like XLA:TPU, fuses and recomputes the elementwise chains plain autodiff
would keep, but it keeps the attention probabilities twice: float32, and cast to the compute dtype for the
probs @ v matmul (the model is within 6% of deviceless XLA:GPU compiles of B/16 to G/16, docs/tpu.md).

peak = state + max(activations + transient + early gradients, gradients + optimizer temporaries).

What it leaves out: XLA's scratch for fusions and collectives' buffers (a few MiB), the runtime's own
reservations (on GPU XLA preallocates 75% of memory by default; the model predicts what the program needs,
which is what `XLA_PYTHON_CLIENT_PREALLOCATE=false` or the allocator's peak shows), and fragmentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jit_jax import aot_analysis
from jit_jax.config_checks import BACKEND_DEFAULTS
from jit_jax import model as model_lib
from jit_jax import sharding

GIB = 2 ** 30
TERMS = ('params', 'opt_state', 'ema', 'gradients', 'activations', 'transient', 'early_gradients')
_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes per device for one train step; `total` is the peak."""

    params: int
    opt_state: int
    ema: int
    gradients: int
    activations: int
    transient: int
    early_gradients: int
    per_device_batch: int
    phase: str  # which side of the max() sets the peak: 'activations' or 'gradients'

    @property
    def state(self) -> int:
        return self.params + self.opt_state + self.ema

    @property
    def total(self) -> int:
        return self.state + max(self.activations + self.transient + self.early_gradients,
                                self.gradients + self.transient_update)

    @property
    def transient_update(self) -> int:
        """Optimizer temporaries: XLA fuses the AdamW and EMA updates elementwise into the donated buffers."""
        return 0

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(state=self.state, total=self.total, total_gib=self.total / GIB)
        return out


def _config(model: str | model_lib.JiTConfig, **overrides) -> model_lib.JiTConfig:
    cfg = model_lib.preset(model) if isinstance(model, str) else model
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def _param_shapes(cfg: model_lib.JiTConfig) -> tuple[tuple[int, ...], ...]:
    """Parameter shapes (scan layout as configured); numerics options do not change them, so they share a
    cache entry and max_batch's search builds each abstract model once."""
    return _param_shapes_cached(dataclasses.replace(cfg, dtype='float32', remat='none', custom_vjp=True,
                                                    attention_impl=None))


@functools.lru_cache(maxsize=64)
def _param_shapes_cached(cfg: model_lib.JiTConfig) -> tuple[tuple[int, ...], ...]:
    abstract = nnx.eval_shape(lambda: model_lib.JiT(cfg, rngs=nnx.Rngs(0)))
    return tuple(tuple(v.shape) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def _sharded_elements(shapes, fsdp: int) -> int:
    """Elements per device under sharding.state_shardings' fsdp rule (exactly the rule the trainer uses)."""
    total = 0
    for shape in shapes:
        spec = sharding._fsdp_spec(shape, fsdp)  # pylint: disable=protected-access
        total += math.prod(shape) // (fsdp if 'fsdp' in tuple(spec) else 1)
    return total


def _lanes(tokens: int, platform: str) -> int:
    """The token axis as the attention tensors store it: XLA:TPU puts it minor, in whole 128-lane tiles."""
    return -(-tokens // 128) * 128 if platform == 'tpu' else tokens


def block_residuals(cfg: model_lib.JiTConfig, tokens: int, platform: str = 'cpu',
                    dropout: bool = False) -> dict[str, int]:
    """Bytes one block keeps for its backward, per image, without remat, by tensor.

    Read off the block's code (model.Block / Attention / SwiGLU): compute-dtype tensors take cfg.dtype's
    width; the residual stream, norm statistics and attention probabilities are float32 whatever the dtype.
    With cfg.custom_vjp False, autodiff keeps more: each RMSNorm's two intermediate products, SiLU's
    sigmoid and products, and both exp(logits) and the normalised probabilities. `dropout`: the block is
    one where dropout is active (cfg.dropout_active) and keeps the keep-masks of its nonzero rates.
    """
    d, f, h, n = cfg.hidden_size, cfg.mlp_hidden, cfg.num_heads, tokens
    s, f32, lanes = _BYTES[cfg.dtype], 4, _lanes(tokens, platform)
    terms = {
        'norm1 input x (f32)': n * d * f32,
        'norm1 output (adaLN scale grad)': n * d * s,
        'qkv input': n * d * s,
        'q, k before qk-norm': 2 * lanes * d * s,
        'q, k (roped), v: attention inputs': 3 * lanes * d * s,
        'attention probs (f32)': h * lanes * n * f32,
        'attention output (proj input)': n * d * s,
        'proj output (gate grad)': n * d * s,
        'norm2 input x (f32)': n * d * f32,
        'norm2 output': n * d * s,
        'w12 input': n * d * s,
        'w12 output (gate, value)': 2 * n * f * s,
        'w3 input': n * f * s,
        'w3 output (gate grad)': n * d * s,
        'norm statistics (f32)': 2 * n * f32 + 2 * h * lanes * f32,
    }
    if dropout and cfg.proj_drop > 0:
        terms['proj_drop keep-masks (proj output, MLP hidden)'] = n * (d + f)
    if dropout and cfg.attn_drop > 0:
        terms['attn_drop keep-mask (probs)'] = h * lanes * n
    if platform == 'gpu' and s < f32:
        # XLA:GPU (deviceless compiles of B/16 and L/16 for H100 / H200, docs/tpu.md) also keeps the probabilities
        # cast to the compute dtype, the operand of the probs @ v matmul; XLA:TPU fuses that cast.
        terms['attention probs, compute-dtype copy (GPU)'] = h * lanes * n * s
    if not cfg.custom_vjp and platform == 'cpu':
        # XLA:TPU and XLA:GPU fuse these elementwise chains into their consumers and recompute them in the
        # backward: B/16's TPU peak is the same with and without the hand-written VJPs (docs/tpu.md).
        terms['autodiff extras: RMSNorm products (f32)'] = 2 * n * (2 * d + 2 * d) * f32
        terms['autodiff extras: SiLU and its sigmoid'] = 3 * n * f * s
        terms['autodiff extras: exp(logits) (f32)'] = h * lanes * n * f32
    return terms


def block_params(cfg: model_lib.JiTConfig) -> int:
    """Parameters of one block: qkv, proj, w12, w3, adaLN (with biases) and the four RMSNorm scales."""
    d, f = cfg.hidden_size, cfg.mlp_hidden
    return (d * 3 * d + 3 * d) + (d * d + d) + (d * 2 * f + 2 * f) + (f * d + d) + (d * 6 * d + 6 * d) \
        + 2 * d + 2 * cfg.head_dim


def _dots_saved(cfg: model_lib.JiTConfig, tokens: int) -> int:
    """remat 'dots' keeps matmul outputs without batch dimensions (the linear layers), per image."""
    d, f, s = cfg.hidden_size, cfg.mlp_hidden, _BYTES[cfg.dtype]
    return tokens * (3 * d + d + 2 * f + d) * s


def block_backward_transient(cfg: model_lib.JiTConfig, tokens: int, platform: str = 'cpu') -> int:
    """Per image: the larger of the MLP's and the attention's backward working sets."""
    d, f, h, n = cfg.hidden_size, cfg.mlp_hidden, cfg.num_heads, tokens
    s, f32, lanes = _BYTES[cfg.dtype], 4, _lanes(tokens, platform)
    mlp = n * (3 * f * s + 2 * d * f32)  # d(w12 out), d(w3 in); dx and its running sum
    attention = 2 * h * lanes * n * f32 + lanes * 4 * d * s + n * 2 * d * f32  # d(probs), d(logits); dq..d(out)
    return max(mlp, attention)


def outside_blocks(cfg: model_lib.JiTConfig) -> int:
    """Per image: the loss's image-sized arrays, the patch embedding and the final layer.

    The objective runs on patches (diffusion.loss_terms), and what its backward reads is alive at the peak:
    the batch, its patches and z_t, all float32. The noise is drawn inside z_t's fusion and the prediction
    and target are recomputed from x, z_t and the network output (XLA:TPU's live ranges at the peak of
    B/64's step, docs/tpu.md).
    """
    n, d, s, f32 = cfg.num_patches, cfg.hidden_size, _BYTES[cfg.dtype], 4
    pixels = cfg.input_size ** 2 * cfg.in_channels
    loss = 3 * pixels * f32
    embed = n * (cfg.patch_dim + cfg.bottleneck_dim) * s + n * d * f32
    final = n * d * f32 + 2 * n * d * s + n * cfg.patch_dim * s
    return loss + embed + final


def train_memory(model: str | model_lib.JiTConfig, global_batch: int, *, data: int = 1, fsdp: int = 1,
                 param_sharding: str = 'replicate', dtype: str | None = None, remat: str | None = None,
                 custom_vjp: bool | None = None, num_ema: int = 2, image_size: int | None = None,
                 platform: str = 'cpu') -> MemoryEstimate:
    """Predicted peak memory per device of the train step for a preset name or a JiTConfig.

    The batch splits over data x fsdp devices; parameters, moments and EMAs split over fsdp only when
    param_sharding == 'fsdp' (as config.mesh.param_sharding).
    """
    if param_sharding not in ('replicate', 'fsdp'):
        raise ValueError(f"param_sharding={param_sharding!r}: expected 'replicate' or 'fsdp'")
    devices = data * fsdp
    if global_batch % devices:
        raise ValueError(f'global_batch={global_batch} does not split over data x fsdp = {devices} devices')
    cfg = _config(model, dtype=dtype, remat=remat, custom_vjp=custom_vjp, input_size=image_size)
    b = global_batch // devices
    shard = fsdp if param_sharding == 'fsdp' else 1
    shapes = _param_shapes(cfg)
    param_elems = _sharded_elements(shapes, shard)
    p_bytes = _BYTES[cfg.param_dtype]
    params = param_elems * p_bytes
    gradients = param_elems * 4

    n0, ctx = cfg.num_patches, cfg.in_context_len
    start = cfg.in_context_start if ctx else cfg.depth
    token_counts = [n0 if i < start else n0 + ctx for i in range(cfg.depth)]
    dropout = cfg.proj_drop > 0 or cfg.attn_drop > 0
    per_block = [sum(block_residuals(cfg, n, platform, dropout and cfg.dropout_active(i)).values())
                 for i, n in enumerate(token_counts)]
    block_param_elems = block_params(cfg)
    s = _BYTES[cfg.dtype]
    full_block_weights = block_param_elems * s  # one block's weights in the compute dtype, gathered

    if cfg.remat == 'none':
        saved = sum(per_block)
    elif cfg.remat == 'block':
        saved = sum(n * cfg.hidden_size * 4 for n in token_counts)
    else:  # 'dots'
        saved = sum(n * cfg.hidden_size * 4 + _dots_saved(cfg, n) for n in token_counts)
    rebuilt = 0 if cfg.remat == 'none' else max(per_block)  # one block's residuals during its backward
    activations = b * (saved + outside_blocks(cfg))
    transient = b * (rebuilt + max(block_backward_transient(cfg, n, platform) for n in token_counts))
    if shard > 1:
        # fsdp: each block's weights are all-gathered around their use; without remat the gathered copies
        # are residuals of the backward, so every block's stay alive until then.
        kept = cfg.depth if cfg.remat == 'none' else 2
        transient += kept * full_block_weights
    early = 2 * block_param_elems * 4 // shard  # the last block's and final layer's gradients, already out
    return MemoryEstimate(params=params, opt_state=2 * param_elems * 4, ema=num_ema * params,
                          gradients=gradients, activations=activations, transient=transient,
                          early_gradients=early, per_device_batch=b,
                          phase='activations' if activations + transient + early > gradients else 'gradients')


def max_batch(model: str | model_lib.JiTConfig, device_bytes: float, *, data: int = 1, fsdp: int = 1,
              param_sharding: str = 'replicate', dtype: str | None = None, remat: str | None = None,
              headroom: float = 0.9, **kwargs) -> int:
    """Largest per-device batch whose predicted peak fits in headroom * device_bytes (0 if none does).

    The default 10% headroom covers what the model leaves out (fusion scratch, collectives, fragmentation).
    """
    def fits(per_device: int) -> bool:
        est = train_memory(model, per_device * data * fsdp, data=data, fsdp=fsdp, param_sharding=param_sharding,
                           dtype=dtype, remat=remat, **kwargs)
        return est.total <= headroom * device_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 20:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# The accelerators a paper run is planned for: (name, HBM GiB per device, compiler platform).
DEVICES = (('v5e', 16, 'tpu'), ('v4', 32, 'tpu'), ('H100', 80, 'gpu'), ('v5p', 95, 'tpu'), ('H200', 141, 'gpu'))


def batch_table(models=('JiT-B/16', 'JiT-L/16', 'JiT-H/16', 'JiT-G/16'), devices=DEVICES,
                fsdp: int = 8, dtype: str = 'bfloat16') -> str:
    """Markdown table of the largest per-device batch (256 px, bf16 compute, f32 params, 2 EMAs), each device
    with its platform's terms and numerics (BACKEND_DEFAULTS: autodiff on TPU and GPU)."""
    header = ['model', 'params', 'layout', 'remat'] + [f'{name} {gib} GiB' for name, gib, _ in devices]
    rows = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for name in models:
        count = model_lib.param_count(model_lib.preset(name))
        for layout, kwargs in ((f'fsdp x{fsdp}', dict(data=1, fsdp=fsdp, param_sharding='fsdp')),
                               ('replicated', dict(data=fsdp, fsdp=1, param_sharding='replicate'))):
            for remat in ('none', 'block'):
                cells = [str(max_batch(name, gib * GIB, dtype=dtype, remat=remat, platform=platform,
                                       custom_vjp=BACKEND_DEFAULTS[platform]['custom_vjp'], **kwargs))
                         for _, gib, platform in devices]
                rows.append(f'| {name} | {count / 1e6:.0f}M | {layout} | {remat} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(rows)


# ---------------------------------------------------------------------------------------------------------
# Measurement: XLA's buffer assignment of the real compiled step.


def measure_train_memory(config: Any, mesh: jax.sharding.Mesh | None = None) -> dict[str, int]:
    """Compile the Trainer's step for `config` (abstract inputs: nothing is allocated or run).

    Returns XLA's memory_analysis() sizes per device and `peak` = arguments + outputs - aliased + temporaries.
    On CPU this is the true peak of the program: the runtime allocates exactly the arguments, the
    non-aliased outputs and one block of `temp` bytes that the buffer assignment packs every intermediate
    into. (CPU devices report no memory_stats(), and process RSS mixes in the interpreter, the compiler and
    numpy copies.)
    """
    from jit_jax import train  # pylint: disable=import-outside-toplevel  (train imports data pipelines)

    trainer = train.Trainer(config, mesh=mesh)
    mesh = trainer.mesh
    batch_sharding = sharding.batch_sharding(mesh)
    size, b = config.data.image_size, config.data.global_batch_size
    batch = {'image': jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32, sharding=batch_sharding),
             'label': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding)}
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         trainer.abstract_state, trainer.state_shardings)
    with jax.set_mesh(mesh):
        compiled = trainer.step_fn.lower(state, batch).compile()
    return aot_analysis.memory(compiled)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m jit_jax.memory', description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='JiT-B/16')
    parser.add_argument('--batch', type=int, default=None, help='global batch (default: one per device)')
    parser.add_argument('--data', type=int, default=1)
    parser.add_argument('--fsdp', type=int, default=1)
    parser.add_argument('--param-sharding', choices=('replicate', 'fsdp'), default='replicate')
    parser.add_argument('--dtype', choices=tuple(_BYTES), default='bfloat16')
    parser.add_argument('--remat', choices=('none', 'block', 'dots'), default='none')
    parser.add_argument('--platform', choices=tuple(BACKEND_DEFAULTS), default='tpu',
                        help="whose compiler the terms follow (and its numerics defaults); 'cpu' for XLA:CPU")
    parser.add_argument('--table', action='store_true', help='print the largest-batch table and exit')
    args = parser.parse_args(argv)
    if args.table:
        print(batch_table())
        return
    batch = args.batch or args.data * args.fsdp
    est = train_memory(args.model, batch, data=args.data, fsdp=args.fsdp, param_sharding=args.param_sharding,
                       dtype=args.dtype, remat=args.remat, platform=args.platform,
                       custom_vjp=BACKEND_DEFAULTS[args.platform]['custom_vjp'])
    for key, value in est.as_dict().items():
        print(f'{key:18s} {value / GIB:10.3f} GiB' if isinstance(value, int) and key != 'per_device_batch'
              else f'{key:18s} {value}')


if __name__ == '__main__':
    main()
