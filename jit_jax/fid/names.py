"""torchvision weight names (torch-fidelity, pytorch-fid) <-> the TorchScript archive's (= jit_jax's) names.

Standard library only, so tests/golden/fid/make_reference.py can use the same table under torch.
"""

from __future__ import annotations

# torchvision / torch-fidelity / pytorch-fid names -> archive (= our) names.
_STEM = {'Conv2d_1a_3x3': 'conv', 'Conv2d_2a_3x3': 'conv_1', 'Conv2d_2b_3x3': 'conv_2',
         'Conv2d_3b_1x1': 'conv_3', 'Conv2d_4a_3x3': 'conv_4'}
_BLOCKS = {'Mixed_5b': ('mixed', 'A'), 'Mixed_5c': ('mixed_1', 'A'), 'Mixed_5d': ('mixed_2', 'A'),
           'Mixed_6a': ('mixed_3', 'B'), 'Mixed_6b': ('mixed_4', 'C'), 'Mixed_6c': ('mixed_5', 'C'),
           'Mixed_6d': ('mixed_6', 'C'), 'Mixed_6e': ('mixed_7', 'C'), 'Mixed_7a': ('mixed_8', 'D'),
           'Mixed_7b': ('mixed_9', 'E'), 'Mixed_7c': ('mixed_10', 'E')}
_BRANCHES = {
    'A': {'branch1x1': 'conv', 'branch5x5_1': 'tower.conv', 'branch5x5_2': 'tower.conv_1',
          'branch3x3dbl_1': 'tower_1.conv', 'branch3x3dbl_2': 'tower_1.conv_1',
          'branch3x3dbl_3': 'tower_1.conv_2', 'branch_pool': 'tower_2.conv'},
    'B': {'branch3x3': 'conv', 'branch3x3dbl_1': 'tower.conv', 'branch3x3dbl_2': 'tower.conv_1',
          'branch3x3dbl_3': 'tower.conv_2'},
    'C': {'branch1x1': 'conv', 'branch7x7_1': 'tower.conv', 'branch7x7_2': 'tower.conv_1',
          'branch7x7_3': 'tower.conv_2', 'branch_pool': 'tower_2.conv',
          **{f'branch7x7dbl_{i + 1}': 'tower_1.conv' + (f'_{i}' if i else '') for i in range(5)}},
    'D': {'branch3x3_1': 'tower.conv', 'branch3x3_2': 'tower.conv_1',
          **{f'branch7x7x3_{i + 1}': 'tower_1.conv' + (f'_{i}' if i else '') for i in range(4)}},
    'E': {'branch1x1': 'conv', 'branch3x3_1': 'tower_conv', 'branch3x3_2a': 'tower_mixed_conv',
          'branch3x3_2b': 'tower_mixed_conv_1', 'branch3x3dbl_1': 'tower_1_conv',
          'branch3x3dbl_2': 'tower_1_conv_1', 'branch3x3dbl_3a': 'tower_1_mixed_conv',
          'branch3x3dbl_3b': 'tower_1_mixed_conv_1', 'branch_pool': 'tower_2_conv'},
}
_BN = {'bn.weight': 'gamma', 'bn.bias': 'beta', 'bn.running_mean': 'mean', 'bn.running_var': 'var',
       'conv.weight': 'weight'}


def torchvision_name(name: str) -> str | None:
    """'Mixed_7b.branch3x3_2a.bn.running_var' -> 'mixed_9.tower_mixed_conv.var'; None = not a weight we use."""
    if name.endswith('num_batches_tracked') or name.startswith('AuxLogits.'):
        return None
    if name in ('fc.weight', 'fc.bias'):
        return {'fc.weight': 'fc.kernel', 'fc.bias': 'fc.bias'}[name]
    head, _, rest = name.partition('.')
    if head in _STEM:
        layer, tail = _STEM[head], rest
    elif head in _BLOCKS:
        block, kind = _BLOCKS[head]
        branch, _, tail = rest.partition('.')
        if branch not in _BRANCHES[kind]:
            raise ValueError(f'unknown Inception weight {name!r}')
        layer = f'{block}.{_BRANCHES[kind][branch]}'
    else:
        raise ValueError(f'unknown Inception weight {name!r}: expected torchvision names (Conv2d_1a_3x3.*, '
                         'Mixed_5b.*, fc.*) as in torch-fidelity / pytorch-fid files')
    if tail not in _BN:
        raise ValueError(f'unknown Inception weight {name!r}')
    return f'{layer}.{_BN[tail]}'


def torchvision_names() -> list[str]:
    """Every weight name of a torch-fidelity / pytorch-fid state dict (num_batches_tracked left out)."""
    layers = list(_STEM)
    for block, (_, kind) in _BLOCKS.items():
        layers += [f'{block}.{branch}' for branch in _BRANCHES[kind]]
    return [f'{layer}.{tail}' for layer in layers for tail in ('conv.weight', 'bn.weight', 'bn.bias',
                                                               'bn.running_mean', 'bn.running_var')] + \
        ['fc.weight', 'fc.bias']
