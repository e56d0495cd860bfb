"""Latent extraction: a dataset encoded by a VA-VAE into latent shards + latent stats.

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
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from lightningdit_jax import data as latent_data
from vavae_jax import data as image_data
from vavae_jax.data import DataCountError
from vavae_jax.runtime import sharding

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
    plans = [p for p in plan_shards(num_records, batch_size, batches_per_shard, nproc)]
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
    pbar, t0, n_done = None, time.perf_counter(), 0
    nproc = jax.process_count()
    if progress:
        from tqdm import tqdm

        pbar = tqdm(
            total=num_records,
            initial=done_records * nproc,
            unit="img",
            desc="extract",
            dynamic_ncols=True,
        )
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
                pbar.update(n_real * nproc)
                pbar.set_postfix(img_s=f"{n_done * nproc / (time.perf_counter() - t0):.1f}")
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
    log.info("%d latents %s in %d shards; stats written", count, shape, len(shards))
    return index
