"""Lower bounds on the LightningDiT and VA-VAE step times, measured on the device: can a target
be reached?

  python launch/bench/roofline.py --out=roofline.json      # GPU: measure, print, write JSON
  python launch/bench/roofline.py --dry_run                # any backend: the plan, no timing

For each path (a train step at a batch, one forward at a batch, the Euler CFG sampler) the floor is

    floor = sum of the step's GEMMs, each timed alone (the kernel XLA picks for it, bf16 in and
            out, profiler device time)
          + the step's attention, timed alone (cuDNN's flash kernels, forward or forward+backward)
          + the least HBM traffic of everything else, divided by a bandwidth

with two bandwidths: the datasheet's (a hard ceiling: the floor is then a lower bound for any
program whose GEMMs and attention are separate kernels) and the best a streaming kernel reached
on the device in the same run.

The least traffic, the GEMM list and the sampler's call counts come from the config
(`lightningdit_jax.costs`, whose docstring says what the traffic counts and why it is a lower
bound); only the times are measured here.

With `--fp8` each DiT path also gets an FP8 floor (rows named "... fp8"): the blocks' linear
layers' GEMMs (qkv, proj, SwiGLU's w12 / w3), as `LightningDiTConfig.precision="fp8"` runs
them, timed alone in float8 (e4m3 x e4m3 forward, e5m2 gradient x e4m3 weight for the input's
gradient, e4m3 x e5m2 for the weight's; bf16 output; cuBLASLt's FP8 kernels take one layout, so
any transpose XLA adds around a lone product counts), everything else as in bf16, and the same
least traffic (bf16's: float8 operands would halve part of it, so this FP8 floor is not a lower
bound for every FP8 program, only for one that moves bf16 activations as the bf16 step does).

The VA-VAE train step (`--vae_train=BATCH`, the trainer's real step of configs/vavae_f16d32.py:
autoencoder, LPIPS-VGG16, PatchGAN, DINOv2-L, both optimizers) has no attention worth the name
and hundreds of convolutions; its list of convolutions and products and its least other traffic
are read from the step's own program (`vavae_jax.costs.vavae_train_census`):

    floor = sum over the step's convolution / product signatures of count x the kernel time of
            one alone (convolution and GEMM kernels only; a layout copy XLA adds around a lone op
            is not counted)
          + least other traffic / bandwidth
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from lightningdit_jax.costs import (
    Gemm,
    attention_flops,
    attention_shape,
    gemms,
    sampler_evaluations,
    traffic,
)

# Datasheet HBM bandwidths (bytes/s), matched against `device_kind`; --spec_bw overrides.
SPEC_BANDWIDTH = {
    "H100 80GB HBM3": 3.35e12,  # H100 SXM5
    "H100 PCIe": 2.0e12,
    "H200": 4.8e12,
}

# The reference's figures (../shared/DESIGN.md) and those measured beside ours on an H100
# (BENCHMARKS.md, launch/bench/bench_reference.py), with the target ratios.
REFERENCE = {
    "XL/1 train b64": dict(design=407.0, same_session=403.4, ratio=1.6, unit="img/s"),
    "B/1 train b256": dict(design=2107.0, same_session=2018.0, ratio=1.5, unit="img/s"),
    "XL/1 sample b128": dict(design=3.6, same_session=3.54, ratio=1.5, unit="img/s"),
}


# Issue 19's FP8 targets: the FP8 path against the reference's bf16.
FP8_RATIO = {"XL/1 train b64": 1.6, "B/1 train b256": 1.5, "XL/1 sample b128": 1.7}

# The reference's best VA-VAE train step (img/s, H200, fp32 + TF32 at batch 32: DESIGN.md).
VAE_REFERENCE_IMG_PER_S = 61.0

# ---------------------------------------------------------------------------------------------
# Measurement (GPU)


def kernel_ms(fn, args, logdir: str, steps: int = 5) -> float:
    """Device kernel time per call of jit(fn)(*args), from a profiler trace."""
    from vavae_jax.runtime import profiling

    compiled = jax.jit(fn).lower(*args).compile()
    for _ in range(2):
        jax.block_until_ready(compiled(*args))
    summary = profiling.profile(lambda: compiled(*args), steps, logdir)
    return summary["kernel_ms_per_step"]


def _operands(g: Gemm, dtypes):
    """A and B of `g` in `dtypes` (one dtype for both, or a pair)."""
    da, db = dtypes if isinstance(dtypes, tuple) else (dtypes, dtypes)
    ka, kb = jax.random.split(jax.random.key(0))
    a_shape = (g.k, g.m) if g.layout == "tn" else (g.m, g.k)
    b_shape = (g.n, g.k) if g.layout == "nt" else (g.k, g.n)
    a = jax.random.normal(ka, a_shape, jnp.float32).astype(da)
    b = (jax.random.normal(kb, b_shape, jnp.float32) / np.sqrt(g.k)).astype(db)
    return a, b


def _gemm_fn(layout: str, out_dtype=None):
    dims = {"nn": ((1,), (0,)), "nt": ((1,), (1,)), "tn": ((0,), (0,))}[layout]
    return lambda a, b: jax.lax.dot_general(
        a, b, (dims, ((), ())), preferred_element_type=out_dtype
    )


# The products `precision="fp8"` runs in float8 (lightningdit_jax.fp8): the blocks' linear layers.
FP8_LAYERS = ("block.qkv", "block.proj", "block.w12", "block.w3", "block.fc1", "block.fc2")


def fp8_operand_dtypes(g: Gemm):
    """(A, B) float8 dtypes of `g` where the FP8 model runs it in float8, else None: forward
    e4m3 x e4m3; the input's gradient e5m2 (the output gradient) x e4m3 (the weight); the
    weight's gradient e4m3 (the input) x e5m2."""
    layer, part = g.name.rsplit(".", 1)
    if layer not in FP8_LAYERS:
        return None
    e4, e5 = jnp.float8_e4m3fn, jnp.float8_e5m2
    return {"fwd": (e4, e4), "dx": (e5, e4), "dw": (e4, e5)}[part]


def measure_gemms(plan: list[Gemm], dtype, tmp: str, cache: dict, fp8: bool = False) -> list[dict]:
    rows = []
    for g in plan:
        f8 = fp8_operand_dtypes(g) if fp8 else None
        dtypes = f8 or dtype
        key = (g.m, g.k, g.n, g.layout, str(dtypes))
        if key not in cache:
            a, b = _operands(g, dtypes)
            fn = _gemm_fn(g.layout, dtype if f8 else None)  # float8 products write bf16
            cache[key] = kernel_ms(fn, (a, b), f"{tmp}/gemm_{len(cache)}")
            del a, b
        ms = cache[key]
        rows.append(
            dict(
                name=g.name,
                shape=[g.m, g.k, g.n],
                layout=g.layout,
                operands=[jnp.dtype(d).name for d in f8] if f8 else jnp.dtype(dtype).name,
                count=g.count,
                ms_each=ms,
                ms=ms * g.count,
                tflops=2.0 * g.m * g.k * g.n / (ms * 1e-3) / 1e12,
            )
        )
    return rows


def measure_attention(cfg, batch: int, train: bool, dtype, tmp: str) -> float:
    """ms per step of all blocks' attention: cuDNN forward (and backward) timed on one block."""
    from vavae_jax.runtime import attention

    b, t, n, h = attention_shape(cfg, batch)
    ks = jax.random.split(jax.random.key(1), 4)
    q, k, v, do = (jax.random.normal(key, (b, t, n, h), jnp.float32).astype(dtype) for key in ks)

    def fwd(q, k, v):
        return attention.dot_product_attention(q, k, v, implementation="cudnn")

    if train:

        def step(q, k, v, do):
            _, vjp = jax.vjp(fwd, q, k, v)
            return vjp(do)

        ms = kernel_ms(step, (q, k, v, do), f"{tmp}/attn_train_{batch}")
    else:
        ms = kernel_ms(fwd, (q, k, v), f"{tmp}/attn_fwd_{batch}")
    return ms * cfg.depth


def measure_bandwidth(tmp: str) -> dict[str, float]:
    """Bytes read + written per second of simple streaming kernels over ~1 GiB arrays."""
    n = 1 << 28
    x32 = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    y32 = jax.random.normal(jax.random.key(1), (n,), jnp.float32)
    x16 = jax.random.normal(jax.random.key(2), (2 * n,), jnp.float32).astype(jnp.bfloat16)
    cases = {
        "f32 x*a+b (1 read, 1 write)": (lambda x: x * 1.0001 + 1.0, (x32,), 8 * n),
        "f32 x+y (2 reads, 1 write)": (lambda x, y: x + y, (x32, y32), 12 * n),
        "bf16 x*a+b (1 read, 1 write)": (lambda x: x * 1.0001 + 1.0, (x16,), 8 * n),
        "f32 row sums (read only)": (
            lambda x: jnp.sum(x.reshape(1 << 14, -1), axis=1),
            (x32,),
            4 * n,
        ),
    }
    out = {}
    for i, (name, (fn, args, nbytes)) in enumerate(cases.items()):
        out[name] = nbytes / (kernel_ms(fn, args, f"{tmp}/bw_{i}", steps=10) * 1e-3)
    return out


def spec_bandwidth(device_kind: str, override: float) -> float | None:
    if override > 0:
        return override
    for key, bw in SPEC_BANDWIDTH.items():
        if key in device_kind:
            return bw
    return None


# ---------------------------------------------------------------------------------------------


def op_kernel_ms(op, tmp: str, steps: int = 3) -> dict[str, float]:
    """Device time of one convolution / product signature of `vavae_jax.costs` run alone, random
    operands: {"product_ms": its convolution and GEMM kernels, "all_ms": every kernel}."""
    from vavae_jax.runtime import profiling

    prim = {
        "conv_general_dilated": jax.lax.conv_general_dilated_p,
        "dot_general": jax.lax.dot_general_p,
    }
    keys = jax.random.split(jax.random.key(0), len(op.shapes))
    args = [
        jax.random.normal(k, s, jnp.float32).astype(d)
        for k, s, d in zip(keys, op.shapes, op.dtypes, strict=True)
    ]
    params = op.params

    def fn(*xs):
        return prim[op.primitive].bind(*xs, **params)

    compiled = jax.jit(fn).lower(*args).compile()
    for _ in range(2):
        jax.block_until_ready(compiled(*args))
    summary = profiling.profile(lambda: compiled(*args), steps, tmp)
    cats = summary["by_category_ms"]
    return dict(
        product_ms=sum(cats.get(c, 0.0) for c in ("convolution", "gemm", "attention")),
        all_ms=summary["kernel_ms_per_step"],
    )


def vae_floor(
    config_arg: str, batch: int, dtype: str, tmp: str, bw: tuple[float, float] | None
) -> dict:
    """The VA-VAE step's plan (dry run: bw None) or floor (bw = (datasheet, best measured))."""
    from vavae_jax import costs
    from vavae_jax.runtime import cli

    config = cli.config_from_file(config_arg)
    config.teacher.update(dict(path="", allow_random=True))  # shapes only: random is enough
    config.lpips.update(dict(path="random", allow_random=True))
    plan = costs.vavae_train_census(config, batch, dtype)
    census = plan["census"]
    nbytes = sum(plan["traffic"].values())
    row = dict(
        batch=batch,
        dtype=dtype,
        # issue 19's target: 3x the reference's best VA-VAE step (61 img/s, ../shared/DESIGN.md)
        target_ms_3x_reference=batch / (3 * VAE_REFERENCE_IMG_PER_S) * 1e3,
        product_tflop=census.flops / 1e12,
        product_calls=census.calls,
        product_signatures=len(census.ops),
        params=plan["params"],
        traffic_gb=nbytes / 1e9,
        traffic_items_gb={k: v / 1e9 for k, v in plan["traffic"].items()},
    )
    print(
        f"[VA-VAE train b{batch}] {census.calls} convolutions / products in "
        f"{len(census.ops)} signatures, {row['product_tflop']:.1f} TFLOP; least other traffic "
        f"{row['traffic_gb']:.1f} GB",
        flush=True,
    )
    for k, v in plan["traffic"].items():
        print(f"    {v / 1e9:7.2f} GB  {k}")
    if bw is None:
        row["ops"] = [
            dict(op=op.describe(), count=op.count, tflop=op.flops * op.count / 1e12)
            for op in census.ops
        ]
        return row
    ops, t0 = [], time.perf_counter()
    for i, op in enumerate(census.ops):
        ms = op_kernel_ms(op, f"{tmp}/vae_op_{i}")
        ops.append(
            dict(
                op=op.describe(),
                count=op.count,
                ms_each=ms["product_ms"],
                ms=ms["product_ms"] * op.count,
                all_kernels_ms_each=ms["all_ms"],
                tflops=op.flops / max(ms["product_ms"], 1e-9) / 1e9,
            )
        )
        if (i + 1) % 20 == 0 or i + 1 == len(census.ops):  # a long loop: progress, plain lines
            done = sum(r["ms"] for r in ops)
            print(
                f"  {i + 1}/{len(census.ops)} signatures timed in "
                f"{time.perf_counter() - t0:.0f} s ({done:.1f} ms of kernels so far)",
                flush=True,
            )
    row["ops"] = sorted(ops, key=lambda r: -r["ms"])
    row["product_ms"] = sum(r["ms"] for r in ops)
    row["traffic_ms_spec"] = nbytes / bw[0] * 1e3
    row["traffic_ms_best"] = nbytes / bw[1] * 1e3
    row["floor_ms_spec"] = row["product_ms"] + row["traffic_ms_spec"]
    row["floor_ms_best"] = row["product_ms"] + row["traffic_ms_best"]
    row["floor_img_per_s_best"] = batch / row["floor_ms_best"] * 1e3
    print(
        f"  convolutions + products {row['product_ms']:.1f} ms "
        f"({row['product_tflop'] / row['product_ms'] * 1e3:.0f} TFLOP/s; {len(ops)} signatures "
        f"timed in {time.perf_counter() - t0:.0f} s), traffic {row['traffic_ms_spec']:.1f} / "
        f"{row['traffic_ms_best']:.1f} ms: floor {row['floor_ms_spec']:.1f} / "
        f"{row['floor_ms_best']:.1f} ms ({row['floor_img_per_s_best']:.0f} img/s)",
        flush=True,
    )
    for r in row["ops"][:15]:
        print(f"    {r['ms']:7.2f} ms  {r['count']:3d} x {r['ms_each']:.3f}  {r['op']}")
    return row


def _config(preset: str, dtype: str):
    from lightningdit_jax.model import PRESETS

    return dataclasses.replace(PRESETS[preset], dtype=dtype)


def paths(args) -> list[dict]:
    """The paths of launch/bench/benchmark.py whose targets the issue sets."""
    out = []
    for spec in filter(None, args.train.split(";")):
        preset, b = spec.split(",")
        out.append(dict(name=f"{preset} train b{b}", preset=preset, batch=int(b), train=True))
    for spec in filter(None, args.forward.split(";")):
        preset, b = spec.split(",")
        out.append(dict(name=f"{preset} forward b{b}", preset=preset, batch=int(b), train=False))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train", default="XL/1,64;B/1,256", help="';'-separated preset,batch")
    p.add_argument(
        "--forward",
        default="XL/1,256;XL/1,128",
        help="';'-separated preset,batch (the sampler's guided and conditional-only calls)",
    )
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--vae_train",
        default="32",
        help="batch of the VA-VAE train step's floor (empty: skip); --train= --forward= skip the DiT",
    )
    p.add_argument(
        "--vae_config",
        default=str(pathlib.Path(__file__).resolve().parents[2] / "configs" / "vavae_f16d32.py"),
        help="FILE[:variants] of the VA-VAE step (teacher and LPIPS: random, shapes only)",
    )
    p.add_argument("--sample_preset", default="XL/1")
    p.add_argument("--sample_batch", type=int, default=128)
    p.add_argument("--sample_steps", type=int, default=250)
    p.add_argument("--sample_shift", type=float, default=0.3)
    p.add_argument("--cfg_interval_start", type=float, default=0.1)
    p.add_argument("--spec_bw", type=float, default=0.0, help="datasheet bandwidth, bytes/s")
    p.add_argument(
        "--reference_json",
        default="",
        help="launch/bench/bench_reference.py output from this machine: targets from its figures "
        "instead of the H100 ones (the same GPU kind, measured in the same session)",
    )
    p.add_argument(
        "--fp8",
        action="store_true",
        help="also an FP8 floor per DiT path (the blocks' linear layers' GEMMs in float8; "
        "XLA's Triton GEMMs off, as the launchers set them for precision=fp8)",
    )
    p.add_argument("--dry_run", action="store_true", help="print the plan; measure nothing")
    p.add_argument("--out", default="roofline.json")
    args = p.parse_args()

    if args.fp8:  # before JAX starts its backend
        from lightningdit_jax import fp8 as fp8_lib

        os.environ["XLA_FLAGS"] = fp8_lib.xla_flags(os.environ.get("XLA_FLAGS", ""), "fp8")
    reference = REFERENCE
    if args.reference_json:  # read (and fail) before measuring anything
        reference = reference_figures(args.reference_json)
        print(f"reference figures from {args.reference_json} ({reference['device']})")
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
    if not args.dry_run and jax.default_backend() != "gpu":
        raise SystemExit(
            f"measuring needs a GPU (the kernel times come from a profiler trace); the backend is "
            f"{jax.default_backend()!r}. Use --dry_run for the plan alone."
        )
    dtype = jnp.dtype(args.dtype)
    results: dict = dict(paths={})
    bw_spec = bw_best = None
    tmp = tempfile.mkdtemp(prefix="roofline_")
    if not args.dry_run:
        bw = measure_bandwidth(tmp)
        bw_best = max(bw.values())
        bw_spec = spec_bandwidth(dev.device_kind, args.spec_bw)
        if bw_spec is None:
            raise SystemExit(
                f"no datasheet bandwidth known for {dev.device_kind!r}: pass --spec_bw=BYTES_PER_S"
            )
        results["bandwidth"] = dict(measured=bw, best=bw_best, spec=bw_spec)
        for name, rate in bw.items():
            print(f"  bandwidth {name}: {rate / 1e12:.2f} TB/s", flush=True)
        a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.float32).astype(dtype)
        ms = kernel_ms(_gemm_fn("nn"), (a, a), f"{tmp}/matmul")
        results["matmul_8192_tflops"] = 2 * 8192**3 / (ms * 1e-3) / 1e12
        print(f"  bf16 8192^3 GEMM: {results['matmul_8192_tflops']:.0f} TFLOP/s (kernel time)")
        del a
    cache: dict = {}
    variants = [dict(p, fp8=False) for p in paths(args)]
    if args.fp8:
        variants += [dict(p, name=f"{p['name']} fp8", fp8=True) for p in paths(args)]
    for path in variants:
        cfg = _config(path["preset"], args.dtype)
        plan = gemms(cfg, path["batch"], path["train"])
        items = traffic(cfg, path["batch"], path["train"])
        nbytes = sum(items.values())
        row = dict(
            preset=path["preset"],
            batch=path["batch"],
            train=path["train"],
            fp8=path["fp8"],
            gemm_tflop=sum(g.flops for g in plan) / 1e12,
            attention_tflop=attention_flops(cfg, path["batch"], path["train"]) / 1e12,
            traffic_gb=nbytes / 1e9,
            traffic_items_gb={k: v / 1e9 for k, v in items.items()},
        )
        print(
            f"[{path['name']}] GEMMs {row['gemm_tflop']:.2f} TFLOP, attention "
            f"{row['attention_tflop']:.2f} TFLOP, least other traffic {row['traffic_gb']:.1f} GB",
            flush=True,
        )
        for k, v in items.items():
            print(f"    {v / 1e9:7.2f} GB  {k}")
        if not args.dry_run:
            gm = measure_gemms(plan, dtype, tmp, cache, fp8=path["fp8"])
            row["gemms"] = gm
            row["gemm_ms"] = sum(r["ms"] for r in gm)
            row["attention_ms"] = measure_attention(cfg, path["batch"], path["train"], dtype, tmp)
            row["traffic_ms_spec"] = nbytes / bw_spec * 1e3
            row["traffic_ms_best"] = nbytes / bw_best * 1e3
            fixed = row["gemm_ms"] + row["attention_ms"]
            row["floor_ms_spec"] = fixed + row["traffic_ms_spec"]
            row["floor_ms_best"] = fixed + row["traffic_ms_best"]
            print(
                f"  GEMMs {row['gemm_ms']:.2f} ms ({row['gemm_tflop'] / row['gemm_ms'] * 1e3:.0f} "
                f"TFLOP/s), attention {row['attention_ms']:.2f} ms, traffic "
                f"{row['traffic_ms_spec']:.2f} ms at the datasheet's {bw_spec / 1e12:.2f} TB/s "
                f"({row['traffic_ms_best']:.2f} ms at the measured {bw_best / 1e12:.2f}): floor "
                f"{row['floor_ms_spec']:.2f} / {row['floor_ms_best']:.2f} ms",
                flush=True,
            )
        results["paths"][path["name"]] = row
    guided, plain = sampler_evaluations(
        args.sample_steps, args.sample_shift, args.cfg_interval_start
    )
    sample = dict(
        steps=args.sample_steps,
        shift=args.sample_shift,
        cfg_interval_start=args.cfg_interval_start,
        guided_calls=guided,
        conditional_calls=plain,
    )
    print(f"[sampler] {guided} guided calls at 2x{args.sample_batch}, {plain} conditional-only")
    for suffix in ("", " fp8") if args.fp8 else ("",):
        full = f"{args.sample_preset} forward b{2 * args.sample_batch}{suffix}"
        half = f"{args.sample_preset} forward b{args.sample_batch}{suffix}"
        if not args.dry_run and full in results["paths"] and half in results["paths"]:
            for bw in ("spec", "best"):
                s = (
                    guided * results["paths"][full][f"floor_ms_{bw}"]
                    + plain * results["paths"][half][f"floor_ms_{bw}"]
                ) / 1e3
                tag = suffix.strip().replace(" ", "_")
                sample[f"floor_s_{bw}" + (f"_{tag}" if tag else "")] = s
                sample[f"ceiling_img_per_s_{bw}" + (f"_{tag}" if tag else "")] = (
                    args.sample_batch / s
                )
    results["sampler"] = sample
    if args.vae_train:
        bws = None if args.dry_run else (bw_spec, bw_best)
        results["vae_train"] = vae_floor(args.vae_config, int(args.vae_train), args.dtype, tmp, bws)
    results["targets"] = _targets(results, args, reference)
    results["meta"] = dict(
        device=dev.device_kind, jax=jax.__version__, date=time.strftime("%Y-%m-%d"), argv=sys.argv
    )
    for name, t in results["targets"].items():
        print(f"[target] {name}: {json.dumps(t)}")
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2))


def reference_figures(path: str) -> dict:
    """REFERENCE with `same_session` replaced by a bench_reference.py JSON's figures."""
    data = json.loads(pathlib.Path(path).read_text())
    rows = {r["case"]: r for r in data["results"]}
    want = {
        "XL/1 train b64": ("reference_train_XL/1", 64, "img_per_s"),
        "B/1 train b256": ("reference_train_B/1", 256, "img_per_s"),
        "XL/1 sample b128": ("reference_cfg_forward_XL/1", 128, "img_per_s_at_250_steps"),
    }
    out = {k: dict(v) for k, v in REFERENCE.items()}
    for name, (case, batch, key) in want.items():
        row = rows.get(case)
        if row is None or row.get("batch") != batch:
            raise SystemExit(
                f"--reference_json={path}: no {case!r} at batch {batch} there (found "
                f"{sorted(rows)}); run launch/bench/bench_reference.py with its default cases"
            )
        out[name]["same_session"] = row[key]
    out["device"] = data["meta"]["device"]
    return out


def _targets(results, args, reference: dict) -> dict:
    """Each issue target as a time per batch, against the floor (where measured); `reference`
    is REFERENCE or `reference_figures`'s."""
    out = {}
    keys = {
        "XL/1 train b64": ("XL/1 train b64", 64),
        "B/1 train b256": ("B/1 train b256", 256),
    }
    for suffix in ("", " fp8") if args.fp8 else ("",):
        for name, (path, batch) in keys.items():
            ref = reference[name]
            ratio = FP8_RATIO[name] if suffix else ref["ratio"]
            row = dict(
                ratio=ratio,
                target_ms_design=batch / (ratio * ref["design"]) * 1e3,
                target_ms_same_session=batch / (ratio * ref["same_session"]) * 1e3,
            )
            floor = results["paths"].get(path + suffix, {})
            for bw in ("spec", "best"):
                if f"floor_ms_{bw}" in floor:
                    row[f"floor_ms_{bw}"] = floor[f"floor_ms_{bw}"]
            out[name + suffix] = row
        ref = reference["XL/1 sample b128"]
        ratio = FP8_RATIO["XL/1 sample b128"] if suffix else ref["ratio"]
        row = dict(
            ratio=ratio,
            target_s_design=args.sample_batch / (ratio * ref["design"]),
            target_s_same_session=args.sample_batch / (ratio * ref["same_session"]),
        )
        tag = "_fp8" if suffix else ""
        for bw in ("spec", "best"):
            if f"floor_s_{bw}{tag}" in results["sampler"]:
                row[f"floor_s_{bw}"] = results["sampler"][f"floor_s_{bw}{tag}"]
        out["XL/1 sample b128" + suffix] = row
    return out


if __name__ == "__main__":
    main()
