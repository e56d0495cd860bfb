"""Measures the hot paths at real sizes with random weights and data; prints a table, writes JSON.

  python launch/benchmark.py --only=matmul,vae_codec,vae_train,dit_train,dit_sample --out=bench.json

Each case: compile once (reported apart), warm up, then time `--iters` calls, each synchronised
with `block_until_ready`, and report the median. Model FLOPs per image come from XLA's cost
analysis of the compiled step; MFU divides the achieved FLOP rate by a bf16 matmul rate measured
on the same device in the same run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

RESULTS: list[dict] = []


def timeit(fn: Callable, args: tuple, iters: int, warmup: int = 3) -> dict:
    """Compile time, then the median / min of `iters` synchronised calls (seconds)."""
    t = time.perf_counter()
    compiled = (
        jax.jit(fn).lower(*args).compile()
        if not hasattr(fn, "lower")
        else fn.lower(*args).compile()
    )
    compile_s = time.perf_counter() - t
    flops = None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        flops = float(cost.get("flops", 0.0)) or None
    except Exception as e:  # cost analysis is best effort on some backends
        print(f"  (no cost analysis: {e})")
    out = None
    for _ in range(warmup):
        out = compiled(*args)
        jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    return dict(
        compile_s=compile_s,
        median_s=statistics.median(times),
        min_s=min(times),
        flops=flops,
        out=out,
    )


def record(
    name: str, batch: int, r: dict, peak: float | None, unit_per_call: float = 1.0, **extra
) -> None:
    per_s = batch * unit_per_call / r["median_s"]
    row = dict(
        case=name,
        batch=batch,
        median_s=r["median_s"],
        min_s=r["min_s"],
        compile_s=r["compile_s"],
        img_per_s=per_s,
        **extra,
    )
    if r["flops"]:
        row["flops_per_img"] = r["flops"] / batch
        row["tflops"] = r["flops"] / r["median_s"] / 1e12
        if peak:
            row["mfu"] = row["tflops"] * 1e12 / peak
    RESULTS.append(row)
    print(
        f"  {name}: {r['median_s'] * 1e3:.2f} ms/call, {per_s:.1f} img/s"
        + (f", {row['tflops']:.0f} TFLOP/s" if "tflops" in row else "")
        + (f", MFU {row['mfu']:.1%}" if "mfu" in row else "")
        + f", compile {r['compile_s']:.1f} s",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------
def bench_matmul(args) -> float:
    n = 8192
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    r = timeit(lambda a, b: a @ b, (a, b), iters=20)
    peak = 2 * n**3 / r["median_s"]
    RESULTS.append(dict(case="matmul_bf16_8192", tflops=peak / 1e12, median_s=r["median_s"]))
    print(f"  bf16 matmul {n}^3: {peak / 1e12:.0f} TFLOP/s", flush=True)
    return peak


def bench_vae_codec(args, peak):
    from vavae_jax.model import PRESETS, AutoencoderKL

    b = args.vae_batch
    for dtype in args.vae_dtypes.split(","):
        cfg = PRESETS["f16d32"].__class__(**{**PRESETS["f16d32"].__dict__, "dtype": dtype})
        model = AutoencoderKL(cfg, rngs=nnx.Rngs(0))
        gdef, state = nnx.split(model)
        x = jax.random.uniform(jax.random.key(1), (b, 256, 256, 3), jnp.float32, -1, 1)
        z = jax.random.normal(jax.random.key(2), (b, 16, 16, 32), jnp.float32)

        def enc(state, x):
            return nnx.merge(gdef, state).encode(x).mean

        def dec(state, z):
            return nnx.merge(gdef, state).decode(z)

        record(f"vae_encode_{dtype}", b, timeit(enc, (state, x), args.iters), peak)
        record(f"vae_decode_{dtype}", b, timeit(dec, (state, z), args.iters), peak)


CASES = {"vae_codec": bench_vae_codec}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", default="matmul,vae_codec")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--vae_batch", type=int, default=64)
    p.add_argument("--vae_dtypes", default="bfloat16,float32")
    p.add_argument("--out", default="benchmark.json")
    args = p.parse_args()
    dev = jax.devices()[0]
    print(
        f"device: {dev.device_kind} x{jax.device_count()} ({jax.default_backend()}), "
        f"jax {jax.__version__}",
        flush=True,
    )
    wanted = args.only.split(",")
    peak = bench_matmul(args) if "matmul" in wanted else None
    for name in wanted:
        if name == "matmul":
            continue
        if name not in CASES:
            raise SystemExit(f"--only: unknown case {name!r}; known: matmul, {', '.join(CASES)}")
        print(f"[{name}]", flush=True)
        CASES[name](args, peak)
    meta = dict(
        device=dev.device_kind,
        backend=jax.default_backend(),
        jax=jax.__version__,
        n_devices=jax.device_count(),
        date=time.strftime("%Y-%m-%d"),
        argv=sys.argv,
    )
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(
        json.dumps(
            dict(meta=meta, results=[{k: v for k, v in r.items() if k != "out"} for r in RESULTS]),
            indent=2,
        )
    )
    print("\n| case | batch | ms/call | img/s | TFLOP/s | MFU |\n|---|---|---|---|---|---|")
    for r in RESULTS:
        if "batch" not in r:
            continue
        print(
            f"| {r['case']} | {r['batch']} | {r['median_s'] * 1e3:.2f} | {r['img_per_s']:.1f} | "
            f"{r.get('tflops', float('nan')):.0f} | {r.get('mfu', float('nan')):.1%} |"
        )


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
