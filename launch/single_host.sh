#!/usr/bin/env bash
# Train on one machine (all of its accelerators, or CPU), logging to a file as well as the terminal.
#
#   launch/single_host.sh [--dry-run] CONFIG[:overrides] WORKDIR [jit_jax.main flags]
#   e.g. launch/single_host.sh configs/default.py:steps=2000 /tmp/jit_default --config.seed=1
#
# WORKDIR may be local or gs://. Rerunning the same command resumes from the latest checkpoint, and
# SIGTERM (Ctrl-C sends SIGINT; `kill PID` sends SIGTERM) makes jit_jax checkpoint and exit 0.
# LOG (default: jit_jax-<hostname>.log here) gets a copy of the output; PYTHON picks the interpreter.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
if [[ $# -lt 2 ]]; then
    echo "usage: $0 [--dry-run] CONFIG WORKDIR [jit_jax.main flags]" >&2
    exit 2
fi
CONFIG=$1
WORKDIR=$2
shift 2
PYTHON=${PYTHON:-python}
LOG=${LOG:-jit_jax-$(hostname).log}
CMD=("$PYTHON" -m jit_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@")
if [[ $DRY_RUN == 1 ]]; then
    echo "$(printf '%q ' "${CMD[@]}")2>&1 | tee -a $(printf '%q' "$LOG")"
    exit 0
fi
"${CMD[@]}" 2>&1 | tee -a "$LOG"
