"""LightningDiT, the diffusion transformer of "Reconstruction vs. Generation", in Flax NNX (NHWC).

Ported from the reference `models/lightningdit.py` (modulate, Attention, TimestepEmbedder,
LabelEmbedder, LightningDiTBlock, FinalLayer, LightningDiT, the sin-cos position table, the
`LightningDiT_models` sizes), in that file's order, after the layers it imports: torch's
`nn.Linear` / `nn.LayerNorm`, timm's `PatchEmbed` / `Mlp`, `models/swiglu_ffn.py` (SwiGLUFFN),
`models/pos_embed.py` (VisionRotaryEmbeddingFast) and `models/rmsnorm.py` (RMSNorm). Class and
attribute names follow the reference so that checkpoint conversion maps one to one; the
exceptions are the indices of `nn.Sequential` members, which become `mlp_0`, `mlp_2`
(TimestepEmbedder) and `adaLN_modulation` (the Linear after the SiLU). The ops with hand-written
backward passes (RoPE split, SwiGLU, the linear layers' kernel gradient, RMSNorm + modulate) are
in `kernels.py`, each with the benchmark run that justifies it.

The `depth` blocks are created stacked (`nnx.vmap`): each parameter of `blocks` has a leading
`depth` axis. `LightningDiTConfig.scan_layers` picks how they run. True: under `nnx.scan`, one
block traced and compiled once whatever the depth. False (the shipped config,
configs/lightningdit_xl_vavae_f16d32.py): a Python loop over slices of the stacked parameters,
one copy of the block per layer in the program (about twice the compile time; +14% XL/1
training on an H100, docs/bench/JOURNAL.md).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lightningdit_jax import fp8 as fp8_lib  # `fp8` is also a layer argument's name
from lightningdit_jax.kernels import apply_rope, dense, rms_modulate, split_rope, swiglu
from vavae_jax.runtime import attention
from vavae_jax.runtime import sharding as _sharding

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
    block on either path below. `scan_layers=True` applies the stacked blocks with `nnx.scan`,
    whose unroll factor is `scan_unroll`; `scan_layers=False` (what the shipped config uses)
    applies them one after the other in a Python loop (one copy of the block in the program per
    layer: longer compiles, but no stacking of the saved activations across layers).
    `attention_impl`: "auto" (cuDNN flash attention on GPU in bf16/fp16, else XLA), "xla",
    "cudnn"). `precision`: "default" (the matmuls in `dtype`), "fp8" (the blocks' linear layers
    multiply float8 operands, `lightningdit_jax.fp8`; GPUs with FP8 tensor cores only) or
    "fp8_emulated" (the same float8 rounding on any backend, without the speed: tests, checks).
    `fp8_scaling`: "current" (each scale from its tensor in the same call: no state) or "delayed"
    (from the last `fp8_amax_history` steps' maxima, kept as model state); see `fp8`.
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
    precision: str = "default"
    fp8_scaling: str = "current"
    fp8_amax_history: int = 16

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
        if self.precision not in fp8_lib.PRECISIONS:
            problems.append(
                f"precision={self.precision!r}: expected one of {list(fp8_lib.PRECISIONS)}"
            )
        if self.fp8_scaling not in fp8_lib.SCALINGS:
            problems.append(
                f"fp8_scaling={self.fp8_scaling!r}: expected one of {list(fp8_lib.SCALINGS)}"
            )
        if self.fp8_amax_history < 1:
            problems.append(f"fp8_amax_history={self.fp8_amax_history} must be >= 1")
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
        """Whether the blocks' linear layers use `kernels.dense`'s backward: only without remat,
        where it measured faster (docs/bench/JOURNAL.md run 29)."""
        return self.remat_policy == "none"

    @property
    def fp8(self) -> bool:
        """Whether the blocks' linear layers multiply in float8 (`precision` "fp8" or
        "fp8_emulated")."""
        return self.precision != "default"

    @property
    def fp8_spec(self) -> fp8_lib.Spec | None:
        """How the blocks' linear layers multiply in float8 (None: in `dtype`)."""
        if not self.fp8:
            return None
        return fp8_lib.Spec(self.fp8_amax_history if self.fp8_scaling == "delayed" else 0)

    @property
    def null_label(self) -> int:
        """The label of the unconditional embedding (exists when class_dropout_prob > 0)."""
        return self.num_classes


class Buffer(nnx.Variable):
    """Fixed state saved with the model but never trained (the reference's `requires_grad=False`
    parameter `pos_embed`). Optimizers built with `wrt=nnx.Param` leave it alone."""


# ---------------------------------------------------------------------------------------------
# Layers the reference imports: torch's nn.Linear and nn.LayerNorm, timm's PatchEmbed and Mlp,
# models/swiglu_ffn.py, models/pos_embed.py, models/rmsnorm.py.


class Dense(nnx.Linear):
    """torch's nn.Linear as nnx.Linear (same parameters, names and forward); with `custom_grad`
    its product goes through `kernels.dense` (kernel gradient written [in, out]); with `fp8`
    (an `fp8.Spec`) through `fp8.dense` (float8 operands; the kernel may be an `fp8.Fp8Weight`;
    with delayed scaling the layer holds its `fp8.AmaxHistory`, `amax`)."""

    def __init__(self, *args, custom_grad: bool = False, fp8=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.custom_grad = custom_grad
        self.fp8 = fp8
        if fp8 is not None and fp8.history:
            self.amax = fp8_lib.AmaxHistory(fp8_lib.initial_history(self.kernel[...], fp8.history))

    def __call__(self, inputs, out_sharding=None):
        if self.fp8:
            x = inputs.astype(self.dtype) if self.dtype is not None else inputs
            bias = self.bias[...] if self.bias is not None else None
            history = self.amax[...] if self.fp8.history else None
            return fp8_lib.dense(x, self.kernel[...], bias, history)
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
    fp8: fp8_lib.Spec | None = None,
) -> Dense:
    """nn.Linear with the reference's `_basic_init` (xavier-uniform weight, zero bias)."""
    init = init or nnx.initializers.xavier_uniform()
    return Dense(
        cin,
        cout,
        custom_grad=custom_grad,
        fp8=fp8,
        use_bias=bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_sharding.partitioned(init, axes),
        bias_init=_sharding.partitioned(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis in float32 (affine or not)."""

    def __init__(
        self, dim: int, eps: float, elementwise_affine: bool, axis_name: str | None = "embed"
    ):
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = _sharding.param(jnp.ones((dim,), jnp.float32), (axis_name,))
            self.bias = _sharding.param(jnp.zeros((dim,), jnp.float32), (axis_name,))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        x32 = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.elementwise_affine:
            x32 = x32 * self.weight[...] + self.bias[...]
        return x32.astype(x.dtype)


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
            kernel_init=_sharding.partitioned(init, (None, None, "conv_in", "embed")),
            bias_init=_sharding.partitioned(nnx.initializers.zeros_init(), ("embed",)),
            rngs=rngs,
        )

    def __call__(self, x):  # [B, H, W, C] -> [B, T, D]
        x = self.proj(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class Mlp(nnx.Module):
    """timm Mlp with GELU (tanh approximation)."""

    def __init__(
        self, dim: int, hidden: int, rngs: nnx.Rngs, dtype, custom_grad: bool = False, fp8=None
    ):
        kw = dict(custom_grad=custom_grad, fp8=fp8)
        self.fc1 = _dense(dim, hidden, rngs, dtype, ("embed", "mlp"), **kw)
        self.fc2 = _dense(hidden, dim, rngs, dtype, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class SwiGLUFFN(nnx.Module):
    """Reference models/swiglu_ffn.py: w12 -> (silu(x1) * x2) -> w3."""

    def __init__(
        self, dim: int, hidden: int, rngs: nnx.Rngs, dtype, custom_grad: bool = False, fp8=None
    ):
        kw = dict(custom_grad=custom_grad, fp8=fp8)
        self.w12 = _dense(dim, 2 * hidden, rngs, dtype, ("embed", "mlp"), **kw)
        self.w3 = _dense(hidden, dim, rngs, dtype, ("mlp", "embed"), **kw)

    def __call__(self, x):
        h = swiglu(_sharding.constrain_batch(self.w12(x)))
        return self.w3(checkpoint_name(h, "mlp_act"))


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


class RMSNorm(nnx.Module):
    """Reference models/rmsnorm.py: x * rsqrt(mean(x^2) + eps) in float32, times `weight`."""

    def __init__(self, dim: int, eps: float = 1e-6, axis_name: str | None = "embed"):
        self.eps = eps
        self.weight = _sharding.param(jnp.ones((dim,), jnp.float32), (axis_name,))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * self.weight[...]).astype(x.dtype)


def _block_norm(dim: int, use_rmsnorm: bool):
    # LightningDiTBlock / FinalLayer: RMSNorm(dim) or LayerNorm(elementwise_affine=False, 1e-6).
    return RMSNorm(dim) if use_rmsnorm else LayerNorm(dim, 1e-6, elementwise_affine=False)


# ---------------------------------------------------------------------------------------------
# models/lightningdit.py, in its order.


def modulate(x, shift, scale):
    """Reference `modulate`: x * (1 + scale) + shift, with shift None for `wo_shift`."""
    x = x * (1 + scale[:, None, :])
    return x if shift is None else x + shift[:, None, :]


class Attention(nnx.Module):
    """Reference Attention: fused qkv with bias, optional QK-norm over the head dim, RoPE
    (without QK-norm, the split and RoPE are one op: `kernels.split_rope`)."""

    def __init__(self, config: LightningDiTConfig, rngs: nnx.Rngs, dtype):
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.implementation = config.attention_impl
        fast = config.dense_custom_grad
        kw = dict(custom_grad=fast, fp8=config.fp8_spec)
        self.qkv = _dense(d, 3 * d, rngs, dtype, ("embed", "heads"), **kw)
        if config.use_qknorm:
            if config.use_rmsnorm:
                self.q_norm = RMSNorm(self.head_dim, axis_name=None)
                self.k_norm = RMSNorm(self.head_dim, axis_name=None)
            else:  # nn.LayerNorm(head_dim) with its default eps and affine
                self.q_norm = LayerNorm(self.head_dim, 1e-5, True, axis_name=None)
                self.k_norm = LayerNorm(self.head_dim, 1e-5, True, axis_name=None)
        else:
            self.q_norm = self.k_norm = None
        self.proj = _dense(d, d, rngs, dtype, ("heads", "embed"), **kw)

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
            embedding_init=_sharding.partitioned(nnx.initializers.normal(0.02), ("vocab", "embed")),
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
            self.mlp = SwiGLUFFN(d, int(2 / 3 * mlp_hidden), rngs, dtype, fast, config.fp8_spec)
        else:
            self.mlp = Mlp(d, mlp_hidden, rngs, dtype, fast, config.fp8_spec)
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

    Inside raw JAX control flow (`lax.cond`, `lax.scan`, `lax.while_loop` bodies) build the model
    there: `nnx.merge(graphdef, state, copy=True)`. With `scan_layers=True` this is required: the
    blocks run under `nnx.scan`, which refuses Variables created at an outer trace level; the loop
    of `scan_layers=False` would also take a model closed over. `nnx.jit` / `nnx.grad` need
    nothing.
    """

    def __init__(self, config: LightningDiTConfig, *, rngs: nnx.Rngs):
        fp8_lib.check_backend(config.precision)
        self.config = config
        dtype = DTYPES[config.dtype]
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config, rngs, dtype)
        self.t_embedder = TimestepEmbedder(d, rngs, dtype)
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob, rngs)
        table = get_2d_sincos_pos_embed(d, config.grid_size)[None].astype(np.float32)
        self.pos_embed = Buffer(
            jnp.asarray(table), out_sharding=(None, None, "embed"), eager_sharding=False
        )

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


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """[grid_size**2, embed_dim]: the first half encodes the column (w), the second the row (h).

    Reference `get_2d_sincos_pos_embed` (and its `_from_grid` helpers), in numpy as there."""
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


def count_params(model: nnx.Module) -> int:
    """Parameters as the reference counts them (`model.parameters()`: trainable + pos_embed)."""
    state = nnx.state(model, nnx.Any(nnx.Param, Buffer))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def abstract_model(config: LightningDiTConfig) -> LightningDiT:
    """The model with `jax.ShapeDtypeStruct` leaves (no memory): shapes, counts, shardings."""
    return nnx.eval_shape(lambda: LightningDiT(config, rngs=nnx.Rngs(0)))


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
