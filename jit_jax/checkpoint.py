"""Checkpoints: the whole training state, written asynchronously by Orbax, restored exactly.

One checkpoint holds three items:
  state  the train state pytree (params, optimizer moments, EMA copies, step, rng), restored straight into
         its device layout (each host reads only its shards);
  data   every host's Grain iterator position (Grain's own handler, one file per process);
  meta   JSON: the model architecture and the full config, so a workdir of another model is refused
         before anything is touched.
Orbax writes into a temporary directory and renames it when complete, and prunes old steps only after
that, so an interrupted save never costs the previous checkpoint.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

# Fields that decide the parameter tree; dtype, remat and attention kernel may change between runs.
ARCHITECTURE_FIELDS = ('input_size', 'patch_size', 'in_channels', 'hidden_size', 'depth', 'num_heads',
                       'mlp_ratio', 'num_classes', 'bottleneck_dim', 'in_context_len', 'in_context_start',
                       'scan_blocks')


class Checkpointer:
    """Orbax CheckpointManager over `directory` with the project's items and retention policy."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 2, keep_every_steps: int = 0,
                 asynchronous: bool = True):
        self.directory = pathlib.Path(directory).resolve()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, keep_period=keep_every_steps or None, create=True,
                enable_async_checkpointing=asynchronous))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict) -> None:
        """Start writing step `step`; returns once device arrays are copied, the disk write continues."""
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if data_iterator is not None:
            items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        """The state at `step` laid out as `abstract_state` (ShapeDtypeStructs with shardings); the data
        iterator is moved to where it was when the checkpoint was written."""
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        if data_iterator is not None:
            items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items)).state

    def reached_preemption(self, step: int) -> bool:
        """True on every host once the cluster announced a preemption (TPU maintenance events)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def architecture(model_config: Any) -> dict[str, Any]:
    fields = dataclasses.asdict(model_config)
    return {k: fields[k] for k in ARCHITECTURE_FIELDS}


def check_compatible(meta: dict, model_config: Any, directory: pathlib.Path, step: int) -> None:
    """Refuse to resume a checkpoint of another architecture, naming every field that differs."""
    saved = meta.get('architecture', {})
    wanted = architecture(model_config)
    diff = {k: (saved.get(k), wanted[k]) for k in wanted if saved.get(k) != wanted[k]}
    if diff:
        details = ', '.join(f'{k}: checkpoint {a!r} vs config {b!r}' for k, (a, b) in diff.items())
        raise ValueError(f'the checkpoint at {directory}/{step} holds another architecture ({details}). '
                         'Use a new --workdir for this config; the checkpoint was left untouched.')


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
