"""The memory model against XLA's buffer assignment of the real compiled train step, and its own logic."""

import jax
import pytest

from jit_jax import bench, config_lib, memory, sharding

GIB = 2 ** 30


def _tiny(remat: str):
    """6 blocks, width 64, 64 px / patch 8 (66 tokens with 2 class tokens), batch 4: activations dominate."""
    config = bench.build_config(bench.parse_args(['train', '--smoke', '--batch-size', '4', '--remat', remat]))
    config.model.depth = 6
    config.data.image_size = 64
    return config


@pytest.mark.parametrize('remat', ['none', 'block', 'dots'])
def test_prediction_within_20_percent_of_compiled_peak(remat):
    config = _tiny(remat)
    measured = memory.measure_train_memory(config, sharding.make_mesh(config.mesh, devices=jax.devices()[:1]))
    predicted = memory.train_memory(config_lib.model_config(config), config.data.global_batch_size)
    ratio = predicted.total / measured['peak']
    print(f'remat {remat}: predicted {predicted.total / 2**20:.2f} MiB, measured {measured["peak"] / 2**20:.2f} MiB '
          f'(temp {measured["temp"] / 2**20:.2f}), ratio {ratio:.3f}')
    assert 0.8 <= ratio <= 1.2
    assert measured['alias'] > 0.9 * predicted.state, 'the donated state is updated in place'


@pytest.mark.parametrize('custom_vjp', ['on', 'off'])
def test_remat_block_lowers_the_compiled_peak_with_either_kernel_set(custom_vjp):
    """XLA:CPU (like XLA:GPU) would hoist a plain jax.checkpoint's recomputation into the forward pass and keep
    the peak; kernels._remat_late makes it wait for the backward, whichever kernels the blocks use."""
    peaks = {}
    for remat in ('none', 'block'):
        config = _tiny(remat)
        config.model.custom_vjp = custom_vjp
        mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
        peaks[remat] = memory.measure_train_memory(config, mesh)['peak']
    assert peaks['block'] < 0.75 * peaks['none'], peaks


def test_remat_and_fsdp_shrink_what_they_should():
    base = memory.train_memory('JiT-L/16', 64, dtype='bfloat16')
    block = memory.train_memory('JiT-L/16', 64, dtype='bfloat16', remat='block')
    dots = memory.train_memory('JiT-L/16', 64, dtype='bfloat16', remat='dots')
    assert block.activations < dots.activations < base.activations
    assert block.state == base.state
    sharded = memory.train_memory('JiT-L/16', 64 * 8, fsdp=8, param_sharding='fsdp', dtype='bfloat16')
    assert sharded.per_device_batch == 64
    assert 7.5 < base.params / sharded.params <= 8, 'large arrays split 8 ways, small ones stay whole'
    fp32 = memory.train_memory('JiT-L/16', 64, dtype='float32')
    assert fp32.activations > 1.5 * base.activations


def test_max_batch_is_the_largest_that_fits():
    budget = 32 * GIB
    best = memory.max_batch('JiT-B/16', budget, dtype='bfloat16')
    assert best > 0
    assert memory.train_memory('JiT-B/16', best, dtype='bfloat16').total <= 0.9 * budget
    assert memory.train_memory('JiT-B/16', best + 1, dtype='bfloat16').total > 0.9 * budget
    assert memory.max_batch('JiT-G/16', 16 * GIB, dtype='bfloat16') == 0, 'G state alone exceeds 16 GiB replicated'


def test_bad_layout_is_rejected():
    with pytest.raises(ValueError, match='does not split'):
        memory.train_memory('JiT-B/16', 10, data=4)
    with pytest.raises(ValueError, match='param_sharding'):
        memory.train_memory('JiT-B/16', 8, param_sharding='zero')
