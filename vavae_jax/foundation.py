"""The DINOv2 teacher of the VF loss: an NNX ViT equal to transformers' `Dinov2Model`, and loaders.

Reference: `vavae/ldm/models/foundation_models.py` (`aux_foundation_model.forward_dinov2`), which
runs timm's `vit_large_patch14_dinov2.lvd142m` (`dynamic_img_size=True`) as

    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    features = model.forward_features(x)[:, 1:]        # patch tokens after the final LayerNorm

on the VAE input `x` in [-1, 1] exactly as it comes from the data pipeline (`image / 127.5 - 1` in
`vavae/ldm/data/imagenet.py`): the reference applies no ImageNet mean/std normalisation before the
teacher (timm's `forward_features` normalises nothing; the mean/std of timm's pretrained config
are only used by timm's data transforms, which VA-VAE does not use). `DinoV2Teacher` reproduces
this by default and offers the ImageNet normalisation DINOv2 was trained with as an option.

The network follows transformers' `Dinov2Model` (`models/dinov2/modeling_dinov2.py`, transformers
5.x; identical maths in 4.57): patch embedding (conv 14x14 stride 14), CLS token, learned position
embeddings for `image_size` (518 -> a 37x37 grid) resampled bicubically to other grids, pre-norm
blocks with layer scale, GELU MLP (or SwiGLU for giant), final LayerNorm; `last_hidden_state` is
`[B, 1 + N, C]`. The one place where timm and transformers differ for the same weights is the
resampling of the position embeddings: transformers uses `F.interpolate(mode="bicubic",
antialias=False)`, timm's `resample_abs_pos_embed` (the reference's path) `antialias=True`. Both
are implemented exactly (`Dinov2Config.interpolate_antialias`, `Dinov2Model(..., antialias=)`);
the teacher uses timm's, as the reference does.

Weights load from transformers checkpoints (`load_dinov2`: a local folder or a hub id; PyTorch
`model.safetensors` read without torch, or the Flax `flax_model.msgpack` that transformers 4.x
wrote) and from timm state dicts (`from_timm_state_dict`: the teacher inside the official VA-VAE
`.pt`, keys `foundation_model.model.*`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vavae_jax.interpolate import bicubic_matrix, resize_bilinear
from vavae_jax.runtime import attention
from vavae_jax.runtime import sharding as _sharding
from vavae_jax.runtime.torch_names import ConversionError, assign

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """Field names follow transformers' `Dinov2Config`; defaults are dinov2-large (the paper's).

    Plain DINOv2 has no register tokens: transformers keeps them in a separate model
    (`Dinov2WithRegistersModel`), and so does timm (`vit_*_reg4_dinov2`); neither is supported here.
    """

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 14
    image_size: int = 518  # the position embeddings cover (image_size // patch_size) ** 2 patches
    num_channels: int = 3
    layerscale_value: float = 1.0  # initial layer scale; loaded weights replace it
    use_swiglu_ffn: bool = False
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    use_mask_token: bool = True
    # Position-embedding resampling for grids other than the trained one: False is transformers'
    # Dinov2Model (bicubic), True is timm's resample_abs_pos_embed (bicubic with antialiasing).
    interpolate_antialias: bool = False
    dtype: str = "float32"  # compute dtype; parameters are always float32

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"Dinov2Config: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.image_size < self.patch_size:
            raise ValueError(
                f"Dinov2Config: image_size={self.image_size} is smaller than "
                f"patch_size={self.patch_size}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Side of the trained position-embedding grid (37 for 518 / 14)."""
        return self.image_size // self.patch_size

    @property
    def mlp_hidden_size(self) -> int:
        """fc1 width; for SwiGLU the width of each of the gate and up projections."""
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:
            # transformers Dinov2SwiGLUFFN: two thirds, rounded up to a multiple of 8
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    @classmethod
    def from_hf_dict(cls, config: Mapping[str, Any], *, dtype: str = "float32") -> Dinov2Config:
        """From a transformers `config.json` dict (missing keys take transformers' defaults)."""
        model_type = config.get("model_type")
        if model_type != "dinov2":
            raise ValueError(
                f"config.json has model_type={model_type!r}, expected 'dinov2' (transformers "
                f"Dinov2Model, e.g. facebook/dinov2-large). DINOv2 with registers and other "
                f"models are not supported by vavae_jax.foundation."
            )
        act = config.get("hidden_act", "gelu")
        swiglu = bool(config.get("use_swiglu_ffn", False))
        if act != "gelu" and not swiglu:
            raise ValueError(f"config.json hidden_act={act!r}: only 'gelu' (exact) is supported")

        def square(name, default):
            value = config.get(name, default)
            if isinstance(value, list | tuple):
                if len(value) != 2 or value[0] != value[1]:
                    raise ValueError(f"config.json {name}={value}: only square sizes are supported")
                value = value[0]
            return int(value)

        return cls(
            hidden_size=int(config.get("hidden_size", 768)),
            num_hidden_layers=int(config.get("num_hidden_layers", 12)),
            num_attention_heads=int(config.get("num_attention_heads", 12)),
            mlp_ratio=float(config.get("mlp_ratio", 4)),
            patch_size=square("patch_size", 14),
            image_size=square("image_size", 224),
            num_channels=int(config.get("num_channels", 3)),
            layerscale_value=float(config.get("layerscale_value", 1.0)),
            use_swiglu_ffn=swiglu,
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-6)),
            qkv_bias=bool(config.get("qkv_bias", True)),
            use_mask_token=bool(config.get("use_mask_token", True)),
            dtype=dtype,
        )


# The hub checkpoints' config.json (facebook/dinov2-*): all at image_size 518, patch 14.
PRESETS: dict[str, Dinov2Config] = {
    "dinov2-small": Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "dinov2-base": Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "dinov2-large": Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "dinov2-giant": Dinov2Config(
        hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True
    ),
}
HUB_IDS = {name: f"facebook/{name}" for name in PRESETS}


# ---------------------------------------------------------------------------------------------
# The model (transformers models/dinov2/modeling_dinov2.py, same module names)
# ---------------------------------------------------------------------------------------------


# transformers and timm initialise with a truncated normal (std 0.02). The teacher always loads
# pretrained weights, so the random init only serves tests; a plain normal traces in half the time
# under nnx.eval_shape (which `load_dinov2` uses to build the model without initialising it).
_INIT = nnx.initializers.normal(0.02)


def _linear(cin: int, cout: int, axes: tuple[str, str], rngs: nnx.Rngs, dtype, *, bias=True):
    return nnx.Linear(
        cin,
        cout,
        use_bias=bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_sharding.partitioned(_INIT, axes),
        bias_init=_sharding.partitioned(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


def _layer_norm(cfg: Dinov2Config, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # float32 statistics with the two-pass variance, as torch.nn.LayerNorm
    return nnx.LayerNorm(
        cfg.hidden_size,
        epsilon=cfg.layer_norm_eps,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=_sharding.partitioned(nnx.initializers.ones_init(), ("embed",)),
        bias_init=_sharding.partitioned(nnx.initializers.zeros_init(), ("embed",)),
        rngs=rngs,
    )


def _param(init, axes, rngs: nnx.Rngs, shape) -> nnx.Param:
    return nnx.Param(_sharding.partitioned(init, axes)(rngs.params(), shape, jnp.float32))


class Dinov2PatchEmbeddings(nnx.Module):
    """Conv patch x patch, stride patch: [B, H, W, 3] -> [B, H/p * W/p, C] (rows first)."""

    def __init__(self, cfg: Dinov2Config, rngs: nnx.Rngs):
        p = cfg.patch_size
        self.projection = nnx.Conv(
            cfg.num_channels,
            cfg.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.float32,
            kernel_init=_sharding.partitioned(_INIT, (None, None, None, "embed")),
            bias_init=_sharding.partitioned(nnx.initializers.zeros_init(), ("embed",)),
            rngs=rngs,
        )

    def __call__(self, pixel_values):
        x = self.projection(pixel_values)  # [B, H/p, W/p, C]
        return x.reshape(x.shape[0], -1, x.shape[-1])


class Dinov2Embeddings(nnx.Module):
    """CLS token + patch embeddings + (resampled) position embeddings."""

    def __init__(self, cfg: Dinov2Config, rngs: nnx.Rngs):
        self.config = cfg
        c = cfg.hidden_size
        self.cls_token = _param(_INIT, (None, None, "embed"), rngs, (1, 1, c))
        if cfg.use_mask_token:
            self.mask_token = _param(nnx.initializers.zeros_init(), (None, "embed"), rngs, (1, c))
        self.patch_embeddings = Dinov2PatchEmbeddings(cfg, rngs)
        n = cfg.grid_size**2
        self.position_embeddings = _param(_INIT, (None, None, "embed"), rngs, (1, n + 1, c))

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int, antialias: bool) -> jax.Array:
        """Position embeddings for a grid_h x grid_w patch grid: [1, 1 + grid_h * grid_w, C].

        transformers `Dinov2Embeddings.interpolate_pos_encoding` (antialias=False) and timm
        `resample_abs_pos_embed` (antialias=True): bicubic `F.interpolate(size=(grid_h, grid_w))`
        of the square trained grid, in float32, the CLS position passed through.
        """
        pos = self.position_embeddings[...]
        g = self.config.grid_size
        if grid_h == g and grid_w == g:
            return pos  # both libraries return the trained table unchanged
        wh = jnp.asarray(bicubic_matrix(g, grid_h, antialias=antialias), jnp.float32)
        ww = jnp.asarray(bicubic_matrix(g, grid_w, antialias=antialias), jnp.float32)
        grid = pos[0, 1:].reshape(g, g, -1).astype(jnp.float32)
        grid = jnp.einsum("ah,hwc,bw->abc", wh, grid, ww, precision=jax.lax.Precision.HIGHEST)
        patch_pos = grid.reshape(1, grid_h * grid_w, -1).astype(pos.dtype)
        return jnp.concatenate([pos[:, :1], patch_pos], axis=1)

    def __call__(self, pixel_values, bool_masked_pos=None, *, antialias: bool):
        b, h, w, _ = pixel_values.shape
        x = self.patch_embeddings(pixel_values)  # [B, N, C]
        dtype = x.dtype
        if bool_masked_pos is not None:
            if not self.config.use_mask_token:
                raise ValueError("bool_masked_pos needs a model with use_mask_token=True")
            mask = bool_masked_pos[..., None]
            x = jnp.where(mask, self.mask_token[...].astype(dtype)[None], x)
        cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)  # [B, 1 + N, C]
        p = self.config.patch_size
        pos = self.interpolate_pos_encoding(h // p, w // p, antialias)
        return x + pos.astype(dtype)


class Dinov2Attention(nnx.Module):
    """Multi-head self-attention; softmax in float32 (jax.nn.dot_product_attention)."""

    def __init__(self, cfg: Dinov2Config, rngs: nnx.Rngs):
        dtype, c = jnp.dtype(cfg.dtype), cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj = _linear(c, c, ("embed", "heads"), rngs, dtype, bias=cfg.qkv_bias)
        self.k_proj = _linear(c, c, ("embed", "heads"), rngs, dtype, bias=cfg.qkv_bias)
        self.v_proj = _linear(c, c, ("embed", "heads"), rngs, dtype, bias=cfg.qkv_bias)
        self.o_proj = _linear(c, c, ("heads", "embed"), rngs, dtype)

    def __call__(self, x):  # [B, T, C]
        b, t, _ = x.shape
        heads = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = (f(x).reshape(b, t, self.num_heads, self.head_dim) for f in heads)
        out = attention.dot_product_attention(q, k, v, scale=self.head_dim**-0.5)  # [B, T, H, D]
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))


class Dinov2LayerScale(nnx.Module):
    def __init__(self, cfg: Dinov2Config, rngs: nnx.Rngs):
        init = nnx.initializers.constant(cfg.layerscale_value)
        self.lambda1 = _param(init, ("embed",), rngs, (cfg.hidden_size,))

    def __call__(self, x):
        return x * self.lambda1[...].astype(x.dtype)


class Dinov2MLP(nnx.Module):
    """fc1 -> GELU (exact, erf) -> fc2."""

    def __init__(self, cfg: Dinov2Config, rngs: nnx.Rngs):
        dtype, c, h = jnp.dtype(cfg.dtype), cfg.hidden_size, cfg.mlp_hidden_size
        self.fc1 = _linear(c, h, ("embed", "mlp"), rngs, dtype)
        self.fc2 = _linear(h, c, ("mlp", "embed"), rngs, dtype)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Dinov2SwiGLUFFN(nnx.Module):
    """down(silu(gate(x)) * up(x)) (transformers 5 names; checkpoints fuse gate/up as weights_in)."""

    def __init__(self, cfg: Dinov2Config, rngs: nnx.Rngs):
        dtype, c, h = jnp.dtype(cfg.dtype), cfg.hidden_size, cfg.mlp_hidden_size
        self.gate_proj = _linear(c, h, ("embed", "mlp"), rngs, dtype)
        self.up_proj = _linear(c, h, ("embed", "mlp"), rngs, dtype)
        self.down_proj = _linear(h, c, ("mlp", "embed"), rngs, dtype)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Dinov2Layer(nnx.Module):
    """Pre-norm block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))) (timm `Block`)."""

    def __init__(self, cfg: Dinov2Config, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(cfg, rngs)
        self.attention = Dinov2Attention(cfg, rngs)
        self.layer_scale1 = Dinov2LayerScale(cfg, rngs)
        self.norm2 = _layer_norm(cfg, rngs)
        self.mlp = Dinov2SwiGLUFFN(cfg, rngs) if cfg.use_swiglu_ffn else Dinov2MLP(cfg, rngs)
        self.layer_scale2 = Dinov2LayerScale(cfg, rngs)

    def __call__(self, x):
        dtype = x.dtype
        x = x + self.layer_scale1(self.attention(self.norm1(x).astype(dtype)))
        return x + self.layer_scale2(self.mlp(self.norm2(x).astype(dtype)))


class Dinov2Encoder(nnx.Module):
    def __init__(self, cfg: Dinov2Config, rngs: nnx.Rngs):
        self.layer = nnx.List([Dinov2Layer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x):
        for layer in self.layer:
            x = layer(x)
        return x


class Dinov2Model(nnx.Module):
    """`pixel_values [B, H, W, C] -> last_hidden_state [B, 1 + (H/p)(W/p), hidden]` (float32).

    transformers `Dinov2Model.forward(...).last_hidden_state` (the final LayerNorm applied, CLS
    first), in NHWC. Dropout and drop path are inference no-ops there and are left out here.
    """

    def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = Dinov2Embeddings(config, rngs)
        self.encoder = Dinov2Encoder(config, rngs)
        self.layernorm = _layer_norm(config, rngs)

    def _check_input(self, x):
        cfg = self.config
        if not hasattr(x, "shape") or x.ndim != 4 or x.shape[-1] != cfg.num_channels:
            raise ValueError(
                f"Dinov2Model expects pixel_values [B, H, W, {cfg.num_channels}] (NHWC), got shape "
                f"{getattr(x, 'shape', type(x))}. Transpose NCHW input with x.transpose(0, 2, 3, 1)."
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"Dinov2Model expects floating-point pixel values, got dtype {x.dtype}"
            )
        if x.shape[1] < cfg.patch_size or x.shape[2] < cfg.patch_size:
            raise ValueError(
                f"image {x.shape[1]}x{x.shape[2]} is smaller than one {cfg.patch_size}x"
                f"{cfg.patch_size} patch"
            )

    def __call__(self, pixel_values, *, bool_masked_pos=None, antialias: bool | None = None):
        """`antialias` overrides `config.interpolate_antialias` (position-embedding resampling)."""
        self._check_input(pixel_values)
        antialias = self.config.interpolate_antialias if antialias is None else antialias
        x = pixel_values.astype(jnp.dtype(self.config.dtype))
        x = self.embeddings(x, bool_masked_pos, antialias=antialias)  # [B, 1 + N, C]
        x = self.encoder(x)
        return self.layernorm(x).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# The frozen teacher
# ---------------------------------------------------------------------------------------------


class FrozenParam(nnx.Variable):
    """A weight of a frozen module: not an `nnx.Param`, so `nnx.Optimizer(..., wrt=nnx.Param)`
    and `nnx.grad` (which differentiates `nnx.Param` by default) leave it alone."""


def freeze(module: nnx.Module) -> nnx.Module:
    """Turns every `nnx.Param` of `module` into a `FrozenParam` in place (metadata, including
    the logical sharding annotation, is kept). Returns the module."""
    params = [(path, var) for path, var in nnx.iter_graph(module) if isinstance(var, nnx.Param)]
    for path, var in params:
        parent = module
        for part in path[:-1]:
            parent = parent[part] if isinstance(parent, nnx.List) else getattr(parent, part)
        frozen = FrozenParam(var.get_value(), **var.get_metadata())
        if isinstance(parent, nnx.List):
            parent[path[-1]] = frozen
        else:
            setattr(parent, path[-1], frozen)
    return module


class DinoV2Teacher(nnx.Module):
    """The VF-loss teacher: VAE images [B, H, W, 3] in [-1, 1] -> patch tokens [B, g, g, C].

    Reference `aux_foundation_model.forward_dinov2`: bilinear resize to `resolution` (224) with
    `F.interpolate(align_corners=False)`, the ViT with timm's antialiased position-embedding
    resampling (37x37 -> 16x16), `forward_features(x)[:, 1:]` (after the final LayerNorm), as a
    g x g grid (g = 224 / 14 = 16, the latent grid of a 256-pixel f16 VAE). The output is
    float32 and carries no gradient (`stop_gradient`). The wrapped model's weights become
    `FrozenParam`s (in place), so optimizers over `nnx.Param` never see them.

    Options (defaults reproduce the reference):
      normalize: "none" feeds the [-1, 1] images straight in, as the reference does;
        "imagenet" maps them to [0, 1] and applies the ImageNet mean/std DINOv2 was trained with.
      interpolate_antialias: True is timm's position-embedding resampling (the reference's),
        False transformers' `Dinov2Model`.
    """

    def __init__(
        self,
        model: Dinov2Model,
        *,
        resolution: int = 224,
        normalize: str = "none",
        interpolate_antialias: bool = True,
    ):
        if normalize not in ("none", "imagenet"):
            raise ValueError(f"normalize={normalize!r}: expected 'none' (reference) or 'imagenet'")
        cfg = model.config
        if resolution % cfg.patch_size:
            raise ValueError(
                f"resolution={resolution} is not a multiple of the patch size {cfg.patch_size}"
            )
        self.model = freeze(model)
        self.resolution = resolution
        self.normalize = normalize
        self.interpolate_antialias = interpolate_antialias
        self.feature_dim = cfg.hidden_size
        self.grid_size = resolution // cfg.patch_size

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, *, dtype: str = "float32", **options):
        return cls(load_dinov2(path_or_hub_id, dtype=dtype), **options)

    def __call__(self, images) -> jax.Array:
        if not hasattr(images, "shape") or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"DinoV2Teacher expects VAE images [B, H, W, 3] (NHWC) in [-1, 1], got shape "
                f"{getattr(images, 'shape', type(images))}"
            )
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(
                f"DinoV2Teacher expects floating-point images in [-1, 1], got dtype "
                f"{images.dtype}. Convert uint8 with x.astype(np.float32) / 127.5 - 1."
            )
        b = images.shape[0]
        x = resize_bilinear(images.astype(jnp.float32), (self.resolution, self.resolution))
        if self.normalize == "imagenet":
            mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
            std = jnp.asarray(IMAGENET_STD, jnp.float32)
            x = ((x + 1.0) * 0.5 - mean) / std
        tokens = self.model(x, antialias=self.interpolate_antialias)[:, 1:]  # [B, g*g, C]
        g = self.grid_size
        return jax.lax.stop_gradient(tokens.reshape(b, g, g, self.feature_dim))  # [B, g, g, C]


# ---------------------------------------------------------------------------------------------
# Checkpoint names -> our module paths
# ---------------------------------------------------------------------------------------------

# transformers 4.x names (what save_pretrained writes in 4.x and 5.x, and the hub files hold)
# -> transformers 5 module names (ours).
_LEGACY_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
    (".mlp.weights_out.", ".mlp.down_proj."),
)
_NORMS = ("norm1", "norm2", "layernorm")


def _split_rows(key: str, value: np.ndarray, parts: int) -> list[np.ndarray]:
    value = np.asarray(value)
    if value.shape[0] % parts:
        raise ConversionError(
            f"{key} {value.shape}: the first axis must split into {parts} equal parts"
        )
    return np.split(value, parts, axis=0)


def _empty_model(config: Dinov2Config) -> Dinov2Model:
    """The model with abstract weights: loaders fill them in without a random initialisation."""
    return nnx.eval_shape(lambda: Dinov2Model(config, rngs=nnx.Rngs(0)))


def _materialize(model: Dinov2Model) -> Dinov2Model:
    """Loaded numpy weights -> jax arrays; weights a checkpoint may omit (mask_token) -> zeros."""
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        if isinstance(value, jax.ShapeDtypeStruct):
            value = np.zeros(value.shape, value.dtype)
        var.set_value(jnp.asarray(value))
    return model


def _canonical_transformers(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers 4.x / 5.x torch names -> transformers 5 names (fused SwiGLU input split)."""
    out = {}
    for key, value in state_dict.items():
        new = key
        for old, repl in _LEGACY_RENAMES:
            new = new.replace(old, repl)
        if ".mlp.weights_in." in new:
            gate, up = _split_rows(key, value, 2)
            out[new.replace(".weights_in.", ".gate_proj.")] = gate
            out[new.replace(".weights_in.", ".up_proj.")] = up
            continue
        out[new] = value
    return out


def _our_path(key: str) -> str | None:
    """transformers 5 torch name -> our dotted path (`.weight` is `kernel`, or `scale` in norms)."""
    if not key.endswith(".weight"):
        return key
    module = key[: -len(".weight")]
    leaf = "scale" if module.rsplit(".", 1)[-1] in _NORMS else "kernel"
    return f"{module}.{leaf}"


def from_transformers_state_dict(
    state_dict: Mapping[str, np.ndarray],
    config: Dinov2Config,
) -> Dinov2Model:
    """A `Dinov2Model` from a transformers `Dinov2Model` state dict (torch layouts, numpy arrays).

    Accepts the checkpoint names (`attention.attention.query`, `mlp.weights_in`: what the hub
    files hold and `save_pretrained` writes) and transformers 5's module names (`q_proj`,
    `gate_proj`). Strict: unknown or missing keys and shape mismatches raise one
    `ConversionError` (a ValueError) listing all of them.
    """
    model = _empty_model(config)
    state = _canonical_transformers(state_dict)
    assign(
        model,
        state,
        _our_path,
        what=f"transformers Dinov2Model({config})",
        variable_type=nnx.Param,
    )
    return _materialize(model)


def _timm_to_transformers(state_dict: Mapping[str, np.ndarray], config: Dinov2Config):
    """timm `vit_*_patch14_dinov2` names -> transformers 5 names; unknown keys pass unchanged."""
    if "reg_token" in state_dict or "register_tokens" in state_dict:
        raise ConversionError(
            "this timm state dict has register tokens (vit_*_reg4_dinov2): DINOv2 with registers "
            "is a different model (no CLS position embedding) and is not supported"
        )
    top = {
        "cls_token": "embeddings.cls_token",
        "mask_token": "embeddings.mask_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    block = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$")
    swiglu = config.use_swiglu_ffn
    inner = {
        "norm1": ["norm1"],
        "norm2": ["norm2"],
        "attn.proj": ["attention.o_proj"],
        "attn.qkv": ["attention.q_proj", "attention.k_proj", "attention.v_proj"],
        "ls1": ["layer_scale1"],
        "ls2": ["layer_scale2"],
        # timm packs SwiGLU (gate first) into fc1; the original DINOv2 repo calls them w12/w3.
        "mlp.fc1": ["mlp.gate_proj", "mlp.up_proj"] if swiglu else ["mlp.fc1"],
        "mlp.fc2": ["mlp.down_proj"] if swiglu else ["mlp.fc2"],
    }
    if swiglu:
        inner["mlp.w12"], inner["mlp.w3"] = inner["mlp.fc1"], inner["mlp.fc2"]
    out = {}
    for key, value in state_dict.items():
        if key in top:
            out[top[key]] = value
            continue
        m = block.match(key)
        if m is None or m.group(2) not in inner:
            out[key] = value  # reported as unexpected by `assign`
            continue
        layer, module, leaf = m.groups()
        leaf = "lambda1" if leaf == "gamma" else leaf
        targets = inner[module]
        parts = _split_rows(key, value, len(targets)) if len(targets) > 1 else [value]
        for target, part in zip(targets, parts):
            out[f"encoder.layer.{layer}.{target}.{leaf}"] = part
    return out


def from_timm_state_dict(state_dict: Mapping[str, np.ndarray], config: Dinov2Config) -> Dinov2Model:
    """A `Dinov2Model` from a timm `vit_*_patch14_dinov2` state dict (torch layouts, numpy).

    Names: `cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.{norm1, attn.qkv (fused
    q|k|v), attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}`, `norm.*`; for SwiGLU
    (giant) `mlp.fc1` is the packed [gate; up] projection (`mlp.w12`/`mlp.w3` in the original
    DINOv2 repo are accepted too). `mask_token` is optional (timm drops it; it is unused at
    inference and stays zero). The official VA-VAE `.pt` holds this under `foundation_model.model.`:
    strip that prefix first. Strict otherwise: one `ConversionError` lists unknown and missing
    keys and shape mismatches. The model keeps `config.interpolate_antialias`; the reference
    (timm) resamples position embeddings with antialiasing, which `DinoV2Teacher` does.
    """
    model = _empty_model(config)
    state = _timm_to_transformers(state_dict, config)
    assign(
        model,
        state,
        _our_path,
        what=f"timm DINOv2 ViT ({config})",
        variable_type=nnx.Param,
        allow_missing=("embeddings.mask_token",),
    )
    return _materialize(model)


def _flax_to_torch_layout(params: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """transformers Flax params (nested dict) -> torch names and layouts (flat dict)."""
    out = {}
    for name, value in params.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            out.update(_flax_to_torch_layout(value, key + "."))
            continue
        value = np.asarray(value)
        if name == "kernel":
            # Dense [in, out] -> Linear [out, in]; Conv HWIO -> OIHW
            value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
            key = key[: -len("kernel")] + "weight"
        elif name == "scale":
            key = key[: -len("scale")] + "weight"
        out[key] = value
    return out


def from_flax_params(params: Mapping[str, Any], config: Dinov2Config) -> Dinov2Model:
    """A `Dinov2Model` from transformers 4.x `FlaxDinov2Model` params (`flax_model.msgpack`).

    Layout (checked against FlaxDinov2Model of transformers 4.57.6, see tests/test_foundation.py):
    the torch module names (`embeddings.patch_embeddings.projection`,
    `encoder.layer.N.attention.attention.query`, `attention.output.dense`, `layer_scale1.lambda1`,
    `mlp.fc1` / `mlp.weights_in`, `layernorm`) as nested dicts, Dense `kernel` [in, out], Conv
    `kernel` HWIO, LayerNorm `scale`/`bias`. The stored `lambda1` is used as PyTorch uses it:
    FlaxDinov2Model itself multiplies it by `layerscale_value` twice, which changes nothing for
    the hub checkpoints (layerscale_value 1.0) but makes that Flax model differ from the PyTorch
    one for other values.
    """
    if "params" in params and isinstance(params["params"], Mapping) and len(params) == 1:
        params = params["params"]
    return from_transformers_state_dict(_flax_to_torch_layout(params), config)


# ---------------------------------------------------------------------------------------------
# Loading from folders and the hub
# ---------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "flax_model.msgpack")


def _resolve_folder(path_or_hub_id: str | pathlib.Path, revision: str | None) -> pathlib.Path:
    name = str(path_or_hub_id)
    path = pathlib.Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"{path} is a file; load_dinov2 expects a transformers checkpoint folder "
                f"(config.json + one of {_WEIGHT_FILES}) or a hub id such as facebook/dinov2-large"
            )
        return path
    repo_id = HUB_IDS.get(name, name)
    if not _HUB_ID.match(repo_id):
        raise FileNotFoundError(
            f"{name!r} is neither an existing folder nor a hub id (owner/name such as "
            f"facebook/dinov2-large, or one of {sorted(HUB_IDS)})"
        )
    from huggingface_hub import snapshot_download  # only when the user asks for a download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json"]
    try:
        folder = pathlib.Path(
            snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=patterns)
        )
        if not any((folder / f).is_file() for f in _WEIGHT_FILES[:2]):  # a Flax-only repository
            snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=[_WEIGHT_FILES[2]])
    except LocalEntryNotFoundError as e:  # no network and not in the local hub cache
        raise FileNotFoundError(
            f"DINOv2 {repo_id!r} is not in the local Hugging Face cache and the hub cannot be "
            f"reached ({type(e).__name__}). On a machine without internet, download it "
            f"elsewhere (`huggingface-cli download {repo_id}`, or transformers' "
            f"Dinov2Model.from_pretrained(...).save_pretrained(folder)) and pass that folder, "
            f"e.g. --config.teacher.path=/path/to/dinov2-large"
        ) from e
    return folder


def _read_safetensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(single)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(folder / shard))
    return state


def load_dinov2(
    path_or_hub_id: str | pathlib.Path, *, dtype: str = "float32", revision: str | None = None
) -> Dinov2Model:
    """A `Dinov2Model` from a transformers checkpoint folder or hub id (downloaded when asked).

    The folder holds `config.json` (model_type "dinov2") and the weights as PyTorch
    `model.safetensors` (or a sharded index), read with `safetensors.numpy` (no torch), or as the
    transformers 4.x Flax `flax_model.msgpack` (read with `flax.serialization.msgpack_restore`).
    Preset names (`dinov2-large`) stand for their hub ids (`facebook/dinov2-large`).
    """
    folder = _resolve_folder(path_or_hub_id, revision)
    config_file = folder / "config.json"
    present = sorted(p.name for p in folder.iterdir())
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json; expected a transformers Dinov2Model checkpoint "
            f"folder (config.json + one of {_WEIGHT_FILES}). It holds: {present[:20]}"
        )
    config = Dinov2Config.from_hf_dict(json.loads(config_file.read_text()), dtype=dtype)
    what = f"the checkpoint in {folder}"
    if (folder / "model.safetensors").is_file() or (folder / _WEIGHT_FILES[1]).is_file():
        state = _read_safetensors(folder)
        return _with_context(lambda: from_transformers_state_dict(state, config), what)
    if (folder / "flax_model.msgpack").is_file():
        from flax.serialization import msgpack_restore

        params = msgpack_restore((folder / "flax_model.msgpack").read_bytes())
        return _with_context(lambda: from_flax_params(params, config), what)
    hint = ""
    if (folder / "pytorch_model.bin").is_file():
        hint = (
            " It has pytorch_model.bin, which needs torch to read: re-save it with "
            "Dinov2Model.from_pretrained(folder).save_pretrained(folder) (writes safetensors)."
        )
    raise FileNotFoundError(
        f"{folder} has no DINOv2 weights: expected one of {_WEIGHT_FILES}; it holds "
        f"{present[:20]}.{hint}"
    )


def _with_context(load, what: str) -> Dinov2Model:
    try:
        return load()
    except ConversionError as e:
        raise ConversionError(f"{what}: {e}") from e


def count_params(module: nnx.Module) -> int:
    """Number of weights (trainable `nnx.Param` and frozen `FrozenParam`)."""
    state = nnx.state(module, nnx.Any(nnx.Param, FrozenParam))
    return sum(x.size for x in jax.tree.leaves(state))
