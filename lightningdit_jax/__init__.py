"""LightningDiT diffusion transformer in JAX / Flax NNX."""

from lightningdit_jax.model import PRESETS, LightningDiT, LightningDiTConfig
from vavae_jax.runtime import sharding as _sharding  # noqa: F401  (switches eager sharding off)

__all__ = ["PRESETS", "LightningDiT", "LightningDiTConfig"]
