"""python -m jit_jax.main --config configs/<file>.py[:overrides] --workdir DIR [--config.x.y=value ...]

The config is built as config_lib.load builds it: the file's get_config(overrides), then the
`--config.x.y=value` field flags, then config_lib.finalize, which evaluates the derived fields (step
counts from epochs, the periods of configs/default.py) after all of them. Trains (resuming from the newest checkpoint in DIR when there is one), logs to TensorBoard event files in
DIR and to the console, and writes sample grids to DIR/samples. With config.eval.classifier set, the
class accuracy of conditional samples is logged too (jit_jax.class_accuracy); the last line printed is
the final metrics as JSON. On multi-host systems start the same
command on every host; jax.distributed is initialised from the environment (TPU pods, SLURM) or from
--coordinator_address / --num_processes / --process_id. DIR may be local or gs:// (etils.epath, Orbax).

Environment: jax.distributed starts on its own only where the environment describes several processes
(`multi_host_environment`); JIT_JAX_NO_DISTRIBUTED=1 skips it even there (a debug run on one pod worker).
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/<name>.py[:overrides]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host only).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host only).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index (multi-host only).')
flags.mark_flags_as_required(['config', 'workdir'])


def _hide_accelerators_from_tensorflow() -> None:
    """clu and TFDS import TensorFlow; it must not grab GPU memory that JAX needs."""
    try:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        tf.config.set_visible_devices([], 'GPU')
    except (ImportError, RuntimeError):
        pass


def _initialise_distributed() -> None:
    import jax  # pylint: disable=import-outside-toplevel

    if _COORDINATOR.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    elif multi_host_environment(os.environ) and os.environ.get('JIT_JAX_NO_DISTRIBUTED') != '1':
        jax.distributed.initialize()  # cluster auto-detection


def multi_host_environment(env) -> bool:
    """Whether the environment describes a job of several processes: a TPU pod slice (more than one
    worker host), a SLURM step of more than one task, or an explicit JAX coordinator. One host or one task
    (a single TPU VM, an interactive srun shell) runs without jax.distributed."""
    return (',' in env.get('TPU_WORKER_HOSTNAMES', '') or int(env.get('SLURM_NTASKS', '1') or 1) > 1
            or 'JAX_COORDINATOR_ADDRESS' in env)


def quiet_library_logs() -> None:
    """Orbax logs every file it writes at INFO; keep its warnings, drop the chatter around our progress.

    Filters absl's handler (app.run's output) and the root logger's (where absl logs go without app.run,
    as in jit_jax.experiments).
    """
    import logging as py_logging  # pylint: disable=import-outside-toplevel

    def keep(record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or not any(
            lib in record.pathname for lib in ('/orbax/', '/grain/', '/etils/'))

    for handler in (logging.get_absl_handler(), *py_logging.getLogger().handlers):
        handler.addFilter(keep)


def start(argv: list[str]) -> tuple[object, str]:
    """Start-up shared by every command on these flags (training, jit_jax.evaluate): quiet library logs,
    TensorFlow off the accelerators, jax.distributed; returns (the finalized config, --workdir)."""
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    quiet_library_logs()
    _hide_accelerators_from_tensorflow()
    _initialise_distributed()
    import jax  # pylint: disable=import-outside-toplevel

    from jit_jax import config_lib  # pylint: disable=import-outside-toplevel

    logging.info('JAX processes %d, local devices %d, global devices %d (%s)', jax.process_count(),
                 jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
    return config_lib.finalize(_CONFIG.value), _WORKDIR.value


def finish(result: object) -> None:
    """Prints `result` as one JSON line on process 0 (for scripts) and leaves jax.distributed."""
    import jax  # pylint: disable=import-outside-toplevel

    if jax.process_index() == 0:
        print(json.dumps(result), flush=True)
    if jax.process_count() > 1:
        jax.distributed.shutdown()


def main(argv: list[str]) -> None:
    config, workdir = start(argv)
    from jit_jax import evaluate, train  # pylint: disable=import-outside-toplevel

    hooks = evaluate.training_hooks(config)  # periodic FID when config.eval.every_steps > 0
    if config.eval.classifier:
        from jit_jax import class_accuracy  # pylint: disable=import-outside-toplevel

        hooks.append(class_accuracy.SampleClassAccuracy.from_config(config))
    result = train.train_and_evaluate(config, workdir, hooks=hooks)
    for hook in hooks:
        result.update(getattr(hook, 'result', {}))
    logging.info('finished: %s', result)
    finish({'final': result})


if __name__ == '__main__':
    app.run(main)
