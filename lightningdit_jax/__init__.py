"""LightningDiT diffusion transformer in JAX / Flax NNX: the public API.

    import lightningdit_jax as ldit
    model = ldit.LightningDiT(ldit.PRESETS["XL/1"], rngs=nnx.Rngs(0))
    v = model(x_t, t, y)                                  # [B, 16, 16, 32] latents, t [B], y [B]
    loss, terms = ldit.training_loss(model, x1, y, rng)   # rectified flow: MSE + cosine
    z1 = ldit.sample_ode(model, z0, y, num_steps=250, timestep_shift=0.3, cfg_scale=6.7)

The trainer (`lightningdit_jax.train`), latent shards (`lightningdit_jax.data`), latent
extraction (`lightningdit_jax.pipeline`) and the FP8 products (`lightningdit_jax.fp8`, switched
on by `LightningDiTConfig(precision="fp8")`) are imported from their modules.
"""

from lightningdit_jax.convert import load_converted
from lightningdit_jax.model import PRESETS, LightningDiT, LightningDiTConfig, abstract_model
from lightningdit_jax.sampling import cfg_model_output, sample_ode, sample_sde, time_grid
from lightningdit_jax.transport import Transport, training_loss
from vavae_jax.runtime import sharding as _sharding  # noqa: F401  (switches eager sharding off)

__all__ = [
    "PRESETS",
    "LightningDiT",
    "LightningDiTConfig",
    "abstract_model",
    "load_converted",
    "Transport",
    "training_loss",
    "sample_ode",
    "sample_sde",
    "cfg_model_output",
    "time_grid",
]
