"""Training data for jit_jax: Grain pipelines over synthetic shapes, prepared ArrayRecord shards or TFDS.

Names are imported lazily (PEP 562), so `python -m jit_jax.data.prepare` does not import the
module twice (runpy warns about that) and preparing data does not pay for importing Grain.
"""

import importlib

_EXPORTS = {
    'ArrayRecordImages': 'arrayrecord', 'adm_center_crop': 'preprocess',
    'FIELDS': 'pipeline', 'make_train_dataset': 'pipeline', 'make_train_iterator': 'pipeline',
    'read_fields': 'pipeline',
    'SyntheticShapes': 'synthetic', 'intrinsic_dimension': 'synthetic',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
