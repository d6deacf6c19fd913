"""What a finalized config means, and the one check pass over it.

`model_config` (the jit_jax.model.JiTConfig of config.model, per backend) and `resolve_mesh` (the mesh
rule) are the interpretations the builders use; `validate` runs those same two on every config, builds
the diffusion and sampler specs (which validate themselves), and checks the other groups and the
cross-group rules (batch against mesh and accumulation), raising ValueError naming the field. They
live together so a config that passes validate() is exactly one the builders accept. Everything is
re-exported by jit_jax.config_lib, the module the rest of the project imports.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from ml_collections import config_dict

from jit_jax.config_defaults import base

SAMPLER_WEIGHTS = ('ema1', 'ema2', 'model')
CUSTOM_VJP = ('auto', 'on', 'off')  # resolved to JiTConfig's bool per backend by _numerics
DATA_SOURCES = ('synthetic', 'tfds', 'arrayrecord')
LR_SCHEDULES = ('constant', 'cosine')
PARAM_SHARDINGS = ('replicate', 'fsdp')
MESH_AXES = ('data', 'fsdp', 'tensor')

# Architecture fields of config.model that map 1:1 onto jit_jax.model.JiTConfig and default to None
# ("take it from the preset"). dtype & co. are not here: they always have a concrete value.
ARCH_FIELDS = ('patch_size', 'hidden_size', 'depth', 'num_heads', 'mlp_ratio', 'bottleneck_dim',
               'in_context_len', 'in_context_start', 'attn_drop', 'proj_drop')
# JiTConfig fields that come from another config field than config.model.<same name>.
_JIT_FIELD_SOURCE = {'input_size': 'data.image_size', 'num_classes': 'data.num_classes'}
EVAL_OUTPUTS = ('png', 'npz')  # formats config.eval.output may list


# ---------------------------------------------------------------------------------------------------------
# What the model and mesh groups mean (the builders call these too)


def resolve_mesh(mesh: Mapping[str, int], num_devices: int | None = None) -> dict[str, int]:
    """The one mesh rule: axis sizes (`config.mesh`) with the -1 axis filled in for `num_devices` devices.

    Sizes are >= 1, or -1 for "all remaining devices" on at most one axis; tensor parallelism is not
    implemented, so tensor must be 1. Without num_devices the -1 axis stays -1 (checks before JAX starts).
    """
    sizes = {axis: int(mesh.get(axis, 1)) for axis in MESH_AXES}
    if any(size < 1 and size != -1 for size in sizes.values()):
        raise ValueError(f'config.mesh={sizes}: expected sizes >= 1, or -1 for all remaining devices')
    auto = [axis for axis, size in sizes.items() if size == -1]
    if len(auto) > 1:
        raise ValueError(f'config.mesh={sizes}: at most one axis may be -1')
    if sizes['tensor'] != 1:
        raise ValueError(f"config.mesh.tensor={sizes['tensor']}: only 1 is supported (JiT up to G trains with "
                         'data and fsdp parallelism; tensor parallelism is not implemented)')
    if num_devices is None:
        return sizes
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if auto:
        if num_devices % fixed:
            raise ValueError(f'config.mesh={sizes}: {num_devices} devices do not divide by the fixed axes')
        sizes[auto[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f'config.mesh={sizes}: the axes multiply to {fixed}, but there are {num_devices} devices')
    return sizes


# What '' / 'auto' mean per backend (the platform of the devices the model runs on), chosen from evidence:
# measured step time and memory on XLA:CPU (docs/performance.md), compiled memory and bytes for TPU slices
# (jit_jax.aot, docs/tpu.md). GPU keeps plain autodiff and JAX's attention choice until measured there.
BACKEND_DEFAULTS = {
    'cpu': dict(attention_impl='own', custom_vjp=True, remat_late=True),
    # tpu: from XLA:TPU's compiles of B/16 on v5p-32 (docs/tpu.md): autodiff with JAX's attention has the same
    # peak as the hand-written VJPs, 11% fewer bytes accessed and an 11% shorter modelled step.
    # remat_late: off on TPU, whose scheduler keeps plain jax.checkpoint's recomputation in the backward (tied,
    # B/16 on v5p-32 modelled 4-6% slower at the same peak); XLA:GPU hoists it (B/16 'block' per H100: 19.9 GiB
    # untied, 7.0 tied).
    'tpu': dict(attention_impl=None, custom_vjp=False, remat_late=False),
    'gpu': dict(attention_impl=None, custom_vjp=False, remat_late=True),  # None: dot_product_attention picks
}


def model_config(config: config_dict.ConfigDict, platform: str | None = None) -> Any:
    """The jit_jax.model.JiTConfig this config describes; JiTConfig validates it, errors name config fields.

    platform ('cpu', 'tpu', 'gpu'; default: JAX's default backend) resolves attention_impl '' and custom_vjp
    'auto' through BACKEND_DEFAULTS, so a program compiled ahead of time for a TPU is the one a TPU run builds.

    Starts from the preset (or from the explicit fields when model.preset == ''), replaces every
    architecture field that is set in config.model, and takes input_size / num_classes from config.data
    so the image and label sizes are stated exactly once. bottleneck_dim 0 (full rank) becomes the patch
    dimension here, the only place that spelling is read.
    """
    from jit_jax import model as model_lib  # deferred: reading a config needs no JAX

    m = config.model
    if m.preset:
        if m.preset not in model_lib.PRESETS:
            raise ValueError(f'config.model.preset={m.preset!r}: expected one of {sorted(model_lib.PRESETS)} '
                             "or '' (no preset, every architecture field set)")
        fields = dataclasses.asdict(model_lib.preset(m.preset))
    else:
        missing = [f'config.model.{name}' for name in ARCH_FIELDS if m[name] is None]
        if missing:
            raise ValueError(f"config.model.preset='' needs every architecture field; unset: {', '.join(missing)}")
        fields = {}
    fields.update({name: m[name] for name in ARCH_FIELDS if m[name] is not None})
    fields.update(input_size=config.data.image_size, num_classes=config.data.num_classes,
                  in_channels=m.in_channels, dtype=m.dtype, param_dtype=m.param_dtype,
                  scan_blocks=m.scan_blocks, remat=m.remat, **_numerics(m, platform))
    if fields['bottleneck_dim'] == 0:
        fields['bottleneck_dim'] = fields['patch_size'] ** 2 * fields['in_channels']
    try:
        return model_lib.JiTConfig(**fields)
    except ValueError as error:
        found = re.match(r'JiTConfig\.(\w+)', str(error))
        field = found and _JIT_FIELD_SOURCE.get(found[1], f'model.{found[1]}')
        source = f' (preset {m.preset!r} with the config.model fields that are set)' if m.preset else ''
        raise ValueError(f'config.{field or "model"}{source}: {error}') from None


def _numerics(m: config_dict.ConfigDict, platform: str | None) -> dict[str, Any]:
    """attention_impl and custom_vjp of config.model, with '' / 'auto' resolved for the platform, and how remat
    is tied (remat_late: not a config field, the platform's choice)."""
    if platform is None:
        import jax  # pylint: disable=import-outside-toplevel  (deferred like the model import)

        platform = jax.default_backend()
    defaults = BACKEND_DEFAULTS.get(platform, BACKEND_DEFAULTS['gpu'])
    custom_vjp = {'on': True, 'off': False}.get(m.custom_vjp, defaults['custom_vjp'])
    attention = m.attention_impl or defaults['attention_impl']
    if not m.attention_impl and attention == 'own' and not custom_vjp:
        attention = None  # the default 'own' needs the hand-written backward; plain autodiff takes JAX's
    return dict(attention_impl=attention, custom_vjp=custom_vjp, remat_late=defaults['remat_late'])


# ---------------------------------------------------------------------------------------------------------
# Validation


def _parent_and_leaf(config: config_dict.ConfigDict, path: str) -> tuple[config_dict.ConfigDict, str]:
    """'optim.warmup_steps' -> (config.optim, 'warmup_steps'): the group to read or set a dotted field in."""
    *parents, leaf = path.split('.')
    node = config
    for part in parents:
        node = node[part]
    return node, leaf


def _fail(field: str, value: Any, expected: str) -> None:
    raise ValueError(f'config.{field}={value!r}: expected {expected}')


def _check_types(config: Any, template: config_dict.ConfigDict, prefix: str) -> None:
    """Every field of base() present with base()'s type, and nothing else (catches hand-built configs)."""
    if not isinstance(config, config_dict.ConfigDict):
        raise ValueError(f'config.{prefix} is a {type(config).__name__}: expected a ConfigDict group'
                         if prefix else f'config is a {type(config).__name__}: expected a ConfigDict')
    extra = sorted(set(config.keys()) - set(template.keys()))
    if extra:
        names = ', '.join(f'config.{prefix}{key}' for key in extra)
        raise ValueError(f'unknown field(s) {names}: not in jit_jax.config_lib.base()')
    for key in template.keys():
        name = f'{prefix}{key}'
        if key not in config:
            raise ValueError(f'config.{name} is missing: every field of jit_jax.config_lib.base() must exist')
        expected, value = template[key], config[key]
        if isinstance(expected, config_dict.ConfigDict):
            _check_types(value, expected, f'{name}.')
            continue
        field_type = template.get_type(key)
        if value is None:
            if expected is not None:
                _fail(name, value, f'a value of type {field_type.__name__} (only preset-backed fields may be None)')
            continue
        if field_type is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif field_type is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif field_type in (tuple, list):
            ok = isinstance(value, (tuple, list)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        else:
            ok = isinstance(value, field_type)
        if not ok:
            _fail(name, value, f'a (finite) value of type {field_type.__name__}')


def _check(config: config_dict.ConfigDict, field: str, ok: Any, expected: str) -> None:
    """Fail naming `field` unless ok(value) (a callable) or value in ok (a tuple of choices)."""
    parent, leaf = _parent_and_leaf(config, field)
    value = parent[leaf]
    if not (value in ok if isinstance(ok, tuple) else ok(value)):
        _fail(field, value, expected if expected else f'one of {ok}')


def _at_least(low: float):
    return lambda value: value >= low


def validate(config: config_dict.ConfigDict, *, num_devices: int | None = None) -> None:
    """Check the whole config once, before anything is built; raise ValueError naming the field.

    The model, diffusion and sampler groups are checked by building their specs (JiTConfig, FlowSpec,
    SamplerSpec), which validate themselves; this function checks the other groups and every rule that
    spans groups. num_devices: the global device count (jax.device_count(), after
    jax.distributed.initialize()). When given, the mesh must fit it and the batch must split over the
    data-parallel devices; when None, only the explicitly sized mesh axes are checked (so this can run
    before JAX initialises its backend).
    """
    from jit_jax import diffusion, sampling  # deferred: they import JAX

    _check_types(config, base(), '')
    model_config(config)
    diffusion.FlowSpec.from_config(config.diffusion)
    sampling.SamplerSpec.from_config(config.sampler, config.diffusion)
    _check(config, 'model.custom_vjp', CUSTOM_VJP, '')
    _check(config, 'sampler.ema', SAMPLER_WEIGHTS, '')
    _check(config, 'sampler.num_images', _at_least(0), '>= 0')

    # data
    _check(config, 'data.source', DATA_SOURCES, '')
    if config.data.source == 'tfds' and not config.data.name:
        _fail('data.name', config.data.name, "a TFDS builder name such as 'imagenet2012' (data.source='tfds')")
    if config.data.source == 'arrayrecord' and not config.data.data_dir:
        _fail('data.data_dir', config.data.data_dir, "the ArrayRecord folder (data.source='arrayrecord')")
    if config.data.source == 'synthetic':
        from jit_jax.data import synthetic  # deferred: only needed for this source

        _check(config, 'data.num_classes', lambda n: n <= synthetic.NUM_SHAPES,
               f"<= {synthetic.NUM_SHAPES} for data.source='synthetic' (one class per shape)")
    for name, low in (('global_batch_size', 1), ('num_workers', 0), ('read_threads', 1),
                      ('prefetch_buffer_size', 0)):
        _check(config, f'data.{name}', _at_least(low), f'>= {low}')
    _check(config, 'data.num_train_examples', _at_least(config.data.global_batch_size),
           f'>= config.data.global_batch_size={config.data.global_batch_size} (an epoch needs a step)')

    # optim
    for name in ('lr', 'eps', 'weight_decay', 'min_lr', 'grad_clip'):
        _check(config, f'optim.{name}', _at_least(0.0), '>= 0')
    if config.optim.lr == 0 and not config.optim.blr > 0:
        _fail('optim.blr', config.optim.blr, '> 0 (or set an absolute optim.lr > 0)')
    for name in ('b1', 'b2'):
        _check(config, f'optim.{name}', lambda b: 0.0 <= b < 1.0, 'in [0, 1)')
    _check(config, 'optim.warmup_steps', _at_least(0), '>= 0')
    _check(config, 'optim.schedule', LR_SCHEDULES, '')
    _check(config, 'optim.grad_accum_steps', _at_least(1), '>= 1')
    _check(config, 'optim.ema_decays', lambda d: len(d) >= 1 and all(0.0 <= x < 1.0 for x in d),
           'at least one decay (ema1), each in [0, 1)')
    if config.sampler.ema == 'ema2' and len(config.optim.ema_decays) < 2:
        _fail('sampler.ema', 'ema2', f'an existing EMA: config.optim.ema_decays has '
              f'{len(config.optim.ema_decays)} entry')

    # train
    for name, low in (('num_steps', 1), ('log_every_steps', 1), ('keep_checkpoints', 1),
                      ('ckpt_every_steps', 0), ('keep_every_steps', 0), ('sample_every_steps', 0),
                      ('profile_steps', 0)):
        _check(config, f'train.{name}', _at_least(low), f'>= {low}')

    _check_eval(config)

    # mesh and batch split
    _check(config, 'mesh.param_sharding', PARAM_SHARDINGS, '')
    _check_batch_split(config, resolve_mesh(config.mesh, num_devices))


def eval_weights(config: config_dict.ConfigDict) -> tuple[str, ...]:
    """config.eval.weights as a tuple ('ema1,ema2' -> ('ema1', 'ema2'))."""
    return tuple(w.strip() for w in config.eval.weights.split(',') if w.strip())


def _check_eval(config: config_dict.ConfigDict) -> None:
    ev = config.eval
    _check(config, 'eval.num_samples', _at_least(1), '>= 1')
    _check(config, 'eval.weights', lambda w: bool(eval_weights(config)) and all(
        x in SAMPLER_WEIGHTS for x in eval_weights(config)), f'a comma list of {SAMPLER_WEIGHTS}')
    if 'ema2' in eval_weights(config) and len(config.optim.ema_decays) < 2 and not ev.checkpoint:
        _fail('eval.weights', ev.weights, 'existing EMA copies: config.optim.ema_decays has 1 entry')
    _check(config, 'eval.cfg_scales', lambda c: all(x >= 0 for x in c), 'CFG scales >= 0 (1.0 = no guidance)')
    _check(config, 'eval.output', lambda o: all(x.strip() in EVAL_OUTPUTS for x in o.split(',') if x.strip()),
           f"a comma list of {EVAL_OUTPUTS} or ''")
    for name, low in (('chunk_size', 1), ('inception_batch_size', 1), ('every_steps', 0),
                      ('train_num_samples', 2)):
        _check(config, f'eval.{name}', _at_least(low), f'>= {low}')
    _check(config, 'eval.classifier_every_steps', _at_least(0), '>= 0')
    if ev.classifier:
        if config.data.source != 'synthetic':
            _fail('eval.classifier', ev.classifier, "'' unless data.source='synthetic' (the classifier "
                  'knows only the procedural shape classes)')
        _check(config, 'eval.classifier_num_images', _at_least(config.data.num_classes),
               f'>= config.data.num_classes={config.data.num_classes} (every class sampled)')
    if ev.every_steps and not (ev.inception and ev.reference_stats):
        _fail('eval.every_steps', ev.every_steps, 'config.eval.inception and config.eval.reference_stats to be '
              'set too (or 0 = no periodic FID)')


def _check_batch_split(config: config_dict.ConfigDict, sizes: dict[str, int]) -> None:
    """The batch (per micro-batch) splits over data x fsdp; axes still at -1 are unknown and skipped."""
    batch, accum = config.data.global_batch_size, config.optim.grad_accum_steps
    if batch % accum:
        _fail('data.global_batch_size', batch, f'a multiple of config.optim.grad_accum_steps={accum}')
    micro_batch = batch // accum
    data_parallel = math.prod(size for axis, size in sizes.items() if axis != 'tensor' and size != -1)
    if micro_batch % data_parallel:
        what = (f'a micro-batch (global_batch_size / config.optim.grad_accum_steps = {micro_batch})'
                if accum > 1 else 'a batch')
        _fail('data.global_batch_size', batch, f'{what} that is a multiple of the data-parallel size '
              f"{data_parallel} (config.mesh data={sizes['data']} x fsdp={sizes['fsdp']})")
