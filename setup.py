"""jit_jax: JiT pixel-space diffusion in JAX / Flax NNX.

Version bounds are the stack verified together on Python 3.11 (see README, "Dependencies").

TensorFlow is the optional extra `tf` (`pip install 'jit_jax[tf]'`), not a requirement: nothing on the
default path (procedural data, training, sampling, checkpoints) needs it. Two features do:
* TensorBoard event files: clu.metric_writers imports TensorFlow and TensorBoard at import time, so
  without them jit_jax.writers logs to the console and <workdir>/metrics.jsonl instead (and says so);
* preparing ImageNet with TFDS (jit_jax.data.prepare --source tfds), which fails with a message naming
  the extra when TensorFlow is missing.
Requiring tensorflow-cpu cost 1.5 GB per install and clashed with the `tensorflow` build that Colab and
other images ship (both provide the same module); with the extra, such an image keeps its own TensorFlow.
jit_jax hides every accelerator from TensorFlow so JAX owns them.
"""

from setuptools import find_packages, setup

setup(
    name='jit_jax',
    version='0.1.0',
    description='JiT (Just image Transformers) pixel-space diffusion in JAX / Flax NNX',
    packages=find_packages(include=['jit_jax', 'jit_jax.*']),
    python_requires='>=3.11',
    install_requires=[
        'jax>=0.10.2,<0.11',
        'flax>=0.12.8,<0.13',
        'optax>=0.2.8,<0.3',
        'orbax-checkpoint>=0.12.8,<0.13',
        'grain>=0.2.18,<0.3',
        'tensorflow-datasets>=4.9.10,<5',
        'ml-collections>=1.1.0,<2',
        'clu>=0.0.12,<0.1',
        'numpy>=2.2,<3',
        'array-record>=0.8.6,<0.9',
        'msgpack>=1.1',
        'pillow>=11,<14',
        'importlib_resources',  # tfds 4.9.10 imports it in download_and_prepare without declaring it
    ],
    extras_require={
        'tf': ['tensorflow-cpu>=2.21,<2.22', 'tensorboard>=2.21,<2.22'],  # see the module docstring
        # nbclient + ipykernel: tests/notebook_test.py executes launch/colab.ipynb
        'test': ['pytest>=8', 'pytest-xdist>=3.6', 'nbclient>=0.10', 'ipykernel>=6'],
    },
)
