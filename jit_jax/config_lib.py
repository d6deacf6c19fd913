"""The configuration layer: every field with its default, the override syntax, one loader, one check pass.

Configs are ml_collections ConfigDicts built in Python (big_vision / flax-examples style):

* `base()` holds every field of the project with the official JiT default and a comment. It is returned
  locked, so an experiment file that misspells a field fails at once instead of adding a new one.
* `configs/<name>.py` files call `base()` (or `paper_imagenet()`, itself built on `base()`) and override
  only what differs. Their `get_config(arg)` passes `arg` to `apply_overrides`, so
  `configs/default.py:patch=8,bottleneck=16` works, and `launch/sweep.py` builds grids from it.
* Derived fields are lazy ml_collections FieldReferences: `train.num_steps` of a paper file is "600 epochs
  at whatever batch the run ends up with", `optim.warmup_steps` of configs/default.py is "a tenth of
  train.num_steps". Overrides change the inputs (by `file.py:k=v` or by `--config.x=y` flags, which set
  fields the same way); an override of a derived field itself replaces its rule by the value.
* `finalize(config)` evaluates the rules once, after every override, into a plain locked copy and
  validates it; `load(spec)` is "read the file, apply `:k=v`, finalize", the one loader of the project.
* `validate(config)` checks what no spec checks: each spec (jit_jax.model.JiTConfig, diffusion.FlowSpec,
  sampling.SamplerSpec) is built and validates itself; the other groups and the cross-group rules (batch
  against mesh and accumulation, the mesh -1 axis) are checked here, raising ValueError naming the field.

Step counts are the canonical unit (`*_steps`); epochs exist only as a conversion (`epochs_to_steps`, the
`epochs=` / `warmup_epochs=` override keys), because the data pipeline, checkpoints and schedules all
count optimizer steps, and an epoch depends on the batch.

This module is the one the project imports (`config_lib.load`, `config_lib.base`, ...). It holds the
override syntax and the loader; the field defaults and recipe rules live in jit_jax.config_defaults
(base, paper_imagenet, epochs_to_steps, lr), the interpretation and checks in jit_jax.config_checks
(model_config, BACKEND_DEFAULTS, resolve_mesh, validate), and both are re-exported here.
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Mapping
from typing import Any

from absl import flags
from ml_collections import config_dict, config_flags

from jit_jax.config_checks import (ARCH_FIELDS, BACKEND_DEFAULTS, CUSTOM_VJP, DATA_SOURCES, EVAL_OUTPUTS,
                                   LR_SCHEDULES, MESH_AXES, PARAM_SHARDINGS, SAMPLER_WEIGHTS, _parent_and_leaf,
                                   eval_weights, model_config, resolve_mesh, validate)
from jit_jax.config_defaults import (IMAGENET_TRAIN_EXAMPLES, base, epochs_to_steps, lr, paper_imagenet,
                                     steps_per_epoch)

__all__ = [  # the project's config API: defined here, or in config_defaults / config_checks
    'ALIASES', 'ARCH_FIELDS', 'BACKEND_DEFAULTS', 'CUSTOM_VJP', 'DATA_SOURCES', 'EPOCH_KEYS', 'EVAL_OUTPUTS',
    'IMAGENET_TRAIN_EXAMPLES', 'LR_SCHEDULES', 'MESH_AXES', 'PARAM_SHARDINGS', 'SAMPLER_WEIGHTS',
    'apply_overrides', 'base', 'epochs_to_steps', 'eval_weights', 'finalize', 'load', 'lr', 'model_config',
    'paper_imagenet', 'parse_overrides', 'read', 'resolve_key', 'resolve_mesh', 'split_top_level',
    'steps_per_epoch', 'validate']

# Short names accepted by apply_overrides / launch/sweep.py. Any dotted field path works as well.
ALIASES: dict[str, str] = {
    'preset': 'model.preset', 'model': 'model.preset', 'patch': 'model.patch_size',
    'bottleneck': 'model.bottleneck_dim', 'hidden': 'model.hidden_size', 'depth': 'model.depth',
    'heads': 'model.num_heads', 'ctx_len': 'model.in_context_len', 'ctx_start': 'model.in_context_start',
    'proj_drop': 'model.proj_drop', 'attn_drop': 'model.attn_drop', 'dtype': 'model.dtype',
    'remat': 'model.remat',
    'pred': 'diffusion.pred', 'loss': 'diffusion.loss', 'p_mean': 'diffusion.p_mean',
    'p_std': 'diffusion.p_std', 't_eps': 'diffusion.t_eps', 'noise_scale': 'diffusion.noise_scale',
    'label_drop': 'diffusion.label_drop_prob',
    'method': 'sampler.method', 'sampling_steps': 'sampler.num_steps', 'cfg': 'sampler.cfg_scale',
    'interval_min': 'sampler.interval_min', 'interval_max': 'sampler.interval_max',
    'source': 'data.source', 'img_size': 'data.image_size', 'batch': 'data.global_batch_size',
    'blr': 'optim.blr', 'lr': 'optim.lr', 'wd': 'optim.weight_decay', 'warmup': 'optim.warmup_steps',
    'ema': 'optim.ema_decays', 'accum': 'optim.grad_accum_steps',
    'steps': 'train.num_steps', 'seed': 'seed',
}
# Keys that take a number of epochs and set the step field to the lazy epochs_to_steps rule, so the step
# count follows the final batch size whatever order the overrides come in.
EPOCH_KEYS: dict[str, str] = {'epochs': 'train.num_steps', 'warmup_epochs': 'optim.warmup_steps'}


# ---------------------------------------------------------------------------------------------------------
# Overrides and loading: "patch=8,bottleneck=16" strings from `file.py:<arg>` and launch/sweep.py


def split_top_level(text: str, sep: str = ',') -> list[str]:
    """Split on `sep` outside brackets, so tuple values like `ema=(0.999,0.9995)` survive."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in '([{':
            depth += 1
        elif char in ')]}':
            depth -= 1
            if depth < 0:
                raise ValueError(f'unbalanced brackets in {text!r}')
        if char == sep and depth == 0:
            parts.append(''.join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise ValueError(f'unbalanced brackets in {text!r}')
    parts.append(''.join(current))
    return [part.strip() for part in parts if part.strip()]


def parse_overrides(arg: str | None) -> list[tuple[str, str]]:
    """'a=1,b=(2,3)' -> [('a', '1'), ('b', '(2,3)')], rejecting items without '=' and repeated keys."""
    pairs: list[tuple[str, str]] = []
    for item in split_top_level(arg or ''):
        key, eq, value = item.partition('=')
        key = key.strip()
        if not eq or not key:
            raise ValueError(f'override {item!r} in {arg!r}: expected key=value')
        if key in (k for k, _ in pairs):
            raise ValueError(f'override key {key!r} given twice in {arg!r}')
        pairs.append((key, value.strip()))
    return pairs


def resolve_key(config: config_dict.ConfigDict, key: str, aliases: Mapping[str, str] = ALIASES) -> str:
    """Alias or dotted path -> dotted path of an existing field; unknown keys name themselves and the options."""
    path = aliases.get(key, key.removeprefix('config.'))
    node: Any = config
    for part in path.split('.'):
        if not isinstance(node, config_dict.ConfigDict) or part not in node:
            raise ValueError(f'unknown override key {key!r}: expected a field path such as model.patch_size, '
                             f'one of {sorted(EPOCH_KEYS)}, or an alias from {sorted(aliases)}')
        node = node[part]
    if isinstance(node, config_dict.ConfigDict):
        raise ValueError(f'override key {key!r} names the group config.{path}, not a field')
    return path


def apply_overrides(config: config_dict.ConfigDict, arg: str | None,
                    aliases: Mapping[str, str] = ALIASES) -> config_dict.ConfigDict:
    """Apply 'key=value,...' (the part after ':' in `file.py:<arg>`) to `config`, in place.

    Keys are aliases (ALIASES: patch, bottleneck, cfg, batch, ...) or dotted field paths; each pair is
    applied exactly as the field flag `--config.<path>=<value>` would be (ml_collections.config_flags
    parses it), so both spellings give the same config. epochs= / warmup_epochs= set the step field to
    the lazy epochs_to_steps rule, evaluated by finalize() at the final batch size.
    """
    argv, seen = ['overrides'], {}
    for key, text in parse_overrides(arg):
        path = EPOCH_KEYS.get(key) or resolve_key(config, key, aliases)
        if path in seen:
            raise ValueError(f'overrides {seen[path]!r} and {key!r} in {arg!r} both set config.{path}')
        seen[path] = key
        if key in EPOCH_KEYS:
            try:
                epochs = float(text)
            except ValueError:
                raise ValueError(f'override {key}={text}: expected a number of epochs') from None
            parent, leaf = _parent_and_leaf(config, EPOCH_KEYS[key])
            parent[leaf] = epochs_to_steps(config, epochs)
        else:
            argv.append(f'--config.{path}={text}')
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_dict('config', config, flag_values=flag_values, lock_config=config.is_locked,
                                    sys_argv=argv)
    try:
        flag_values(argv)
    except flags.Error as error:
        raise ValueError(f'override in {arg!r}: {error}') from None
    return config


def read(spec: str) -> config_dict.ConfigDict:
    """'path/file.py' or 'path/file.py:k=v,...' -> its get_config(arg), rules not yet evaluated.

    The same as ml_collections.config_flags.DEFINE_config_file builds it for `--config=<spec>`, before
    any `--config.x=y` flag; pass the result to finalize() after the last override.
    """
    path, _, arg = spec.partition(':')
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f'--config {path}: no such file')
    module_spec = importlib.util.spec_from_file_location(f'_jit_jax_config_{file.stem}', file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, 'get_config'):
        raise ValueError(f'--config {path}: the file defines no get_config(arg)')
    return module.get_config(arg) if arg else module.get_config()


def load(spec: str) -> config_dict.ConfigDict:
    """The project's config loader: read(spec), then finalize (rules evaluated, validated, locked)."""
    return finalize(read(spec))


def finalize(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """Evaluate every derived field after all overrides: a plain, locked, validated copy of `config`.

    Called by load() and by jit_jax.main after the `--config.x=y` flags, so both kinds of overrides
    reach the rules (step counts from epochs, configs/default.py's periods and EMA) the same way.
    """
    plain = config.copy_and_resolve_references()
    _resolve_tuples(plain)
    plain.lock()
    validate(plain)
    return plain


def _resolve_tuples(config: config_dict.ConfigDict) -> None:
    """Rules inside tuples (configs/default.py's EMA decays) are not resolved by ml_collections itself."""
    for key, value in config.items():
        if isinstance(value, config_dict.ConfigDict):
            _resolve_tuples(value)
        elif isinstance(value, tuple) and any(isinstance(v, config_dict.FieldReference) for v in value):
            config[key] = tuple(v.get() if isinstance(v, config_dict.FieldReference) else v for v in value)

