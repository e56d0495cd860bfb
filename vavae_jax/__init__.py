"""VA-VAE tokenizer in JAX / Flax NNX: the public API.

    import vavae_jax as vavae
    ae = vavae.AutoencoderKL(vavae.PRESETS["f16d32"], rngs=nnx.Rngs(0))
    posterior = ae.encode(images)                 # [B, 256, 256, 3] in [-1, 1] -> [B, 16, 16, 32]
    teacher = vavae.DinoV2Teacher.from_pretrained("facebook/dinov2-large")
    vf, terms = vavae.vf_loss(proj(z), teacher(images), distmat_margin=0.25, cos_margin=0.5)

The trainer (`vavae_jax.train`), its step (`vavae_jax.train_step`), the data pipelines
(`vavae_jax.data`), the converters (`vavae_jax.convert`) and our checkpoint formats
(`vavae_jax.checkpoints`) are imported from their modules.
"""

from vavae_jax.checkpoints import load_autoencoder
from vavae_jax.discriminator import DiscriminatorConfig, NLayerDiscriminator
from vavae_jax.foundation import (
    Dinov2Config,
    Dinov2Model,
    DinoV2Teacher,
    from_timm_state_dict,
    from_transformers_state_dict,
    load_dinov2,
)
from vavae_jax.losses import (
    LossConfig,
    adaptive_weight,
    adopt_weight,
    discriminator_loss,
    generator_loss,
    hinge_d_loss,
    kl_loss,
    nll_loss,
    vanilla_d_loss,
    vf_loss,
)
from vavae_jax.lpips import LPIPS, build_lpips, convert_lpips, load_lpips, load_lpips_converted
from vavae_jax.metrics import (
    FeatureExtractor,
    FIDInceptionV3,
    compute_fid_from_npz,
    feature_statistics,
    frechet_distance,
    inception_score,
    load_inception,
    load_statistics,
    psnr,
    random_inception,
    reference_statistics,
    ssim,
)
from vavae_jax.model import PRESETS, AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from vavae_jax.runtime import sharding as _sharding  # noqa: F401  (switches eager sharding off)

__all__ = [
    # the autoencoder
    "PRESETS",
    "AutoencoderConfig",
    "AutoencoderKL",
    "DiagonalGaussian",
    "load_autoencoder",
    # the DINOv2 teacher of the VF loss
    "Dinov2Config",
    "Dinov2Model",
    "DinoV2Teacher",
    "load_dinov2",
    "from_timm_state_dict",
    "from_transformers_state_dict",
    # losses
    "LossConfig",
    "vf_loss",
    "kl_loss",
    "nll_loss",
    "hinge_d_loss",
    "vanilla_d_loss",
    "generator_loss",
    "discriminator_loss",
    "adaptive_weight",
    "adopt_weight",
    # LPIPS and the PatchGAN discriminator
    "LPIPS",
    "load_lpips",
    "load_lpips_converted",
    "convert_lpips",
    "build_lpips",
    "DiscriminatorConfig",
    "NLayerDiscriminator",
    # metrics
    "psnr",
    "ssim",
    "frechet_distance",
    "inception_score",
    "feature_statistics",
    "load_statistics",
    "reference_statistics",
    "compute_fid_from_npz",
    "FIDInceptionV3",
    "FeatureExtractor",
    "load_inception",
    "random_inception",
]
