"""Our side of the VA-VAE training-parity runs (issue 18): the trainer's real step
(`vavae_jax.train.build_step`, the jitted step `launch/train.py` runs) over the shared batch
list, from the common initial state, logging every term per step in vavae_common's format.

  python3 launch/parity/vavae_ours.py train --phase=exact --batches=B/batches.json \\
      --cache=W/cache --init=W/init --teacher=W/teacher --lpips=W/lpips.npz --steps=300 \\
      --disc_start=200 --out=W/ours_exact.jsonl
  python3 launch/parity/vavae_ours.py eval --cache=W/cache --lpips=W/lpips.npz \\
      --out=W/eval.json W/recon/*.npy

`train` builds the config of `configs/vavae_f16d32.py` with the autoencoder `--preset` (that of
the `--init` export, `launch/convert.py vavae` of the reference's init.pt), the teacher folder
(config.teacher.path, of shape `--teacher_preset`), the LPIPS file (config.lpips.path),
disc_start and the batch size of the list, on one device. It compiles the step from these
shapes first, then waits for `--wait_for` (the GPU sequence makes the files meanwhile), checks
the files against the shapes and loads them: the generator (autoencoder, linear_proj, logvar)
and the PatchGAN (weights and BatchNorm statistics) as the trainer's `config.init_from` loads
them (`train.init_from`). Step i gets
`vavae_common.step_key_bits(--noise_seed, i)`; the reference's exact phase draws its posterior
noise from the same key.
Phases: exact = float32 compute, `jax_default_matmul_precision="highest"`, LPIPS dropout off;
free = the config's defaults (bfloat16 compute on GPU, default precision, LPIPS dropout on).
At `--eval_steps` the reconstructions (posterior mode) of the val cache are saved as float16.
`--deadline` (unix time) ends the run early at a step boundary, reconstructions of that step
saved too: the GPU sequence has to end inside one command.

`eval` gives PSNR, SSIM (vavae_jax.metrics, the reference's evaluate_tokenizer conventions) and
LPIPS of each saved reconstruction file against the val cache. LPIPS there is the RANDOM
LPIPS of the run: a distance in a random VGG's features, not a perceptual metric.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import numpy as np
import vavae_common as common

ROOT = pathlib.Path(__file__).resolve().parents[2]


def make_config(args, batches: dict):
    """configs/vavae_f16d32.py with the run's shapes: the autoencoder `--preset` and the teacher
    `--teacher_preset` (the files, which may not exist yet, are checked against them later)."""
    from vavae_jax.model import PRESETS
    from vavae_jax.runtime import cli

    c = cli.config_from_file(str(ROOT / "configs" / "vavae_f16d32.py"))
    for k, v in dataclasses.asdict(PRESETS[args.preset]).items():
        if k != "dtype":  # the phase's
            c.model[k] = v
    c.data.resolution = c.model.resolution
    c.teacher.update(
        dict(path=str(args.teacher), preset=args.teacher_preset, resolution=args.teacher_resolution)
    )
    c.lpips.path = str(args.lpips)
    c.loss.disc_start = args.disc_start
    c.global_batch_size = int(batches["batch_size"])
    c.total_steps = args.steps
    c.mesh.num_devices = 1
    c.init_from = str(args.init)
    c.seed = args.seed
    if args.phase == "exact":
        c.dtype = "float32"
        c.loss.lpips_dropout = False
    if args.dtype:  # e.g. the free phase in float32: is a free-phase difference bf16's?
        c.dtype = args.dtype
    if args.lpips_dropout != "phase":  # e.g. the free phase without dropout: is it dropout's?
        c.loss.lpips_dropout = args.lpips_dropout == "on"
    return c


def wait_for(paths: list[str], deadline: float) -> None:
    """Polls until every path exists (the other processes of the GPU sequence make them)."""
    while missing := [p for p in paths if not pathlib.Path(p).exists()]:
        if deadline and time.time() > deadline:
            raise SystemExit(f"deadline passed while waiting for {missing}")
        time.sleep(1.0)


def check_export(config, init_path) -> None:
    """The export's autoencoder and PatchGAN are those the step was compiled for."""
    from vavae_jax import checkpoints

    meta = checkpoints.read_export_meta(init_path)
    ae = checkpoints.autoencoder_config(meta["autoencoder_config"])
    diff = checkpoints.config_mismatch(ae, checkpoints.run_autoencoder_config(config))
    disc = meta["discriminator_config"]
    want = dict(ndf=config.loss.disc_ndf, n_layers=config.loss.disc_num_layers)
    if diff or {k: disc[k] for k in want} != want:
        raise SystemExit(f"{init_path}: autoencoder {diff} or PatchGAN {disc} differ from {want}")


def init_state(ts, init_path):
    """The step's state with the generator and the PatchGAN of the export `init_path`, loaded
    as the trainer's config.init_from loads them (`train.init_from`)."""
    import jax
    from flax import nnx

    from vavae_jax import train

    state = ts.init_state(jax.random.key(0))
    gen = nnx.merge(ts.gen_def, state["gen"], state["gen_rest"])
    disc = nnx.merge(ts.disc_def, state["disc"], state["disc_stats"])
    if not train.init_from(gen, disc, init_path, ts.ae_config):
        raise SystemExit(f"{init_path} holds no PatchGAN: both sides must start from one")
    _, state["gen"], state["gen_rest"] = nnx.split(gen, nnx.Param, ...)
    _, state["disc"], state["disc_stats"] = nnx.split(disc, nnx.Param, nnx.BatchStat)
    return jax.device_put(state, ts.state_sharding)


def cmd_train(args) -> dict:
    import jax

    if args.phase == "exact":
        jax.config.update("jax_default_matmul_precision", "highest")
    from vavae_jax import data as data_lib
    from vavae_jax import train
    from vavae_jax.runtime import sharding

    batches = common.read_batches(args.batches)
    config = make_config(args, batches)
    mesh = sharding.mesh_from_config(config.mesh)
    train.validate_config(config, mesh)
    cdt = train.compute_dtype(config, mesh.devices.flat[0].platform)
    # Compiled from shapes first, so that the compile overlaps the making of the inputs.
    ts = train.build_step(config, mesh, *train.abstract_frozen(config, cdt))
    t = time.perf_counter()
    step_fn = ts.compile()
    compile_s = time.perf_counter() - t
    wait_for([p for p in args.wait_for.split(",") if p], args.deadline)
    check_export(config, args.init)
    lp, teacher = train.build_frozen(config, cdt)
    frozen = train.frozen_state(lp, teacher)
    if _shapes(frozen) != _shapes(ts.abstract_inputs[0]):
        raise SystemExit("the teacher / LPIPS files differ from --teacher_preset's shapes")
    frozen = jax.device_put(frozen, ts.replicated)
    state = init_state(ts, args.init)
    train_u8 = common.load_cache(args.cache, "train")
    stage = train.make_schedule(config, 1)[0]
    eval_steps = {int(s) for s in args.eval_steps.split(",") if s}
    recon = Reconstructor(ts, common.load_cache(args.cache, "val")) if eval_steps else None
    meta = dict(
        side="ours", phase=args.phase, init=str(args.init), steps=args.steps,
        disc_start=args.disc_start, compute_dtype=str(cdt), jax=jax.__version__,
        device=str(jax.devices()[0].device_kind), compile_s=round(compile_s, 1),
        matmul_precision=str(jax.config.jax_default_matmul_precision),
        lpips_dropout=bool(config.loss.lpips_dropout),
    )  # fmt: skip
    writer = common.LogWriter(args.out, meta)
    if 0 in eval_steps:
        recon.save(state, pathlib.Path(args.recon_dir) / f"{args.tag}_step00000.npy")
    start, done = time.perf_counter(), 0
    for step in range(args.steps):
        if args.deadline and time.time() > args.deadline:
            break
        batch = data_lib.make_global_batch(
            {"image": common.batch_at(train_u8, batches, step)}, mesh
        )
        bits = jax.device_put(common.step_key_bits(args.noise_seed, step), ts.replicated)
        loss, stage_step = jax.device_put(train.step_inputs(stage, step), ts.replicated)
        state, metrics = step_fn(state, frozen, batch, bits, loss, stage_step)
        metrics = {k.removeprefix("train/"): v for k, v in jax.device_get(metrics).items()}
        writer.write(step, metrics, time.perf_counter() - start)
        done = step + 1
        if done in eval_steps:
            recon.save(state, pathlib.Path(args.recon_dir) / f"{args.tag}_step{done:05d}.npy")
    writer.close()
    if eval_steps and done < args.steps:  # stopped by --deadline: the last state too
        recon.save(state, pathlib.Path(args.recon_dir) / f"{args.tag}_step{done:05d}.npy")
    if args.save_final:
        save_flat(state, args.save_final)
    if args.export_final:
        export(ts, state, args.export_final, f"vavae_ours.py {args.phase} phase, step {done}")
    seconds = time.perf_counter() - start
    return dict(meta, log=str(args.out), steps_done=done, seconds=round(seconds, 1))


def _shapes(tree):
    import jax

    return [(tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree)]


def save_flat(state, path) -> None:
    """The generator and discriminator weights as an npz of dotted NNX paths (diagnostics)."""
    from flax import nnx

    flat = {}
    for group in ("gen", "disc", "disc_stats"):
        for keys, var in nnx.to_flat_state(state[group]):
            value = var.get_value() if hasattr(var, "get_value") else var
            flat[".".join([group, *map(str, keys)])] = np.asarray(value)
    np.savez(path, **flat)


def export(ts, state, out_dir, source: str) -> None:
    """The generator and PatchGAN of `state` as an export folder (`checkpoints.save_export`):
    the tokenizer that `launch/extract_latents.py --tokenizer=` and the DiT parity run read."""
    from flax import nnx

    from vavae_jax import checkpoints

    gen = nnx.merge(ts.gen_def, state["gen"], state["gen_rest"])
    disc = nnx.merge(ts.disc_def, state["disc"], state["disc_stats"])
    checkpoints.save_export(
        out_dir,
        gen.autoencoder,
        linear_proj=gen.linear_proj.kernel.get_value() if hasattr(gen, "linear_proj") else None,
        logvar=gen.logvar.get_value(),
        discriminator=disc,
        discriminator_config=disc.config,
        source=source,
    )
    print(f"exported the step-{source.rsplit(' ', 1)[-1]} weights to {out_dir}", flush=True)


class Reconstructor:
    """decode(encode(x).mode()) of the val cache with the generator of a step state."""

    def __init__(self, ts, val_u8, batch: int = 25):
        import jax
        from flax import nnx

        self.ts, self.val, self.batch = ts, val_u8, batch

        @jax.jit
        def rec(gen_state, gen_rest, images):
            ae = nnx.merge(ts.gen_def, gen_state, gen_rest).autoencoder
            return ae.decode(ae.encode(images).mode()).astype(jax.numpy.float32)

        self.rec = rec

    def save(self, state, path: pathlib.Path) -> None:
        out = np.empty(self.val.shape, np.float16)
        for i in range(0, len(self.val), self.batch):
            x = common.to_float(self.val[i : i + self.batch])
            out[i : i + self.batch] = np.asarray(self.rec(state["gen"], state["gen_rest"], x))
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, out)


def cmd_eval(args) -> dict:
    import jax
    from flax import nnx

    from vavae_jax import lpips as lpips_lib
    from vavae_jax.metrics import image

    lp_def, lp_state = nnx.split(lpips_lib.load_lpips_converted(args.lpips))
    val = common.to_float(common.load_cache(args.cache, "val"))

    @jax.jit
    def metrics(x, rec, lp_state):  # (the LPIPS weights as an argument, not as constants)
        return dict(
            psnr=image.psnr(image.to_uint8(x), image.to_uint8(rec)),
            ssim=image.ssim(rec, x),
            lpips=nnx.merge(lp_def, lp_state)(rec, x).reshape(-1),
        )

    results = {}
    for path in sorted(args.recons):
        rec = np.load(path).astype(np.float32)
        per = [metrics(val[i : i + 50], rec[i : i + 50], lp_state) for i in range(0, len(val), 50)]
        results[pathlib.Path(path).stem] = {
            k: float(np.mean(np.concatenate([np.asarray(p[k]) for p in per]))) for k in per[0]
        }
    out = dict(num_images=len(val), lpips_note="random LPIPS weights: no perceptual metric")
    out["results"] = results
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("train")
    q.add_argument("--phase", choices=("exact", "free"), required=True)
    q.add_argument("--batches", required=True)
    q.add_argument("--cache", required=True)
    q.add_argument("--init", required=True, help="export folder of launch/convert.py vavae")
    q.add_argument("--teacher", required=True, help="transformers DINOv2 folder")
    q.add_argument("--lpips", required=True, help="launch/convert.py lpips file")
    q.add_argument("--preset", default="f16d32", help="vavae_jax.model.PRESETS: the init's")
    q.add_argument("--teacher_preset", default="dinov2-large", help="the teacher folder's shape")
    q.add_argument("--teacher_resolution", type=int, default=224)
    q.add_argument("--wait_for", default="", help="paths to wait for after the compile (,)")
    q.add_argument("--steps", type=int, required=True)
    q.add_argument("--disc_start", type=int, default=200)
    q.add_argument("--dtype", default="", help="compute dtype (default: the phase's)")
    q.add_argument(
        "--lpips_dropout", choices=("phase", "on", "off"), default="phase",
        help="LPIPS dropout: the phase's (exact off, free on) or set",
    )  # fmt: skip
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--noise_seed", type=int, default=0)
    q.add_argument("--eval_steps", default="")
    q.add_argument("--recon_dir", default="")
    q.add_argument("--tag", default="ours")
    q.add_argument("--save_final", default="", help="npz of the final weights (diagnostics)")
    q.add_argument("--export_final", default="", help="export folder of the final weights")
    q.add_argument("--deadline", type=float, default=0, help="unix time: stop stepping then")
    q.add_argument("--out", required=True)
    q = sub.add_parser("eval")
    q.add_argument("--cache", required=True)
    q.add_argument("--lpips", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("recons", nargs="+", help="reconstruction .npy files")
    args = p.parse_args(argv)
    summary = cmd_train(args) if args.command == "train" else cmd_eval(args)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
