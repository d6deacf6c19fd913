"""launch/colab.ipynb runs top to bottom (nbclient, a real IPython kernel) against this checkout.

The notebook is executed as Colab would run it, with a papermill-style cell after its `parameters` cell
that points JIT_JAX_SOURCE at this checkout, turns the pip step off and shrinks the demo (a 2-block width-32
JiT, 8 steps at batch 8, 2 Heun steps). An official checkpoint is stood in for by a tiny random network
written with jit_jax.convert.convert_checkpoint (torch is not needed for that), so the sampling section runs
too. Extra cells at the end rerun three cells under conditions that must be refused or skipped.
"""

import base64
import io
import json
import pathlib
import re

import nbformat
import numpy as np
from flax import nnx
from nbclient import NotebookClient
from PIL import Image

from jit_jax import config_lib, convert
from jit_jax import model as model_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / 'launch' / 'colab.ipynb'
STEPS = 8
TINY = ('hidden=32,depth=2,heads=2,bottleneck=16,ctx_len=2,ctx_start=1,batch=8,sampling_steps=2,'
        'sampler.num_images=10,data.read_threads=1,eval.classifier=,train.log_every_steps=1')
SUMMARY = 'NOTEBOOK_SUMMARY '


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == 'code']


def _cell(nb, needle: str):
    """The one code cell whose source contains `needle`."""
    found = [c for c in _code_cells(nb) if needle in c.source]
    assert len(found) == 1, f'{len(found)} cells of {NOTEBOOK} contain {needle!r}'
    return found[0]


def _parameters(nb):
    """The settings cell (tagged 'parameters', as papermill expects it)."""
    found = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
    assert len(found) == 1, f'{NOTEBOOK} has {len(found)} cells tagged parameters'
    return found[0]


def _png_outputs(cell) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(o['data']['image/png']))))
            for o in cell.outputs if o.get('output_type') in ('display_data', 'execute_result')
            and 'image/png' in o.get('data', {})]


def _text(cell) -> str:
    return ''.join(o.get('text', '') for o in cell.outputs if o.get('output_type') == 'stream')


def _timings(nb) -> list[float]:
    """Wall seconds per executed code cell, from nbclient's execution metadata."""
    import datetime  # pylint: disable=import-outside-toplevel

    def at(cell, key):
        return datetime.datetime.fromisoformat(cell.metadata.execution[key].replace('Z', '+00:00'))

    return [round((at(c, 'shell.execute_reply') - at(c, 'iopub.status.busy')).total_seconds(), 1)
            for c in _code_cells(nb) if 'execution' in c.metadata]


def _fake_official_checkpoint(out: pathlib.Path, spec: str) -> None:
    """A converted 'official' checkpoint of the network `spec` describes (random weights)."""
    model_config = config_lib.model_config(config_lib.load(spec))
    model = model_lib.JiT(model_config, rngs=nnx.Rngs(params=3))
    flat = {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    state_dict = convert.params_to_torch(flat, model_config)
    state_dict['pos_embed'] = np.zeros((1, model_config.num_patches, model_config.hidden_size), np.float32)
    assert convert.convert_checkpoint({'model': state_dict, 'model_ema1': state_dict}, out,
                                      model_config=model_config) == ['ema1', 'params']


def test_notebook_is_stored_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in _code_cells(nb):
        assert cell.outputs == [] and cell.execution_count is None, f'{NOTEBOOK} is stored with outputs'
    assert len(_parameters(nb).source.split('JIT_JAX_SOURCE = ')) == 2  # set once, in the settings cell


def test_notebook_runs_against_the_checkout(tmp_path, monkeypatch):
    # The kernel gets one CPU device and no TPU probing (conftest sets 8 fake devices and TPU variables).
    for name in ('XLA_FLAGS', 'TPU_ACCELERATOR_TYPE', 'TPU_WORKER_ID', 'TPU_WORKER_HOSTNAMES', 'PYTHONPATH'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
    official_spec = f'configs/default.py:{TINY}'
    _fake_official_checkpoint(tmp_path / 'official_jax', str(REPO / official_spec))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    parameters = _parameters(nb)
    train_cell, grid_cell, plot_cell, official_cell = (_cell(nb, k) for k in (
        'train_and_evaluate(config', "glob('step_*.png')", "'metrics.jsonl').read_text()", 'OFFICIAL_CHECKPOINT)'))
    overrides = nbformat.v4.new_code_cell(
        f'JIT_JAX_SOURCE = {str(REPO)!r}\nINSTALL = False\nDEMO_STEPS = {STEPS}\nDEMO_OVERRIDES = {TINY!r}\n'
        f"WORKDIR = {str(tmp_path / 'run')!r}\nOFFICIAL_CHECKPOINT = {str(tmp_path / 'official.pth')!r}\n"
        f'OFFICIAL_CONFIG = {official_spec!r}')
    nb.cells.insert(nb.cells.index(parameters) + 1, overrides)
    summary = nbformat.v4.new_code_cell(
        'import json, jit_jax\nprint(' + repr(SUMMARY) + ' + json.dumps({"accelerator": accelerator, '
        '"pip": PIP_INSTALL, "jit_jax": jit_jax.__file__, "num_steps": config.train.num_steps, '
        '"ema_decays": list(config.optim.ema_decays), "result": {k: v for k, v in result.items() '
        'if isinstance(v, (int, float))}, '
        '"kernel_cpu_s": sum(__import__("resource").getrusage(__import__("resource").RUSAGE_SELF)[:2])}))')

    def rerun(needle: str, setup: str, raises: bool = False):
        cell = nbformat.v4.new_code_cell(setup + '\n' + _cell(nb, needle).source)
        if raises:
            cell.metadata['tags'] = ['raises-exception']  # nbclient records the error and goes on
        return cell

    checks = [rerun('OFFICIAL_CHECKPOINT)', f"OFFICIAL_CHECKPOINT = {str(tmp_path / 'none.pth')!r}"),
              rerun('PLACEHOLDER =', "JIT_JAX_SOURCE = 'https://github.com/YOUR_ORG/jit_jax.git'", raises=True),
              rerun('CONFIG_SPEC =', "DEMO_OVERRIDES = 'ema=(0.999,0.9995)'", raises=True)]
    nb.cells += [summary, *checks]

    NotebookClient(nb, timeout=600, kernel_name='python3',
                   resources={'metadata': {'path': str(tmp_path)}}).execute()  # raises on any failing cell

    report = json.loads(_text(summary).split(SUMMARY, 1)[1])
    print(f"kernel CPU {report['kernel_cpu_s']:.1f} s; cell wall times (s):", _timings(nb))  # pytest -s
    assert pathlib.Path(report['jit_jax']).is_relative_to(REPO)  # the checkout, not an installed copy
    extra = {'tpu': ['jax[tpu]'], 'gpu': ['jax[cuda12]'], 'cpu': []}[report['accelerator']]
    # The pip step: the source plus the chip's JAX extra and nothing else (no --upgrade, no TensorFlow), so
    # whatever the runtime has installed that satisfies jit_jax's bounds stays as it is.
    assert report['pip'][1:] == ['-m', 'pip', 'install', '-q', str(REPO), *extra]
    # The demo's EMA follows its length (configs/default.py's rule), not the 1000-step default run.
    assert report['num_steps'] == STEPS
    np.testing.assert_allclose(report['ema_decays'], [STEPS / (STEPS + 4), STEPS / (STEPS + 8)], rtol=1e-6)

    # The training loop's log lines reach the notebook ('[step] ... loss=...', clu's or jit_jax's writer).
    assert re.search(rf'\[{STEPS}\] [^\n]*\bloss=', _text(train_cell)), _text(train_cell)[-2000:]
    # The final grid is shown: 10 samples of 32 px in one row of 10 class columns, 2 px padding, upscaled 2x.
    final = tmp_path / 'run' / 'samples' / f'step_{STEPS:07d}.png'
    shown = _png_outputs(grid_cell)
    assert len(shown) == 1 and np.array_equal(shown[0], np.asarray(Image.open(final)))
    assert shown[0].shape == (2 * (34 + 2), 2 * (10 * 34 + 2), 3)
    # The loss curve is drawn from metrics.jsonl, which has one finite loss per step (log_every_steps=1).
    rows = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    losses = [r['loss'] for r in rows if 'loss' in r]
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    assert report['result']['loss'] == losses[-1]
    plot = _png_outputs(plot_cell)
    assert len(plot) == 1 and plot[0].std() > 0
    # The 'official' network sampled 8 classes: a 2 x 4 grid of 32 px images upscaled 8x.
    official = _png_outputs(official_cell)
    assert len(official) == 1 and official[0].shape == (8 * (2 * 34 + 2), 8 * (4 * 34 + 2), 3)
    assert 'heun 2 steps' in _text(official_cell)

    skipped, placeholder, long_ema = checks
    assert 'skipped' in _text(skipped) and not _png_outputs(skipped)
    errors = {name: [o for o in cell.outputs if o['output_type'] == 'error']
              for name, cell in (('placeholder', placeholder), ('ema', long_ema))}
    assert errors['placeholder'][0]['ename'] == 'ValueError' and 'JIT_JAX_SOURCE' in errors['placeholder'][0]['evalue']
    assert errors['ema'][0]['ename'] == 'ValueError' and 'ema_decays' in errors['ema'][0]['evalue']
