"""Checkpoints: the whole training state, written asynchronously by Orbax, restored exactly.

One checkpoint holds three items:
  state  the train state pytree (params, optimizer moments, EMA copies, step, rng), restored straight into
         its device layout (each host reads only its shards);
  data   every host's Grain iterator position (Grain's own handler, one file per process);
  meta   JSON: the model architecture, the process count and the full config, so a workdir that this run
         cannot continue is refused, naming the field, before anything is touched.
Orbax writes into a temporary directory and renames it (or, on GCS, marks it committed) when complete,
and prunes old steps only after that, so an interrupted save never costs the previous checkpoint; a
complete checkpoint that still fails to read is skipped for the one before it (`restore_latest`).

Directories are etils.epath paths: local folders and gs:// buckets go through the same code.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

# Fields that decide the parameter tree; dtype, remat and attention kernel may change between runs.
ARCHITECTURE_FIELDS = ('input_size', 'patch_size', 'in_channels', 'hidden_size', 'depth', 'num_heads',
                       'mlp_ratio', 'num_classes', 'bottleneck_dim', 'in_context_len', 'in_context_start',
                       'scan_blocks')


def as_path(path: str | os.PathLike) -> epath.Path:
    """A user path (local or gs://...) as an epath.Path; local ones made absolute (Orbax wants that).

    Never pathlib: pathlib turns 'gs://bucket/run' into the local folder './gs:/bucket/run'.
    """
    path = epath.Path(path)
    return path if '://' in os.fspath(path) else path.absolute()


class Checkpointer:
    """Orbax CheckpointManager over `directory` with the project's items and retention policy."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, keep_every_steps: int = 0,
                 asynchronous: bool = True):
        self.directory = as_path(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, keep_period=keep_every_steps or None, create=True,
                enable_async_checkpointing=asynchronous))
        self.unreadable: set[int] = set()  # steps restore_latest skipped

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict) -> None:
        """Start writing step `step`; returns once device arrays are copied, the disk write continues."""
        if step in self.unreadable:
            logging.warning('not writing step %d: %s/%d holds an unreadable checkpoint (kept for inspection)',
                            step, self.directory, step)
            return
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

    def restore_latest(self, abstract_state: Any, data_iterator: Any, check_meta) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that reads back, or None when there is none.

        check_meta(meta, step) raises ValueError when this run cannot continue the checkpoint (another
        architecture, batch, ...); that is a user error and propagates. Any other failure to read a
        checkpoint (a damaged file, a half-deleted step) logs a warning and falls back to the previous
        step, so a restarted job never crash-loops on one bad checkpoint; all processes agree on each
        step's outcome, so they resume from the same one. The unreadable steps are left in place for
        inspection (the retention policy prunes them later) and are not written again by this run. When
        every step fails the errors are raised together: starting from scratch would bury the run.
        """
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            error, state = None, None
            try:
                meta = self.read_meta(step)
            except Exception as e:  # pylint: disable=broad-except
                error = e
            if error is None:
                check_meta(meta, step)
                try:
                    state = self.restore(step, abstract_state, data_iterator)
                except Exception as e:  # pylint: disable=broad-except
                    error = e
            if _on_every_process(error is None):
                return step, state
            error = error or RuntimeError('another process could not restore it')
            failures.append((step, error))
            self.unreadable.add(step)
            logging.warning('checkpoint %s/%d does not restore (%s: %s); trying the one before', self.directory,
                            step, type(error).__name__, error)
        if failures:
            details = '; '.join(f'step {s}: {type(e).__name__}: {e}' for s, e in failures)
            raise RuntimeError(f'no checkpoint in {self.directory} restores ({details}). Move the folder away '
                               'to start from scratch.')
        return None

    def reached_preemption(self, step: int) -> bool:
        """True on every host at the same step once any host was told of a preemption (jax.distributed's
        preemption service: SIGTERM on any host, TPU maintenance events)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _on_every_process(ok: bool) -> bool:
    """True when `ok` holds on every process (one cheap all-gather when there are several)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.bool_))))


def architecture(model_config: Any) -> dict[str, Any]:
    fields = dataclasses.asdict(model_config)
    return {k: fields[k] for k in ARCHITECTURE_FIELDS}


def architecture_diff(saved: dict, model_config: Any) -> str:
    """'' when `saved` (an architecture dict) matches model_config, else 'field: saved X vs config Y, ...'."""
    wanted = architecture(model_config)
    return ', '.join(f'{k}: checkpoint {saved.get(k)!r} vs config {v!r}' for k, v in wanted.items()
                     if saved.get(k) != v)


def check_compatible(meta: dict, model_config: Any, directory: Any, step: int) -> None:
    """Refuse to resume a checkpoint of another architecture, naming every field that differs."""
    details = architecture_diff(meta.get('architecture', {}), model_config)
    if details:
        raise ValueError(f'the checkpoint at {directory}/{step} holds another architecture ({details}). '
                         'Use a new --workdir for this config; the checkpoint was left untouched.')


def resume_fields(config: Any, process_count: int) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint, besides the architecture.

    The saved Grain iterator position only means something for the same global batch, process count
    and worker count, and the optimizer state is a tree whose shape grad clipping (one more chain
    element) and the number of EMA decays (one copy each) change.
    """
    return {'data.global_batch_size': int(config.data.global_batch_size),
            'process_count': int(process_count),
            'data.num_workers': int(config.data.num_workers),
            'optim.grad_clip > 0': bool(config.optim.grad_clip > 0),
            'len(optim.ema_decays)': len(config.optim.ema_decays)}


def check_resumable(meta: dict, config: Any, process_count: int, directory: Any, step: int) -> None:
    """ValueError naming each field that differs from the checkpoint's run (fields it lacks are skipped)."""
    saved = meta.get('resume', {})
    wanted = resume_fields(config, process_count)
    diff = [f'{k}: checkpoint {saved[k]!r} vs now {v!r}' for k, v in wanted.items() if k in saved and saved[k] != v]
    if diff:
        raise ValueError(f'the checkpoint at {directory}/{step} cannot be continued by this run ({", ".join(diff)}): '
                         'its data iterator position or optimizer state would not fit. Use the checkpoint\'s '
                         'values, or a new --workdir.')


def load_weights(directory: str | os.PathLike, model_config: Any, targets: dict[str, Any]) -> dict[str, Any]:
    """Weights of a `python -m jit_jax.convert` output (config.train.init_from) for fine-tuning.

    targets maps the names to read ('params', 'ema1', 'ema2') to abstract trees with shardings; a name
    the folder lacks is left out of the result. ValueError naming config.train.init_from when the
    converted network has another architecture than the config.
    """
    path = as_path(directory)
    with ocp.CheckpointManager(path) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f'config.train.init_from={os.fspath(directory)!r}: no converted checkpoint '
                                    'there (write one with `python -m jit_jax.convert --out DIR`)')
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        details = architecture_diff(meta.get('model_config', {}), model_config)
        if details:
            raise ValueError(f'config.train.init_from={os.fspath(directory)!r} holds another architecture '
                             f'({details}); set config.model to match it')
        present = [name for name in targets if name in manager.item_metadata(step)]
        if not present:
            raise ValueError(f'config.train.init_from={os.fspath(directory)!r} holds none of {sorted(targets)}')
        restored = manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore(targets[name]) for name in present}))
        return {name: restored[name] for name in present}


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
