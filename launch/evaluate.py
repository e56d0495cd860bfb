"""Evaluates a tokenizer (PSNR, SSIM, LPIPS, rFID) or generated samples (FID, IS).

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
import logging
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

log = logging.getLogger("launch.evaluate")


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
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _load_inception(path: str):
    """(FIDInceptionV3, its label for the JSON): a weights file, or random weights (loudly)."""
    from vavae_jax import metrics
    from vavae_jax.metrics import inception

    if path == inception.RANDOM:
        log.warning(
            "--inception=random: the FID Inception has RANDOM weights; FID, rFID and IS are "
            "MEANINGLESS (a smoke test of the code path only)"
        )
        return metrics.random_inception(), inception.RANDOM_LABEL
    return metrics.load_inception(path), str(path)


def _inception_batch(num_images: int, cap: int) -> int:
    """The Inception batch for `num_images`: at most `cap`, as few batches as `cap` allows, split
    evenly. One compiled shape, and the padded last batch wastes less than one image per batch
    (a fixed batch of 100 made 8 tokenizer images cost 100 Inception passes)."""
    if cap <= 0:
        raise ValueError(f"--inception_batch_size={cap}: must be positive")
    num_batches = max(1, -(-num_images // cap))
    return max(1, -(-num_images // num_batches))


class _FullBatches:
    """Collects uint8 images and embeds them only in full Inception batches (the rest at
    `finish`), so that small, masked data batches never pay for a padded Inception batch."""

    def __init__(self, extractor):
        self.extractor, self.pending, self.features = extractor, [], []

    def add(self, images) -> None:
        self.pending.append(images)
        if sum(len(x) for x in self.pending) >= self.extractor.batch_size:
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        import numpy as np

        if not self.pending:
            return
        images = np.concatenate(self.pending)
        bs = self.extractor.batch_size
        full = len(images) if final else len(images) // bs * bs
        if full:
            self.features.append(self.extractor(images[:full])[0])
        self.pending = [images[full:]] if full < len(images) else []

    def finish(self):
        import numpy as np

        self._flush(final=True)
        return np.concatenate(self.features)


def _data_config(args):
    from vavae_jax.data import default_data_config

    cfg = default_data_config()
    for key in ("source", "root", "tfds_name", "tfds_split", "tfds_data_dir", "manual_dir"):
        cfg[key] = getattr(args, key)
    cfg.resolution, cfg.worker_count, cfg.random_flip = args.resolution, args.worker_count, False
    limit = args.max_records
    if args.num_images > 0:
        limit = args.num_images if limit <= 0 else min(limit, args.num_images)
    cfg.max_records = limit
    return cfg


def evaluate_tokenizer(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from tqdm import tqdm

    from vavae_jax import convert, data, metrics
    from vavae_jax import lpips as lpips_lib
    from vavae_jax.model import PRESETS

    path = pathlib.Path(args.tokenizer)
    if path.is_dir():
        model, groups = convert.load_tokenizer(path)
    else:
        if args.preset not in PRESETS:
            raise ValueError(f"--preset={args.preset!r}: expected one of {sorted(PRESETS)}")
        model, groups = convert.load_tokenizer(path, PRESETS[args.preset])
    if model.config.resolution != args.resolution:
        log.warning(
            "tokenizer trained at %d px, evaluated at --data.resolution=%d",
            model.config.resolution,
            args.resolution,
        )
    lpips_model = None
    if args.lpips:
        lpips_model = lpips_lib.load_lpips_converted(args.lpips)
    elif groups.get("lpips") is not None:
        lpips_model = groups["lpips"]
        log.info("LPIPS: the weights stored with the tokenizer export")
    else:
        log.warning("no --lpips and none in the tokenizer export: LPIPS is not reported")
    if not args.inception:
        log.warning("no --inception: rFID is not reported")

    ae_def, ae_state = nnx.split(model)
    lp = nnx.split(lpips_model) if lpips_model is not None else None

    @jax.jit
    def reconstruct(state, images, key):
        ae = nnx.merge(ae_def, state)
        post = ae.encode(images)
        z = post.mode() if args.mode else post.sample(key)
        return ae.decode(z)

    @jax.jit
    def image_metrics(images, rec, lp_state):
        out = {
            "psnr": metrics.psnr(metrics.to_uint8(images), metrics.to_uint8(rec)),
            "ssim": metrics.ssim(rec, images),
        }
        if lp is not None:
            out["lpips"] = nnx.merge(lp[0], lp_state)(rec, images).reshape(rec.shape[0])
        return out

    it, n = data.make_eval_iterator(_data_config(args), args.batch_size)
    extractor = inception_label = None
    if args.inception:
        inception_model, inception_label = _load_inception(args.inception)
        extractor = metrics.FeatureExtractor(
            inception_model, batch_size=_inception_batch(n, args.inception_batch_size)
        )
        feats_orig, feats_rec = _FullBatches(extractor), _FullBatches(extractor)
    per_image = {"psnr": [], "ssim": [], "lpips": []}
    key = jax.random.key(args.seed)
    start = time.time()
    bar = tqdm(total=n, unit="img", disable=args.no_progress, desc="tokenizer")
    for step, batch in enumerate(it):
        mask = np.asarray(batch["mask"], bool)
        images = jnp.asarray(batch["image"])
        rec = reconstruct(ae_state, images, jax.random.fold_in(key, step))
        values = image_metrics(images, rec, None if lp is None else lp[1])
        for name, v in values.items():
            per_image[name].append(np.asarray(v)[mask])
        if extractor is not None and mask.any():
            feats_orig.add(np.asarray(metrics.to_uint8(images))[mask])
            feats_rec.add(np.asarray(metrics.to_uint8(rec))[mask])
        bar.update(int(mask.sum()))
    bar.close()
    count = int(sum(len(v) for v in per_image["psnr"]))
    if count == 0:
        raise ValueError("no images were evaluated: the data source is empty or all unreadable")
    result = {
        "tokenizer": str(path),
        "num_images": count,
        "skipped_images": it.skipped,
        "resolution": args.resolution,
        "posterior": "mode" if args.mode else "sample",
    }
    for name, chunks in per_image.items():
        if chunks:
            result[name] = float(np.mean(np.concatenate(chunks)))
    if extractor is not None:
        if count < 2:
            raise ValueError("rFID needs at least 2 images")
        mu1, s1 = metrics.feature_statistics(feats_orig.finish())
        mu2, s2 = metrics.feature_statistics(feats_rec.finish())
        result["rfid"] = metrics.frechet_distance(mu1, s1, mu2, s2)
        result["inception"] = inception_label
        if args.ref_stats:
            ref_mu, ref_sigma = metrics.reference_statistics(args.ref_stats, extractor)
            result["fid_vs_ref_stats"] = metrics.frechet_distance(mu2, s2, ref_mu, ref_sigma)
    result["seconds"] = round(time.time() - start, 2)
    return result


def evaluate_samples(args) -> dict:
    import numpy as np

    from vavae_jax import metrics

    if not args.ref or not args.inception:
        raise ValueError(
            "--samples needs --ref=<reference batch .npz or image folder> and "
            "--inception=<weights, or 'random' for a smoke test>"
        )
    inception, label = _load_inception(args.inception)
    start = time.time()
    (num_samples, size, *_), _ = metrics.fid.npz_image_info(args.samples)
    num_ref = 0
    if pathlib.Path(args.ref).is_dir():
        from vavae_jax import data

        cfg = _data_config(args)
        cfg.source, cfg.root, cfg.resolution = "folder", args.ref, size
        ref_it, num_ref = data.make_eval_iterator(cfg, args.batch_size)
    extractor = metrics.FeatureExtractor(
        inception, batch_size=_inception_batch(max(num_samples, num_ref), args.inception_batch_size)
    )
    with tempfile.TemporaryDirectory() as tmp:
        ref = args.ref
        if num_ref:  # the folder's statistics, stored as a reference batch's mu / sigma
            feats = _FullBatches(extractor)
            for batch in ref_it:
                mask = np.asarray(batch["mask"], bool)
                if mask.any():
                    feats.add(np.asarray(metrics.to_uint8(batch["image"]))[mask])
            pool = feats.finish()
            ref = os.path.join(tmp, "ref_stats.npz")
            metrics.save_statistics(ref, *metrics.feature_statistics(pool))
            log.info("reference: %d images of %s at %d px", len(pool), args.ref, size)
        result = metrics.compute_fid_from_npz(
            args.samples, ref, extractor, num_splits=args.num_splits
        )
    result.update(samples=args.samples, ref=args.ref, inception=label)
    result["seconds"] = round(time.time() - start, 2)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if bool(args.tokenizer) == bool(args.samples):
        raise ValueError("give exactly one of --tokenizer=<export or .pt> or --samples=<.npz>")
    result = evaluate_tokenizer(args) if args.tokenizer else evaluate_samples(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        out = pathlib.Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
