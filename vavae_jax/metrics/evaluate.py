"""Evaluates a tokenizer (PSNR, SSIM, LPIPS, rFID) or generated samples (FID, IS).

Tokenizer, as the reference's evaluate_tokenizer.py reports it: every image (center crop to the
data config's resolution, [-1, 1]) is encoded, a posterior sample decoded (`mode=True` decodes the
mean); PSNR on the uint8 images (per image, averaged), SSIM (torchmetrics' conventions, data range
[-1, 1]) and LPIPS on the float reconstructions, rFID between the Inception features of the
originals and of the reconstructions (the reference compares its two PNG folders).

Samples (ADM `.npz`, uint8 `arr_0` [N, H, W, 3]) against a reference batch, its statistics or a
folder of images. `inception="random"` is an offline smoke test: random Inception weights, logged
as a WARNING and labelled in the result. launch/evaluate.py is the command line.
"""

from __future__ import annotations

import logging
import os
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vavae_jax import checkpoints, data
from vavae_jax import lpips as lpips_lib
from vavae_jax.metrics import fid, image
from vavae_jax.metrics import inception as inception_lib
from vavae_jax.model import PRESETS
from vavae_jax.runtime import loop

log = logging.getLogger(__name__)


def load_eval_inception(path: str) -> tuple[inception_lib.FIDInceptionV3, str]:
    """(FIDInceptionV3, its label for the results): a weights file (our .npz or pytorch-fid's
    .pth), or random weights for `path == "random"` (loudly: the numbers mean nothing)."""
    if path == inception_lib.RANDOM:
        log.warning(
            "--inception=random: the FID Inception has RANDOM weights; FID, rFID and IS are "
            "MEANINGLESS (a smoke test of the code path only)"
        )
        return inception_lib.random_inception(), inception_lib.RANDOM_LABEL
    return inception_lib.load_inception(path), str(path)


def inception_batch(num_images: int, cap: int) -> int:
    """The Inception batch for `num_images`: at most `cap`, as few batches as `cap` allows, split
    evenly. One compiled shape, and the padded last batch wastes less than one image per batch
    (a fixed batch of 100 made 8 tokenizer images cost 100 Inception passes)."""
    if cap <= 0:
        raise ValueError(f"--inception_batch_size={cap}: must be positive")
    num_batches = max(1, -(-num_images // cap))
    return max(1, -(-num_images // num_batches))


def record_limit(max_records: int, num_images: int) -> int:
    """The records to read: `max_records` capped by `num_images` (either <= 0: no limit)."""
    if num_images > 0:
        return num_images if max_records <= 0 else min(max_records, num_images)
    return max_records


def eval_data_config(
    *,
    source: str = "folder",
    root: str = "",
    tfds_name: str = "imagenet2012",
    tfds_split: str = "validation",
    tfds_data_dir: str = "",
    manual_dir: str = "",
    resolution: int = 256,
    max_records: int = -1,
    num_images: int = -1,
    worker_count: int = 0,
) -> ml_collections.ConfigDict:
    """The data config of an evaluation: center crops, no flip, the first `num_images` records."""
    cfg = data.default_data_config()
    cfg.update(
        source=source,
        root=root,
        tfds_name=tfds_name,
        tfds_split=tfds_split,
        tfds_data_dir=tfds_data_dir,
        manual_dir=manual_dir,
        resolution=resolution,
        worker_count=worker_count,
        random_flip=False,
        max_records=record_limit(max_records, num_images),
    )
    return cfg


class _FullBatches:
    """Collects uint8 images and embeds them only in full Inception batches (the rest at
    `finish`), so that small, masked data batches never pay for a padded Inception batch."""

    def __init__(self, extractor: inception_lib.FeatureExtractor):
        self.extractor, self.pending, self.features = extractor, [], []

    def add(self, images: np.ndarray) -> None:
        self.pending.append(images)
        if sum(len(x) for x in self.pending) >= self.extractor.batch_size:
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        if not self.pending:
            return
        images = np.concatenate(self.pending)
        bs = self.extractor.batch_size
        full = len(images) if final else len(images) // bs * bs
        if full:
            self.features.append(self.extractor(images[:full])[0])
        self.pending = [images[full:]] if full < len(images) else []

    def finish(self) -> np.ndarray:
        self._flush(final=True)
        return np.concatenate(self.features)


def evaluate_tokenizer(
    tokenizer: str | os.PathLike,
    data_config: ml_collections.ConfigDict,
    *,
    preset: str = "f16d32",
    batch_size: int = 8,
    lpips: str | None = None,
    inception: str | None = None,
    inception_batch_size: int = 100,
    ref_stats: str | None = None,
    mode: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """PSNR, SSIM, LPIPS and rFID of `tokenizer` on the images of `data_config` (see
    `eval_data_config`).

    `tokenizer` is an export directory (launch/convert.py vavae), a VA-VAE trainer workdir or an
    official VA-VAE .pt (then `preset` names its architecture). `lpips` is a converted LPIPS .npz
    (default: the export's own, else LPIPS is not reported); `inception` as for
    `load_eval_inception` (None: no rFID); `ref_stats` also reports the FID of the
    reconstructions against these statistics. `mode` decodes the posterior mean, else a sample
    drawn with `seed`.
    """
    path = pathlib.Path(tokenizer)
    resolution = data_config.resolution
    if path.is_dir():
        model, groups = checkpoints.load_autoencoder(path)
    else:
        if preset not in PRESETS:
            raise ValueError(f"--preset={preset!r}: expected one of {sorted(PRESETS)}")
        model, groups = checkpoints.load_autoencoder(path, PRESETS[preset])
    if model.config.resolution != resolution:
        log.warning(
            "tokenizer trained at %d px, evaluated at --data.resolution=%d",
            model.config.resolution,
            resolution,
        )
    lpips_model = None
    if lpips:
        lpips_model = lpips_lib.load_lpips_converted(lpips)
    elif groups.get("lpips") is not None:
        lpips_model = groups["lpips"]
        log.info("LPIPS: the weights stored with the tokenizer export")
    else:
        log.warning("no --lpips, and the tokenizer (export or run) has none: LPIPS is not reported")
    if not inception:
        log.warning("no --inception: rFID is not reported")

    ae_def, ae_state = nnx.split(model)
    lp = nnx.split(lpips_model) if lpips_model is not None else None

    @jax.jit
    def reconstruct(state, images, key):
        ae = nnx.merge(ae_def, state)
        post = ae.encode(images)
        z = post.mode() if mode else post.sample(key)
        return ae.decode(z)

    @jax.jit
    def image_metrics(images, rec, lp_state):
        out = {
            "psnr": image.psnr(image.to_uint8(images), image.to_uint8(rec)),
            "ssim": image.ssim(rec, images),
        }
        if lp is not None:
            out["lpips"] = nnx.merge(lp[0], lp_state)(rec, images).reshape(rec.shape[0])
        return out

    it, n = data.make_eval_iterator(data_config, batch_size)
    extractor = inception_label = None
    if inception:
        inception_model, inception_label = load_eval_inception(inception)
        extractor = inception_lib.FeatureExtractor(
            inception_model, batch_size=inception_batch(n, inception_batch_size)
        )
        feats_orig, feats_rec = _FullBatches(extractor), _FullBatches(extractor)
    per_image = {"psnr": [], "ssim": [], "lpips": []}
    key = jax.random.key(seed)
    start = time.time()
    bar = loop.Progress(n, "tokenizer", unit="img", enabled=progress)
    for step, batch in enumerate(it):
        mask = np.asarray(batch["mask"], bool)
        images = jnp.asarray(batch["image"])
        rec = reconstruct(ae_state, images, jax.random.fold_in(key, step))
        values = image_metrics(images, rec, None if lp is None else lp[1])
        for name, v in values.items():
            per_image[name].append(np.asarray(v)[mask])
        if extractor is not None and mask.any():
            feats_orig.add(np.asarray(image.to_uint8(images))[mask])
            feats_rec.add(np.asarray(image.to_uint8(rec))[mask])
        bar.update(int(mask.sum()))
    bar.close()
    count = int(sum(len(v) for v in per_image["psnr"]))
    if count == 0:
        raise ValueError("no images were evaluated: the data source is empty or all unreadable")
    result = {
        "tokenizer": str(path),
        "num_images": count,
        "skipped_images": it.skipped,
        "resolution": resolution,
        "posterior": "mode" if mode else "sample",
    }
    for name, chunks in per_image.items():
        if chunks:
            result[name] = float(np.mean(np.concatenate(chunks)))
    if extractor is not None:
        if count < 2:
            raise ValueError("rFID needs at least 2 images")
        mu1, s1 = fid.feature_statistics(feats_orig.finish(), "the original images")
        mu2, s2 = fid.feature_statistics(feats_rec.finish(), "the reconstructions")
        result["rfid"] = fid.frechet_distance(mu1, s1, mu2, s2)
        result["inception"] = inception_label
        if ref_stats:
            ref_mu, ref_sigma = fid.reference_statistics(ref_stats, extractor)
            result["fid_vs_ref_stats"] = fid.frechet_distance(mu2, s2, ref_mu, ref_sigma)
    result["seconds"] = round(time.time() - start, 2)
    return result


def evaluate_samples(
    samples: str | os.PathLike,
    ref: str | os.PathLike,
    inception: str,
    *,
    num_splits: int = 10,
    batch_size: int = 8,
    inception_batch_size: int = 100,
    ref_max_records: int = -1,
    worker_count: int = 0,
) -> dict:
    """FID and Inception Score of the ADM `.npz` `samples` against `ref`: a reference batch
    (e.g. VIRTUAL_imagenet256_labeled.npz), its statistics (.npz with mu / sigma), or a folder
    `<root>/<class>/<image>` (its first `ref_max_records` images, center-cropped to the samples'
    size, read `batch_size` at a time). `inception` as for `load_eval_inception`."""
    model, label = load_eval_inception(inception)
    start = time.time()
    (num_samples, size, *_), _ = fid.npz_image_info(samples)
    num_ref = 0
    if pathlib.Path(ref).is_dir():
        cfg = eval_data_config(
            root=str(ref), resolution=size, max_records=ref_max_records, worker_count=worker_count
        )
        ref_it, num_ref = data.make_eval_iterator(cfg, batch_size)
    extractor = inception_lib.FeatureExtractor(
        model, batch_size=inception_batch(max(num_samples, num_ref), inception_batch_size)
    )
    with tempfile.TemporaryDirectory() as tmp:
        ref_file = ref
        if num_ref:  # the folder's statistics, stored as a reference batch's mu / sigma
            feats = _FullBatches(extractor)
            for batch in ref_it:
                mask = np.asarray(batch["mask"], bool)
                if mask.any():
                    feats.add(np.asarray(image.to_uint8(batch["image"]))[mask])
            pool = feats.finish()
            ref_file = os.path.join(tmp, "ref_stats.npz")
            fid.save_statistics(ref_file, *fid.feature_statistics(pool, "the reference images"))
            log.info("reference: %d images of %s at %d px", len(pool), ref, size)
        result = fid.compute_fid_from_npz(samples, ref_file, extractor, num_splits=num_splits)
    result.update(samples=str(samples), ref=str(ref), inception=label)
    result["seconds"] = round(time.time() - start, 2)
    return result
