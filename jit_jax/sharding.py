"""Device mesh and array layouts: where parameters, optimizer state and batches live.

The mesh has two axes, `data` and `fsdp`; the batch is split over both. Parameters are either replicated
(small models: B/L fit on every device, and replication avoids gathers) or split over `fsdp` (H/G: ZeRO-3
style, each device holds 1/fsdp of every large array and XLA gathers them around each use). The layout is
computed from shapes alone, like big_vision's sharding strategies, so the model code carries no sharding
annotations and a layout change never edits it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jit_jax import config_lib

AXES = ('data', 'fsdp')
BATCH = P(AXES)  # the batch axis splits over every device
# Arrays smaller than this stay replicated under fsdp: gathering them costs more than storing them.
MIN_SHARDED_SIZE = 2 ** 14


def make_mesh(mesh_config: Any, devices=None) -> Mesh:
    """A mesh from config.mesh ({data, fsdp, tensor}; one of data/fsdp may be -1 = the remaining devices).

    Axes are Auto (GSPMD propagation): jax 0.10 defaults to Explicit axes, under which a matmul over a
    sharded contraction dimension needs an explicit out_sharding everywhere in the model.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = config_lib.resolve_mesh(mesh_config, len(devices))  # the one mesh rule (-1 axis, tensor = 1)
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape['data'] * mesh.shape['fsdp']


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Split the rows (second-to-last dimension) over fsdp, else the last one if only it divides; leading scan
    axes stay whole. Rows first: each shard is a contiguous slab whose minor dimension keeps its full width
    (TPU tiles it by 128 lanes, so splitting it into narrow columns pads every shard), and XLA's gradient
    reduce-scatter lands directly in such shards."""
    if fsdp == 1 or math.prod(shape) < MIN_SHARDED_SIZE:
        return P()
    candidates = range(len(shape) - 2, len(shape)) if len(shape) >= 2 else range(len(shape))
    for dim in candidates:
        if shape[dim] % fsdp == 0:
            return P(*([None] * dim), 'fsdp')
    return P()


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather(a: jax.Array, fsdp: int) -> jax.Array:
    return jax.lax.with_sharding_constraint(a, P())


def _gather_fwd(a, fsdp):
    return _gather(a, fsdp), None


def _gather_bwd(fsdp, _, g):
    """The gradient leaves split like its parameter, so its cross-device sum is a reduce-scatter. (The
    constraint's own transpose would make it replicated: a full all-reduce, then a slice.)"""
    return (jax.lax.with_sharding_constraint(g, _fsdp_spec(tuple(g.shape), fsdp)),)


_gather.defvjp(_gather_fwd, _gather_bwd)


def gather_for_use(tree: Any) -> Any:
    """Weights whole on every device where the model uses them: FSDP's all-gather (ZeRO-3).

    jit_jax.model calls this on each block's weights inside the block (so inside its remat region: the
    backward gathers again instead of keeping every block's gathered copy), after casting them to the
    compute dtype (so bf16 moves). Gradients come back split by `_fsdp_spec`, i.e. reduce-scattered. Left to
    itself GSPMD reshards the activations around each matmul with a split weight instead (all-to-alls and
    partial-sum all-reduces), and all-reduces full gradients. A no-op unless the current mesh
    (jax.set_mesh) has an fsdp axis of size > 1.
    """
    fsdp = fsdp_size()
    if fsdp == 1:
        return tree
    return jax.tree.map(lambda a: _gather(a, fsdp), tree)


def fsdp_size() -> int:
    """Size of the fsdp axis of the current mesh (jax.set_mesh); 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get('fsdp', 1)


def state_shardings(abstract_tree: Any, mesh: Mesh, mode: str) -> Any:
    """NamedShardings for every array of a (possibly abstract) pytree: parameters, moments, EMA copies.

    mode 'replicate' copies everything to every device; 'fsdp' splits large arrays over the fsdp axis.
    """
    if mode not in ('replicate', 'fsdp'):
        raise ValueError(f"config.mesh.param_sharding={mode!r}: expected 'replicate' or 'fsdp'")
    fsdp = mesh.shape['fsdp'] if mode == 'fsdp' else 1

    def one(leaf):
        shape = tuple(getattr(leaf, 'shape', np.shape(leaf)))
        return NamedSharding(mesh, _fsdp_spec(shape, fsdp))

    return jax.tree.map(one, abstract_tree)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of the batch -> one global array split over every device of the mesh.

    Each host feeds only its own rows (jax.make_array_from_process_local_data); no host ever holds the
    global batch, and a single process simply places its rows.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
