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
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import pathlib
import re
from collections.abc import Mapping
from typing import Any

from absl import flags
from ml_collections import config_dict, config_flags

# ImageNet-1k train split (ILSVRC-2012), the size the official epoch counts refer to.
IMAGENET_TRAIN_EXAMPLES = 1_281_167

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


def base() -> config_dict.ConfigDict:
    """Every field of the project, with the official JiT default (JiT-B/16, ImageNet 256 px).

    The defaults mirror main_jit.py's argparse defaults where it has them (200 epochs, blr 5e-5, EMA
    0.9999/0.9996, heun 50 steps, ...), with the batch the paper uses (1024 = 128 per GPU x 8) and the
    CFG values the README uses for B/16 (scale 3.0 on the interval [0.1, 1]). Returned locked.
    """
    config = config_dict.ConfigDict()

    config.seed = 0  # model init, noise and label-drop streams; the official code adds the rank

    # ---- model: a preset name plus optional per-field replacements (jit_jax.model.JiTConfig)
    config.model = model = config_dict.ConfigDict()
    model.preset = 'JiT-B/16'  # key of jit_jax.model.PRESETS; '' = no preset, set every field below
    # None = take from the preset. Placeholders keep the type for --config.model.x= overrides.
    model.patch_size = config_dict.placeholder(int)  # pixels per patch side (16 at 256 px: 256 tokens)
    model.hidden_size = config_dict.placeholder(int)  # transformer width d
    model.depth = config_dict.placeholder(int)  # number of blocks
    model.num_heads = config_dict.placeholder(int)  # d / heads must be a multiple of 4 (2-D RoPE)
    model.mlp_ratio = config_dict.placeholder(float)  # SwiGLU width = int(int(d * ratio) * 2 / 3)
    # Patch -> bottleneck -> d, a low-rank patch embedding (128 for B/L, 256 for H/G; paper Fig. 4).
    # 0 = full rank (the one spelling of it): the bottleneck is as wide as a patch, patch_size**2 * channels.
    model.bottleneck_dim = config_dict.placeholder(int)
    model.in_context_len = config_dict.placeholder(int)  # class tokens prepended in-context (32; 0 = none)
    model.in_context_start = config_dict.placeholder(int)  # block where they join (B 4, L 8, H/G 10)
    model.attn_drop = config_dict.placeholder(float)  # attention-probability dropout (0 in all runs)
    model.proj_drop = config_dict.placeholder(float)  # projection dropout, middle half of the blocks only
    model.in_channels = 3  # RGB; not preset-dependent, so a plain int
    model.dtype = 'bfloat16'  # compute dtype of matmuls; the official run uses bf16 autocast
    model.param_dtype = 'float32'  # master weights; the official run keeps fp32 parameters
    # Attention: '' (the backend's default, BACKEND_DEFAULTS), 'own' (unfused, hand-written backward), or a
    # jax.nn.dot_product_attention implementation: 'xla', 'cudnn' (GPU).
    model.attention_impl = ''
    model.scan_blocks = False  # lax.scan over stacked blocks: compile time independent of depth
    model.remat = 'none'  # activation checkpointing per block: 'none' | 'block' | 'dots'
    # Hand-written backward passes (same forward and gradients, fewer saved activations): 'auto' (on where
    # measured to help) | 'on' | 'off'.
    model.custom_vjp = 'auto'

    # ---- diffusion: the training objective (jit_jax.diffusion.FlowSpec); t = 1 is clean data
    config.diffusion = diffusion = config_dict.ConfigDict()
    diffusion.pred = 'x'  # space of the network output: 'x' | 'eps' | 'v' (the paper's point: x)
    diffusion.loss = 'v'  # space of the squared error: 'x' | 'eps' | 'v' (x-pred + v-loss, issue #3)
    diffusion.p_mean = -0.8  # logit-normal t: t = sigmoid(N(p_mean, p_std^2)); official --P_mean
    diffusion.p_std = 0.8  # official --P_std
    diffusion.t_eps = 0.05  # every division by 1 - t uses max(1 - t, t_eps)
    diffusion.noise_scale = 1.0  # e = noise_scale * N(0, I); image_size / 256 in the paper
    diffusion.label_drop_prob = 0.1  # label -> null class with this probability (trains CFG)

    # ---- sampler: the ODE solver used for sample grids and evaluation (jit_jax.sampling)
    config.sampler = sampler = config_dict.ConfigDict()
    sampler.method = 'heun'  # 'heun' (last step Euler) | 'euler'
    sampler.num_steps = 50  # uniform t grid from 0 to 1; heun 50 = 99 guided evaluations
    sampler.cfg_scale = 3.0  # classifier-free guidance weight; 1.0 = off. B/16 value from the README
    sampler.interval_min = 0.1  # CFG only where interval_min < t < interval_max (strict)
    sampler.interval_max = 1.0  # argparse default is [0, 1]; every README run uses [0.1, 1]
    sampler.ema = 'ema1'  # weights to sample with: 'ema1' | 'ema2' | 'model' (official: ema1)
    sampler.num_images = 16  # images in the periodic training sample grid

    # ---- data
    config.data = data = config_dict.ConfigDict()
    data.source = 'tfds'  # 'synthetic' (procedural, offline) | 'tfds' | 'arrayrecord'
    data.name = 'imagenet2012'  # TFDS builder name (source='tfds'); its 'train' split is used
    data.data_dir = ''  # TFDS data dir, or the ArrayRecord folder (source='arrayrecord'); '' = default
    data.image_size = 256  # training resolution; also the model's input_size
    data.num_classes = 1000  # also the model's num_classes; the null (CFG) class id is this number
    # Size of one epoch, used only to convert epochs to steps; also the length of the synthetic set.
    data.num_train_examples = IMAGENET_TRAIN_EXAMPLES
    data.global_batch_size = 1024  # over all hosts and devices (official: 128 per GPU x 8 GPUs)
    data.random_flip = True  # horizontal flip, the only augmentation of the official pipeline
    data.num_workers = 12  # Grain worker processes per host (official DataLoader: 12); 0 = in-process
    data.read_threads = 8  # threads reading / decoding in each process
    data.prefetch_buffer_size = 256  # elements (not batches) read ahead per process
    data.shuffle_seed = 0  # mixed with config.seed into Grain's shuffle: reshuffles only the data

    # ---- optim: AdamW with linear warmup, then constant (util/lr_sched.py)
    config.optim = optim = config_dict.ConfigDict()
    optim.blr = 5e-5  # base lr: lr = blr * global_batch_size / 256 (2e-4 at batch 1024)
    optim.lr = 0.0  # absolute lr; > 0 overrides blr (official --lr)
    optim.b1 = 0.9
    optim.b2 = 0.95  # official betas (0.9, 0.95)
    optim.eps = 1e-8  # torch AdamW and optax share this default; spelled out so a port never drifts
    optim.weight_decay = 0.0  # official 0.0 (so its no-decay param groups change nothing)
    optim.warmup_steps = epochs_to_steps(config, 5)  # official 5 epochs (6255 steps at batch 1024)
    optim.schedule = 'constant'  # after warmup: 'constant' (official) | 'cosine' (to min_lr)
    optim.min_lr = 0.0  # end of the cosine schedule (official --min_lr)
    optim.grad_clip = 0.0  # global-norm clip; 0 = off (official: none)
    optim.grad_accum_steps = 1  # micro-batches per optimizer step; global_batch_size is per step
    optim.ema_decays = (0.9999, 0.9996)  # ema1, ema2; per optimizer step, no warmup / bias correction

    # ---- train: loop lengths and periods, all in optimizer steps (0 = never, where allowed). The epoch
    # values are lazy (epochs_to_steps): they follow data.global_batch_size until overridden themselves.
    config.train = train = config_dict.ConfigDict()
    train.num_steps = epochs_to_steps(config, 200)  # official default 200 epochs (ablations)
    train.log_every_steps = 100  # official --log_freq 100
    # Official saves every 5 epochs; this is cheaper. 0 = never (no periodic, final or preemption checkpoint).
    train.ckpt_every_steps = epochs_to_steps(config, 1)
    train.keep_checkpoints = 2  # most recent checkpoints kept
    train.keep_every_steps = epochs_to_steps(config, 100)  # also keep these forever (official: 100 ep)
    train.sample_every_steps = epochs_to_steps(config, 5)  # write a sample grid; 0 = never
    # Fine-tuning: a `python -m jit_jax.convert --out` folder (local or gs://) whose weights start a run
    # that has no checkpoint yet (its EMA copies too, where present); '' = random init. Same architecture.
    train.init_from = ''
    # jax.profiler trace of this many steps (after the first, compiling one) into
    # workdir/plugins/profile for TensorBoard's profile plugin; 0 = off.
    train.profile_steps = 0

    # ---- mesh: device mesh axes (jit_jax.sharding); one axis may be -1 = all remaining devices
    config.mesh = mesh = config_dict.ConfigDict()
    mesh.data = -1  # pure data parallelism (batch split, params replicated across it)
    mesh.fsdp = 1  # batch split *and* params split across it (ZeRO-3 style)
    mesh.tensor = 1  # model (tensor) parallelism on heads / MLP width; JiT sizes rarely need it
    mesh.param_sharding = 'replicate'  # 'replicate' | 'fsdp' (shard params over the fsdp axis)

    # ---- eval: FID / IS (python -m jit_jax.evaluate, jit_jax.fid) and the optional periodic FID of training
    config.eval = ev = config_dict.ConfigDict()
    ev.num_samples = 50_000  # class-balanced: sample i has label i % num_classes (official: 50 per class)
    ev.weights = 'ema1'  # 'ema1' | 'ema2' | 'model' (raw), or a comma list such as 'ema1,ema2' to sweep
    ev.checkpoint = ''  # '' = newest checkpoint of --workdir; else a `python -m jit_jax.convert` output dir
    ev.cfg_scales = ()  # CFG scales to sweep on the same noise; () = config.sampler.cfg_scale only
    ev.inception = ''  # weights file of `python -m jit_jax.fid prepare`; '' = write samples, no FID
    ev.reference_stats = ''  # mu/sigma .npz, e.g. the official fid_stats/jit_in256_stats.npz
    ev.output = 'png'  # samples written besides the chunk files: 'png', 'npz', 'png,npz' or ''
    ev.chunk_size = 512  # images per resumable chunk; a killed evaluation redoes at most one chunk
    ev.seed = 0  # noise of sample i is drawn from fold_in(key(seed), i): any chunking gives the same images
    ev.inception_batch_size = 200  # images per Inception call
    ev.every_steps = 0  # periodic FID during training (needs inception and reference_stats); 0 = off
    ev.train_num_samples = 5000  # samples per periodic FID (few thousand: a trend, not the FID-50K)
    # How recognisable conditional samples are (jit_jax.class_accuracy), procedural data only: a shape-classifier
    # file (python -m jit_jax.classifier --out FILE), trained and saved there when missing. When set, the run
    # logs sample_class_accuracy at the last step. '' = off.
    ev.classifier = ''
    ev.classifier_every_steps = 0  # also score every n steps (0 = only at the last step)
    ev.classifier_num_images = 500  # conditional samples scored, the classes in turn
    ev.classifier_seed = 1  # noise seed of the scored samples (the sample grids use config.seed)

    config.lock()
    return config


# ---------------------------------------------------------------------------------------------------------
# Derived values


def steps_per_epoch(config: config_dict.ConfigDict) -> int:
    """Optimizer steps in one pass over the data, dropping the last partial batch (the official drop_last)."""
    return _steps_per_epoch(config).get()


def _steps_per_epoch(config: config_dict.ConfigDict) -> config_dict.FieldReference:
    data = config.data
    return data.get_ref('num_train_examples') // data.get_ref('global_batch_size')


def epochs_to_steps(config: config_dict.ConfigDict, epochs: float) -> config_dict.FieldReference:
    """`epochs` as whole optimizer steps (rounded), lazily: the value follows later batch-size overrides.

    Assign it to a step field (`config.train.num_steps = epochs_to_steps(config, 600)`); `.get()` gives
    the number now (1251 steps per ImageNet epoch at batch 1024).
    """
    return (_steps_per_epoch(config) * float(epochs) + 0.5).to_int()


def lr(config: config_dict.ConfigDict) -> float:
    """Peak learning rate: the official linear scaling rule unless an absolute optim.lr is given."""
    if config.optim.lr > 0:
        return float(config.optim.lr)
    return config.optim.blr * config.data.global_batch_size / 256


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
    'cpu': dict(attention_impl='own', custom_vjp=True),
    # tpu: from XLA:TPU's compiles of B/16 on v5p-32 (docs/tpu.md): autodiff with JAX's attention has the same
    # peak as the hand-written VJPs, 11% fewer bytes accessed and an 11% shorter modelled step.
    'tpu': dict(attention_impl=None, custom_vjp=False),
    'gpu': dict(attention_impl=None, custom_vjp=False),  # None: jax.nn.dot_product_attention picks (cuDNN)
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
    """attention_impl and custom_vjp of config.model, with '' / 'auto' resolved for the platform."""
    if platform is None:
        import jax  # pylint: disable=import-outside-toplevel  (deferred like the model import)

        platform = jax.default_backend()
    defaults = BACKEND_DEFAULTS.get(platform, BACKEND_DEFAULTS['gpu'])
    custom_vjp = {'on': True, 'off': False}.get(m.custom_vjp, defaults['custom_vjp'])
    attention = m.attention_impl or defaults['attention_impl']
    if not m.attention_impl and attention == 'own' and not custom_vjp:
        attention = None  # the default 'own' needs the hand-written backward; plain autodiff takes JAX's
    return dict(attention_impl=attention, custom_vjp=custom_vjp)


# ---------------------------------------------------------------------------------------------------------
# Paper runs


def paper_imagenet(preset: str, image_size: int, *, cfg_scale: float, proj_drop: float,
                   epochs: float = 600, fsdp: bool = False) -> config_dict.ConfigDict:
    """The official ImageNet recipe (REFERENCE.md sections 2-4) for one model; configs/jit_*.py call this.

    Shared by every paper run: batch 1024, blr 5e-5 (lr 2e-4), 5 warmup epochs then constant, AdamW
    (0.9, 0.95) without weight decay, EMA 0.9999 / 0.9996, logit-normal t (-0.8, 0.8), label drop 0.1,
    heun 50 steps with CFG on [0.1, 1], bf16 compute with fp32 parameters, and noise_scale =
    image_size / 256 (1 and 2 confirmed by the README; 4 at 1024 px is the paper's rule, unconfirmed),
    a rule that follows an `img_size=` override. What differs per model (cfg_scale, proj_drop, parameter
    sharding) is an argument, so each config file states it next to its source. epochs: 600 for the
    final models, 200 for the paper's ablations (`configs/jit_b16_in256.py:epochs=200`).
    """
    config = base()
    config.model.preset = preset
    config.model.proj_drop = proj_drop
    config.model.attn_drop = 0.0
    config.model.dtype = 'bfloat16'
    config.model.param_dtype = 'float32'

    config.data.source = 'tfds'
    config.data.name = 'imagenet2012'
    config.data.image_size = image_size
    config.data.num_classes = 1000
    config.data.num_train_examples = IMAGENET_TRAIN_EXAMPLES
    config.data.global_batch_size = 1024

    config.diffusion.pred = 'x'
    config.diffusion.loss = 'v'
    config.diffusion.p_mean = -0.8
    config.diffusion.p_std = 0.8
    config.diffusion.noise_scale = (config.data.get_ref('image_size') / 256).to_float()
    config.diffusion.label_drop_prob = 0.1

    config.sampler.method = 'heun'
    config.sampler.num_steps = 50
    config.sampler.cfg_scale = cfg_scale
    config.sampler.interval_min = 0.1
    config.sampler.interval_max = 1.0

    config.optim.blr = 5e-5
    config.optim.lr = 0.0
    config.optim.b1, config.optim.b2 = 0.9, 0.95
    config.optim.weight_decay = 0.0
    config.optim.schedule = 'constant'
    config.optim.ema_decays = (0.9999, 0.9996)
    config.optim.warmup_steps = epochs_to_steps(config, 5)
    config.train.num_steps = epochs_to_steps(config, epochs)

    if fsdp:  # H and G: shard parameters and optimizer state over all devices (ZeRO-3 style)
        config.mesh.data = 1
        config.mesh.fsdp = -1
        config.mesh.param_sharding = 'fsdp'
    return config


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


def _parent_and_leaf(config: config_dict.ConfigDict, path: str) -> tuple[config_dict.ConfigDict, str]:
    *parents, leaf = path.split('.')
    node = config
    for part in parents:
        node = node[part]
    return node, leaf


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


# ---------------------------------------------------------------------------------------------------------
# Validation


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


EVAL_OUTPUTS = ('png', 'npz')


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
