"""A training hook that scores class-conditional samples with the shape classifier (jit_jax.classifier).

`SampleClassAccuracy` follows the clu periodic-action protocol that train.train_and_evaluate calls after
every step, hook(step, trainer=..., state=..., writer=...). Every `every_steps` steps and at the last step
it samples `num_images` images (the classes in turn, a fixed noise seed) from the weights the sampler uses
(config.sampler.ema, the EMA by default), labels them with the classifier and logs
`sample_class_accuracy`: the fraction recognised as the class they were conditioned on. Per-class
accuracies go to the log too, so a class the model has not learnt is named.

jit_jax.main adds the hook when config.eval.classifier is set; `result` holds the last figures for the
run's final report.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from absl import logging
from ml_collections import config_dict

from jit_jax import classifier as classifier_lib
from jit_jax.data import synthetic


class SampleClassAccuracy:
    """hook(step, *, trainer, state, writer): log sample_class_accuracy every n steps and at the end."""

    def __init__(self, model: classifier_lib.ShapeClassifier, *, num_images: int, num_steps: int,
                 every_steps: int = 0, seed: int = 1):
        self.model = model
        self.num_images = num_images
        self.num_steps = num_steps
        self.every_steps = every_steps
        self.seed = seed
        self.result: dict[str, Any] = {}

    @classmethod
    def from_config(cls, config: config_dict.ConfigDict) -> SampleClassAccuracy:
        model = classifier_lib.load_or_train(config.eval.classifier, config.data.image_size,
                                             config.data.num_classes)
        return cls(model, num_images=config.eval.classifier_num_images, num_steps=config.train.num_steps,
                   every_steps=config.eval.classifier_every_steps, seed=config.eval.classifier_seed)

    def __call__(self, step: int, *, trainer: Any, state: dict, writer: Any = None, **_) -> None:
        if not (step == self.num_steps or (self.every_steps and step % self.every_steps == 0)):
            return
        labels = np.arange(self.num_images, dtype=np.int32) % trainer.model_config.num_classes
        samples = trainer.sample_images(state, labels, self.seed)
        self.result = {'step': step, **self.score(samples, labels)}
        per_class = '  '.join(f'{name} {acc:.2f}' for name, acc in self.result['per_class'].items())
        logging.info('step %d: sample_class_accuracy %.4f over %d samples (%s)', step,
                     self.result['sample_class_accuracy'], self.num_images, per_class)
        if writer is not None:
            writer.write_scalars(step, {'sample_class_accuracy': self.result['sample_class_accuracy']})

    def score(self, samples: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        """Overall and per-class fraction of `samples` the classifier assigns to their `labels`."""
        predicted = classifier_lib.predict(self.model, samples)
        hit = predicted == labels
        names = synthetic.CLASS_NAMES
        per_class = {names[c] if c < len(names) else str(c): float(hit[labels == c].mean())
                     for c in np.unique(labels)}
        return {'sample_class_accuracy': float(hit.mean()), 'per_class': per_class}
