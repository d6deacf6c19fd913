"""How python -m jit_jax.bench measures, and the table it prints.

Timed runs block on every result, so a step is the device's time and not the dispatch's. Utilisation
is a ratio to `matmul_peak`, a dense jnp.dot measured in the same process on the same device in the
compute dtype (on a shared CPU the attainable peak moves with the clock and the neighbours). XLA's cost
analysis is kept beside the analytic FLOPs, and memory is read three ways because no backend reports
all of them: the compiled program's sizes, the device allocator's peak (GPU / TPU only) and the host's
maximum resident set size (what counts on CPU).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jit_jax import aot_analysis


def log(msg: str) -> None:
    print(f'[bench {time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


def timed_runs(run: Callable[[], Any], warmup: int, steps: int, label: str) -> list[float]:
    """Wall time of each of `steps` runs after `warmup` untimed ones; every run waits for its results."""
    for i in range(warmup):
        jax.block_until_ready(run())
        log(f'{label}: warm-up {i + 1}/{warmup} done')
    times = []
    for i in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
        log(f'{label}: timed run {i + 1}/{steps}: {times[-1] * 1e3:.1f} ms')
    return times


def matmul_peak(dtype: str, size: int, repeats: int = 5, device: jax.Device | None = None) -> dict:
    """FLOP/s of a dense size^3 jnp.dot in `dtype` on `device`: the same-process reference for utilisation.

    Median of `repeats` after one warm-up; big enough (>= 2048 on a CPU) that the library's blocking
    reaches its steady state, and the same dtype as the model's matmuls so that bf16 is compared to bf16.
    """
    device = device or jax.devices()[0]
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(key_a, (size, size), jnp.float32).astype(dtype), device)
    b = jax.device_put(jax.random.normal(key_b, (size, size), jnp.float32).astype(dtype), device)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        times.append(time.perf_counter() - start)
    flops = 2.0 * size ** 3
    return {'dtype': dtype, 'size': size, 'repeats': repeats, 'median_s': float(np.median(times)),
            'flops_per_s': flops / float(np.median(times)), 'best_flops_per_s': flops / min(times)}


def program_memory(compiled: Any, device: jax.Device) -> dict:
    """Compiled-program sizes (aot_analysis.memory), the backend's peak (if it keeps one) and the host's max RSS."""
    out: dict[str, Any] = {f'{k}_bytes': v for k, v in aot_analysis.memory(compiled).items()}
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except
        pass
    out['device_peak_bytes_in_use'] = int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats \
        else None
    out['host_max_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return out


def step_stats(times: list[float]) -> dict:
    return {'median_s': float(np.median(times)), 'min_s': float(min(times)), 'max_s': float(max(times)),
            'runs_s': [float(t) for t in times]}


def format_table(r: dict) -> str:
    """Human-readable summary of one result (the dict jit_jax.bench.run_bench returns)."""
    def g(x):
        return f'{x / 1e9:.2f} G' if x is not None and not math.isnan(x) else 'n/a'

    def mib(x):
        return f'{x / 2 ** 20:.1f} MiB' if x is not None else 'n/a'

    mem = r['memory']
    rows = [
        ('mode', r['mode']), ('model', f"{r['model']} ({r['params'] / 1e6:.1f}M params)"),
        ('image size / batch', f"{r['image_size']} px / {r['batch_size']}"),
        ('dtype / scan / remat / attention', f"{r['dtype']} / {r['scan_blocks']} / {r['remat']} / "
                                             f"{r['attention_impl']}"),
        ('device', f"{r['num_devices']} x {r['device_kind']} ({r['backend']})"),
        ('compile', f"{r['compile_s']:.2f} s"),
        ('step (median [min, max])', f"{r['step']['median_s'] * 1e3:.1f} ms "
                                     f"[{r['step']['min_s'] * 1e3:.1f}, {r['step']['max_s'] * 1e3:.1f}] "
                                     f"over {len(r['step']['runs_s'])} runs"),
        ('images/s', f"{r['images_per_s']:.4g}"), ('tokens/s', f"{r['tokens_per_s']:.4g}"),
        ('FLOPs/step analytic | XLA', f"{g(r['flops_per_step'])} | {g(r['xla_cost'].get('flops'))}"),
        ('achieved FLOP/s per device', g(r['achieved_flops_per_s_per_device']) + 'FLOP/s'),
        (f"matmul peak ({r['peak_matmul']['dtype']} {r['peak_matmul']['size']}^3)",
         g(r['peak_matmul']['flops_per_s']) + 'FLOP/s'),
        ('utilisation', f"{100 * r['utilisation']:.1f} %"),
        ('program memory (args+out-alias+temp)', mib(mem.get('peak_bytes'))),
        ('  temp', mib(mem.get('temp_bytes'))),
        ('device peak_bytes_in_use', mib(mem.get('device_peak_bytes_in_use'))),
        ('host max RSS', mib(mem.get('host_max_rss_bytes'))),
        ('load (1 min) start / end', f"{r['load_avg_1min']['start']:.2f} / {r['load_avg_1min']['end']:.2f}"),
    ]
    if 'sampler' in r:
        s = r['sampler']
        rows += [('sampler', f"{s['method']} {s['num_steps']} steps, cfg {s['cfg_scale']} on "
                             f"[{s['interval_min']}, {s['interval_max']}], skip_uncond {s['skip_uncond']}"),
                 ('forwards per image (ours / official)',
                  f"{s['forwards_per_image']:.0f} / {s['official_forwards_per_image']:.0f}"),
                 ('official-equivalent utilisation', f"{100 * s['official_equivalent_utilisation']:.1f} %")]
    width = max(len(k) for k, _ in rows)
    return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)

