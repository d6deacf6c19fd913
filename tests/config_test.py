"""The configuration layer: config files, overrides, validation, sweeps and the config_flags path.

Paper facts asserted here (lr 2e-4 at batch 1024, 1251 steps per epoch, README CFG scales) come from
the official code / README as summarised in REFERENCE.md; architecture numbers are compared against
jit_jax.model.PRESETS rather than restated.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import pathlib
import re

import jax
import pytest
from absl import flags
from ml_collections import config_dict, config_flags

from jit_jax import config_lib
from jit_jax import model as model_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p.name for p in (REPO / 'configs').glob('*.py') if not p.name.startswith('_'))
PAPER_FILES = [name for name in CONFIG_FILES if name.startswith('jit_')]
PAPER_NAME = re.compile(r'jit_([blhg])(\d+)_in(\d+)\.py')


def load(name: str, arg: str | None = None) -> config_dict.ConfigDict:
    """configs/<name>[:arg] through the project's one loader."""
    return config_lib.load(f"{REPO / 'configs' / name}{':' + arg if arg else ''}")


def load_sweep():
    spec = importlib.util.spec_from_file_location('sweep_under_test', REPO / 'launch' / 'sweep.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expected_run(name: str) -> tuple[str, int]:
    """'jit_h32_in512.py' -> ('JiT-H/32', 512): the file name is the contract for what it trains."""
    size, patch, image_size = PAPER_NAME.fullmatch(name).groups()
    return f'JiT-{size.upper()}/{patch}', int(image_size)


def test_config_files_exist():
    assert 'default.py' in CONFIG_FILES
    assert len(PAPER_FILES) == 9, PAPER_FILES
    for name in PAPER_FILES:
        assert PAPER_NAME.fullmatch(name), f'{name} does not follow jit_<size><patch>_in<res>.py'


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_config_file_loads_and_validates(name):
    config = load(name)
    config_lib.validate(config)
    config_lib.validate(config, num_devices=8)
    cfg = config_lib.model_config(config)
    assert isinstance(cfg, model_lib.JiTConfig)
    assert cfg.input_size == config.data.image_size
    assert cfg.num_classes == config.data.num_classes
    assert config.train.num_steps >= 1


@pytest.mark.parametrize('name', PAPER_FILES)
def test_paper_config_is_its_preset(name):
    preset, image_size = expected_run(name)
    config = load(name)
    assert config.model.preset == preset
    assert config.data.image_size == image_size
    want = dataclasses.replace(model_lib.PRESETS[preset], input_size=image_size, num_classes=1000,
                               dtype='bfloat16', param_dtype='float32',
                               **config_lib.BACKEND_DEFAULTS[jax.default_backend()])
    assert config_lib.model_config(config) == want
    assert want.num_patches == 256  # every paper model sees 16 x 16 tokens


@pytest.mark.parametrize('name', PAPER_FILES)
def test_paper_config_uses_official_recipe(name):
    preset, image_size = expected_run(name)
    config = load(name)
    assert config.data.global_batch_size == 1024
    assert config_lib.lr(config) == pytest.approx(2e-4)  # blr 5e-5 * 1024 / 256
    assert config_lib.steps_per_epoch(config) == 1251  # 1281167 // 1024, drop_last
    assert config.optim.warmup_steps == 5 * 1251
    epochs = 200 if preset == 'JiT-B/64' else 600  # B/64 exists only in Table 5 (200 epochs)
    assert config.train.num_steps == epochs * 1251
    assert (config.optim.b1, config.optim.b2, config.optim.weight_decay) == (0.9, 0.95, 0.0)
    assert config.optim.ema_decays == (0.9999, 0.9996)
    assert (config.diffusion.pred, config.diffusion.loss) == ('x', 'v')
    assert (config.diffusion.p_mean, config.diffusion.p_std) == (-0.8, 0.8)
    assert config.diffusion.noise_scale == image_size / 256
    assert config.diffusion.label_drop_prob == 0.1
    assert (config.sampler.method, config.sampler.num_steps) == ('heun', 50)
    assert (config.sampler.interval_min, config.sampler.interval_max) == (0.1, 1.0)
    assert config.model.dtype == 'bfloat16'
    assert config.data.source == 'tfds' and config.data.name == 'imagenet2012'
    big = preset[4] in 'HG'
    assert (config.mesh.param_sharding == 'fsdp') == big
    assert config_lib.model_config(config).proj_drop == (0.2 if big else 0.0)


@pytest.mark.parametrize('name,cfg_scale', [
    ('jit_b16_in256.py', 3.0), ('jit_l16_in256.py', 2.4), ('jit_h16_in256.py', 2.2),
    ('jit_b32_in512.py', 3.0), ('jit_l32_in512.py', 2.5), ('jit_h32_in512.py', 2.3),
])
def test_paper_config_cfg_scale_from_readme(name, cfg_scale):
    assert load(name).sampler.cfg_scale == cfg_scale


def test_noise_scale_follows_resolution():
    assert load('jit_b16_in256.py').diffusion.noise_scale == 1.0
    assert load('jit_b32_in512.py').diffusion.noise_scale == 2.0
    assert load('jit_b64_in1024.py').diffusion.noise_scale == 4.0


def test_default_config_is_small_and_synthetic():
    config = load('default.py')
    cfg = config_lib.model_config(config)
    assert config.data.source == 'synthetic'
    assert config.model.dtype == 'float32'
    assert cfg.head_dim % 4 == 0
    assert model_lib.param_count(cfg) < 6_000_000  # 1.3M: width 128 over 16 tokens
    assert config.train.ckpt_every_steps <= config.train.num_steps
    assert config.train.sample_every_steps <= config.train.num_steps
    assert config.optim.warmup_steps < config.train.num_steps
    # The EMA must forget its initial weights within the run (no bias correction): < 5% left.
    assert all(decay ** config.train.num_steps < 0.05 for decay in config.optim.ema_decays)


def test_base_is_locked_and_official():
    config = config_lib.base()
    with pytest.raises(AttributeError):
        config.model.pach_size = 8  # a typo must not add a field
    assert config_lib.lr(config) == pytest.approx(2e-4)
    assert config_lib.model_config(config) == dataclasses.replace(
        model_lib.PRESETS['JiT-B/16'], dtype='bfloat16', **config_lib.BACKEND_DEFAULTS[jax.default_backend()])
    config.optim.lr = 1e-3
    assert config_lib.lr(config) == 1e-3


def test_epochs_to_steps_is_lazy_and_rounds():
    config = config_lib.base()
    assert config_lib.steps_per_epoch(config) == 1251
    steps = config_lib.epochs_to_steps(config, 600)
    assert steps.get() == 750_600 and config_lib.epochs_to_steps(config, 0.5).get() == 626  # 625.5 rounds up
    config.data.global_batch_size = 512  # the rule follows the batch, as base()'s warmup does
    assert steps.get() == 600 * 2502 and config.optim.warmup_steps == 5 * 2502
    config.data.global_batch_size = 2_000_000
    with pytest.raises(ValueError, match='config.data.num_train_examples'):
        config_lib.finalize(config)


# ---------------------------------------------------------------------------------------------------------
# Overrides


def test_overrides_apply_with_types():
    config = load('default.py', 'patch=8,bottleneck=16,cfg=2,ema=(0.99,0.995),model.depth=3,dtype=bfloat16,'
                                'optim.grad_clip=1,train.num_steps=77')
    assert config.model.patch_size == 8 and config.model.bottleneck_dim == 16
    assert config.sampler.cfg_scale == 2.0 and isinstance(config.sampler.cfg_scale, float)
    assert config.optim.ema_decays == (0.99, 0.995)
    assert config.model.depth == 3 and config.model.dtype == 'bfloat16'
    assert config.optim.grad_clip == 1.0 and config.train.num_steps == 77
    config_lib.validate(config)
    assert config_lib.model_config(config).patch_size == 8


def test_full_rank_bottleneck_has_one_spelling():
    config = load('default.py', 'patch=8,bottleneck=0')
    assert config.model.bottleneck_dim == 0 and config_lib.model_config(config).bottleneck_dim == 8 * 8 * 3
    assert config_lib.model_config(load('jit_b16_in256.py', 'bottleneck=32')).bottleneck_dim == 32
    with pytest.raises(ValueError, match='config.model.bottleneck_dim'):
        load('default.py', 'bottleneck=full')


def test_override_epochs_use_final_batch():
    assert load('jit_b16_in256.py', 'epochs=200').train.num_steps == 200 * 1251
    config = load('jit_b16_in256.py', 'epochs=200,batch=512,warmup_epochs=1')  # order in the string is free
    assert config.data.global_batch_size == 512
    assert config.train.num_steps == 200 * (1_281_167 // 512)
    assert config.optim.warmup_steps == 1_281_167 // 512
    assert config_lib.lr(config) == pytest.approx(1e-4)


def test_empty_override_changes_nothing():
    assert load('default.py', '').to_dict() == load('default.py').to_dict()


def test_derived_fields_follow_the_final_overrides():
    config = load('default.py', 'steps=2000')
    assert (config.optim.warmup_steps, config.train.ckpt_every_steps, config.train.sample_every_steps) == (
        200, 1000, 1000)
    assert config.optim.ema_decays == pytest.approx((2000 / 2008, 2000 / 2016))
    assert load('default.py', 'steps=1').optim.ema_decays == pytest.approx((1 / 9, 1 / 17))  # valid when short
    # An override of a derived field replaces its rule; the other rules still follow num_steps.
    config = load('default.py', 'steps=2000,warmup=7')
    assert config.optim.warmup_steps == 7 and config.train.ckpt_every_steps == 1000
    assert load('default.py', 'epochs=2').train.num_steps == 2 * (50_000 // 64)
    # The paper noise rule image_size / 256 follows an image size override.
    assert load('jit_b16_in256.py', 'img_size=512').diffusion.noise_scale == 2.0
    with pytest.raises(ValueError, match='both set config.train.num_steps'):
        load('jit_b16_in256.py', 'epochs=200,steps=10')


@pytest.mark.parametrize('arg,message', [
    ('pach=8', "unknown override key 'pach'"),
    ('model.pach_size=8', "unknown override key 'model.pach_size'"),
    ('optim=1', 'names the group config.optim'),
    ('patch', "expected key=value"),
    ('patch=8,patch=4', "'patch' given twice"),
    ('patch=8,model.patch_size=4', 'both set config.model.patch_size'),
    ('patch=abc', 'config.model.patch_size'),
    ('cfg=high', 'config.sampler.cfg_scale'),
    ('model.scan_blocks=maybe', 'config.model.scan_blocks'),
    ('epochs=many', 'epochs'),
    ('ema=(0.9,0.99', 'unbalanced'),
])
def test_bad_overrides_name_the_key(arg, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load('default.py', arg)


def test_split_top_level_keeps_tuples():
    assert config_lib.split_top_level('a=1,b=(2,3),c=[4,5]') == ['a=1', 'b=(2,3)', 'c=[4,5]']


# ---------------------------------------------------------------------------------------------------------
# validate(): each bad case raises ValueError naming the field


def _set(path, value):
    def mutate(config):
        parent, leaf = config_lib._parent_and_leaf(config, path)
        parent[leaf] = value
        return config
    return mutate


def _set_many(**values):
    def mutate(config):
        for path, value in values.items():
            _set(path.replace('__', '.'), value)(config)
        return config
    return mutate


def _via_dict(edit):
    """Rebuild from a plain dict: the way a hand-built or deserialised config escapes the type lock."""
    def mutate(config):
        d = config.to_dict()
        edit(d)
        return config_dict.ConfigDict(d)
    return mutate


BAD_CASES = {
    'unknown preset': (_set('model.preset', 'JiT-X/16'), 'config.model.preset'),
    'image not divisible by patch': (_set('data.image_size', 30), 'config.data.image_size'),
    'head dim not multiple of 4': (_set_many(model__hidden_size=120, model__num_heads=20),
                                   'config.model.num_heads'),
    'hidden not divisible by heads': (_set_many(model__hidden_size=130, model__num_heads=4),
                                      'config.model.hidden_size'),
    'preset-less with unset field': (_set('model.depth', None), 'config.model.depth'),
    'in-context start past depth': (_set('model.in_context_start', 4), 'config.model.in_context_start'),
    'pred space': (_set('diffusion.pred', 'z'), 'config.diffusion.pred'),
    'loss space': (_set('diffusion.loss', 'score'), 'config.diffusion.loss'),
    'label drop above 1': (_set('diffusion.label_drop_prob', 1.5), 'config.diffusion.label_drop_prob'),
    'unknown custom_vjp': (_set('model.custom_vjp', 'yes'), 'config.model.custom_vjp'),
    'interval max above 1': (_set('sampler.interval_max', 1.5), 'config.sampler.interval_max'),
    'tensor parallel': (_set('mesh.tensor', 2), 'config.mesh.tensor'),
    'sampler method': (_set('sampler.method', 'rk4'), 'config.sampler.method'),
    'sampler steps 0': (_set('sampler.num_steps', 0), 'config.sampler.num_steps'),
    'interval reversed': (_set_many(sampler__interval_min=0.6, sampler__interval_max=0.5),
                          'config.sampler.interval_min'),
    'batch vs accumulation': (_set('optim.grad_accum_steps', 3), 'config.data.global_batch_size'),
    'batch vs explicit mesh': (_set('mesh.data', 5), 'config.data.global_batch_size'),
    'two auto mesh axes': (_set('mesh.fsdp', -1), 'config.mesh'),
    'ema decay 1': (_set('optim.ema_decays', (0.999, 1.0)), 'config.optim.ema_decays'),
    'ema decay negative': (_set('optim.ema_decays', (-0.1,)), 'config.optim.ema_decays'),
    'ema2 without second decay': (_set_many(optim__ema_decays=(0.999,), sampler__ema='ema2'),
                                  'config.sampler.ema'),
    'unknown dtype': (_set('model.dtype', 'float64'), 'config.model.dtype'),
    'unknown param dtype': (_set('model.param_dtype', 'int8'), 'config.model.param_dtype'),
    'unknown remat': (_set('model.remat', 'all'), 'config.model.remat'),
    'unknown data source': (_set('data.source', 'webdataset'), 'config.data.source'),
    'arrayrecord without folder': (_set('data.source', 'arrayrecord'), 'config.data.data_dir'),
    'too many synthetic classes': (_set('data.num_classes', 1000), 'config.data.num_classes'),
    'train steps 0': (_set('train.num_steps', 0), 'config.train.num_steps'),
    'unknown schedule': (_set('optim.schedule', 'linear'), 'config.optim.schedule'),
    'wrong type float for int': (_via_dict(lambda d: d['train'].update(num_steps=10.5)), 'config.train.num_steps'),
    'wrong type bool for int': (_via_dict(lambda d: d.update(seed=True)), 'config.seed'),
    'wrong type str for float': (_via_dict(lambda d: d['optim'].update(blr='5e-5')), 'config.optim.blr'),
    'unknown field': (_via_dict(lambda d: d['model'].update(pach_size=8)), 'config.model.pach_size'),
    'missing field': (_via_dict(lambda d: d['optim'].pop('b1')), 'config.optim.b1'),
}


@pytest.mark.parametrize('case', sorted(BAD_CASES))
def test_validate_names_the_field(case):
    mutate, field = BAD_CASES[case]
    config = mutate(load('default.py'))
    with pytest.raises(ValueError, match=re.escape(field)):
        config_lib.validate(config)


def test_validate_checks_batch_against_devices():
    config = load('default.py')  # batch 64
    config_lib.validate(config, num_devices=8)
    with pytest.raises(ValueError, match='config.data.global_batch_size'):
        config_lib.validate(config, num_devices=128)
    with pytest.raises(ValueError, match='config.mesh'):
        config_lib.validate(_set('mesh.data', 4)(config), num_devices=8)


def test_resolve_mesh_fills_the_auto_axis():
    assert config_lib.resolve_mesh(load('jit_h16_in256.py').mesh, 16) == {'data': 1, 'fsdp': 16, 'tensor': 1}
    assert config_lib.resolve_mesh(load('default.py').mesh, 8) == {'data': 8, 'fsdp': 1, 'tensor': 1}
    assert config_lib.resolve_mesh({'data': 2, 'fsdp': -1}) == {'data': 2, 'fsdp': -1, 'tensor': 1}


@pytest.mark.parametrize('mesh,devices,message', [
    ({'data': -1, 'fsdp': -1}, 8, 'at most one axis may be -1'),
    ({'data': 0, 'fsdp': 1}, 8, 'expected sizes >= 1'),
    ({'data': 3, 'fsdp': -1}, 8, 'do not divide'),
    ({'data': 2, 'fsdp': 2}, 8, 'multiply to 4'),
])
def test_one_mesh_rule_for_validate_and_make_mesh(mesh, devices, message):
    """validate() and sharding.make_mesh reject a bad mesh with the same rule and the same words."""
    from jit_jax import sharding  # pylint: disable=import-outside-toplevel

    config = _set_many(mesh__data=mesh['data'], mesh__fsdp=mesh['fsdp'])(load('default.py'))
    for check in (lambda: config_lib.validate(config, num_devices=devices),
                  lambda: sharding.make_mesh(mesh, devices=jax.devices()[:devices])):
        with pytest.raises(ValueError, match=re.escape(message)):
            check()


# ---------------------------------------------------------------------------------------------------------
# Sweeps


def test_sweep_is_the_cartesian_product():
    sweep = load_sweep()
    argvs = sweep.commands('configs/default.py', '/tmp/sweep', ['patch=4,8', 'bottleneck=8,16,0'],
                           base_overrides='steps=10', python='python')
    assert len(argvs) == 6
    cells = set()
    for argv in argvs:
        assert argv[:3] == ['python', '-m', 'jit_jax.main']
        spec = next(a for a in argv if a.startswith('--config=')).removeprefix('--config=')
        path, _, arg = spec.partition(':')
        assert path == 'configs/default.py'
        pairs = dict(config_lib.parse_overrides(arg))
        assert pairs['steps'] == '10'
        cells.add((pairs['patch'], pairs['bottleneck']))
    assert cells == set(itertools.product(['4', '8'], ['8', '16', '0']))
    workdirs = [a for argv in argvs for a in argv if a.startswith('--workdir=')]
    assert len(set(workdirs)) == 6 and all(w.startswith('--workdir=/tmp/sweep/') for w in workdirs)


def test_sweep_cells_build_valid_configs(monkeypatch, capsys):
    sweep = load_sweep()
    monkeypatch.chdir(REPO)
    assert sweep.main(['--config', 'configs/default.py', '--workdir', '/tmp/s', '--grid', 'patch=4,8',
                       '--grid', 'ema=(0.99,0.995),(0.9,0.95)', '--', '--extra=1']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.endswith('--extra=1') for line in lines)
    assert sweep.main(['--config', 'configs/default.py', '--workdir', '/tmp/s', '--grid', 'pach=4,8']) == 2
    assert "unknown override key 'pach'" in capsys.readouterr().err
    with pytest.raises(ValueError, match='given twice'):
        sweep.parse_grid(['patch=4', 'patch=8'])


# ---------------------------------------------------------------------------------------------------------
# ml_collections.config_flags, as jit_jax.main uses it


def _parse_flags(argv):
    """What jit_jax.main does: config_flags reads the file and the field flags, then finalize."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    return config_lib.finalize(flag_values.config)


def test_config_flags_file_arg_and_field_overrides():
    path = REPO / 'configs' / 'jit_b16_in256.py'
    config = _parse_flags(['main', f'--config={path}:epochs=200', '--config.optim.blr=1e-4',
                           '--config.model.patch_size=32', '--config.optim.ema_decays=(0.999,0.9995)'])
    assert config.train.num_steps == 200 * 1251
    assert config_lib.lr(config) == pytest.approx(1e-4 * 1024 / 256)
    assert config_lib.model_config(config).patch_size == 32
    assert config.optim.ema_decays == (0.999, 0.9995)


@pytest.mark.parametrize('name,colon,flag_args', [
    ('default.py', 'steps=2000,batch=32,cfg=2,ema=(0.9,0.95),remat=block,model.scan_blocks=true',
     ['--config.train.num_steps=2000', '--config.data.global_batch_size=32', '--config.sampler.cfg_scale=2',
      '--config.optim.ema_decays=(0.9,0.95)', '--config.model.remat=block', '--config.model.scan_blocks=true']),
    ('default.py', 'steps=300', ['--config.train.num_steps=300']),  # warmup, EMA, periods follow both ways
    ('jit_b16_in256.py', 'batch=512,img_size=512', ['--config.data.global_batch_size=512',
                                                    '--config.data.image_size=512']),
])
def test_flag_and_colon_overrides_give_identical_configs(name, colon, flag_args):
    path = REPO / 'configs' / name
    by_flags = _parse_flags(['main', f'--config={path}', *flag_args])
    by_colon = load(name, colon)
    assert by_flags.to_dict() == by_colon.to_dict()
    assert by_flags.to_dict() != load(name).to_dict()


def test_epochs_in_the_file_arg_follow_a_later_batch_flag():
    """The old trap: `file.py:epochs=200 --config.data.global_batch_size=512` now rescales the steps."""
    path = REPO / 'configs' / 'jit_b16_in256.py'
    config = _parse_flags(['main', f'--config={path}:epochs=200', '--config.data.global_batch_size=512'])
    assert config.to_dict() == load('jit_b16_in256.py', 'epochs=200,batch=512').to_dict()
    assert config.train.num_steps == 200 * (1_281_167 // 512) and config.optim.warmup_steps == 5 * 2502


def test_config_flags_rejects_unknown_field():
    path = REPO / 'configs' / 'default.py'
    with pytest.raises(Exception, match='pach_size'):
        _parse_flags(['main', f'--config={path}', '--config.model.pach_size=8'])


def test_load_errors_name_the_file():
    with pytest.raises(FileNotFoundError, match='--config nowhere.py'):
        config_lib.load('nowhere.py:steps=3')


@pytest.mark.parametrize('platform', sorted(config_lib.BACKEND_DEFAULTS))
def test_numerics_resolve_per_backend(platform):
    """'auto' / '' take the backend's defaults; 'on' / 'off' and an explicit attention win everywhere."""
    config = config_lib.base()
    defaults = config_lib.BACKEND_DEFAULTS[platform]
    cfg = config_lib.model_config(config, platform=platform)
    assert (cfg.custom_vjp, cfg.attention_impl) == (defaults['custom_vjp'], defaults['attention_impl'])
    config.model.custom_vjp = 'off'
    cfg = config_lib.model_config(config, platform=platform)
    assert cfg.custom_vjp is False and cfg.attention_impl != 'own'  # 'own' needs the hand-written backward
    config.model.custom_vjp, config.model.attention_impl = 'on', 'xla'
    cfg = config_lib.model_config(config, platform=platform)
    assert (cfg.custom_vjp, cfg.attention_impl) == (True, 'xla')


def test_custom_vjp_off_reaches_the_model():
    config = config_lib.load('configs/default.py')
    with config.unlocked():
        config.model.custom_vjp = 'off'
    assert config_lib.model_config(config).custom_vjp is False
    config.model.custom_vjp = 'yes'
    with pytest.raises(ValueError, match='config.model.custom_vjp'):
        config_lib.validate(config)
