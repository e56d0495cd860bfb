r"""Converts PyTorch checkpoints into this project's formats (once; training needs no torch).

  python launch/convert.py vavae --pt=vavae-imagenet256-f16d32-dinov2.pt --out=ckpt/vavae
  python launch/convert.py lightningdit --pt=lightningdit-xl-imagenet256-800ep.pt \\
      --out=ckpt/xl1 --preset=XL/1 [--no_ema]
  python launch/convert.py lpips --vgg=vgg16-397923af.pth [--heads=vgg.pth] --out=lpips.npz
  python launch/convert.py inception --pth=pt_inception-2015-12-05-6726825d.pth \\
      --out=inception.npz

`vavae` writes an export directory (Orbax state of autoencoder, linear_proj, logvar,
discriminator and DINOv2 teacher, `lpips.npz`, `vavae_export.json`); groups missing from the
checkpoint are listed in the json, never invented. Every converter is strict: unknown or missing
keys and shape mismatches end the run with one error listing them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/convert.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("vavae", help="official VA-VAE .pt -> export directory")
    p.add_argument("--pt", required=True, help="the official VA-VAE checkpoint (.pt / .ckpt)")
    p.add_argument("--out", required=True, help="export directory to create")
    p.add_argument(
        "--preset",
        default="f16d32",
        help="autoencoder preset of vavae_jax.model.PRESETS (default f16d32, the released model)",
    )
    p.add_argument(
        "--teacher_preset",
        default="dinov2-large",
        help="DINOv2 preset of the checkpoint's foundation_model (default dinov2-large)",
    )
    p.add_argument(
        "--teacher_config",
        default=None,
        help="JSON of Dinov2Config fields, for teachers that are not a preset (overrides "
        '--teacher_preset), e.g. \'{"hidden_size": 64, "num_hidden_layers": 2, ...}\'',
    )

    p = sub.add_parser("lightningdit", help="official LightningDiT .pt -> Orbax directory")
    p.add_argument("--pt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", required=True, help="lightningdit_jax.model.PRESETS key, e.g. XL/1")
    p.add_argument(
        "--no_ema", action="store_true", help="convert the 'model' weights, not the 'ema' ones"
    )

    p = sub.add_parser("lpips", help="torchvision VGG16 + lpips heads -> lpips.npz")
    p.add_argument("--vgg", required=True, help="torchvision vgg16-397923af.pth")
    p.add_argument(
        "--heads", default=None, help="lpips heads vgg.pth (default: the lpips package's v0.1)"
    )
    p.add_argument("--out", required=True, help="output .npz")

    p = sub.add_parser("inception", help="pytorch-fid Inception .pth -> inception.npz")
    p.add_argument("--pth", required=True, help="pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--out", required=True, help="output .npz")
    return parser


def _vavae(args) -> dict:
    from vavae_jax import checkpoints, foundation
    from vavae_jax.model import PRESETS

    if args.preset not in PRESETS:
        raise ValueError(f"--preset={args.preset!r}: expected one of {sorted(PRESETS)}")
    teacher = args.teacher_preset
    if args.teacher_config:
        fields = json.loads(args.teacher_config)
        fields.setdefault("interpolate_antialias", True)  # the reference's teacher is timm's
        teacher = foundation.Dinov2Config(**fields)
    out = checkpoints.convert_official(
        args.pt, args.out, PRESETS[args.preset], teacher_preset=teacher
    )
    return checkpoints.read_export_meta(out)


def _lightningdit(args) -> dict:
    from lightningdit_jax import convert
    from lightningdit_jax.model import PRESETS

    if args.preset not in PRESETS:
        raise ValueError(f"--preset={args.preset!r}: expected one of {sorted(PRESETS)}")
    out = convert.convert_file(args.pt, args.out, PRESETS[args.preset], use_ema=not args.no_ema)
    return {"out": str(out), "config": dataclasses.asdict(PRESETS[args.preset])}


def _lpips(args) -> dict:
    from vavae_jax import lpips

    return {"out": str(lpips.convert_lpips(args.vgg, args.heads, args.out))}


def _inception(args) -> dict:
    from vavae_jax.metrics import load_inception, save_inception

    if not str(args.out).endswith(".npz"):
        raise ValueError(f"--out={args.out}: the Inception weights are written as .npz")
    return {"out": str(save_inception(load_inception(args.pth), args.out))}


COMMANDS = {
    "vavae": _vavae,
    "lightningdit": _lightningdit,
    "lpips": _lpips,
    "inception": _inception,
}


def main(argv: list[str] | None = None) -> dict:
    """Runs one subcommand; returns (and prints) a JSON summary of what was written."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = COMMANDS[args.command](args)
    print(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
