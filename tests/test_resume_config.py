"""Resuming with a changed config (vavae_jax.runtime.resume), both trainers: an architecture or
data-pipeline change is one `ResumeConfigError` raised before any Orbax restore (no traceback
spam from Orbax's threads); any other change is logged old -> new, appended to
config_history.jsonl and written to config.json."""

import json
import logging
import pathlib
import shutil
import subprocess
import sys

import pytest

from lightningdit_jax import train as dit_train
from tests.test_lightningdit_train import DIT_TRAINER_GROUP, write_latents
from tests.test_lightningdit_train import tiny_config as dit_tiny_config
from tests.test_vavae_train import VAVAE_TRAINER_GROUP
from tests.test_vavae_train import tiny_config as vae_tiny_config
from vavae_jax import train as vae_train
from vavae_jax.runtime import resume

ORBAX_SPAM = "Event loop is closed"


def _vae_config(sample_images_dir, **overrides):
    """tests/test_vavae_train.py's tiny config (its step is compiled once for all the VA-VAE
    trainer tests), one step per checkpoint."""
    base = dict(total_steps=1, checkpoint_every_steps=1, image_every_steps=1)
    return vae_tiny_config(sample_images_dir, **{**base, **overrides})


def _dit_config(data_dir, **overrides):
    c = dit_tiny_config(data_dir)
    c.total_steps = 1
    c.checkpoint_every_steps = 1
    c.image_every_steps = 1
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


@pytest.fixture(scope="module")
def vae_run(sample_images_dir, tmp_path_factory):
    """A VA-VAE workdir checkpointed at step 1, and the config builder."""
    workdir = tmp_path_factory.mktemp("vae") / "run"
    vae_train.run(_vae_config(sample_images_dir), str(workdir))
    return workdir, lambda **o: _vae_config(sample_images_dir, **o)


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    """A LightningDiT workdir checkpointed at step 1, and the config builder."""
    root = tmp_path_factory.mktemp("dit")
    write_latents(root / "latents")
    dit_train.run(_dit_config(root / "latents"), str(root / "run"))
    return root / "run", lambda **o: _dit_config(root / "latents", **o)


TRAINERS = {"vavae": (vae_train, "vae_run"), "lightningdit": (dit_train, "dit_run")}


def _copy(run, tmp_path):
    workdir, make_config = run
    shutil.copytree(workdir, tmp_path / "run")
    return tmp_path / "run", make_config


def _history(workdir):
    return [json.loads(line) for line in (workdir / resume.HISTORY_FILE).read_text().splitlines()]


def _config_json(workdir):
    return json.loads((workdir / "config.json").read_text())


# ---- refused: the architecture ---------------------------------------------------------------
@pytest.mark.parametrize(
    "trainer, field, old, new",
    [
        # a listed architecture field: the autoencoder's width
        pytest.param("vavae", "model.ch", 32, 64, marks=[pytest.mark.slow, VAVAE_TRAINER_GROUP]),
        # not listed (a dropout probability), yet 0 removes the null-label row: the state says so
        pytest.param("lightningdit", "model.class_dropout_prob", 0.1, 0.0, marks=DIT_TRAINER_GROUP),
    ],
)
def test_architecture_change_is_one_clear_error(
    trainer, field, old, new, request, tmp_path, caplog, capfd
):
    module, fixture = TRAINERS[trainer]
    workdir, make_config = _copy(request.getfixturevalue(fixture), tmp_path)
    before = (workdir / "config.json").read_text(), _history(workdir)
    caplog.set_level(logging.INFO)
    with pytest.raises(resume.ResumeConfigError) as err:
        module.run(make_config(**{field: new, "total_steps": 2}), str(workdir))
    msg = str(err.value)
    assert f"{field}: {old} -> {new}" in msg, msg
    assert "new --workdir" in msg and "strict" not in msg, msg
    assert len(msg.splitlines()) <= 10, msg
    captured = capfd.readouterr()
    assert ORBAX_SPAM not in captured.out + captured.err + caplog.text
    assert "Traceback" not in captured.err + caplog.text
    # Nothing recorded for a refused invocation.
    assert ((workdir / "config.json").read_text(), _history(workdir)) == before
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


@DIT_TRAINER_GROUP
def test_data_pipeline_change_grain_cannot_restore_is_one_clear_error(
    dit_run, tmp_path, caplog, capfd
):
    # The LightningDiT sampler's per-host batch is part of grain's iterator state.
    workdir, make_config = _copy(dit_run, tmp_path)
    with pytest.raises(resume.ResumeConfigError) as err:
        dit_train.run(make_config(global_batch_size=16, total_steps=2), str(workdir))
    msg = str(err.value)
    assert "global_batch_size: 8 -> 16" in msg and "grain" in msg and "new --workdir" in msg
    captured = capfd.readouterr()
    assert ORBAX_SPAM not in captured.out + captured.err + caplog.text


@DIT_TRAINER_GROUP
def test_launcher_prints_the_refusal_without_a_traceback(dit_run, tmp_path):
    """launch/train.py turns the ResumeConfigError into its message alone (exit status 1)."""
    workdir, _ = _copy(dit_run, tmp_path)
    r = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--config=configs/lightningdit_xl_vavae_f16d32.py:tiny,small",
            f"--config.data.data_dir={dit_run[0].parent / 'latents'}",
            "--config.model.class_dropout_prob=0.0",
            f"--workdir={workdir}",
        ],
        cwd=pathlib.Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "launch/train.py: cannot resume" in r.stderr and "new --workdir" in r.stderr


# ---- accepted: logged and recorded -----------------------------------------------------------
@pytest.mark.parametrize(
    "trainer",
    [
        pytest.param("vavae", marks=[pytest.mark.slow, VAVAE_TRAINER_GROUP]),
        pytest.param("lightningdit", marks=DIT_TRAINER_GROUP),
    ],
)
def test_lr_change_is_logged_recorded_and_in_config_json(trainer, request, tmp_path, caplog):
    module, fixture = TRAINERS[trainer]
    workdir, make_config = _copy(request.getfixturevalue(fixture), tmp_path)
    first = _history(workdir)
    assert len(first) == 1 and first[0]["step"] == 0
    old_lr = first[0]["config"]["optim"]["lr"]
    assert _config_json(workdir) == first[0]["config"]
    caplog.set_level(logging.INFO)
    result = module.run(make_config(**{"optim.lr": 0.01, "total_steps": 2}), str(workdir))
    assert result["step"] == 2
    logged = [r.getMessage() for r in caplog.records if r.name == resume.__name__]
    assert f"  optim.lr: {old_lr} -> 0.01" in logged, logged
    assert "  total_steps: 1 -> 2" in logged, logged
    history = _history(workdir)
    assert len(history) == 2 and history[1]["step"] == 1
    assert history[1]["changes"] == {"optim.lr": [old_lr, 0.01], "total_steps": [1, 2]}
    assert _config_json(workdir)["optim"]["lr"] == 0.01
    assert _config_json(workdir)["total_steps"] == 2


@DIT_TRAINER_GROUP
def test_fp8_precision_resumes_a_bf16_run_but_delayed_scaling_is_refused(dit_run, tmp_path):
    """Current FP8 scaling keeps the state as it is: a run trained in the default precision
    resumes in FP8. Delayed scaling adds amax histories to the state: refused, named."""
    workdir, make_config = _copy(dit_run, tmp_path)
    fp8 = {"model.precision": "fp8_emulated", "total_steps": 2}
    with pytest.raises(resume.ResumeConfigError) as err:
        dit_train.run(make_config(**fp8, **{"model.fp8_scaling": "delayed"}), str(workdir))
    msg = str(err.value)
    assert "model.fp8_scaling: 'current' -> 'delayed'" in msg and "fp8/blocks" in msg, msg
    result = dit_train.run(make_config(**fp8), str(workdir))
    assert result["step"] == 2
    assert _history(workdir)[1]["changes"]["model.precision"] == ["default", "fp8_emulated"]


# ---- the field classification and the diff ----------------------------------------------------
def test_config_diff_and_architecture_fields():
    old = {"model": {"ch": 32, "ch_mult": [1, 2]}, "optim": {"lr": 1e-4}, "seed": 0}
    new = {"model": {"ch": 32, "ch_mult": [1, 2, 2]}, "optim": {"lr": 1e-3}, "trainer": "x"}
    assert resume.config_diff(old, new) == {
        "model.ch_mult": ([1, 2], [1, 2, 2]),
        "optim.lr": (1e-4, 1e-3),
        "seed": (0, resume.ABSENT),
        "trainer": (resume.ABSENT, "x"),
    }
    for field in ("model.ch", "model.preset", "ema.enabled", "use_vf", "loss.disc_ndf"):
        assert resume.is_architecture(field), field
    for field in ("model.remat_policy", "model.scan_layers", "optim.lr", "total_steps"):
        assert not resume.is_architecture(field), field
