"""Evaluation metrics: FID / IS with pytorch-fid's Inception in NNX, PSNR and SSIM.

Typical use (FID-50k of an ADM-format sample batch against ADM's reference batch):

    inception = load_inception("fid_inception.npz")  # or pytorch-fid's .pth (needs torch)
    compute_fid_from_npz("samples.npz", "VIRTUAL_imagenet256_labeled.npz", inception)
"""

from vavae_jax.metrics.fid import (
    compute_activations,
    compute_fid_from_npz,
    feature_statistics,
    frechet_distance,
    inception_score,
    iter_npz_images,
    load_statistics,
    reference_statistics,
    save_statistics,
)
from vavae_jax.metrics.image import psnr, ssim, to_uint8
from vavae_jax.metrics.inception import (
    FeatureExtractor,
    FIDInceptionV3,
    InceptionConfig,
    from_torch_state_dict,
    load_inception,
    random_inception,
    save_inception,
)

__all__ = [
    "FIDInceptionV3",
    "FeatureExtractor",
    "InceptionConfig",
    "compute_activations",
    "compute_fid_from_npz",
    "feature_statistics",
    "frechet_distance",
    "from_torch_state_dict",
    "inception_score",
    "iter_npz_images",
    "load_inception",
    "load_statistics",
    "psnr",
    "random_inception",
    "reference_statistics",
    "save_inception",
    "save_statistics",
    "ssim",
    "to_uint8",
]
