"""Tables from TPU compiles (jit_jax.aot): paper runs vs the memory model, variants, largest batch per chip.

    python -m jit_jax.aot_tables paper      [--cache C.json]   # every paper config on its slice
    python -m jit_jax.aot_tables paper --gpu                   # the 256 px presets on H100 / H200 (memory only)
    python -m jit_jax.aot_tables variants   --config configs/jit_b16_in256.py --topology v5p-32
    python -m jit_jax.aot_tables max-batch  [--models b16,l16,h16,g16]
    python -m jit_jax.aot_tables paper --cached-only                 # the table from the cache alone

Every compile's report is cached in a JSON file (default docs/tpu_compiles.json) under its config spec,
overrides and topology, so a table is rebuilt from the cache and only new entries are compiled (each is
minutes of CPU for the large presets). The memory model (jit_jax.memory.train_memory, platform='tpu') is
printed next to each compiled peak (platform='gpu' for H100 / H200 targets). The largest batch is searched
with compiles, not with the model: the peak is affine in the batch to within XLA's packing, so two compiles give the line, and the search then
compiles the predicted largest batch and the next one up, stepping until the boundary is confirmed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from jit_jax import aot  # sets the libtpu / JAX_PLATFORMS environment first
from jit_jax import config_lib, memory

GIB = 2 ** 30
DEFAULT_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs',
                             'tpu_compiles.json')

# Each paper config on a slice it would realistically train on (batch 1024, the paper's global batch).
PAPER_RUNS = (
    ('configs/jit_b16_in256.py', 'v5p-32'), ('configs/jit_l16_in256.py', 'v4-64'),
    ('configs/jit_h16_in256.py', 'v5p-128'), ('configs/jit_g16_in256.py', 'v5p-128'),
    ('configs/jit_l16_in256.py', 'v5p-64'), ('configs/jit_b32_in512.py', 'v5p-32'),
    ('configs/jit_l32_in512.py', 'v5p-64'), ('configs/jit_h32_in512.py', 'v5p-128'),
    ('configs/jit_g32_in512.py', 'v5p-128'), ('configs/jit_b64_in1024.py', 'v5p-32'),
)
# The 256 px presets on GPUs (`paper --gpu`, needs the 'gpu-aot' extra): XLA:GPU reports memory, not time.
GPU_PAPER_RUNS = (
    ('configs/jit_b16_in256.py', 'h100-8'), ('configs/jit_l16_in256.py', 'h200-8'),
    ('configs/jit_h16_in256.py', 'h200-32'), ('configs/jit_g16_in256.py', 'h200-32'),
)
# Numerics variants: config overrides on top of the run's own settings, by the key `--variants` names them.
VARIANTS = {
    'configured': ('as configured', ''), 'autodiff': ('custom VJP off', 'model.custom_vjp=off'),
    'custom': ('custom VJPs, own attention', 'model.custom_vjp=on,model.attention_impl=own'),
    'dots': ('remat dots', 'model.remat=dots'), 'block': ('remat block', 'model.remat=block'),
    'scan': ('scan over blocks', 'model.scan_blocks=True'), 'xla': ('attention: xla', 'model.attention_impl=xla'),
    'bf16': ('bf16 params', 'model.param_dtype=bfloat16'),
}
MAX_BATCH_RUNS = {
    'b16': ('configs/jit_b16_in256.py', 'v5p-32'), 'l16': ('configs/jit_l16_in256.py', 'v4-64'),
    'h16': ('configs/jit_h16_in256.py', 'v5p-128'), 'g16': ('configs/jit_g16_in256.py', 'v5p-128'),
}


class Cache:
    """Compile reports by key, persisted as JSON after every new entry (a long run can be resumed)."""

    def __init__(self, path: str, cached_only: bool = False):
        self.path, self.cached_only = path, cached_only  # cached_only: missing entries are None, not compiled
        self.entries: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path, encoding='utf-8') as f:
                self.entries = json.load(f)

    def get(self, spec: str, overrides: str, topology: str, programs=('train',)) -> dict[str, Any] | None:
        key = f'{spec} | {overrides} | {topology} | {",".join(programs)}'
        config = config_lib.read(spec)
        if overrides:
            config_lib.apply_overrides(config, overrides)
        config = config_lib.finalize(config)
        if key in self.entries and not _same_numerics(self.entries[key], config, _platform(topology)):
            del self.entries[key]  # compiled under other defaults (BACKEND_DEFAULTS changed): stale
        if key not in self.entries and self.cached_only:
            return None
        if key not in self.entries:
            print(f'compiling {key} ...', file=sys.stderr, flush=True)
            self.entries[key] = aot.report(config, aot.parse_topology(topology), programs=programs)
            with open(self.path, 'w', encoding='utf-8') as f:
                json.dump(self.entries, f, indent=1, sort_keys=True)
        return self.entries[key]


_NUMERICS = ('attention_impl', 'custom_vjp', 'dtype', 'param_dtype', 'remat', 'scan_blocks')


def _platform(topology: str) -> str:
    return aot.parse_topology(topology).chip.platform  # 'tpu' or 'gpu'


def _same_numerics(rep: dict[str, Any], config, platform: str) -> bool:
    """Whether a cached report compiled the numerics the config resolves to on that platform now."""
    cfg = config_lib.model_config(config, platform=platform)
    late = cfg.remat == 'none' or rep['model'].get('remat_late') == cfg.remat_late  # moot without remat
    return late and all(rep['model'].get(k) == getattr(cfg, k) for k in _NUMERICS)


def predicted(spec: str, overrides: str, rep: dict[str, Any]) -> dict[str, Any]:
    """The memory model's estimate (computed now, not cached) for the configuration a report compiled."""
    config = config_lib.read(spec)
    if overrides:
        config_lib.apply_overrides(config, overrides)
    config = config_lib.finalize(config)
    platform = _platform(rep['topology'])
    cfg = config_lib.model_config(config, platform=platform)
    est = memory.train_memory(cfg, rep['global_batch'], data=rep['mesh']['data'], fsdp=rep['mesh']['fsdp'],
                              param_sharding=rep['param_sharding'], num_ema=len(config.optim.ema_decays),
                              platform=platform)
    return est.as_dict()


def _peak(rep: dict[str, Any]) -> float | None:
    train = rep['programs']['train']
    return train['memory']['peak'] / GIB if train.get('memory') else None


def _needs(rep: dict[str, Any]) -> float:
    train = rep['programs']['train']
    return train['memory']['peak'] / GIB if train.get('memory') else (train.get('needs_gib') or float('inf'))


def paper_table(cache: Cache, runs=PAPER_RUNS) -> str:
    rows = ['| config | slice | layout | per-chip batch | compiled peak GiB (of HBM) | model GiB | model / compiled '
            '| XLA step ms | img/s/chip | MFU bound |', '|' + '---|' * 10]
    for spec, topology in runs:
        rep = cache.get(spec, '', topology)
        if rep is None:
            rows.append(f'| {os.path.basename(spec)} | {topology} | not compiled |' + ' |' * 7)
            continue
        train, model = rep['programs']['train'], predicted(spec, '', rep)['total'] / GIB
        peak = _peak(rep)
        cell = f"{peak:.2f} ({rep['chip']['hbm_gib']})" if peak else f"does not fit: {_needs(rep):.1f}"
        speed = train.get('speed') or {}
        rows.append(f"| {os.path.basename(spec)} | {rep['topology']} | {rep['param_sharding']} | "
                    f"{rep['per_chip_batch']:g} | {cell} | {model:.2f} | "
                    f"{(model / peak) if peak else float('nan'):.3f} | "
                    + (f"{speed['step_ms']:.1f} | {speed['images_per_s_per_chip']:.0f} | {speed['mfu_bound']:.1%} |"
                       if speed else '- | - | - |'))
    return '\n'.join(rows)


def variants_table(cache: Cache, spec: str, topology: str, keys=None) -> str:
    """One row per variant (`keys` of VARIANTS, default all, then any other cached overrides of the run:
    e.g. compiles under other defaults); a large preset is minutes per compile, so pick the ones to compare."""
    rows = [f'{os.path.basename(spec)} on {topology}:', '',
            '| variant | compiled as | peak GiB | temp GiB | TFLOP/chip | bytes accessed GiB | XLA step ms | model GiB |',
            '|' + '---|' * 8]
    chosen = [VARIANTS[k] for k in (keys or VARIANTS)]
    cached = {k.split(' | ')[1] for k in cache.entries
              if k.startswith(f'{spec} | ') and k.endswith(f' | {topology} | train')}
    others = [] if keys else sorted(o for o in cached - {overrides for _, overrides in VARIANTS.values()}
                                    if not o.startswith('batch='))  # max-batch probes have their own table
    for name, overrides in chosen + [(f'`{o}`', o) for o in others]:
        rep = cache.get(spec, overrides, topology)
        if rep is None:
            rows.append(f'| {name} | | not compiled |' + ' |' * 5)
            continue
        train, model = rep['programs']['train'], predicted(spec, overrides, rep)['total'] / GIB
        m = rep['model']
        how = (f"vjp {'custom' if m['custom_vjp'] else 'autodiff'}, attention {m['attention_impl'] or 'jax'}, "
               f"remat {m['remat']}{', scan' if m['scan_blocks'] else ''}, params {m['param_dtype']}")
        if not train.get('memory'):
            rows.append(f'| {name} | {how} | does not fit: {_needs(rep):.1f} | | | | | {model:.2f} |')
            continue
        c, m = train['cost'], train['memory']
        step = f"{c['optimal_seconds'] * 1e3:.1f}" if c['optimal_seconds'] > 0 else '-'
        rows.append(f"| {name} | {how} | {m['peak'] / GIB:.2f} | {m['temp'] / GIB:.2f} | {c['flops'] / 1e12:.2f} | "
                    f"{c['bytes_accessed'] / GIB:.1f} | {step} | {model:.2f} |")
    return '\n'.join(rows)


def max_batch(cache: Cache, spec: str, topology: str) -> tuple[int, dict[str, Any]]:
    """Largest per-chip batch whose train step compiles (the compiler's HBM check); 0 if 1 does not.

    Each probe is a full compile (about a minute for B/16 on 2 cores), so the search starts at the batch
    the compiled peaks of batch 1 and 8 predict (the peak is close to affine in the batch), gallops away
    from it with doubling steps until one batch fits and a larger one does not, then bisects: about
    2 log2(error of the guess) + 3 compiles.
    """
    chips = aot.parse_topology(topology).chips_per_slice
    lo, hi = 0, None  # largest per-chip batch known to fit, smallest known not to

    def probe(per_chip: int) -> bool:
        nonlocal lo, hi
        fits = _peak(cache.get(spec, f'batch={per_chip * chips}', topology)) is not None
        if fits:
            lo = max(lo, per_chip)
        else:
            hi = per_chip if hi is None else min(hi, per_chip)
        return fits

    if not probe(1):
        return 0, cache.get(spec, f'batch={chips}', topology)
    probe(8)
    p1, p8 = (_needs(cache.get(spec, f'batch={b * chips}', topology)) for b in (1, 8))
    capacity = cache.get(spec, f'batch={chips}', topology)['chip']['hbm_gib']
    slope = (p8 - p1) / 7 if p8 != float('inf') and p8 > p1 else None
    b = max(2, int((capacity - p1) / slope) if slope else 2)
    if hi is not None:
        b = min(b, hi - 1)
    step = 1
    fits = probe(b)
    while fits and hi is None:  # the guess fits: step up, doubling, until a batch does not
        b, step = b + step, 2 * step
        fits = probe(b)
    while not fits and b - step > lo:  # it does not: step down, doubling, until one fits
        b, step = b - step, 2 * step
        fits = probe(b)
    while hi - lo > 1:
        probe((lo + hi) // 2)
    return lo, cache.get(spec, f'batch={lo * chips}', topology)


def max_batch_table(cache: Cache, names) -> str:
    rows = ['| config | slice | layout | largest batch per chip (compiled) | peak GiB at it | memory model\'s largest '
            '(90% headroom) |', '|' + '---|' * 6]
    for name in names:
        spec, topology = MAX_BATCH_RUNS[name]
        best, rep = max_batch(cache, spec, topology)
        config = config_lib.load(spec)
        cfg = config_lib.model_config(config, platform='tpu')
        mesh = rep['mesh']
        model_best = memory.max_batch(cfg, rep['chip']['hbm_gib'] * GIB, data=mesh['data'], fsdp=mesh['fsdp'],
                                      param_sharding=rep['param_sharding'], platform='tpu')
        rows.append(f"| {os.path.basename(spec)} | {rep['topology']} | {rep['param_sharding']} | {best} | "
                    f"{_peak(rep) or float('nan'):.2f} of {rep['chip']['hbm_gib']} | {model_best} |")
    return '\n'.join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m jit_jax.aot_tables', description=__doc__.split('\n')[0])
    parser.add_argument('table', choices=('paper', 'variants', 'max-batch'))
    parser.add_argument('--cache', default=DEFAULT_CACHE, help='JSON cache of compile reports')
    parser.add_argument('--config', default='configs/jit_b16_in256.py', help='variants: the config spec')
    parser.add_argument('--topology', default='v5p-32', help='variants: the slice')
    parser.add_argument('--cached-only', action='store_true',
                        help='paper / variants: tabulate what the cache holds, compile nothing')
    parser.add_argument('--gpu', action='store_true', help='paper: the GPU runs (GPU_PAPER_RUNS) instead')
    parser.add_argument('--variants', default='', help=f'variants: a comma-separated subset of {list(VARIANTS)}')
    parser.add_argument('--models', default=','.join(MAX_BATCH_RUNS), help=f'max-batch: of {sorted(MAX_BATCH_RUNS)}')
    args = parser.parse_args(argv)
    keys = [k for k in args.variants.split(',') if k]
    if sorted(set(keys) - set(VARIANTS)):
        parser.error(f'--variants {sorted(set(keys) - set(VARIANTS))}: expected names from {list(VARIANTS)}')
    cache = Cache(args.cache, cached_only=args.cached_only)
    if args.table == 'paper':
        print(paper_table(cache, GPU_PAPER_RUNS if args.gpu else PAPER_RUNS))
    elif args.table == 'variants':
        print(variants_table(cache, args.config, args.topology, keys))
    else:
        names = [n for n in args.models.split(',') if n]
        unknown = sorted(set(names) - set(MAX_BATCH_RUNS))
        if unknown:
            parser.error(f'--models {unknown}: expected names from {sorted(MAX_BATCH_RUNS)}')
        print(max_batch_table(cache, names))
    return 0


if __name__ == '__main__':
    sys.exit(main())
