"""The pipeline around the models: latent extraction, and a LightningDiT run -> images.

    from lightningdit_jax import pipeline
    sampler = pipeline.load_sampler("runs/lightningdit_xl")     # EMA weights, stats, tokenizer
    images = sampler.generate([975, 3, 207, 387], seed=0)       # uint8 [4, 256, 256, 3]

Sampling (second half of this file): `load_run` reads a run folder once (config, meta, EMA
weights), `Sampler` turns labels into images (ODE with the run's `Guidance`, de-normalised with
the latent stats of the meta, decoded by the run's tokenizer), `sample_npz` writes FID samples in
the ADM format and `demo_grid` a PNG grid (launch/sample.py).

Latent extraction: a dataset encoded by a VA-VAE into latent shards + latent stats.

Reference: extract_features.py (a posterior sample of each image and of its horizontal flip, the
label) and datasets/img_latent_dataset.py (the latent stats).

Files in `out_dir`:
  latents-p<process>-<shard>.array_record   the records of one shard (lightningdit_jax.data)
  latents-p<process>-<shard>.json           its manifest: the source records it covers, how
                                            many it holds, how many were corrupt, its sha256
  index.json, latent_stats.npz              written last by process 0 (`finalize`)

Every count is verified:
- The image pass delivers each record of the source exactly once, whatever the number of grain
  workers (`vavae_jax.data.EvalIterator` raises `DataCountError` otherwise).
- A shard's manifest is written after the shard (both atomically: temporary file, then rename),
  so a shard without a manifest is unfinished. A rerun keeps a shard only when its manifest
  matches the plan and the file's checksum and record count match the manifest; otherwise the
  shard is encoded again (repaired). Shards of another extraction (a different tokenizer, seed,
  resolution, batch plan or dtype) are refused: use a new `out_dir`.
- `finalize` checks that the shards hold every record of the source but the corrupt ones,
  before it writes index.json. A mismatch is an error, never a smaller index.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import pathlib
import time
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from lightningdit_jax import data as latent_data
from lightningdit_jax import fp8, sampling
from lightningdit_jax import train as dit_train
from vavae_jax import data as image_data
from vavae_jax.data import DataCountError
from vavae_jax.runtime import checkpoint as ckpt_lib
from vavae_jax.runtime import loop, sharding, trainer

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


class ShardMismatchError(RuntimeError):
    """`out_dir` holds shards of a different extraction."""


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Shard `shard` of process `process`: batches [first_batch, first_batch + num_batches) of
    that process's block, i.e. the source records [lo, hi) (hi may pass the source's end:
    padding)."""

    process: int
    shard: int
    first_batch: int
    num_batches: int
    lo: int
    hi: int

    @property
    def file(self) -> str:
        return f"latents-p{self.process:03d}-{self.shard:05d}.array_record"

    @property
    def manifest(self) -> str:
        return self.file[: -len(".array_record")] + ".json"

    def real_records(self, num_records: int) -> int:
        return max(0, min(self.hi, num_records) - min(self.lo, num_records))


def plan_shards(
    num_records: int, batch_size: int, batches_per_shard: int, process_count: int
) -> list[ShardPlan]:
    """Every shard of every process, in (process, shard) order."""
    if batches_per_shard <= 0:
        raise ValueError(f"batches_per_shard={batches_per_shard} must be positive")
    per_host = batch_size // process_count
    num_batches = image_data.eval_num_batches(num_records, batch_size)
    plans = []
    for p in range(process_count):
        base = p * num_batches * per_host
        for s in range(-(-num_batches // batches_per_shard)):
            first = s * batches_per_shard
            n = min(batches_per_shard, num_batches - first)
            lo = base + first * per_host
            plans.append(ShardPlan(p, s, first, n, lo, lo + n * per_host))
    return plans


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _shard_count_on_disk(path: str) -> int:
    import grain

    return len(grain.sources.ArrayRecordDataSource([path]))


def check_shard(out_dir: str, plan: ShardPlan, num_records: int, run: dict) -> str | None:
    """None when the shard of `plan` is finished and intact, else why it must be (re)encoded.
    Raises `ShardMismatchError` when it belongs to another extraction (`run` differs)."""
    path, mpath = os.path.join(out_dir, plan.file), os.path.join(out_dir, plan.manifest)
    if not os.path.exists(path):
        return "missing"
    if not os.path.exists(mpath):
        return "no manifest (unfinished, or written by an older version)"
    with open(mpath) as f:
        m = json.load(f)
    if m.get("run") != run:
        diff = {
            k: (m.get("run", {}).get(k), v) for k, v in run.items() if m.get("run", {}).get(k) != v
        }
        raise ShardMismatchError(
            f"{mpath} was written by another extraction (differs in {diff}, as (on disk, now)); "
            f"use a new --out_dir, or delete the old shards"
        )
    expected = dict(first_batch=plan.first_batch, num_batches=plan.num_batches, lo=plan.lo)
    got = {k: m.get(k) for k in expected}
    if got != expected:
        return f"covers other records than planned ({got} != {expected})"
    if m["count"] + m["skipped"] != plan.real_records(num_records):
        return (
            f"holds {m['count']} records + {m['skipped']} corrupt, but its batches have "
            f"{plan.real_records(num_records)} records"
        )
    if _sha256(path) != m["sha256"]:
        return "checksum mismatch (the file changed after it was written)"
    on_disk = _shard_count_on_disk(path)
    if on_disk != m["count"]:
        return f"holds {on_disk} records, its manifest says {m['count']}"
    return None


def extract(
    data_config: ml_collections.ConfigDict,
    ae,
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
    """Encodes every record of `data_config` with the autoencoder `ae` into `out_dir`; returns
    the index (None if stopped early by `stop_after_shards`, or on processes other than 0).

    A rerun into the same `out_dir` keeps the intact shards and encodes the rest (see the module
    docstring)."""
    os.makedirs(out_dir, exist_ok=True)
    mesh = sharding.make_mesh(-1, 1)
    pid, nproc = jax.process_index(), jax.process_count()
    source = image_data.make_source(data_config)
    num_records = len(source)
    f = ae.config.downsample_factor
    h = data_config.resolution // f
    shape = [2, h, h, ae.config.embed_dim]
    run = dict(
        tokenizer=tokenizer_ref,
        source=repr(source),
        resolution=int(data_config.resolution),
        batch_size=int(batch_size),
        batches_per_shard=int(batches_per_shard),
        processes=nproc,
        seed=int(seed),
        dtype=dtype,
        shape=shape,
        version=MANIFEST_VERSION,
    )
    run = json.loads(json.dumps(run, default=str))  # as it reads back from a manifest
    plans = plan_shards(num_records, batch_size, batches_per_shard, nproc)
    mine = [p for p in plans if p.process == pid]

    # Which shards to encode: the same decision on every process (encoding is a collective).
    reasons = [check_shard(out_dir, p, num_records, run) for p in mine]
    todo = np.asarray([r is not None for r in reasons])
    if nproc > 1:
        todo = np.asarray(multihost_utils.process_allgather(todo)).any(axis=0)
    for p, r in zip(mine, reasons):
        if r is not None and r != "missing":
            log.warning("shard %s: %s; encoding it again", p.file, r)
    kept = int((~todo).sum())
    if kept:
        log.info("keeping %d finished shard(s) of %d in %s", kept, len(mine), out_dir)

    if todo.any():
        first = int(np.flatnonzero(todo)[0])
        _encode_shards(
            data_config,
            ae,
            source,
            mesh,
            out_dir,
            mine[first:],
            todo[first:],
            run,
            batch_size=batch_size,
            seed=seed,
            dtype=dtype,
            stop_after_shards=stop_after_shards,
            progress=progress and pid == 0,
            done_records=sum(p.real_records(num_records) for p in mine[:first]),
        )
        if stop_after_shards is not None:
            return None
    multihost_utils.sync_global_devices("extract_latents: shards written")
    if pid != 0:
        return None
    return finalize(out_dir, plans, num_records, shape, tokenizer_ref, dtype, run)


def _encode_shards(
    data_config,
    ae,
    source,
    mesh,
    out_dir,
    plans,
    todo,
    run,
    *,
    batch_size,
    seed,
    dtype,
    stop_after_shards,
    progress,
    done_records,
) -> None:
    graphdef, state = nnx.split(ae)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.device_put(state, replicated)
    batch_sh = sharding.batch_sharding(mesh, 4)

    @jax.jit
    def encode_image_and_flip(state, images, rng):  # [B, H, W, 3] -> [B, 2, h, w, C]
        model = nnx.merge(graphdef, state)
        both = jnp.concatenate([images, images[:, :, ::-1]])
        z = model.encode(both).sample(rng)
        z_img, z_flip = jnp.split(z, 2)
        return jnp.stack([z_img, z_flip], axis=1).astype(jnp.float32)

    it, num_records = image_data.make_eval_iterator(
        data_config, batch_size, start_batch=plans[0].first_batch, source=source
    )
    t0, n_done = time.perf_counter(), 0
    nproc = jax.process_count()
    pbar = None
    if progress:  # a bar where a terminal watches, else plain log lines
        pbar = loop.Progress(num_records, "extract", unit="img", initial=done_records * nproc)
    written = 0
    for plan, encode in zip(plans, todo):
        zs, ys, skipped, real = [], [], 0, 0
        for b in range(plan.first_batch, plan.first_batch + plan.num_batches):
            local = next(it)
            n_real = int((local["index"] >= 0).sum())
            real += n_real
            if encode:
                keep = np.asarray(local["mask"], bool)
                skipped += n_real - int(keep.sum())
                images = jax.make_array_from_process_local_data(batch_sh, local["image"])
                rng = jax.random.fold_in(jax.random.key(seed), b)
                z = encode_image_and_flip(state, images, rng)
                z = np.asarray(
                    multihost_utils.global_array_to_host_local_array(
                        z, mesh, jax.sharding.PartitionSpec(sharding.MESH_AXES)
                    )
                )
                zs.append(z[keep])
                ys.append(np.asarray(local["label"])[keep])
            n_done += n_real
            if pbar is not None:
                pbar.update(
                    n_real * nproc, img_s=f"{n_done * nproc / (time.perf_counter() - t0):.1f}"
                )
        if real != plan.real_records(num_records):
            raise DataCountError(
                f"shard {plan.file}: the batches held {real} records, expected "
                f"{plan.real_records(num_records)}"
            )
        if not encode:
            continue
        z = np.concatenate(zs) if zs else np.zeros((0, *run["shape"]), np.float32)
        y = np.concatenate(ys) if ys else np.zeros((0,), np.int32)
        path = os.path.join(out_dir, plan.file)
        latent_data.write_shard(path, z, y, dtype)
        if _shard_count_on_disk(path) != len(z):
            raise DataCountError(f"{path}: wrote {len(z)} records, the file holds another count")
        _write_json_atomic(
            os.path.join(out_dir, plan.manifest),
            dict(
                file=plan.file,
                first_batch=plan.first_batch,
                num_batches=plan.num_batches,
                lo=plan.lo,
                hi=plan.hi,
                count=int(len(z)),
                skipped=int(skipped),
                sha256=_sha256(path),
                run=run,
            ),
        )
        written += 1
        if stop_after_shards is not None and written >= stop_after_shards:
            if pbar is not None:
                pbar.close()
            return
    it.finish()  # every record of this host's block exactly once, or DataCountError
    if pbar is not None:
        pbar.close()
    log.info(
        "encoded %d records in %.1f s (%d corrupt skipped)",
        n_done,
        time.perf_counter() - t0,
        it.skipped,
    )


def finalize(
    out_dir: str,
    plans: list[ShardPlan],
    num_records: int,
    shape: list[int],
    tokenizer_ref: dict,
    dtype: str,
    run: dict,
) -> dict:
    """Verifies the shards of `plans` against the source's `num_records`, then writes
    latent_stats.npz (per-channel mean and unbiased std over [N, h, w] of the unflipped latents)
    and index.json (num_classes: 1 + the largest label)."""
    planned = {p.file for p in plans}
    stray = sorted(
        os.path.basename(f)
        for f in glob.glob(os.path.join(out_dir, "latents-p*-*.array_record"))
        if os.path.basename(f) not in planned
    )
    if stray:
        raise ShardMismatchError(
            f"{out_dir} holds shards that this extraction did not plan: {stray[:5]} "
            f"({len(stray)} in all); use a new --out_dir, or delete them"
        )
    shards, acc, num_classes, count, skipped = [], latent_data.StatsAccumulator(shape[-1]), 0, 0, 0
    for p in plans:
        reason = check_shard(out_dir, p, num_records, run)
        if reason is not None:
            raise DataCountError(f"shard {p.file}: {reason}; rerun the extraction to repair it")
        with open(os.path.join(out_dir, p.manifest)) as f:
            m = json.load(f)
        z, y = latent_data.read_shard(os.path.join(out_dir, p.file), shape, dtype)
        if len(z) != m["count"]:
            raise DataCountError(f"{p.file}: read {len(z)} records, its manifest says {m['count']}")
        acc.update(z[:, 0])
        shards.append({"file": p.file, "count": int(len(z)), "sha256": m["sha256"]})
        count += len(z)
        skipped += m["skipped"]
        if len(y):
            num_classes = max(num_classes, int(y.max()) + 1)
    if count + skipped != num_records:
        raise DataCountError(
            f"the shards hold {count} latents + {skipped} corrupt images skipped, but the source "
            f"has {num_records} records; index.json was not written"
        )
    if count == 0:
        raise DataCountError("no image could be encoded: every record was corrupt or unreadable")
    if skipped:
        log.warning("%d corrupt or unreadable image(s) were skipped (logged above)", skipped)
    mean, std = acc.result()
    latent_data.save_stats(os.path.join(out_dir, latent_data.STATS_FILE), mean, std)
    index = dict(
        shape=shape,
        dtype=dtype,
        num_records=int(count),
        source_records=int(num_records),
        skipped_images=int(skipped),
        num_classes=num_classes,
        shards=shards,
        tokenizer=tokenizer_ref,
    )
    latent_data.save_index(out_dir, index)
    log.info(
        "%d latents %s (each image and its horizontal flip) in %d shards, labels 0 to %d "
        "(index.json's num_classes %d: 1 + the largest label); stats written",
        count,
        shape,
        len(shards),
        num_classes - 1,
        num_classes,
    )
    return index


# =============================================================================================
# Sampling: a LightningDiT run -> images (launch/sample.py is a thin command line over this)
# =============================================================================================
# Reference inference.py: Euler ODE, 250 steps, timestep shift 0.3, CFG on the first 3 channels
# inside the interval t >= cfg_interval_start; de-normalise x / multiplier * std + mean; decode;
# uint8 by tokenizer/vavae.py `decode_to_images`. The latent stats and the tokenizer come from
# the checkpoint meta (never from flags; reference issue #34). The guidance defaults to the run's
# `config.sample` (10.0 / 0.11 for the 64-epoch model, 6.7 / 0.125 for the 800-epoch one).
SETTINGS_FILE = "sample_settings.json"


def check_workdir(workdir: str) -> None:
    """A LightningDiT run folder (config.json and checkpoints/), not a VA-VAE one."""
    path = ckpt_lib.as_path(workdir)
    if not path.exists():
        raise FileNotFoundError(
            f"--workdir={workdir}: no such directory; pass the LightningDiT run directory that "
            f"launch/train.py wrote (it holds config.json and checkpoints/)"
        )
    for name in ("config.json", "checkpoints"):
        if not (path / name).exists():
            raise FileNotFoundError(
                f"--workdir={workdir} has no {name}: not a LightningDiT run directory "
                f"(launch/train.py --config=configs/lightningdit_xl_vavae_f16d32.py writes one)"
            )
    trainer = json.loads((path / "config.json").read_text()).get("trainer")
    if trainer == "vavae":
        raise ValueError(
            f"--workdir={workdir} is a VA-VAE (tokenizer) run, not a LightningDiT one: pass "
            f"--workdir=<a LightningDiT run folder> (launch/train.py "
            f"--config=configs/lightningdit_xl_vavae_f16d32.py writes one); a VA-VAE run folder "
            f"goes to --tokenizer of launch/extract_latents.py and launch/evaluate.py"
        )


@dataclasses.dataclass
class Run:
    """A LightningDiT run folder read once: its config.json and the meta of one checkpoint
    (latent stats, tokenizer reference, preset); `ema_model` reads the weights."""

    workdir: str
    config: ml_collections.ConfigDict
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def ema_model(self, mesh=None, *, dtype: str | None = None, precision: str | None = None):
        """The EMA LightningDiT, weights sharded over `mesh` (default: every device, data
        parallel); `dtype` / `precision` override the run's compute dtype / model.precision."""
        mesh = sharding.make_mesh(-1, 1) if mesh is None else mesh
        model, _, _ = dit_train.load_ema_model(
            self.workdir,
            mesh,
            dtype=dtype,
            precision=precision,
            config=self.config,
            meta=self.meta,
        )
        return model


def open_run(workdir: str, step: int | None = None) -> Run:
    """The run's config and the meta of checkpoint `step` (default: the latest); no weights."""
    check_workdir(workdir)
    path = ckpt_lib.as_path(workdir)
    config = ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))
    return Run(str(path), config, dit_train.load_meta(str(path), step))


def load_run(workdir: str, step: int | None = None, *, mesh=None, dtype: str | None = None):
    """(EMA LightningDiT, meta, config) of a LightningDiT run folder, read once."""
    run = open_run(workdir, step)
    return run.ema_model(mesh, dtype=dtype), run.meta, run.config


def latent_stats(meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(mean [C], std [C], multiplier) from the checkpoint meta; None if trained unnormalised."""
    if "latent_norm" not in meta:
        raise ValueError(
            f"the checkpoint meta (step {meta.get('step')}) has no latent_norm entry: it was not "
            f"written by lightningdit_jax.train, so the latents cannot be de-normalised"
        )
    if not meta["latent_norm"]:
        return None  # trained on raw latents (data.latent_norm=False): nothing to undo
    missing = [k for k in ("latent_mean", "latent_std", "latent_multiplier") if k not in meta]
    if missing:
        raise ValueError(
            f"the checkpoint meta (step {meta.get('step')}) lacks {missing}: sampling would "
            f"decode un-de-normalised latents (reference issue #34). Retrain or re-save the "
            f"checkpoint with lightningdit_jax.train, which stores the latent stats"
        )
    mean = np.asarray(meta["latent_mean"], np.float32)
    std = np.asarray(meta["latent_std"], np.float32)
    mult = float(meta["latent_multiplier"])
    if mean.shape != std.shape or mean.ndim != 1 or np.any(std <= 0) or mult == 0:
        raise ValueError(
            f"bad latent stats in the checkpoint meta: mean {mean.shape}, std {std.shape} "
            f"(must be [C] and > 0), multiplier {mult}"
        )
    return mean, std, mult


def tokenizer_config(ref_config: Any, *, dtype: str | None = None):
    """The AutoencoderConfig a checkpoint meta records for its tokenizer: a dict of fields.
    Checkpoints written before 2026-12 hold a config file variant instead ("vavae_f16d32.py[:v]"),
    read from this repository's configs/ folder; `dtype` replaces the stored compute dtype."""
    from vavae_jax import checkpoints

    if isinstance(ref_config, Mapping):
        return checkpoints.autoencoder_config(ref_config, dtype=dtype)
    if isinstance(ref_config, str) and ref_config:
        from vavae_jax.runtime import cli

        file, _, variant = ref_config.partition(":")
        path = pathlib.Path(__file__).resolve().parents[1] / "configs" / pathlib.Path(file).name
        if not path.is_file():
            raise FileNotFoundError(
                f"the checkpoint names its tokenizer's architecture by the config file "
                f"{ref_config!r} (written before 2026-12), and {path} does not exist: pass "
                f"--tokenizer=<a VA-VAE export folder (launch/convert.py vavae) or trainer run "
                f"folder>, which carries its own architecture"
            )
        config = cli.config_from_file(f"{path}:{variant}" if variant else str(path))
        if dtype is not None:
            config.dtype = dtype
        return checkpoints.run_autoencoder_config(config)
    raise ValueError(
        f"tokenizer config {ref_config!r}: expected a dict of AutoencoderConfig fields or "
        f"'file.py[:variant]'"
    )


def load_tokenizer(
    meta: dict[str, Any],
    path: str = "",
    *,
    dtype: str | None = None,
    run_dtype: str = "float32",
):
    """The VA-VAE AutoencoderKL that decodes a run's latents: `path` (an export folder, a vavae
    trainer workdir or an official .pt) or else the one the checkpoint meta names. A .pt's
    architecture is the meta's tokenizer config; its compute dtype `dtype`, else the recorded
    one, else `run_dtype` (the run's)."""
    from vavae_jax import checkpoints

    ref = meta.get("tokenizer") or {}
    path = path or ref.get("path", "")
    if not path:
        raise ValueError(
            "the checkpoint meta names no tokenizer (tokenizer.path was empty at training): pass "
            "--tokenizer=<VA-VAE export dir written by launch/convert.py vavae>"
        )
    p = pathlib.Path(path)
    if p.is_dir():
        if not ((p / checkpoints.EXPORT_JSON).is_file() or (p / "checkpoints").is_dir()):
            raise FileNotFoundError(
                f"tokenizer {path} holds no {checkpoints.EXPORT_JSON} and no checkpoints/: "
                f"expected a VA-VAE export directory (launch/convert.py vavae --out=...) or "
                f"trainer workdir"
            )
        return checkpoints.load_autoencoder(p, dtype=dtype)[0]
    if p.is_file():
        ref_config = ref.get("config")
        if dtype is None and isinstance(ref_config, Mapping) and "dtype" not in ref_config:
            dtype = run_dtype
        cfg = tokenizer_config(ref_config, dtype=dtype)
        return checkpoints.load_autoencoder(p, cfg)[0]
    raise FileNotFoundError(
        f"tokenizer {path} not found (named by "
        f"{'the checkpoint meta' if path == ref.get('path') else '--tokenizer'}); pass "
        f"--tokenizer=<VA-VAE export dir written by launch/convert.py vavae>"
    )


def check_compatible(ae, mcfg, stats) -> None:
    c = mcfg.in_channels
    if ae.config.embed_dim != c:
        raise ValueError(
            f"the tokenizer has {ae.config.embed_dim} latent channels but the LightningDiT "
            f"takes in_channels={c}: pass the VA-VAE the latents were extracted with (--tokenizer)"
        )
    if stats is not None and stats[0].shape != (c,):
        raise ValueError(
            f"the checkpoint meta holds latent stats for {stats[0].shape[0]} channels, the model "
            f"has in_channels={c}"
        )


def class_balanced_labels(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
    """Sample i gets label i % num_classes, then a permutation drawn from `seed`: [N] int32."""
    labels = np.arange(num_samples, dtype=np.int64) % num_classes
    perm = np.random.default_rng(seed).permutation(num_samples)
    return labels[perm].astype(np.int32)


def to_uint8(images: jax.Array) -> jax.Array:
    """Reference tokenizer/vavae.py decode_to_images: clamp(127.5 x + 128, 0, 255).to(uint8)
    (the cast truncates)."""
    return jnp.floor(jnp.clip(127.5 * images + 128.0, 0.0, 255.0)).astype(jnp.uint8)


class Sampler:
    """noise + labels -> uint8 images [B, H, W, 3], batch sharded over the mesh's data axis
    (`load_sampler` builds one from a run folder)."""

    def __init__(self, model, ae, meta: dict[str, Any], guidance: sampling.Guidance, mesh=None):
        self.model, self.meta, self.guidance = model, meta, guidance
        self.mesh = sharding.make_mesh(-1, 1) if mesh is None else mesh
        self.mcfg = model.config
        stats = latent_stats(meta)
        check_compatible(ae, self.mcfg, stats)
        self.z_sh = sharding.batch_sharding(self.mesh, 4)
        self.y_sh = sharding.batch_sharding(self.mesh, 1)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        ae_graphdef, ae_state = nnx.split(ae)
        self.ae_state = jax.device_put(ae_state, replicated)
        if stats is None:
            mean, std, mult = np.zeros(1, np.float32), np.ones(1, np.float32), 1.0
        else:
            mean, std, mult = stats

        @jax.jit
        def decode(ae_state, x):  # [B, h, w, C] normalised latents -> [B, H, W, 3] uint8
            z = latent_data.denormalize(x, mean, std, mult)
            return to_uint8(nnx.merge(ae_graphdef, ae_state).decode(z))

        self._decode = decode

    def noise(self, key, n: int) -> np.ndarray:
        c = self.mcfg
        z = jax.random.normal(key, (n, c.input_size, c.input_size, c.in_channels), jnp.float32)
        return np.asarray(z)

    def __call__(self, z0: np.ndarray, y: np.ndarray) -> np.ndarray:
        """z0 [B, h, w, C], y [B] -> uint8 [B, H, W, 3]; B is padded (zeros, label 0) to a
        multiple of the devices and the padding dropped, so results do not depend on it."""
        n = len(y)
        pad = -n % self.mesh.size
        z0 = np.concatenate([z0, np.zeros((pad, *z0.shape[1:]), z0.dtype)])
        y = np.concatenate([y.astype(np.int32), np.zeros(pad, np.int32)])
        z0 = jax.device_put(z0, self.z_sh)
        y = jax.device_put(y, self.y_sh)
        x = sampling.sample_ode(self.model, z0, y, self.guidance)
        images = self._decode(self.ae_state, x)
        return np.asarray(multihost_utils.process_allgather(images, tiled=True))[:n]

    def generate(self, labels, *, seed: int = 0) -> np.ndarray:
        """Class labels [N] -> uint8 images [N, H, W, 3], noise from `seed`."""
        y = np.asarray(labels, np.int32).reshape(-1)
        nc = self.mcfg.num_classes
        bad = sorted({int(k) for k in y if not 0 <= k < nc})
        if bad:
            raise ValueError(f"labels {bad} are outside [0, {nc}) for this model")
        return self(self.noise(jax.random.key(seed), len(y)), y)


def load_sampler(
    workdir: str,
    *,
    tokenizer: str = "",
    step: int | None = None,
    dtype: str | None = None,
    precision: str | None = None,
    mesh=None,
    guidance: sampling.Guidance | None = None,
    run: Run | None = None,
    **overrides,
) -> Sampler:
    """The `Sampler` of a LightningDiT run: its EMA weights, the latent stats of its meta, its
    tokenizer (or `tokenizer`) and its `config.sample` guidance (or `guidance`), with the
    overrides that are not None (num_steps=, cfg_scale=, ...). `run`: the already opened run.
    `precision`: the model's matmul precision instead of the run's ("fp8": the blocks' products
    in float8, weights quantised once per sampler call; the tokenizer stays in `dtype`)."""
    run = open_run(workdir, step) if run is None else run
    latent_stats(run.meta)  # before any weights are read
    mesh = sharding.make_mesh(-1, 1) if mesh is None else mesh
    model = run.ema_model(mesh, dtype=dtype, precision=precision)
    if model.config.precision != "default":
        log.info("the model's matmuls: precision %s", model.config.precision)
    run_dtype = jnp.dtype(trainer.compute_dtype(run.config)).name
    ae = load_tokenizer(run.meta, tokenizer, dtype=dtype, run_dtype=run_dtype)
    if guidance is None:
        guidance = sampling.Guidance.from_config(run.config.sample)
    return Sampler(model, ae, run.meta, guidance.replace(**overrides), mesh)


def _atomic_savez(path: str, **arrays) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _chunk_path(out: str, c: int) -> str:
    return os.path.join(out, f"chunk_{c:05d}.npz")


# Settings added since the first sample_settings.json, with the value every earlier run had.
_SETTINGS_BEFORE = {"precision": "default"}


def _check_settings(out: str, settings: dict[str, Any], run_dtype: str | None = None) -> None:
    """A rerun must use the settings of the chunks already written (else they would mix).
    `run_dtype`: the run's own compute dtype here, what a `dtype` of "" meant in files written
    before the effective dtype was recorded (2026-12-05)."""
    path = os.path.join(out, SETTINGS_FILE)
    if os.path.exists(path):
        old = {**_SETTINGS_BEFORE, **json.loads(pathlib.Path(path).read_text())}
        if old.get("dtype") == "" and run_dtype is not None:
            old["dtype"] = run_dtype
        if old != settings:
            diff = {k: (old.get(k), settings.get(k)) for k in set(old) | set(settings)}
            diff = {k: v for k, v in diff.items() if v[0] != v[1]}
            raise ValueError(
                f"{out} holds chunks sampled with other settings (written, now): {diff}; use "
                f"another --out or the same flags"
            )
    else:
        tmp = f"{path}.tmp{os.getpid()}"
        pathlib.Path(tmp).write_text(json.dumps(settings, indent=2, sort_keys=True))
        os.replace(tmp, path)


def merge_chunks(out: str, num_chunks: int, labels: np.ndarray, image_shape) -> str:
    """chunk_*.npz -> samples_<N>.npz (arr_0 uint8 [N, H, W, 3], labels [N]), streamed into the
    zip so that 50k images need no second copy in memory; written atomically."""
    n = len(labels)
    final = os.path.join(out, f"samples_{n}.npz")
    tmp = f"{final}.tmp{os.getpid()}"
    shape = (n, *image_shape)
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
        "fortran_order": False,
        "shape": shape,
    }
    written = 0
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            for c in range(num_chunks):
                with np.load(_chunk_path(out, c)) as chunk:
                    x, y = chunk["arr_0"], chunk["labels"]
                want = labels[written : written + len(y)]
                if x.dtype != np.uint8 or x.shape[1:] != tuple(image_shape) or len(x) != len(y):
                    raise ValueError(f"{_chunk_path(out, c)}: images {x.dtype} {x.shape}")
                if not np.array_equal(y, want):
                    raise ValueError(
                        f"{_chunk_path(out, c)} holds other labels than chunk {c} of this run: "
                        f"it was written with other settings; delete {out} and sample again"
                    )
                f.write(np.ascontiguousarray(x).tobytes())
                written += len(x)
        if written != n:
            raise ValueError(f"the chunks in {out} hold {written} images, expected {n}")
        with zf.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, labels.astype(np.int32))
    os.replace(tmp, final)
    return final


def sample_npz(
    workdir: str,
    out: str,
    *,
    num_samples: int,
    batch_size: int,
    seed: int = 0,
    tokenizer: str = "",
    step: int | None = None,
    dtype: str | None = None,
    precision: str | None = None,
    keep_chunks: bool = False,
    max_chunks: int | None = None,
    progress: bool = True,
    **overrides,
) -> str | None:
    """FID samples of a run: `out/samples_<num_samples>.npz` with `arr_0` uint8 [N, H, W, 3]
    (ADM evaluator format) and `labels` [N]; returns its path (None when stopped early after
    `max_chunks` newly written chunks, which simulates a preemption). `overrides`: Guidance
    fields (num_steps=, cfg_scale=, ...); those left None come from the run's config.sample.

    Labels are class balanced (sample i has label i % num_classes, then a permutation drawn
    from `seed`); chunk c of `batch_size` samples uses the noise of fold_in(key(seed), c), so
    every chunk is reproducible on its own. Each chunk is written atomically (tmp + rename) as
    `chunk_00012.npz`; a rerun with the same settings skips finished chunks, and the chunks are
    merged at the end, exactly N images in label order of the permutation.
    """
    if num_samples <= 0:
        raise ValueError(f"num_samples={num_samples}: must be positive")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}: must be positive")
    mesh = sharding.make_mesh(-1, 1)
    # Settings first (meta and config.json only, no weights): a rerun must match them.
    run = open_run(workdir, step)
    precision = precision or run.config.model.get("precision", "default")
    fp8.check_backend(precision)  # before anything is written to `out`
    guidance = sampling.Guidance.from_config(run.config.sample, **overrides)
    run_dtype = trainer.compute_dtype(run.config)
    settings = dict(
        guidance.to_dict(),
        workdir=run.workdir,
        step=run.step,
        tokenizer=tokenizer or run.meta["tokenizer"]["path"],
        num_samples=num_samples,
        batch_size=batch_size,
        seed=seed,
        dtype=dtype or run_dtype,  # the compute dtype in force, the run's unless overridden
        precision=precision,
    )
    pid = jax.process_index()
    if pid == 0:
        os.makedirs(out, exist_ok=True)
        _check_settings(out, settings, run_dtype)
    final = os.path.join(out, f"samples_{num_samples}.npz")
    if os.path.exists(final):
        log.info("%s exists: nothing to do", final)
        return final
    sampler = load_sampler(
        workdir,
        tokenizer=tokenizer,
        dtype=dtype,
        precision=precision,
        mesh=mesh,
        guidance=guidance,
        run=run,
    )
    log.info("sampling %d images from %s step %d: %s", num_samples, workdir, run.step, guidance)
    labels = class_balanced_labels(num_samples, sampler.mcfg.num_classes, seed)
    num_chunks = -(-num_samples // batch_size)
    done = np.array([os.path.exists(_chunk_path(out, c)) for c in range(num_chunks)])
    done = np.asarray(multihost_utils.broadcast_one_to_all(done), bool)  # process 0 decides
    n_done = int(sum(min(batch_size, num_samples - c * batch_size) for c in np.flatnonzero(done)))
    pbar = None
    if progress and pid == 0:  # a bar where a terminal watches, else plain log lines
        pbar = loop.Progress(num_samples, "sample", unit="img", initial=n_done)
    key = jax.random.key(seed)
    written, t0, n_new = 0, time.perf_counter(), 0
    image_shape = None
    try:
        for c in range(num_chunks):
            if done[c]:
                continue
            lo, hi = c * batch_size, min((c + 1) * batch_size, num_samples)
            # The last chunk is padded to a full batch (one compiled shape); padding is dropped.
            y = np.resize(labels[lo:hi], batch_size)
            z0 = sampler.noise(jax.random.fold_in(key, c), batch_size)
            images = sampler(z0, y)[: hi - lo]
            image_shape = images.shape[1:]
            if pid == 0:
                _atomic_savez(_chunk_path(out, c), arr_0=images, labels=labels[lo:hi])
            written += 1
            n_new += hi - lo
            if pbar is not None:
                pbar.update(hi - lo, img_s=f"{n_new / (time.perf_counter() - t0):.2f}")
            if max_chunks is not None and written >= max_chunks and not done[c + 1 :].all():
                return None  # stopped with chunks left, as a preempted run
    finally:
        if pbar is not None:
            pbar.close()
    multihost_utils.sync_global_devices("sample: chunks written")
    if pid != 0:
        return final
    if image_shape is None:
        with np.load(_chunk_path(out, 0)) as first:
            image_shape = first["arr_0"].shape[1:]
    path = merge_chunks(out, num_chunks, labels, image_shape)
    if not keep_chunks:
        for c in range(num_chunks):
            os.remove(_chunk_path(out, c))
    if n_new:
        log.info("%d new images at %.2f img/s", n_new, n_new / (time.perf_counter() - t0))
    log.info("wrote %s", path)
    return path


def demo_grid(
    workdir: str,
    out: str,
    classes: list[int],
    *,
    seed: int = 0,
    columns: int = 4,
    tokenizer: str = "",
    step: int | None = None,
    dtype: str | None = None,
    precision: str | None = None,
    **overrides,
) -> str:
    """One sample per class in `classes` -> `out/grid_<step>.png` with `columns` images a row
    (the reference demo mode: 2x4 for 8 classes). `overrides`: Guidance fields."""
    if not classes:
        raise ValueError("--classes is empty: give class indices such as 975,3,207")
    sampler = load_sampler(
        workdir, tokenizer=tokenizer, step=step, dtype=dtype, precision=precision, **overrides
    )
    images = sampler.generate(classes, seed=seed)
    from vavae_jax.runtime.logging import save_png, tile_images

    grid = tile_images(images, columns)
    path = os.path.join(out, f"grid_{sampler.meta['step']:07d}.png")
    if jax.process_index() == 0:
        save_png(path, grid)
        log.info("wrote %s (classes %s)", path, classes)
    return path
