"""When to stop for a preemption: one decision, taken at the same step by every process.

A host that stops alone hangs the others in the next collective (or in the checkpoint save), so the
stop step must be agreed on:

* Under jax.distributed (pods, SLURM, `--coordinator_address`), JAX's preemption service is used as is.
  jax.distributed.initialize installs its own SIGTERM notifier; when any host receives SIGTERM (or the
  TPU runtime announces maintenance) the coordinator picks a step every host reaches, and
  `reached_preemption_sync_point(step)` (here through Orbax's CheckpointManager.reached_preemption)
  turns True on all of them at that step. No Python signal handler is installed then: it would replace
  the notifier and only this host would know.
* When that service is disabled (`jax_enable_preemption_service=False`), a Python SIGTERM flag is
  shared with `process_allgather` every `sync_every` steps (the same steps on every host), and the
  loop stops when any host has it.
* A single process needs no agreement: the flag alone decides, at the next step.

The loop must call `should_stop(step)` after every step (the sync point protocol counts on it).
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


def _preemption_service_running() -> bool:
    # jax.distributed.initialize starts the service (and its SIGTERM notifier) unless this flag is off.
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class Preemption:
    """should_stop(step) is True at one step, the same on every process, after a preemption notice."""

    def __init__(self, reached_sync_point: Callable[[int], bool], sync_every: int = 1):
        self._reached_sync_point = reached_sync_point
        self._sync_every = max(int(sync_every), 1)
        self.requested = False
        self._previous = None
        self.mode = 'jax' if _preemption_service_running() else (
            'allgather' if jax.process_count() > 1 else 'local')
        if self.mode != 'jax':
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):  # pylint: disable=unused-argument
        logging.warning('SIGTERM received: stopping at a step every process agrees on, after a checkpoint')
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if self.mode == 'jax':
            return self._reached_sync_point(step)
        if self.mode == 'local':
            return self.requested
        if step % self._sync_every:
            return False
        flags = multihost_utils.process_allgather(np.asarray(self.requested, np.bool_))
        return bool(np.any(flags))

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
