"""A/B of BENCHMARKS.md run 34: the SwiGLU custom VJP keeping its input h as the residual (the
backward recomputes both derivative coefficients from h in float32) against keeping the two
coefficients themselves, computed in float32 and stored in h's dtype (`model.swiglu` now). The
trainer's LightningDiT step, one process, one device, variants alternating.

    CASES="XL/1:64:none" ITERS=20 python3 launch/ab_swiglu.py

What each variant should move (XL/1 b64, per layer): the h variant's backward reads the w12 GEMM
output (201 MB bf16) and a float32 coefficient that XLA moved into the forward fusion (201 MB),
the coefficient variant reads 201 MB of bf16 coefficients: 201 MB less per layer, about 1.2-1.9
ms per step at 3-4.7 TB/s. Writes $OUT/ab_swiglu.json.
"""

import functools
import os
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from launch import ab_common  # noqa: E402
from lightningdit_jax import model as model_lib  # noqa: E402


@jax.custom_vjp
def swiglu_h_residual(h):
    a, b = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(a) * b


def _fwd(h):
    return swiglu_h_residual(h), h


def _bwd(h, g):  # the backward of model.swiglu before run 34: coefficients from h, in float32
    coef = model_lib.swiglu_coefficients(h)
    return ((g.astype(jnp.float32)[..., None, :] * coef).astype(h.dtype).reshape(h.shape),)


swiglu_h_residual.defvjp(_fwd, _bwd)
VARIANTS = {"h_residual": swiglu_h_residual, "coef_residual": model_lib.swiglu}


def use(name: str) -> None:  # SwiGLUFFN looks the function up when the step is traced
    model_lib.swiglu = VARIANTS[name]


def main():
    results = ab_common.trainer_ab(
        os.environ.get("CASES", "XL/1:64:none"),
        {name: functools.partial(use, name) for name in VARIANTS},
        restore=functools.partial(use, "coef_residual"),
        iters=int(os.environ.get("ITERS", "20")),
    )
    ab_common.write_results(pathlib.Path(os.environ.get("OUT", "/tmp")), "ab_swiglu.json", results)


if __name__ == "__main__":
    main()
