"""Encodes a dataset with a VA-VAE into latent shards + latent stats for LightningDiT training.

  python launch/extract_latents.py --tokenizer=runs/vavae_export --out_dir=/data/imagenet_latents \
      --source=tfds --manual_dir=/data/imagenet --batch_size=256
  python launch/extract_latents.py --tokenizer=runs/vavae_f16d32_small --source=folder \
      --root=../shared/data/imagenet-sample-256 --resolution=64 --out_dir=/tmp/latents
  python launch/extract_latents.py --source=folder --root=../shared/data/imagenet-sample-256 \
      --allow_random --resolution=64 --out_dir=/tmp/latents           # smoke run, random VAE

--tokenizer is a VA-VAE export folder (launch/convert.py vavae) or a VA-VAE trainer workdir
(launch/train.py --config=configs/vavae_f16d32.py...: its config.json and latest checkpoint's
autoencoder, the EMA weights when the run kept an EMA).

Reference: extract_features.py (a posterior sample of each image and of its horizontal flip, the
label; shards of 10,000) and datasets/img_latent_dataset.py (the latent stats). Each host writes
its own shards `latents-p<process>-<shard>.array_record` atomically (tmp + rename); a rerun skips
finished shards, so a killed run loses and duplicates nothing. Then process 0 writes index.json
and latent_stats.npz (per-channel mean and unbiased std over [N, h, w] of the unflipped latents).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from lightningdit_jax import data as latent_data  # noqa: E402
from vavae_jax import data as image_data  # noqa: E402
from vavae_jax import model as vae_model  # noqa: E402
from vavae_jax.runtime import sharding  # noqa: E402

log = logging.getLogger("launch.extract_latents")


def load_tokenizer(path: str, *, allow_random: bool, random_preset: str = "small", dtype=None):
    """(AutoencoderKL, reference dict) from our export folder, a vavae trainer workdir, or a
    random tiny VAE (smoke)."""
    from vavae_jax import convert

    if path:
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"tokenizer {path!r} is not a directory (expected a VA-VAE export or a vavae "
                f"trainer workdir)"
            )
        if (pathlib.Path(path) / "checkpoints").is_dir():
            return convert.load_trainer_workdir(path, dtype=dtype)
        exported = convert.load_export(path, dtype=dtype)
        ae = exported["autoencoder"]
        return ae, dict(path=os.path.abspath(path), config=dataclasses.asdict(ae.config))
    if not allow_random:
        raise ValueError(
            "--tokenizer is empty: give a VA-VAE export folder or trainer workdir, or --allow_random"
        )
    log.warning("the tokenizer has RANDOM weights: a smoke run, the latents mean nothing")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
    import vavae_f16d32

    from vavae_jax import train as vae_train

    cfg = vavae_f16d32.get_config(random_preset)
    if dtype is not None:
        cfg.dtype = dtype
    ae_cfg = vae_train.autoencoder_config(cfg)
    ae = vae_model.AutoencoderKL(ae_cfg, rngs=nnx.Rngs(0))
    return ae, dict(path="", config=dataclasses.asdict(ae_cfg), random=True)


def extract(
    data_config: ml_collections.ConfigDict,
    ae: vae_model.AutoencoderKL,
    tokenizer_ref: dict,
    out_dir: str,
    *,
    batch_size: int,
    batches_per_shard: int,
    seed: int = 0,
    dtype: str = "float32",
    stop_after_shards: int | None = None,
    progress: bool = True,
) -> dict | None:
    """Encodes every record of `data_config`; returns the index (None if stopped early)."""
    os.makedirs(out_dir, exist_ok=True)
    mesh = sharding.make_mesh(-1, 1)
    it, num_records = image_data.make_eval_iterator(data_config, batch_size)
    num_batches = -(-num_records // batch_size)
    graphdef, state = nnx.split(ae)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.device_put(state, replicated)
    batch_sh = sharding.batch_sharding(mesh, 4)

    @jax.jit
    def encode(state, images, rng):  # [B, H, W, 3] -> [B, 2, h, w, C] (image, flip)
        model = nnx.merge(graphdef, state)
        both = jnp.concatenate([images, images[:, :, ::-1]])
        z = model.encode(both).sample(rng)
        z_img, z_flip = jnp.split(z, 2)
        return jnp.stack([z_img, z_flip], axis=1).astype(jnp.float32)

    pid = jax.process_index()
    written, pbar, t0, n_done = 0, None, time.perf_counter(), 0
    if progress and pid == 0:
        from tqdm import tqdm

        pbar = tqdm(total=num_batches * batch_size, unit="img", desc="extract", dynamic_ncols=True)
    for shard in range(-(-num_batches // batches_per_shard)):
        path = os.path.join(out_dir, f"latents-p{pid:03d}-{shard:05d}.array_record")
        first = shard * batches_per_shard
        count = min(batches_per_shard, num_batches - first)
        if os.path.exists(path):  # finished by an earlier run: consume its batches unencoded
            for _ in range(count):
                next(it)
            if pbar is not None:
                pbar.update(count * batch_size)
            continue
        zs, ys = [], []
        for b in range(first, first + count):
            local = next(it)
            images = jax.make_array_from_process_local_data(batch_sh, local["image"])
            rng = jax.random.fold_in(jax.random.key(seed), b)
            z = encode(state, images, rng)
            z = np.asarray(
                multihost_utils.global_array_to_host_local_array(
                    z, mesh, jax.sharding.PartitionSpec(sharding.MESH_AXES)
                )
            )
            keep = np.asarray(local["mask"], bool)
            zs.append(z[keep])
            ys.append(np.asarray(local["label"])[keep])
            n_done += len(keep)
            if pbar is not None:
                pbar.update(len(keep) * jax.process_count())
                pbar.set_postfix(
                    img_s=f"{n_done * jax.process_count() / (time.perf_counter() - t0):.1f}"
                )
        latent_data.write_shard(path, np.concatenate(zs), np.concatenate(ys), dtype)
        written += 1
        if stop_after_shards is not None and written >= stop_after_shards:
            if pbar is not None:
                pbar.close()
            return None
    if pbar is not None:
        pbar.close()
    multihost_utils.sync_global_devices("extract_latents: shards written")
    f = ae.config.downsample_factor
    h = data_config.resolution // f
    shape = [2, h, h, ae.config.embed_dim]
    return finalize(out_dir, shape, tokenizer_ref, dtype) if pid == 0 else None


def finalize(out_dir: str, shape: list[int], tokenizer_ref: dict, dtype: str) -> dict:
    """index.json over every shard (num_classes: 1 + the largest label) and latent_stats.npz
    over every unflipped latent."""
    files = sorted(glob.glob(os.path.join(out_dir, "latents-p*-*.array_record")))
    if not files:
        raise FileNotFoundError(f"no latent shards in {out_dir}")
    shards, acc, num_classes = [], latent_data.StatsAccumulator(shape[-1]), 0
    for f in files:
        z, y = latent_data.read_shard(f, shape, dtype)
        acc.update(z[:, 0])
        shards.append({"file": os.path.basename(f), "count": int(z.shape[0])})
        if len(y):
            num_classes = max(num_classes, int(y.max()) + 1)
    mean, std = acc.result()
    latent_data.save_stats(os.path.join(out_dir, latent_data.STATS_FILE), mean, std)
    index = dict(
        shape=shape,
        dtype=dtype,
        num_records=sum(s["count"] for s in shards),
        num_classes=num_classes,
        shards=shards,
        tokenizer=tokenizer_ref,
    )
    latent_data.save_index(out_dir, index)
    log.info("%d latents %s in %d shards; stats written", index["num_records"], shape, len(shards))
    return index


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
