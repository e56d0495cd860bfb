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

import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from launch.ab_sliced_state import load_config, time_it  # noqa: E402
from lightningdit_jax import model as model_lib  # noqa: E402
from lightningdit_jax import train as dit_train  # noqa: E402
from vavae_jax.runtime import sharding  # noqa: E402


@jax.custom_vjp
def swiglu_h_residual(h):
    a, b = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(a) * b


def _fwd(h):
    return swiglu_h_residual(h), h


def _bwd(h, g):  # the backward of model.swiglu before run 34
    n = h.shape[-1] // 2
    h2 = h.astype(jnp.float32).reshape(*h.shape[:-1], 2, n)
    a, b = h2[..., :1, :], h2[..., 1:, :]
    sig = jax.nn.sigmoid(a)
    first = jax.lax.broadcasted_iota(jnp.int32, (2, n), 0) == 0
    coef = jnp.where(first, b * sig * (1.0 + a * (1.0 - sig)), a * sig)
    return ((g.astype(jnp.float32)[..., None, :] * coef).astype(h.dtype).reshape(h.shape),)


swiglu_h_residual.defvjp(_fwd, _bwd)
VARIANTS = {"h_residual": swiglu_h_residual, "coef_residual": model_lib.swiglu}


def main():
    out = pathlib.Path(os.environ.get("OUT", "/tmp"))
    iters = int(os.environ.get("ITERS", "20"))
    results = []
    for case in os.environ.get("CASES", "XL/1:64:none").split(","):
        preset, b, remat = case.split(":")
        config = load_config(preset, int(b))
        config.model.remat_policy = remat
        mesh = sharding.mesh_from_config(config.mesh)
        mcfg = dit_train.model_config(config)
        shape = (int(b), mcfg.input_size, mcfg.input_size, mcfg.in_channels)
        batch = dict(
            latent=jax.random.normal(jax.random.key(1), shape, jnp.float32),
            label=jax.random.randint(jax.random.key(2), (int(b),), 0, mcfg.num_classes),
        )
        bits = [jax.random.key_data(jax.random.key(i)) for i in range(2)]
        row, steps = dict(case=case), {}
        for name, fn in VARIANTS.items():
            model_lib.swiglu = fn  # SwiGLUFFN looks the function up when the step is traced
            ts = dit_train.build_step(config, mesh, mcfg)
            state = ts.init_state(jax.random.key(0))
            compiled = ts.jit().lower(state, batch, bits[0]).compile()
            mem = compiled.memory_analysis()
            steps[name] = (ts, compiled)
            row[name] = dict(ms=[], temp_gib=getattr(mem, "temp_size_in_bytes", 0) / 2**30)
            del state
        model_lib.swiglu = VARIANTS["coef_residual"]
        for _ in range(2):
            for name, (ts, compiled) in steps.items():
                state = ts.init_state(jax.random.key(0))
                state, t, loss = time_it(compiled, state, batch, bits, iters)
                row[name]["ms"].append(t * 1e3)
                row[name]["loss"] = loss
                print(case, name, f"{t * 1e3:.2f} ms loss {loss:.5f}", flush=True)
                del state
        print(case, row, flush=True)
        results.append(row)
        del steps
    (out / "ab_swiglu.json").write_text(
        json.dumps(
            dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, results=results),
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
