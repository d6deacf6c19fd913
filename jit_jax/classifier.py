"""A tiny CNN that names the shape class of a procedural image: the judge of class-conditional samples.

    python -m jit_jax.classifier --out runs/shapes_classifier.msgpack      # trains, tests, saves (< 1 min)

Why: "the samples look like their classes" should be a number, not an impression. The procedural data
(jit_jax.data.synthetic) has an exact label for every image, so a classifier trained on it, and checked
on held-out procedural images, scores how often a sample of class c is recognised as class c. That is
the `sample_class_accuracy` a training run logs (jit_jax.class_accuracy) and the figure docs/demo.md reports.

The network folds 2x2 pixel blocks into channels (32 px -> 16 x 16 x 12: XLA's CPU convolutions are
slow on 3-channel full-resolution inputs), then three 3x3 conv stages (32, 64, 128 channels, 2x2 max
pooling between them; average pooling reached only ~91%), a global average pool and a linear layer:
about 37 s of training on 2 idle CPU cores for ~99% held-out accuracy. Rotation, colour and position
are learnt from the data (they are random latents of every image).
Training images get a little Gaussian pixel noise, so slight sampler noise does not flip a label.
Saved as one msgpack file: the architecture fields and the parameters (flax.serialization).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx, serialization

from jit_jax.data import synthetic

FORMAT = 'jit_jax.classifier/1'
# Procedural seeds of the classifier's own data, distinct from the diffusion training set (seed 0).
TRAIN_SEED, TEST_SEED = 1001, 1002


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    image_size: int = 32
    num_classes: int = synthetic.NUM_SHAPES
    channels: tuple[int, ...] = (32, 64, 128)
    fold: int = 2  # pixel blocks folded into channels before the first conv

    def __post_init__(self):
        multiple = self.fold * 2 ** (len(self.channels) - 1)
        if self.image_size % multiple:
            raise ValueError(f'ClassifierConfig.image_size={self.image_size}: expected a multiple of {multiple} '
                             '(the pixel fold, then one 2x2 pooling between conv stages)')


class ShapeClassifier(nnx.Module):
    """uint8 or [-1, 1] images [b, h, w, 3] -> logits [b, num_classes]."""

    def __init__(self, config: ClassifierConfig, *, rngs: nnx.Rngs):
        self.config = config
        widths = (3 * config.fold ** 2, *config.channels)
        self.convs = nnx.List([nnx.Conv(a, b, (3, 3), rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.head = nnx.Linear(widths[-1], config.num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        f = self.config.fold
        x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // f, w // f, f * f * c)
        for i, conv in enumerate(self.convs):
            if i:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
            x = nnx.relu(conv(x))
        return self.head(x.mean(axis=(1, 2)))


def to_input(images: np.ndarray | jax.Array) -> jax.Array:
    """uint8 [0, 255] pixels -> float32 [-1, 1], the scale the diffusion model works in."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def render(num: int, image_size: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """num procedural images (uint8) and labels, balanced over classes."""
    source = synthetic.SyntheticShapes(num_examples=num, image_size=image_size, num_classes=num_classes,
                                       seed=seed)
    examples = [source[i] for i in range(num)]
    return np.stack([e['image'] for e in examples]), np.array([e['label'] for e in examples], np.int32)


def predict(model: ShapeClassifier, images: np.ndarray | jax.Array, batch_size: int = 500) -> np.ndarray:
    """Class labels int32 [b] of uint8 images [b, h, w, 3]."""
    want = (model.config.image_size, model.config.image_size, 3)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f'classifier expects images [b, {want[0]}, {want[1]}, 3] (it was trained at '
                         f'{model.config.image_size} px), got shape {tuple(images.shape)}')
    logits = [_logits(model, to_input(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.asarray(jnp.argmax(jnp.concatenate(logits), axis=-1), np.int32)


@nnx.jit
def _logits(model: ShapeClassifier, x: jax.Array) -> jax.Array:
    return model(x)


def accuracy(model: ShapeClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predict(model, images) == np.asarray(labels)))


def train(config: ClassifierConfig = ClassifierConfig(), *, num_train: int = 20_000, num_test: int = 2_000,
          steps: int = 2500, batch_size: int = 64, lr: float = 3e-3, noise_std: float = 0.03, seed: int = 0,
          log_every: int = 250) -> tuple[ShapeClassifier, float]:
    """Train on num_train procedural images; returns the model and its held-out accuracy (num_test images).

    AdamW with a cosine decay over `steps`; each step draws a batch from the pre-rendered set (rendering
    every step would cost more than the step itself).
    """
    start = time.time()
    x_train, y_train = render(num_train, config.image_size, config.num_classes, TRAIN_SEED)
    x_test, y_test = render(num_test, config.image_size, config.num_classes, TEST_SEED)
    print(f'rendered {num_train} + {num_test} images in {time.time() - start:.1f} s', flush=True)

    model = ShapeClassifier(config, rngs=nnx.Rngs(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=1e-4), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y, key):
        x = to_input(x) + noise_std * jax.random.normal(key, x.shape)

        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    tic = time.time()
    for i in range(steps):
        idx = rng.integers(0, num_train, batch_size)
        loss = step(model, optimizer, x_train[idx], y_train[idx], jax.random.fold_in(key, i))
        if (i + 1) % log_every == 0 or i + 1 == steps:
            rate = (i + 1) / (time.time() - tic)
            print(f'step {i + 1}/{steps}  loss {float(loss):.4f}  {rate:.1f} steps/s  '
                  f'ETA {(steps - i - 1) / rate:.0f} s', flush=True)
    return model, accuracy(model, x_test, y_test)


def save(model: ShapeClassifier, path: str | epath.Path, test_accuracy: float) -> epath.Path:
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = dataclasses.asdict(model.config)
    fields['channels'] = ','.join(map(str, model.config.channels))  # msgpack has no tuples
    record = {'format': FORMAT, 'config': fields, 'test_accuracy': test_accuracy,
              'params': nnx.to_pure_dict(nnx.state(model, nnx.Param))}
    path.write_bytes(serialization.msgpack_serialize(jax.device_get(record)))
    return path


def load(path: str | epath.Path) -> ShapeClassifier:
    """The classifier saved at `path` by `save` (or `python -m jit_jax.classifier --out path`)."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f'no classifier at {path}: train one with python -m jit_jax.classifier --out {path}')
    record = serialization.msgpack_restore(path.read_bytes())
    if not isinstance(record, dict) or record.get('format') != FORMAT:
        raise ValueError(f'{path} is not a jit_jax classifier file (expected format {FORMAT!r})')
    fields = dict(record['config'])
    fields['channels'] = tuple(int(c) for c in fields['channels'].split(','))
    model = ShapeClassifier(ClassifierConfig(**fields), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, record['params'])
    nnx.update(model, state)
    return model


def load_or_train(path: str | epath.Path, image_size: int, num_classes: int) -> ShapeClassifier:
    """Load the classifier at `path`, training and saving it first when there is none (< 1 minute)."""
    path = epath.Path(path).expanduser()
    if not path.exists():
        print(f'no classifier at {path}: training one (under a minute on 2 cores)', flush=True)
        model, test_accuracy = train(ClassifierConfig(image_size=image_size, num_classes=num_classes))
        save(model, path, test_accuracy)
        print(f'classifier held-out accuracy {test_accuracy:.4f}, saved to {path}', flush=True)
    model = load(path)
    if (model.config.image_size, model.config.num_classes) != (image_size, num_classes):
        raise ValueError(f'classifier {path} was trained on {model.config.image_size} px, '
                         f'{model.config.num_classes} classes; the run has {image_size} px, {num_classes} classes '
                         '(config.data.image_size / num_classes): point config.eval.classifier at another file')
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', required=True, help='file to write (msgpack); local path or gs://...')
    parser.add_argument('--image-size', type=int, default=32)
    parser.add_argument('--num-classes', type=int, default=synthetic.NUM_SHAPES)
    parser.add_argument('--steps', type=int, default=2500)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    start = time.time()
    model, test_accuracy = train(ClassifierConfig(image_size=args.image_size, num_classes=args.num_classes),
                                 steps=args.steps, seed=args.seed)
    path = save(model, args.out, test_accuracy)
    print(json.dumps({'test_accuracy': round(test_accuracy, 4), 'out': str(path),
                      'wall_s': round(time.time() - start, 1)}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
