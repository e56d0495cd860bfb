"""The VA-VAE training-parity harness's own side (launch/parity/, issue 18 item 5) on CPU.

The scripts run as subprocesses, as on the GPU: `vavae_make_init.py lists` and `make` (batch
list, image caches, random teacher folder and LPIPS files), then `vavae_ours.py train` from a
converted init for a few steps, and `vavae_compare.py exact` on its log. The init is the official
format built here (the reference's tiny autoencoder fixture, a taming-layout PatchGAN, a VF
projection, logvar), because the reference code, which makes it on the GPU, is not part of
the project. The log must have every term at every step; two of its values are checked against
torch: logvar (it comes from the init) and the discriminator's mean logit on the real images of
step 0 (the init's PatchGAN in training mode on the batch the list names, flips included).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import CHEAP_COMPILE_FLAGS
from tests.test_e2e import _env
from vavae_jax import checkpoints
from vavae_jax import lpips as lpips_lib
from vavae_jax.model import PRESETS

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PARITY = ROOT / "launch" / "parity"
LOGVAR = 0.37
STEPS, BATCH = 3, 4


def _run(script: str, *args: str) -> dict:
    # The cheap compile of conftest.py: the checks below read what the scripts write.
    env = _env()
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} {CHEAP_COMPILE_FLAGS}"
    out = subprocess.run(
        [sys.executable, str(PARITY / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, f"{script} exited {out.returncode}:\n{out.stderr[-5000:]}"
    text = out.stdout.strip()
    return json.loads(text if text.startswith("{\n") else text.splitlines()[-1])


def _patchgan(ndf: int = 64, n_layers: int = 3):
    """taming's NLayerDiscriminator layer list (`main.N` names), initialised as its weights_init."""
    nn = torch.nn
    layers, mult = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)], 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2**n, 8)
        stride = 2 if n < n_layers else 1
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, True),
        ]
    disc = nn.Module()
    disc.main = nn.Sequential(*layers, nn.Conv2d(ndf * mult, 1, 4, 1, 1))
    for m in disc.main:
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return disc


@pytest.mark.slow  # a subprocess chain with a trainer step (about a minute on 2 cores)
def test_our_side_reads_the_batch_list_loads_the_init_and_writes_the_log(tmp_path, fixtures_dir):
    src = fixtures_dir.parent / "data" / "imagenette-224"
    if not src.is_dir():
        pytest.skip(f"{src} is missing")
    data, w = tmp_path / "data", tmp_path / "work"
    lists = _run("vavae_make_init.py", "lists", f"--src={src}", f"--out={data}",
                 "--n_train=12", "--n_val=4", f"--steps={STEPS}", f"--batch={BATCH}")  # fmt: skip
    assert lists["n_train"] == 12
    made = _run("vavae_make_init.py", "make", f"--root={data}", f"--out={w}", "--size=32",
                "--teacher_preset=dinov2-tiny", "--workers=2")  # fmt: skip
    assert {"cache", "teacher", "vgg16_random.pth", "lpips_heads_random.pth"} <= set(made["files"])

    # The init in the official format (what vavae_make_init.py writes with --ref_dir).
    torch.manual_seed(0)
    fx = np.load(fixtures_dir / "vavae_tiny.npz")
    sd = {k[len("state/") :]: torch.from_numpy(fx[k]) for k in fx.files if k.startswith("state/")}
    disc = _patchgan()
    sd.update({f"loss.discriminator.{k}": v for k, v in disc.state_dict().items()})
    sd["linear_proj.weight"] = torch.randn(64, PRESETS["tiny"].embed_dim, 1, 1) * 0.1
    sd["loss.logvar"] = torch.tensor(LOGVAR)
    torch.save({"state_dict": sd}, w / "init.pt")
    checkpoints.convert_official(w / "init.pt", w / "init", PRESETS["tiny"])  # convert.py vavae
    heads = w / "lpips_heads_random.pth"
    lpips_lib.convert_lpips(w / "vgg16_random.pth", heads, w / "lpips.npz")  # convert.py lpips

    log = w / "ours.jsonl"
    summary = _run("vavae_ours.py", "train", "--phase=exact", f"--batches={data}/batches.json",
                   f"--cache={w}/cache", f"--init={w}/init", f"--teacher={w}/teacher",
                   f"--lpips={w}/lpips.npz", "--preset=tiny", "--teacher_preset=dinov2-tiny",
                   "--teacher_resolution=112", f"--steps={STEPS}",
                   "--disc_start=2", f"--out={log}", f"--export_final={w}/final")  # fmt: skip
    assert summary["steps_done"] == STEPS and summary["compute_dtype"] == "float32"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0]["meta"]["phase"] == "exact"
    rows = lines[1:]
    assert [r["step"] for r in rows] == list(range(STEPS))
    keys = ("total_loss", "nll_loss", "rec_loss", "kl_loss", "g_loss", "vf_loss", "d_weight",
            "vf_weight", "disc_factor", "disc_loss", "logits_real", "logits_fake",
            "grad_norm_g", "grad_norm_d", "param_norm_g")  # fmt: skip
    for r in rows:
        assert all(np.isfinite(r[k]) for k in keys), r
        assert r["logvar"] == pytest.approx(LOGVAR)  # from the init (the reference never trains it)
    # disc_start=2 Lightning steps: the GAN joins at iteration 1, as the reference counts.
    assert [r["disc_factor"] for r in rows] == [0.0, 1.0, 1.0]
    assert rows[0]["grad_norm_d"] == 0.0 and rows[1]["grad_norm_d"] > 0.0

    # Step 0's real images through the init's PatchGAN (training mode), in torch.
    batches = json.loads((data / "batches.json").read_text())
    x = np.load(w / "cache" / "train_u8.npy")[batches["indices"][0]]
    flip = np.asarray(batches["flips"][0], bool)
    x[flip] = x[flip][:, :, ::-1]
    x = torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits_real = float(disc.main.train()(x).mean())
    assert rows[0]["logits_real"] == pytest.approx(logits_real, rel=1e-4, abs=1e-6)

    # The trained weights as an export folder, the tokenizer the DiT side reads: the trained
    # generator, not the init, with its logvar, VF projection and PatchGAN.
    final = checkpoints.load_export(w / "final")
    init = checkpoints.load_export(w / "init")
    assert checkpoints.config_mismatch(final["config"], PRESETS["tiny"]) == {}
    assert float(final["logvar"]) == pytest.approx(LOGVAR)
    assert final["linear_proj"].shape == init["linear_proj"].shape
    w_final, w_init = (
        np.asarray(e["autoencoder"].decoder.conv_out.kernel.get_value()) for e in (final, init)
    )
    assert w_final.shape == w_init.shape and not np.array_equal(w_final, w_init)
    assert final["discriminator"].config == init["discriminator"].config
    ae, info = checkpoints.load_autoencoder(w / "final")
    assert checkpoints.config_mismatch(info["config"], PRESETS["tiny"]) == {}

    verdict = _run("vavae_compare.py", "exact", f"--ours={log}", f"--ref={log}")
    assert verdict["ours_vs_ref"]["first_departure"] is None
    assert verdict["ours_vs_ref"]["within_tol"]

    # The free comparison: several runs of ours by tag, evaluations of two sessions merged (the
    # earlier one's tags prefixed), a run that departs in one term found outside the band.
    shifted = w / "shifted.jsonl"
    half_kl = [json.dumps({**r, "kl_loss": 0.5 * r["kl_loss"]}) for r in rows]
    shifted.write_text("\n".join([json.dumps(lines[0]), *half_kl]) + "\n")
    evals = {"now": {"ours_a": 15.0, "ref_a": 14.0, "ref_b": 16.0}, "before": {"ours_a": 20.0}}
    for name, psnr in evals.items():
        results = {f"{tag}_step00002": {"psnr": v} for tag, v in psnr.items()}
        (w / f"eval_{name}.json").write_text(json.dumps({"results": results}))
    free = _run("vavae_compare.py", "free", "--ours", f"ours_a={log}", f"before/ours_a={shifted}",
                "--refs", f"ref_a={log}", f"ref_b={log}", "--eval", f"{w}/eval_now.json",
                f"before:{w}/eval_before.json", "--smooth=1", "--at=2")  # fmt: skip
    same, half = free["ours"]["ours_a"], free["ours"]["before/ours_a"]
    assert all(v["inside"] for v in same["curves"]["3"].values())
    assert (
        not half["curves"]["3"]["kl_loss"]["inside"] and half["curves"]["3"]["rec_loss"]["inside"]
    )
    assert same["metrics"]["2"]["psnr"]["inside"] and not half["metrics"]["2"]["psnr"]["inside"]
