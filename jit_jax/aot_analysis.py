"""What XLA says about a program it compiled: memory, cost, collectives, inputs, or why it does not fit.

jit_jax.aot compiles a run's programs for a slice it does not have; these functions read the result.
`memory()` and `cost()` normalise `memory_analysis()` / `cost_analysis()` (the latter differs between
XLA:TPU and a deviceless XLA:GPU compile); `collectives()` and `entry_parameters()` parse the optimised
HLO text, where XLA:TPU's async pairs, fused reduce-scatters and collective matmuls each need their own
reading; `out_of_memory()` turns the compiler's RESOURCE_EXHAUSTED message into numbers, and
`largest_allocations()` reads the HBM allocations of XLA's memory-usage report (the dump a compile with
`compiler_options={'xla_dump_to': DIR}` writes), for a program that fits. Plain text and numbers in, dicts
out: nothing here imports JAX.
"""

from __future__ import annotations

import math
import re
from typing import Any

GIB = 2 ** 30
COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')

_SHAPE = re.compile(r'\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|f8e4m3fn|f8e5m2)\[([\d,]*)\]')
_BITS = {'pred': 8, 's8': 8, 'u8': 8, 's16': 16, 'u16': 16, 'f16': 16, 'bf16': 16, 's32': 32, 'u32': 32,
         'f32': 32, 's64': 64, 'u64': 64, 'f64': 64, 'f8e4m3fn': 8, 'f8e5m2': 8}
_OP = re.compile(r'=\s*(\(?.*?\)?)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(')
_FUSED_RS = re.compile(r'=\s*(\(?.*?\)?)\s+fusion\(.*calls=%all-reduce-scatter')


def _shape_bytes(text: str) -> list[int]:
    return [math.prod(int(d) for d in dims.split(',') if d) * _BITS[dtype] // 8
            for dtype, dims in _SHAPE.findall(text)]


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {count, bytes}} over the optimised HLO; bytes = result size per device.

    Counts are static: an op inside a loop body (scan over blocks, gradient accumulation, the sampler's
    ODE steps) counts once. Async pairs count at their -start, whose result tuple holds (operand, result)
    for gathers and permutes; the result half is taken. XLA:TPU emits a reduce-scatter as a fusion calling
    an `all-reduce-scatter` computation (an all-reduce inside): it counts as one reduce-scatter. A
    collective matmul (windowed einsum: a loop of matmul steps and collective-permutes that gathers an
    operand or reduce-scatters the result as it goes) counts its permutes under 'all-gather (collective
    matmul)' / 'reduce-scatter (collective matmul)'.
    """
    out: dict[str, dict[str, int]] = {}
    inside_fused_collective = False

    def add(kind, sizes):
        entry = out.setdefault(kind, {'count': 0, 'bytes': 0})
        entry['count'] += 1
        entry['bytes'] += sum(sizes)

    windowed = None  # inside a collective matmul's loop body: its permutes are that gather / reduce-scatter
    for line in hlo_text.splitlines():
        if line.endswith('{') and not line.startswith(' '):  # a computation's header
            name = line.lstrip('%').split(' ')[0]
            inside_fused_collective = name.startswith('all-reduce-scatter')
            found = re.search(r'windowed_dot_general_body_(rs|ag)', name)
            windowed = None if not found else {'rs': 'reduce-scatter', 'ag': 'all-gather'}[found[1]]
            continue
        if inside_fused_collective:
            continue
        fused = _FUSED_RS.search(line)
        if fused:
            add('reduce-scatter', _shape_bytes(fused[1]))
            continue
        found = _OP.search(line)
        if not found:
            continue
        sizes = [size for size in _shape_bytes(found[1]) if size > 4]  # drop async-context scalars
        if found[3] and found[2] in ('all-gather', 'collective-permute', 'all-to-all') and len(sizes) >= 2:
            sizes = sizes[len(sizes) // 2:]
        add(f'{windowed} (collective matmul)' if windowed and found[2] == 'collective-permute' else found[2], sizes)
    return out


_PARAM = re.compile(r'^\s*%\S+ = (\(.*\)|[a-z0-9]+\[[\d,]*\])\S* parameter\((\d+)\)')


def entry_parameters(hlo_text: str) -> list[dict[str, Any]]:
    """The program's per-device inputs in order: dtype, per-device shape and bytes of their elements.

    memory_analysis()'s argument size can exceed the sum of `bytes`: XLA:TPU tiles minor dimensions
    (layouts like T(8,128)) and pads each buffer to whole tiles. A program with thousands of inputs (H/32's
    train state) takes them as one tuple parameter; its elements are listed in order.
    """
    entry, params = False, {}
    for line in hlo_text.splitlines():
        if line.startswith('ENTRY'):
            entry = True
        elif entry and line.startswith('}'):
            break
        elif entry and (found := _PARAM.match(line)):
            leaves = _SHAPE.findall(found[1]) if found[1].startswith('(') else [found[1][:-1].split('[')]
            for k, (dtype, dims) in enumerate(leaves):
                shape = tuple(int(d) for d in dims.split(',') if d)
                params[(int(found[2]), k)] = {'dtype': dtype, 'shape': shape,
                                              'bytes': math.prod(shape) * _BITS[dtype] // 8}
    return [params[i] for i in sorted(params)]


def memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {'argument': m.argument_size_in_bytes, 'output': m.output_size_in_bytes,
           'alias': m.alias_size_in_bytes, 'temp': m.temp_size_in_bytes}
    out['peak'] = out['argument'] + out['output'] - out['alias'] + out['temp']
    return out


def cost(compiled) -> dict[str, float]:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    analysis = analysis or {}  # XLA:GPU's deviceless compile gives no cost analysis
    return {'flops': float(analysis.get('flops', 0.0)), 'bytes_accessed': float(analysis.get('bytes accessed', 0.0)),
            'optimal_seconds': float(analysis.get('optimal_seconds', -1.0))}


_OOM_TOTAL = re.compile(r'[Uu]sed\s+([\d.]+)([GMK])\s+of\s+([\d.]+)([GMK])\s+hbm'
                        r'|required for ([^(]+?)\s*\(([\d.]+)([GMK])\) exceeds available HBM \(([\d.]+)([GMK])\)')
_OOM_BUFFER = re.compile(r'Size:\s*([\d.]+)([GMK])\b(.*?)(?=\n\s*\d+\.\s*Size:|\Z)', re.S)
_UNIT = {'G': GIB, 'M': 2 ** 20, 'K': 2 ** 10}


def out_of_memory(error: Exception, capacity_gib: float) -> dict[str, Any]:
    """RESOURCE_EXHAUSTED at compile -> {needs_gib, capacity_gib, largest: [(GiB, what)]}, from XLA's message."""
    text = str(error)
    found = _OOM_TOTAL.search(text)
    needs, capacity, what = None, capacity_gib, 'total'
    if found and found[1]:
        needs, capacity = float(found[1]) * _UNIT[found[2]] / GIB, float(found[3]) * _UNIT[found[4]] / GIB
    elif found:  # 'the total memory required for HLO temporaries (X) exceeds available HBM (Y)'
        what = found[5].replace('the total memory', '').strip()
        needs, capacity = float(found[6]) * _UNIT[found[7]] / GIB, float(found[8]) * _UNIT[found[9]] / GIB
    largest = []
    for size, unit, what in _OOM_BUFFER.findall(text)[:8]:
        shape = re.search(r'Shape:\s*(\S+)', what)
        op = re.search(r'Operator:\s*(.*)', what)
        largest.append({'gib': round(float(size) * _UNIT[unit] / GIB, 3),
                        'shape': shape[1] if shape else '', 'op': (op[1].strip()[:160] if op else '')})
    return {'fits': False, 'needs_gib': needs, 'needs_what': what, 'capacity_gib': capacity, 'largest': largest,
            'message': text.strip().splitlines()[0][:300] if text.strip() else ''}


# One allocation of XLA's memory-usage report: "cumulative; size; offset; used_by_n_values; shapes".
_ALLOCATION = re.compile(r'^\s*[\d.]+\s*[KMG]?i?B\(\s*\d+%\);\s*([\d.]+)\s*([KMG]?)i?B;\s*(\d+);\s*(\d+);\s*(.*)$')


def largest_allocations(report_text: str, top: int = 10) -> list[dict[str, Any]]:
    """The `top` biggest allocations of the default (HBM) memory space, largest first.

    Each is {'bytes', 'offset_bytes', 'values', 'shapes'}: the values listed share the allocation at different
    times, so an allocation's shapes say what occupies that stretch of HBM over the program; the offset is
    its place inside the one block XLA packs a large program's temporaries into (0 for a separate
    allocation), and the block's end is its peak: allocations placed there are the first suspects for it. This is how a program that
    fits shows where its memory goes, e.g. tile-padded image tensors the memory model does not count.
    """
    found = []
    for line in report_text.split('Memory Space:')[1].splitlines() if 'Memory Space:' in report_text else ():
        match = _ALLOCATION.match(line)
        if match:
            size, unit, offset, values, shapes = match.groups()
            found.append({'bytes': round(float(size) * _UNIT.get(unit, 1)), 'offset_bytes': int(offset),
                          'values': int(values), 'shapes': shapes.strip()[:200]})
    return sorted(found, key=lambda a: -a['bytes'])[:top]
