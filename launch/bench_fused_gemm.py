"""Feasibility measurement: can a hand-written GEMM with the SwiGLU fused into its prologue beat
XLA's SwiGLU fusion + cuBLAS GEMM for LightningDiT's w3 projection?

  python launch/bench_fused_gemm.py --out=fused_gemm.json

For h = w12(x) of shape [M, 2n] (bf16) and w3 [n, d], XLA computes silu(h[:, :n]) * h[:, n:] in
one elementwise kernel (writes [M, n]) and then the GEMM (reads it back). The fused kernel loads
both halves of h tile by tile, applies SwiGLU in registers and feeds the product to the tensor
cores, so the [M, n] intermediate never reaches memory. Cases, each the median of `--iters`
synchronised calls, with the relative error against XLA's float32 result:
  xla_swiglu_gemm   XLA: SwiGLU fusion + GEMM (+ bias), what the model runs today
  xla_gemm          XLA: the GEMM alone on a precomputed SwiGLU output (cuBLAS' speed)
  triton_gemm       Pallas (Triton backend): the same plain GEMM, per tile config
  triton_fused      Pallas (Triton backend): SwiGLU-prologue GEMM (+ bias), per tile config
  mosaic_gemm       Pallas Mosaic GPU (jax's Hopper matmul example kernel): plain GEMM
  xla_gemm_swiglu   XLA: the w12 GEMM [M, d] x [d, 2n] (+ bias), then the SwiGLU fusion
  triton_gemm_swiglu Pallas (Triton): the w12 GEMM with SwiGLU as its epilogue (both halves'
                    tiles accumulated side by side), writing only the [M, n] product
M = 65536 is one CFG sampling step at batch 2 x 128; M = 16384 a train step at batch 64.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def _tile_kernel(h_ref, w_ref, bias_ref, o_ref, *, bm, bn, bk, n, d, fused):
    """One [bm, bn] output tile; grid is 1-D with the N tiles fastest (they share the A rows)."""
    nj = d // bn
    pid = pl.program_id(0)
    i, j = pid // nj, pid % nj
    rows, cols = pl.ds(i * bm, bm), pl.ds(j * bn, bn)

    def body(kk, acc):
        if fused:
            a = h_ref[rows, pl.ds(kk * bk, bk)].astype(jnp.float32)
            b = h_ref[rows, pl.ds(n + kk * bk, bk)].astype(jnp.float32)
            x = (a * jax.nn.sigmoid(a) * b).astype(w_ref.dtype)
        else:
            x = h_ref[rows, pl.ds(kk * bk, bk)]
        w = w_ref[pl.ds(kk * bk, bk), cols]
        return acc + pltriton.dot(x, w)  # float32 accumulation on the tensor cores

    acc = jax.lax.fori_loop(0, n // bk, body, jnp.zeros((bm, bn), jnp.float32))
    acc = acc + bias_ref[cols].astype(jnp.float32)[None, :]
    o_ref[rows, cols] = acc.astype(o_ref.dtype)


def triton_gemm(h, w, bias, *, fused, bm, bn, bk, num_warps, num_stages, interpret=False):
    """[M, 2n] (fused) or [M, n] (plain) times [n, d] plus bias, in h's dtype."""
    m = h.shape[0]
    n, d = w.shape
    if m % bm or d % bn or n % bk:
        raise ValueError(f"tile ({bm}, {bn}, {bk}) does not divide M={m}, d={d}, n={n}")
    kernel = functools.partial(_tile_kernel, bm=bm, bn=bn, bk=bk, n=n, d=d, fused=fused)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, d), h.dtype),
        grid=((m // bm) * (d // bn),),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(h, w, bias)


def _dual_kernel(x_ref, w_ref, bias_ref, o_ref, *, bm, bn, bk, n, k):
    """One [bm, bn] tile of silu(x @ w[:, :n] + b1) * (x @ w[:, n:] + b2): both halves' tiles
    accumulate side by side and SwiGLU runs on the accumulators (an epilogue)."""
    nj = n // bn
    pid = pl.program_id(0)
    i, j = pid // nj, pid % nj
    rows = pl.ds(i * bm, bm)

    def body(kk, accs):
        x = x_ref[rows, pl.ds(kk * bk, bk)]
        wa = w_ref[pl.ds(kk * bk, bk), pl.ds(j * bn, bn)]
        wb = w_ref[pl.ds(kk * bk, bk), pl.ds(n + j * bn, bn)]
        return accs[0] + pltriton.dot(x, wa), accs[1] + pltriton.dot(x, wb)

    zeros = jnp.zeros((bm, bn), jnp.float32)
    acc_a, acc_b = jax.lax.fori_loop(0, k // bk, body, (zeros, zeros))
    a = acc_a + bias_ref[pl.ds(j * bn, bn)].astype(jnp.float32)[None, :]
    b = acc_b + bias_ref[pl.ds(n + j * bn, bn)].astype(jnp.float32)[None, :]
    o_ref[rows, pl.ds(j * bn, bn)] = (a * jax.nn.sigmoid(a) * b).astype(o_ref.dtype)


def triton_gemm_swiglu(x, w, bias, *, bm, bn, bk, num_warps, num_stages, interpret=False):
    """swiglu(x @ w + bias) for x [M, k], w [k, 2n]: the w12 GEMM with SwiGLU as its epilogue."""
    m, k = x.shape
    n = w.shape[1] // 2
    if m % bm or n % bn or k % bk:
        raise ValueError(f"tile ({bm}, {bn}, {bk}) does not divide M={m}, n={n}, k={k}")
    kernel = functools.partial(_dual_kernel, bm=bm, bn=bn, bk=bk, n=n, k=k)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=((m // bm) * (n // bn),),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(x, w, bias)


def xla_gemm_swiglu(x, w, bias):
    h = x @ w + bias
    n = w.shape[1] // 2
    return jax.nn.silu(h[:, :n]) * h[:, n:]


def xla_swiglu_gemm(h, w, bias):
    n = w.shape[0]
    a, b = h[:, :n], h[:, n:]
    return (jax.nn.silu(a) * b) @ w + bias


def xla_gemm(x, w, bias):
    return x @ w + bias


def _time(fn, args, iters):
    f = jax.jit(fn)
    t = time.perf_counter()
    out = jax.block_until_ready(f(*args))
    compile_s = time.perf_counter() - t
    for _ in range(3):
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return out, statistics.median(times), compile_s


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ms", default="65536,16384")
    p.add_argument("--n", type=int, default=3072, help="SwiGLU hidden size (XL: 3072)")
    p.add_argument("--d", type=int, default=1152, help="model width (XL: 1152)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument(
        "--configs",
        default="128,128,64,4,3;128,128,64,8,3;128,128,64,8,4;128,64,64,4,4;64,128,64,4,4;"
        "256,128,64,8,3;128,128,32,4,5;256,64,64,8,4",
        help="bm,bn,bk,num_warps,num_stages;...",
    )
    p.add_argument(
        "--dual_configs",
        default="128,64,64,4,3;128,64,64,8,4;128,128,64,8,3;64,128,64,4,4;256,64,64,8,3;"
        "128,128,32,8,4;128,64,32,4,5",
        help="tile configs of the w12 GEMM with the SwiGLU epilogue",
    )
    p.add_argument("--skip_w3", action="store_true", help="only the w12 + SwiGLU epilogue cases")
    p.add_argument("--out", default="fused_gemm.json")
    p.add_argument("--interpret", action="store_true", help="check on the CPU (tiny sizes)")
    args = p.parse_args()
    configs = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";") if c]
    dual_configs = [tuple(int(v) for v in c.split(",")) for c in args.dual_configs.split(";") if c]
    if args.skip_w3:
        configs = []
    n, d = args.n, args.d
    rows = []
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    for m in (int(v) for v in args.ms.split(",")):
        k1, k2, k3 = jax.random.split(jax.random.key(m), 3)
        h = jax.random.normal(k1, (m, 2 * n), jnp.float32).astype(jnp.bfloat16)
        w = (jax.random.normal(k2, (n, d), jnp.float32) / np.sqrt(n)).astype(jnp.bfloat16)
        bias = (0.1 * jax.random.normal(k3, (d,), jnp.float32)).astype(jnp.bfloat16)
        x = (jax.nn.silu(h[:, :n].astype(jnp.float32)) * h[:, n:]).astype(jnp.bfloat16)
        ref_fused = np.asarray(
            xla_swiglu_gemm(h.astype(jnp.float32), w.astype(jnp.float32), bias), np.float64
        )
        ref_plain = np.asarray(
            x.astype(jnp.float32) @ w.astype(jnp.float32) + bias.astype(jnp.float32), np.float64
        )
        flops = 2.0 * m * n * d

        def add(case, out, sec, compile_s, ref, m=m, flops=flops, **extra):
            out = np.asarray(out, np.float64)
            err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            row = dict(M=m, case=case, ms=sec * 1e3, tflops=flops / sec / 1e12, rel_err=err)
            row.update(compile_s=compile_s, **extra)
            rows.append(row)
            print(
                f"  M={m} {case} {extra.get('config', '')}: {sec * 1e3:.3f} ms, "
                f"{row['tflops']:.0f} TFLOP/s, rel err {err:.1e}",
                flush=True,
            )

        if not args.skip_w3:
            add("xla_swiglu_gemm", *_time(xla_swiglu_gemm, (h, w, bias), args.iters), ref_fused)
            add("xla_gemm", *_time(xla_gemm, (x, w, bias), args.iters), ref_plain)
        for cfg in configs:
            bm, bn, bk, nw, ns = cfg
            for fused, case, inp, ref in ((False, "triton_gemm", x, ref_plain),
                                          (True, "triton_fused", h, ref_fused)):  # fmt: skip
                fn = functools.partial(
                    triton_gemm, fused=fused, bm=bm, bn=bn, bk=bk, num_warps=nw, num_stages=ns,
                    interpret=args.interpret,
                )  # fmt: skip
                try:
                    add(case, *_time(fn, (inp, w, bias), args.iters), ref, config=cfg)
                except Exception as e:  # noqa: BLE001  (a tile config may not compile: say so)
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    print(f"  M={m} {case} {cfg}: failed: {msg}", flush=True)
                    rows.append(dict(M=m, case=case, config=cfg, error=msg))
        # The w12 side: x [M, d] @ w12 [d, 2n] + b12, then SwiGLU (epilogue fusion).
        x12 = jax.random.normal(k3, (m, d), jnp.float32).astype(jnp.bfloat16)
        w12 = (jax.random.normal(k2, (d, 2 * n), jnp.float32) / np.sqrt(d)).astype(jnp.bfloat16)
        b12 = (0.1 * jax.random.normal(k1, (2 * n,), jnp.float32)).astype(jnp.bfloat16)
        ref12 = np.asarray(
            xla_gemm_swiglu(x12.astype(jnp.float32), w12.astype(jnp.float32), b12), np.float64
        )
        add("xla_gemm_swiglu", *_time(xla_gemm_swiglu, (x12, w12, b12), args.iters), ref12)
        for cfg in dual_configs:
            bm, bn, bk, nw, ns = cfg
            fn = functools.partial(
                triton_gemm_swiglu, bm=bm, bn=bn, bk=bk, num_warps=nw, num_stages=ns,
                interpret=args.interpret,
            )  # fmt: skip
            try:
                add("triton_gemm_swiglu", *_time(fn, (x12, w12, b12), args.iters), ref12,
                    config=cfg)  # fmt: skip
            except Exception as e:  # noqa: BLE001
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                print(f"  M={m} triton_gemm_swiglu {cfg}: failed: {msg}", flush=True)
                rows.append(dict(M=m, case="triton_gemm_swiglu", config=cfg, error=msg))
        if not args.interpret and not args.skip_w3:
            no_bias = ref_plain - np.asarray(bias, np.float64)  # the example kernel has no bias
            _mosaic(rows, m, x, w, no_bias, args.iters, add)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    best = {}
    for r in (r for r in rows if "ms" in r):
        key = (r["M"], r["case"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    print("\n| M | case | best ms | TFLOP/s | config | rel err |\n|---|---|---|---|---|---|")
    for (m, case), r in best.items():
        print(
            f"| {m} | {case} | {r['ms']:.3f} | {r['tflops']:.0f} | {r.get('config', '')} | "
            f"{r['rel_err']:.1e} |"
        )


def _mosaic(rows, m, x, w, ref, iters, add):
    """jax's own Hopper matmul example (Mosaic GPU, wgmma + TMA): how fast a Pallas GEMM can go."""
    try:
        from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
    except Exception as e:  # noqa: BLE001
        rows.append(dict(M=m, case="mosaic_gemm", error=f"import: {e}"))
        return
    for tm, tn, wg in ((128, 128, "N"), (128, 64, "N"), (128, 128, "M"), (256, 64, "N")):
        for width in (4, 8):
            cfg = hm.TuningConfig(
                tile_m=tm,
                tile_n=tn,
                tile_k=64,
                max_concurrent_steps=4,
                epi_tile_n=64,
                epi_tile_m=64,
                grid_minor_dim=hm.MatmulDimension.N,
                grid_tile_width=width,
                wg_dimension=getattr(hm.MatmulDimension, wg),
            )
            name = (tm, tn, wg, width)
            try:
                fn = functools.partial(hm.matmul, config=cfg)
                out, sec, cs = _time(lambda a, b, fn=fn: fn(a, b, None), (x, w), iters)
                add("mosaic_gemm", out, sec, cs, ref, config=name)
            except Exception as e:  # noqa: BLE001
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                print(f"  M={m} mosaic_gemm {name}: failed: {msg}", flush=True)
                rows.append(dict(M=m, case="mosaic_gemm", config=name, error=msg))


if __name__ == "__main__":
    main()
