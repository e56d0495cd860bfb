"""VA-VAE and LightningDiT in JAX / Flax NNX."""

from setuptools import find_packages, setup

# Exactly what the library and launch/ import (checked with grep over vavae_jax, lightningdit_jax,
# launch and configs). DINOv2 checkpoints are read without transformers: config.json with json,
# weights with safetensors.numpy or flax's msgpack, hub downloads with huggingface_hub.
CORE = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "tensorflow-datasets>=4.9.10",  # tfds data sources (no TensorFlow needed for array_record)
    "array_record>=0.8",  # latent shards
    "ml-collections>=1.1.0",
    "ml_dtypes>=0.5",  # bfloat16 latent shards
    "absl-py>=2.0",  # flags of the launchers and data configs
    "safetensors>=0.8.0",  # DINOv2 weights, read without torch
    "huggingface_hub>=0.23",  # DINOv2 hub downloads (only when a hub id is given)
    "numpy>=2.0",
    "pillow>=10.0",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
]
# torch is only for checkpoint conversion and parity tests, never for training or sampling;
# lpips provides the LPIPS heads (weights/v0.1/vgg.pth) that `convert.py lpips` reads by default.
TORCH = ["torch==2.14.1", "torchvision==0.29.1", "lpips==0.1.4"]

setup(
    name="vavae-lightningdit-jax",
    version="0.1.0",
    description="VA-VAE tokenizer and LightningDiT diffusion transformer in JAX / Flax NNX",
    python_requires=">=3.11",
    packages=find_packages(
        include=["vavae_jax", "vavae_jax.*", "lightningdit_jax", "lightningdit_jax.*"]
    ),
    install_requires=CORE,
    extras_require={
        "torch": TORCH,
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.6",
            "ruff>=0.6",
            # references the parity tests compare against (never imported by the library)
            "transformers>=5.0",
            "scipy>=1.13",
            "timm==1.0.31",
            "pytorch-fid==0.3.0",
            "torchmetrics==1.9.0",
            *TORCH,
        ],
        "gpu": ["jax[cuda13]>=0.10.2"],
        # The viewer of the event files the trainers write (tensorboardX writes them without it).
        "tensorboard": ["tensorboard>=2.16"],
        "tpu": ["jax[tpu]>=0.10.2", "etils[epath,epath-gcs]>=1.15", "google-cloud-storage>=2.0"],
    },
)
