"""python -m jit_jax.bench in smoke mode: every mode runs end to end and writes the fields it promises."""

import json
import math

import pytest

from jit_jax import bench, sampling


@pytest.mark.parametrize('mode', ('train', 'forward', 'sample'))
def test_smoke_run_writes_json(mode, tmp_path):
    path = tmp_path / f'{mode}.json'
    returned = bench.main([mode, '--smoke', '--json', str(path)])
    result = json.loads(path.read_text())
    assert result['mode'] == mode and result == json.loads(json.dumps(returned))
    step = result['step']
    assert len(step['runs_s']) == 3 and step['min_s'] <= step['median_s'] <= step['max_s']
    assert result['compile_s'] > 0 and result['images_per_s'] > 0 and result['tokens_per_s'] > 0
    macs = result['forward_macs_per_image']
    forwards = {'train': 3 * 2, 'forward': 2, 'sample': None}[mode]
    if forwards is not None:
        assert result['flops_per_step'] == forwards * macs * result['batch_size']
    assert result['xla_cost']['flops'] > 0
    peak = result['peak_matmul']['flops_per_s']
    assert math.isclose(result['utilisation'], result['achieved_flops_per_s_per_device'] / peak)
    memory = result['memory']
    assert memory['peak_bytes'] > 0 and memory['host_max_rss_bytes'] > 0
    assert 'device_peak_bytes_in_use' in memory  # None on CPU: the client keeps no allocator statistics
    assert set(result['load_avg_1min']) == {'start', 'end'}
    if mode == 'sample':
        s = result['sampler']
        # Heun 4 steps = 7 evaluations; CFG on (0.1, 1) leaves only t = 0 unguided: 6 x 2B + 1 x B rows.
        assert s['evaluations'] == 7 and s['official_image_forwards'] == 2 * 7 * result['batch_size']
        assert s['image_forwards'] == (6 * 2 + 1) * result['batch_size']
        assert result['flops_per_step'] == 2 * macs * s['image_forwards']


def test_eval_smoke_reports_the_loop_against_its_bounds(tmp_path):
    """bench eval: the evaluation loop (sampling + Inception + PNGs) next to sampling alone and the forward bound."""
    path = tmp_path / 'eval.json'
    result = bench.main(['eval', '--smoke', '--json', str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(result)) and result['mode'] == 'eval'
    for key in ('eval_loop_images_per_s', 'sampling_only_images_per_s', 'pure_forward_upper_bound_images_per_s',
                'inception_images_per_s'):
        assert result[key] > 0, key
    assert 0 <= result['eval_loop_host_share'] < 1
    assert result['eval_loop_images_per_s'] <= result['sampling_only_images_per_s']  # the loop adds work
    assert math.isclose(result['eval_loop_vs_upper_bound'],
                        result['eval_loop_images_per_s'] / result['pure_forward_upper_bound_images_per_s'])
    # Heun 4 steps with CFG on (0.1, 1): 6 guided evaluations (2 rows each) and 1 unguided per image.
    assert result['forwards_per_image'] == 6 * 2 + 1


def test_forward_count_of_the_paper_sampler():
    """Heun 50 with CFG 3.0 on (0.1, 1): 99 evaluations, 11 at t <= 0.1 skip the unconditional pass."""
    spec = sampling.SamplerSpec(method='heun', num_steps=50, cfg_scale=3.0, interval_min=0.1, interval_max=1.0)
    assert bench.forwards_run(spec, 1, skip_uncond=True) == (99, 187, 198)
    assert bench.forwards_run(spec, 1, skip_uncond=False) == (99, 198, 198)
    no_cfg = sampling.SamplerSpec(method='euler', num_steps=10, cfg_scale=1.0)
    assert bench.forwards_run(no_cfg, 2, skip_uncond=True) == (10, 20, 40)


def test_table_and_errors():
    args = bench.parse_args(['forward'])
    assert args.batch_size == 4 and args.model == 'JiT-B/16'
    with pytest.raises(FileNotFoundError, match='--config nowhere.py'):
        bench.build_config(bench.parse_args(['train', '--config', 'nowhere.py']))
