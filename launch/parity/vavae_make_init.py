"""Makes what both sides of the VA-VAE parity runs share (issue 18).

  # here, once: the subset that travels to the GPU and the batch list
  python3 launch/parity/vavae_make_init.py lists --src=../shared/data/imagenette-224 \\
      --out=.data/imagenette-parity --n_train=4200 --n_val=500 --steps=1000 --batch=8
  # where the runs happen: image caches, random teacher and LPIPS files, the common init
  python3 launch/parity/vavae_make_init.py make --root=.data/imagenette-parity --out=W \\
      --size=256 --teacher_preset=dinov2-large --ref_dir=.ref/LightningDiT --model=f16d32
  python3 launch/convert.py lpips --vgg=W/vgg16_random.pth --heads=W/lpips_heads_random.pth \\
      --out=W/lpips.npz
  python3 launch/convert.py vavae --pt=W/init.pt --out=W/init --preset=f16d32

`lists` picks a seeded subset of imagenette-224's train split (`--n_train` of 9469) and
`--n_val` val images, copies exactly those JPEGs under `--out` (a git-ignored folder the GPU run
carries: the whole train split, ~114 MB, is over the 64 MiB a run may carry; this is the one
deviation from "imagenette train"), and writes `batches.json` there (vavae_common's format):
`--steps` steps of `--batch` images, epochs of seeded permutations, random flips.

`make` writes under `--out`:
  cache/train_u8.npy, cache/val_u8.npy  the images resized once (vavae_common.load_image)
  teacher/          a transformers `save_pretrained` DINOv2 folder with RANDOM weights (seed
                    `--frozen_seed`); our side loads it as config.teacher.path, the reference
                    side as timm's model with the same weights
  vgg16_random.pth  torchvision VGG16 `features.*`, RANDOM (torchvision's init)
  lpips_heads_random.pth  LPIPS heads `linK.model.1.weight`, RANDOM, non-negative like trained
                    ones (uniform [0, 0.1)), so that the perceptual term stays a distance
  init.pt           (with --ref_dir) the common initial state, made by the REFERENCE code with
                    `--init_seed` (vavae_reference.build_model: seed_everything, then its
                    AutoencoderKL with its LPIPSWithDiscriminator): autoencoder, linear_proj,
                    loss.logvar and the PatchGAN (weights and BatchNorm statistics), as a
                    Lightning-style {"state_dict": ...}; the teacher and LPIPS groups are left
                    out (they are the files above). `launch/convert.py vavae` converts it.
The teacher and LPIPS are random: the VF loss aligns the latents with a random ViT's features
and the perceptual term is a random-VGG distance. That changes the numbers (and makes the
reported LPIPS no perceptual metric), not whether the two implementations agree.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import pathlib
import shutil

import numpy as np
import vavae_common as common

TEACHERS = {
    "dinov2-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "dinov2-tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
}
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


def _files(folder: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def cmd_lists(args) -> dict:
    src, out = pathlib.Path(args.src), pathlib.Path(args.out)
    rng = np.random.default_rng(args.seed)
    chosen = {}
    for split, n in (("train", args.n_train), ("val", args.n_val)):
        files = _files(src / split)
        if n > len(files):
            raise SystemExit(f"{src / split} has {len(files)} files, fewer than {n}")
        chosen[split] = sorted(files[i] for i in rng.choice(len(files), n, replace=False))
        for rel in chosen[split]:
            dst = out / split / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / split / rel, dst)
    indices, flips = common.make_steps(args.n_train, args.steps, args.batch, args.seed)
    common.write_batches(
        out / "batches.json",
        train=chosen["train"],
        val=chosen["val"],
        indices=indices,
        flips=flips,
        seed=args.seed,
        source=str(src),
    )
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return dict(out=str(out), n_train=args.n_train, n_val=args.n_val, mbytes=round(size / 1e6, 1))


def _load(job):
    return common.load_image(*job)


def write_caches(root: pathlib.Path, out: pathlib.Path, size: int, workers: int) -> None:
    batches = common.read_batches(root / "batches.json")
    out.mkdir(parents=True, exist_ok=True)
    with multiprocessing.Pool(workers) as pool:
        for split in ("train", "val"):
            jobs = [(root / split / rel, size) for rel in batches[split]]
            images = np.stack(pool.map(_load, jobs, chunksize=32))
            np.save(out / f"{split}_u8.npy", images)


def write_frozen(out: pathlib.Path, preset: str, seed: int) -> None:
    """The random teacher folder and the random LPIPS files."""
    import torch
    import torchvision
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Dinov2Config(**TEACHERS[preset], image_size=518, patch_size=14)
    transformers.Dinov2Model(cfg).save_pretrained(out / "teacher")
    vgg = torchvision.models.vgg16(weights=None).features.state_dict()
    torch.save({f"features.{k}": v for k, v in vgg.items()}, out / "vgg16_random.pth")
    heads = {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) * 0.1 for i, c in enumerate(LPIPS_CHANNELS)
    }
    torch.save(heads, out / "lpips_heads_random.pth")


def write_init(out: pathlib.Path, args) -> None:
    """The reference's own initial state (vavae_reference.build_model) as init.pt."""
    import torch
    import vavae_reference as ref

    ref_args = argparse.Namespace(
        ref_dir=args.ref_dir, model=args.model, disc_start=args.disc_start, phase="free",
        teacher=str(out / "teacher"), vgg=str(out / "vgg16_random.pth"),
        lpips_heads=str(out / "lpips_heads_random.pth"), image_size=args.size,
        teacher_resolution=args.teacher_resolution, shared_noise=False,
    )  # fmt: skip
    ref.import_reference(args.ref_dir)
    ref.install_stubs(ref_args)
    model = ref.build_model(ref_args, args.init_seed)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(ref.FROZEN_PREFIXES)}
    torch.save({"state_dict": sd, "init_seed": args.init_seed}, out / "init.pt")


def cmd_make(args) -> dict:
    root, out = pathlib.Path(args.root), pathlib.Path(args.out)
    write_caches(root, out / "cache", args.size, args.workers)
    write_frozen(out, args.teacher_preset, args.frozen_seed)
    if args.ref_dir:
        write_init(out, args)
    return dict(out=str(out), files=sorted(p.name for p in out.iterdir()))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("lists", help="subset copy + batches.json")
    q.add_argument("--src", required=True, help="imagenette-224 (train/, val/)")
    q.add_argument("--out", required=True)
    q.add_argument("--n_train", type=int, default=4200)
    q.add_argument("--n_val", type=int, default=500)
    q.add_argument("--steps", type=int, default=1000)
    q.add_argument("--batch", type=int, default=8)
    q.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("make", help="image caches, random teacher / LPIPS, the common init")
    q.add_argument("--root", required=True, help="the folder `lists` wrote")
    q.add_argument("--out", required=True)
    q.add_argument("--size", type=int, default=256)
    q.add_argument("--teacher_preset", default="dinov2-large", choices=sorted(TEACHERS))
    q.add_argument("--frozen_seed", type=int, default=0)
    q.add_argument("--ref_dir", default="", help="a LightningDiT checkout: also write init.pt")
    q.add_argument("--model", default="f16d32", help="f16d32 or tiny (vavae_reference)")
    q.add_argument("--teacher_resolution", type=int, default=224)
    q.add_argument("--disc_start", type=int, default=200)
    q.add_argument("--init_seed", type=int, default=0)
    q.add_argument("--workers", type=int, default=8)
    args = p.parse_args(argv)
    summary = (cmd_lists if args.command == "lists" else cmd_make)(args)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
