"""Our side of the LightningDiT parity runs (issue 18, item 2): the trainer's own step on the
shared batch list from the converted common init; validation losses of every checkpoint (ours
and the reference's); samples; decoding of both sides' samples with one tokenizer.

  python3 launch/parity/dit_ours.py train --work=W --run=ours [--dtype=auto|float32]
  python3 launch/parity/dit_ours.py post --work=W --tokenizer=<VA-VAE run or export folder>
  (post = eval + sample + decode; each also runs alone: eval, sample, decode)

The step is `lightningdit_jax.train.build_step` for the config
configs/lightningdit_xl_vavae_f16d32.py:<preset> (AdamW 2e-4, betas 0.9/0.95, EMA 0.9999, the
transport's lognorm t and cosine loss, label dropout 0.1) with the plan's batch size on one
device, compiled ahead of time as `train.run` does. What differs from `train.run`:
- the data: the plan's batch list over the shared latent arrays (dit_common.Data), normalised
  with `lightningdit_jax.data.normalize` and the train extraction's stats, instead of the grain
  pipeline's own shuffle and flips;
- the start: the converted reference init (init/nnx, `convert.load_converted`), Adam moments
  zero and the EMA equal to it, as the trainer's own init;
- the first K steps (plan inject_steps): t, noise and label drop come from plan/inject.npz. The
  step is the same `train.make_train_step` (loss, AdamW update, EMA update), built with a
  `Transport` whose `sample_t` returns the given t and whose `plan` uses the given noise
  (`GivenNoise`, passed through make_train_step's `transport` argument), and with the labels
  dropped as the file says while `LabelEmbedder.token_drop` is replaced, only while that step
  is traced, by the identity (`given_label_drop`). No library change is needed. From step K on,
  the trainer's own step draws them from `fold_in(fold_in(key(seed), 2), step)` as `train.run`.
`--dtype=float32` also sets jax_default_matmul_precision=highest (the exact phase: no TF32).

Per step the log holds the step's own metrics (train/loss, mse, cos, grad_norm, param_norm),
fetched one step late so the host never waits for the step it has just dispatched. Checkpoints
(`--ckpt_steps`) are written in the exchange format (reference names: dit_common), for the
cross-evaluation.

Validation (`eval`): each checkpoint of every run under ckpt/ (ours and the reference's, read
with `convert.from_torch_state_dict`), its online and EMA weights, on the fixed validation
latents at the plan's t grid with its fixed noise: `transport.training_loss(..., train=False)`
(no label drop) with `GivenNoise`, per t and averaged over the grid.
Samples (`sample`): `sampling.sample_ode` (Euler, the reference's shifted grid, CFG on the first
3 channels with the interval, as the reference's inference.py) of the final checkpoint's online
weights (`--sample_weights`; after 3000 steps an EMA of decay 0.9999 still holds 0.9999^3000 =
74% of the init) from the plan's sampling noise and labels.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from unittest import mock

import dit_common as common
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lightningdit_jax import convert, sampling
from lightningdit_jax import data as data_lib
from lightningdit_jax import model as model_lib
from lightningdit_jax import train as train_lib
from lightningdit_jax import transport as transport_lib
from vavae_jax.runtime import cli, distributed, sharding, trainer
from vavae_jax.runtime.batches import make_global_batch

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "lightningdit_xl_vavae_f16d32.py"
SIDE = "ours"


# ---------------------------------------------------------------------------------------------
# Injecting t, noise and the label drop
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GivenNoise(transport_lib.Transport):
    """The transport with this batch's t [B] and noise x0 [B, h, w, C] given, not drawn."""

    given_t: Any = None
    given_x0: Any = None

    def sample_t(self, rng, batch):
        del rng, batch
        return self.given_t

    def plan(self, t, x0, x1):
        del x0  # the drawn noise: replaced
        return super().plan(t, self.given_x0, x1)


def _labels_as_given(self, labels, rng):
    del self, rng
    return labels


@contextlib.contextmanager
def given_label_drop():
    """While a step is traced: the labels arrive already dropped (null label where the file
    says), so the model's own random drop is the identity."""
    with mock.patch.object(model_lib.LabelEmbedder, "token_drop", _labels_as_given):
        yield


def injected_step(ts: train_lib.TrainStep, config, mesh):
    """(jitted step(state, batch, rng_bits, t, x0), its abstract arguments): `ts.fn` with the
    given t / noise / label drop (see the module docstring)."""
    tx = train_lib.make_optimizer(config.optim)
    base = dataclasses.asdict(train_lib.make_transport(config))

    def lightningdit_injected_step(state, batch, rng_bits, t, x0):
        transport = GivenNoise(**base, given_t=t, given_x0=x0)
        step_fn = train_lib.make_train_step(ts.graphdef, tx, transport, config.ema.decay)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), given_label_drop():
            return step_fn(state, batch, jax.random.wrap_key_data(rng_bits))

    batch_abs, rng_abs = ts.abstract_inputs
    latent = batch_abs["latent"]
    t_abs = jax.ShapeDtypeStruct(
        (latent.shape[0],), jnp.float32, sharding=ts.batch_sharding["label"]
    )
    x0_abs = jax.ShapeDtypeStruct(latent.shape, jnp.float32, sharding=ts.batch_sharding["latent"])
    args = (ts.abstract_state, batch_abs, rng_abs, t_abs, x0_abs)
    fn = jax.jit(
        lightningdit_injected_step,
        in_shardings=(ts.state_sharding, *trainer.shardings_of(args[1:])),
        out_shardings=ts.out_shardings,
        donate_argnums=(0,),
    )
    return fn, args


# ---------------------------------------------------------------------------------------------
# Config, model, state
# ---------------------------------------------------------------------------------------------
def run_config(plan: dict, dtype: str, remat: str = "none", seed: int = 0):
    """The shipped config of the plan's preset, with the plan's batch on one device."""
    c = cli.config_from_file(f"{CONFIG}:{plan['preset']}")
    c.global_batch_size = int(plan["batch"])
    c.dtype = dtype
    c.seed = seed
    c.model.remat_policy = remat
    c.mesh.update(dict(data=-1, fsdp=1, num_devices=1))
    return c


def setup(plan: dict, dtype: str, remat: str = "none", seed: int = 0):
    """(config, mesh, model config) checked against the plan's architecture."""
    if dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")
    config = run_config(plan, dtype, remat, seed)
    mesh = sharding.mesh_from_config(config.mesh)
    trainer.validate_config(config, mesh)
    platform = mesh.devices.flat[0].platform
    mcfg = train_lib.model_config(config, tuple(plan["latent_shape"]), platform=platform)
    ours = dataclasses.asdict(mcfg)
    diff = {k: (plan["model"][k], ours[k]) for k in common.REFERENCE_FIELDS}
    diff = {k: v for k, v in diff.items() if v[0] != v[1]}
    if diff:
        raise SystemExit(f"the config's model differs from the plan's (plan, config): {diff}")
    return config, mesh, mcfg


def initial_state(ts: train_lib.TrainStep, config, mcfg, work: common.Work):
    """The converted common init as the trainer's state: Adam moments zero, EMA = model."""
    # load_converted compares scan_layers too (convert.ARCHITECTURE_FIELDS), which only picks
    # how the stacked blocks run: load with the converted value, keep the state.
    saved = json.loads((work.init / "nnx" / convert.CONFIG_FILE).read_text())
    loadable = dataclasses.replace(mcfg, scan_layers=saved.get("scan_layers", mcfg.scan_layers))
    model = convert.load_converted(work.init / "nnx", loadable)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    tx = train_lib.make_optimizer(config.optim)

    def make(params, rest):
        return dict(
            params=params,
            rest=rest,
            opt=tx.init(params),
            ema=jax.tree.map(jnp.copy, params),
            step=jnp.zeros((), jnp.int32),
        )

    if jax.tree.structure(jax.eval_shape(make, params, rest)) != jax.tree.structure(
        ts.abstract_state
    ):
        raise ValueError("the converted init does not have the train step's state layout")
    return jax.jit(make, out_shardings=ts.state_sharding)(params, rest)


def weights_of(ts: train_lib.TrainStep, state) -> dict[str, dict[str, np.ndarray]]:
    params, rest, ema = jax.device_get((state["params"], state["rest"], state["ema"]))
    return dict(
        model=common.torch_state_dict(nnx.merge(ts.graphdef, params, rest)),
        ema=common.torch_state_dict(nnx.merge(ts.graphdef, ema, rest)),
    )


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
def train(args) -> dict:
    work = common.Work.at(args.work)
    plan = common.read_plan(work)
    data = common.Data(work, plan)
    steps = args.steps if args.steps > 0 else data.num_steps
    if steps > data.num_steps:
        raise SystemExit(f"--steps={steps}: the batch list has {data.num_steps} steps")
    inject = min(args.inject_steps if args.inject_steps >= 0 else data.inject_steps, steps)
    if inject > data.inject_steps:
        raise SystemExit(f"--inject_steps={inject}: the plan injects {data.inject_steps}")
    ckpt_steps = [s for s in common.int_list(args.ckpt_steps) if s <= steps]
    started = time.perf_counter()
    config, mesh, mcfg = setup(plan, args.dtype, args.remat, args.seed)
    ts = train_lib.build_step(config, mesh, mcfg)

    # Trace in this thread (the label-drop patch is active only while the injected step is
    # traced), then compile both XLA programs at once.
    lowered = {}
    if steps > inject:
        lowered["free"] = ts.jit().lower(*ts.abstract_args)
    if inject:
        fn, abstract = injected_step(ts, config, mesh)
        lowered["injected"] = fn.lower(*abstract)
    with ThreadPoolExecutor(len(lowered)) as pool:
        compiled = dict(zip(lowered, pool.map(lambda low: low.compile(), lowered.values())))
    free_step, inj_step = compiled.get("free"), compiled.get("injected")
    state = initial_state(ts, config, mcfg, work)
    compile_s = time.perf_counter() - started

    meta = dict(
        side=SIDE,
        run=args.run,
        preset=plan["preset"],
        batch=plan["batch"],
        steps=steps,
        inject_steps=inject,
        seed=args.seed,
        dtype=mcfg.dtype,
        matmul_precision=str(jax.config.jax_default_matmul_precision),
        remat=args.remat,
        device=jax.devices()[0].device_kind,
        jax=jax.__version__,
        init=plan["init"]["pt"],
    )
    writer = common.LogWriter(work.log(args.run), meta)
    mean, std, mult = data.mean, data.std, data.multiplier
    null = mcfg.null_label
    rng = jax.random.fold_in(jax.random.key(config.seed), 2)  # train.run's per-step stream
    lat_sh, lab_sh = ts.batch_sharding["latent"], ts.batch_sharding["label"]
    if 0 in ckpt_steps:
        common.save_weights(work.checkpoint(args.run, 0), **weights_of(ts, state))
    t0 = time.perf_counter()
    pending = None

    def flush():
        s, metrics, injected = pending
        m = jax.device_get(metrics)
        values = {k.removeprefix("train/"): v for k, v in m.items()}
        if not np.isfinite(values["loss"]):
            raise FloatingPointError(f"{args.run}: loss {values['loss']} at step {s}")
        writer.write(s, values, time.perf_counter() - t0, injected)

    for s in range(steps):
        z, y = data.batch(s)
        latent = data_lib.normalize(z, mean, std, mult).astype(np.float32)
        given = data.injected(s) if s < inject else None
        if given is not None:
            y = np.where(given["drop"], null, y).astype(np.int32)
        batch = make_global_batch({"latent": latent, "label": y}, mesh, ts.batch_sharding)
        bits = jax.device_put(jax.random.key_data(jax.random.fold_in(rng, s)), ts.replicated)
        if given is not None:
            t = jax.device_put(given["t"].astype(np.float32), lab_sh)
            x0 = jax.device_put(given["noise"].astype(np.float32), lat_sh)
            state, metrics = inj_step(state, batch, bits, t, x0)
        else:
            state, metrics = free_step(state, batch, bits)
        if pending is not None:
            flush()
        pending = (s, metrics, given is not None)
        if s + 1 in ckpt_steps:
            flush()
            pending = None
            common.save_weights(work.checkpoint(args.run, s + 1), **weights_of(ts, state))
    if pending is not None:
        flush()
    _, log, _ = common.read_log(work.log(args.run))
    end = dict(
        compile_s=round(compile_s, 1),
        train_s=round(time.perf_counter() - t0, 1),
        img_per_s=common.throughput(log, plan["batch"]),
        checkpoints=ckpt_steps,
    )
    writer.finish(end)
    print(dict(run=args.run, **end), flush=True)
    return end


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0, 1))
def _val_terms(graphdef, base, state, x1, y, t, x0):
    model = nnx.merge(graphdef, state)
    transport = GivenNoise(**dict(base), given_t=t, given_x0=x0)
    _, terms = transport_lib.training_loss(
        model, x1, y, jax.random.key(0), transport=transport, train=False
    )
    return terms


def load_model(path, group: str, mcfg):
    return convert.from_torch_state_dict(common.load_weights(path, group), mcfg)


def evaluate(args) -> list[dict]:
    work = common.Work.at(args.work)
    plan = common.read_plan(work)
    config, _, mcfg = setup(plan, args.dtype)
    base = tuple(dataclasses.asdict(train_lib.make_transport(config)).items())
    val = common.read_val(work)
    with np.load(work.data / "stats.npz") as f:
        mean, std = f["mean"], f["std"]
    x1 = data_lib.normalize(val["latents"], mean, std, plan["latent_multiplier"])
    x1 = x1.astype(np.float32)
    y = val["labels"]
    runs = set(args.runs.split(",")) if args.runs else None
    groups = args.eval_weights.split(",")
    results = []
    started = time.perf_counter()
    for run, step, path in work.checkpoints():
        if runs is not None and run not in runs:
            continue
        for group in groups:
            graphdef, state = nnx.split(load_model(path, group, mcfg))
            per_t = []
            for k, t in enumerate(val["t"]):
                sums = dict(mse=0.0, cos=0.0)
                for lo in range(0, len(y), args.eval_batch):
                    hi = min(lo + args.eval_batch, len(y))
                    terms = _val_terms(
                        graphdef,
                        base,
                        state,
                        x1[lo:hi],
                        y[lo:hi],
                        np.full(hi - lo, t, np.float32),
                        val["noise"][k, lo:hi],
                    )
                    for key in sums:
                        sums[key] += float(terms[key]) * (hi - lo)
                per_t.append({key: v / len(y) for key, v in sums.items()})
            row = dict(
                evaluator=SIDE,
                run=run,
                step=step,
                weights=group,
                mse=float(np.mean([p["mse"] for p in per_t])),
                cos=float(np.mean([p["cos"] for p in per_t])),
                per_t=per_t,
            )
            row["loss"] = row["mse"] + row["cos"]
            results.append(row)
            print(f"eval {run} step {step} {group}: {row['loss']:.5f}", flush=True)
    meta = dict(
        evaluator=SIDE,
        dtype=mcfg.dtype,
        t=[float(t) for t in val["t"]],
        num_val=len(y),
        device=jax.devices()[0].device_kind,
        seconds=round(time.perf_counter() - started, 1),
    )
    common.write_json(work.eval / f"by_{SIDE}.json", dict(meta=meta, results=results))
    return results


# ---------------------------------------------------------------------------------------------
# sample, decode
# ---------------------------------------------------------------------------------------------
def guidance_of(args) -> sampling.Guidance:
    return sampling.Guidance(
        num_steps=args.num_steps,
        method="euler",
        timestep_shift=args.timestep_shift,
        cfg_scale=args.cfg_scale,
        cfg_interval_start=args.cfg_interval_start,
        cfg_channels="first3",
    )


def final_checkpoint(work: common.Work, run: str) -> tuple[int, pathlib.Path]:
    found = [(s, p) for r, s, p in work.checkpoints() if r == run]
    if not found:
        raise FileNotFoundError(f"no checkpoint of run {run!r} under {work.ckpt}")
    return found[-1]


def sample(args) -> None:
    work = common.Work.at(args.work)
    plan = common.read_plan(work)
    _, _, mcfg = setup(plan, args.dtype)
    noise, labels = common.read_sample_inputs(work)
    guidance = guidance_of(args)
    for run in filter(None, args.sample_runs.split(",")):
        step, path = final_checkpoint(work, run)
        model = load_model(path, args.sample_weights, mcfg)
        started = time.perf_counter()
        x = np.asarray(sampling.sample_ode(model, noise, labels, guidance))
        out = work.sample_file(run, SIDE)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, x)
        common.write_json(
            out.with_suffix(".json"),
            dict(
                run=run,
                step=step,
                weights=args.sample_weights,
                sampler=SIDE,
                dtype=mcfg.dtype,
                guidance=guidance.to_dict(),
                seconds=round(time.perf_counter() - started, 1),
            ),
        )
        print(f"sampled {run} step {step} -> {out}", flush=True)


def decode(args) -> None:
    """Every samples/*.npy -> images/*.npy (uint8), de-normalised with the train stats and
    decoded by `--tokenizer` (waits up to --wait_s for the files named by --expect)."""
    from lightningdit_jax import pipeline
    from vavae_jax import checkpoints

    work = common.Work.at(args.work)
    plan = common.read_plan(work)
    expect = [work.samples / f"{name}.npy" for name in filter(None, args.expect.split(","))]
    deadline = time.time() + args.wait_s
    while any(not p.exists() for p in expect) and time.time() < deadline:
        time.sleep(2)
    missing = [str(p) for p in expect if not p.exists()]
    if missing:
        print(f"decode: still missing after {args.wait_s} s: {missing}", flush=True)
    ae, _ = checkpoints.load_autoencoder(args.tokenizer, dtype=args.decode_dtype or None)
    if ae.config.embed_dim != plan["latent_shape"][-1]:
        raise SystemExit(
            f"--tokenizer has {ae.config.embed_dim} latent channels, the latents "
            f"{plan['latent_shape'][-1]}"
        )
    with np.load(work.data / "stats.npz") as f:
        mean, std = f["mean"], f["std"]
    mult = float(plan["latent_multiplier"])
    graphdef, ae_state = nnx.split(ae)

    @jax.jit
    def to_images(ae_state, x):
        z = data_lib.denormalize(x, mean, std, mult)
        return pipeline.to_uint8(nnx.merge(graphdef, ae_state).decode(z))

    work.images.mkdir(parents=True, exist_ok=True)
    for path in sorted(work.samples.glob("*.npy")):
        x = np.load(path)
        images = np.concatenate(
            [np.asarray(to_images(ae_state, x[i : i + 16])) for i in range(0, len(x), 16)]
        )
        np.save(work.images / path.name, images)
        print(f"decoded {path.name}: {images.shape}", flush=True)


def post(args) -> None:
    evaluate(args)
    sample(args)
    if args.tokenizer:
        decode(args)


# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    common_args = argparse.ArgumentParser(add_help=False)
    common_args.add_argument("--work", required=True)

    t = sub.add_parser("train", parents=[common_args])
    t.add_argument("--run", default="ours")
    t.add_argument("--dtype", default="auto", choices=trainer.DTYPES)
    t.add_argument("--remat", default="none", help="model.remat_policy (numerics unchanged)")
    t.add_argument("--seed", type=int, default=0, help="config.seed: t/noise/drop after K")
    t.add_argument("--steps", type=int, default=0, help="0: the whole batch list")
    t.add_argument("--inject_steps", type=int, default=-1, help="-1: the plan's K")
    t.add_argument("--ckpt_steps", default="0,1000,2000,3000")

    ev = argparse.ArgumentParser(add_help=False)
    ev.add_argument("--dtype", default="auto", choices=trainer.DTYPES, help="eval and sampling")
    ev.add_argument("--runs", default="", help="runs to evaluate (default: every run)")
    ev.add_argument("--eval_weights", default="model,ema")
    ev.add_argument("--eval_batch", type=int, default=250)
    sm = argparse.ArgumentParser(add_help=False)
    sm.add_argument("--sample_runs", default="ours,ref_s0")
    sm.add_argument("--sample_weights", default="model", choices=("model", "ema"))
    sm.add_argument("--num_steps", type=int, default=250)
    sm.add_argument("--timestep_shift", type=float, default=0.3)
    sm.add_argument("--cfg_scale", type=float, default=10.0)
    sm.add_argument("--cfg_interval_start", type=float, default=0.11)
    de = argparse.ArgumentParser(add_help=False)
    de.add_argument("--tokenizer", default="", help="VA-VAE export or run folder")
    de.add_argument("--decode_dtype", default="", help="tokenizer compute dtype (default: its)")
    de.add_argument("--expect", default="", help="sample files (names) to wait for")
    de.add_argument("--wait_s", type=float, default=0.0)

    sub.add_parser("eval", parents=[common_args, ev])
    sample_p = sub.add_parser("sample", parents=[common_args, sm])
    sample_p.add_argument("--dtype", default="auto", choices=trainer.DTYPES)
    sub.add_parser("decode", parents=[common_args, de])
    sub.add_parser("post", parents=[common_args, ev, sm, de])
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # As launch/train.py: the GPU scheduler flags, before the backend starts.
    os.environ["XLA_FLAGS"] = distributed.default_xla_flags(os.environ.get("XLA_FLAGS", ""))
    {"train": train, "eval": evaluate, "sample": sample, "decode": decode, "post": post}[
        args.command
    ](args)


if __name__ == "__main__":
    main()
