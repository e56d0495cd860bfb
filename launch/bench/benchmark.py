"""Measures the hot paths at real sizes with random weights and data; prints a table, writes JSON.

  python launch/bench/benchmark.py --only=matmul,vae_codec,vae_train,dit_train,dit_sample \\
      --out=bench.json

Each case: compile once (reported apart), warm up, then time `--iters` calls, each synchronised
with `block_until_ready`, and report the median. Model FLOPs per image come from XLA's cost
analysis of the compiled step; MFU divides the achieved FLOP rate by a bf16 matmul rate measured
on the same device in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import pathlib
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lightningdit_jax.costs import forward_flops

RESULTS: list[dict] = []
PROFILES: dict[str, dict] = {}


def xla_flops(compiled) -> float | None:
    """XLA's FLOP count of a compiled program (best effort: None where the backend has none)."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost.get("flops", 0.0)) or None
    except Exception as e:  # noqa: BLE001  (cost analysis is missing on some backends)
        print(f"  (no cost analysis: {e})")
        return None


def timeit(fn: Callable, args: tuple, iters: int, warmup: int = 3) -> dict:
    """Compile time, then the median / min of `iters` synchronised calls (seconds)."""
    t = time.perf_counter()
    compiled = (
        jax.jit(fn).lower(*args).compile()
        if not hasattr(fn, "lower")
        else fn.lower(*args).compile()
    )
    compile_s = time.perf_counter() - t
    flops = xla_flops(compiled)
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
        compiled=compiled,
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
def data_parallel(args):
    """(replicate, shard_batch, n): place a state replicated and a batch split over the first
    `--num_devices` devices (data parallelism through jit's sharding propagation)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from vavae_jax.runtime import sharding

    n = args.num_devices
    if n > jax.device_count():
        raise SystemExit(f"--num_devices={n}, but only {jax.device_count()} devices are present")
    mesh = sharding.make_mesh(n, 1, devices=jax.devices()[:n])
    rep = NamedSharding(mesh, PartitionSpec())

    def replicate(tree):
        return jax.device_put(tree, rep)

    def shard_batch(x):
        return jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))

    def in_mesh(fn):  # the models' batch sharding constraints need the mesh at trace time
        def wrapped(*a):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return fn(*a)

        return wrapped

    return replicate, shard_batch, n, in_mesh


def bench_matmul(args) -> float:
    """The bf16 matmul rate of the device: ten chained 8192^3 products in one program (one launch
    and one synchronisation for all ten, so that dispatch does not count)."""
    n, reps = 8192, 10
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = (jax.random.normal(kb, (n, n), jnp.float32) / np.sqrt(n)).astype(jnp.bfloat16)

    def chain(a, b):
        return jax.lax.fori_loop(0, reps, lambda i, x: x @ b, a)

    r = timeit(chain, (a, b), iters=10)
    peak = reps * 2 * n**3 / r["median_s"]
    RESULTS.append(dict(case="matmul_bf16_8192", tflops=peak / 1e12, median_s=r["median_s"]))
    print(f"  bf16 matmul {n}^3 (x{reps} chained): {peak / 1e12:.0f} TFLOP/s", flush=True)
    return peak


def maybe_profile(args, name: str, fn: Callable[[], object], steps: int = 3) -> None:
    """With --profile_dir: a jax.profiler trace of `steps` more calls, summarised by kernel."""
    if not args.profile_dir:
        return
    from vavae_jax.runtime import profiling

    logdir = str(pathlib.Path(args.profile_dir) / name.replace("/", ""))
    try:
        summary = profiling.profile(fn, steps, logdir)
    except (RuntimeError, FileNotFoundError) as e:
        print(f"  (no profile: {e})", flush=True)
        return
    print(profiling.format_summary(summary), flush=True)
    summary["top_kernels"] = summary["top_kernels"][: args.profile_top]
    summary["top_hlo_ops"] = summary["top_hlo_ops"][: args.profile_top]
    PROFILES[name] = summary


def save_hlo(args, name: str, compiled) -> None:
    """With --hlo_dir: the compiled program's optimised HLO (gzipped text), to read the fusions
    XLA made (which tensors each kernel reads and writes)."""
    if not args.hlo_dir:
        return
    import gzip

    path = pathlib.Path(args.hlo_dir) / (name.replace("/", "") + ".hlo.txt.gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(compiled.as_text().encode()))
    print(f"  optimised HLO: {path}", flush=True)


def bench_vae_codec(args, peak):
    from vavae_jax.model import PRESETS, AutoencoderKL

    b = args.vae_batch
    for dtype in args.vae_dtypes.split(","):
        cfg = PRESETS["f16d32"].__class__(**{**PRESETS["f16d32"].__dict__, "dtype": dtype})
        model = AutoencoderKL(cfg, rngs=nnx.Rngs(0))
        gdef, state = nnx.split(model)
        x = jax.random.uniform(jax.random.key(1), (b, 256, 256, 3), jnp.float32, -1, 1)
        z = jax.random.normal(jax.random.key(2), (b, 16, 16, 32), jnp.float32)

        def enc(state, x, gdef=gdef):
            return nnx.merge(gdef, state).encode(x).mean

        def dec(state, z, gdef=gdef):
            return nnx.merge(gdef, state).decode(z)

        record(f"vae_encode_{dtype}", b, timeit(enc, (state, x), args.iters), peak)
        record(f"vae_decode_{dtype}", b, timeit(dec, (state, z), args.iters), peak)


def _vavae_config():
    """The main job's config, `configs/vavae_f16d32.py` as shipped."""
    from vavae_jax.runtime import cli

    return cli.config_from_file(
        str(pathlib.Path(__file__).resolve().parents[2] / "configs/vavae_f16d32.py")
    )


class VaeVariant(NamedTuple):
    """A --vae_variants form of the VA-VAE step."""

    group_norm: str  # model.GROUP_NORM_BACKWARD
    options: dict  # XLA compiler options
    donated: bool  # whether the state is donated
    flat: bool  # the state and frozen weights passed as flat lists of arrays
    description: str


VAE_VARIANTS = {
    "default": VaeVariant("autodiff", {}, True, False, "the model as shipped"),
    "gn_written": VaeVariant(
        "written", {}, True, False, "GroupNorm's written backward, model.group_norm_vjp"
    ),
    "no_command_buffer": VaeVariant(
        "autodiff",
        {"xla_gpu_enable_command_buffer": ""},
        True,
        False,
        "XLA's command buffers (CUDA graphs) off: is the host time before the first kernel "
        "their update?",
    ),
    "no_donation": VaeVariant(
        "autodiff",
        {},
        False,
        False,
        "the state not donated: is the host time the runtime's handling of ~1500 donated buffers?",
    ),
    "cb_fusion": VaeVariant(
        "autodiff",
        {"xla_gpu_enable_command_buffer": "FUSION"},
        True,
        False,
        "only fusions in command buffers: GEMM, cuDNN and custom calls (re-captured when their "
        "buffers move) launched one by one",
    ),
    "flat_args": VaeVariant(
        "autodiff",
        {},
        True,
        True,
        "the ~1900 arrays passed as flat lists, the nnx structure rebuilt inside the trace: is "
        "the host time the flattening of nnx Variables (8.1 ms a call on a 2-core CPU, 1.6 ms "
        "flat)?",
    ),
}


def bench_vae_train(args, peak):
    """The full VA-VAE step: autoencoder + LPIPS + PatchGAN + DINOv2-large teacher, both
    optimizers, both adaptive weights (random weights; bf16 compute, f32 parameters)."""
    import dataclasses

    import optax

    from vavae_jax import discriminator as disc_lib
    from vavae_jax import foundation, losses
    from vavae_jax import lpips as lpips_lib
    from vavae_jax import model as model_lib
    from vavae_jax.model import PRESETS
    from vavae_jax.train_step import Generator, StepConfig, frozen_state, make_train_step

    for dtype in args.vae_train_dtypes.split(","):
        cdt = jnp.dtype(dtype)
        ae_cfg = dataclasses.replace(PRESETS["f16d32"], dtype=dtype)
        tcfg = dataclasses.replace(foundation.PRESETS["dinov2-large"], dtype=dtype)
        teacher = foundation.DinoV2Teacher(foundation.Dinov2Model(tcfg, rngs=nnx.Rngs(3)))
        lp = lpips_lib.LPIPS(dtype, rngs=nnx.Rngs(4))
        gen = Generator(ae_cfg, teacher.feature_dim, 0.0, rngs=nnx.Rngs(1))
        disc = disc_lib.NLayerDiscriminator(
            disc_lib.DiscriminatorConfig(dtype=dtype), rngs=nnx.Rngs(2)
        )
        gdef, P, rest = nnx.split(gen, nnx.Param, ...)
        ddef, dP, dS = nnx.split(disc, nnx.Param, nnx.BatchStat)
        # The shipped config's settings (configs/vavae_f16d32.py), GAN on: the full step.
        config = _vavae_config()
        tx = optax.adam(config.optim.lr, b1=config.optim.b1, b2=config.optim.b2)
        cfg = StepConfig.from_config(config, cdt)
        frozen = frozen_state(lp, teacher)
        state = dict(
            gen=P,
            gen_rest=rest,
            disc=dP,
            disc_stats=dS,
            opt_g=tx.init(P),
            opt_d=tx.init(dP),
            step=jnp.int32(0),
        )
        if cfg.ema_decay is not None:
            state["ema"] = jax.tree.map(jnp.copy, P)
        loss = losses.LossConfig.from_config(config.loss).as_arrays()
        hp = (loss, jnp.int32(config.loss.disc_start))  # stage_step past disc_start: GAN on
        replicate, shard_batch, n, in_mesh = data_parallel(args)
        state, frozen = replicate(state), replicate(frozen)
        cases = [
            (int(v) * n, variant)  # batch per device
            for v in args.vae_train_batches.split(",")
            for variant in args.vae_variants.split(",")
        ]
        unknown = [v for _, v in cases if v not in VAE_VARIANTS]
        if unknown:
            raise SystemExit(f"--vae_variants: {unknown} not in {list(VAE_VARIANTS)}")

        for b, variant in cases:
            with _guarded(f"vae_train b{b} {variant}"):
                group_norm, options, donated, flat, _ = VAE_VARIANTS[variant]
                model_lib.GROUP_NORM_BACKWARD = group_norm  # read when the step below is traced
                step = in_mesh(make_train_step(gdef, ddef, lp, teacher, tx, tx, cfg))  # a new trace
                x = jax.random.uniform(jax.random.key(0), (b, 256, 256, 3), jnp.float32, -1, 1)
                x = shard_batch(x)
                if flat:  # lists of arrays in and out; the structure only inside the trace
                    leaves, treedef = jax.tree.flatten((state, frozen))
                    n_state = len(jax.tree.leaves(state))

                    def flat_step(state_leaves, frozen_leaves, *call, step=step, treedef=treedef):
                        s, fr = jax.tree.unflatten(treedef, [*state_leaves, *frozen_leaves])
                        new_state, metrics = step(s, fr, *call)
                        return jax.tree.leaves(new_state), metrics

                    fn = jax.jit(flat_step, donate_argnums=(0,) if donated else ())
                    state0, frozen0 = leaves[:n_state], leaves[n_state:]
                else:
                    fn = jax.jit(step, donate_argnums=(0,) if donated else ())
                    state0, frozen0 = state, frozen  # the next variants start from these again
                args_ = (state0, frozen0, {"image": x}, jax.random.key(1), *hp)
                t = time.perf_counter()
                compiled = fn.lower(*args_).compile(compiler_options=options or None)
                compile_s = time.perf_counter() - t
                times, dispatch = [], []
                st = jax.tree.map(jnp.copy, state0)
                for i in range(3 + args.iters // 2):
                    t = time.perf_counter()
                    st, m = compiled(st, frozen0, {"image": x}, jax.random.key(i), *hp)
                    t_back = time.perf_counter()  # the call returns once its work is enqueued
                    jax.block_until_ready(m)
                    if i >= 3:
                        times.append(time.perf_counter() - t)
                        dispatch.append(t_back - t)
                # As the trainer runs (runtime.loop): each step dispatched before waiting on the one
                # before it, so host work of one call can overlap the device's work on the last.
                n_ahead = max(2, args.iters // 2)
                t = time.perf_counter()
                previous = None
                for i in range(n_ahead):
                    st, m = compiled(st, frozen0, {"image": x}, jax.random.key(i), *hp)
                    if previous is not None:
                        jax.block_until_ready(previous)
                    previous = m
                jax.block_until_ready(previous)
                ahead_ms = (time.perf_counter() - t) / n_ahead * 1e3
                r = dict(
                    compile_s=compile_s,
                    median_s=statistics.median(times),
                    min_s=min(times),
                    flops=None,
                )
                name = f"vae_train_{dtype}" + (f"_x{n}dev" if n > 1 else "")
                name += "" if variant == "default" else f"_{variant}"
                extra = dict(
                    dispatch_ms=statistics.median(dispatch) * 1e3,
                    one_ahead_ms=ahead_ms,
                    arguments=len(jax.tree.leaves(args_)),
                )
                record(name, b, r, peak, loss=float(m["train/total_loss"]), num_devices=n, **extra)
                holder = {"st": st}
                call_args = (frozen0, {"image": x}, jax.random.key(0), *hp)

                def again(holder=holder, call_args=call_args, compiled=compiled):
                    holder["st"], metrics = compiled(holder["st"], *call_args)
                    return metrics

                maybe_profile(args, name, again)
                st = holder.pop("st")
                del st


@contextlib.contextmanager
def _guarded(label: str):
    """Runs one case: an error (out of memory, a compile error of one variant, an XLA option
    this build lacks) is printed and recorded, and the next case runs: one failing case does
    not cost a GPU session the rest of its command."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 (recorded, not hidden)
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        kind = "out of memory" if "RESOURCE_EXHAUSTED" in str(e) else type(e).__name__
        print(f"  {label}: FAILED ({kind}): {first}", flush=True)
        traceback.print_exc(limit=4)
        RESULTS.append(dict(case=label, error=f"{kind}: {first}"))


def bench_membw(args) -> float:
    """Device memory bandwidth: one elementwise pass over a 1 GiB float32 array (bytes read plus
    bytes written per second), the ceiling of the elementwise and reduction kernels."""
    n = 1 << 28
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    r = timeit(lambda x: x * 1.0001 + 1.0, (x,), iters=20)
    rate = 2 * 4 * n / r["median_s"]
    RESULTS.append(dict(case="membw_f32_1GiB", gb_per_s=rate / 1e9, median_s=r["median_s"]))
    print(f"  memory bandwidth (read + write): {rate / 1e9:.0f} GB/s", flush=True)
    return rate


def _precision_field(field: str) -> tuple[str, str]:
    """("fp8", "delayed") of a case's precision field `fp8[+delayed][+scaled]`: the model's
    precision and FP8 scaling; "+scaled" sets `fp8.PRODUCT` (the product's form) for the cases
    traced after it."""
    from lightningdit_jax import fp8

    precision, *options = field.split("+")
    unknown = set(options) - {"delayed", "scaled"}
    if unknown or (options and precision == "default"):
        raise SystemExit(
            f"precision field {field!r}: expected default or fp8/fp8_emulated with optional "
            "+delayed (FP8 scaling) and +scaled (the product's form)"
        )
    fp8.PRODUCT = "scaled" if "scaled" in options else "direct"
    return precision, "delayed" if "delayed" in options else "current"


def _dit_model(preset, dtype, layers="scan", precision="default"):
    """(config, graphdef, params, rest) of a random-weight LightningDiT preset (inference)."""
    import dataclasses

    from lightningdit_jax.model import PRESETS, LightningDiT

    if layers not in ("scan", "loop"):
        raise SystemExit(f"layers={layers!r}: expected scan or loop")
    precision, _ = _precision_field(precision)  # sampling scales its inputs from themselves
    cfg = dataclasses.replace(
        PRESETS[preset],
        dtype=dtype,
        remat_policy="none",
        scan_layers=layers == "scan",
        precision=precision,
    )
    model = LightningDiT(cfg, rngs=nnx.Rngs(0))
    gdef, params, rest = nnx.split(model, nnx.Param, ...)
    # adaLN-zero leaves the gates and the final layer at zero, so the blocks would add nothing
    # and the output would be zero: give the zero leaves small random values instead, so that
    # every kernel sees real data and outputs can be compared (e.g. by launch/bench/flag_sweep.py).
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [
        0.02 * jax.random.normal(k, v.shape, v.dtype) if not jnp.any(v) else v
        for k, v in zip(keys, leaves, strict=True)
    ]
    return cfg, gdef, jax.tree.unflatten(treedef, leaves), rest


def bench_dit_train(args, peak):
    """LightningDiT train step: rectified-flow loss (lognorm t, cosine), AdamW, EMA 0.9999."""

    for spec in args.dit_train.split(";"):
        with _guarded(f"dit_train {spec}"):
            _dit_train_case(args, peak, spec)


def _dit_train_case(args, peak, spec):
    """The trainer's own step (`lightningdit_jax.train.build_step`: the config's loss, AdamW,
    EMA and the metrics it logs), on random latents, data parallel over `--num_devices`."""
    from lightningdit_jax import train as dit_train
    from vavae_jax.runtime import cli, sharding

    preset, b, dtype, remat, *rest = spec.split(",")
    layers = rest[0] if rest else "scan"
    field = rest[1] if len(rest) > 1 else "default"
    precision, scaling = _precision_field(field)
    if layers not in ("scan", "loop"):
        raise SystemExit(f"{spec}: layers={layers!r}, expected scan or loop")
    path = pathlib.Path(__file__).resolve().parents[2] / "configs/lightningdit_xl_vavae_f16d32.py"
    config = cli.config_from_file(f"{path}:{preset}")
    n = args.num_devices
    config.global_batch_size = int(b) * n  # the spec's batch is per device
    config.dtype = dtype
    config.model.remat_policy = remat
    config.model.scan_layers = layers == "scan"
    config.model.precision = precision
    config.model.fp8_scaling = scaling
    config.mesh.num_devices = n
    mesh = sharding.mesh_from_config(config.mesh)
    mcfg = dit_train.model_config(config)
    ts = dit_train.build_step(config, mesh, mcfg)
    state = ts.init_state(jax.random.key(0))
    gb = config.global_batch_size
    shape = (gb, mcfg.input_size, mcfg.input_size, mcfg.in_channels)
    batch = jax.device_put(
        dict(
            latent=jax.random.normal(jax.random.key(1), shape, jnp.float32),
            label=jax.random.randint(jax.random.key(2), (gb,), 0, mcfg.num_classes),
        ),
        ts.batch_sharding,
    )
    bits = [jax.device_put(jax.random.key_data(jax.random.key(i)), ts.replicated) for i in range(2)]
    t = time.perf_counter()
    compiled = ts.jit().lower(state, batch, bits[0]).compile()
    compile_s = time.perf_counter() - t
    name = f"dit_train_{preset}_{dtype}_remat-{remat}_{layers}" + (f"_x{n}dev" if n > 1 else "")
    name += "" if field == "default" else f"_{field}"
    save_hlo(args, name, compiled)
    flops = xla_flops(compiled)
    times = []
    for i in range(3 + args.iters):
        t = time.perf_counter()
        state, metrics = compiled(state, batch, bits[i % 2])
        jax.block_until_ready(metrics)
        if i >= 3:
            times.append(time.perf_counter() - t)
    if not np.isfinite(float(metrics["train/loss"])):
        raise SystemExit(f"{spec}: the loss is not finite ({metrics['train/loss']})")
    # XLA counts a scanned body once: use the analytic count (3x forward) for MFU.
    r = dict(
        compile_s=compile_s,
        median_s=statistics.median(times),
        min_s=min(times),
        flops=3 * forward_flops(mcfg) * gb,
    )
    record(
        name,
        gb,
        r,
        peak * n if peak else None,
        xla_flops=flops,
        num_devices=n,
        loss=float(metrics["train/loss"]),  # to compare numerics across XLA flag variants
    )
    holder = {"state": state}

    def again(holder=holder):
        holder["state"], m = compiled(holder["state"], batch, bits[0])
        return m

    maybe_profile(args, name, again)
    del state, holder


def bench_dit_sample(args, peak):
    """XL/1 sampling: Euler ODE, 250 steps, CFG with interval, shift 0.3 (reference settings),
    at each batch of --sample_batch."""
    cfg, gdef, params, rest = _dit_model(
        args.sample_preset, args.sample_dtype, args.sample_layers, args.sample_precision
    )
    for b in [int(v) for v in str(args.sample_batch).split(",")]:
        with _guarded(f"dit_sample b{b} {args.sample_precision}"):
            _sample_case(args, peak, cfg, gdef, params, rest, b)


def _sample_case(args, peak, cfg, gdef, params, rest, b: int) -> None:
    from lightningdit_jax import sampling

    shape = (b, cfg.input_size, cfg.input_size, cfg.in_channels)
    z0 = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    y = jax.random.randint(jax.random.key(2), (b,), 0, 1000)

    def run(num_steps):  # sample_ode jits itself; num_steps is traced inside
        return sampling.sample_ode(
            nnx.merge(gdef, params, rest),
            z0,
            y,
            num_steps=num_steps,
            timestep_shift=0.3,
            cfg_scale=10.0,
            cfg_interval_start=0.1,
        )

    for steps in (args.sample_steps,):  # 250: the reference's; fewer scale (rate per step)
        t = time.perf_counter()
        jax.block_until_ready(run(11))  # compile + warm-up (steps are traced)
        compile_s = time.perf_counter() - t
        times = []
        for _ in range(2):
            t = time.perf_counter()
            jax.block_until_ready(run(steps))
            times.append(time.perf_counter() - t)
        fwd = forward_flops(cfg)
        # model evaluations: steps-1 Euler steps; t < 0.1 runs B, the rest 2B (CFG)
        r = dict(
            compile_s=compile_s, median_s=statistics.median(times), min_s=min(times), flops=None
        )
        name = args.sample_preset.replace("/", "")
        record(
            f"dit_sample_{name}_{steps}steps_cfg_{args.sample_dtype}"
            + ("" if args.sample_precision == "default" else f"_{args.sample_precision}"),
            b,
            r,
            peak,
            fwd_flops_per_img=fwd,
            # the FID budget at this rate, scaled to 250 steps when timed at fewer
            hours_to_50k_at_250_steps=50000 / b * r["median_s"] * 250 / steps / 3600,
        )


def bench_dit_forward(args, peak):
    """One LightningDiT forward at inference (labels, no dropout): the cost of one CFG sampling
    step at batch B is that of this forward at 2B (the reference's 0.142 s at 2x128)."""
    for spec in args.dit_forward.split(";"):
        preset, b, dtype, *layers = spec.split(",")
        b = int(b)
        layers = layers[0] if layers else "scan"
        cfg, gdef, params, rest = _dit_model(preset, dtype, layers)
        shape = (b, cfg.input_size, cfg.input_size, cfg.in_channels)
        x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
        t = jax.random.uniform(jax.random.key(3), (b,), jnp.float32)
        y = jax.random.randint(jax.random.key(2), (b,), 0, 1001)

        def fwd(params, x, t, y, gdef=gdef, rest=rest):
            return nnx.merge(gdef, params, rest)(x, t, y)

        r = timeit(fwd, (params, x, t, y), args.iters)
        r["flops"] = forward_flops(cfg) * b
        name = f"dit_forward_{preset.replace('/', '')}_{dtype}_{layers}_b{b}"
        save_hlo(args, name, r["compiled"])
        out = np.asarray(r["out"], np.float64)
        record(name, b, r, peak, out_rms=float(np.sqrt(np.mean(out**2))))
        if args.save_forward_out:  # e.g. to compare the outputs of XLA flag variants
            np.save(f"{args.save_forward_out}_{name}.npy", out.astype(np.float32))
        maybe_profile(args, name, functools.partial(r["compiled"], params, x, t, y))


CASES = {
    "vae_codec": bench_vae_codec,
    "vae_train": bench_vae_train,
    "dit_train": bench_dit_train,
    "dit_sample": bench_dit_sample,
    "dit_forward": bench_dit_forward,
}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", default="matmul,vae_codec")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--vae_batch", type=int, default=64)
    p.add_argument("--vae_dtypes", default="bfloat16,float32")
    p.add_argument("--vae_train_dtypes", default="bfloat16")
    p.add_argument("--vae_train_batches", default="8,32")
    p.add_argument(
        "--vae_variants",
        default="default",
        help="vae_train: forms of the step to time, comma-separated: "
        + ", ".join(f"{k} ({v.description})" for k, v in VAE_VARIANTS.items()),
    )
    p.add_argument(
        "--dit_train",
        default="XL/1,64,bfloat16,none;B/1,256,bfloat16,none",
        help="';'-separated preset,batch,dtype,remat[,scan|loop[,precision]] cases; precision: "
        "default or fp8 (XLA's Triton GEMMs are then off for the whole process, as "
        "launch/train.py sets them for fp8: time the bf16 baseline in a run without fp8 cases), "
        "fp8+delayed (delayed scaling), fp8+scaled (the upcast-and-scale product form)",
    )
    p.add_argument(
        "--dit_forward",
        default="XL/1,256,bfloat16",
        help="';'-separated preset,batch,dtype[,scan|loop]",
    )
    p.add_argument(
        "--profile_dir", default="", help="Also trace the train/forward cases; kernel summary."
    )
    p.add_argument("--hlo_dir", default="", help="write the DiT steps' optimised HLO here")
    p.add_argument(
        "--profile_top", type=int, default=60, help="kernels kept per profile in the JSON"
    )
    p.add_argument(
        "--num_devices",
        type=int,
        default=1,
        help="Data parallelism over this many devices for dit_train and vae_train (batches in "
        "the specs are per device).",
    )
    p.add_argument(
        "--sample_batch", default="128", help="','-separated batches (the best for 50k images)"
    )
    p.add_argument("--sample_preset", default="XL/1")
    p.add_argument("--sample_steps", type=int, default=250)
    p.add_argument("--sample_dtype", default="bfloat16")
    p.add_argument("--sample_layers", default="scan", help="scan or loop (see dit_train)")
    p.add_argument(
        "--sample_precision", default="default", help="default, fp8 or fp8+scaled (see --dit_train)"
    )
    p.add_argument("--out", default="benchmark.json")
    p.add_argument(
        "--save_forward_out", default="", help="path prefix: dit_forward outputs saved as .npy"
    )
    args = p.parse_args()
    from lightningdit_jax import fp8

    # An fp8 case takes the FP8 path's XLA flags (lightningdit_jax/fp8.py), set before JAX starts
    # its backend: for every case of this process.
    fields = [args.sample_precision] + [c.split(",")[5] for c in args.dit_train.split(";")
                                        if c.count(",") >= 5]  # fmt: skip
    # A typo stops the command here, not after the cases before it ran.
    fp8_cases = any(_precision_field(f)[0] == "fp8" for f in fields)
    os.environ["XLA_FLAGS"] = fp8.xla_flags(
        os.environ.get("XLA_FLAGS", ""), "fp8" if fp8_cases else "default"
    )
    dev = jax.devices()[0]
    print(
        f"device: {dev.device_kind} x{jax.device_count()} ({jax.default_backend()}), "
        f"jax {jax.__version__}",
        flush=True,
    )
    wanted = args.only.split(",")
    peak = bench_matmul(args) if "matmul" in wanted else None
    if "membw" in wanted:
        bench_membw(args)
    for name in wanted:
        if name in ("matmul", "membw"):
            continue
        if name not in CASES:
            raise SystemExit(
                f"--only: unknown case {name!r}; known: matmul, membw, {', '.join(CASES)}"
            )
        print(f"[{name}]", flush=True)
        CASES[name](args, peak)
    meta = dict(
        device=dev.device_kind,
        backend=jax.default_backend(),
        jax=jax.__version__,
        n_devices=jax.device_count(),
        date=time.strftime("%Y-%m-%d"),
        argv=sys.argv,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(
        json.dumps(
            dict(
                meta=meta,
                results=[
                    {k: v for k, v in r.items() if k not in ("out", "compiled")} for r in RESULTS
                ],
                profiles=PROFILES,
            ),
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
