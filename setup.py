"""Install: pip install -e . (library), -e .[test] (tests), -e .[tpu] (libtpu for TPU runs and AOT scans)."""

from setuptools import find_packages, setup

setup(
    name="rewarddance_jax",
    version="0.1.0",
    description="TPU-first JAX/Flax alignment of rectified-flow generators with reward models.",
    python_requires=">=3.11",
    packages=find_packages(include=["rewarddance_jax*", "launch*", "configs*"]),
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "optax>=0.2.8",
        "chex>=0.1.92",
        "ml-collections>=1.1.0",
        "absl-py>=2.5.1",
        "numpy>=2.0",
        "safetensors>=0.6",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "tokenizers>=0.20",
        "scikit-learn>=1.5",
        "scipy>=1.11",  # reward-training augmentation (data/augment.py)
        "pillow>=10",
        "matplotlib>=3.8",
        "jinja2>=3.1",  # chat templates of VLM reward tokenizers
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "import-linter>=2.17",  # tests/test_layers.py: the import contracts of .importlinter
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "torch==2.13.0",
            "diffusers>=0.42",
            "transformers>=5.0",
            "scikit-learn>=1.5",
            # Only for the TFDS ArrayRecord prompt-source test; installs without TensorFlow.
            "tensorflow-datasets>=4.9.10",
        ],
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    },
)
