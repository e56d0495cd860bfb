"""VA-VAE tokenizer in JAX / Flax NNX."""

from vavae_jax.runtime import sharding as _sharding  # noqa: F401  (switches eager sharding off)
