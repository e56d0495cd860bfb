"""GroupNorm + SiLU, forward and backward, at the VA-VAE's activation shapes: the grouped 5-D
reduction (the form of earlier versions) against the per-channel-first one the model uses now,
and that form with a written backward (`model.group_norm_vjp`, a candidate the model uses
with `model.GROUP_NORM_BACKWARD = "written"`).

  python launch/bench/groupnorm_probe.py --batch=32 --out=groupnorm_probe.json

Per shape and form: the device kernel time of one call (a profile; GPU only, else wall time), the
reduction kernels' share, and the largest difference between the two forms' outputs and input
gradients (the same float32 statistics, summed in another order).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

from vavae_jax import model

# (H, W, C) of the decoder / encoder GroupNorms at 256 px, the largest first.
SHAPES = [(256, 256, 128), (128, 128, 256), (128, 128, 128), (64, 64, 256), (32, 32, 512)]


FORMS = {
    "grouped": model.group_norm_grouped,
    "per_channel": model.group_norm,
    "per_channel_vjp": model.group_norm_vjp,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="groupnorm_probe.json")
    args = p.parse_args()
    gpu = jax.default_backend() == "gpu"
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    results = []
    for h, w, c in SHAPES:
        kx, kc = jax.random.split(jax.random.key(0))
        x = (jax.random.normal(kx, (args.batch, h, w, c)) * 2 + 0.5).astype(jnp.bfloat16)
        ct = jax.random.normal(kc, x.shape).astype(jnp.bfloat16)
        wgt, bias = jnp.linspace(0.5, 1.5, c), jnp.linspace(-0.1, 0.1, c)
        outs = {}
        for name, fn in FORMS.items():

            def step(x, wgt, bias, ct, fn=fn):
                y, vjp = jax.vjp(lambda x, a, b: jax.nn.silu(fn(x, a, b, 32, 1e-6)), x, wgt, bias)
                return y, vjp(ct)

            compiled = jax.jit(step).lower(x, wgt, bias, ct).compile()
            res = compiled(x, wgt, bias, ct)
            jax.block_until_ready(res)
            times = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(x, wgt, bias, ct))
                times.append(time.perf_counter() - t0)
            row = dict(
                shape=[args.batch, h, w, c], form=name, wall_ms=statistics.median(times) * 1e3
            )
            if gpu:
                from vavae_jax.runtime import profiling

                call = functools.partial(compiled, x, wgt, bias, ct)
                summary = profiling.profile(call, 5, tempfile.mkdtemp(prefix="gn_"))
                row["kernel_ms"] = summary["kernel_ms_per_step"]
                row["by_category_ms"] = summary["by_category_ms"]
            outs[name] = res
            results.append(row)
            print(json.dumps(row), flush=True)
        ya, (ga, *_) = outs["grouped"]
        for name in list(FORMS)[1:]:
            yb, (gb, *_) = outs[name]
            diff = dict(
                shape=[args.batch, h, w, c],
                form=f"{name} vs grouped",
                max_abs_diff_y=float(jnp.abs(ya.astype(jnp.float32) - yb.astype(jnp.float32)).max()),
                max_abs_diff_dx=float(jnp.abs(ga.astype(jnp.float32) - gb.astype(jnp.float32)).max()),
                max_abs_dx=float(jnp.abs(ga.astype(jnp.float32)).max()),
            )  # fmt: skip
            results.append(diff)
            print(json.dumps(diff), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
