"""FP8 matrix products for LightningDiT's blocks (`LightningDiTConfig.precision="fp8"`, opt-in).

The blocks' four linear layers (qkv, proj, SwiGLU's w12 and w3) multiply float8 operands:
float8_e4m3fn activations and weights forward, float8_e5m2 gradients backward, each tensor with
one scale of its own (per-tensor scaling; by default from its absolute maximum in the same call:
no state, so checkpoints are the same as bf16 ones and load either way; see Scaling). The product
is XLA's own: a `dot_general` of two float8 arrays, which XLA runs as cuBLASLt's FP8 GEMM on
Hopper (`__cublas$lt$matmul$f8`), accumulating in float32 and writing the compute dtype; the two
scales then multiply the result in the elementwise pass that adds the bias and casts it, which
XLA can fuse into the layer's consumer (RoPE, SwiGLU, the gated residual). No hand-written GEMM.

    y  = (q(x) @ q(w)) * (sx * sw) + b                     q(a) = a / s rounded to float8
    dx = (q5(g) @ q(w)^T) * (sg * sw)                      s = amax(|a|) / float8 max
    dw = (q(x)^T @ q5(g)) * (sx * sg)

The backward reuses the forward's float8 x and w (half the memory of bf16 residuals).
Adaptive-LN, the embedders, the final layer and attention stay in the compute dtype.

Why this form (docs/bench/JOURNAL.md runs 36-39, `launch/bench/fp8_probe.py`): on an H200 with
jax 0.11.2 the direct float8 x float8 product runs cuBLASLt's FP8 kernel at 1.88x bf16's rate,
and XL/1's four GEMMs take 4.86 ms of kernels against bf16's 5.97 with the output pass; the
"upcast, scale, dot" pattern that XLA's rewriter used to take ran bf16 GEMMs there. With XLA's
Triton GEMMs on, the autotuner spent ~21 s per FP8 shape trying Triton tilings (0.5 s without):
the launchers set `XLA_FLAGS` from `xla_flags` before JAX starts.

Where it runs: `precision="fp8"` needs GPUs with FP8 tensor cores (compute capability 8.9 or
higher: Ada, Hopper, Blackwell) and raises a clear error elsewhere (`check_backend`).
`precision="fp8_emulated"` does the same arithmetic on any backend (XLA upcasts the float8
operands there): the same rounding, none of the speed. It is for tests and for checking
fidelity on a CPU, never for speed.

Sampling quantises the weights once per call of the sampler (`quantize_weights`), not at each
of its steps: the blocks' kernels become `Fp8Weight`s (float8 values and their scale).

Scaling (`LightningDiTConfig.fp8_scaling`):
  "current"  each scale comes from its tensor's absolute maximum in the same call: no state, but
             every product reads its input once more (the amax pass) before it can quantise it,
             and on a batch split over devices each amax is a scalar all-reduce.
  "delayed"  each scale comes from the largest of the tensor's absolute maxima over the last
             `fp8_amax_history` steps (Transformer Engine's recipe): the quantisation needs no
             pass of its own (the amax of this step is a by-product of it) and the values above
             the history's largest saturate. The histories are model state (`AmaxHistory`, one
             [3, history] array per layer: input, kernel, output gradient; newest first),
             checkpointed with the model, replicated, and updated by the train step from the
             gradient pass: the "gradient" of a history is its new value (`custom_vjp`), which
             the step writes back instead of giving it to the optimizer. An empty history
             (a new model, or a checkpoint written without one) gives scale 1 until its first
             step: that step's gradients below float8_e5m2's smallest value flush to zero.

Product form (`PRODUCT`, read when a model is traced; for A/B runs of the benchmark):
  "direct"   `dot_general` of the float8 arrays, scaled after (the form run 39 measured to
             reach cuBLASLt's FP8 kernel);
  "scaled"   the float8 arrays upcast to the compute dtype and multiplied by their scales inside
             a product at `precision=HIGHEST`: the pattern XLA's FP8 GEMM rewriter is reported
             to fold into one cuBLASLt call with both scales (no pass over the output). Same
             rounding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

E4M3 = jnp.float8_e4m3fn  # forward operands: activations and weights
E5M2 = jnp.float8_e5m2  # gradients: more range, less precision
PRECISIONS = ("default", "fp8", "fp8_emulated")
SCALINGS = ("current", "delayed")
PRODUCTS = ("direct", "scaled")
PRODUCT = "direct"  # the product's form (module docstring); read when a model is traced
# XLA's Triton GEMMs off: their autotuning tried Triton tilings for ~21 s per FP8 shape and the
# product still ran cuBLASLt's FP8 kernel (JOURNAL run 39).
XLA_FLAGS = {"--xla_gpu_enable_triton_gemm": "false"}
MIN_COMPUTE_CAPABILITY = 8.9
_DIMS = (((1,), (0,)), ((), ()))


def xla_flags(current: str, precision: str) -> str:
    """`current` XLA_FLAGS plus the FP8 path's flags (`XLA_FLAGS`) where `precision` is "fp8" and
    `current` does not set them already; for launchers, before JAX starts its backend."""
    if precision != "fp8":
        return current
    extra = [f"{k}={v}" for k, v in XLA_FLAGS.items() if k not in current]
    return " ".join([current.strip(), *extra]).strip()


def check_backend(precision: str, devices=None) -> None:
    """Raises a ValueError that says what to do where `precision="fp8"` cannot run FP8 products
    on `devices` (default: jax.devices())."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {list(PRECISIONS)}")
    if precision != "fp8":
        return
    devices = jax.devices() if devices is None else devices
    for d in devices:
        cc = getattr(d, "compute_capability", None)
        if d.platform != "gpu" or cc is None or float(cc) < MIN_COMPUTE_CAPABILITY:
            where = f"{d.platform} device {d.device_kind!r}" + (f" (compute {cc})" if cc else "")
            raise ValueError(
                f"precision 'fp8' (--config.model.precision, launch/sample.py --precision) needs "
                f"GPUs with FP8 tensor cores (compute capability >= {MIN_COMPUTE_CAPABILITY}: "
                f"Ada, Hopper, Blackwell), but this runs on a {where}. Use 'default' (the "
                "matmuls in the compute dtype), or 'fp8_emulated' for the same float8 rounding "
                "without its speed (tests, fidelity checks on a CPU)."
            )


@dataclasses.dataclass(frozen=True)
class Spec:
    """How a layer multiplies in float8: `history` 0 for current scaling, else the length of its
    amax histories (delayed scaling)."""

    history: int = 0


class AmaxHistory(nnx.Variable):
    """Delayed scaling's state of one layer (module docstring): [3, history] float32, the
    absolute maxima of its input (row 0), kernel (1) and output gradient (2) over the last
    `history` steps, newest first. Written by the train step (the gradient pass returns its new
    value), never by the optimizer."""


# The float8 type of each history row: input, kernel, output gradient.
ROW_DTYPES = (E4M3, E4M3, E5M2)


def amax_of(a: jax.Array, axis=None) -> jax.Array:
    """max(|a|) over `axis` (default: all), float32."""
    return jnp.max(jnp.abs(a), axis=axis).astype(jnp.float32)


def scale_of(a: jax.Array, dtype, axis=None) -> jax.Array:
    """Per-tensor scale, float32: amax(|a|) over `axis` (default: all) / the largest float8
    value (never 0)."""
    return jnp.maximum(amax_of(a, axis), 1e-30) / float(jnp.finfo(dtype).max)


def initial_history(kernel: jax.Array, length: int) -> jax.Array:
    """A new layer's history: its kernel's amax known, no input or gradient seen yet."""
    return jnp.zeros((3, length), jnp.float32).at[1, 0].set(amax_of(kernel))


def delayed_scales(history: jax.Array) -> jax.Array:
    """[3] float32 scales of a [3, H] history: each row's largest amax / its float8's largest
    value; 1 where a row has seen nothing (all zero) or is not finite."""
    h = jnp.max(history, axis=-1)
    fmax = jnp.asarray([float(jnp.finfo(d).max) for d in ROW_DTYPES], jnp.float32)
    return jnp.where((h > 0) & jnp.isfinite(h), h / fmax, 1.0)


def quantize(a: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """a / scale rounded to `dtype` (saturating at its largest value)."""
    lim = float(jnp.finfo(dtype).max)
    return jnp.clip(a.astype(jnp.float32) / scale, -lim, lim).astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """A kernel quantised once (`quantize_weights`): float8_e4m3fn values and their scale.
    `w[...]` returns it unchanged, as a Variable's value is read in the layers."""

    value: jax.Array  # [..., in, out] float8_e4m3fn
    scale: jax.Array  # [...] float32: one per matrix (the blocks' kernels are stacked by layer)

    @classmethod
    def of(cls, kernel: jax.Array) -> Fp8Weight:
        """Each [in, out] matrix of `kernel` [..., in, out] with a scale of its own."""
        scale = scale_of(kernel, E4M3, axis=(-2, -1))
        return cls(quantize(kernel, scale[..., None, None], E4M3), scale)

    def __getitem__(self, key):
        if key is not Ellipsis:
            raise TypeError(f"Fp8Weight supports w[...] only, got w[{key!r}]")
        return self


def dense(
    x: jax.Array, kernel, bias: jax.Array | None, history: jax.Array | None = None
) -> jax.Array:
    """`x @ kernel + bias` in FP8 (the module docstring), in x's dtype. x [..., in]; kernel
    [in, out], the float32 parameter (quantised here, in this call) or an `Fp8Weight`;
    `history`: the layer's [3, H] amax history for delayed scaling (None: current scaling)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if isinstance(kernel, Fp8Weight):
        y = _product_quantised(x2, kernel.value, kernel.scale)
    elif history is None:
        y = _product(x2, kernel)
    else:
        y = _product_delayed(x2, kernel, history)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype).reshape(*lead, y.shape[-1])


_DX_DIMS = (((1,), (1,)), ((), ()))  # g [M, N] x w [K, N] -> [M, K]
_DW_DIMS = (((0,), (0,)), ((), ()))  # x [M, K] x g [M, N] -> [K, N]: [in, out]


def _scaled_dot(a, sa, b, sb, out_dtype, dims=_DIMS):
    """(a * sa) . (b * sb) of float8 `a`, `b` with float32 scales, as float32. The product is
    written in `out_dtype` (the activations' compute dtype: bf16 on a GPU, half the bytes of
    float32 for its consumer to read), in the form `PRODUCT` names."""
    if PRODUCT == "direct":
        y = jax.lax.dot_general(a, b, dims, preferred_element_type=out_dtype)
        return y.astype(jnp.float32) * (sa * sb)
    if PRODUCT == "scaled":
        ad = a.astype(out_dtype) * sa.astype(out_dtype)
        bd = b.astype(out_dtype) * sb.astype(out_dtype)
        y = jax.lax.dot_general(
            ad, bd, dims, precision=jax.lax.Precision.HIGHEST, preferred_element_type=out_dtype
        )
        return y.astype(jnp.float32)
    raise ValueError(f"fp8.PRODUCT={PRODUCT!r}: expected one of {list(PRODUCTS)}")


def _like(*arrays):
    """Zero-size arrays carrying the inputs' dtypes (custom_vjp residuals must be arrays)."""
    return tuple(jnp.zeros((0,), a.dtype) for a in arrays)


@jax.custom_vjp
def _product(x, w):
    """float32 [M, N]: x [M, K] (any float dtype) times w [K, N] (float32), both quantised."""
    return _product_fwd(x, w)[0]


def _product_fwd(x, w):
    sx, sw = scale_of(x, E4M3), scale_of(w, E4M3)
    xq, wq = quantize(x, sx, E4M3), quantize(w, sw, E4M3)
    return _scaled_dot(xq, sx, wq, sw, x.dtype), (xq, sx, wq, sw, _like(x, w))


def _grads(xq, sx, wq, sw, g, sg, x_like, w_like):
    """(dx, dw) of the product from the forward's float8 operands and the output gradient `g`
    quantised to float8_e5m2 with scale `sg`; dw written [in, out]."""
    gq = quantize(g, sg, E5M2)
    dx = _scaled_dot(gq, sg, wq, sw, x_like.dtype, _DX_DIMS)
    dw = _scaled_dot(xq, sx, gq, sg, x_like.dtype, _DW_DIMS)
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


def _product_bwd(res, g):
    xq, sx, wq, sw, (x_like, w_like) = res
    return _grads(xq, sx, wq, sw, g, scale_of(g, E5M2), x_like, w_like)


_product.defvjp(_product_fwd, _product_bwd)


@jax.custom_vjp
def _product_delayed(x, w, history):
    """`_product` with delayed scaling: the scales come from `history` [3, H]; the "gradient"
    of `history` is its new value (this step's three amaxes first)."""
    return _product_delayed_fwd(x, w, history)[0]


def _product_delayed_fwd(x, w, history):
    s = delayed_scales(history)
    xq, wq = quantize(x, s[0], E4M3), quantize(w, s[1], E4M3)
    amaxes = (amax_of(x), amax_of(w))  # by-products of the quantisation's read
    y = _scaled_dot(xq, s[0], wq, s[1], x.dtype)
    return y, (xq, wq, s, history, amaxes, _like(x, w))


def _product_delayed_bwd(res, g):
    xq, wq, s, history, (ax, aw), (x_like, w_like) = res
    dx, dw = _grads(xq, s[0], wq, s[1], g, s[2], x_like, w_like)
    newest = jnp.stack([ax, aw, amax_of(g)])
    new_history = jnp.concatenate([newest[:, None], history[:, :-1]], axis=1)
    return dx, dw, new_history


_product_delayed.defvjp(_product_delayed_fwd, _product_delayed_bwd)


def _product_quantised(x, wq, sw):
    """The forward with a weight quantised already (sampling: no gradient; the input's scale
    is its own, whatever the scaling the model trained with)."""
    sx = scale_of(x, E4M3)
    return _scaled_dot(quantize(x, sx, E4M3), sx, wq, sw, x.dtype)


def quantize_weights(model: nnx.Module) -> nnx.Module:
    """A copy of `model` whose FP8 layers (`model.Dense` with an `fp8` spec) hold `Fp8Weight`
    kernels: quantised once, for the many forward passes of a sampler. Inference only: the
    copy has no gradient with respect to those kernels."""
    from lightningdit_jax.model import Dense

    model = nnx.clone(model)
    for _, layer in nnx.iter_graph(model):
        if isinstance(layer, Dense) and layer.fp8 and not isinstance(layer.kernel[...], Fp8Weight):
            layer.kernel.set_value(Fp8Weight.of(layer.kernel[...]))
    return model
