"""launch/convert.py and launch/evaluate.py end to end (as subprocesses) on tiny random-weight
checkpoints, and the converter's refusals (vavae_jax.checkpoints.convert_official).

The official VA-VAE `.pt` is rebuilt here in its real format (Lightning `{"state_dict": ...}`)
from the reference fixture's autoencoder plus random `linear_proj.weight`, `loss.logvar`, a
taming-layout PatchGAN, the lpips package's LPIPS (taming's names) and a tiny timm DINOv2.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_e2e import _env
from vavae_jax import checkpoints, convert
from vavae_jax.model import PRESETS
from vavae_jax.runtime.torch_names import ConversionError, flat_params

torch = pytest.importorskip("torch")  # conversion needs the optional torch extra
# One xdist worker runs the module: the official checkpoint and export fixtures are module-scoped
# (16 s to build on 2 cores) and would otherwise be built on each worker.
pytestmark = pytest.mark.xdist_group("convert_cli")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEACHER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56)


def _cli(script: str, *args: str) -> dict:
    """Runs `python launch/<script> args` as a user would; its printed JSON summary."""
    out = subprocess.run(
        [sys.executable, f"launch/{script}", *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, f"{script} exited {out.returncode}:\n{out.stderr[-6000:]}"
    return json.loads(out.stdout)


def _nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


def _taming_discriminator(ndf: int = 8, n_layers: int = 2):
    """taming's NLayerDiscriminator layer list (same `main.N` indices), random BN statistics."""
    nn = torch.nn
    layers = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers):
        prev, mult = mult, min(2**n, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, True),
        ]
    prev, mult = mult, min(2**n_layers, 8)
    layers += [
        nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=False),
        nn.BatchNorm2d(ndf * mult),
        nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf * mult, 1, 4, 1, 1),
    ]
    disc = nn.Module()
    disc.main = nn.Sequential(*layers)
    with torch.no_grad():
        for m in disc.main:
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return disc.eval()


@pytest.fixture(scope="module")
def official(tmp_path_factory, fixtures_dir):
    """A random-weight official-format `.pt` and the torch modules it was made from."""
    lpips_pkg = pytest.importorskip("lpips")
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    fx = np.load(fixtures_dir / "vavae_tiny.npz")
    meta = json.loads(str(fx["meta_json"]))
    ae_state = {k[len("state/") :]: fx[k] for k in fx.files if k.startswith("state/")}
    cfg = PRESETS["tiny"]
    disc = _taming_discriminator()
    perceptual = lpips_pkg.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    teacher = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        num_classes=0,
        embed_dim=TEACHER["hidden_size"],
        depth=TEACHER["num_hidden_layers"],
        num_heads=TEACHER["num_attention_heads"],
        img_size=TEACHER["image_size"],
    ).eval()
    with torch.no_grad():  # layer scales start at 1e-5: make them matter
        for name, p in teacher.named_parameters():
            if name.endswith(".gamma"):
                p.uniform_(0.5, 1.5)
    sd = {k: torch.from_numpy(np.asarray(v)) for k, v in ae_state.items()}
    sd["linear_proj.weight"] = torch.randn(TEACHER["hidden_size"], cfg.embed_dim, 1, 1)
    sd["loss.logvar"] = torch.tensor(0.37)
    sd.update({f"loss.discriminator.{k}": v for k, v in disc.state_dict().items()})
    # The lpips package also lists its heads under `lins.K`; taming's LPIPS has `linK` only.
    taming_lpips = {k: v for k, v in perceptual.state_dict().items() if not k.startswith("lins.")}
    sd.update({f"loss.perceptual_loss.{k}": v for k, v in taming_lpips.items()})
    sd.update({f"foundation_model.model.{k}": v for k, v in teacher.state_dict().items()})
    path = tmp_path_factory.mktemp("official") / "vavae-tiny.pt"
    torch.save({"state_dict": sd, "global_step": 7}, path)
    return dict(
        path=path, fx=fx, meta=meta, cfg=cfg, ae_state=ae_state, sd=sd,
        disc=disc, perceptual=perceptual, teacher=teacher,
    )  # fmt: skip


@pytest.fixture(scope="module")
def export_dir(official, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "vavae"
    summary = _cli(
        "convert.py",
        "vavae",
        f"--pt={official['path']}",
        f"--out={out}",
        "--preset=tiny",
        f"--teacher_config={json.dumps(TEACHER)}",
    )
    assert summary == checkpoints.read_export_meta(out)
    assert sorted(summary["present"]) == sorted(
        ["autoencoder", "linear_proj", "logvar", "discriminator", "lpips", "teacher"]
    )
    assert summary["absent"] == []
    return out


def test_convert_cli_roundtrip_autoencoder(official, export_dir):
    from flax import nnx

    @nnx.jit  # one compile serves both models (same graph): not one per primitive
    def encode_decode(ae, x):
        post = ae.encode(x)
        return post.mean, post.logvar, ae.decode(post.mode())

    fx = official["fx"]
    loaded = checkpoints.load_export(export_dir)
    assert loaded["config"] == official["cfg"]
    direct = convert.from_torch_state_dict(official["ae_state"], official["cfg"])
    x = jnp.asarray(_nhwc(fx["x"]))
    mean, logvar, rec = encode_decode(loaded["autoencoder"], x)
    ref_mean, ref_logvar, ref_rec = encode_decode(direct, x)
    np.testing.assert_array_equal(np.asarray(mean), np.asarray(ref_mean))
    np.testing.assert_array_equal(np.asarray(logvar), np.asarray(ref_logvar))
    np.testing.assert_array_equal(np.asarray(rec), np.asarray(ref_rec))
    # ... and the reference's own outputs (the fixture).
    assert _rel(mean, _nhwc(fx["mean"])) < 1e-5
    assert _rel(logvar, _nhwc(fx["logvar"])) < 1e-5
    assert _rel(rec, _nhwc(fx["rec_of_mean"])) < 1e-5
    w = official["sd"]["linear_proj.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(loaded["linear_proj"]), w.transpose(2, 3, 1, 0))
    assert float(loaded["logvar"]) == pytest.approx(0.37)
    meta = json.loads((export_dir / checkpoints.EXPORT_JSON).read_text())
    assert meta["teacher_dim"] == TEACHER["hidden_size"]
    assert meta["discriminator_config"]["ndf"] == 8
    assert meta["discriminator_config"]["n_layers"] == 2
    # Some groups only: the same autoencoder; the teacher, PatchGAN and LPIPS are not read.
    part = checkpoints.load_export(export_dir, groups=("autoencoder", "logvar"))
    assert part["teacher"] is None and part["discriminator"] is None and part["lpips"] is None
    assert part["linear_proj"] is None and float(part["logvar"]) == pytest.approx(0.37)
    got, want = flat_params(part["autoencoder"]), flat_params(loaded["autoencoder"])
    for k in want:
        np.testing.assert_array_equal(got[k].get_value(), want[k].get_value(), k)
    with pytest.raises(ValueError, match="unknown groups"):
        checkpoints.load_export(export_dir, groups=("vae",))


@pytest.mark.slow
def test_convert_cli_roundtrip_losses_and_teacher(official, export_dir):
    loaded = checkpoints.load_export(export_dir)
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    b = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want_d = official["disc"].main(torch.from_numpy(a)).numpy()
        want_p = official["perceptual"](torch.from_numpy(a), torch.from_numpy(b)).numpy()
    got_d = loaded["discriminator"](jnp.asarray(_nhwc(a)), train=False)
    assert _rel(got_d, _nhwc(want_d)) < 1e-5
    got_p = loaded["lpips"](jnp.asarray(_nhwc(a)), jnp.asarray(_nhwc(b)))
    assert _rel(np.reshape(got_p, -1), want_p.reshape(-1)) < 1e-5
    s = TEACHER["image_size"]
    img = rng.uniform(-1, 1, (2, 3, s, s)).astype(np.float32)
    with torch.no_grad():
        want_t = official["teacher"].forward_features(torch.from_numpy(img)).numpy()
    got_t = loaded["teacher"](jnp.asarray(_nhwc(img)))
    assert _rel(got_t, want_t) < 1e-4


def test_init_from_official_and_export(official, export_dir, monkeypatch):
    from flax import nnx

    from vavae_jax.discriminator import DiscriminatorConfig, NLayerDiscriminator
    from vavae_jax.train_step import Generator

    cfg = official["cfg"]
    ref = convert.from_torch_state_dict(official["ae_state"], cfg)
    want_d = flat_params(checkpoints.load_export(export_dir)["discriminator"])
    reads = []
    load_torch_file = convert.load_torch_file
    monkeypatch.setattr(convert, "load_torch_file", lambda p: reads.append(p) or load_torch_file(p))
    gen = Generator(cfg, TEACHER["hidden_size"], 0.0, rngs=nnx.Rngs(1))
    for source in (official["path"], export_dir):
        # Zeros first, so that each source has to set every weight.
        nnx.update(gen, jax.tree.map(jnp.zeros_like, nnx.state(gen, nnx.Param)))
        disc = NLayerDiscriminator(DiscriminatorConfig(ndf=8, n_layers=2), rngs=nnx.Rngs(1))
        nnx.update(disc, jax.tree.map(jnp.zeros_like, nnx.state(disc)))
        reads.clear()
        # The generator and the PatchGAN (weights and BatchNorm statistics), as the reference's
        # init_from_ckpt loads them; an official .pt is read (and converted) once.
        assert checkpoints.load_init_from(gen, disc, source, cfg)
        assert len(reads) == (1 if source == official["path"] else 0), reads
        got = flat_params(gen.autoencoder, nnx.Param)
        want = flat_params(ref, nnx.Param)
        assert set(got) == set(want)
        for k, v in want.items():
            np.testing.assert_array_equal(np.asarray(got[k].get_value()), np.asarray(v.get_value()))
        w = official["sd"]["linear_proj.weight"].numpy().transpose(2, 3, 1, 0)
        np.testing.assert_array_equal(np.asarray(gen.linear_proj.kernel.get_value()), w)
        assert float(gen.logvar.get_value()) == pytest.approx(0.37)
        got_d = flat_params(disc)
        assert set(got_d) == set(want_d) and any("mean" in k for k in got_d)
        for k, v in want_d.items():
            assert np.any(np.asarray(v.get_value()) != 0), k  # not a trivial match
            np.testing.assert_array_equal(np.asarray(got_d[k].get_value()), v.get_value(), k)
    # Each half alone, as the library offers it.
    nnx.update(disc, jax.tree.map(jnp.zeros_like, nnx.state(disc)))
    assert checkpoints.load_into_discriminator(disc, official["path"], cfg)
    for k, v in want_d.items():
        np.testing.assert_array_equal(np.asarray(flat_params(disc)[k].get_value()), v.get_value())
    nnx.update(gen, jax.tree.map(jnp.zeros_like, nnx.state(gen, nnx.Param)))
    checkpoints.load_into_generator(gen, export_dir, cfg)
    assert float(gen.logvar.get_value()) == pytest.approx(0.37)
    wider = NLayerDiscriminator(DiscriminatorConfig(ndf=16, n_layers=2), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"PatchGAN \{'input_nc': 3, 'ndf': 8"):
        checkpoints.load_into_discriminator(wider, export_dir, cfg)

    other = dataclasses.replace(cfg, z_channels=4, embed_dim=4)
    abstract = nnx.eval_shape(lambda: Generator(other, None, 0.0, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"'z_channels': \(8, 4\)"):
        checkpoints.load_into_generator(abstract, export_dir, other)
    with pytest.raises(ConversionError, match="shape mismatches"):
        checkpoints.load_into_generator(abstract, official["path"], other)


@pytest.mark.slow
def test_convert_rejects_other_models_and_missing_files(official, tmp_path):
    def convert_official(pt: str, out: str, preset: str = "f16d32"):  # the CLI's default
        return checkpoints.convert_official(tmp_path / pt, tmp_path / out, PRESETS[preset])

    dit = {"model": {"x_embedder.proj.weight": torch.zeros(8, 4, 1, 1)}, "ema": {}}
    torch.save(dit, tmp_path / "dit.pt")
    with pytest.raises(ConversionError, match="not a VA-VAE checkpoint.*state_dict"):
        convert_official("dit.pt", "o1", "tiny")
    flat = {"state_dict": {"blocks.0.attn.qkv.weight": torch.zeros(3, 2)}}
    torch.save(flat, tmp_path / "flat.pt")
    with pytest.raises(ConversionError, match="no autoencoder weights"):
        convert_official("flat.pt", "o2")
    # Without the big groups (LPIPS, teacher): they are then reported absent, not invented.
    big = ("loss.perceptual_loss.", "foundation_model.")
    sd = {k: v for k, v in official["sd"].items() if not k.startswith(big)}
    sd["loss.mystery"] = torch.zeros(3)
    del sd["decoder.conv_out.bias"]
    torch.save({"state_dict": sd}, tmp_path / "extra.pt")
    with pytest.raises(ConversionError, match="(?s)loss.mystery.*decoder.conv_out.bias") as err:
        convert_official("extra.pt", "o3")
    assert "[autoencoder]" in str(err.value)
    with pytest.raises(FileNotFoundError):
        convert_official("nope.pt", "o4")
    with pytest.raises(FileNotFoundError, match="not a VA-VAE export"):
        checkpoints.load_export(tmp_path)


@pytest.mark.slow
def test_evaluate_tokenizer_cli(export_dir, sample_images_dir, tmp_path):
    from vavae_jax.metrics import FIDInceptionV3, save_inception

    inception = save_inception(FIDInceptionV3(seed=0), tmp_path / "inception.npz")
    out = tmp_path / "eval.json"
    result = _cli(
        "evaluate.py",
        f"--tokenizer={export_dir}",
        "--data.source=folder",
        f"--data.root={sample_images_dir}",
        "--data.resolution=32",
        "--data.max_records=4",
        "--batch_size=2",
        f"--inception={inception}",
        "--inception_batch_size=4",
        f"--output={out}",
        "--no_progress",
    )
    assert json.loads(out.read_text()) == result
    assert result["num_images"] == 4
    for name in ("psnr", "ssim", "lpips", "rfid"):
        assert np.isfinite(result[name]), (name, result)
    assert result["psnr"] > 0 and -1 <= result["ssim"] <= 1 and result["lpips"] >= 0
