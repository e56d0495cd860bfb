"""One attention entry point for every model: cuDNN flash attention where it applies."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def resolve(implementation: str | None, dtype, head_dim: int) -> str | None:
    """ "auto": cuDNN's fused flash kernel on GPUs for bf16/fp16 with head_dim <= 128 (what it
    supports), XLA's attention everywhere else. `jax.nn.dot_product_attention(implementation=
    None)` always means XLA in jax 0.10/0.11, which materialises the [B, N, T, T] scores."""
    if implementation in (None, "xla", "cudnn"):
        return implementation
    if implementation != "auto":
        raise ValueError(f"attention implementation {implementation!r}: expected {IMPLEMENTATIONS}")
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    ok = jax.default_backend() == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if ok else "xla"


def dot_product_attention(q, k, v, *, scale=None, implementation: str | None = "auto"):
    """q, k, v: [B, T, N, H]. Softmax in float32 on either path."""
    impl = resolve(implementation, q.dtype, q.shape[-1])
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)
