"""Lower bounds on the LightningDiT step times, measured on the device: can a target be reached?

  python launch/roofline.py --out=roofline.json            # GPU: measure, print, write JSON
  python launch/roofline.py --dry_run                      # any backend: the plan, no timing

For each path (a train step at a batch, one forward at a batch, the Euler CFG sampler) the floor is

    floor = sum of the step's GEMMs, each timed alone (the kernel XLA picks for it, bf16 in and
            out, profiler device time)
          + the step's attention, timed alone (cuDNN's flash kernels, forward or forward+backward)
          + the least HBM traffic of everything else, divided by a bandwidth

with two bandwidths: the datasheet's (a hard ceiling: the floor is then a lower bound for any
program whose GEMMs and attention are separate kernels) and the best a streaming kernel reached
on the device in the same run.

The least traffic (`traffic`) counts only bytes that no fusion of the non-GEMM work can avoid
while GEMMs and attention stay separate kernels (cuBLAS / XLA's Triton GEMMs, cuDNN attention):
  * every GEMM input made by non-GEMM work is written once, and every GEMM output that non-GEMM
    work consumes is read once (the modulated inputs, q/k before and after RoPE, the SwiGLU
    pre-activation and product, the gradients between the backward GEMMs); v reaches attention
    and dv reaches the qkv gradient without a pass of their own (strided views);
  * saved tensors that the backward needs and cannot get cheaper by recomputation are read once
    (the SwiGLU pre-activation; the attention and MLP branch outputs for the gate gradients);
  * the float32 residual stream: each fused non-GEMM pass that needs it reads at least 4 bytes
    per element (a stored float32 copy, or at least two bf16 tensors to rebuild it), and writes
    nothing (a lower bound); the same for the float32 gradient of the stream in the backward;
  * AdamW + EMA: parameters, both moments and the EMA read and written once in float32, the
    gradient read once in bf16 (34 bytes per parameter); the bf16 copies of the weights cost
    nothing (fused into the GEMMs), nor do bias gradients, norm statistics or per-image vectors.
Everything not listed is taken as free, so the sum is a lower bound, not an estimate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# Datasheet HBM bandwidths (bytes/s), matched against `device_kind`; --spec_bw overrides.
SPEC_BANDWIDTH = {
    "H100 80GB HBM3": 3.35e12,  # H100 SXM5
    "H100 PCIe": 2.0e12,
    "H200": 4.8e12,
}

# The reference's figures (../shared/DESIGN.md) and those measured beside ours on an H100
# (BENCHMARKS.md, launch/bench_reference.py), with the target ratios.
REFERENCE = {
    "XL/1 train b64": dict(design=407.0, same_session=403.4, ratio=1.6, unit="img/s"),
    "B/1 train b256": dict(design=2107.0, same_session=2018.0, ratio=1.5, unit="img/s"),
    "XL/1 sample b128": dict(design=3.6, same_session=3.54, ratio=1.5, unit="img/s"),
}


@dataclasses.dataclass(frozen=True)
class Gemm:
    """out[m, n] = A[m, k] @ B[k, n], `count` times per step. layout: "nn" (A [m, k], B [k, n]),
    "nt" (B stored [n, k]: a gradient with respect to the input) or "tn" (A stored [k, m]: a
    gradient with respect to the weight)."""

    name: str
    m: int
    k: int
    n: int
    layout: str
    count: int = 1

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n * self.count


def _linear(name, m, k, n, *, train, dx=True, count=1) -> list[Gemm]:
    """A dense layer y[m, n] = x[m, k] w[k, n] and, in training, its two gradients."""
    out = [Gemm(f"{name}.fwd", m, k, n, "nn", count)]
    if train:
        if dx:
            out.append(Gemm(f"{name}.dx", m, n, k, "nt", count))
        out.append(Gemm(f"{name}.dw", k, m, n, "tn", count))
    return out


def _mlp_hidden(cfg) -> int:
    h = int(cfg.hidden_size * cfg.mlp_ratio)
    return int(2 / 3 * h) if cfg.use_swiglu else h


def gemms(cfg, batch: int, train: bool) -> list[Gemm]:
    """Every matmul of one forward (train=False) or one train step of the model, attention's
    score and value products excluded (see `attention_shape`) and the patch embedding (a
    convolution) included as `embed.conv`. `tests/test_roofline.py` checks the list against the
    dot products of the lowered program."""
    d, L = cfg.hidden_size, cfg.depth
    m = batch * cfg.num_patches
    hid = _mlp_hidden(cfg)
    n_mod = 4 if cfg.wo_shift else 6
    p2c = cfg.patch_size**2
    out: list[Gemm] = []
    # The input is data and the sinusoidal features have no parameters: no input gradients.
    out += _linear("embed.conv", m, p2c * cfg.in_channels, d, train=train, dx=False)
    out += _linear("t_embedder.mlp_0", batch, 256, d, train=train, dx=False)
    out += _linear("t_embedder.mlp_2", batch, d, d, train=train)
    out += _linear("block.adaLN", batch, d, n_mod * d, train=train, count=L)
    out += _linear("block.qkv", m, d, 3 * d, train=train, count=L)
    out += _linear("block.proj", m, d, d, train=train, count=L)
    if cfg.use_swiglu:
        out += _linear("block.w12", m, d, 2 * hid, train=train, count=L)
        out += _linear("block.w3", m, hid, d, train=train, count=L)
    else:
        out += _linear("block.fc1", m, d, hid, train=train, count=L)
        out += _linear("block.fc2", m, hid, d, train=train, count=L)
    out += _linear("final.adaLN", batch, d, 2 * d, train=train)
    out += _linear("final.linear", m, d, p2c * cfg.out_channels, train=train)
    return out


def attention_shape(cfg, batch: int) -> tuple[int, int, int, int]:
    """(batch, tokens, heads, head_dim) of each block's attention."""
    return batch, cfg.num_patches, cfg.num_heads, cfg.head_dim


def attention_flops(cfg, batch: int, train: bool) -> float:
    """QK^T and AV of every block (x3 for forward + backward, as for the dense layers)."""
    b, t, n, h = attention_shape(cfg, batch)
    return (3.0 if train else 1.0) * cfg.depth * 2 * (2.0 * b * n * t * t * h)


def trainable_params(cfg) -> int:
    """The optimizer's parameter count (nnx.Param leaves; the fixed position table excluded)."""
    from flax import nnx

    from lightningdit_jax.model import abstract_model

    state = nnx.state(abstract_model(cfg), nnx.Param)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def traffic(cfg, batch: int, train: bool, n_params: int | None = None) -> dict[str, float]:
    """The least HBM bytes of one forward or train step outside GEMMs and attention, itemised
    (see the module docstring for what is counted and why each item is unavoidable)."""
    c, f = jnp.dtype(cfg.dtype).itemsize, 4  # compute dtype, float32 (stream, optimizer)
    d, L = cfg.hidden_size, cfg.depth
    m = batch * cfg.num_patches
    hid = _mlp_hidden(cfg)
    qk_pass = cfg.use_rope or cfg.use_qknorm  # q and k get an elementwise pass before attention
    items: dict[str, float] = {}

    def add(name, per_token_bytes, times=1):
        items[name] = items.get(name, 0.0) + float(per_token_bytes) * m * times

    # forward, per block
    add("fwd: modulated inputs of qkv and w12/fc1 (written)", 2 * c * d, L)
    if qk_pass:
        add("fwd: q, k read from the qkv output and written for attention", 4 * c * d, L)
    add("fwd: proj and w3/fc2 outputs (read by the residual passes)", 2 * c * d, L)
    if cfg.use_swiglu:
        add("fwd: SwiGLU (pre-activation read, product written)", 3 * c * hid, L)
    else:
        add("fwd: GELU (pre-activation read, output written)", 2 * c * hid, L)
    # the float32 stream: block 0's attention input is the patch output itself (a GEMM output,
    # counted below); block 0's MLP input can rebuild x_0 from it (c bytes); every later pass
    # and the final norm read >= 4 bytes per element.
    add("fwd: residual stream reads (>= 4 B/element per pass)", f * d * (2 * L - 1) + c * d)
    add("fwd: patch-embedding output read, final modulated input written", 2 * c * d)
    add("fwd: final output read", c * cfg.patch_size**2 * cfg.out_channels)
    if train:
        add("bwd: w3/fc2 input gradient (written), its dx output (read)", c * d + c * hid, L)
        if cfg.use_swiglu:
            add(
                "bwd: SwiGLU backward (pre-activation re-read, dg read, dh written)", 4 * c * hid, L
            )
        else:
            add("bwd: GELU backward (pre-activation re-read, gradient written)", 2 * c * hid, L)
        add("bwd: w12/fc1 dx output read, proj input gradient written", 2 * c * d, L)
        add("bwd: branch outputs re-read for the gate gradients", 2 * c * d, L)
        if qk_pass:
            add("bwd: dq, dk read and written into the qkv gradient", 4 * c * d, L)
        add("bwd: qkv dx output read", c * d, L)
        # each fused backward pass over the stream needs the forward stream (norm backward) and
        # the stream's gradient: >= 4 B each per element (2L passes, the first and last partial)
        add(
            "bwd: residual stream and its gradient (>= 4 B/element each per pass)",
            4 * f * d * L + c * d,
        )
        add("bwd: final dx output read, patch-embedding output gradient written", 2 * c * d)
        n_params = trainable_params(cfg) if n_params is None else n_params
        items["optimizer: AdamW + EMA (p, m, v, ema read+written f32, grad read bf16)"] = (
            8 * f + c
        ) * float(n_params)
    return items


def sampler_evaluations(num_steps: int, shift: float, cfg_interval_start: float) -> tuple[int, int]:
    """(guided, conditional-only) model calls of the Euler sampler: `num_steps - 1` steps, CFG
    (a forward at twice the batch) where t >= cfg_interval_start, else the conditional half."""
    from lightningdit_jax import sampling
    from lightningdit_jax.transport import Transport

    t0, t1 = Transport().interval(eval=True)
    grid = np.asarray(sampling.time_grid(num_steps, t0, t1, shift))[: num_steps - 1]
    guided = int(np.sum(grid >= np.float32(cfg_interval_start)))
    return guided, num_steps - 1 - guided


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


def _operands(g: Gemm, dtype):
    ka, kb = jax.random.split(jax.random.key(0))
    a_shape = (g.k, g.m) if g.layout == "tn" else (g.m, g.k)
    b_shape = (g.n, g.k) if g.layout == "nt" else (g.k, g.n)
    a = jax.random.normal(ka, a_shape, jnp.float32).astype(dtype)
    b = (jax.random.normal(kb, b_shape, jnp.float32) / np.sqrt(g.k)).astype(dtype)
    return a, b


def _gemm_fn(layout: str):
    dims = {"nn": ((1,), (0,)), "nt": ((1,), (1,)), "tn": ((0,), (0,))}[layout]
    return lambda a, b: jax.lax.dot_general(a, b, (dims, ((), ())))


def measure_gemms(plan: list[Gemm], dtype, tmp: str, cache: dict) -> list[dict]:
    rows = []
    for g in plan:
        key = (g.m, g.k, g.n, g.layout, str(dtype))
        if key not in cache:
            a, b = _operands(g, dtype)
            cache[key] = kernel_ms(_gemm_fn(g.layout), (a, b), f"{tmp}/gemm_{len(cache)}")
            del a, b
        ms = cache[key]
        rows.append(
            dict(
                name=g.name,
                shape=[g.m, g.k, g.n],
                layout=g.layout,
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


def _config(preset: str, dtype: str):
    from lightningdit_jax.model import PRESETS

    return dataclasses.replace(PRESETS[preset], dtype=dtype)


def paths(args) -> list[dict]:
    """The paths of launch/benchmark.py whose targets the issue sets."""
    out = []
    for spec in args.train.split(";"):
        preset, b = spec.split(",")
        out.append(dict(name=f"{preset} train b{b}", preset=preset, batch=int(b), train=True))
    for spec in args.forward.split(";"):
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
    p.add_argument("--sample_preset", default="XL/1")
    p.add_argument("--sample_batch", type=int, default=128)
    p.add_argument("--sample_steps", type=int, default=250)
    p.add_argument("--sample_shift", type=float, default=0.3)
    p.add_argument("--cfg_interval_start", type=float, default=0.1)
    p.add_argument("--spec_bw", type=float, default=0.0, help="datasheet bandwidth, bytes/s")
    p.add_argument(
        "--reference_json",
        default="",
        help="launch/bench_reference.py output from this machine: targets from its figures "
        "instead of the H100 ones (the same GPU kind, measured in the same session)",
    )
    p.add_argument("--dry_run", action="store_true", help="print the plan; measure nothing")
    p.add_argument("--out", default="roofline.json")
    args = p.parse_args()

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
    for path in paths(args):
        cfg = _config(path["preset"], args.dtype)
        plan = gemms(cfg, path["batch"], path["train"])
        items = traffic(cfg, path["batch"], path["train"])
        nbytes = sum(items.values())
        row = dict(
            preset=path["preset"],
            batch=path["batch"],
            train=path["train"],
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
            gm = measure_gemms(plan, dtype, tmp, cache)
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
    full = f"{args.sample_preset} forward b{2 * args.sample_batch}"
    half = f"{args.sample_preset} forward b{args.sample_batch}"
    if not args.dry_run and full in results["paths"] and half in results["paths"]:
        for bw in ("spec", "best"):
            s = (
                guided * results["paths"][full][f"floor_ms_{bw}"]
                + plain * results["paths"][half][f"floor_ms_{bw}"]
            ) / 1e3
            sample[f"floor_s_{bw}"] = s
            sample[f"ceiling_img_per_s_{bw}"] = args.sample_batch / s
    results["sampler"] = sample
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
                f"{sorted(rows)}); run launch/bench_reference.py with its default cases"
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
    for name, (path, batch) in keys.items():
        ref = reference[name]
        row = dict(
            target_ms_design=batch / (ref["ratio"] * ref["design"]) * 1e3,
            target_ms_same_session=batch / (ref["ratio"] * ref["same_session"]) * 1e3,
        )
        floor = results["paths"].get(path, {})
        for bw in ("spec", "best"):
            if f"floor_ms_{bw}" in floor:
                row[f"floor_ms_{bw}"] = floor[f"floor_ms_{bw}"]
        out[name] = row
    ref = reference["XL/1 sample b128"]
    row = dict(
        target_s_design=args.sample_batch / (ref["ratio"] * ref["design"]),
        target_s_same_session=args.sample_batch / (ref["ratio"] * ref["same_session"]),
    )
    for bw in ("spec", "best"):
        if f"floor_s_{bw}" in results["sampler"]:
            row[f"floor_s_{bw}"] = results["sampler"][f"floor_s_{bw}"]
    out["XL/1 sample b128"] = row
    return out


if __name__ == "__main__":
    main()
