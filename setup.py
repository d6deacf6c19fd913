"""jit_jax: JiT pixel-space diffusion in JAX / Flax NNX.

Version bounds are the stack verified together on Python 3.11 (see README, "Dependencies"). TensorFlow (CPU
build) and TensorBoard are required because clu.metric_writers / clu.periodic_actions import them and TFDS
needs TensorFlow to prepare ImageNet; jit_jax hides every accelerator from TensorFlow so JAX owns them.
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
        'tensorflow-cpu>=2.21,<2.22',
        'tensorboard>=2.21,<2.22',
        'importlib_resources',  # tfds 4.9.10 imports it in download_and_prepare without declaring it
    ],
    # plots: the experiments' figures (jit_jax.experiments.plots); the tests draw them, so 'test' has it too.
    extras_require={'plots': ['matplotlib>=3.8,<4'],
                    'test': ['pytest>=8', 'pytest-xdist>=3.6', 'matplotlib>=3.8,<4']},
)
