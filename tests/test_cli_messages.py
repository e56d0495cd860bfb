"""What a user reads: short usage errors and --help from the launchers, plain log lines from the
trainers when nobody watches a terminal, and messages that name the flags to pass."""

import json
import logging
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from lightningdit_jax import pipeline
from lightningdit_jax import train as dit_train
from tests.test_lightningdit_train import DIT_TRAINER_GROUP, write_latents
from tests.test_lightningdit_train import tiny_config as dit_tiny_config
from tests.test_vavae_train import tiny_config as vavae_tiny_config
from vavae_jax import lpips as lpips_lib
from vavae_jax import train as vavae_train
from vavae_jax.runtime import checkpoint as ckpt_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = "--config=configs/vavae_f16d32.py:small"


def _cli(script, *args):
    """Runs a launcher the way a user does, from the repository root."""
    return subprocess.run(
        [sys.executable, f"launch/{script}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _lines(text):
    return [line for line in text.splitlines() if line.strip()]


# ---- the front door: flag parsing ------------------------------------------------------------
@pytest.mark.parametrize(
    "script, extra", [("train.py", []), ("compile_check.py", ["--topology=cpu:8"])]
)
def test_mistyped_config_field_is_one_line_naming_the_nearest(script, extra):
    r = _cli(script, SMALL, "--config.optim.lrr=1", *extra)
    assert r.returncode == 2, r.stderr
    lines = _lines(r.stderr)
    assert len(lines) <= 2 and "Traceback" not in r.stderr, r.stderr
    assert "--config.optim.lrr" in lines[0] and "did you mean --config.optim.lr?" in lines[0]


def test_fp8_without_fp8_tensor_cores_is_one_line_before_anything_is_written(tmp_path):
    """precision fp8 on this CPU: train.py and sample.py stop with one line that names the way
    out, and write nothing."""
    dit = "--config=configs/lightningdit_xl_vavae_f16d32.py:small"
    train = _cli("train.py", dit, "--config.model.precision=fp8", f"--workdir={tmp_path / 'w'}")
    sample = _cli(
        "sample.py", f"--workdir={tmp_path}", f"--out={tmp_path / 'o'}", "--precision=fp8"
    )
    for r, script in ((train, "train.py"), (sample, "sample.py")):
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        last = _lines(r.stderr)[-1]
        assert last.startswith(f"launch/{script}: precision 'fp8'") and "fp8_emulated" in last
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_invalid_model_field_is_one_line_before_anything_is_written(tmp_path):
    dit = "--config=configs/lightningdit_xl_vavae_f16d32.py:small"
    r = _cli("train.py", dit, "--config.model.fp8_scaling=late", f"--workdir={tmp_path / 'w'}")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    last = _lines(r.stderr)[-1]
    assert last.startswith("launch/train.py: invalid LightningDiTConfig: fp8_scaling='late'")
    assert "['current', 'delayed']" in last and not (tmp_path / "w").exists()


def test_field_under_another_parent_is_suggested():
    r = _cli("train.py", SMALL, "--config.lr=1")
    assert r.returncode == 2 and "--config.optim.lr" in r.stderr and len(_lines(r.stderr)) <= 2


def test_unknown_variant_is_short_and_names_the_nearest():
    r = _cli("train.py", "--config=configs/vavae_f16d32.py:smal")
    assert r.returncode == 2, r.stderr
    lines = _lines(r.stderr)
    assert len(lines) <= 2 and "FATAL" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "'smal'" in lines[0]
    assert "did you mean --config=configs/vavae_f16d32.py:small?" in r.stderr


def test_help_lists_the_config_fields_and_defaults():
    r = _cli("train.py", SMALL, "--help")
    assert r.returncode == 0, r.stderr
    assert "--workdir" in r.stdout  # the script's own flags still come first
    assert "--config.optim.lr=0.0001" in r.stdout
    assert "--config.teacher.allow_random=True" in r.stdout  # the small variant's value
    assert "--config.global_batch_size=8" in r.stdout
    r = _cli("train.py", "--help")  # no config: say how to list its fields
    assert r.returncode == 0 and "--config=configs/" in r.stdout and "--help" in r.stdout


# ---- logs a person can read -------------------------------------------------------------------
@pytest.mark.slow
@DIT_TRAINER_GROUP
def test_plain_log_lines_completion_and_finished_run(tmp_path, caplog):
    write_latents(tmp_path / "latents")
    cfg = dit_tiny_config(tmp_path / "latents")  # progress_bar=False, log every step, 4 steps
    cfg.mesh.update(dict(data=1, fsdp=1, num_devices=1))  # one device compiles fastest
    cfg.update(dict(sharding="dp", grid_sample_steps=2, image_every_steps=100))
    caplog.set_level(logging.INFO, logger="vavae_jax.runtime.loop")
    workdir = tmp_path / "run"
    assert dit_train.run(cfg, str(workdir))["step"] == 4
    messages = [r.getMessage() for r in caplog.records]
    lines = [m for m in messages if m.startswith("step ")]
    assert [m.split(" (")[0] for m in lines] == [f"step {s}/4" for s in range(1, 5)], messages
    assert "loss " in lines[-1] and "mse " in lines[-1] and "img/s" in lines[1]
    assert "ETA" in lines[1]  # from the second step on (the first one compiles)
    done = [m for m in messages if m.startswith("training complete")]
    assert len(done) == 1 and "step 4/4" in done[0] and str(workdir / "checkpoints") in done[0]

    # A finished run: says so and how to extend it, writes no new events file.
    events = sorted((workdir / "logs").glob("events.out.tfevents.*"))
    caplog.clear()
    assert dit_train.run(cfg, str(workdir))["step"] == 4
    messages = [r.getMessage() for r in caplog.records]
    assert any("run complete: step 4" in m and "--config.total_steps=" in m for m in messages)
    assert not any(m.startswith(("step ", "training complete")) for m in messages)
    assert sorted((workdir / "logs").glob("events.out.tfevents.*")) == events


def test_finished_vavae_run_returns_before_building_anything(sample_images_dir, tmp_path, caplog):
    cfg = vavae_tiny_config(sample_images_dir)  # total_steps=4
    workdir = tmp_path / "vavae"
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False)
    ckpt.save(4, {"x": np.zeros(2, np.float32)})  # any state: only the step is read
    ckpt.close()
    caplog.set_level(logging.INFO, logger="vavae_jax.runtime.loop")
    result = vavae_train.run(cfg, str(workdir))
    assert result["step"] == 4
    assert any("run complete: step 4" in r.getMessage() for r in caplog.records)
    assert not (workdir / "logs").exists()


# ---- messages that name the flags to pass -----------------------------------------------------
def test_missing_weights_messages_name_the_cli_flags(sample_images_dir):
    with pytest.raises(ValueError, match=r"--config\.lpips\.path=.*--config\.lpips\.allow_random"):
        lpips_lib.build_lpips("")
    tcfg = vavae_tiny_config(sample_images_dir).teacher
    tcfg.update(dict(path="", allow_random=False))
    with pytest.raises(ValueError, match=r"--config\.teacher\.path=.*--config\.teacher\.allow_ran"):
        vavae_train.build_teacher(tcfg, "float32")


def test_sample_pointed_at_a_vavae_run_says_what_to_pass(tmp_path):
    workdir = tmp_path / "vavae_run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"trainer": "vavae"}))
    with pytest.raises(ValueError, match="VA-VAE") as err:
        pipeline.check_workdir(str(workdir))
    assert "LightningDiT run folder" in str(err.value) and "--tokenizer" in str(err.value)
