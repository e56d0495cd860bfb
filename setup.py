"""VA-VAE and LightningDiT in JAX / Flax NNX."""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "tensorflow-datasets>=4.9.10",
    "array_record>=0.8",
    "ml-collections>=1.1.0",
    "transformers>=5.0",
    "safetensors>=0.8.0",
    "numpy>=2.0",
    "scipy>=1.13",
    "pillow>=10.0",
    "tqdm>=4.66",
    "importlib_resources>=6.0",
    "tensorboardX>=2.6",
]
# torch is only for checkpoint conversion and parity tests, never for training or sampling.
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]

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
            "lpips==0.1.4",
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
