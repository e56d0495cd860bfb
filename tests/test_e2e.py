"""End to end on CPU through the launch scripts a user runs, each as its own process:

  sample images -> launch/train.py (tiny VA-VAE, 4 steps) -> launch/extract_latents.py (reads
  the VA-VAE workdir) -> launch/train.py (tiny LightningDiT, 4 steps, on the latents) ->
  launch/sample.py (ADM .npz and a demo grid) -> launch/evaluate.py (FID / IS with a
  random-weight Inception written as pytorch-fid's .pth and converted by launch/convert.py).

The VA-VAE is the `small` config at 32 px with 8 latent channels (8x8x8 latents: the shape of the
`tiny` LightningDiT preset) on the first 10 sample images, i.e. classes 0..9 (the preset has 10).
Stages that do not depend on each other (the FID reference side, the demo grid) run next to the
chain. Every stage's output is written to `logs/<stage>.log`; a failed stage fails the test with
its command and the tail of that log. Stage times are printed (`pytest -s`).
"""

from __future__ import annotations

import json
import os
import pathlib
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

NUM_IMAGES = 10  # the first 10 class folders: labels 0..9, the tiny preset's 10 classes
RESOLUTION = 32  # the small VA-VAE is f4: 8x8 latents, the tiny preset's input_size
CHANNELS = 8  # the tiny preset's in_channels
VAE_STEPS = 4
DIT_STEPS = 4
NUM_SAMPLES = 16
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


def _reference_images(sample_images_dir: pathlib.Path) -> np.ndarray:
    """The training images as the pipeline sees them (ADM center crop to 32 px): [10, 32, 32, 3]
    uint8, the first 10 class folders in sorted order."""
    from vavae_jax.data import center_crop_arr

    classes = sorted(p for p in sample_images_dir.iterdir() if p.is_dir())[:NUM_IMAGES]
    images = []
    for cls in classes:
        (file,) = sorted(cls.iterdir())
        with Image.open(file) as image:
            images.append(center_crop_arr(image.convert("RGB"), RESOLUTION))
    return np.stack(images)


def _random_inception_pth(images: np.ndarray, path: pathlib.Path) -> dict[str, np.ndarray]:
    """A random-weight FID Inception in pytorch-fid's file format (its state dict keys and
    layouts, BatchNorm statistics calibrated on `images`: see tests/test_metrics.py)."""
    import torch

    from tests.test_metrics import _nchw, _random_fid_state_dict

    state_dict = _random_fid_state_dict(_nchw(images))
    torch.save(state_dict, path)
    return {k: v.numpy() for k, v in state_dict.items()}


def _flat(tree) -> dict[str, np.ndarray]:
    def name(path):
        return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)

    return {name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_trained_weights_loaded(vae_dir: pathlib.Path) -> None:
    """extract_latents' loader returns the autoencoder weights of the VA-VAE checkpoint."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from vavae_jax import checkpoints

    ae, ref = checkpoints.load_trainer_workdir(vae_dir)
    assert ref["step"] == VAE_STEPS and ref["weights"] == "gen"
    # evaluate.py's route (checkpoints.load_autoencoder) reads the same run.
    same, groups = checkpoints.load_autoencoder(vae_dir)
    assert groups["trainer_run"] == groups["ref"] == ref
    jax.tree.map(
        np.testing.assert_array_equal,
        nnx.to_pure_dict(nnx.state(same, nnx.Param)),
        nnx.to_pure_dict(nnx.state(ae, nnx.Param)),
    )
    saved = ocp.PyTreeCheckpointer().restore(vae_dir / "checkpoints" / str(VAE_STEPS) / "state")
    saved = _flat(saved["gen"]["autoencoder"])  # Orbax keeps nnx.Param's `value` level
    loaded = {f"{k}/value": v for k, v in _flat(nnx.to_pure_dict(nnx.state(ae, nnx.Param))).items()}
    assert loaded.keys() == saved.keys()
    for k, v in loaded.items():
        np.testing.assert_array_equal(v, saved[k], err_msg=k)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
def test_sample_images_to_fid(sample_images_dir, tmp_path):
    pytest.importorskip("torchvision")  # only to write the Inception .pth (the torch extra)
    logs = tmp_path / "logs"
    logs.mkdir()
    times: dict[str, float] = {}
    running: list[_Stage] = []

    def start(name, script, *args):
        stage = _Stage(name, script, [str(a) for a in args], logs, times)
        running.append(stage)
        return stage

    vae_dir, latents_dir, dit_dir = tmp_path / "vavae", tmp_path / "latents", tmp_path / "dit"
    samples_dir, grid_dir = tmp_path / "samples", tmp_path / "grid"
    ref_npz, pth = tmp_path / "ref.npz", tmp_path / "pt_inception.pth"
    t_start = time.perf_counter()
    try:
        # ---- 1. VA-VAE: the small config, shrunk further on the command line ------------------
        vae = start(
            "vavae_train",
            "train.py",
            "--config=configs/vavae_f16d32.py:small",
            f"--workdir={vae_dir}",
            f"--config.data.root={sample_images_dir}",
            f"--config.data.max_records={NUM_IMAGES}",
            f"--config.data.resolution={RESOLUTION}",
            f"--config.model.resolution={RESOLUTION}",
            f"--config.teacher.resolution={RESOLUTION // 4 * 14}",  # 8x8 DINOv2 tokens
            f"--config.model.z_channels={CHANNELS}",
            f"--config.model.embed_dim={CHANNELS}",
            "--config.global_batch_size=4",
            f"--config.total_steps={VAE_STEPS}",
            f"--config.checkpoint_every_steps={VAE_STEPS}",
            f"--config.image_every_steps={VAE_STEPS}",
            "--config.log_every_steps=2",
            "--config.progress_bar=False",
        )

        # ---- meanwhile, the FID side: a reference batch and the Inception weights -------------
        t0 = time.perf_counter()
        ref_images = _reference_images(sample_images_dir)
        np.savez(ref_npz, arr_0=ref_images)  # an ADM reference batch (images, no stats)
        torch_weights = _random_inception_pth(ref_images, pth)
        times["inception_pth (in-process, torch)"] = time.perf_counter() - t0
        inception = tmp_path / "inception.npz"
        start("convert_inception", "convert.py", "inception", f"--pth={pth}", f"--out={inception}")
        assert str(inception) in running[-1].wait()  # its JSON summary names the output
        with np.load(inception) as f:  # our layouts: dense kernels [in, out]
            np.testing.assert_array_equal(f["fc.kernel"], torch_weights["fc.weight"].T)
            np.testing.assert_array_equal(
                f["Mixed_7c.branch_pool.bn.var"],
                torch_weights["Mixed_7c.branch_pool.bn.running_var"],
            )
        self_json = tmp_path / "fid_self.json"
        fid_self = start(
            "evaluate_ref_vs_ref",
            "evaluate.py",
            f"--samples={ref_npz}",
            f"--ref={ref_npz}",
            f"--inception={inception}",
            "--num_splits=2",
            f"--inception_batch_size={NUM_SAMPLES}",
            f"--output={self_json}",
            "--no_progress",
        )

        vae.wait()
        vae_config = json.loads((vae_dir / "config.json").read_text())
        assert vae_config["trainer"] == "vavae"
        assert vae_config["model"]["embed_dim"] == CHANNELS
        assert sorted(os.listdir(vae_dir / "checkpoints")) == [str(VAE_STEPS)]
        with Image.open(vae_dir / "samples" / f"recon_{VAE_STEPS:07d}.png") as grid:
            assert grid.mode == "RGB" and grid.size[1] >= RESOLUTION

        # ---- 2. latents of the sample images with the trained VA-VAE --------------------------
        start(
            "extract_latents",
            "extract_latents.py",
            f"--tokenizer={vae_dir}",
            "--source=folder",
            f"--root={sample_images_dir}",
            f"--max_records={NUM_IMAGES}",
            f"--resolution={RESOLUTION}",
            "--batch_size=8",
            f"--out_dir={latents_dir}",
        ).wait()
        index = latent_data.load_index(str(latents_dir))
        shape = [2, RESOLUTION // 4, RESOLUTION // 4, CHANNELS]  # (image, flip), h, w, C
        assert index["shape"] == shape and index["num_records"] == NUM_IMAGES
        assert index["num_classes"] == NUM_IMAGES  # one image per class
        assert index["tokenizer"]["path"] == str(vae_dir.resolve())
        assert index["tokenizer"]["step"] == VAE_STEPS
        assert index["tokenizer"]["config"]["embed_dim"] == CHANNELS
        z, labels = zip(
            *(latent_data.read_shard(str(latents_dir / s["file"]), shape) for s in index["shards"]),
            strict=True,
        )
        z, labels = np.concatenate(z), np.concatenate(labels)
        assert z.shape == (NUM_IMAGES, *shape) and z.dtype == np.float32
        assert np.isfinite(z).all() and not np.allclose(z[:, 0], z[:, 1])
        np.testing.assert_array_equal(labels, np.arange(NUM_IMAGES))
        stats = latent_data.load_stats(str(latents_dir))
        assert stats["mean"].shape == stats["std"].shape == (CHANNELS,)
        ref = z[:, 0].astype(np.float64)
        np.testing.assert_allclose(stats["mean"], ref.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["std"], ref.std(axis=(0, 1, 2), ddof=1), rtol=1e-5)
        _assert_trained_weights_loaded(vae_dir)

        # ---- 3. LightningDiT on the latents --------------------------------------------------
        start(
            "dit_train",
            "train.py",
            "--config=configs/lightningdit_xl_vavae_f16d32.py:tiny,small",  # 8x8x8 latents
            f"--workdir={dit_dir}",
            f"--config.data.data_dir={latents_dir}",
            f"--config.tokenizer.path={vae_dir}",
            "--config.global_batch_size=8",
            f"--config.total_steps={DIT_STEPS}",
            f"--config.checkpoint_every_steps={DIT_STEPS}",
            f"--config.image_every_steps={DIT_STEPS}",
            "--config.log_every_steps=2",
            "--config.progress_bar=False",
        ).wait()
        from lightningdit_jax.train import load_meta

        meta = load_meta(str(dit_dir))
        assert meta["step"] == DIT_STEPS and meta["model_preset"] == "tiny"
        assert meta["latent_norm"] and meta["latent_shape"] == shape[1:]
        np.testing.assert_allclose(meta["latent_mean"], stats["mean"], rtol=1e-6)
        np.testing.assert_allclose(meta["latent_std"], stats["std"], rtol=1e-6)
        assert meta["tokenizer"]["path"] == str(vae_dir)
        assert (dit_dir / "samples" / f"latent_{DIT_STEPS:07d}.png").is_file()

        # ---- 4. sampling: the FID batch, then (beside the FID) a demo grid --------------------
        start(
            "sample_npz",
            "sample.py",
            f"--workdir={dit_dir}",
            f"--out={samples_dir}",
            f"--num_samples={NUM_SAMPLES}",
            "--batch_size=8",
            "--num_steps=4",
            "--progress=false",
        ).wait()
        samples_npz = samples_dir / f"samples_{NUM_SAMPLES}.npz"
        assert sorted(os.listdir(samples_dir)) == ["sample_settings.json", samples_npz.name]
        with np.load(samples_npz) as f:
            assert sorted(f.files) == ["arr_0", "labels"]
            images, sample_labels = f["arr_0"], f["labels"]
        assert images.dtype == np.uint8 and images.shape == (NUM_SAMPLES, RESOLUTION, RESOLUTION, 3)
        assert images.std() > 1.0  # not a constant image
        # Class balanced over the tiny preset's 10 classes, in the order of --seed's permutation.
        balanced = np.arange(NUM_SAMPLES) % 10
        perm = np.random.default_rng(0).permutation(NUM_SAMPLES)
        np.testing.assert_array_equal(sample_labels, balanced[perm])
        settings = json.loads((samples_dir / "sample_settings.json").read_text())
        assert settings["num_steps"] == 4 and settings["step"] == DIT_STEPS
        assert settings["tokenizer"] == str(vae_dir)

        grid = start(
            "sample_grid",
            "sample.py",
            f"--workdir={dit_dir}",
            f"--out={grid_dir}",
            "--grid_only",
            "--classes=0,1,2,3,4,5,6,7",
            "--num_steps=4",
        )
        gen_json = tmp_path / "fid_samples.json"
        fid_gen = start(
            "evaluate_samples_vs_ref",
            "evaluate.py",
            f"--samples={samples_npz}",
            f"--ref={ref_npz}",
            f"--inception={inception}",
            "--num_splits=2",
            f"--inception_batch_size={NUM_SAMPLES}",
            f"--output={gen_json}",
            "--no_progress",
        )
        grid.wait()
        with Image.open(grid_dir / f"grid_{DIT_STEPS:07d}.png") as png:
            assert png.mode == "RGB" and png.size == (4 * RESOLUTION, 2 * RESOLUTION)

        # ---- 5. FID and IS -------------------------------------------------------------------
        fid_gen.wait()
        fid_self.wait()
        gen, ref_self = json.loads(gen_json.read_text()), json.loads(self_json.read_text())
        assert gen["num_samples"] == NUM_SAMPLES and ref_self["num_samples"] == NUM_IMAGES
        for result in (gen, ref_self):
            for key in ("fid", "inception_score", "inception_score_std"):
                assert isinstance(result[key], float) and np.isfinite(result[key]), result
            assert result["inception_score"] >= 1.0 - 1e-6, result  # exp(mean KL), KL >= 0
        # The reference against itself: 0 up to rounding; the 4-step model's samples: clearly not.
        assert abs(ref_self["fid"]) < 1e-8, ref_self
        assert gen["fid"] > 1e-2, gen
    finally:
        for stage in running:
            stage.kill()
        times["total (wall)"] = time.perf_counter() - t_start
        print("\nend-to-end stage times (s; concurrent stages overlap):")
        for name, seconds in times.items():
            print(f"  {name:40s} {seconds:7.1f}")
