"""Latent extraction through launch/extract_latents.py: stats, kill and rerun."""

import os
import pathlib
import sys

import numpy as np
from flax import nnx

from lightningdit_jax import data as latent_data
from vavae_jax import data as image_data
from vavae_jax import model as vae_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))

import extract_latents  # noqa: E402


def _setup(sample_images_dir):
    cfg = image_data.default_data_config()
    cfg.update(
        dict(
            source="folder",
            root=str(sample_images_dir),
            resolution=16,
            max_records=20,
            random_flip=False,
            worker_count=0,
        )
    )
    ae_cfg = vae_model.AutoencoderConfig(
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        z_channels=4,
        embed_dim=4,
        resolution=16,
    )
    ae = vae_model.AutoencoderKL(ae_cfg, rngs=nnx.Rngs(0))
    return cfg, ae


def test_extract_stats_and_resume(sample_images_dir, tmp_path):
    cfg, ae = _setup(sample_images_dir)
    kw = dict(batch_size=8, batches_per_shard=1, seed=0, progress=False)
    full = extract_latents.extract(cfg, ae, {"path": ""}, str(tmp_path / "full"), **kw)
    assert full["num_records"] == 20 and len(full["shards"]) == 3  # 8 + 8 + 4 (padding dropped)
    # Killed after one shard, then rerun: the same records, none lost, none duplicated.
    out = str(tmp_path / "resumed")
    assert extract_latents.extract(cfg, ae, {"path": ""}, out, stop_after_shards=1, **kw) is None
    assert len(os.listdir(out)) == 1
    resumed = extract_latents.extract(cfg, ae, {"path": ""}, out, **kw)
    assert resumed["shards"] == full["shards"]
    shape = full["shape"]
    for s in full["shards"]:
        a = latent_data.read_shard(str(tmp_path / "full" / s["file"]), shape)
        b = latent_data.read_shard(os.path.join(out, s["file"]), shape)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    z = np.concatenate(
        [latent_data.read_shard(os.path.join(out, s["file"]), shape)[0] for s in full["shards"]]
    )
    labels = np.concatenate(
        [latent_data.read_shard(os.path.join(out, s["file"]), shape)[1] for s in full["shards"]]
    )
    assert z.shape == (20, 2, 8, 8, 4)
    it, _ = image_data.make_eval_iterator(cfg, 20)
    np.testing.assert_array_equal(labels, next(it)["label"][:20])
    # The flip's latent differs from the image's (it was encoded from the flipped image).
    assert not np.allclose(z[:, 0], z[:, 1])
    stats = latent_data.load_stats(out)
    ref = z[:, 0].astype(np.float64)
    np.testing.assert_allclose(stats["mean"], ref.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats["std"], ref.std(axis=(0, 1, 2), ddof=1), rtol=1e-5)
