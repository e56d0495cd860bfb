"""The common start of the LightningDiT parity runs (issue 18, item 2): latents, the batch list,
the injected t / noise / label drop of the first K steps, the validation and sampling inputs, and
one initial state made by the reference's code and converted with our converter.

  python3 launch/parity/dit_make_init.py --work=runs/dit_parity \\
      --train_latents=runs/dit_parity_latents/train --val_latents=runs/dit_parity_latents/val \\
      --ref_dir=.ref/LightningDiT --preset=B/1 --batch=64 --steps=3000 --inject_steps=50

The latents are two launch/extract_latents.py folders (the train images with their flips, and
the validation images); they are read with our shard reader into plain .npy files that both sides
memory-map (dit_common's layout). The latent stats are the train folder's latent_stats.npz.

Initial state (`--init_from=reference`, the default): `torch.manual_seed(--init_seed)`, then the
reference's own `LightningDiT(...)` of the preset's fields (its initialize_weights: xavier
linears, zeroed adaLN and output layers, the sin-cos table), built on the CPU and saved as
init/reference_init.pt = {"model": sd, "ema": sd} (train.py's checkpoint layout; its EMA starts
equal to the model), then converted by `lightningdit_jax.convert.convert_file` with the preset
(what `launch/convert.py lightningdit --preset=...` runs) into init/nnx/, which our side loads.
`--init_from=ours` (tests, no reference checkout) makes the state with our model instead and
writes the same two files through dit_common.torch_state_dict.

A new plan makes the runs of an earlier one meaningless: init/, logs/, ckpt/, eval/, samples/,
images/ and compare/ of the work folder are removed first.

Random streams (numpy, `--seed`): the batch order and flips, the injected inputs, the validation
noise and the sampling noise are independent streams of `default_rng([seed, k])`. The injected t
follows the reference's training distribution (sigmoid of a standard normal, computed in float64
as its scipy-based sampler does); the label drop its dropout probability (0.1).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import time

import dit_common as common
import numpy as np

DEFAULT_REF = pathlib.Path(__file__).resolve().parents[2] / ".ref" / "LightningDiT"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="the work folder (created)")
    p.add_argument("--train_latents", required=True, help="launch/extract_latents.py folder")
    p.add_argument("--val_latents", required=True, help="launch/extract_latents.py folder")
    p.add_argument("--preset", default="B/1", help="lightningdit_jax.model.PRESETS key")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3000, help="length of the batch list")
    p.add_argument("--inject_steps", type=int, default=50, help="K: steps with injected t/noise")
    p.add_argument("--seed", type=int, default=0, help="batch order, injected inputs, noise")
    p.add_argument("--init_seed", type=int, default=0, help="torch.manual_seed of the init")
    p.add_argument("--init_from", choices=("reference", "ours"), default="reference")
    p.add_argument("--ref_dir", default=str(DEFAULT_REF), help="a hustvl/LightningDiT clone")
    p.add_argument("--val_count", type=int, default=500, help="validation latents (0: all)")
    p.add_argument("--val_t", type=int, default=8, help="points of the validation t grid")
    p.add_argument("--classes", default="", help="classes to sample (default: the first 10)")
    p.add_argument("--per_class", type=int, default=8, help="samples per class")
    p.add_argument("--latent_multiplier", type=float, default=1.0, help="reference data section")
    return p.parse_args(argv)


def write_data(work: common.Work, args) -> dict:
    """data/*.npy from the two extraction folders; returns what the plan records of them."""
    work.data.mkdir(parents=True, exist_ok=True)
    train, train_y, index = common.read_extracted(args.train_latents)
    val, val_y, _ = common.read_extracted(args.val_latents)
    stats = common.read_stats(args.train_latents)
    if set(val_y.tolist()) - set(train_y.tolist()):
        raise SystemExit(
            f"the validation labels {sorted(set(val_y.tolist()))} are not all train labels: the "
            f"two folders must hold the same class folders (labels are sorted folder indices)"
        )
    pick = common.choose_val(val_y, args.val_count, args.seed)
    np.save(work.data / "train_latents.npy", train)
    np.save(work.data / "train_labels.npy", train_y)
    np.save(work.data / "val_latents.npy", np.ascontiguousarray(val[pick, 0]))
    np.save(work.data / "val_labels.npy", val_y[pick])
    np.savez(work.data / "stats.npz", mean=stats["mean"], std=stats["std"])
    return dict(
        num_records=len(train),
        num_val=len(pick),
        latent_shape=list(train.shape[2:]),
        data_classes=sorted({int(y) for y in train_y}),
        tokenizer=index.get("tokenizer", {}),
        train_latents=str(pathlib.Path(args.train_latents).resolve()),
        val_latents=str(pathlib.Path(args.val_latents).resolve()),
    )


def reference_state_dict(fields: dict, ref_dir: str, seed: int) -> dict:
    """The reference model's initial state dict (torch tensors), built on the CPU."""
    import torch

    common.import_reference(ref_dir)
    torch.manual_seed(seed)
    return common.reference_model(fields).state_dict()


def our_state_dict(preset: str, seed: int) -> dict:
    import torch
    from flax import nnx

    from lightningdit_jax.model import PRESETS, LightningDiT

    sd = common.torch_state_dict(LightningDiT(PRESETS[preset], rngs=nnx.Rngs(seed)))
    return {k: torch.from_numpy(v) for k, v in sd.items()}


def write_init(work: common.Work, args, fields: dict) -> dict:
    import torch

    from lightningdit_jax import convert
    from lightningdit_jax.model import PRESETS

    work.init.mkdir(parents=True, exist_ok=True)
    if args.init_from == "reference":
        sd = reference_state_dict(fields, args.ref_dir, args.init_seed)
    else:
        sd = our_state_dict(args.preset, args.init_seed)
    pt = work.init / "reference_init.pt"
    torch.save({"model": sd, "ema": sd, "init_seed": args.init_seed}, pt)
    out = convert.convert_file(pt, work.init / "nnx", PRESETS[args.preset])
    n = sum(int(v.numel()) for k, v in sd.items() if not k.startswith("feat_rope."))
    return dict(pt=str(pt), nnx=str(out), seed=args.init_seed, made_by=args.init_from, params=n)


def write_plan_arrays(work: common.Work, args, shape, num_records: int, num_val: int, fields):
    work.plan.mkdir(parents=True, exist_ok=True)
    index, flip = common.make_batches(num_records, args.steps, args.batch, args.seed)
    np.savez(work.plan / "batches.npz", index=index, flip=flip)
    k = min(args.inject_steps, args.steps)
    t, noise, drop = common.make_inject(
        k, args.batch, shape, args.seed, fields["class_dropout_prob"]
    )
    np.savez(work.plan / "inject.npz", t=t, noise=noise, drop=drop)
    vt = common.val_times(args.val_t)
    np.savez(
        work.plan / "val.npz",
        t=vt,
        noise=common.make_val_noise(len(vt), num_val, shape, args.seed),
    )
    return k, vt


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # reading and converting only
    from lightningdit_jax.model import PRESETS

    if args.preset not in PRESETS:
        raise SystemExit(f"--preset={args.preset!r}: expected one of {sorted(PRESETS)}")
    fields = dataclasses.asdict(PRESETS[args.preset])
    work = common.Work.at(args.work)
    started = time.perf_counter()
    for name in ("init", "logs", "ckpt", "eval", "samples", "images", "compare"):
        if (work.root / name).exists():  # made for an earlier plan: no longer valid
            print(f"removing {work.root / name}", flush=True)
            shutil.rmtree(work.root / name)
    data = write_data(work, args)
    shape = data["latent_shape"]
    want = [fields["input_size"], fields["input_size"], fields["in_channels"]]
    if shape != want:
        raise SystemExit(f"the latents are {shape}, preset {args.preset} takes {want}")
    if max(data["data_classes"]) >= fields["num_classes"]:
        raise SystemExit(f"labels up to {max(data['data_classes'])}: too many for the preset")
    k, vt = write_plan_arrays(work, args, shape, data["num_records"], data["num_val"], fields)
    classes = common.int_list(args.classes) if args.classes else data["data_classes"][:10]
    noise, labels = common.make_sample_inputs(classes, args.per_class, shape, args.seed)
    np.savez(work.plan / "sample.npz", noise=noise, labels=labels)
    init = write_init(work, args, fields)
    plan = dict(
        format=common.PLAN_FORMAT,
        created=time.strftime("%Y-%m-%d %H:%M:%S"),
        preset=args.preset,
        model=fields,
        null_label=fields["num_classes"],
        batch=args.batch,
        steps=args.steps,
        inject_steps=k,
        seed=args.seed,
        latent_multiplier=args.latent_multiplier,
        val_t=[float(x) for x in vt],
        sample_classes=classes,
        per_class=args.per_class,
        init=init,
        **data,
    )
    common.write_json(work.plan / "plan.json", plan)
    summary = dict(
        work=str(work.root),
        preset=args.preset,
        records=data["num_records"],
        val=data["num_val"],
        params=init["params"],
        seconds=round(time.perf_counter() - started, 1),
    )
    print(summary, flush=True)
    return summary


if __name__ == "__main__":
    main()
