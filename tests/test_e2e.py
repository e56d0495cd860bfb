"""End to end on CPU through the launch scripts a user runs, each as its own process: the
README's "whole chain on a CPU in minutes", command for command (`runs/small_chain` becomes a
temporary folder):

  sample images -> launch/train.py (small VA-VAE) -> launch/extract_latents.py (reads the VA-VAE
  workdir, default grain workers) -> launch/train.py (small LightningDiT on the latents) ->
  launch/sample.py (ADM .npz) -> launch/evaluate.py (FID / IS, and the tokenizer's PSNR / SSIM /
  rFID, both with the labelled random-weight Inception)

plus a demo grid of launch/sample.py. Stages that do not depend on each other run side by side.
Every stage's output is written to `logs/<stage>.log`; a failed stage fails the test with its
command and the tail of that log. Stage times are printed (`pytest -s`).
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from PIL import Image

from lightningdit_jax import data as latent_data

ROOT = pathlib.Path(__file__).resolve().parents[1]

STAGE_TIMEOUT_S = 900


def _env() -> dict[str, str]:
    """The user's environment on CPU: one device (not the 8 fake ones of conftest)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


class _Stage:
    """One launch script as a subprocess, its stdout and stderr in `logs/<name>.log`."""

    def __init__(self, name: str, script: str, args: list[str], log_dir: pathlib.Path, times):
        self.name, self.times = name, times
        self.cmd = [sys.executable, f"launch/{script}", *args]
        self.log = log_dir / f"{name}.log"
        self._file = self.log.open("wb")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, env=_env(), stdout=self._file, stderr=subprocess.STDOUT
        )
        # Records when the process ends, not when the test gets round to waiting for it.
        self._reaper = threading.Thread(target=self._reap, daemon=True)
        self._reaper.start()

    def _reap(self) -> None:
        self.proc.wait()
        self.times[self.name] = time.perf_counter() - self.t0

    def wait(self) -> str:
        """Waits; fails the test with the log's tail unless the script exited with 0."""
        self._reaper.join(timeout=STAGE_TIMEOUT_S)
        if self._reaper.is_alive():
            self.kill()
        self._file.close()
        rc = self.proc.returncode
        text = self.log.read_text(errors="replace")
        if rc != 0:
            lines = text.replace("\r", "\n").splitlines()
            tail = "\n".join(lines[-60:])[-6000:]
            why = f"exit {rc}" if rc > 0 else f"killed: timeout ({STAGE_TIMEOUT_S} s) or memory"
            pytest.fail(
                f"stage {self.name!r} failed ({why}):\n  {' '.join(self.cmd)}\n"
                f"--- last lines of {self.log} ---\n{tail}",
                pytrace=False,
            )
        return text

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._file.close()


def _flat(tree) -> dict[str, np.ndarray]:
    def name(path):
        return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)

    return {name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_trained_weights_loaded(vae_dir: pathlib.Path, steps: int) -> None:
    """extract_latents' loader returns the autoencoder weights of the VA-VAE checkpoint."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from vavae_jax import checkpoints

    ae, ref = checkpoints.load_trainer_workdir(vae_dir)
    assert ref["step"] == steps and ref["weights"] == "gen"
    # evaluate.py's route (checkpoints.load_autoencoder) reads the same run.
    same, groups = checkpoints.load_autoencoder(vae_dir)
    assert groups["trainer_run"] == groups["ref"] == ref
    jax.tree.map(
        np.testing.assert_array_equal,
        nnx.to_pure_dict(nnx.state(same, nnx.Param)),
        nnx.to_pure_dict(nnx.state(ae, nnx.Param)),
    )
    saved = ocp.PyTreeCheckpointer().restore(vae_dir / "checkpoints" / str(steps) / "state")
    saved = _flat(saved["gen"]["autoencoder"])  # Orbax keeps nnx.Param's `value` level
    loaded = {f"{k}/value": v for k, v in _flat(nnx.to_pure_dict(nnx.state(ae, nnx.Param))).items()}
    assert loaded.keys() == saved.keys()
    for k, v in loaded.items():
        np.testing.assert_array_equal(v, saved[k], err_msg=k)


README_MARKER = "<!-- tests/test_e2e.py runs this block"
RUNS = "runs/small_chain"


def readme_chain_commands() -> list[list[str]]:
    """The commands of the README's small-chain block, continuation lines joined, split."""
    text = (ROOT / "README.md").read_text()
    if README_MARKER not in text:
        raise AssertionError(f"README.md lost the marked block ({README_MARKER!r})")
    block = text.split(README_MARKER, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.startswith("#")]


def _flag(cmd: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")]
    return value


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
def test_readme_chain_end_to_end(tmp_path):
    from lightningdit_jax.train import load_meta
    from vavae_jax.metrics.inception import RANDOM_LABEL

    commands = readme_chain_commands()
    scripts = [c[1] for c in commands]
    assert scripts == [
        "launch/train.py",
        "launch/extract_latents.py",
        "launch/train.py",
        "launch/sample.py",
        "launch/evaluate.py",
        "launch/evaluate.py",
    ]
    assert all(c[0] == "python3" for c in commands)
    # The documented workflow with its default grain workers (the record loss hid behind 0).
    assert not any(a.startswith("--worker_count") for c in commands for a in c)
    runs = tmp_path / "small_chain"
    logs = tmp_path / "logs"
    logs.mkdir()
    times: dict[str, float] = {}
    running: list[_Stage] = []

    def start(i, *extra, name=None):
        cmd = commands[i]
        args = [a.replace(RUNS, str(runs)) for a in cmd[2:]] + list(extra)
        stage = _Stage(
            name or f"{i}_{pathlib.Path(cmd[1]).stem}", cmd[1][len("launch/") :], args, logs, times
        )
        running.append(stage)
        return stage

    vae_dir, latents_dir, dit_dir = runs / "vavae", runs / "latents", runs / "dit"
    vae_steps = int(_flag(commands[0], "config.total_steps"))
    dit_steps = int(_flag(commands[2], "config.total_steps"))
    num_records = int(_flag(commands[1], "max_records"))
    t_start = time.perf_counter()
    try:
        # ---- 1. VA-VAE ------------------------------------------------------------------------
        start(0).wait()
        vae_config = json.loads((vae_dir / "config.json").read_text())
        assert vae_config["trainer"] == "vavae"
        assert str(vae_steps) in os.listdir(vae_dir / "checkpoints")
        with Image.open(vae_dir / "samples" / f"recon_{vae_steps:07d}.png") as grid:
            assert grid.mode == "RGB" and grid.size[1] >= 64
        # The tokenizer evaluation needs only the VA-VAE: beside the rest of the chain.
        tokenizer_eval = start(5)

        # ---- 2. latents of the sample images with the trained VA-VAE ---------------------------
        extract_log = start(1).wait()
        # grain's workers' shared memory is released when the pass ends, not at exit.
        assert "leaked shared_memory" not in extract_log
        index = latent_data.load_index(str(latents_dir))
        shape = [2, 16, 16, 32]  # (image, flip), h, w, C
        assert index["shape"] == shape
        assert index["num_records"] == index["source_records"] == num_records
        assert index["num_classes"] == num_records  # one image per class
        assert index["tokenizer"]["path"] == str(vae_dir.resolve())
        assert index["tokenizer"]["step"] == vae_steps
        assert index["tokenizer"]["config"]["embed_dim"] == 32
        z, labels = zip(
            *(latent_data.read_shard(str(latents_dir / s["file"]), shape) for s in index["shards"]),
            strict=True,
        )
        z, labels = np.concatenate(z), np.concatenate(labels)
        assert z.shape == (num_records, *shape) and z.dtype == np.float32
        assert np.isfinite(z).all() and not np.allclose(z[:, 0], z[:, 1])
        np.testing.assert_array_equal(np.sort(labels), np.arange(num_records))  # each once
        stats = latent_data.load_stats(str(latents_dir))
        ref = z[:, 0].astype(np.float64)
        np.testing.assert_allclose(stats["mean"], ref.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["std"], ref.std(axis=(0, 1, 2), ddof=1), rtol=1e-5)
        _assert_trained_weights_loaded(vae_dir, vae_steps)

        # ---- 3. LightningDiT on the latents ---------------------------------------------------
        start(2).wait()
        meta = load_meta(str(dit_dir))
        assert meta["step"] == dit_steps and meta["model_preset"] == "tiny/2"
        assert meta["latent_norm"] and meta["latent_shape"] == shape[1:]
        np.testing.assert_allclose(meta["latent_mean"], stats["mean"], rtol=1e-6)
        np.testing.assert_allclose(meta["latent_std"], stats["std"], rtol=1e-6)
        assert (dit_dir / "samples" / f"latent_{dit_steps:07d}.png").is_file()

        # ---- 4. sampling: the FID batch, then (beside the FID) a demo grid ---------------------
        start(3).wait()
        num_samples = int(_flag(commands[3], "num_samples"))
        samples_dir = runs / "samples"
        samples_npz = samples_dir / f"samples_{num_samples}.npz"
        assert sorted(os.listdir(samples_dir)) == ["sample_settings.json", samples_npz.name]
        with np.load(samples_npz) as f:
            assert sorted(f.files) == ["arr_0", "labels"]
            images, sample_labels = f["arr_0"], f["labels"]
        assert images.dtype == np.uint8 and images.shape == (num_samples, 64, 64, 3)
        assert images.std() > 1.0  # not a constant image
        # Class balanced over the 1000 classes, in the order of --seed's permutation.
        balanced = np.arange(num_samples) % 1000
        perm = np.random.default_rng(0).permutation(num_samples)
        np.testing.assert_array_equal(sample_labels, balanced[perm])
        settings = json.loads((samples_dir / "sample_settings.json").read_text())
        assert settings["step"] == dit_steps
        assert settings["num_steps"] == int(_flag(commands[3], "num_steps"))
        assert (settings["dtype"], settings["precision"]) == ("float32", "default")  # in force

        grid_dir = tmp_path / "grid"
        grid = _Stage(
            "sample_grid",
            "sample.py",
            [
                f"--workdir={dit_dir}",
                f"--out={grid_dir}",
                "--grid_only",
                "--classes=0,1,2,3,4,5,6,7",
                "--num_steps=4",
            ],
            logs,
            times,
        )
        running.append(grid)
        fid_eval = start(4)
        grid.wait()
        with Image.open(grid_dir / f"grid_{dit_steps:07d}.png") as png:
            assert png.mode == "RGB" and png.size == (4 * 64, 2 * 64)

        # ---- 5. FID / IS and the tokenizer's metrics ------------------------------------------
        fid_eval.wait()
        tokenizer_eval.wait()
        fid = json.loads((runs / "fid.json").read_text())
        assert fid["inception"] == RANDOM_LABEL and fid["num_samples"] == num_samples
        for key in ("fid", "inception_score", "inception_score_std"):
            assert isinstance(fid[key], float) and np.isfinite(fid[key]), fid
        assert fid["inception_score"] >= 1.0 - 1e-6, fid  # exp(mean KL), KL >= 0
        assert fid["fid"] > 1e-2, fid  # a 40-step model's samples are not the reference
        tok = json.loads((runs / "tokenizer.json").read_text())
        num_images = int(_flag(commands[5], "num_images"))
        assert tok["inception"] == RANDOM_LABEL and tok["num_images"] == num_images
        assert np.isfinite(tok["rfid"]) and tok["psnr"] > 0 and 0 < tok["ssim"] <= 1
    finally:
        for stage in running:
            stage.kill()
        times["total (wall)"] = time.perf_counter() - t_start
        print("\nend-to-end stage times (s; concurrent stages overlap):")
        for name, seconds in times.items():
            print(f"  {name:40s} {seconds:7.1f}")
