"""jit_jax: JiT (pixel-space diffusion with a plain ViT over large patches) in JAX and Flax NNX.

On a host without a TPU but with libtpu installed (the 'tpu' and 'test' extras), JAX's first device query
loads libtpu, which logs errors about the TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES it cannot find
before JAX falls back to the CPU or GPU. Unless the host has a Google PCI device (vendor 0x1ae0, as on a TPU
VM, where nothing is touched) or the variables are already set, they get placeholder values that keep
libtpu quiet; jit_jax.aot uses the same ones for its compile-only TPU client.
"""

from __future__ import annotations

import glob
import os
import pathlib

LIBTPU_PLACEHOLDERS = (('TPU_ACCELERATOR_TYPE', 'v5litepod-4'), ('TPU_WORKER_ID', '0'),
                       ('TPU_WORKER_HOSTNAMES', 'localhost'))


def _google_pci_device() -> bool:
    """The check JAX makes for attached TPU chips, widened to any Google device (to err on the side of a TPU)."""
    try:
        return any(pathlib.Path(p).read_text().strip() == '0x1ae0' for p in glob.glob('/sys/bus/pci/devices/*/vendor'))
    except OSError:
        return True


if not _google_pci_device():
    for _key, _value in LIBTPU_PLACEHOLDERS:
        os.environ.setdefault(_key, _value)
