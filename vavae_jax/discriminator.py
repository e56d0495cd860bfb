"""The PatchGAN discriminator of taming / LDM (`NLayerDiscriminator`), NHWC, in Flax NNX.

Ported from taming-transformers `taming/modules/discriminator/model.py` (NLayerDiscriminator,
weights_init), itself the pix2pix PatchGAN. Layers live in `main`, a list indexed exactly like the
torch `nn.Sequential` (LeakyReLU entries included), so `main.3.running_mean` here is
`main.3.running_mean` there.

BatchNorm follows torch's `BatchNorm2d` (eps 1e-5, momentum 0.1): in training mode it normalises
with the biased batch variance and updates the running variance with the unbiased one; in eval mode
it uses the running statistics. The reference trains the discriminator in training mode only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vavae_jax.runtime import sharding as _sharding
from vavae_jax.runtime.torch_names import flat_params, raise_on_mismatch

CONV_AXES = (None, None, "conv_in", "conv_out")


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    """Arguments of taming's NLayerDiscriminator (the reference builds it with the defaults)."""

    input_nc: int = 3
    ndf: int = 64
    n_layers: int = 3
    use_actnorm: bool = False
    dtype: str = "float32"  # compute dtype of the convolutions; BatchNorm runs in float32

    def __post_init__(self):
        if self.use_actnorm:
            raise ValueError(
                "DiscriminatorConfig.use_actnorm=True is not supported: VA-VAE and LDM use "
                "BatchNorm (use_actnorm=False)"
            )
        if self.n_layers < 1 or self.ndf < 1 or self.input_nc < 1:
            raise ValueError(
                f"DiscriminatorConfig: input_nc={self.input_nc}, ndf={self.ndf}, "
                f"n_layers={self.n_layers} must all be >= 1"
            )


def _torch_bias_init(fan_in: int):
    """torch's default Conv2d bias init, uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)); weights_init
    leaves conv biases alone."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _conv(cin: int, cout: int, stride: int, use_bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(
        cin,
        cout,
        (4, 4),
        strides=(stride, stride),
        padding=((1, 1), (1, 1)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        # weights_init: Conv weights ~ normal(0, 0.02)
        kernel_init=_sharding.partitioned(nnx.initializers.normal(0.02), CONV_AXES),
        bias_init=_sharding.partitioned(_torch_bias_init(cin * 16), ("conv_out",)),
        rngs=rngs,
    )


class BatchNorm2d(nnx.Module):
    """torch.nn.BatchNorm2d over NHWC (statistics over B, H, W), in float32."""

    def __init__(self, num_features: int, rngs: nnx.Rngs, eps: float = 1e-5, momentum: float = 0.1):
        self.eps, self.momentum = eps, momentum
        # weights_init: BatchNorm weight ~ normal(1, 0.02), bias 0
        self.weight = nnx.Param(
            1.0 + 0.02 * jax.random.normal(rngs.params(), (num_features,), jnp.float32)
        )
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.running_mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.running_var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x, train: bool):  # [B, H, W, C]
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if train:
            n = x.shape[0] * x.shape[1] * x.shape[2]
            if n < 2:
                raise ValueError(
                    f"BatchNorm2d in training mode needs more than one value per channel, got "
                    f"input {x.shape}"
                )
            mean = jnp.mean(x, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))  # biased, for normalising
            m = self.momentum
            self.running_mean[...] = (1 - m) * self.running_mean[...] + m * mean
            self.running_var[...] = (1 - m) * self.running_var[...] + m * var * (n / (n - 1))
        else:
            mean, var = self.running_mean[...], self.running_var[...]
        y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]
        return y.astype(dtype)


class LeakyReLU(nnx.Module):
    def __init__(self, negative_slope: float = 0.2):
        self.negative_slope = negative_slope

    def __call__(self, x):
        return jax.nn.leaky_relu(x, self.negative_slope)


class NLayerDiscriminator(nnx.Module):
    """PatchGAN: images [B, H, W, input_nc] -> logits [B, H/8 - 2, W/8 - 2, 1] (n_layers=3).

    main: conv4x4/2 + LReLU, (n_layers - 1) x [conv4x4/2 (no bias) + BN + LReLU],
          conv4x4/1 (no bias) + BN + LReLU, conv4x4/1 -> 1 channel.
    """

    def __init__(self, config: DiscriminatorConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        ndf = config.ndf
        layers: list[nnx.Module] = [
            _conv(config.input_nc, ndf, 2, True, dtype, rngs),
            LeakyReLU(0.2),
        ]
        mult = 1
        for n in range(1, config.n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                _conv(ndf * prev, ndf * mult, 2, False, dtype, rngs),
                BatchNorm2d(ndf * mult, rngs),
                LeakyReLU(0.2),
            ]
        prev, mult = mult, min(2**config.n_layers, 8)
        layers += [
            _conv(ndf * prev, ndf * mult, 1, False, dtype, rngs),
            BatchNorm2d(ndf * mult, rngs),
            LeakyReLU(0.2),
            _conv(ndf * mult, 1, 1, True, dtype, rngs),
        ]
        self.main = nnx.List(layers)

    def __call__(self, x, train: bool = True) -> jax.Array:
        """x: [B, H, W, input_nc] -> logits [B, h, w, 1] in float32. `train` selects batch
        statistics (and updates the running ones in place) or the running statistics."""
        cfg = self.config
        if not hasattr(x, "shape") or x.ndim != 4 or x.shape[-1] != cfg.input_nc:
            raise ValueError(
                f"NLayerDiscriminator expects images [B, H, W, {cfg.input_nc}] (NHWC), got "
                f"{getattr(x, 'shape', type(x))}"
            )
        # n_layers stride-2 convs halve the size (k4, s2, p1), the two stride-1 convs take 1 each.
        min_size = 3 * 2**cfg.n_layers  # the smallest input with a 1x1 output
        if x.shape[1] < min_size or x.shape[2] < min_size:
            raise ValueError(
                f"NLayerDiscriminator(n_layers={cfg.n_layers}) needs images of at least "
                f"{min_size}x{min_size}, got {x.shape[1]}x{x.shape[2]}"
            )
        h = x.astype(jnp.dtype(cfg.dtype))
        for layer in self.main:
            h = layer(h, train) if isinstance(layer, BatchNorm2d) else layer(h)
        return h.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# PyTorch state dicts
# ---------------------------------------------------------------------------------------------
def _our_name(key: str, bn_prefixes: set[str]) -> str:
    """`main.0.weight` -> `main.0.kernel` for convs; BatchNorm names are the same as torch's."""
    module, _, leaf = key.rpartition(".")
    return f"{module}.kernel" if leaf == "weight" and module not in bn_prefixes else key


def from_torch_state_dict(
    state_dict: Mapping[str, np.ndarray],
    config: DiscriminatorConfig,
) -> NLayerDiscriminator:
    """Builds an `NLayerDiscriminator` from taming's state dict (`main.N.weight`, ...).

    Also accepts the keys under the reference's `loss.discriminator.` prefix. Strict: unknown and
    missing keys and shape mismatches raise one `ConversionError` listing all of them.
    `main.N.num_batches_tracked` (BatchNorm's step counter) must be present and a scalar; it is
    not kept, because with momentum 0.1 torch never reads it.
    """
    prefix = "loss.discriminator."
    sd = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}
    # Built abstractly (no random init to throw away); every variable is then set or reported.
    model = nnx.eval_shape(lambda: NLayerDiscriminator(config, rngs=nnx.Rngs(0)))
    ours = flat_params(model)
    bn_prefixes = {
        f"main.{i}" for i, layer in enumerate(model.main) if isinstance(layer, BatchNorm2d)
    }
    unexpected, mismatched, seen = [], [], set()
    for key, value in sd.items():
        value = np.asarray(value)
        if key.endswith(".num_batches_tracked") and key.rsplit(".", 1)[0] in bn_prefixes:
            seen.add(key)
            if value.size != 1:
                mismatched.append(f"{key} {value.shape} expects a scalar")
            continue
        path = _our_name(key, bn_prefixes)
        if path not in ours:
            unexpected.append(key)
            continue
        target = ours[path]
        arr = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW -> HWIO
        if tuple(arr.shape) != tuple(target.shape):
            mismatched.append(f"{key} {tuple(value.shape)} -> {path} expects {tuple(target.shape)}")
            continue
        seen.add(path)
        target.set_value(jnp.asarray(arr, dtype=target.dtype))
    missing = sorted(p for p in ours if p not in seen)
    missing += sorted(
        f"{p}.num_batches_tracked" for p in bn_prefixes if f"{p}.num_batches_tracked" not in seen
    )
    raise_on_mismatch(
        f"NLayerDiscriminator({config})",
        unexpected=unexpected,
        missing=missing,
        mismatched=mismatched,
        hint="Is this taming's NLayerDiscriminator with the same input_nc, ndf and n_layers?",
    )
    return model
