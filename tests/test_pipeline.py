"""Latent extraction (lightningdit_jax.pipeline): every record exactly once with grain workers,
flips, stats, kill and rerun, repair of damaged shards, refusal of foreign ones, and a finalise
step that never writes a smaller index."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lightningdit_jax import data as latent_data
from lightningdit_jax import pipeline
from vavae_jax import data as image_data
from vavae_jax import model as vae_model
from vavae_jax.data import DataCountError

from .conftest import FAST_COMPILE_FLAGS, ROOT


def _config(sample_images_dir, *, max_records=20, worker_count=0, resolution=16):
    cfg = image_data.default_data_config()
    cfg.update(
        dict(
            source="folder",
            root=str(sample_images_dir),
            resolution=resolution,
            max_records=max_records,
            random_flip=False,
            worker_count=worker_count,
        )
    )
    return cfg


def _tiny_ae(deterministic=False):
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
    if deterministic:
        # logvar -> -1000, clamped to -30: std e^-15, so a posterior sample is its mean to 1e-6
        # and each stored latent can be checked against the encoder.
        bias = ae.quant_conv.bias
        bias.value = bias.value.at[ae_cfg.embed_dim :].set(-1000.0)
    return ae


def _read_all(out_dir, index):
    parts = [
        latent_data.read_shard(os.path.join(out_dir, s["file"]), index["shape"])
        for s in index["shards"]
    ]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@pytest.mark.slow
def test_extract_with_default_workers_every_record_once_flips_included(sample_images_dir, tmp_path):
    """The data config's default worker count (8): every record and class arrives exactly once,
    and each latent pair is the encoding of its image and of the image's flip. (With batching
    inside grain's workers, each batch held 1/8 of its records and half the data was lost.)"""
    n = 60
    cfg = _config(sample_images_dir, max_records=n, worker_count=8)
    assert cfg.worker_count == image_data.default_data_config().worker_count
    ae = _tiny_ae(deterministic=True)
    out = str(tmp_path / "lat")
    index = pipeline.extract(
        cfg, ae, {"path": ""}, out, batch_size=16, batches_per_shard=2, progress=False
    )
    assert index["num_records"] == n and index["source_records"] == n
    assert index["num_classes"] == n  # one image per class in the sample set
    z, labels = _read_all(out, index)
    assert sorted(labels.tolist()) == list(range(n))  # each class once
    # Flips included: check every stored pair against the encoder (mean of the posterior).
    plain, _ = image_data.make_eval_iterator(_config(sample_images_dir, max_records=n), n)
    batch = next(plain)
    images = jnp.asarray(batch["image"])
    mean = np.asarray(ae.encode(images).mean)
    mean_flip = np.asarray(ae.encode(images[:, :, ::-1]).mean)
    order = np.argsort(labels)
    np.testing.assert_allclose(z[order, 0], mean, atol=1e-4)
    np.testing.assert_allclose(z[order, 1], mean_flip, atol=1e-4)
    assert not np.allclose(mean, mean_flip, atol=1e-3)


def test_eval_iterator_same_batches_for_any_worker_count(sample_images_dir):
    def batches(workers):
        it, n = image_data.make_eval_iterator(
            _config(sample_images_dir, max_records=13, worker_count=workers), 8
        )
        out = list(it)
        assert n == 13 and len(out) == 2 and all(b["image"].shape[0] == 8 for b in out)
        return out

    a, b = batches(0), batches(3)
    for x, y in zip(a, b):
        for k in ("image", "label", "index", "mask"):
            np.testing.assert_array_equal(x[k], y[k])
    assert a[1]["index"].tolist() == [8, 9, 10, 11, 12, -1, -1, -1]


def test_eval_iterator_raises_on_a_lost_or_repeated_record():
    def element(i):
        return dict(
            image=np.zeros((2, 2, 3), np.uint8),
            label=np.int32(i),
            index=np.int64(i),
            mask=np.bool_(True),
            skipped=np.int32(0),
        )

    short = image_data.EvalIterator([element(i) for i in range(7)], 8, 4, 2, range(8))
    next(short)
    with pytest.raises(DataCountError, match="ended after 7 of 8"):
        next(short)
    repeated = image_data.EvalIterator(
        [element(i) for i in (0, 1, 2, 3, 4, 5, 6, 6)], 8, 4, 2, range(8)
    )
    with pytest.raises(DataCountError, match=r"lost 1 record\(s\) \(e.g. \[7\]\) and repeated 1"):
        list(repeated)


def test_extract_stats_and_resume(sample_images_dir, tmp_path):
    cfg, ae = _config(sample_images_dir), _tiny_ae()
    kw = dict(batch_size=8, batches_per_shard=1, seed=0, progress=False)
    full = pipeline.extract(cfg, ae, {"path": ""}, str(tmp_path / "full"), **kw)
    assert full["num_records"] == 20 and len(full["shards"]) == 3  # 8 + 8 + 4 (padding dropped)
    # Killed after one shard, then rerun: the same records, none lost, none duplicated.
    out = str(tmp_path / "resumed")
    assert pipeline.extract(cfg, ae, {"path": ""}, out, stop_after_shards=1, **kw) is None
    assert sorted(os.listdir(out)) == ["latents-p000-00000.array_record", "latents-p000-00000.json"]
    resumed = pipeline.extract(cfg, ae, {"path": ""}, out, **kw)
    assert resumed["shards"] == full["shards"]  # same files, counts and checksums
    z, labels = _read_all(out, resumed)
    assert z.shape == (20, 2, 8, 8, 4)
    np.testing.assert_array_equal(labels, np.arange(20))
    # The flip's latent differs from the image's (it was encoded from the flipped image).
    assert not np.allclose(z[:, 0], z[:, 1])
    stats = latent_data.load_stats(out)
    ref = z[:, 0].astype(np.float64)
    np.testing.assert_allclose(stats["mean"], ref.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats["std"], ref.std(axis=(0, 1, 2), ddof=1), rtol=1e-5)


def test_rerun_repairs_damaged_shards_and_refuses_foreign_ones(sample_images_dir, tmp_path):
    cfg, ae = _config(sample_images_dir), _tiny_ae()
    kw = dict(batch_size=8, batches_per_shard=1, seed=0, progress=False)
    out = str(tmp_path / "lat")
    first = pipeline.extract(cfg, ae, {"path": ""}, out, **kw)
    # A truncated shard (a full disk, a copy cut short) and a shard without its manifest.
    path0 = os.path.join(out, first["shards"][0]["file"])
    with open(path0, "r+b") as f:
        f.truncate(os.path.getsize(path0) // 2)
    os.remove(os.path.join(out, "latents-p000-00001.json"))
    # finalize alone refuses the damaged folder instead of writing a smaller index.
    plans = pipeline.plan_shards(20, 8, 1, 1)
    run = json.load(open(os.path.join(out, "latents-p000-00002.json")))["run"]
    with pytest.raises(DataCountError, match="checksum mismatch|holds"):
        pipeline.finalize(out, plans, 20, first["shape"], {"path": ""}, "float32", run)
    repaired = pipeline.extract(cfg, ae, {"path": ""}, out, **kw)
    assert repaired["shards"] == first["shards"]
    # Shards of another extraction (another seed) are refused, not mixed in.
    with pytest.raises(pipeline.ShardMismatchError, match="seed"):
        pipeline.extract(cfg, ae, {"path": ""}, out, **dict(kw, seed=1))
    # A stray shard of a larger plan is refused too.
    with open(os.path.join(out, "latents-p000-00009.array_record"), "wb") as f:
        f.write(b"x")
    with pytest.raises(pipeline.ShardMismatchError, match="did not plan"):
        pipeline.extract(cfg, ae, {"path": ""}, out, **kw)


def test_finalize_refuses_a_count_below_the_source(sample_images_dir, tmp_path):
    cfg, ae = _config(sample_images_dir), _tiny_ae()
    out = str(tmp_path / "lat")
    index = pipeline.extract(
        cfg, ae, {"path": ""}, out, batch_size=8, batches_per_shard=1, progress=False
    )
    run = json.load(open(os.path.join(out, "latents-p000-00000.json")))["run"]
    plans = pipeline.plan_shards(20, 8, 1, 1)
    # The same shards against a source of 21 records: one is missing, so no index.
    with pytest.raises(DataCountError):
        pipeline.finalize(out, plans, 21, index["shape"], {"path": ""}, "float32", run)


@pytest.mark.slow
def test_extract_latents_cli_default_workers(sample_images_dir, tmp_path):
    """The documented command with its default flags (8 grain workers, batch 256): all records
    arrive (the bug: "500 latents" out of 1000, num_classes 996)."""
    out = tmp_path / "lat"
    n = 300
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "extract_latents.py"),
            "--allow_random",
            "--source=folder",
            f"--root={sample_images_dir}",
            f"--max_records={n}",
            "--resolution=32",  # a quarter of the encoder's work at 64 px; the same batches
            f"--out_dir={out}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "XLA_FLAGS": FAST_COMPILE_FLAGS},  # one device, not conftest's 8
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = latent_data.load_index(str(out))
    assert index["num_records"] == n and index["num_classes"] == n
    _, labels = _read_all(str(out), index)
    assert sorted(labels.tolist()) == list(range(n))
