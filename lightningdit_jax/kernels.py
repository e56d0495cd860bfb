"""Custom-gradient ops of the LightningDiT blocks, kept apart from the ported layers in model.py.

Each op computes the same forward values as the plain code it replaces (tested bit for bit) and
carries a hand-written backward pass, because the backward that autodiff derives made XLA write
extra buffers or make extra passes over the activations. Each docstring names the GPU run in
docs/bench/JOURNAL.md that justifies it (raw results: docs/bench/*_run<N>_*.json).
tests/test_lightningdit_model.py checks every backward against autodiff of the plain code.

- `apply_rope`: RoPE through a pair swap and a signed sin table (runs 11-13); plain autodiff,
  but `split_rope`'s backward is written with the same two helpers.
- `split_rope`: the q/k/v split of the fused projection plus RoPE (run 15).
- `swiglu`, `swiglu_coefficients`: the SwiGLU activation (runs 16 and 34).
- `dense`: a linear layer whose kernel gradient is written [in, out] (runs 29-30).
- `rms_modulate`: RMSNorm followed by adaLN modulation (run 27).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# ---------------------------------------------------------------------------------------------
# RoPE (reference models/pos_embed.py, VisionRotaryEmbeddingFast.forward)


def _swap_pairs(x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)


def _signed_sin(sin: jax.Array) -> jax.Array:
    """sin * (-1, +1, -1, ...): rotate_half(x) * sin == _swap_pairs(x) * _signed_sin(sin)."""
    return sin * jnp.tile(jnp.asarray([-1.0, 1.0], sin.dtype), sin.shape[-1] // 2)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, H]: x * cos + rotate_half(x) * sin, where `rotate_half` maps each pair of
    features (2i, 2i+1) to (-x[2i+1], x[2i]).

    rotate_half(x) * sin is computed as swap(x) * (sign * sin), swap exchanging the two features
    of each pair and sign = (-1, +1, -1, ...): the same products, but a reversal XLA fuses into one
    elementwise loop instead of the stack (a concatenate at 1.6 TB/s, ~1.6x the memory time).
    docs/bench/JOURNAL.md runs 11-17, "RoPE": XL/1 CFG forward at 2x128 135.1 ms (run 11) -> 130.2 ms
    (run 13), sampling 4.3 -> 4.45 img/s.
    """
    return x * cos[:, None, :] + _swap_pairs(x) * _signed_sin(sin)[:, None, :]


@jax.custom_vjp
def split_rope(qkv: jax.Array, cos: jax.Array, sin: jax.Array):
    """qkv [B, T, 3, N, H] -> (apply_rope(q), apply_rope(k), v), each [B, T, N, H] in qkv's dtype.

    The same values as slicing and `apply_rope`; the backward pass writes the gradient of the
    fused qkv projection in one fusion (RoPE's transpose of dq and dk next to dv) instead of
    materialising the three parts and then copying them into one [tokens, 3 x hidden] buffer,
    the pattern that cost SwiGLU 7.4 ms of an XL/1 step (`swiglu`). docs/bench/JOURNAL.md runs 11-17,
    run 15 (docs/bench/2026-11-22_h100_run15_custom_vjp.json): measured alone, this backward
    changed nothing measurable (136.9 vs 137.5 ms of kernels); it stays as it costs nothing.
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


# ---------------------------------------------------------------------------------------------
# SwiGLU (reference models/swiglu_ffn.py, between w12 and w3)


@jax.custom_vjp
def swiglu(h: jax.Array) -> jax.Array:
    """h [..., 2n] -> silu(h[..., :n]) * h[..., n:] (reference SwiGLUFFN between w12 and w3).

    Autodiff produced both halves' gradients in one kernel, and XLA then copied them into the
    [..., 2n] gradient of the w12 output twice per layer, once per consumer GEMM (a
    `wrapped_concatenate`, 7.4 ms of an XL/1 step at batch 64 on an H100). Here the backward is
    one elementwise product over [..., 2, n] written as that gradient in one fusion: docs/bench/JOURNAL.md
    run 16 (docs/bench/2026-11-22_h100_run16_split_swiglu_select.json), XL/1 b64 139.6 -> 127.0
    ms, B/1 b256 107.3 -> 101.5 ms.

    The forward pass also writes both halves' derivative coefficients (`swiglu_coefficients`),
    computed in float32 and stored in h's dtype as one [..., 2, n] residual. Storing h instead made
    XLA write the first coefficient in float32 from the forward fusion anyway and read h again in
    the backward: docs/bench/JOURNAL.md run 34 (docs/bench/2026-12-03_h200_run34_swiglu_ab.json), XL/1 b64
    -1.2 ms on an H200 in both rounds of an A/B.
    """
    a, b = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(a) * b


def swiglu_coefficients(h: jax.Array) -> jax.Array:
    """d out / d h of `swiglu` per element, in float32, as [..., 2, n]: d/da, then d/db.

    One select over the two halves' formulas, side by side as the backward needs them
    (docs/bench/JOURNAL.md run 16); computed in the forward pass since run 34.
    """
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
    # halves joined by a concatenate (see `swiglu`).
    grad = g.astype(jnp.float32)[..., None, :] * coef.astype(jnp.float32)
    return (grad.astype(coef.dtype).reshape(*coef.shape[:-2], -1),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


# ---------------------------------------------------------------------------------------------
# Linear layers (model.Dense with custom_grad=True)


@jax.custom_vjp
def dense(x, kernel, bias):
    """`x @ kernel + bias` (x [..., in], kernel [in, out], bias [out], one dtype), as nnx.Linear
    computes it, with a backward pass that writes the kernel's gradient as [in, out] directly.

    Autodiff computes that gradient as dy^T @ x, [out, in], and transposes it; XLA folded the
    transpose into the kernel that stacks the 28 layers' gradients for AdamW, which then ran at
    0.45-0.7 TB/s. Here it is one product contracting the token axes, x^T @ dy. Same operations
    forward. docs/bench/JOURNAL.md runs 29-30 (docs/bench/2026-11-22_h100_run29_dense_custom_grad_ab.json,
    ..._run30_dit_train.json), train steps without remat: XL/1 b64 122.4 -> 121.2 ms, B/1 b256
    100.0 -> 98.2 ms; with remat (`dots_no_batch`) it was slower (250.4 -> 260.3 ms: the policy
    cannot see into a custom VJP), so `model.Dense` uses it only where the blocks are not
    rematerialised (`LightningDiTConfig.dense_custom_grad`).
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


# ---------------------------------------------------------------------------------------------
# RMSNorm + modulate (reference models/rmsnorm.py and `modulate` in models/lightningdit.py)


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
    sum_b (1 + scale_b) * S_b, d shift = sum_t g. docs/bench/JOURNAL.md run 27
    (docs/bench/2026-11-22_h100_run27_rms_modulate_ab.json): XL/1 train step on one H100
    126.1-126.6 -> 123.3 ms.
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
