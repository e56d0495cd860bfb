"""The pieces of the README's "whole chain on a CPU in minutes" (tests/test_e2e.py runs the
chain itself): the small configs fit each other, the presets `small` picks or keeps, checkpoint
retention, and the `--inception=random` smoke mode of vavae_jax.metrics.evaluate with no padded
Inception batches."""

from __future__ import annotations

import pathlib

import ml_collections
import numpy as np
import pytest

from tests.conftest import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(name: str, arg: str) -> ml_collections.ConfigDict:
    return load_config(f"{name}.py", arg)


def test_small_configs_fit_each_other():
    from lightningdit_jax.model import PRESETS

    vae = _config("vavae_f16d32", "small")
    factor = 2 ** (len(vae.model.ch_mult) - 1)
    latent = (vae.model.resolution // factor,) * 2 + (vae.model.embed_dim,)
    dit = PRESETS[_config("lightningdit_xl_vavae_f16d32", "small").model.preset]
    assert latent == (dit.input_size, dit.input_size, dit.in_channels) == (16, 16, 32)
    assert dit.num_classes == 1000  # one sample image of each ImageNet class


@pytest.mark.parametrize("arg", ["B/2,small", "small,B/2", "tiny,small", "XL/1,800ep,small"])
def test_small_keeps_an_explicit_preset(arg):
    c = _config("lightningdit_xl_vavae_f16d32", arg)
    assert c.model.preset == next(p for p in arg.split(",") if p not in ("small", "800ep"))
    assert c.global_batch_size == 16  # the rest is shrunk


def test_two_presets_are_an_error():
    with pytest.raises(ValueError, match="two model presets"):
        _config("lightningdit_xl_vavae_f16d32", "B/2,tiny")


@pytest.mark.parametrize("name", ["vavae_f16d32", "lightningdit_xl_vavae_f16d32"])
def test_checkpoints_keep_the_last_few(name, tmp_path):
    """The trainers build their Checkpointer with max_to_keep=config.keep_checkpoints (3)."""
    import jax.numpy as jnp

    from vavae_jax.runtime import checkpoint as ckpt_lib

    keep = _config(name, "small").keep_checkpoints
    assert keep == 3
    ckpt = ckpt_lib.Checkpointer(tmp_path, max_to_keep=keep)
    for step in range(1, 6):
        ckpt.save(step, {"w": jnp.full((4,), step, jnp.float32)}, force=True)
    ckpt.wait()
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [3, 4, 5]
    ckpt.close()


@pytest.mark.slow
def test_evaluate_random_inception_is_labelled_and_unpadded(
    sample_images_dir, tmp_path, monkeypatch, caplog
):
    """inception="random" runs offline, warns, and says so in the result; 5 images in data
    batches of 2 (the last one masked) cost exactly 5 + 5 Inception rows in one compiled shape."""
    from tests.test_sample import write_export
    from vavae_jax.metrics import evaluate, inception

    export = tmp_path / "vae"
    write_export(export)  # a random 16 px VA-VAE export
    rows: list[tuple[int, ...]] = []
    features = inception._features

    def counting(graphdef, state, images):
        rows.append(tuple(images.shape))
        return features(graphdef, state, images)

    monkeypatch.setattr(inception, "_features", counting)
    data_config = evaluate.eval_data_config(
        root=str(sample_images_dir), resolution=32, max_records=5
    )
    result = evaluate.evaluate_tokenizer(
        export, data_config, batch_size=2, inception="random", progress=False
    )
    assert (
        result["inception"] == inception.RANDOM_LABEL == "RANDOM WEIGHTS: numbers are meaningless"
    )
    assert result["num_images"] == 5 and np.isfinite(result["rfid"])
    assert "RANDOM weights" in caplog.text and "MEANINGLESS" in caplog.text
    assert rows == [(5, 32, 32, 3)] * 2  # originals, reconstructions; no padding to 100

    # Samples against an image folder, also random: labelled the same way. 5 samples of 32 px:
    # the Inception shape compiled above serves them.
    samples = tmp_path / "samples.npz"
    rng = np.random.default_rng(0)
    np.savez(samples, arr_0=rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    rows.clear()
    result = evaluate.evaluate_samples(
        samples, sample_images_dir, "random", num_splits=2, ref_max_records=4
    )
    assert result["inception"] == inception.RANDOM_LABEL and result["num_samples"] == 5
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    assert {r[0] for r in rows} == {5}  # one batch shape for the reference and the samples


def test_inception_batch_is_even_and_capped():
    from vavae_jax.metrics.evaluate import inception_batch, record_limit

    assert inception_batch(64, 100) == 64
    assert inception_batch(128, 100) == 64
    assert inception_batch(50_000, 100) == 100
    assert inception_batch(0, 100) == 1
    with pytest.raises(ValueError, match="must be positive"):
        inception_batch(10, 0)
    assert record_limit(-1, -1) == -1 and record_limit(5, -1) == 5
    assert record_limit(-1, 3) == 3 and record_limit(5, 3) == 3 and record_limit(2, 3) == 2
