"""The README's "whole chain on a CPU in minutes", command for command, and its pieces.

`test_readme_small_chain` parses the bash block of that README section and runs each command as
written (`python3` is this interpreter; `runs/small_chain` becomes a temporary folder), then checks
that the small configs fit each other and that every stage wrote what the next one reads. The
other tests are quick: the presets `small` picks or keeps, checkpoint retention, and the
`--inception=random` smoke mode of vavae_jax.metrics.evaluate with no padded Inception batches.
"""

from __future__ import annotations

import json
import pathlib
import shlex

import ml_collections
import numpy as np
import pytest

from tests.conftest import load_config
from tests.test_e2e import _Stage

ROOT = pathlib.Path(__file__).resolve().parents[1]
README_MARKER = "<!-- tests/test_small_chain.py runs this block"
RUNS = "runs/small_chain"


def readme_chain_commands() -> list[list[str]]:
    """The commands of the README's small-chain block, continuation lines joined, split."""
    text = (ROOT / "README.md").read_text()
    if README_MARKER not in text:
        raise AssertionError(f"README.md lost the marked block ({README_MARKER!r})")
    block = text.split(README_MARKER, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.startswith("#")]


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

    # Samples against an image folder, also random: labelled the same way.
    samples = tmp_path / "samples.npz"
    rng = np.random.default_rng(0)
    np.savez(samples, arr_0=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    rows.clear()
    result = evaluate.evaluate_samples(
        samples, sample_images_dir, "random", num_splits=2, ref_max_records=4
    )
    assert result["inception"] == inception.RANDOM_LABEL and result["num_samples"] == 6
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    assert {r[0] for r in rows} == {6}  # one batch shape for the reference and the samples


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


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
def test_readme_small_chain(sample_images_dir, tmp_path):
    from lightningdit_jax import data as latent_data
    from lightningdit_jax.train import load_meta
    from vavae_jax.metrics.inception import RANDOM_LABEL

    commands = readme_chain_commands()
    assert [c[1] for c in commands] == [
        "launch/train.py",
        "launch/extract_latents.py",
        "launch/train.py",
        "launch/sample.py",
        "launch/evaluate.py",
        "launch/evaluate.py",
    ]
    assert all(c[0] == "python3" for c in commands)
    assert not any(a.startswith("--worker_count") for c in commands for a in c)
    runs = tmp_path / "small_chain"
    logs = tmp_path / "logs"
    logs.mkdir()
    times: dict[str, float] = {}
    for i, cmd in enumerate(commands):
        args = [a.replace(RUNS, str(runs)) for a in cmd[2:]]
        name = f"{i}_{pathlib.Path(cmd[1]).stem}"
        stage = _Stage(name, pathlib.Path(cmd[1]).name, args, logs, times)
        stage.wait()
    print("\nREADME small chain stage times (s):", {k: round(v, 1) for k, v in times.items()})

    index = latent_data.load_index(str(runs / "latents"))
    assert index["shape"] == [2, 16, 16, 32] and index["num_classes"] <= 1000
    assert index["num_records"] > 0
    meta = load_meta(str(runs / "dit"))
    assert meta["model_preset"] == "tiny/2" and meta["step"] == 40
    assert meta["latent_shape"] == [16, 16, 32]
    with np.load(runs / "samples" / "samples_32.npz") as f:
        assert f["arr_0"].shape == (32, 64, 64, 3) and f["arr_0"].dtype == np.uint8
    fid = json.loads((runs / "fid.json").read_text())
    assert fid["inception"] == RANDOM_LABEL and fid["num_samples"] == 32
    assert np.isfinite(fid["fid"]) and np.isfinite(fid["inception_score"])
    tok = json.loads((runs / "tokenizer.json").read_text())
    assert tok["inception"] == RANDOM_LABEL and tok["num_images"] == 32
    assert np.isfinite(tok["rfid"]) and tok["psnr"] > 0
    if index["num_records"] != 1000:
        pytest.fail(
            f"extract_latents kept {index['num_records']} of the 1000 sample images (the known "
            f"record loss with grain workers); the rest of the chain ran"
        )
