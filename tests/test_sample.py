"""Sampling a run (lightningdit_jax.pipeline, behind launch/sample.py): a tiny trained LightningDiT
+ a tiny VA-VAE export; kill and rerun, labels -> images, guidance, tokenizer references."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lightningdit_jax import data as data_lib
from lightningdit_jax import pipeline, sampling, train
from tests.test_lightningdit_train import DIT_TRAINER_GROUP, tiny_config, write_latents
from vavae_jax import checkpoints
from vavae_jax import model as vae_model
from vavae_jax.runtime import sharding

N, CHUNK, STEPS = 6, 4, 3
KW = dict(num_steps=STEPS, timestep_shift=0.3, cfg_scale=4.0, cfg_interval_start=0.11)


def write_export(directory, channels=8):
    """A random tiny VA-VAE (8x8xC latents of 16x16 images) in the launch/convert.py format."""
    import orbax.checkpoint as ocp

    cfg = vae_model.AutoencoderConfig(
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        z_channels=channels,
        embed_dim=channels,
        resolution=16,
    )
    ae = vae_model.AutoencoderKL(cfg, rngs=nnx.Rngs(1))
    directory = pathlib.Path(directory).resolve()
    directory.mkdir(parents=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(
        directory / checkpoints.STATE_DIR,
        {"autoencoder": checkpoints._nest(checkpoints._flat_arrays(ae, nnx.Param))},
    )
    ckptr.wait_until_finished()
    meta = dict(
        format=checkpoints.EXPORT_FORMAT,
        source="test",
        autoencoder_config=dict(
            ch=32,
            ch_mult=[1, 2],
            num_res_blocks=1,
            attn_resolutions=[],
            z_channels=channels,
            embed_dim=channels,
            resolution=16,
        ),
        teacher_dim=None,
        present=["autoencoder"],
        absent=[],
        discriminator_config=None,
        teacher_config=None,
        lpips=None,
    )
    (directory / checkpoints.EXPORT_JSON).write_text(json.dumps(meta))
    return ae, str(directory)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sample")
    ae, export = write_export(tmp / "export")
    write_latents(tmp / "latents", n=16)
    cfg = tiny_config(tmp / "latents")
    cfg.total_steps = 2
    cfg.checkpoint_every_steps = 2
    cfg.image_every_steps = 1000
    cfg.tokenizer.path = export  # sampling finds the tokenizer through the checkpoint meta
    train.run(cfg, str(tmp / "run"))
    return dict(tmp=tmp, workdir=str(tmp / "run"), export=export, ae=ae)


@pytest.mark.slow
@DIT_TRAINER_GROUP
def test_kill_and_rerun_equals_uninterrupted(run):
    tmp, workdir = run["tmp"], run["workdir"]
    kw = dict(num_samples=N, batch_size=CHUNK, seed=3, progress=False, **KW)
    full = pipeline.sample_npz(workdir, str(tmp / "full"), **kw)
    out = str(tmp / "resumed")
    assert pipeline.sample_npz(workdir, out, max_chunks=1, **kw) is None
    assert sorted(f for f in os.listdir(out) if f.startswith("chunk_")) == ["chunk_00000.npz"]
    resumed = pipeline.sample_npz(workdir, out, keep_chunks=True, **kw)
    assert os.path.basename(resumed) == f"samples_{N}.npz"
    with np.load(full) as a, np.load(resumed) as b:
        assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (N, 16, 16, 3)
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
        images, labels = b["arr_0"], b["labels"]
    # Class balanced: 6 samples of 10 classes -> 6 distinct labels, a seeded permutation.
    np.testing.assert_array_equal(np.sort(labels), np.arange(N))
    np.testing.assert_array_equal(labels, pipeline.class_balanced_labels(N, 10, 3))
    assert len({im.tobytes() for im in images}) == N  # no duplicates
    # The merged file is the chunks in order (the chunks were kept on request).
    with np.load(os.path.join(out, "chunk_00001.npz")) as c1:
        np.testing.assert_array_equal(c1["arr_0"], images[CHUNK:])
    # Chunk 1 recomputed by hand: noise fold_in(seed, 1), sample_ode on the EMA model,
    # de-normalised with the meta's stats, decoded, reference uint8 conversion.
    ema, meta, _ = train.load_ema_model(workdir, sharding.make_mesh(-1, 1))
    z0 = jax.random.normal(jax.random.fold_in(jax.random.key(3), 1), (CHUNK, 8, 8, 8))
    y = np.resize(labels[CHUNK:], CHUNK)
    x = sampling.sample_ode(ema, z0, y, cfg_channels="first3", **KW)
    z = data_lib.denormalize(
        np.asarray(x), np.float32(meta["latent_mean"]), np.float32(meta["latent_std"])
    )
    ref = np.asarray(run["ae"].decode(jnp.asarray(z)))
    ref = np.clip(127.5 * ref + 128.0, 0, 255).astype(np.uint8)[: N - CHUNK]
    diff = np.abs(ref.astype(int) - images[CHUNK:].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    # A finished run is not redone; other settings in the same --out are refused.
    assert pipeline.sample_npz(workdir, str(tmp / "full"), **kw) == full
    with pytest.raises(ValueError, match="other settings"):
        pipeline.sample_npz(workdir, out, **dict(kw, seed=4))


@DIT_TRAINER_GROUP
def test_grid_and_errors(run, tmp_path):
    tmp, workdir = run["tmp"], run["workdir"]
    path = pipeline.demo_grid(workdir, str(tmp_path), [1, 2, 3], num_steps=STEPS)
    from PIL import Image

    assert np.asarray(Image.open(path)).shape == (16, 4 * 16, 3)
    with pytest.raises(ValueError, match="outside"):
        pipeline.demo_grid(workdir, str(tmp_path), [10], num_steps=STEPS)
    kw = dict(num_samples=2, batch_size=2, num_steps=STEPS, progress=False)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        pipeline.sample_npz(str(tmp / "nope"), str(tmp_path / "o"), **kw)
    (tmp / "empty").mkdir()
    (tmp / "empty" / "config.json").write_text("{}")
    (tmp / "empty" / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no LightningDiT checkpoint"):
        pipeline.sample_npz(str(tmp / "empty"), str(tmp_path / "o"), **kw)
    # A tokenizer with 4 latent channels for a DiT on 8.
    _, export4 = write_export(tmp_path / "export4", channels=4)
    with pytest.raises(ValueError, match="4 latent channels"):
        pipeline.sample_npz(workdir, str(tmp_path / "o"), tokenizer=export4, **kw)
    # FP8 without FP8 tensor cores: refused before anything is written to --out.
    with pytest.raises(ValueError, match="needs GPUs with FP8 tensor cores"):
        pipeline.sample_npz(workdir, str(tmp_path / "fp8"), precision="fp8", **kw)
    assert not (tmp_path / "fp8").exists()
    # Meta without latent stats.
    meta = {"latent_norm": True, "latent_multiplier": 1.0, "step": 2}
    with pytest.raises(ValueError, match="latent_mean"):
        pipeline.latent_stats(meta)
    with pytest.raises(ValueError, match="latent_norm"):
        pipeline.latent_stats({"step": 2})


@DIT_TRAINER_GROUP
def test_load_run_and_generate(run, tmp_path):
    """labels -> images in three lines; load_run reads the run once (EMA model, meta, config)."""
    model, meta, config = pipeline.load_run(run["workdir"])
    assert meta["step"] == 2 and config.trainer == "lightningdit"
    assert model.config.in_channels == 8
    sampler = pipeline.load_sampler(run["workdir"], num_steps=STEPS)
    assert sampler.guidance == sampling.Guidance.from_config(config.sample, num_steps=STEPS)
    images = sampler.generate([1, 2, 3], seed=0)
    assert images.dtype == np.uint8 and images.shape == (3, 16, 16, 3)
    # The demo grid is the same three images side by side.
    from PIL import Image

    grid = np.asarray(
        Image.open(pipeline.demo_grid(run["workdir"], str(tmp_path), [1, 2, 3], num_steps=STEPS))
    )
    np.testing.assert_array_equal(grid[:, : 3 * 16], np.concatenate(list(images), axis=1))
    with pytest.raises(ValueError, match="outside"):
        sampler.generate([10])


def test_guidance_from_config_and_overrides():
    from tests.conftest import load_config

    cfg = load_config("lightningdit_xl_vavae_f16d32.py", "800ep")
    g = sampling.Guidance.from_config(cfg.sample, cfg_scale=None, num_steps=7, method="heun")
    assert g == sampling.Guidance(7, "heun", 0.3, 6.7, 0.125, "first3")
    # The keys launch/sample.py writes into sample_settings.json (reruns compare them).
    assert sorted(g.to_dict()) == sorted(
        ["num_steps", "method", "timestep_shift", "cfg_scale", "cfg_interval_start", "cfg_channels"]
    )
    assert g.replace(cfg_scale=None, cfg_channels="all").cfg_channels == "all"
    with pytest.raises(ValueError, match="cfg_channels"):
        g.replace(cfg_channels="some")
    with pytest.raises(ValueError, match="num_steps"):
        g.replace(num_steps=1)
    with pytest.raises(ValueError, match="Guidance lacks"):
        sampling.Guidance.from_config(dict(cfg.sample, cfg_scal=1.0))


def test_tokenizer_architecture_is_data(tmp_path):
    """The DiT config and meta hold the tokenizer's AutoencoderConfig as a dict; the config-file
    string of older checkpoints still reads."""
    import dataclasses

    from tests.conftest import load_config
    from vavae_jax import train as vae_train

    cfg = load_config("lightningdit_xl_vavae_f16d32.py", "tiny,small")
    cfg.tokenizer.path = str(tmp_path / "other.pt")  # not the latents' own tokenizer
    meta = train.build_meta(
        cfg,
        {"mean": np.zeros(8), "std": np.ones(8)},
        {"shape": [2, 8, 8, 8], "tokenizer": {"path": "/x", "config": {}}},
    )
    f16d32 = vae_model.PRESETS["f16d32"]
    assert meta["tokenizer"]["path"] == str(tmp_path / "other.pt")
    assert pipeline.tokenizer_config(meta["tokenizer"]["config"]) == f16d32
    json.dumps(meta)  # the checkpoint stores it as JSON
    assert pipeline.tokenizer_config(dataclasses.asdict(f16d32), dtype="bfloat16") == (
        dataclasses.replace(f16d32, dtype="bfloat16")
    )
    # Checkpoints written before 2026-12: a config file of this repository's configs/.
    assert pipeline.tokenizer_config("vavae_f16d32.py") == f16d32
    small = load_config("vavae_f16d32.py", "small")
    assert pipeline.tokenizer_config("vavae_f16d32.py:small") == vae_train.autoencoder_config(small)
    with pytest.raises(FileNotFoundError, match="--tokenizer=<a VA-VAE export"):
        pipeline.tokenizer_config("vavae_gone.py")
    # One mapping of a VA-VAE run config to its autoencoder, without importing the trainer.
    for variant in (None, "small"):
        c = load_config("vavae_f16d32.py", variant)
        assert checkpoints.run_autoencoder_config(c) == vae_train.autoencoder_config(c)
    import ml_collections

    old = cfg.to_dict()  # a run config.json of before 2026-12
    old["tokenizer"]["config"] = "vavae_f16d32.py"
    with pytest.raises(ValueError, match="architecture as data"):
        train.build_meta(
            ml_collections.ConfigDict(old), {"mean": [0.0], "std": [1.0]}, {"shape": [2, 8, 8, 8]}
        )


def test_settings_of_earlier_versions_mean_default_precision(tmp_path):
    """sample_settings.json written before `precision` existed matches precision "default" (every
    run sampled so then), and only that."""
    old = {"seed": 0, "num_samples": 4}
    (tmp_path / pipeline.SETTINGS_FILE).write_text(json.dumps(old))
    pipeline._check_settings(str(tmp_path), {**old, "precision": "default"})
    with pytest.raises(ValueError, match="'precision': \\('default', 'fp8'\\)"):
        pipeline._check_settings(str(tmp_path), {**old, "precision": "fp8"})
    # A dtype of "" (files before 2026-12-05) was the run's own compute dtype.
    (tmp_path / pipeline.SETTINGS_FILE).write_text(json.dumps({**old, "dtype": ""}))
    now = {**old, "precision": "default", "dtype": "float32"}
    pipeline._check_settings(str(tmp_path), now, run_dtype="float32")
    with pytest.raises(ValueError, match="'dtype': \\('float32', 'bfloat16'\\)"):
        pipeline._check_settings(str(tmp_path), {**now, "dtype": "bfloat16"}, run_dtype="float32")
