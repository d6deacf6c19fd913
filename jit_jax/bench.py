"""python -m jit_jax.bench {train,forward,sample,eval}: how close one device comes to its own matmul peak.

    python -m jit_jax.bench train --model JiT-B/16 --image-size 256 --batch-size 4 --steps 5 --json /tmp/t.json
    python -m jit_jax.bench forward --config configs/default.py --dtype bfloat16
    python -m jit_jax.bench sample --model JiT-B/16 --batch-size 1 --num-sampling-steps 50
    python -m jit_jax.bench train --smoke          # tiny model, 3 steps: checks the plumbing in seconds
    python -m jit_jax.bench eval --model JiT-B/16 --batch-size 8 --eval-chunks 2 --inception inception.npz

Each run reports compile time, the median / min / max step time over `--steps` timed runs after
`--warmup` untimed ones, images/s, tokens/s, model FLOPs per step (analytic from `model.forward_macs`,
with XLA's cost analysis of the compiled program beside it), achieved FLOP/s and utilisation. The
utilisation is a ratio to a dense `jnp.dot` measured in the same process on the same device in the
compute dtype, not to a datasheet number: on a shared 2-core CPU the attainable peak moves with the
clock and the neighbours, and a ratio taken minutes apart would mix two machines.

What each mode times (always through the code a run uses, never a re-implementation):

* train: `train.Trainer`'s jitted step (forward + backward + AdamW + both EMAs, donated state).
  Analytic FLOPs = 3 x forward (the backward is two matmuls per forward matmul).
* forward: a jitted `model(x, t, y)` call.
* sample: `sampling.sample` (Heun 50 steps, CFG 3.0 on [0.1, 1] by default). Analytic FLOPs count the
  network forwards actually run: 2B rows where guidance is on, B rows where the unconditional pass is
  skipped. The official sampler always runs 2B rows, 198 image-forwards per image at Heun 50.

* eval: the evaluation loop (`jit_jax.evaluate`: sampling, Inception, PNG and chunk writing) against
  sampling alone and a pure-forward upper bound, plus the Inception's images/s (jit_jax.fid.speed).

Memory: XLA's `memory_analysis()` of the compiled program (arguments, outputs, temporaries), the
device's `peak_bytes_in_use` where the backend reports it (GPU / TPU; the CPU client reports nothing),
and on CPU the process's maximum resident set size.

The machine load (1-minute average) is recorded before and after: figures taken while other jobs run
are not comparable, and the report says so instead of leaving it to the reader.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import config_dict

from jit_jax import aot_analysis, config_lib, sampling, sharding, train
from jit_jax import model as model_lib
from jit_jax.bench_measure import format_table, log, matmul_peak, program_memory, step_stats, timed_runs

MODES = ('train', 'forward', 'sample', 'eval')
BUSY_LOAD = 1.3  # 1-minute load above which a 2-core machine is not measuring us alone


# ---------------------------------------------------------------------------------------------------------
# Configuration


def _smoke_config() -> config_dict.ConfigDict:
    """A tiny model (32 px, 16 tokens, width 64, 2 blocks, 2 class tokens, Heun 4 steps): seconds to run."""
    config = config_lib.base()
    m = config.model
    m.preset = ''
    m.patch_size, m.hidden_size, m.depth, m.num_heads, m.mlp_ratio = 8, 64, 2, 4, 4.0
    m.bottleneck_dim, m.in_context_len, m.in_context_start = 16, 2, 1
    m.attn_drop, m.proj_drop = 0.0, 0.0
    m.dtype = 'float32'
    config.data.image_size = 32
    config.data.num_classes = 10
    config.data.global_batch_size = 2
    config.sampler.num_steps = 4  # Heun: 7 guided evaluations
    return config


def build_config(args: argparse.Namespace) -> config_dict.ConfigDict:
    """The ConfigDict the bench runs: --smoke, --config FILE or --model PRESET, then the flag overrides.

    Built like jit_jax.main builds a run's config (config_lib.read, overrides, config_lib.finalize).
    """
    if args.smoke:
        config = _smoke_config()
    elif args.config:
        config = config_lib.read(args.config)
    else:
        config = config_lib.base()
        config.model.preset = args.model
        config.model.dtype = 'float32'  # the CPU comparison point; --dtype bfloat16 for the paper's setting
        config.data.image_size = model_lib.preset(args.model).input_size
    if args.image_size is not None:
        config.data.image_size = args.image_size
    if args.batch_size is not None:
        config.data.global_batch_size = args.batch_size
    if args.dtype is not None:
        config.model.dtype = args.dtype
    if args.scan is not None:
        config.model.scan_blocks = args.scan
    if args.remat is not None:
        config.model.remat = args.remat
    if args.attention_impl is not None:
        config.model.attention_impl = '' if args.attention_impl == 'none' else args.attention_impl
    if args.custom_vjp is not None:
        config.model.custom_vjp = args.custom_vjp
    for override in args.override or []:
        config_lib.apply_overrides(config, override)
    config.optim.grad_accum_steps = args.grad_accum if args.grad_accum else config.optim.grad_accum_steps
    config.mesh.data, config.mesh.fsdp = args.num_devices, 1
    config.mesh.param_sharding = 'replicate'
    return config_lib.finalize(config)


# ---------------------------------------------------------------------------------------------------------
# The three benchmarks. Each returns (model config, compiled program, compile seconds, a zero-argument
# run callable, per-step facts).


def _random_inputs(cfg: model_lib.JiTConfig, batch: int, seed: int = 0):
    k_x, k_t, k_y = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k_x, (batch, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32)
    t = jax.random.uniform(k_t, (batch,), jnp.float32)
    y = jax.random.randint(k_y, (batch,), 0, cfg.num_classes + 1, jnp.int32)
    return x, t, y


def _model_state(cfg: model_lib.JiTConfig, seed: int = 0):
    """A model with every parameter drawn at random (the official init zeroes adaLN and the output layer,
    which would make the sampler's trajectories trivially equal)."""
    graphdef, state = nnx.split(model_lib.JiT(cfg, rngs=nnx.Rngs(params=seed)))
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [a + 0.02 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
    return graphdef, jax.tree.unflatten(treedef, leaves)


def setup_train(config: config_dict.ConfigDict, mesh: jax.sharding.Mesh):
    trainer = train.Trainer(config, mesh=mesh)
    cfg = trainer.model_config
    batch_size = config.data.global_batch_size
    x, _, y = _random_inputs(cfg, batch_size)
    batch = sharding.global_batch({'image': np.asarray(jnp.clip(x, -1, 1)),
                                   'label': np.asarray(y % cfg.num_classes)}, mesh)
    with jax.set_mesh(mesh):
        state = trainer.init()
        start = time.perf_counter()
        compiled = trainer.step_fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
    holder = {'state': state}

    def run():
        # The state is donated: each step consumes the previous one, exactly as the train loop does.
        with jax.set_mesh(mesh):
            holder['state'], metrics = compiled(holder['state'], batch)
        return metrics

    facts = {'images_per_step': batch_size, 'image_forwards_per_step': batch_size,
             'flops_per_step': 3 * 2 * model_lib.forward_macs(cfg) * batch_size,
             'flops_note': '3 x forward (forward + 2 x backward matmuls) per image'}
    return cfg, compiled, compile_s, run, facts


def setup_forward(config: config_dict.ConfigDict, mesh: jax.sharding.Mesh):
    cfg = config_lib.model_config(config, platform=mesh.devices.flat[0].platform)
    batch_size = config.data.global_batch_size
    device = mesh.devices.flat[0]
    graphdef, state = _model_state(cfg)
    state = jax.device_put(state, device)
    x, t, y = jax.device_put(_random_inputs(cfg, batch_size), device)
    forward = jax.jit(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y))
    start = time.perf_counter()
    compiled = forward.lower(state, x, t, y).compile()
    compile_s = time.perf_counter() - start
    facts = {'images_per_step': batch_size, 'image_forwards_per_step': batch_size,
             'flops_per_step': 2 * model_lib.forward_macs(cfg) * batch_size, 'flops_note': '1 forward per image'}
    return cfg, compiled, compile_s, lambda: compiled(state, x, t, y), facts


def forwards_run(spec: sampling.SamplerSpec, batch: int, skip_uncond: bool) -> tuple[int, int, int]:
    """(evaluations, image-forwards run by our sampler, image-forwards of the official sampler)."""
    plan = sampling.schedule(spec)
    run = 0
    for t in plan.t:
        guided = spec.cfg_scale != 1.0 and float(sampling.guidance_weight(t, spec)) != 1.0
        run += 2 * batch if (guided or not skip_uncond) else batch
    return len(plan.t), run, 2 * len(plan.t) * batch


def setup_sample(config: config_dict.ConfigDict, mesh: jax.sharding.Mesh, args: argparse.Namespace):
    cfg = config_lib.model_config(config, platform=mesh.devices.flat[0].platform)
    batch_size = config.data.global_batch_size
    device = mesh.devices.flat[0]
    graphdef, state = _model_state(cfg)
    state = jax.device_put(state, device)
    s = config.sampler
    spec = dataclasses.replace(
        sampling.SamplerSpec.from_config(s, config.diffusion), method=args.method or s.method,
        num_steps=args.num_sampling_steps or s.num_steps, cfg_scale=s.cfg_scale if args.cfg is None else args.cfg,
        interval_min=s.interval_min if args.interval_min is None else args.interval_min,
        interval_max=s.interval_max if args.interval_max is None else args.interval_max)
    skip = not args.no_skip_uncond
    noise = jax.device_put(jax.random.normal(jax.random.key(0), (batch_size, cfg.input_size, cfg.input_size,
                                                                  cfg.in_channels)), device)
    labels = jax.device_put(jnp.arange(batch_size, dtype=jnp.int32) % cfg.num_classes, device)

    def generate(s_, noise_, labels_):
        return sampling.sample_with_spec(nnx.merge(graphdef, s_), noise_, labels_, spec, skip_uncond=skip)

    start = time.perf_counter()
    compiled = jax.jit(generate).lower(state, noise, labels).compile()
    compile_s = time.perf_counter() - start
    evaluations, run_fwd, official_fwd = forwards_run(spec, batch_size, skip)
    facts = {'images_per_step': batch_size, 'image_forwards_per_step': run_fwd,
             'flops_per_step': 2 * model_lib.forward_macs(cfg) * run_fwd,
             'flops_note': 'network forwards actually run (2B rows where CFG is on, B where uncond is skipped)',
             'sampler': {**dataclasses.asdict(spec), 'skip_uncond': skip, 'evaluations': evaluations,
                         'image_forwards': run_fwd, 'official_image_forwards': official_fwd,
                         'forwards_per_image': run_fwd / batch_size,
                         'official_forwards_per_image': official_fwd / batch_size,
                         'official_flops_per_step': 2 * model_lib.forward_macs(cfg) * official_fwd}}
    return cfg, compiled, compile_s, lambda: compiled(state, noise, labels), facts


# ---------------------------------------------------------------------------------------------------------
# Driver


def run_bench(args: argparse.Namespace) -> dict:
    load_start = os.getloadavg()[0]
    if load_start > BUSY_LOAD:
        log(f'WARNING: 1-minute load is {load_start:.2f} (> {BUSY_LOAD}): other jobs share the CPU; '
             'timings will be pessimistic')
    config = build_config(args)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:args.num_devices])
    device = mesh.devices.flat[0]
    log(f'{args.mode}: {args.config or ("smoke" if args.smoke else args.model)}, batch '
         f'{config.data.global_batch_size}, {config.data.image_size} px, dtype {config.model.dtype}, '
         f'scan {config.model.scan_blocks}, remat {config.model.remat}, devices {mesh.devices.size} '
         f'({device.platform})')

    peak_size = args.peak_size or (512 if args.smoke else 2048)
    log(f'measuring the {config.model.dtype} matmul peak ({peak_size}^3)')
    peak = matmul_peak(config.model.dtype, peak_size, device=device)
    log(f'peak {peak["flops_per_s"] / 1e9:.1f} GFLOP/s')

    log('compiling')
    if args.mode == 'train':
        cfg, compiled, compile_s, run, facts = setup_train(config, mesh)
    elif args.mode == 'forward':
        cfg, compiled, compile_s, run, facts = setup_forward(config, mesh)
    else:
        cfg, compiled, compile_s, run, facts = setup_sample(config, mesh, args)
    log(f'compiled in {compile_s:.1f} s')

    warmup = args.warmup if args.warmup is not None else (0 if args.mode == 'sample' else 1)
    steps = args.steps or (3 if args.smoke else (1 if args.mode == 'sample' else 5))
    times = timed_runs(run, warmup, steps, args.mode)
    step = step_stats(times)
    per_step = step['median_s']
    peak_after = matmul_peak(config.model.dtype, peak_size, device=device) if args.peak_after else None

    num_devices = mesh.devices.size
    achieved = facts['flops_per_step'] / per_step / num_devices
    images_per_s = facts['images_per_step'] / per_step
    result = {
        'mode': args.mode,
        'model': args.config or ('smoke' if args.smoke else args.model),
        'model_config': dataclasses.asdict(cfg),
        'image_size': cfg.input_size, 'batch_size': config.data.global_batch_size,
        'dtype': cfg.dtype, 'scan_blocks': cfg.scan_blocks, 'remat': cfg.remat,
        'attention_impl': cfg.attention_impl,
        'params': model_lib.param_count(cfg), 'forward_macs_per_image': model_lib.forward_macs(cfg),
        'backend': device.platform, 'device_kind': device.device_kind, 'num_devices': num_devices,
        'compile_s': compile_s, 'step': step, 'warmup_runs': warmup,
        'images_per_s': images_per_s,
        'tokens_per_s': facts['image_forwards_per_step'] * cfg.num_patches / per_step,
        'flops_per_step': facts['flops_per_step'], 'flops_note': facts['flops_note'],
        'xla_cost': aot_analysis.cost(compiled),
        'achieved_flops_per_s_per_device': achieved,
        'peak_matmul': peak, 'peak_matmul_after': peak_after,
        'utilisation': achieved / peak['flops_per_s'],
        'memory': program_memory(compiled, device),
        'load_avg_1min': {'start': load_start, 'end': os.getloadavg()[0]},
        'jax_version': jax.__version__,
    }
    if 'sampler' in facts:
        sampler = facts['sampler']
        # What the official sampler's speed would be at our forward utilisation: a like-for-like yardstick.
        sampler['official_equivalent_utilisation'] = (sampler['official_flops_per_step'] / per_step
                                                      / num_devices / peak['flops_per_s'])
        result['sampler'] = sampler
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m jit_jax.bench', description=__doc__.split('\n')[0])
    parser.add_argument('mode', choices=MODES)
    parser.add_argument('--model', default='JiT-B/16', help='preset name (ignored with --config / --smoke)')
    parser.add_argument('--config', default=None, help='configs/x.py[:overrides] to bench instead of a preset')
    parser.add_argument('--smoke', action='store_true', help='tiny model, 3 steps, small peak matmul')
    parser.add_argument('--image-size', type=int, default=None)
    parser.add_argument('--batch-size', type=int, default=None, help='global batch (default 4 for presets)')
    parser.add_argument('--steps', type=int, default=None, help='timed runs (default 5; sample 1; smoke 3)')
    parser.add_argument('--warmup', type=int, default=None, help='untimed runs after compile (default 1; sample 0)')
    parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default=None)
    parser.add_argument('--scan', action=argparse.BooleanOptionalAction, default=None, help='scan over blocks')
    parser.add_argument('--remat', choices=('none', 'block', 'dots'), default=None)
    parser.add_argument('--attention-impl', choices=('none', 'xla', 'cudnn'), default=None)
    parser.add_argument('--custom-vjp', choices=config_lib.CUSTOM_VJP, default=None,
                        help="the model's hand-written backward passes (config.model.custom_vjp)")
    parser.add_argument('--override', action='append', metavar='KEY=VALUE,...',
                        help='config_lib.apply_overrides string, e.g. depth=4,ctx_start=1 (after the flags above)')
    parser.add_argument('--grad-accum', type=int, default=None)
    parser.add_argument('--num-devices', type=int, default=1, help='devices of the mesh (per-device figures)')
    parser.add_argument('--peak-size', type=int, default=None, help='matmul size for the peak (default 2048)')
    parser.add_argument('--peak-after', action='store_true', help='measure the peak again after the runs')
    parser.add_argument('--method', choices=sampling.METHODS, default=None)
    parser.add_argument('--num-sampling-steps', type=int, default=None)
    parser.add_argument('--cfg', type=float, default=None)
    parser.add_argument('--interval-min', type=float, default=None)
    parser.add_argument('--interval-max', type=float, default=None)
    parser.add_argument('--no-skip-uncond', action='store_true', help='always run both passes (official)')
    parser.add_argument('--inception', default=None, help='eval: weights file (default: random weights)')
    parser.add_argument('--eval-chunks', type=int, default=2, help='eval: timed chunks of --batch-size images')
    parser.add_argument('--json', default=None, help='write the result here')
    args = parser.parse_args(argv)
    if args.batch_size is None and not args.config and not args.smoke:
        args.batch_size = 4
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.mode == 'eval':
        from jit_jax.fid import speed  # pylint: disable=import-outside-toplevel

        config = build_config(args)
        if args.num_sampling_steps or args.cfg is not None:
            with config.unlocked():
                config.sampler.num_steps = args.num_sampling_steps or config.sampler.num_steps
                config.sampler.cfg_scale = config.sampler.cfg_scale if args.cfg is None else args.cfg
        mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:args.num_devices])
        result = speed.run(config, mesh, inception=args.inception, chunks=args.eval_chunks,
                           model_state=_model_state(config_lib.model_config(config)))
        result['load_avg_1min'] = os.getloadavg()[0]
        print(speed.format_table(result), flush=True)
    else:
        result = run_bench(args)
        print(format_table(result), flush=True)
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        log(f'wrote {path}')
    return result


if __name__ == '__main__':
    main()
