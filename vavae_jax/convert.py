"""Official VA-VAE PyTorch checkpoints -> our NNX modules and Orbax checkpoints.

The official `.pt` (reference `vavae/ldm/models/autoencoder.py`, saved by Lightning) is a dict
with `state_dict`, whose keys are LDM names (`encoder.down.0.block.0.norm1.weight`, ...) plus the
training-only groups `loss.*` (logvar, LPIPS, discriminator), `foundation_model.*` (the timm
DINOv2 teacher) and `linear_proj.*` (the VF reverse projection).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from flax import nnx

from vavae_jax.model import AutoencoderConfig, AutoencoderKL
from vavae_jax.runtime.torch_names import ConversionError, assign

log = logging.getLogger(__name__)

AUTOENCODER_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# Groups of the official checkpoint that are not part of the autoencoder itself.
TRAINING_PREFIXES = ("loss.", "foundation_model.", "linear_proj.", "model_ema.")


def _autoencoder_name(key: str) -> str | None:
    """LDM torch name -> our dotted path (conv `.weight` -> `.kernel`; GroupNorm keeps `weight`)."""
    if not key.startswith(AUTOENCODER_PREFIXES):
        return None
    if key.endswith(".weight") and not _is_norm(key):
        return key[: -len(".weight")] + ".kernel"
    return key


def _is_norm(key: str) -> bool:
    last_module = key.rsplit(".", 2)[-2]
    return last_module.startswith("norm")


def autoencoder_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in state_dict.items() if k.startswith(AUTOENCODER_PREFIXES)}


def from_torch_state_dict(
    state_dict: Mapping[str, np.ndarray], config: AutoencoderConfig, *, rngs: nnx.Rngs | None = None
) -> AutoencoderKL:
    """Builds an `AutoencoderKL` from a PyTorch state dict (names and layouts of the reference).

    Keys of the training-only groups (`loss.*`, `foundation_model.*`, `linear_proj.*`) are left
    for `convert_official` (logged); any other key that is not part of the autoencoder, any missing
    weight and any shape mismatch raises a `ConversionError` listing all of them.
    """
    state_dict = dict(state_dict)
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = dict(state_dict["state_dict"])
    training = sorted(k for k in state_dict if k.startswith(TRAINING_PREFIXES))
    if training:
        groups = sorted({k.split(".", 1)[0] for k in training})
        log.info(
            "from_torch_state_dict: %d keys of %s belong to training state, not the "
            "autoencoder; convert them with vavae_jax.convert.convert_official",
            len(training),
            groups,
        )
    model = AutoencoderKL(config, rngs=rngs or nnx.Rngs(0))
    ae = {k: v for k, v in state_dict.items() if not k.startswith(TRAINING_PREFIXES)}
    if not any(k.startswith(AUTOENCODER_PREFIXES) for k in ae):
        raise ConversionError(
            f"no autoencoder weights (keys starting with {AUTOENCODER_PREFIXES}) in this state "
            f"dict; its first keys are {sorted(state_dict)[:8]}. Is it a VA-VAE / LDM "
            f"AutoencoderKL checkpoint?"
        )
    assign(model, ae, _autoencoder_name, what=f"AutoencoderKL({config})", variable_type=nnx.Param)
    return model
