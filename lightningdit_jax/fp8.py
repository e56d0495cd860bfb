"""FP8 matrix products for LightningDiT's blocks (`LightningDiTConfig.precision="fp8"`, opt-in).

The blocks' four linear layers (qkv, proj, SwiGLU's w12 and w3) multiply float8 operands:
float8_e4m3fn activations and weights forward, float8_e5m2 gradients backward, each tensor with
one scale of its own computed from its absolute maximum in the same call (per-tensor current
scaling: no state, so checkpoints are the same as bf16 ones and load either way). The product
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

Costs of current scaling, to weigh against delayed scaling (amax histories as model state, not
built) once a GPU profile shows them: each product reads its activation once more for the amax
before quantising it, and on a batch split over devices each amax is a scalar all-reduce (x and
the gradient, and the kernel where FSDP splits it: up to 336 per XL/1 train step).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

E4M3 = jnp.float8_e4m3fn  # forward operands: activations and weights
E5M2 = jnp.float8_e5m2  # gradients: more range, less precision
PRECISIONS = ("default", "fp8", "fp8_emulated")
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


def scale_of(a: jax.Array, dtype, axis=None) -> jax.Array:
    """Per-tensor scale, float32: amax(|a|) over `axis` (default: all) / the largest float8
    value (never 0)."""
    amax = jnp.max(jnp.abs(a), axis=axis).astype(jnp.float32)
    return jnp.maximum(amax, 1e-30) / float(jnp.finfo(dtype).max)


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


def dense(x: jax.Array, kernel, bias: jax.Array | None) -> jax.Array:
    """`x @ kernel + bias` in FP8 (the module docstring), in x's dtype. x [..., in]; kernel
    [in, out], the float32 parameter (quantised here, in this call) or an `Fp8Weight`."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if isinstance(kernel, Fp8Weight):
        y = _product_quantised(x2, kernel.value, kernel.scale)
    else:
        y = _product(x2, kernel)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype).reshape(*lead, y.shape[-1])


def _fp8_dot(a, b, out_dtype, dims=_DIMS):
    """The float8 product written in `out_dtype` (the activations' compute dtype: bf16 on a GPU,
    half the bytes of float32 for its consumer to read), returned as float32 for the scales."""
    return jax.lax.dot_general(a, b, dims, preferred_element_type=out_dtype).astype(jnp.float32)


@jax.custom_vjp
def _product(x, w):
    """float32 [M, N]: x [M, K] (any float dtype) times w [K, N] (float32), both quantised."""
    return _product_fwd(x, w)[0]


def _product_fwd(x, w):
    sx, sw = scale_of(x, E4M3), scale_of(w, E4M3)
    xq, wq = quantize(x, sx, E4M3), quantize(w, sw, E4M3)
    # Zero-size arrays carry the inputs' dtypes (residuals must be arrays).
    dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
    return _fp8_dot(xq, wq, x.dtype) * (sx * sw), (xq, sx, wq, sw, dtypes)


def _product_bwd(res, g):
    xq, sx, wq, sw, (x_like, w_like) = res
    x_dtype, w_dtype = x_like.dtype, w_like.dtype
    sg = scale_of(g, E5M2)
    gq = quantize(g, sg, E5M2)
    dx = _fp8_dot(gq, wq, x_dtype, (((1,), (1,)), ((), ()))) * (sg * sw)  # [M, K]
    dw = _fp8_dot(xq, gq, x_dtype, (((0,), (0,)), ((), ()))) * (sx * sg)  # [K, N]: [in, out]
    return dx.astype(x_dtype), dw.astype(w_dtype)


_product.defvjp(_product_fwd, _product_bwd)


def _product_quantised(x, wq, sw):
    """The forward with a weight quantised already (sampling: no gradient)."""
    sx = scale_of(x, E4M3)
    return _fp8_dot(quantize(x, sx, E4M3), wq, x.dtype) * (sx * sw)


def quantize_weights(model: nnx.Module) -> nnx.Module:
    """A copy of `model` whose FP8 layers (`model.Dense` with `fp8=True`) hold `Fp8Weight`
    kernels: quantised once, for the many forward passes of a sampler. Inference only: the
    copy has no gradient with respect to those kernels."""
    from lightningdit_jax.model import Dense

    model = nnx.clone(model)
    for _, layer in nnx.iter_graph(model):
        if isinstance(layer, Dense) and layer.fp8 and not isinstance(layer.kernel[...], Fp8Weight):
            layer.kernel.set_value(Fp8Weight.of(layer.kernel[...]))
    return model
