r"""Evaluates a tokenizer (PSNR, SSIM, LPIPS, rFID) or generated samples (FID, IS).

Tokenizer, as the reference's evaluate_tokenizer.py reports it: every image (center crop to
--data.resolution, [-1, 1]) is encoded, a posterior sample decoded (--mode decodes the mean);
PSNR on the uint8 images (per image, averaged), SSIM (torchmetrics' conventions, data range
[-1, 1]) and LPIPS on the float reconstructions, rFID between the Inception features of the
originals and of the reconstructions (the reference compares its two PNG folders):

  python launch/evaluate.py --tokenizer=ckpt/vavae --data.source=folder \\
      --data.root=/data/imagenet/val --lpips=lpips.npz --inception=inception.npz \\
      --num_images=50000 --output=tokenizer_eval.json

Samples (ADM `.npz`, uint8 `arr_0` [N, H, W, 3]) against a reference batch or its statistics:

  python launch/evaluate.py --samples=samples.npz --ref=VIRTUAL_imagenet256_labeled.npz \\
      --inception=inception.npz

--tokenizer is an export directory (launch/convert.py vavae), a VA-VAE trainer workdir or an
official VA-VAE .pt (then --preset names its architecture). --inception is our .npz
(launch/convert.py inception) or pytorch-fid's .pth (needs torch), or `random` for an offline
smoke test: a random-weight Inception, logged as a WARNING and labelled in the JSON
("inception": "RANDOM WEIGHTS: numbers are meaningless"). With random-weight Inception or LPIPS
the numbers are a smoke test, not metrics. --ref may also be a folder of images
(<root>/<class>/<image>, center-cropped to the samples' size). The results are printed as JSON
(and written to --output).
"""

from __future__ import annotations

import argparse
import json
import pathlib

from vavae_jax.metrics import evaluate


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/evaluate.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    t = p.add_argument_group("tokenizer evaluation")
    t.add_argument("--tokenizer", help="export directory or official VA-VAE .pt")
    t.add_argument("--preset", default="f16d32", help="architecture of a .pt tokenizer")
    t.add_argument("--data.source", dest="source", default="folder", choices=("folder", "tfds"))
    t.add_argument("--data.root", dest="root", default="", help="folder: <root>/<class>/<image>")
    t.add_argument("--data.tfds_name", dest="tfds_name", default="imagenet2012")
    t.add_argument("--data.tfds_split", dest="tfds_split", default="validation")
    t.add_argument("--data.tfds_data_dir", dest="tfds_data_dir", default="")
    t.add_argument("--data.manual_dir", dest="manual_dir", default="")
    t.add_argument("--data.resolution", dest="resolution", type=int, default=256)
    t.add_argument("--data.max_records", dest="max_records", type=int, default=-1)
    t.add_argument("--data.worker_count", dest="worker_count", type=int, default=0)
    t.add_argument("--num_images", type=int, default=-1, help="evaluate the first N (-1: all)")
    t.add_argument("--batch_size", type=int, default=8)
    t.add_argument(
        "--lpips", default=None, help="converted LPIPS .npz (launch/convert.py lpips); "
        "default: the tokenizer export's lpips.npz if it has one, else LPIPS is not reported"
    )  # fmt: skip
    t.add_argument(
        "--ref_stats", default=None, help="also report FID of the reconstructions against these "
        "statistics (.npz with mu/sigma, or an ADM reference batch)"
    )  # fmt: skip
    t.add_argument("--mode", action="store_true", help="decode the posterior mean, not a sample")
    t.add_argument("--seed", type=int, default=0, help="posterior sampling seed")
    s = p.add_argument_group("sample evaluation")
    s.add_argument("--samples", default=None, help="ADM-format .npz of generated images")
    s.add_argument(
        "--ref", default=None, help="reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) or "
        "an image folder <root>/<class>/<image> (--data.max_records limits it)"
    )  # fmt: skip
    s.add_argument("--num_splits", type=int, default=10, help="Inception Score splits (ADM: 10)")
    p.add_argument(
        "--inception", default=None, help="FID Inception: our .npz, pytorch-fid .pth, or "
        "'random' (random weights: a smoke test of the code path, the numbers mean nothing)"
    )  # fmt: skip
    p.add_argument(
        "--inception_batch_size", type=int, default=100, help="at most this many images per "
        "Inception call (fewer when there are fewer images: no padding to a large batch)"
    )  # fmt: skip
    p.add_argument("--output", default=None, help="write the JSON results here too")
    p.add_argument(
        "--no_progress",
        action="store_true",
        help="no progress (a bar on a terminal, else log lines)",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    from vavae_jax.runtime.logging import setup_python_logging

    # replace: importing orbax has already run logging.basicConfig() at WARNING (through absl),
    # which would drop every INFO line, progress included, and keep its own format.
    setup_python_logging(replace=True)
    if bool(args.tokenizer) == bool(args.samples):
        raise ValueError("give exactly one of --tokenizer=<export or .pt> or --samples=<.npz>")
    if args.tokenizer:
        data_config = evaluate.eval_data_config(
            source=args.source,
            root=args.root,
            tfds_name=args.tfds_name,
            tfds_split=args.tfds_split,
            tfds_data_dir=args.tfds_data_dir,
            manual_dir=args.manual_dir,
            resolution=args.resolution,
            max_records=args.max_records,
            num_images=args.num_images,
            worker_count=args.worker_count,
        )
        result = evaluate.evaluate_tokenizer(
            args.tokenizer,
            data_config,
            preset=args.preset,
            batch_size=args.batch_size,
            lpips=args.lpips,
            inception=args.inception,
            inception_batch_size=args.inception_batch_size,
            ref_stats=args.ref_stats,
            mode=args.mode,
            seed=args.seed,
            progress=not args.no_progress,
        )
    else:
        if not args.ref or not args.inception:
            raise ValueError(
                "--samples needs --ref=<reference batch .npz or image folder> and "
                "--inception=<weights, or 'random' for a smoke test>"
            )
        result = evaluate.evaluate_samples(
            args.samples,
            args.ref,
            args.inception,
            num_splits=args.num_splits,
            batch_size=args.batch_size,
            inception_batch_size=args.inception_batch_size,
            ref_max_records=evaluate.record_limit(args.max_records, args.num_images),
            worker_count=args.worker_count,
        )
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        out = pathlib.Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
