"""Compile a run's programs for a TPU slice ahead of time, without a TPU: memory, FLOPs, collectives, speed.

    python -m jit_jax.aot --config configs/jit_h16_in256.py --topology v5p-128 [--num-slices N] [--out F.json]
                          [--buffers N]

XLA's TPU compiler ships in libtpu (`pip install -e '.[tpu]'`) and runs on any host: the slice's devices
come from `jax.experimental.topologies.get_topology_desc`, the run's mesh is laid over them, and the exact
programs a run executes -- the Trainer's jitted train step with its donation and shardings, and the
sampler of its sample grids -- are lowered on abstract inputs (`jax.ShapeDtypeStruct`s carrying the
shardings; nothing is allocated) and compiled. The compiled program then reports, per device (read by
jit_jax.aot_analysis):

* HBM by category (`memory_analysis()`: arguments, outputs, aliased = donated, temporaries) against the
  chip's capacity; a program that does not fit fails to compile with RESOURCE_EXHAUSTED, reported here as
  "does not fit: needs X GiB of Y" with the largest buffers;
* FLOPs and bytes accessed (`cost_analysis()`), next to the analytic count (3 x forward at 2 flops per MAC);
* the collectives in the optimised HLO (kind, static count, bytes), so FSDP is seen gathering parameters
  and reduce-scattering gradients and nothing else moves;
* where XLA's cost model gives a positive `optimal_seconds` (v5p in jax 0.10.2 / libtpu 0.0.42; -1 on v4,
  v5e and v6e), the implied step time, images/s per chip and the MFU that time implies -- a bound from a
  roofline model, not a measurement.

The local backend stays CPU (JAX_PLATFORMS=cpu): only the compile targets the TPU. Topologies are named as
Cloud TPU names them: 'v5p-128' (cores for v4 / v5p, chips for v5e / v6e) or '<generation>:<chip grid>'
('v5p:4x4x4', 'v5e:2x2').
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
import sys
import tempfile
import time
from typing import Any

from jit_jax import LIBTPU_PLACEHOLDERS

# libtpu reads these at import; set before JAX starts, only if the caller has not (silences host probing, on a
# TPU VM too: this client only compiles).
for _key, _value in LIBTPU_PLACEHOLDERS + (('JAX_PLATFORMS', 'cpu'),
                                           ('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')):  # compile-only: no chip to share
    os.environ.setdefault(_key, _value)
# XLA:GPU without a GPU: autotuning (and Triton GEMM tiling, which relies on it) would need the device; without
# these the compile fails ('Couldn't find output tile sizes'). XLA:TPU and XLA:CPU ignore them.
_GPU_FLAGS = ('--xla_gpu_autotune_level=0', '--xla_gpu_enable_triton_gemm=false')
os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', '')] + [
    f for f in _GPU_FLAGS if f.split('=')[0] not in os.environ.get('XLA_FLAGS', '')]).strip()

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position

from jit_jax import config_lib, sampling, sharding  # pylint: disable=wrong-import-position
from jit_jax import memory as memory_lib  # pylint: disable=wrong-import-position
from jit_jax import model as model_lib  # pylint: disable=wrong-import-position
from jit_jax.aot_analysis import (  # pylint: disable=wrong-import-position
    GIB, collectives, cost, entry_parameters, largest_allocations, memory, out_of_memory)


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of one accelerator (Cloud TPU system-architecture pages; NVIDIA datasheets)."""

    hbm_gib: float
    peak_bf16_tflops: float  # dense
    cores_in_name: bool  # 'v4-64' counts TensorCores (2 per chip); 'v5e-64', 'h100-8' count chips
    chip_config: str  # TPU: get_topology_desc's chip_config_name giving one device per chip
    platform: str = 'tpu'
    # GPU: XLA's GpuTargetConfig.gpu_device_info (what the compiler would query from the device).
    gpu_info: tuple[tuple[str, Any], ...] = ()


_HOPPER = (('threads_per_block_limit', 1024), ('threads_per_warp', 32), ('shared_memory_per_block', 49152),
           ('shared_memory_per_core', 233472), ('threads_per_core_limit', 2048), ('core_count', 132),
           ('fpus_per_core', 128), ('block_dim_limit_x', 2147483647), ('block_dim_limit_y', 65535),
           ('block_dim_limit_z', 65535), ('l2_cache_size', 52428800), ('clock_rate_ghz', 1.98),
           ('shared_memory_per_block_optin', 232448), ('registers_per_core_limit', 65536),
           ('registers_per_block_limit', 65536))
CHIPS = {
    'v4': Chip(32, 275, True, 'megacore'),
    'v5p': Chip(95, 459, True, 'megacore'),
    'v5e': Chip(16, 197, False, 'default'),
    'v6e': Chip(32, 918, False, 'default'),
    # H100 SXM 80 GB (3.35 TB/s) and H200 141 GB (4.8 TB/s): both 989 dense bf16 TFLOP/s, 132 SMs, sm_90.
    'h100': Chip(79.1, 989, False, '', 'gpu', _HOPPER + (('memory_bandwidth', 3352320000000),
                                                          ('device_memory_size', 84929347584))),
    'h200': Chip(140.4, 989, False, '', 'gpu', _HOPPER + (('memory_bandwidth', 4800000000000),
                                                           ('device_memory_size', 150754820096))),
}
_GPU_NAMES = {'h100': 'NVIDIA H100 80GB HBM3', 'h200': 'NVIDIA H200'}
# Slice shapes by chip count (Cloud TPU's standard single-slice topologies).
_GRIDS_3D = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8', 256: '4x8x8',
             512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16'}
_GRIDS_2D = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16', 256: '16x16'}


@dataclasses.dataclass(frozen=True)
class Topology:
    generation: str  # key of CHIPS
    grid: str  # '4x4x4'
    num_slices: int = 1

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def chips_per_slice(self) -> int:
        return math.prod(int(d) for d in self.grid.split('x'))

    @property
    def name(self) -> str:
        per_slice = self.chips_per_slice * (2 if self.chip.cores_in_name else 1)
        return f'{self.generation}-{per_slice}' + (f' x {self.num_slices} slices' if self.num_slices > 1 else '')

    def devices(self) -> list:
        """The slice's devices, one per chip (compile-only: they exist for the compiler alone)."""
        from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

        if self.chip.platform == 'gpu':
            return _gpu_devices(self)
        dims = tuple(int(d) for d in self.grid.split('x'))
        # Grids of 4 or more chips on every side of a 3-D slice are tori (wrap-around links).
        wrap = tuple(len(dims) == 3 and min(dims) >= 4 for _ in dims) + (False,) * (3 - len(dims))
        name = {'v5p': 'v5'}.get(self.generation, self.generation)
        return list(topologies.get_topology_desc(
            topology_name=f'{name}:{self.grid}', platform='tpu', chip_config_name=self.chip.chip_config,
            chips_per_host_bounds=(2, 2, 1), num_slices=self.num_slices, wrap=wrap).devices)


def _gpu_devices(topology: Topology) -> list:
    """GPUs for XLA:GPU's deviceless compile: the CUDA PJRT plugin builds a topology from a target config."""
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

    try:
        import jax_plugins.xla_cuda12  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        raise RuntimeError(f'--topology {topology.name}: GPU targets need the CUDA PJRT plugin: '
                           "pip install -e '.[gpu-aot]' (jax-cuda12-plugin; no GPU, driver or CUDA wheels "
                           'needed)') from None
    info = ' '.join(f'{k}: {v}' for k, v in topology.chip.gpu_info)
    target = (f'gpu_device_info {{ {info} cuda_compute_capability {{ major: 9 }} }} platform_name: "CUDA" '
              f'dnn_version_info {{ major: 9 minor: 8 }} runtime_version {{ major: 12 minor: 8 }} '
              f'device_description_str: "{_GPU_NAMES[topology.generation]}"')
    per_host = min(topology.chips_per_slice, 8)
    hosts = topology.chips_per_slice // per_host
    return list(topologies.get_topology_desc(platform='cuda', topology_name='', target_config=target,
                                             topology=f'{topology.num_slices}x{hosts}x{per_host}').devices)


def parse_topology(text: str, num_slices: int = 1) -> Topology:
    """'v5p-128' or 'v5p:4x4x4' -> Topology; unknown names list what is accepted."""
    expected = ("expected '<generation>-<size>' or '<generation>:<grid>' with generation one of "
                "['v4', 'v5e', 'v5p', 'v6e'], e.g. 'v5p-128', 'v4-64', 'v5e-4', 'v5p:4x4x4'")
    found = re.fullmatch(r'(v4|v5p|v5e|v6e|v5litepod)(?:-(\d+)|:(\d+(?:x\d+){1,2}))', text.strip())
    gpus = re.fullmatch(r'(h100|h200)-(\d+)', text.strip())
    if gpus and (int(gpus[2]) in (1, 2, 4, 8) or int(gpus[2]) % 8 == 0) and num_slices >= 1:
        return Topology(gpus[1], gpus[2], num_slices)  # GPUs: the grid is the GPU count (8 per host)
    if not found or num_slices < 1:
        raise ValueError(f'--topology {text!r} --num-slices {num_slices}: {expected} (or h100-N / h200-N, N GPUs: '
                         f'1, 2, 4 or a multiple of 8), and num_slices >= 1')
    generation = 'v5e' if found[1] == 'v5litepod' else found[1]
    chip = CHIPS[generation]
    if found[3]:
        grid = found[3]
        if (grid.count('x') == 2) != (generation in ('v4', 'v5p')):
            raise ValueError(f'--topology {text!r}: {generation} grids are '
                             f"{'3-D (AxBxC)' if generation in ('v4', 'v5p') else '2-D (AxB)'}")
    else:
        size = int(found[2])
        chips, odd = divmod(size, 2) if chip.cores_in_name else (size, 0)
        grids = _GRIDS_3D if generation in ('v4', 'v5p') else _GRIDS_2D
        if odd or chips not in grids:
            sizes = sorted(c * (2 if chip.cores_in_name else 1) for c in grids)
            raise ValueError(f'--topology {text!r}: no standard {generation} slice of that size; expected one of '
                             f'{sizes} (or give the grid, {generation}:AxB...)')
        grid = grids[chips]
    return Topology(generation, grid, num_slices)


# ---------------------------------------------------------------------------------------------------------
# Compiling the run's programs


def abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the shardings: what jit.lower needs, and nothing allocated."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def batch_inputs(mesh, batch: int, size: int, channels: int = 3) -> dict:
    spec = sharding.batch_sharding(mesh)
    return {'image': jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32, sharding=spec),
            'label': jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=spec)}


def lower_train_step(trainer) -> Any:
    """The Trainer's own jitted step (donation and shardings included), lowered on abstract inputs."""
    config = trainer.config
    state = abstract(trainer.abstract_state, trainer.state_shardings)
    batch = batch_inputs(trainer.mesh, config.data.global_batch_size, config.data.image_size,
                         trainer.model_config.in_channels)
    with jax.set_mesh(trainer.mesh):
        return trainer.step_fn.lower(state, batch)


def lower_sampler(trainer, batch: int) -> Any:
    """The sampler of Trainer.sample_grid (the whole ODE trajectory, CFG included) on the EMA weights."""
    cfg = trainer.model_config
    shape = (batch, cfg.input_size, cfg.input_size, cfg.in_channels)
    weights = trainer.config.sampler.ema
    params = trainer.abstract_state['params'] if weights == 'model' else trainer.abstract_state['ema'][weights]
    shardings = (trainer.state_shardings['params'] if weights == 'model'
                 else trainer.state_shardings['ema'][weights])
    spec = sharding.batch_sharding(trainer.mesh)

    def run(params, noise, labels):
        return sampling.sample_with_spec(nnx.merge(trainer.graphdef, params), noise, labels, trainer.sampler)

    fn = jax.jit(run, in_shardings=(shardings, spec, spec), out_shardings=spec)
    with jax.set_mesh(trainer.mesh):
        return fn.lower(abstract(params, shardings), jax.ShapeDtypeStruct(shape, jnp.float32),
                        jax.ShapeDtypeStruct(shape[:1], jnp.int32))


def analyse(lowered, capacity_gib: float, buffers: int = 0) -> dict[str, Any]:
    """Compile one lowered program; its memory, cost and collectives, or the out-of-memory report. With
    `buffers`, also its largest HBM allocations (XLA's memory-usage report, dumped to a temporary dir)."""
    start = time.process_time()
    with tempfile.TemporaryDirectory() if buffers else contextlib.nullcontext() as dump:
        try:
            compiled = lowered.compile(compiler_options={'xla_dump_to': dump} if buffers else None)
        except Exception as error:  # pylint: disable=broad-except  (jax raises JaxRuntimeError; inspect its text)
            if 'RESOURCE_EXHAUSTED' not in str(error):
                raise
            return {**out_of_memory(error, capacity_gib), 'compile_cpu_s': round(time.process_time() - start, 1)}
        reports = sorted(pathlib.Path(dump).glob('*after_optimizations-memory-usage-report.txt')) if buffers else []
        largest = largest_allocations(reports[-1].read_text(), buffers) if reports else []
    mem, text = memory(compiled), compiled.as_text()  # compiled = the compiler's HBM check passed
    return {'fits': True, 'memory': mem, 'cost': cost(compiled), 'collectives': collectives(text),
            'input_element_bytes': sum(p['bytes'] for p in entry_parameters(text)),
            'compile_cpu_s': round(time.process_time() - start, 1), **({'largest': largest} if buffers else {})}


# ---------------------------------------------------------------------------------------------------------
# The report


def train_flops_analytic(cfg: model_lib.JiTConfig, global_batch: int) -> float:
    """Forward + backward = 3 x forward, 2 flops per MAC (the paper's Gflops are forward MACs)."""
    return 3 * 2 * model_lib.forward_macs(cfg) * global_batch


def speed(result: dict, chip: Chip, num_chips: int, images: int, flops_analytic: float) -> dict[str, float] | None:
    """Implied step time, images/s per chip and MFU from XLA's optimal_seconds (None when unusable)."""
    seconds = result.get('cost', {}).get('optimal_seconds', -1.0)
    if seconds <= 0:
        return None
    return {'step_ms': seconds * 1e3, 'images_per_s_per_chip': images / seconds / num_chips,
            'mfu_bound': flops_analytic / num_chips / seconds / (chip.peak_bf16_tflops * 1e12)}


def make_trainer(config, topology: Topology):
    """The run's Trainer over the topology's devices (mesh by the run's own rule: config_lib.resolve_mesh)."""
    from jit_jax import train  # pylint: disable=import-outside-toplevel  (train imports the data pipeline)

    mesh = sharding.make_mesh(config.mesh, devices=topology.devices())
    return train.Trainer(config, mesh=mesh)


def sampler_batch(config, data_parallel: int, requested: int | None) -> int:
    """The sample grid's size rounded up to whole rows per device (how sample_grid shards its labels)."""
    wanted = requested or max(config.sampler.num_images, 1)
    return -(-wanted // data_parallel) * data_parallel


def report(config, topology: Topology, *, programs=('train', 'sampler'), sample_batch: int | None = None,
           progress=None, buffers: int = 0) -> dict[str, Any]:
    """Compile the run's programs for the topology; everything the command prints, as a dict."""
    say = progress or (lambda message: None)
    chip, devices = topology.chip, topology.chips_per_slice * topology.num_slices
    trainer = make_trainer(config, topology)
    cfg = trainer.model_config
    batch = config.data.global_batch_size
    out = {'topology': topology.name, 'grid': topology.grid, 'num_slices': topology.num_slices, 'chips': devices,
           'chip': dataclasses.asdict(chip), 'mesh': dict(trainer.mesh.shape),
           'param_sharding': config.mesh.param_sharding, 'global_batch': batch, 'per_chip_batch': batch / devices,
           'model': {'preset': config.model.preset, 'params': model_lib.param_count(cfg),
                     'dtype': cfg.dtype, 'param_dtype': cfg.param_dtype, 'attention_impl': cfg.attention_impl,
                     'custom_vjp': cfg.custom_vjp, 'remat': cfg.remat, 'remat_late': cfg.remat_late,
                     'scan_blocks': cfg.scan_blocks},
           'programs': {}}
    if 'train' in programs:
        say(f'compiling the train step for {topology.name} (batch {batch}) ...')
        result = analyse(lower_train_step(trainer), chip.hbm_gib, buffers)
        result['flops_analytic_per_chip'] = train_flops_analytic(cfg, batch) / devices
        result['sharded_state_bytes'] = _sharded_bytes(trainer.abstract_state, trainer.state_shardings)
        result['speed'] = speed(result, chip, devices, batch, train_flops_analytic(cfg, batch))
        if not result['fits'] and not result['largest']:  # XLA named no buffers: the model's largest terms
            est = memory_lib.train_memory(cfg, batch, data=trainer.mesh.shape['data'], fsdp=trainer.mesh.shape['fsdp'],
                                          param_sharding=config.mesh.param_sharding,
                                          num_ema=len(config.optim.ema_decays), platform=chip.platform)
            terms = {k: v for k, v in est.as_dict().items() if k in memory_lib.TERMS}
            result['largest'] = [{'gib': round(v / GIB, 3), 'shape': '', 'op': f'memory model: {k}'}
                                 for k, v in sorted(terms.items(), key=lambda kv: -kv[1])]
        out['programs']['train'] = result
    if 'sampler' in programs:
        n = sampler_batch(config, sharding.data_parallel_size(trainer.mesh), sample_batch)
        say(f'compiling the sampler ({trainer.sampler.method}, {trainer.sampler.num_steps} steps, batch {n}) ...')
        result = analyse(lower_sampler(trainer, n), chip.hbm_gib, buffers)
        result['batch'] = n
        out['programs']['sampler'] = result
    return out


def _sharded_bytes(tree, shardings) -> int:
    """Bytes per device of a tree under its shardings (the per-device argument size the step must show)."""
    total = 0
    for leaf, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shard = spec.shard_shape(tuple(leaf.shape))
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


def _gib(x: float) -> str:
    return f'{x / GIB:7.2f} GiB'


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"{rep['model']['preset']} on {rep['topology']} ({rep['chips']} chips, {rep['chip']['hbm_gib']} GiB HBM "
             f"each), mesh {rep['mesh']}, params {rep['param_sharding']}, global batch {rep['global_batch']} "
             f"({rep['per_chip_batch']:g} per chip)",
             '  model: ' + ', '.join(f'{k}={v}' for k, v in rep['model'].items() if k != 'preset')]
    for name, r in rep['programs'].items():
        if not r.get('memory'):
            needs = f"{r['needs_gib']:.2f}" if r['needs_gib'] is not None else '?'
            what = '' if r.get('needs_what', 'total') == 'total' else f" for {r['needs_what']}"
            lines.append(f"  {name}: does not fit: needs {needs} GiB{what} of {r['capacity_gib']:.2f} GiB per chip")
            lines += [f"      {b['gib']:8.3f} GiB  {b['shape']}  {b['op']}" for b in r['largest']]
            continue
        m, c = r['memory'], r['cost']
        lines.append(f"  {name}: per-chip HBM {_gib(m['peak'])} of {r.get('capacity', rep['chip']['hbm_gib'])} GiB"
                     f" (fits): arguments {_gib(m['argument'])}, outputs "
                     f"{_gib(m['output'])}, aliased {_gib(m['alias'])}, temporaries {_gib(m['temp'])}")
        flops = f"    flops/chip {c['flops'] / 1e12:.3f} T (XLA)"
        if 'flops_analytic_per_chip' in r:
            flops += f" vs {r['flops_analytic_per_chip'] / 1e12:.3f} T (3 x forward_macs x 2)"
        lines.append(flops + f", bytes accessed {c['bytes_accessed'] / GIB:.2f} GiB, "
                             f"optimal_seconds {c['optimal_seconds']:.4g}")
        if 'sharded_state_bytes' in r:
            lines.append(f"    sharded state {_gib(r['sharded_state_bytes'])} per chip; the program's inputs hold "
                         f"{_gib(r['input_element_bytes'])} of elements (arguments above include tile padding)")
        kinds = ', '.join(f"{k} x{v['count']} ({v['bytes'] / 2 ** 20:.1f} MiB)" for k, v in r['collectives'].items())
        lines.append(f"    collectives: {kinds or 'none'}")
        if r.get('largest'):
            lines.append('    largest HBM allocations (values sharing one over time; offset in the heap):')
            lines += [f"      {b['bytes'] / 2 ** 20:9.2f} MiB at {_gib(b['offset_bytes'])}  {b['shapes']}" for b in r['largest']]
        if r.get('speed'):
            s = r['speed']
            lines.append(f"    implied (XLA cost model): {s['step_ms']:.1f} ms/step, "
                         f"{s['images_per_s_per_chip']:.0f} images/s/chip, MFU bound {s['mfu_bound']:.1%}")
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m jit_jax.aot', description=__doc__.split('\n')[0])
    parser.add_argument('--config', required=True, help="config spec, 'configs/x.py[:k=v,...]'")
    parser.add_argument('--topology', required=True, help="'v5p-128', 'v4-64', 'v5e-4', 'v5p:4x4x4', ...")
    parser.add_argument('--num-slices', type=int, default=1)
    parser.add_argument('--programs', default='train,sampler', help='comma list of: train, sampler')
    parser.add_argument('--sample-batch', type=int, default=None, help='sampler batch (default: the grid size)')
    parser.add_argument('--out', default=None, help='write the report as JSON here')
    parser.add_argument('--buffers', type=int, default=0,
                        help="list each program's N largest HBM allocations (XLA's memory-usage report)")
    args, overrides = parser.parse_known_args(argv)
    config = config_lib.read(args.config)
    for flag in overrides:  # --config.x=y field flags, as jit_jax.main takes them
        if not flag.startswith('--config.') or '=' not in flag:
            parser.error(f'unexpected argument {flag!r}: expected --config.<field>=<value>')
        config_lib.apply_overrides(config, flag.removeprefix('--config.'))
    config = config_lib.finalize(config)
    programs = tuple(p for p in args.programs.split(',') if p)
    if not set(programs) <= {'train', 'sampler'} or not programs:
        parser.error(f'--programs {args.programs!r}: expected a comma list of train, sampler')
    topology = parse_topology(args.topology, args.num_slices)
    rep = report(config, topology, programs=programs, sample_batch=args.sample_batch, buffers=args.buffers,
                 progress=lambda m: print(m, file=sys.stderr, flush=True))
    rep['config'] = args.config
    print(format_report(rep))
    if args.out:
        with open(args.out, 'w', encoding='utf-8') as f:
            json.dump(rep, f, indent=1)
    return 0 if all(r.get('memory') for r in rep['programs'].values()) else 2


if __name__ == '__main__':
    sys.exit(main())
