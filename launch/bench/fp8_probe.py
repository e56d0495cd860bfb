"""Does an FP8 matrix product run and pay on this GPU, through XLA? (issue 19, item 1, step 1.)

  python launch/bench/fp8_probe.py --out=fp8_probe.json

Times LightningDiT-XL/1's GEMMs at batch 64 (16384 tokens) in several forms, each in a fresh
subprocess with a time limit (a direct float8 `jnp.dot` was once seen compiling for 5+ minutes):

  bf16        x @ w in bfloat16: the baseline.
  direct      float8_e4m3fn x float8_e4m3fn `lax.dot_general` (preferred bf16) times the two
              per-tensor scales; inputs quantised beforehand (the sampling case: weights once).
  *_fused     bf16 / direct followed by a bias add and SiLU, as in a model: does the output's
              scale pass fuse into its consumer (XLA's epilogue or the elementwise fusion)?
  direct_tn   direct with the weight stored [N, K], the layout cuBLASLt's FP8 kernels want.
  scaled      float8 parameters upcast and multiplied by their scales inside the product (the
              pattern XLA's GEMM rewriter turns into one cuBLASLt FP8 call with its scales);
              scaled_tn: the weight stored [N, K], cuBLASLt FP8's layout (no transpose per call).
  direct_qx   the same, with the activation's quantisation (amax, scale, convert) inside: what a
              training or sampling forward pays per product.
  qdq         "quantise, dequantise, dot" in bf16, the pattern XLA's GEMM rewriter is meant to turn
              into a cuBLASLt FP8 product; run with XLA's default flags and again with
              `--xla_allow_excess_precision=false` (the convert pairs may be folded away).
  bwd_e5m2    float8_e5m2 (a gradient) x float8_e4m3fn (a weight): the backward's data GEMM.
  *_at0       the same with `--xla_gpu_autotune_level=0` (XLA's GEMM autotuning took 4.5-49 s per
              FP8 shape in run 36: what does skipping it cost in speed?).
  *_nt        the same with XLA's Triton GEMMs off (`--xla_gpu_enable_triton_gemm=false`, a flag
              NVIDIA's native-FP8 guide for JAX names as needed; the other one it names,
              `--xla_gpu_enable_reduction_epilogue_fusion`, no longer exists): run 38 saw the
              scaled pattern stay a bf16 GEMM, which a Triton GEMM fusion that takes the upcasts
              in would explain.
  scaled_fused  scaled followed by bias + SiLU (can the bias go into cuBLASLt's epilogue?).
  scaled_bwd  scaled with a float8_e5m2 activation (a gradient) x float8_e4m3fn weight.
  scaled_qx   scaled with the activation quantised inside by a given scale (delayed scaling:
              x / scale, clipped, converted): what a sampling or training forward pays per call.
  scaled*_hi  the scaled forms with the product at `precision=HIGHEST`: XLA's FP8 GEMM rewriter
              was reported (a public FP8 journal of another JAX project, jax 0.10 on an H100) to
              take the upcast-and-scale pattern only at HIGHEST, folding both scales into the
              cuBLASLt call (bf16 output, no pass over it).

For each: the median time of 8 independent products per call over `--iters` calls, the TFLOP/s,
the error against float32, and whether the compiled HLO holds a cuBLASLt FP8 custom call
(`__cublas$lt$matmul$f8`) — the proof that FP8 tensor cores ran, not a bf16 product. On a GPU
also the device kernel time of one call from a profile (`--profile`, default on), split into the
GEMM kernels and the rest (quantisation, scaling, converts), with the GEMM kernels' names: the
wall-clock figure of run 36 could not tell which of the two kept FP8 from its 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

# (name, M, K, N) of XL/1 at batch 64: 64 x 256 tokens, width 1152, SwiGLU hidden 3072.
SHAPES = [
    ("qkv", 16384, 1152, 3456),
    ("attn_out", 16384, 1152, 1152),
    ("swiglu_in", 16384, 1152, 6144),
    ("swiglu_out", 16384, 3072, 1152),
]
SCALED = ["scaled", "scaled_tn", "scaled_fused", "scaled_bwd", "scaled_qx"]
BASE_VARIANTS = [
    "bf16", "direct", "direct_tn", "direct_qx", "qdq", "qdq_noexcess", "bwd_e5m2", "bf16_fused",
    "direct_fused", *SCALED, *(f"{v}_hi" for v in SCALED),
]  # fmt: skip
EXTRA_FLAGS = {
    "noexcess": "--xla_allow_excess_precision=false",
    "at0": "--xla_gpu_autotune_level=0",
    "nt": "--xla_gpu_enable_triton_gemm=false",
}
VARIANTS = BASE_VARIANTS + ["bf16_at0", "direct_at0", "direct_qx_at0", "bwd_e5m2_at0"]
VARIANTS += [f"{v}_nt" for v in BASE_VARIANTS if v not in ("qdq_noexcess",)]
COPIES = 8  # independent products per call: amortises the launch


def _kernels(compiled, args, logdir: str) -> dict:
    """Device time of one call: GEMM kernels, everything else, the top kernels by name."""
    from vavae_jax.runtime import profiling

    summary = profiling.profile(lambda: compiled(*args), 5, logdir)
    cats = summary["by_category_ms"]
    gemm = cats.get("gemm", 0.0)
    top = [dict(name=k["name"][:120], ms=k["ms"]) for k in summary.get("top_kernels", [])[:6]]
    return dict(kernel_ms=summary["kernel_ms_per_step"], gemm_kernel_ms=gemm,
                other_kernel_ms=summary["kernel_ms_per_step"] - gemm, top_kernels=top)  # fmt: skip


def _case(variant: str, iters: int, m_div: int, profile: bool = False) -> dict:
    import jax
    import jax.numpy as jnp
    from jax import lax

    e4, e5, bf = jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.bfloat16
    variant, hi = variant.removesuffix("_hi"), variant.endswith("_hi")
    precision = lax.Precision.HIGHEST if hi else None
    dn = (((1,), (0,)), ((), ()))

    def scale_of(a, dtype):
        return jnp.max(jnp.abs(a.astype(jnp.float32))) / float(jnp.finfo(dtype).max)

    def quant(a, s, dtype):
        return (a.astype(jnp.float32) / s).astype(dtype)

    out = {}
    for name, m, k, n in SHAPES:
        m //= m_div
        kx, kw = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, (m, k), jnp.float32)
        ws = jax.random.normal(kw, (COPIES, k, n), jnp.float32) / k**0.5
        ref = jnp.dot(x, ws[0], precision="highest")
        bias = jnp.linspace(-0.1, 0.1, n, dtype=jnp.float32)
        if variant.endswith("_fused"):
            ref = jax.nn.silu(ref + bias)
        if variant == "bf16_fused":
            args = (x.astype(bf), ws.astype(bf), bias.astype(bf))

            def f(x, ws, bias):
                return [
                    jax.nn.silu(jnp.dot(x, ws[i], preferred_element_type=bf) + bias)
                    for i in range(COPIES)
                ]

        elif variant == "direct_fused":
            sx, sw = scale_of(x, e4), scale_of(ws, e4)
            args = (quant(x, sx, e4), quant(ws, sw, e4), sx * sw, bias.astype(bf))

            def f(xq, wq, s, bias):
                outs = []
                for i in range(COPIES):
                    y = lax.dot_general(xq, wq[i], dn, preferred_element_type=bf)
                    outs.append(jax.nn.silu((y * s).astype(bf) + bias))
                return outs

        elif variant == "bf16":
            args = (x.astype(bf), ws.astype(bf))

            def f(x, ws):
                return [jnp.dot(x, ws[i], preferred_element_type=bf) for i in range(COPIES)]

        elif variant in ("direct", "bwd_e5m2", "direct_tn"):
            xdt = e5 if variant == "bwd_e5m2" else e4
            sx, sw = scale_of(x, xdt), scale_of(ws, e4)
            wq = quant(ws, sw, e4)
            tn = variant == "direct_tn"  # the weight stored [N, K]: cuBLASLt FP8's layout
            args = (quant(x, sx, xdt), jnp.swapaxes(wq, 1, 2) if tn else wq, sx * sw)
            dims = (((1,), (1,)), ((), ())) if tn else dn

            def f(xq, wq, s, dims=dims):
                return [
                    (lax.dot_general(xq, wq[i], dims, preferred_element_type=bf) * s).astype(bf)
                    for i in range(COPIES)
                ]

        elif variant in ("scaled_fused", "scaled_bwd", "scaled_qx"):
            xdt = e5 if variant == "scaled_bwd" else e4
            sx, sw = scale_of(x, xdt), scale_of(ws, e4)
            wq = quant(ws, sw, e4)
            if variant == "scaled_qx":
                args = (x.astype(bf), wq, sx, sw, bias.astype(bf))
            else:
                args = (quant(x, sx, xdt), wq, sx, sw, bias.astype(bf))

            def f(xa, wq, sx, sw, bias, variant=variant, xdt=xdt):
                if variant == "scaled_qx":  # delayed scaling: the scale is given, no amax pass
                    lim = float(jnp.finfo(xdt).max)
                    xa = jnp.clip(xa.astype(jnp.float32) / sx, -lim, lim).astype(xdt)
                xd = xa.astype(bf) * sx.astype(bf)
                outs = []
                for i in range(COPIES):
                    wd = wq[i].astype(bf) * sw.astype(bf)
                    y = jnp.dot(xd, wd, precision=precision, preferred_element_type=bf)
                    outs.append(jax.nn.silu(y + bias) if variant == "scaled_fused" else y)
                return outs

        elif variant in ("scaled", "scaled_tn"):
            # float8 parameters, each upcast and multiplied by its scale inside the product: the
            # pattern XLA's GEMM rewriter folds into one cuBLASLt FP8 call with its scales (no
            # pass over the output). _tn: the weight stored [N, K], the layout cuBLASLt's FP8
            # kernels want (no transpose per call).
            tn = variant == "scaled_tn"
            sx, sw = scale_of(x, e4), scale_of(ws, e4)
            wq = quant(ws, sw, e4)
            args = (quant(x, sx, e4), jnp.swapaxes(wq, 1, 2) if tn else wq, sx, sw)
            dims = (((1,), (1,)), ((), ())) if tn else dn

            def f(xq, wq, sx, sw, dims=dims):
                xd = xq.astype(bf) * sx.astype(bf)
                return [
                    lax.dot_general(xd, wq[i].astype(bf) * sw.astype(bf), dims,
                                    precision=precision, preferred_element_type=bf)
                    for i in range(COPIES)
                ]  # fmt: skip

        elif variant == "direct_qx":
            sw = scale_of(ws, e4)
            args = (x.astype(bf), quant(ws, sw, e4), sw)

            def f(x, wq, sw):
                sx = scale_of(x, e4)
                xq = quant(x, sx, e4)
                s = sx * sw
                return [
                    (lax.dot_general(xq, wq[i], dn, preferred_element_type=bf) * s).astype(bf)
                    for i in range(COPIES)
                ]

        else:  # qdq, qdq_noexcess
            args = (x.astype(bf), ws.astype(bf))

            def f(x, ws):
                sx = scale_of(x, e4)
                xd = (quant(x, sx, e4).astype(jnp.float32) * sx).astype(bf)
                outs = []
                for i in range(COPIES):
                    sw = scale_of(ws[i], e4)
                    wd = (quant(ws[i], sw, e4).astype(jnp.float32) * sw).astype(bf)
                    outs.append(jnp.dot(xd, wd, preferred_element_type=bf))
                return outs

        t0 = time.perf_counter()
        compiled = jax.jit(f).lower(*args).compile()
        compile_s = time.perf_counter() - t0
        hlo = compiled.as_text()
        ys = compiled(*args)
        jax.block_until_ready(ys)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        y0 = ys[0].astype(jnp.float32)
        rel = float(jnp.linalg.norm(y0 - ref) / jnp.linalg.norm(ref))
        kernels = {}
        if profile and jax.default_backend() == "gpu":
            import tempfile

            kernels = _kernels(compiled, args, tempfile.mkdtemp(prefix=f"fp8_{variant}_{name}_"))
            kernels["gemm_tflops"] = (
                2 * m * k * n * COPIES / (kernels["gemm_kernel_ms"] * 1e-3) / 1e12
            )
        out[name] = dict(
            m=m,
            k=k,
            n=n,
            median_ms=med * 1e3,
            tflops=2 * m * k * n * COPIES / med / 1e12,
            compile_s=compile_s,
            rel_err_vs_f32=rel,
            fp8_cublaslt="__cublas$lt$matmul$f8" in hlo,
            fp8_in_hlo="f8e4m3fn" in hlo or "f8e5m2" in hlo,
            cublaslt_epilogues=sorted(set(re.findall(r'"epilogue":"(\w+)"', hlo))),
            **kernels,
        )
        print(variant, name, json.dumps(out[name]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--timeout", type=int, default=150, help="seconds per variant (subprocess)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--m_div", type=int, default=1, help="divide the token count (CPU smoke run)")
    p.add_argument("--out", default="fp8_probe.json")
    p.add_argument(
        "--profile", type=int, default=1, help="1: kernel times from a profile too (GPU only)"
    )
    p.add_argument("--_one", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._one:
        result = _case(args._one, args.iters, args.m_div, bool(args.profile))
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = {}
    for v in args.variants.split(","):
        if v not in VARIANTS:
            raise SystemExit(f"--variants: {v!r} is not one of {VARIANTS}")
        env = dict(os.environ)
        base, _, suffix = v.rpartition("_") if v.endswith(tuple(EXTRA_FLAGS)) else (v, "", "")
        if suffix:
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {EXTRA_FLAGS[suffix]}".strip()
        cmd = [sys.executable, __file__, f"--_one={base}"]
        cmd += [f"--iters={args.iters}", f"--m_div={args.m_div}", f"--profile={args.profile}"]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
            if r.returncode or not lines:
                results[v] = dict(error=(r.stderr or r.stdout)[-2000:])
            else:
                results[v] = json.loads(lines[-1][len("RESULT ") :])
        except subprocess.TimeoutExpired as e:
            partial = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            results[v] = dict(error=f"timed out after {args.timeout} s", partial=partial[-2000:])
        results[v]["wall_s"] = time.perf_counter() - t0
        print(v, json.dumps(results[v])[:600], flush=True)
        with open(args.out, "w") as f:  # after each variant: a time limit keeps what ran
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
