"""The defaults of every config field, and the recipe rules stated in the paper's units.

`base()` is the one place a field is declared: its official JiT default and a comment saying what it
means. `paper_imagenet()` is the ImageNet recipe every configs/jit_*.py shares. The rules here turn the
recipe's units into the ones the code counts: epochs into optimizer steps (lazy, so they follow a later
batch-size override) and the base learning rate into the peak one. Everything is re-exported by
jit_jax.config_lib, the module the rest of the project imports; this one imports no JAX.
"""

from __future__ import annotations

from ml_collections import config_dict

# ImageNet-1k train split (ILSVRC-2012), the size the official epoch counts refer to.
IMAGENET_TRAIN_EXAMPLES = 1_281_167


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

