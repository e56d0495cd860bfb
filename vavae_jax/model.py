"""The LDM convolutional autoencoder used by VA-VAE, in Flax NNX (NHWC).

Ported from the reference `vavae/ldm/modules/diffusionmodules/model.py` (Encoder, Decoder,
ResnetBlock, AttnBlock, Downsample, Upsample), `vavae/ldm/models/autoencoder.py` (AutoencoderKL)
and `vavae/ldm/modules/distributions/distributions.py` (DiagonalGaussianDistribution).
Module and attribute names follow the reference so that checkpoint conversion maps one to one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from vavae_jax.runtime import attention
from vavae_jax.runtime import sharding as _sharding
from vavae_jax.runtime.sharding import constrain_batch

CONV_AXES = (None, None, "conv_in", "conv_out")


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Field names follow the reference `ddconfig` plus `embed_dim` (latent channels)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 32
    embed_dim: int = 32
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    double_z: bool = True
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype; parameters are always float32

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if not self.double_z:
            raise ValueError(
                "AutoencoderKL needs double_z=True (mean and logvar), as the reference"
            )
        if self.dropout != 0.0:
            raise ValueError(f"dropout={self.dropout}: only 0.0 is supported (all VA-VAE configs)")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_resolution(self) -> int:
        return self.resolution // self.downsample_factor


PRESETS: dict[str, AutoencoderConfig] = {
    # VA-VAE (reference vavae/configs/f16d32_vfdinov2.yaml) and the paper's ablation widths.
    "f16d32": AutoencoderConfig(z_channels=32, embed_dim=32),
    "f16d16": AutoencoderConfig(z_channels=16, embed_dim=16),
    "f16d64": AutoencoderConfig(z_channels=64, embed_dim=64),
    # LDM first-stage shapes (CompVis latent-diffusion models/first_stage_models/kl-f8, kl-f16).
    "ldm-f8d4": AutoencoderConfig(
        ch_mult=(1, 2, 4, 4), attn_resolutions=(), z_channels=4, embed_dim=4
    ),
    "ldm-f16d16": AutoencoderConfig(z_channels=16, embed_dim=16),
    # A tiny model for CPU tests and quick runs (the shape of ../shared/fixtures/vavae_tiny.npz).
    "tiny": AutoencoderConfig(
        ch=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        z_channels=8,
        embed_dim=8,
        resolution=32,
    ),
}


def _conv(cin: int, cout: int, k: int, rngs: nnx.Rngs, dtype, *, stride: int = 1, padding=None):
    if padding is None:
        padding = ((k // 2, k // 2),) * 2
    return nnx.Conv(
        cin,
        cout,
        (k, k),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_sharding.partitioned(nnx.initializers.lecun_normal(), CONV_AXES),
        bias_init=_sharding.partitioned(nnx.initializers.zeros_init(), ("conv_out",)),
        rngs=rngs,
    )


def group_norm_grouped(x, weight, bias, num_groups: int, eps: float):
    """GroupNorm over a [B, H, W, G, C/G] view: statistics reduced over (H, W, C/G) at once.
    The form of earlier versions, kept for the benchmark `launch/bench/groupnorm_probe.py`."""
    b, h, w, c = x.shape
    xg = x.astype(jnp.float32).reshape(b, h, w, num_groups, c // num_groups)
    xg = constrain_batch(xg)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
    xg = constrain_batch((xg - mean) * jax.lax.rsqrt(var + eps))
    return constrain_batch((xg.reshape(b, h, w, c) * weight + bias).astype(x.dtype))


def group_sums(s, num_groups: int):
    """[B, C] per-channel sums -> [B, 1, 1, C]: each channel's group sum (GroupNorm's
    statistics, summed over (H, W) first)."""
    b, c = s.shape
    g = s.reshape(b, num_groups, c // num_groups).sum(-1, keepdims=True)
    return jnp.broadcast_to(g, (b, num_groups, c // num_groups)).reshape(b, 1, 1, c)


def group_norm(x, weight, bias, num_groups: int, eps: float):
    """torch.nn.GroupNorm on [B, H, W, C]: statistics in float32 with the two-pass variance.
    Each sum runs over (H, W) first, per channel, in the activation's own layout, then over the
    channels of a group on the small [B, C] result. On an H200 XLA emits the first as a fast
    column reduction; one reduction over (H, W, C/G) of a 5-D view took 27% of the VA-VAE step's
    kernel time (launch/bench/groupnorm_probe.py). Autodiff derives its backward."""
    return _group_norm_fwd(x, weight, bias, num_groups, eps)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm_vjp(x, weight, bias, num_groups: int, eps: float):
    """`group_norm` with a written backward: the four sums it needs (dbias, dweight and the two
    group sums of dx) read the cotangent and x once, as one multi-output reduction, where
    autodiff of the two-pass statistics reads them in several passes."""
    return _group_norm_fwd(x, weight, bias, num_groups, eps)[0]


def _group_norm_fwd(x, weight, bias, num_groups, eps):
    """(`group_norm`'s output, the residuals of the written backward)."""
    _, h, w, c = x.shape
    n = h * w * (c // num_groups)
    x32 = constrain_batch(x.astype(jnp.float32))
    mean = group_sums(x32.sum(axis=(1, 2)), num_groups) / n
    d = x32 - mean
    rstd = jax.lax.rsqrt(group_sums(jnp.square(d).sum(axis=(1, 2)), num_groups) / n + eps)
    out = constrain_batch((d * (rstd * weight) + bias).astype(x.dtype))
    return out, (x, weight, mean, rstd)


def _group_norm_bwd(num_groups, eps, res, g):
    x, weight, mean, rstd = res
    _, h, w, c = x.shape
    n = h * w * (c // num_groups)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    g32 = g.astype(jnp.float32)
    sum_g = g32.sum(axis=(1, 2))  # [B, C]
    sum_gx = (g32 * xhat).sum(axis=(1, 2))
    a = group_sums(sum_g * weight, num_groups) / n
    b = group_sums(sum_gx * weight, num_groups) / n
    dx = constrain_batch((rstd * (g32 * weight - a - xhat * b)).astype(x.dtype))
    return dx, sum_gx.sum(0), sum_g.sum(0)


group_norm_vjp.defvjp(_group_norm_fwd, _group_norm_bwd)

# Which GroupNorm the model's layers use: "autodiff" (`group_norm`) or "written"
# (`group_norm_vjp`); read when a step is traced. A switch for the benchmark's A/B
# (launch/bench/benchmark.py --vae_variants=default,gn_written). Run 39 (H200, b32): the written
# form cut the step's kernel time by 1.9 ms (reductions 47.6 -> 38.7 ms) but its wall was 4.2 ms
# longer, one measurement each, with host time before the first kernel that differed by 6 ms
# between the two programs; the default stays until a repeated A/B decides.
GROUP_NORM_BACKWARD = "autodiff"


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm(32, C, eps=1e-6): statistics in float32 with the two-pass variance."""

    def __init__(self, num_channels: int, rngs: nnx.Rngs, num_groups: int = 32, eps: float = 1e-6):
        if num_channels % num_groups:
            raise ValueError(
                f"GroupNorm: {num_channels} channels not divisible by {num_groups} groups"
            )
        self.num_groups, self.eps = num_groups, eps
        self.weight = nnx.Param(jnp.ones((num_channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32))

    def __call__(self, x):  # [B, H, W, C]
        fn = {"autodiff": group_norm, "written": group_norm_vjp}.get(GROUP_NORM_BACKWARD)
        if fn is None:
            raise ValueError(
                f"model.GROUP_NORM_BACKWARD={GROUP_NORM_BACKWARD!r}: expected 'autodiff' or "
                "'written'"
            )
        return fn(x, self.weight[...], self.bias[...], self.num_groups, self.eps)


class ResnetBlock(nnx.Module):
    """Reference ResnetBlock without the timestep embedding (temb_channels=0 in the VAE)."""

    def __init__(self, in_channels: int, out_channels: int, rngs: nnx.Rngs, dtype):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = GroupNorm(in_channels, rngs)
        self.conv1 = _conv(in_channels, out_channels, 3, rngs, dtype)
        self.norm2 = GroupNorm(out_channels, rngs)
        self.conv2 = _conv(out_channels, out_channels, 3, rngs, dtype)
        if in_channels != out_channels:
            self.nin_shortcut = _conv(in_channels, out_channels, 1, rngs, dtype)

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return constrain_batch(x + h)


class AttnBlock(nnx.Module):
    """Single-head spatial self-attention with 1x1 q/k/v/proj_out convs (reference AttnBlock)."""

    def __init__(self, channels: int, rngs: nnx.Rngs, dtype):
        self.norm = GroupNorm(channels, rngs)
        self.q = _conv(channels, channels, 1, rngs, dtype)
        self.k = _conv(channels, channels, 1, rngs, dtype)
        self.v = _conv(channels, channels, 1, rngs, dtype)
        self.proj_out = _conv(channels, channels, 1, rngs, dtype)

    def __call__(self, x):  # [B, H, W, C]
        b, h, w, c = x.shape
        hn = self.norm(x)
        q, k, v = (f(hn).reshape(b, h * w, 1, c) for f in (self.q, self.k, self.v))
        # softmax(q k^T / sqrt(c)) v; one head of width c (512 in f16d32): wider than cuDNN's
        # flash kernels take, so "auto" uses XLA's attention here.
        out = attention.dot_product_attention(q, k, v, scale=c**-0.5)
        return constrain_batch(x + self.proj_out(out.reshape(b, h, w, c)))


class Downsample(nnx.Module):
    """Stride-2 3x3 conv with the reference's asymmetric (0, 1) padding on H and W."""

    def __init__(self, channels: int, rngs: nnx.Rngs, dtype):
        self.conv = _conv(channels, channels, 3, rngs, dtype, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x):
        return constrain_batch(self.conv(x))


class Upsample(nnx.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int, rngs: nnx.Rngs, dtype):
        self.conv = _conv(channels, channels, 3, rngs, dtype)

    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return constrain_batch(self.conv(x))


class _Level(nnx.Module):
    """One resolution level: `block` ResnetBlocks, `attn` blocks and an optional resampler."""

    def __init__(self, blocks, attns, resample=None, resample_name: str = "downsample"):
        self.block = nnx.List(blocks)
        self.attn = nnx.List(attns)
        self.resample_name = resample_name
        if resample is not None:
            setattr(self, resample_name, resample)

    def resample(self, x):
        return getattr(self, self.resample_name)(x) if hasattr(self, self.resample_name) else x


class _Mid(nnx.Module):
    def __init__(self, channels: int, rngs: nnx.Rngs, dtype):
        self.block_1 = ResnetBlock(channels, channels, rngs, dtype)
        self.attn_1 = AttnBlock(channels, rngs, dtype)
        self.block_2 = ResnetBlock(channels, channels, rngs, dtype)

    def __call__(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nnx.Module):
    """Image [B, H, W, 3] -> moments [B, H/f, W/f, 2*z_channels] (reference Encoder)."""

    def __init__(self, cfg: AutoencoderConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.conv_in = _conv(cfg.in_channels, cfg.ch, 3, rngs, dtype)
        in_ch_mult = (1, *cfg.ch_mult)
        curr_res, levels = cfg.resolution, []
        block_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            block_in, block_out = cfg.ch * in_ch_mult[i], cfg.ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, rngs, dtype))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, rngs, dtype))
            down = None
            if i != len(cfg.ch_mult) - 1:
                down = Downsample(block_in, rngs, dtype)
                curr_res //= 2
            levels.append(_Level(blocks, attns, down, "downsample"))
        self.down = nnx.List(levels)
        self.mid = _Mid(block_in, rngs, dtype)
        self.norm_out = GroupNorm(block_in, rngs)
        z_out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = _conv(block_in, z_out, 3, rngs, dtype)

    def features(self, x):
        """Everything before `conv_out` (the VF adaptive weight differentiates at that kernel)."""
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            h = level.resample(h)
        h = self.mid(h)
        return jax.nn.silu(self.norm_out(h))

    def __call__(self, x):
        return self.conv_out(self.features(x))


class Decoder(nnx.Module):
    """Latent [B, h, w, z_channels] -> image [B, h*f, w*f, out_ch] (reference Decoder)."""

    def __init__(self, cfg: AutoencoderConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        n = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        curr_res = cfg.resolution // 2 ** (n - 1)
        self.conv_in = _conv(cfg.z_channels, block_in, 3, rngs, dtype)
        self.mid = _Mid(block_in, rngs, dtype)
        levels: list[Any] = [None] * n
        for i in reversed(range(n)):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, rngs, dtype))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, rngs, dtype))
            up = None
            if i != 0:
                up = Upsample(block_in, rngs, dtype)
                curr_res *= 2
            levels[i] = _Level(blocks, attns, up, "upsample")
        self.up = nnx.List(levels)
        self.norm_out = GroupNorm(block_in, rngs)
        self.conv_out = _conv(block_in, cfg.out_ch, 3, rngs, dtype)

    def features(self, z):
        """Everything before `conv_out` (the GAN adaptive weight differentiates at that kernel)."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            h = level.resample(h)
        return jax.nn.silu(self.norm_out(h))

    def __call__(self, z):
        return self.conv_out(self.features(z))


@struct.dataclass
class DiagonalGaussian:
    """Reference DiagonalGaussianDistribution over NHWC latents; logvar clamped to [-30, 20]."""

    mean: jax.Array  # [B, h, w, C]
    logvar: jax.Array  # [B, h, w, C]

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        noise = jax.random.normal(rng, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL to N(0, I) summed over (h, w, C): [B]."""
        mean, logvar = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
        return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


class AutoencoderKL(nnx.Module):
    """encode(x) -> DiagonalGaussian, decode(z) -> image. x: [B, H, W, in_channels] in [-1, 1]."""

    def __init__(self, config: AutoencoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        self.encoder = Encoder(config, rngs)
        self.decoder = Decoder(config, rngs)
        self.quant_conv = _conv(2 * config.z_channels, 2 * config.embed_dim, 1, rngs, dtype)
        self.post_quant_conv = _conv(config.embed_dim, config.z_channels, 1, rngs, dtype)

    def _check_image(self, x):
        cfg = self.config
        f = cfg.downsample_factor
        if not hasattr(x, "shape") or x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"AutoencoderKL.encode expects images [B, H, W, {cfg.in_channels}] (NHWC) in "
                f"[-1, 1], got shape {getattr(x, 'shape', type(x))}. Transpose NCHW input with "
                f"x.transpose(0, 2, 3, 1)."
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"AutoencoderKL.encode expects floating-point images in [-1, 1], got dtype "
                f"{x.dtype}. Convert uint8 with x.astype(np.float32) / 127.5 - 1."
            )
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"image size {x.shape[1]}x{x.shape[2]} is not divisible by the downsampling "
                f"factor {f} of this autoencoder"
            )

    def _check_latent(self, z):
        if not hasattr(z, "shape") or z.ndim != 4 or z.shape[-1] != self.config.embed_dim:
            raise ValueError(
                f"AutoencoderKL.decode expects latents [B, h, w, {self.config.embed_dim}] (NHWC), "
                f"got shape {getattr(z, 'shape', type(z))}"
            )

    def encode_moments(self, x) -> jax.Array:
        self._check_image(x)
        return self.quant_conv(self.encoder(x.astype(jnp.dtype(self.config.dtype))))

    def encode(self, x) -> DiagonalGaussian:
        return DiagonalGaussian.from_moments(self.encode_moments(x).astype(jnp.float32))

    def decode(self, z) -> jax.Array:
        self._check_latent(z)
        out = self.decoder(self.post_quant_conv(z.astype(jnp.dtype(self.config.dtype))))
        return out.astype(jnp.float32)

    def __call__(self, x, rng: jax.Array | None = None):
        """Reconstruction: decode(sample) when `rng` is given, else decode(mode)."""
        posterior = self.encode(x)
        z = posterior.mode() if rng is None else posterior.sample(rng)
        return self.decode(z), posterior


def count_params(module: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
