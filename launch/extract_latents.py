r"""Encodes a dataset with a VA-VAE into latent shards + latent stats for LightningDiT training.

  python launch/extract_latents.py --tokenizer=runs/vavae_export --out_dir=/data/imagenet_latents \
      --source=tfds --manual_dir=/data/imagenet --batch_size=256
  python launch/extract_latents.py --tokenizer=runs/vavae_f16d32_small --source=folder \
      --root=../shared/data/imagenet-sample-256 --resolution=64 --out_dir=/tmp/latents
  python launch/extract_latents.py --source=folder --root=../shared/data/imagenet-sample-256 \
      --allow_random --resolution=64 --out_dir=/tmp/latents           # smoke run, random VAE

--tokenizer is a VA-VAE export folder (launch/convert.py vavae) or a VA-VAE trainer workdir
(launch/train.py --config=configs/vavae_f16d32.py...: its config.json and latest checkpoint's
autoencoder, the EMA weights when the run kept an EMA).

The work is `lightningdit_jax.pipeline.extract`: each host writes its own shards with a
manifest each (record range, count, checksum); a rerun into the same --out_dir keeps intact shards
and re-encodes unfinished or damaged ones; every count is verified against the source before
process 0 writes index.json and latent_stats.npz.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib

from absl import app, flags
from flax import nnx

from lightningdit_jax import data as latent_data
from lightningdit_jax.pipeline import extract
from vavae_jax import checkpoints
from vavae_jax import data as image_data
from vavae_jax import model as vae_model

log = logging.getLogger("launch.extract_latents")


def load_tokenizer(path: str, *, allow_random: bool, random_preset: str = "small", dtype=None):
    """(AutoencoderKL, reference dict) from our export folder, a vavae trainer workdir, or a
    random tiny VAE (smoke)."""
    if path:
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"tokenizer {path!r} is not a directory (expected a VA-VAE export or a vavae "
                f"trainer workdir)"
            )
        ae, info = checkpoints.load_autoencoder(path, dtype=dtype)
        return ae, info["ref"]
    if not allow_random:
        raise ValueError(
            "--tokenizer is empty: give a VA-VAE export folder or trainer workdir, or --allow_random"
        )
    log.warning("the tokenizer has RANDOM weights: a smoke run, the latents mean nothing")
    from vavae_jax import train as vae_train
    from vavae_jax.runtime import cli

    config_file = pathlib.Path(__file__).resolve().parents[1] / "configs/vavae_f16d32.py"
    cfg = cli.config_from_file(f"{config_file}:{random_preset}")
    if dtype is not None:
        cfg.dtype = dtype
    ae_cfg = vae_train.autoencoder_config(cfg)
    ae = vae_model.AutoencoderKL(ae_cfg, rngs=nnx.Rngs(0))
    return ae, dict(path="", config=dataclasses.asdict(ae_cfg), random=True)


_FLAGS = flags.FLAGS


def define_flags() -> None:
    """Only when run as a script: tests import several launch modules into one process."""
    flags.DEFINE_string(
        "tokenizer", "", "VA-VAE export folder (launch/convert.py output) or trainer workdir."
    )
    flags.DEFINE_bool("allow_random", False, "Smoke run with a random tiny VA-VAE.")
    flags.DEFINE_string("out_dir", None, "Output folder.")
    flags.DEFINE_enum("source", "tfds", ["tfds", "folder"], "Image source.")
    flags.DEFINE_string("root", "", "folder source root.")
    flags.DEFINE_string("tfds_name", "imagenet2012", "tfds dataset.")
    flags.DEFINE_string("tfds_split", "train", "tfds split.")
    flags.DEFINE_string("tfds_data_dir", "", "tfds data dir.")
    flags.DEFINE_string("manual_dir", "", "imagenet2012 tars.")
    flags.DEFINE_integer("resolution", 256, "Image size.")
    flags.DEFINE_integer("max_records", -1, "Encode only the first N records (-1: all).")
    flags.DEFINE_integer("batch_size", 256, "Global batch size.")
    flags.DEFINE_integer("batches_per_shard", 40, "Batches per shard file (per host).")
    flags.DEFINE_integer("worker_count", 8, "grain workers.")
    flags.DEFINE_integer("seed", 0, "Posterior sampling seed.")
    flags.DEFINE_enum("dtype", "float32", list(latent_data.DTYPES), "Stored latent dtype.")


def main(argv):
    del argv
    from vavae_jax.runtime.logging import setup_python_logging

    setup_python_logging()
    if not _FLAGS.out_dir:
        raise app.UsageError("--out_dir is required")
    data_cfg = image_data.default_data_config()
    data_cfg.update(
        dict(
            source=_FLAGS.source,
            root=_FLAGS.root,
            tfds_name=_FLAGS.tfds_name,
            tfds_split=_FLAGS.tfds_split,
            tfds_data_dir=_FLAGS.tfds_data_dir,
            manual_dir=_FLAGS.manual_dir,
            resolution=_FLAGS.resolution,
            random_flip=False,
            worker_count=_FLAGS.worker_count,
            max_records=_FLAGS.max_records,
        )
    )
    ae, ref = load_tokenizer(_FLAGS.tokenizer, allow_random=_FLAGS.allow_random)
    extract(
        data_cfg,
        ae,
        ref,
        _FLAGS.out_dir,
        batch_size=_FLAGS.batch_size,
        batches_per_shard=_FLAGS.batches_per_shard,
        seed=_FLAGS.seed,
        dtype=_FLAGS.dtype,
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
