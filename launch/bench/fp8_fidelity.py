"""Fidelity of LightningDiT's FP8 products against bf16 (issue 19, item 4), measured.

  python launch/bench/fp8_fidelity.py --images=../shared/data/imagenette-224 --out=fidelity/

A class-conditional LightningDiT learns imagenette's 10 classes in pixel space: the images
box-filtered to `--res` pixels are its "latents" (3 channels, normalised per channel over the
training images), so a sample decodes by de-normalising it, with no tokenizer to blur the
comparison. Two runs of the trainer's own step (`lightningdit_jax.train.build_step`: the
config's loss, AdamW and EMA) start from the same initialisation and see the same batches and
rngs, one with `precision="default"` and one in FP8; then:

  1. validation loss of the default run's final weights, in its own precision and in FP8: the
     rectified-flow loss (MSE + cosine, as trained) of `--val_images` held-out images, each at
     the same `--val_times` times of a fixed grid with fixed noise (`transport.loss_at`);
  2. both runs' validation loss every `--eval_every` steps (each in its own precision): the
     training curves, and their ratio at the end;
  3. samples of the default run's weights from the same noise and labels in both precisions
     (Euler, `--sample_steps`, CFG `--cfg_scale`), decoded: the PSNR between each pair, their
     median, and the two grids side by side (`samples_default_vs_fp8.png`).

Writes `fidelity.json` (settings, curves, the three figures) and `curves.png` to `--out`. FP8
runs as "fp8" on GPUs with FP8 tensor cores, else as "fp8_emulated" (the same float8 rounding,
products upcast: slow, and the json says which ran). On a CPU the defaults (a 4-block, width-96
model at 16 px, 3000 steps of 32) take ~15 minutes a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import numpy as np


def load_images(root: pathlib.Path, split: str, res: int, limit: int, seed: int):
    """(images [N, res, res, 3] float32 in [-1, 1], labels [N]) of `root/split/<wnid>/*`: the
    sorted wnids are the classes; `limit` images drawn evenly over the classes (seeded)."""
    from PIL import Image

    wnids = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    if not wnids:
        raise SystemExit(f"--images={root}: no class folders under {root / split}")
    files = [(f, c) for c, w in enumerate(wnids) for f in sorted((root / split / w).iterdir())]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(files))
    per_class = -(-limit // len(wnids))
    picked, counts = [], [0] * len(wnids)
    for i in order:
        f, c = files[i]
        if counts[c] < per_class and len(picked) < limit:
            picked.append((f, c))
            counts[c] += 1
    xs, ys = [], []
    for f, c in picked:
        im = Image.open(f).convert("RGB")
        s = min(im.size)  # center crop, then a box filter down to res
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((res, res), Image.BOX)
        xs.append(np.asarray(im, np.float32) / 127.5 - 1.0)
        ys.append(c)
    if len(xs) < limit:
        raise SystemExit(f"{root / split}: {len(xs)} images, fewer than the {limit} asked for")
    return np.stack(xs), np.asarray(ys, np.int32), wnids


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 images [N, H, W, 3]."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", required=True, help="imagenette folder: train/<wnid>, val/<wnid>")
    p.add_argument("--out", required=True)
    p.add_argument("--res", type=int, default=16)
    p.add_argument("--train_images", type=int, default=4000)
    p.add_argument("--val_images", type=int, default=256)
    p.add_argument("--val_times", type=int, default=8, help="t grid points per image")
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--dtype", default="", help="compute dtype (default: bfloat16 on GPU, else f32)")
    p.add_argument("--fp8", default="auto", choices=["auto", "fp8", "fp8_emulated"])
    p.add_argument(
        "--fp8_scaling",
        default="current",
        choices=["current", "delayed"],
        help="the FP8 run's scaling (LightningDiTConfig.fp8_scaling); with delayed, the "
        "same-weights measure uses the FP8 run's final amax histories",
    )
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--sample_steps", type=int, default=50)
    p.add_argument("--cfg_scale", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.train_images < args.batch:
        p.error(f"--train_images={args.train_images} is fewer than --batch={args.batch}")

    from lightningdit_jax import fp8 as fp8_lib

    if args.fp8 == "fp8":  # before JAX starts its backend
        os.environ["XLA_FLAGS"] = fp8_lib.xla_flags(os.environ.get("XLA_FLAGS", ""), "fp8")

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lightningdit_jax import sampling
    from lightningdit_jax import train as dit_train
    from lightningdit_jax import transport as transport_lib
    from lightningdit_jax.model import PRESETS, LightningDiT
    from vavae_jax.runtime import cli, sharding

    fp8 = args.fp8
    if fp8 == "auto":
        try:
            fp8_lib.check_backend("fp8")
            fp8 = "fp8"
        except ValueError:
            fp8 = "fp8_emulated"
    gpu = jax.default_backend() == "gpu"
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # --- data ------------------------------------------------------------------------------
    root = pathlib.Path(args.images)
    x_train, y_train, wnids = load_images(root, "train", args.res, args.train_images, args.seed)
    x_val, y_val, _ = load_images(root, "val", args.res, args.val_images, args.seed + 1)
    mean, std = x_train.mean(axis=(0, 1, 2)), x_train.std(axis=(0, 1, 2))
    norm_train, norm_val = (x_train - mean) / std, (x_val - mean) / std
    print(f"{len(x_train)} train / {len(x_val)} val images at {args.res} px, {fp8}, {dtype}")

    # --- the two runs ------------------------------------------------------------------------
    path = pathlib.Path(__file__).resolve().parents[2] / "configs/lightningdit_xl_vavae_f16d32.py"
    config = cli.config_from_file(f"{path}:tiny,small")
    config.global_batch_size = args.batch
    config.optim.lr = args.lr
    config.dtype = dtype
    base = dataclasses.replace(
        PRESETS["tiny"],
        input_size=args.res,
        in_channels=3,
        hidden_size=args.hidden,
        depth=args.depth,
        num_heads=args.heads,
        patch_size=args.patch,
        num_classes=len(wnids),
        dtype=dtype,
        scan_layers=False,
        remat_policy="none",
    )
    mcfgs = {
        "default": base,
        fp8: dataclasses.replace(base, precision=fp8, fp8_scaling=args.fp8_scaling),
    }
    mesh = sharding.make_mesh(-1, 1)
    transport = dit_train.make_transport(config)
    n_val = len(norm_val)
    rng = np.random.default_rng(args.seed + 2)
    val_t = np.tile((np.arange(args.val_times) + 0.5) / args.val_times, n_val).astype(np.float32)
    val = dict(
        x1=np.repeat(norm_val, args.val_times, axis=0),
        y=np.repeat(y_val, args.val_times),
        t=val_t,
        x0=rng.standard_normal((n_val * args.val_times, *norm_val.shape[1:]), np.float32),
    )

    @nnx.jit
    def val_batch(model, x1, x0, t, y):
        _, terms = transport_lib.loss_at(model, x1, x0, t, y, transport=transport)
        return terms["loss"]

    def val_loss(model) -> float:
        n, chunk = len(val["t"]), 256
        total = 0.0
        for i in range(0, n, chunk):
            sl = slice(i, i + chunk)
            part = {k: jnp.asarray(v[sl]) for k, v in val.items()}
            total += float(val_batch(model, **part)) * len(part["t"])
        return total / n

    def as_model(mcfg, params, rest, histories=None):
        """The model of `mcfg` with these weights (and amax histories: delayed scaling)."""
        model = LightningDiT(mcfg, rngs=nnx.Rngs(0))
        nnx.update(model, params, rest, *([histories] if histories is not None else []))
        return model

    order = np.random.default_rng(args.seed + 3)
    batches = [order.choice(len(norm_train), args.batch, replace=False) for _ in range(args.steps)]
    curves, finals, init_check, histories = {}, {}, {}, {}
    for name, mcfg in mcfgs.items():
        ts = dit_train.build_step(config, mesh, mcfg)
        state = ts.init_state(jax.random.key(args.seed))
        init_check[name] = float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(state["params"])))
        step = ts.jit()
        curve = []
        t0 = time.perf_counter()
        for i in range(args.steps + 1):
            if i % args.eval_every == 0 or i == args.steps:
                model = as_model(mcfg, state["params"], state["rest"], state.get("fp8"))
                curve.append(dict(step=i, val_loss=val_loss(model)))
                print(
                    f"  {name} step {i}: val {curve[-1]['val_loss']:.5f} "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
            if i == args.steps:
                break
            idx = batches[i]
            batch = jax.device_put(
                dict(latent=norm_train[idx], label=y_train[idx]), ts.batch_sharding
            )
            bits = jax.device_put(jax.random.key_data(jax.random.key(1000 + i)), ts.replicated)
            state, metrics = step(state, batch, bits)
        curves[name] = curve
        finals[name] = (state["params"], state["rest"], float(metrics["train/loss"]))
        histories[name] = state.get("fp8")
    if init_check["default"] != init_check[fp8]:
        raise SystemExit(f"the two runs did not start from the same weights: {init_check}")

    # --- 1. the same (default-trained) weights in both precisions --------------------------
    params, rest, _ = finals["default"]
    same = {
        name: val_loss(as_model(mcfg, params, rest, histories[name]))
        for name, mcfg in mcfgs.items()
    }
    # --- 2. the curves' end -------------------------------------------------------------------
    end = {name: curves[name][-1]["val_loss"] for name in mcfgs}
    # --- 3. samples from the same noise ---------------------------------------------------------
    k = args.samples
    z0 = jax.random.normal(jax.random.key(args.seed + 4), (k, args.res, args.res, 3))
    labels = jnp.asarray(np.arange(k) % len(wnids), jnp.int32)
    images = {}
    for name, mcfg in mcfgs.items():
        z = sampling.sample_ode(
            as_model(mcfg, params, rest),
            z0,
            labels,
            num_steps=args.sample_steps,
            cfg_scale=args.cfg_scale,
        )
        x = np.asarray(z) * std + mean
        images[name] = np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)
    ps = psnr(images[fp8], images["default"])

    result = dict(
        settings=dict(vars(args), fp8_ran=fp8, dtype=dtype, backend=jax.default_backend()),
        device=jax.devices()[0].device_kind,
        model=dataclasses.asdict(mcfgs[fp8]),
        val_loss_same_weights={
            **same,
            "rel_diff": same[fp8] / same["default"] - 1,
            "target": "|rel_diff| <= 0.005",
        },
        val_loss_end_of_training={
            **end,
            "rel_diff": end[fp8] / end["default"] - 1,
            "target": "|rel_diff| <= 0.01",
        },
        train_loss_last_batch={name: finals[name][2] for name in mcfgs},
        samples_psnr_db=dict(
            median=float(np.median(ps)), min=float(ps.min()), max=float(ps.max()), n=k
        ),
        curves=curves,
        wall_s=time.perf_counter() - t_start,
        argv=sys.argv,
    )
    (out / "fidelity.json").write_text(json.dumps(result, indent=1))
    _figures(out, curves, images, fp8, args)
    print(json.dumps({k: v for k, v in result.items() if k not in ("curves", "model")}, indent=1))


def _figures(out, curves, images, fp8, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        label = f"{name} ({args.fp8_scaling} scaling)" if name == fp8 else name
        ax.plot([c["step"] for c in curve], [c["val_loss"] for c in curve], label=label)
    ax.set(xlabel="step", ylabel="validation loss (MSE + cosine)", yscale="log")
    ax.set_title(f"LightningDiT {args.depth}x{args.hidden}, imagenette {args.res} px")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)

    from PIL import Image

    from vavae_jax.runtime.logging import tile_images

    grids = [tile_images(images[name], 8, fill=255) for name in ("default", fp8)]
    gap = np.full((grids[0].shape[0], 4, 3), 255, np.uint8)
    both = np.concatenate([grids[0], gap, grids[1]], axis=1)
    scale = max(1, 128 // args.res)  # nearest-neighbour: the pixels stay visible
    Image.fromarray(both).resize(
        (both.shape[1] * scale, both.shape[0] * scale), Image.NEAREST
    ).save(out / "samples_default_vs_fp8.png")


if __name__ == "__main__":
    main()
