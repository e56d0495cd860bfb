"""LightningDiT, the diffusion transformer of "Reconstruction vs. Generation", in Flax NNX (NHWC).

Ported from the reference `models/lightningdit.py` (LightningDiT, LightningDiTBlock, Attention,
TimestepEmbedder, LabelEmbedder, FinalLayer, sin-cos position table), `models/rmsnorm.py`
(RMSNorm), `models/swiglu_ffn.py` (SwiGLUFFN), `models/pos_embed.py` (VisionRotaryEmbeddingFast)
and timm's `PatchEmbed` / `Mlp`. Class and attribute names follow the reference so that checkpoint
conversion maps one to one; the exceptions are the indices of `nn.Sequential` members, which
become `mlp_0`, `mlp_2` (TimestepEmbedder) and `adaLN_modulation` (the Linear after the SiLU).

The `depth` blocks are created stacked (`nnx.vmap`) and applied with `nnx.scan`: one block is
traced and compiled once, whatever the depth. Each parameter of `blocks` has a leading `depth` axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from vavae_jax.runtime import attention
from vavae_jax.runtime import sharding as _sharding  # noqa: F401  (eager sharding off)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Rematerialisation of each block in the backward pass (`jax.checkpoint` policies).
REMAT_POLICIES = {
    "none": None,  # no remat: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Matmul outputs plus the compute-dtype tensors named in the block (`SAVED_NAMES`): the
    # backward pass then recomputes only the float32 norm statistics, never the attention.
    "save_bf16": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(
            "mod_attn", "q_rope", "k_rope", "attn_out", "mod_mlp", "mlp_act"
        ),
    ),
}


@dataclasses.dataclass(frozen=True)
class LightningDiTConfig:
    """Field names and defaults follow the reference `LightningDiT.__init__`.

    `dtype` is the compute dtype of the matmuls (parameters stay float32; norms, softmax and the
    residual stream run in float32). `remat_policy` is a key of `REMAT_POLICIES`, applied to each
    scanned block; `scan_unroll` is the unroll factor of the scan over blocks. `scan_layers=False`
    applies the stacked blocks one after the other in a Python loop (one copy of the block in the
    program per layer: longer compiles, but no stacking of the saved activations across layers).
    `attention_impl`: "auto" (cuDNN flash attention on GPU in bf16/fp16, else XLA), "xla",
    "cudnn").
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 32
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = False
    use_qknorm: bool = False
    use_swiglu: bool = False
    use_rope: bool = False
    use_rmsnorm: bool = False
    wo_shift: bool = False
    dtype: str = "float32"
    remat_policy: str = "none"
    scan_unroll: int = 1
    scan_layers: bool = True
    attention_impl: str | None = "auto"

    def __post_init__(self):
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.input_size % self.patch_size:
            problems.append(
                f"input_size={self.input_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.hidden_size % 4:
            problems.append(
                f"hidden_size={self.hidden_size}: the 2-D sin-cos position table needs a "
                f"multiple of 4"
            )
        if self.use_rope and (self.hidden_size // self.num_heads) % 4:
            problems.append(
                f"use_rope needs a head dimension divisible by 4, got "
                f"{self.hidden_size // self.num_heads}"
            )
        if self.dtype not in DTYPES:
            problems.append(f"dtype={self.dtype!r}: expected one of {sorted(DTYPES)}")
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(
                f"remat_policy={self.remat_policy!r}: expected one of {sorted(REMAT_POLICIES)}"
            )
        if not 0.0 <= self.class_dropout_prob < 1.0:
            problems.append(f"class_dropout_prob={self.class_dropout_prob} must be in [0, 1)")
        if self.depth < 1 or self.scan_unroll < 1:
            problems.append(f"depth={self.depth} and scan_unroll={self.scan_unroll} must be >= 1")
        if problems:
            raise ValueError("invalid LightningDiTConfig: " + "; ".join(problems))

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def dense_custom_grad(self) -> bool:
        """Whether the blocks' linear layers use `dense`'s backward: only without remat, where
        it measured faster (BENCHMARKS.md run 29)."""
        return self.remat_policy == "none"

    @property
    def null_label(self) -> int:
        """The label of the unconditional embedding (exists when class_dropout_prob > 0)."""
        return self.num_classes


# Sizes of the reference `LightningDiT_models`; the switches are those of the paper's models
# (reference configs/lightningdit_xl_vavae_f16d32.yaml) on VA-VAE f16d32 latents of 256 images.
_PAPER = dict(
    input_size=16,
    in_channels=32,
    use_qknorm=False,
    use_swiglu=True,
    use_rope=True,
    use_rmsnorm=True,
    wo_shift=False,
)
_SIZES = {  # name: (depth, hidden_size, patch_size, num_heads)
    "B/1": (12, 768, 1, 12),
    "B/2": (12, 768, 2, 12),
    "L/2": (24, 1024, 2, 16),
    "XL/1": (28, 1152, 1, 16),
    "XL/2": (28, 1152, 2, 16),
    "1p0B/1": (24, 1536, 1, 24),
    "1p0B/2": (24, 1536, 2, 24),
    "1p6B/1": (28, 1792, 1, 28),
    "1p6B/2": (28, 1792, 2, 28),
}
PRESETS: dict[str, LightningDiTConfig] = {
    name: LightningDiTConfig(depth=d, hidden_size=h, patch_size=p, num_heads=n, **_PAPER)
    for name, (d, h, p, n) in _SIZES.items()
}
# A tiny model for CPU tests and quick runs (the shape of ../shared/fixtures/lightningdit_tiny_*).
PRESETS["tiny"] = LightningDiTConfig(
    input_size=8,
    in_channels=8,
    hidden_size=64,
    depth=2,
    num_heads=4,
    patch_size=1,
    num_classes=10,
    **{k: v for k, v in _PAPER.items() if k not in ("input_size", "in_channels")},
)
# The tiny width on the latents of the small VA-VAE (configs/vavae_f16d32.py:small: 16x16x32 of
# 64 px images, f4) and ImageNet's 1000 classes: the CPU generation chain of the README.
PRESETS["tiny/2"] = LightningDiTConfig(
    hidden_size=64, depth=2, num_heads=4, patch_size=2, num_classes=1000, **_PAPER
)


class Buffer(nnx.Variable):
    """Fixed state saved with the model but never trained (the reference's `requires_grad=False`
    parameter `pos_embed`). Optimizers built with `wrt=nnx.Param` leave it alone."""


# ---------------------------------------------------------------------------------------------
# Fixed tables: reference models/lightningdit.py (get_2d_sincos_pos_embed) and
# models/pos_embed.py (VisionRotaryEmbeddingFast), computed in numpy exactly as there.


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """[grid_size**2, embed_dim]: the first half encodes the column (w), the second the row (h)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # w goes first, as in MAE
    emb_a = _1d_sincos(embed_dim // 2, grid[0])
    emb_b = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_a, emb_b], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [D/2]
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # [M, D/2]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def rope_tables(head_dim: int, grid_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each [grid_size**2, head_dim], of the EVA-02 2-D rotary embedding.

    Reference `VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid_size)`: each frequency
    is repeated twice (interleaved pairs), the first `head_dim // 2` features rotate with the row
    index and the others with the column index; float32 as in torch.
    """
    dim = head_dim // 2
    freqs = 1.0 / (
        10000.0 ** (np.arange(0, dim, 2, dtype=np.float32)[: dim // 2] / np.float32(dim))
    )
    t = np.arange(grid_size, dtype=np.float32) / np.float32(grid_size) * np.float32(grid_size)
    freqs = np.einsum("i,f->if", t, freqs.astype(np.float32)).astype(np.float32)
    freqs = np.repeat(freqs, 2, axis=-1)  # [L, dim]: f0 f0 f1 f1 ...
    rows = np.broadcast_to(freqs[:, None, :], (grid_size, grid_size, dim))
    cols = np.broadcast_to(freqs[None, :, :], (grid_size, grid_size, dim))
    table = np.concatenate([rows, cols], axis=-1).reshape(grid_size * grid_size, 2 * dim)
    return np.cos(table).astype(np.float32), np.sin(table).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, H]: x * cos + rotate_half(x) * sin, where `rotate_half` maps each pair of
    features (2i, 2i+1) to (-x[2i+1], x[2i]).

    rotate_half(x) * sin is computed as swap(x) * (sign * sin), swap exchanging the two features
    of each pair and sign = (-1, +1, -1, ...): the same products, but a reversal XLA fuses into one
    elementwise loop instead of the stack (a concatenate) that costs ~1.6x the memory time.
    """
    return x * cos[:, None, :] + _swap_pairs(x) * _signed_sin(sin)[:, None, :]


def _swap_pairs(x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)


def _signed_sin(sin: jax.Array) -> jax.Array:
    """sin * (-1, +1, -1, ...): rotate_half(x) * sin == _swap_pairs(x) * _signed_sin(sin)."""
    return sin * jnp.tile(jnp.asarray([-1.0, 1.0], sin.dtype), sin.shape[-1] // 2)


@jax.custom_vjp
def split_rope(qkv: jax.Array, cos: jax.Array, sin: jax.Array):
    """qkv [B, T, 3, N, H] -> (apply_rope(q), apply_rope(k), v), each [B, T, N, H] in qkv's dtype.

    The same values as slicing and `apply_rope`; the backward pass writes the gradient of the
    fused qkv projection in one fusion (RoPE's transpose of dq and dk next to dv) instead of
    materialising the three parts and then copying them into one buffer (a [tokens, 3 x hidden]
    concatenate per layer that XLA does not fuse: 7.4 ms of an XL/1 step at batch 64).
    """
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    return apply_rope(q, cos, sin).astype(v.dtype), apply_rope(k, cos, sin).astype(v.dtype), v


def _split_rope_fwd(qkv, cos, sin):
    return split_rope(qkv, cos, sin), (cos, sin)


def _split_rope_bwd(res, grads):
    cos, sin = res
    dq, dk, dv = grads
    c, s = cos[:, None, :], _signed_sin(sin)[:, None, :]

    def rope_t(dy):  # the transpose of x -> x * c + swap(x) * s; swap is its own inverse
        dy = dy.astype(jnp.float32)
        return (dy * c + _swap_pairs(dy * s)).astype(dv.dtype)

    dqkv = jnp.stack([rope_t(dq), rope_t(dk), dv], axis=2)
    return dqkv, jnp.zeros_like(cos), jnp.zeros_like(sin)


split_rope.defvjp(_split_rope_fwd, _split_rope_bwd)


@jax.custom_vjp
def swiglu(h: jax.Array) -> jax.Array:
    """h [..., 2n] -> silu(h[..., :n]) * h[..., n:] (reference SwiGLUFFN between w12 and w3).

    The forward pass also writes both halves' derivative coefficients, computed in float32 and
    stored in h's dtype as one [..., 2, n] residual; the backward pass is then one product with
    the incoming gradient, written as the [..., 2n] gradient of the w12 output in one fusion.
    Storing h instead made XLA write the first coefficient in float32 from the forward fusion
    anyway and read h again in the backward (BENCHMARKS.md, run 34).
    """
    a, b = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(a) * b


def swiglu_coefficients(h: jax.Array) -> jax.Array:
    """d out / d h of `swiglu` per element, in float32, as [..., 2, n]: d/da, then d/db."""
    n = h.shape[-1] // 2
    h2 = h.astype(jnp.float32).reshape(*h.shape[:-1], 2, n)
    a, b = h2[..., :1, :], h2[..., 1:, :]
    sig = jax.nn.sigmoid(a)
    first = jax.lax.broadcasted_iota(jnp.int32, (2, n), 0) == 0
    return jnp.where(first, b * sig * (1.0 + a * (1.0 - sig)), a * sig)


def _swiglu_fwd(h):
    return swiglu(h), swiglu_coefficients(h).astype(h.dtype)


def _swiglu_bwd(coef, g):
    # One elementwise product over [..., 2, n] (the coefficients already side by side), not two
    # halves joined by a concatenate: XLA computed the halves in one kernel and then copied
    # them into the [..., 2n] gradient twice (once per consumer GEMM), 7.4 ms of an XL/1 step
    # at batch 64 on an H100.
    grad = g.astype(jnp.float32)[..., None, :] * coef.astype(jnp.float32)
    return (grad.astype(coef.dtype).reshape(*coef.shape[:-2], -1),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


# ---------------------------------------------------------------------------------------------
# Layers


@jax.custom_vjp
def dense(x, kernel, bias):
    """`x @ kernel + bias` (x [..., in], kernel [in, out], bias [out], one dtype), as nnx.Linear
    computes it, with a backward pass that writes the kernel's gradient as [in, out] directly.

    Autodiff computes that gradient as dy^T @ x, [out, in], and transposes it; XLA folded the
    transpose into the kernel that stacks the 28 layers' gradients for AdamW, which then ran at
    0.45-0.7 TB/s. Here it is one product contracting the token axes, x^T @ dy. Same operations
    forward. BENCHMARKS.md run 29, train steps without remat: XL/1 b64 122.4 -> 121.2 ms, B/1
    b256 100.0 -> 98.2 ms; with remat (`dots_no_batch`) it was slower (250.4 -> 260.3 ms: the
    policy cannot see into a custom VJP), so `Dense` uses it only where the blocks are not
    rematerialised.
    """
    return jnp.dot(x, kernel) + bias


def _dense_fwd(x, kernel, bias):
    return dense(x, kernel, bias), (x, kernel)


def _dense_bwd(res, dy):
    x, kernel = res
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dx = jnp.dot(dy, kernel.T)
    d_kernel = jax.lax.dot_general(x2, dy2, (((0,), (0,)), ((), ())))  # [in, out]
    return dx, d_kernel, jnp.sum(dy2, axis=0)


dense.defvjp(_dense_fwd, _dense_bwd)


class Dense(nnx.Linear):
    """nnx.Linear (same parameters, names and forward); with `custom_grad` its product goes
    through `dense`."""

    def __init__(self, *args, custom_grad: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.custom_grad = custom_grad

    def __call__(self, inputs, out_sharding=None):
        if (
            not self.custom_grad
            or self.bias is None
            or out_sharding is not None
            or self.preferred_element_type is not None
        ):
            return super().__call__(inputs, out_sharding)
        x, kernel, bias = self.promote_dtype(
            (inputs, self.kernel[...], self.bias[...]), dtype=self.dtype
        )
        return dense(x, kernel, bias)


def _dense(
    cin: int,
    cout: int,
    rngs: nnx.Rngs,
    dtype,
    axes: tuple,
    *,
    init=None,
    bias: bool = True,
    custom_grad: bool = False,
) -> Dense:
    """nn.Linear with the reference's `_basic_init` (xavier-uniform weight, zero bias)."""
    init = init or nnx.initializers.xavier_uniform()
    return Dense(
        cin,
        cout,
        custom_grad=custom_grad,
        use_bias=bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(init, axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """Reference models/rmsnorm.py: x * rsqrt(mean(x^2) + eps) in float32, times `weight`."""

    def __init__(self, dim: int, eps: float = 1e-6, axis_name: str | None = "embed"):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=(axis_name,))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * self.weight[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis in float32 (affine or not)."""

    def __init__(
        self, dim: int, eps: float, elementwise_affine: bool, axis_name: str | None = "embed"
    ):
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=(axis_name,))
            self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), out_sharding=(axis_name,))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        x32 = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.elementwise_affine:
            x32 = x32 * self.weight[...] + self.bias[...]
        return x32.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def rms_modulate(x, weight, scale, shift, eps: float, out_dtype):
    """`modulate(RMSNorm(x), shift, scale).astype(out_dtype)` with the same forward operations
    (x [B, T, D] float32; weight [D]; scale, shift [B, D]; zeros for no shift), and a backward
    pass written for XLA's fusions.

    Autodiff of the two layers gives reductions of different shapes per call site (the norm
    weight's gradient over every token, scale's and shift's per image, the row statistic), and
    XLA spent a pass over the float32 activations on the weight's gradient alone. Here the
    parameter gradients come from two per-image sums of one shape, S = sum_t g * xhat (computed
    in the kernel that writes dx) and sum_t g: d scale = weight * S, d weight =
    sum_b (1 + scale_b) * S_b, d shift = sum_t g. XL/1 train step on one H100: 126.1-126.6 ->
    123.3 ms (BENCHMARKS.md, run 27).
    """
    return _rms_modulate(x, weight, scale, shift, eps, out_dtype)[0]


def _rms_modulate(x, weight, scale, shift, eps, out_dtype):
    x32 = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    y = (x32 * r) * weight
    out = (y * (1 + scale[:, None, :]) + shift[:, None, :]).astype(out_dtype)
    return out, r


def _rms_modulate_fwd(x, weight, scale, shift, eps, out_dtype):
    out, r = _rms_modulate(x, weight, scale, shift, eps, out_dtype)
    return out, (x, r, weight, scale, shift)


def _rms_modulate_bwd(eps, out_dtype, res, dout):
    x, r, weight, scale, shift = res
    g = dout.astype(jnp.float32)
    x32 = x.astype(jnp.float32)
    xhat = x32 * r
    s_b = jnp.sum(g * xhat, axis=1)  # [B, D], fused into the kernel that writes dx
    d_shift = jnp.sum(g, axis=1)  # (a variadic reduce with s_b got a pass of its own: slower)
    dxhat = g * ((1 + scale[:, None, :]) * weight)
    c = jnp.mean(dxhat * xhat, axis=-1, keepdims=True)
    dx = (r * (dxhat - xhat * c)).astype(x.dtype)
    d_weight = jnp.sum((1 + scale) * s_b, axis=0)
    return (
        dx,
        d_weight.astype(weight.dtype),
        (weight * s_b).astype(scale.dtype),
        d_shift.astype(shift.dtype),
    )


rms_modulate.defvjp(_rms_modulate_fwd, _rms_modulate_bwd)


def _block_norm(dim: int, use_rmsnorm: bool):
    # LightningDiTBlock / FinalLayer: RMSNorm(dim) or LayerNorm(elementwise_affine=False, 1e-6).
    return RMSNorm(dim) if use_rmsnorm else LayerNorm(dim, 1e-6, elementwise_affine=False)


def modulate(x, shift, scale):
    """Reference `modulate`: x * (1 + scale) + shift, with shift None for `wo_shift`."""
    x = x * (1 + scale[:, None, :])
    return x if shift is None else x + shift[:, None, :]


class PatchEmbed(nnx.Module):
    """timm PatchEmbed: a p x p convolution with stride p, tokens in row-major order."""

    def __init__(self, config: LightningDiTConfig, rngs: nnx.Rngs, dtype):
        p = config.patch_size
        # The reference initialises the conv kernel like a Linear of fan_in = C*p*p.
        init = nnx.initializers.variance_scaling(
            1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3
        )
        self.proj = nnx.Conv(
            config.in_channels,
            config.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=nnx.with_partitioning(init, (None, None, "conv_in", "embed")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
            rngs=rngs,
        )

    def __call__(self, x):  # [B, H, W, C] -> [B, T, D]
        x = self.proj(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class TimestepEmbedder(nnx.Module):
    """Reference TimestepEmbedder: 256 sinusoidal frequencies (cos first), then SiLU MLP."""

    frequency_embedding_size = 256

    def __init__(self, hidden_size: int, rngs: nnx.Rngs, dtype):
        init = nnx.initializers.normal(0.02)
        self.mlp_0 = _dense(256, hidden_size, rngs, dtype, (None, "embed"), init=init)
        self.mlp_2 = _dense(hidden_size, hidden_size, rngs, dtype, ("mlp", "embed"), init=init)

    @staticmethod
    def timestep_embedding(t, dim: int, max_period: float = 10000.0):
        half = dim // 2
        freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
        args = t.astype(jnp.float32)[:, None] * freqs[None]
        emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
        if dim % 2:
            emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
        return emb

    def __call__(self, t):  # [B] -> [B, D]
        emb = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp_2(jax.nn.silu(self.mlp_0(emb))).astype(jnp.float32)


class LabelEmbedder(nnx.Module):
    """Reference LabelEmbedder: one extra row (the null label `num_classes`) when dropout > 0."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nnx.Embed(
            num_classes + use_cfg_embedding,
            hidden_size,
            param_dtype=jnp.float32,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")),
            rngs=rngs,
        )

    def token_drop(self, labels, rng):
        drop = jax.random.uniform(rng, labels.shape) < self.dropout_prob
        return jnp.where(drop, self.num_classes, labels)

    def __call__(self, labels, *, train: bool = False, rng: jax.Array | None = None):
        if train and self.dropout_prob > 0:
            if rng is None:
                raise ValueError(
                    "LabelEmbedder: train=True with class_dropout_prob > 0 needs an rng for the "
                    "label dropout; pass rng=... (or train=False for evaluation)"
                )
            labels = self.token_drop(labels, rng)
        return self.embedding_table(labels).astype(jnp.float32)


class Attention(nnx.Module):
    """Reference Attention: fused qkv with bias, optional QK-norm over the head dim, RoPE."""

    def __init__(self, config: LightningDiTConfig, rngs: nnx.Rngs, dtype):
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.implementation = config.attention_impl
        fast = config.dense_custom_grad
        self.qkv = _dense(d, 3 * d, rngs, dtype, ("embed", "heads"), custom_grad=fast)
        if config.use_qknorm:
            if config.use_rmsnorm:
                self.q_norm = RMSNorm(self.head_dim, axis_name=None)
                self.k_norm = RMSNorm(self.head_dim, axis_name=None)
            else:  # nn.LayerNorm(head_dim) with its default eps and affine
                self.q_norm = LayerNorm(self.head_dim, 1e-5, True, axis_name=None)
                self.k_norm = LayerNorm(self.head_dim, 1e-5, True, axis_name=None)
        else:
            self.q_norm = self.k_norm = None
        self.proj = _dense(d, d, rngs, dtype, ("heads", "embed"), custom_grad=fast)

    def __call__(self, x, rope=None):  # [B, T, D]
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim)
        if rope is not None and self.q_norm is None:
            q, k, v = split_rope(qkv, *rope)
            q, k = checkpoint_name(q, "q_rope"), checkpoint_name(k, "k_rope")
        else:
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, N, H]
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q = checkpoint_name(apply_rope(q, *rope).astype(v.dtype), "q_rope")
                k = checkpoint_name(apply_rope(k, *rope).astype(v.dtype), "k_rope")
        q, k, v = (
            _sharding.constrain_batch(q),
            _sharding.constrain_batch(k),
            _sharding.constrain_batch(v),
        )
        out = attention.dot_product_attention(q, k, v, implementation=self.implementation)
        out = checkpoint_name(_sharding.constrain_batch(out), "attn_out")
        return self.proj(out.reshape(b, t, d))


class Mlp(nnx.Module):
    """timm Mlp with GELU (tanh approximation)."""

    def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs, dtype, custom_grad: bool = False):
        self.fc1 = _dense(dim, hidden, rngs, dtype, ("embed", "mlp"), custom_grad=custom_grad)
        self.fc2 = _dense(hidden, dim, rngs, dtype, ("mlp", "embed"), custom_grad=custom_grad)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class SwiGLUFFN(nnx.Module):
    """Reference models/swiglu_ffn.py: w12 -> (silu(x1) * x2) -> w3."""

    def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs, dtype, custom_grad: bool = False):
        self.w12 = _dense(dim, 2 * hidden, rngs, dtype, ("embed", "mlp"), custom_grad=custom_grad)
        self.w3 = _dense(hidden, dim, rngs, dtype, ("mlp", "embed"), custom_grad=custom_grad)

    def __call__(self, x):
        h = swiglu(_sharding.constrain_batch(self.w12(x)))
        return self.w3(checkpoint_name(h, "mlp_act"))


class LightningDiTBlock(nnx.Module):
    """Reference LightningDiTBlock: adaLN-modulated attention and MLP with gated residuals."""

    def __init__(self, config: LightningDiTConfig, *, rngs: nnx.Rngs):
        dtype = DTYPES[config.dtype]
        d = config.hidden_size
        self.wo_shift = config.wo_shift
        self.compute_dtype = dtype
        self.norm1 = _block_norm(d, config.use_rmsnorm)
        self.norm2 = _block_norm(d, config.use_rmsnorm)
        self.attn = Attention(config, rngs, dtype)
        fast = config.dense_custom_grad
        mlp_hidden = int(d * config.mlp_ratio)
        if config.use_swiglu:
            self.mlp = SwiGLUFFN(d, int(2 / 3 * mlp_hidden), rngs, dtype, fast)
        else:
            self.mlp = Mlp(d, mlp_hidden, rngs, dtype, fast)
        n_mod = 4 if config.wo_shift else 6
        zeros = nnx.initializers.zeros_init()
        self.adaLN_modulation = _dense(
            d, n_mod * d, rngs, dtype, ("embed", "mlp"), init=zeros, custom_grad=fast
        )

    def __call__(self, x, c, rope=None):  # x [B, T, D] float32, c [B, D]
        mod = self.adaLN_modulation(jax.nn.silu(c)).astype(jnp.float32)
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(mod, 4, axis=-1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, -1)
        # The matmuls cast their inputs to the compute dtype anyway; casting here names the
        # tensor that a remat policy may keep (float32 statistics, compute-dtype result).
        x = _sharding.constrain_batch(x)
        h = self._norm_modulate(self.norm1, x, shift_msa, scale_msa)
        h = _sharding.constrain_batch(self.attn(checkpoint_name(h, "mod_attn"), rope))
        x = x + gate_msa[:, None, :] * h.astype(jnp.float32)
        h = self._norm_modulate(self.norm2, x, shift_mlp, scale_mlp)
        h = _sharding.constrain_batch(self.mlp(checkpoint_name(h, "mod_mlp")))
        return _sharding.constrain_batch(x + gate_mlp[:, None, :] * h.astype(jnp.float32))

    def _norm_modulate(self, norm, x, shift, scale):
        """modulate(norm(x), shift, scale) in the compute dtype (RMSNorm: `rms_modulate`)."""
        if isinstance(norm, RMSNorm) and x.dtype == jnp.float32:
            shift = jnp.zeros_like(scale) if shift is None else shift
            return rms_modulate(x, norm.weight[...], scale, shift, norm.eps, self.compute_dtype)
        return modulate(norm(x), shift, scale).astype(self.compute_dtype)


class FinalLayer(nnx.Module):
    """Reference FinalLayer: norm, adaLN (shift, scale), Linear to p*p*out_channels; zero init."""

    def __init__(self, config: LightningDiTConfig, *, rngs: nnx.Rngs):
        dtype = DTYPES[config.dtype]
        d, p = config.hidden_size, config.patch_size
        zeros = nnx.initializers.zeros_init()
        self.norm_final = _block_norm(d, config.use_rmsnorm)
        self.linear = _dense(
            d, p * p * config.out_channels, rngs, dtype, ("embed", None), init=zeros
        )
        self.adaLN_modulation = _dense(d, 2 * d, rngs, dtype, ("embed", "mlp"), init=zeros)

    def __call__(self, x, c):
        mod = self.adaLN_modulation(jax.nn.silu(c)).astype(jnp.float32)
        shift, scale = jnp.split(mod, 2, axis=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale)).astype(jnp.float32)


class LightningDiT(nnx.Module):
    """The velocity network v(x_t, t, y). Call as `model(x, t, y)`:

    x [B, H, W, C] (NHWC latents), t [B] float in [0, 1] (0 = noise, 1 = data), y [B] int labels
    where `num_classes` is the null label. `train=True` drops labels with `class_dropout_prob`
    (needs `rng`); evaluation is deterministic. Returns [B, H, W, in_channels] in float32.

    The blocks run under `nnx.scan`, so inside raw JAX control flow (`lax.cond`, `lax.scan`,
    `lax.while_loop` bodies) build the model there: `nnx.merge(graphdef, state, copy=True)`
    (NNX refuses Variables created at an outer trace level); `nnx.jit` / `nnx.grad` need nothing.
    """

    def __init__(self, config: LightningDiTConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = DTYPES[config.dtype]
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config, rngs, dtype)
        self.t_embedder = TimestepEmbedder(d, rngs, dtype)
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob, rngs)
        table = get_2d_sincos_pos_embed(d, config.grid_size)[None].astype(np.float32)
        self.pos_embed = Buffer(jnp.asarray(table), out_sharding=(None, None, "embed"))

        @nnx.split_rngs(splits=config.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
        def make_blocks(rngs):
            return LightningDiTBlock(config, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.final_layer = FinalLayer(config, rngs=rngs)

    def rope(self):
        if not self.config.use_rope:
            return None
        cos, sin = rope_tables(self.config.head_dim, self.config.grid_size)
        return jnp.asarray(cos), jnp.asarray(sin)

    def unpatchify(self, x):  # [B, T, p*p*C] -> [B, H, W, C]
        p, c, g = self.config.patch_size, self.config.out_channels, self.config.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = x.transpose(0, 1, 3, 2, 4, 5)  # reference einsum nhwpqc -> nchpwq, in NHWC
        return x.reshape(x.shape[0], g * p, g * p, c)

    def _check_inputs(self, x, t, y):
        cfg = self.config
        want = (cfg.input_size, cfg.input_size, cfg.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"LightningDiT expects x of shape [B, {want[0]}, {want[1]}, {want[2]}] (NHWC), "
                f"got {tuple(x.shape)}"
            )
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(
                f"LightningDiT expects t and y of shape [{x.shape[0]}], got t {tuple(t.shape)} "
                f"and y {tuple(y.shape)}"
            )

    def __call__(self, x, t, y, *, train: bool = False, rng: jax.Array | None = None):
        self._check_inputs(x, t, y)
        cfg = self.config
        h = self.x_embedder(x).astype(jnp.float32) + self.pos_embed[...]  # [B, T, D]
        c = self.t_embedder(t) + self.y_embedder(y, train=train, rng=rng)  # [B, D]
        rope = self.rope()

        def apply_block(h, block):
            return block(h, c, rope)

        policy = REMAT_POLICIES[cfg.remat_policy]
        if not cfg.scan_layers:
            h = self._apply_unrolled(h, c, rope, policy)
            out = self.unpatchify(self.final_layer(h, c))
            return out[..., : cfg.in_channels] if cfg.learn_sigma else out
        if cfg.remat_policy != "none":
            apply_block = nnx.remat(apply_block, policy=policy, prevent_cse=False)
        scan = nnx.scan(
            apply_block,
            in_axes=(nnx.Carry, 0),
            out_axes=nnx.Carry,
            unroll=cfg.scan_unroll,
            transform_metadata={nnx.PARTITION_NAME: None},
        )
        h = scan(h, self.blocks)
        out = self.unpatchify(self.final_layer(h, c))  # [B, H, W, out_channels]
        if cfg.learn_sigma:
            out = out[..., : cfg.in_channels]
        return out

    def _apply_unrolled(self, h, c, rope, policy):
        """The blocks in a Python loop over slices of the stacked parameters."""
        graphdef, state = nnx.split(self.blocks)

        def apply_block(h, layer_state):
            return nnx.merge(graphdef, layer_state, copy=True)(h, c, rope)

        if policy is not None:
            # prevent_cse: outside a scan XLA would otherwise merge the recomputation with
            # the forward pass and keep every activation (no remat at all).
            apply_block = jax.checkpoint(apply_block, policy=policy, prevent_cse=True)
        # One split per stacked parameter, not 28 index ops: the gradient of a split is one
        # concatenate, that of 28 indexings a sum of 28 zero-padded slices, which XLA fused into
        # the optimizer as 28 pads and adds per element (6.8 ms for the adaLN kernels of XL/1).
        depth = self.config.depth
        leaves, treedef = jax.tree.flatten(state)
        parts = [jnp.split(x, depth, axis=0) for x in leaves]
        for i in range(depth):
            layer = jax.tree.unflatten(treedef, [jnp.squeeze(p[i], 0) for p in parts])
            h = apply_block(h, layer)
        return h


def count_params(model: nnx.Module) -> int:
    """Parameters as the reference counts them (`model.parameters()`: trainable + pos_embed)."""
    state = nnx.state(model, nnx.Any(nnx.Param, Buffer))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def abstract_model(config: LightningDiTConfig) -> LightningDiT:
    """The model with `jax.ShapeDtypeStruct` leaves (no memory): shapes, counts, shardings."""
    return nnx.eval_shape(lambda: LightningDiT(config, rngs=nnx.Rngs(0)))
