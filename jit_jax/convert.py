"""Official PyTorch JiT weights <-> jit_jax parameters.

`model_from_torch(state_dict, config)` is the public entry point: it takes the official `state_dict()` as
numpy arrays (names as the PyTorch code writes them, with or without the training code's `net.` prefix) and
the official constructor's keyword arguments, and returns an NNX `JiT` computing the same function.

Layouts differ in three places, all handled by `_RULES`:
  * nn.Linear stores (out, in); nnx.Linear stores (in, out).
  * The p x p patch convolution flattens its input as (c, kh, kw); our patchify flattens (kh, kw, c).
  * `pos_embed` is a frozen table in PyTorch and a constant here (checked for shape, not loaded).

Command line (torch is needed only here, imported lazily):
  python -m jit_jax.convert --torch-checkpoint checkpoint-last.pth --out DIR [--preset JiT-B/16]
writes an Orbax checkpoint of the weights and, when the file has them, the EMA copies;
`load_converted(DIR, 'ema1')` gives the network back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from jit_jax import model as model_lib

# Official constructor arguments (LTH14/JiT model_jit.JiT); everything else in a config dict is ignored.
TORCH_ARGS = ('input_size', 'patch_size', 'in_channels', 'hidden_size', 'depth', 'num_heads', 'mlp_ratio',
              'attn_drop', 'proj_drop', 'num_classes', 'bottleneck_dim', 'in_context_len', 'in_context_start')
_JAX_ARGS = ('dtype', 'param_dtype', 'attention_impl', 'scan_blocks', 'remat')


def config_from_torch(config: Mapping[str, Any] | model_lib.JiTConfig) -> model_lib.JiTConfig:
    """JiTConfig from the official constructor's keywords; a missing one takes the official default."""
    if isinstance(config, model_lib.JiTConfig):
        return config
    known = {k: config[k] for k in TORCH_ARGS + _JAX_ARGS if k in config}
    return model_lib.JiTConfig(**known)


# Each rule: (torch name, our path, layout). Layouts: 'linear' (transpose), 'vector', 'patch_conv', 'conv1x1',
# 'row_table' (in_context_posemb: drop the leading 1), 'same'.
def _rules(cfg: model_lib.JiTConfig) -> list[tuple[str, tuple, str]]:
    def linear(torch_name, path, bias=True):
        out = [(f'{torch_name}.weight', (*path, 'kernel'), 'linear')]
        return out + ([(f'{torch_name}.bias', (*path, 'bias'), 'vector')] if bias else [])

    rules = linear('t_embedder.mlp.0', ('t_embedder', 'mlp0')) + linear('t_embedder.mlp.2', ('t_embedder', 'mlp2'))
    rules += [('y_embedder.embedding_table.weight', ('y_embedder', 'embedding'), 'same'),
              ('x_embedder.proj1.weight', ('x_embedder', 'proj1', 'kernel'), 'patch_conv'),
              ('x_embedder.proj2.weight', ('x_embedder', 'proj2', 'kernel'), 'conv1x1'),
              ('x_embedder.proj2.bias', ('x_embedder', 'proj2', 'bias'), 'vector')]
    if cfg.in_context_len:
        rules.append(('in_context_posemb', ('in_context_posemb',), 'row_table'))
    for i in range(cfg.depth):
        t, p = f'blocks.{i}', ('blocks', i)
        rules += [(f'{t}.norm1.weight', (*p, 'norm1', 'weight'), 'vector'),
                  (f'{t}.norm2.weight', (*p, 'norm2', 'weight'), 'vector'),
                  (f'{t}.attn.q_norm.weight', (*p, 'attn', 'q_norm', 'weight'), 'vector'),
                  (f'{t}.attn.k_norm.weight', (*p, 'attn', 'k_norm', 'weight'), 'vector')]
        rules += linear(f'{t}.attn.qkv', (*p, 'attn', 'qkv')) + linear(f'{t}.attn.proj', (*p, 'attn', 'proj'))
        rules += linear(f'{t}.mlp.w12', (*p, 'mlp', 'w12')) + linear(f'{t}.mlp.w3', (*p, 'mlp', 'w3'))
        rules += linear(f'{t}.adaLN_modulation.1', (*p, 'adaLN_modulation'))
    rules += [('final_layer.norm_final.weight', ('final_layer', 'norm_final', 'weight'), 'vector')]
    rules += linear('final_layer.adaLN_modulation.1', ('final_layer', 'adaLN_modulation'))
    rules += linear('final_layer.linear', ('final_layer', 'linear'))
    return rules


def _to_jax(w: np.ndarray, layout: str, cfg: model_lib.JiTConfig) -> np.ndarray:
    if layout == 'linear':
        return w.T
    if layout == 'patch_conv':  # (bottleneck, c, kh, kw) -> (kh*kw*c, bottleneck)
        return w.transpose(2, 3, 1, 0).reshape(cfg.patch_dim, -1)
    if layout == 'conv1x1':  # (d, bottleneck, 1, 1) -> (bottleneck, d)
        return w[:, :, 0, 0].T
    if layout == 'row_table':
        return w[0]
    return w


def _to_torch(w: np.ndarray, layout: str, cfg: model_lib.JiTConfig) -> np.ndarray:
    if layout == 'linear':
        return w.T
    if layout == 'patch_conv':
        p, c = cfg.patch_size, cfg.in_channels
        return w.reshape(p, p, c, -1).transpose(3, 2, 0, 1)
    if layout == 'conv1x1':
        return w.T[:, :, None, None]
    if layout == 'row_table':
        return w[None]
    return w


def _torch_shape(shape: tuple, layout: str, cfg: model_lib.JiTConfig) -> tuple:
    return _to_torch(np.empty(shape, np.float32), layout, cfg).shape


def strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Drop the `net.` prefix the official training code's Denoiser puts on every network weight."""
    names = list(state_dict)
    if names and all(n.startswith('net.') for n in names):
        return {n[len('net.'):]: np.asarray(v) for n, v in state_dict.items()}
    return {n: np.asarray(v) for n, v in state_dict.items()}


def _few(names: list[str], limit: int = 8) -> str:
    return str(names) if len(names) <= limit else f'{names[:limit]} and {len(names) - limit} more'


def params_from_torch(state_dict: Mapping[str, Any], cfg: model_lib.JiTConfig) -> dict[tuple, np.ndarray]:
    """Flat {our path: array} in the unscanned layout, after checking names and shapes against `cfg`."""
    weights = strip_prefix(state_dict)
    abstract = nnx.eval_shape(lambda: model_lib.JiT(dataclasses.replace(cfg, scan_blocks=False), rngs=nnx.Rngs(0)))
    shapes = {path: v.shape for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    rules = _rules(cfg)
    expected = {name for name, _, _ in rules} | {'pos_embed'}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise KeyError(f'state_dict does not match the JiT config {cfg}: missing keys {_few(missing)}, '
                       f'unexpected keys {_few(unexpected)}')
    want = (1, cfg.num_patches, cfg.hidden_size)
    if weights['pos_embed'].shape != want:
        raise ValueError(f"state_dict['pos_embed'] has shape {weights['pos_embed'].shape}; expected {want}")
    flat = {}
    for name, path, layout in rules:
        torch_shape = _torch_shape(shapes[path], layout, cfg)
        if weights[name].shape != torch_shape:
            raise ValueError(f'state_dict[{name!r}] has shape {weights[name].shape}; expected {torch_shape} '
                             f'for the JiT config {cfg}')
        flat[path] = _to_jax(weights[name].astype(np.float32), layout, cfg)
    return flat


def params_to_torch(flat: Mapping[tuple, Any], cfg: model_lib.JiTConfig) -> dict[str, np.ndarray]:
    """Our flat unscanned parameters (or gradients) under the official names and layouts (no pos_embed)."""
    return {name: _to_torch(np.asarray(flat[path]), layout, cfg) for name, path, layout in _rules(cfg)}


def _stack_blocks(flat: dict[tuple, np.ndarray], depth: int) -> dict[tuple, np.ndarray]:
    """Unscanned ('blocks', i, ...) entries -> scanned ('blocks', ...) entries stacked over depth."""
    out = {p: v for p, v in flat.items() if p[0] != 'blocks'}
    for path in {p[2:] for p in flat if p[0] == 'blocks'}:
        out[('blocks', *path)] = np.stack([flat[('blocks', i, *path)] for i in range(depth)])
    return out


def model_from_params(flat: Mapping[tuple, Any], cfg: model_lib.JiTConfig) -> model_lib.JiT:
    """An NNX JiT holding `flat` (unscanned layout, float32) cast to the config's parameter dtype."""
    if cfg.scan_blocks:
        flat = _stack_blocks(dict(flat), cfg.depth)
    abstract = nnx.eval_shape(lambda: model_lib.JiT(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    entries = []
    for path, var in nnx.to_flat_state(state):
        entries.append((path, var.replace(jax.numpy.asarray(flat[path], dtype=var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(entries))


def model_from_torch(state_dict: Mapping[str, Any], config: Mapping[str, Any] | model_lib.JiTConfig
                     ) -> model_lib.JiT:
    """The official network as an NNX JiT: `model(x_nhwc, t, y)` equals the official forward (in NHWC)."""
    cfg = config_from_torch(config)
    return model_from_params(params_from_torch(state_dict, cfg), cfg)


# ---------------------------------------------------------------------------------------------------------
# Command line: official .pth -> Orbax checkpoint.

_TORCH_CHECKPOINT_KEYS = {'model': 'params', 'model_ema1': 'ema1', 'model_ema2': 'ema2'}


def config_from_args(args: Any, preset: str | None) -> model_lib.JiTConfig:
    """Model config from the argparse namespace the official main_jit.py stores in its checkpoints."""
    get = (lambda k, d=None: getattr(args, k, d)) if args is not None and not isinstance(args, dict) else (
        lambda k, d=None: (args or {}).get(k, d))
    name = preset or get('model')
    if name is None:
        raise ValueError('the checkpoint stores no `args.model`; pass --preset (e.g. --preset JiT-B/16)')
    overrides = {}
    if get('img_size') is not None:
        overrides['input_size'] = int(get('img_size'))
    if get('class_num') is not None:
        overrides['num_classes'] = int(get('class_num'))
    for ours, theirs in (('attn_drop', 'attn_dropout'), ('proj_drop', 'proj_dropout')):
        if get(theirs) is not None:
            overrides[ours] = float(get(theirs))
    return model_lib.preset(name, **overrides)


def load_torch_checkpoint(path: pathlib.Path) -> dict:
    """torch.load of an official .pth (torch imported only here: it is needed for nothing else)."""
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise SystemExit('reading a PyTorch checkpoint needs torch: pip install torch (the CPU build is '
                         'enough)') from e
    if not path.is_file():
        raise FileNotFoundError(f'--torch-checkpoint {path}: no such file')
    return torch.load(path, map_location='cpu', weights_only=False)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, 'detach'):  # a torch tensor
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, np.float32)


def convert_checkpoint(blob: Mapping[str, Any], out: str | os.PathLike, preset: str | None = None, *,
                       model_config: model_lib.JiTConfig | None = None) -> list[str]:
    """Write `out` (local or gs://) as an Orbax checkpoint of an official checkpoint dict (as torch.load
    returns it).

    Items: `params` (from 'model'), `ema1` / `ema2` when present, and `meta` with the model config, so
    `load_converted` (and config.train.init_from) rebuild the network without being told its shape. A
    bare state_dict works too. model_config replaces what `args` / `preset` would give (a network that
    is no preset).
    """
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    from jit_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel

    if not any(k in blob for k in _TORCH_CHECKPOINT_KEYS):
        blob = {'model': blob}
    cfg = model_config or config_from_args(blob.get('args'), preset)
    items = {}
    for key, name in _TORCH_CHECKPOINT_KEYS.items():
        if key in blob:
            weights = {k: _to_numpy(v) for k, v in blob[key].items()}
            items[name] = nnx.to_pure_dict(nnx.state(model_from_torch(weights, cfg), nnx.Param))
    meta = {'model_config': dataclasses.asdict(cfg), 'epoch': int(blob['epoch']) if 'epoch' in blob else None}
    with ocp.CheckpointManager(ckpt_lib.as_path(out)) as manager:
        manager.save(0, args=ocp.args.Composite(
            **{k: ocp.args.StandardSave(v) for k, v in items.items()}, meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()
    return sorted(items)


def load_converted(directory: str | os.PathLike, which: str = 'ema1') -> model_lib.JiT:
    """The network stored by `convert_checkpoint` ('params', 'ema1' or 'ema2' weights)."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    from jit_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel

    with ocp.CheckpointManager(ckpt_lib.as_path(directory)) as manager:
        meta = manager.restore(0, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        cfg = model_lib.JiTConfig(**meta['model_config'])
        abstract = nnx.eval_shape(lambda: model_lib.JiT(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.to_pure_dict(state))
        if which not in manager.item_metadata(0):
            raise KeyError(f'{directory} holds no {which!r} weights; it has {sorted(manager.item_metadata(0))}')
        params = manager.restore(0, args=ocp.args.Composite(**{which: ocp.args.StandardRestore(target)}))[which]
    return nnx.merge(graphdef, params)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--torch-checkpoint', type=pathlib.Path, required=True)
    parser.add_argument('--out', required=True, help='output folder, local or gs://')
    parser.add_argument('--preset', default=None, help='e.g. JiT-B/16; default: args.model stored in the file')
    args = parser.parse_args(argv)
    written = convert_checkpoint(load_torch_checkpoint(args.torch_checkpoint), args.out, args.preset)
    print(json.dumps({'out': str(args.out), 'items': written}))


if __name__ == '__main__':
    main()
