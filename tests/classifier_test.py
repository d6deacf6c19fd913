"""The shape classifier and the sample-class-accuracy hook: it learns the shapes, saves, scores, logs."""

import json
import pathlib
import types

import numpy as np
import pytest

from jit_jax import class_accuracy, classifier, config_lib, train, writers

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 16  # 16 px keeps training to seconds; the default run's classifier is the same network at 32 px


@pytest.fixture(scope='module')
def small_classifier(tmp_path_factory):
    model, test_accuracy = classifier.train(classifier.ClassifierConfig(image_size=SIZE), num_train=3000,
                                            num_test=500, steps=400, log_every=400)
    path = classifier.save(model, tmp_path_factory.mktemp('clf') / 'clf.msgpack', test_accuracy)
    return model, test_accuracy, path


def test_classifier_learns_the_shapes_and_round_trips(small_classifier):
    model, test_accuracy, path = small_classifier
    assert test_accuracy > 0.6  # chance is 0.1; the full 32 px recipe reaches ~0.99
    images, labels = classifier.render(200, SIZE, 10, seed=7)
    loaded = classifier.load(path)
    np.testing.assert_array_equal(classifier.predict(loaded, images), classifier.predict(model, images))
    assert classifier.accuracy(loaded, images, labels) == pytest.approx(classifier.accuracy(model, images, labels))


def test_classifier_errors_name_the_problem(small_classifier, tmp_path):
    model, _, path = small_classifier
    with pytest.raises(ValueError, match='trained at 16 px'):
        classifier.predict(model, np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match='python -m jit_jax.classifier --out'):
        classifier.load(tmp_path / 'missing.msgpack')
    (tmp_path / 'junk').write_bytes(b'\x81\xa1a\x01')
    with pytest.raises(ValueError, match='not a jit_jax classifier'):
        classifier.load(tmp_path / 'junk')
    with pytest.raises(ValueError, match='config.data.image_size'):
        classifier.load_or_train(path, 32, 10)
    with pytest.raises(ValueError, match='image_size=30'):
        classifier.ClassifierConfig(image_size=30)


class _Recorder:
    def __init__(self):
        self.scalars = []

    def write_scalars(self, step, scalars):
        self.scalars.append((step, dict(scalars)))


def test_hook_scores_samples_at_its_steps(small_classifier):
    """A fake trainer that 'samples' real procedural images (or mislabelled ones) gets scored right."""
    model, _, _ = small_classifier

    def trainer(wrong: bool):
        def sample_images(state, labels, seed):  # pylint: disable=unused-argument
            shown = (labels + 1) % 10 if wrong else labels
            return np.stack([classifier.render(10, SIZE, 10, seed=50 + i)[0][c] for i, c in enumerate(shown)])
        return types.SimpleNamespace(model_config=types.SimpleNamespace(num_classes=10), sample_images=sample_images)

    hook = class_accuracy.SampleClassAccuracy(model, num_images=60, num_steps=10, every_steps=4)
    writer = _Recorder()
    for step in range(1, 11):
        hook(step, trainer=trainer(False), state=None, writer=writer)
    assert [s for s, _ in writer.scalars] == [4, 8, 10]
    right = hook.result['sample_class_accuracy']
    assert right > 0.6 and set(hook.result['per_class']) == set(classifier.synthetic.CLASS_NAMES)
    hook(10, trainer=trainer(True), state=None, writer=writer)
    assert hook.result['sample_class_accuracy'] < right - 0.3


def test_train_and_evaluate_gives_hooks_the_writer(small_classifier, tmp_path):
    """The real loop: the hook samples from the trainer's EMA weights and logs through the run's writer."""
    _, _, path = small_classifier
    config = config_lib.load(f"{REPO / 'configs' / 'default.py'}:hidden=32,depth=2,heads=2,bottleneck=8,"
                             f'ctx_len=2,ctx_start=1,img_size={SIZE},batch=8,sampling_steps=2,steps=2,'
                             f'eval.classifier={path},eval.classifier_num_images=10')
    config.unlock()
    config.train.sample_every_steps = 0
    config.data.read_threads = 1
    hook = class_accuracy.SampleClassAccuracy.from_config(config)
    result = train.train_and_evaluate(config, tmp_path, hooks=[hook])
    assert hook.result['step'] == 2 and 0.0 <= hook.result['sample_class_accuracy'] <= 1.0
    lines = [json.loads(line) for line in (tmp_path / writers.METRICS_FILE).read_text().splitlines()]
    assert {'step': 2, 'sample_class_accuracy': hook.result['sample_class_accuracy']} in lines
    assert any('loss' in line for line in lines) and np.isfinite(result['loss'])


def test_classifier_needs_procedural_data():
    with pytest.raises(ValueError, match='config.eval.classifier'):
        config_lib.load(f"{REPO / 'configs' / 'default.py'}:source=arrayrecord,data.data_dir=/x")
