"""Latent shards for LightningDiT: ArrayRecord files + an index, latent stats, a grain pipeline.

On disk (written by launch/extract_latents.py, read by the trainer):
  <dir>/index.json            {"shape": [2, h, w, C], "dtype": "float32", "num_classes": ...,
                               "shards": [{"file": "latents-00000.array_record", "count": n}, ...]}
  <dir>/latents-NNNNN.array_record   one record per image (see `encode_record`)
  <dir>/latent_stats.npz      `mean`, `std` [C] float32 (see `compute_stats`)

A record holds the latent of the image and of its horizontal flip, [2, h, w, C], and the label,
like the reference's `latents` / `latents_flip` / `labels` safetensors triples
(extract_features.py). Training picks one of the two at random per record
(reference datasets/img_latent_dataset.py `__getitem__`), then normalises
x1 = (z - mean) / std * multiplier.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from vavae_jax.runtime.batches import LoaderIterator

INDEX_FILE = "index.json"
STATS_FILE = "latent_stats.npz"
_MAGIC = b"LDL1"
_HEADER = struct.Struct("<4si")  # magic, label
DTYPES = ("float32", "bfloat16")


def default_data_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            data_dir="",  # the output folder of launch/extract_latents.py
            latent_norm=True,  # reference data.latent_norm
            latent_multiplier=1.0,  # reference data.latent_multiplier
            random_flip=True,  # pick the latent of the image or of its flip at random
            worker_count=0,
            worker_buffer_size=2,
        )
    )


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------
def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name == "float32":
        return np.dtype(np.float32)
    raise ValueError(f"latent dtype {name!r}: expected one of {DTYPES}")


def encode_record(latents: np.ndarray, label: int, dtype: str = "float32") -> bytes:
    """[2, h, w, C] (image, flip) + label -> bytes: 8-byte header then the raw C-order array."""
    latents = np.asarray(latents)
    if latents.ndim != 4 or latents.shape[0] != 2:
        raise ValueError(f"expected latents [2, h, w, C] (image, flip), got {latents.shape}")
    arr = np.ascontiguousarray(latents.astype(_np_dtype(dtype)))
    return _HEADER.pack(_MAGIC, int(label)) + arr.tobytes()


def decode_record(
    record: bytes, shape: Sequence[int], dtype: str = "float32"
) -> tuple[np.ndarray, int]:
    """Inverse of `encode_record`: ([2, h, w, C] float32, label)."""
    magic, label = _HEADER.unpack_from(record)
    if magic != _MAGIC:
        raise ValueError(f"not a latent record (magic {magic!r}, expected {_MAGIC!r})")
    arr = np.frombuffer(record, _np_dtype(dtype), offset=_HEADER.size).reshape(shape)
    return arr.astype(np.float32), label


def write_shard(path: str, latents: np.ndarray, labels: np.ndarray, dtype: str = "float32") -> None:
    """Writes one shard atomically: a temporary file, then a rename (a killed run leaves no
    half-written shard under the final name)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = path + ".tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for z, y in zip(latents, labels):
        writer.write(encode_record(z, int(y), dtype))
    writer.close()
    os.replace(tmp, path)


def read_shard(path: str, shape, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """All records of one shard: latents [n, 2, h, w, C] float32, labels [n] int32."""
    source = grain.sources.ArrayRecordDataSource([path])
    pairs = [decode_record(source[i], shape, dtype) for i in range(len(source))]
    return (
        np.stack([p[0] for p in pairs]) if pairs else np.zeros((0, *shape), np.float32),
        np.asarray([p[1] for p in pairs], np.int32),
    )


def load_index(data_dir: str) -> dict[str, Any]:
    path = os.path.join(data_dir, INDEX_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no latent index at {path}: data.data_dir must be an output folder of "
            f"launch/extract_latents.py (index.json + latents-*.array_record + latent_stats.npz)"
        )
    with open(path) as f:
        return json.load(f)


def save_index(data_dir: str, index: dict[str, Any]) -> None:
    tmp = os.path.join(data_dir, INDEX_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(data_dir, INDEX_FILE))


# ---------------------------------------------------------------------------------------------
# Latent stats
# ---------------------------------------------------------------------------------------------
class StatsAccumulator:
    """Per-channel mean and (unbiased) std over [N, h, w], merged batch by batch in float64
    (Chan et al.'s parallel variance), equal to numpy's two-pass result to float64 rounding.

    Reference (datasets/img_latent_dataset.py `compute_latent_stats`): mean and std over dims
    [0, 2, 3] of NCHW `latents` (the unflipped image's latent), torch's unbiased std. The
    reference uses a random subset of 10,000 images; we use every image.
    """

    def __init__(self, channels: int):
        self.n = 0
        self.mean = np.zeros(channels, np.float64)
        self.m2 = np.zeros(channels, np.float64)

    def update(self, z: np.ndarray) -> None:
        z = np.asarray(z, np.float64).reshape(-1, self.mean.shape[0])
        if not len(z):
            return
        n_b = z.shape[0]
        mean_b = z.mean(axis=0)
        m2_b = ((z - mean_b) ** 2).sum(axis=0)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * n_b / n)
        self.n = n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"latent stats need at least 2 values per channel, got {self.n}")
        return self.mean.astype(np.float32), np.sqrt(self.m2 / (self.n - 1)).astype(np.float32)


def save_stats(path: str, mean: np.ndarray, std: np.ndarray) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, mean=np.asarray(mean, np.float32), std=np.asarray(std, np.float32))
    os.replace(tmp, path)


def load_stats(path: str) -> dict[str, np.ndarray]:
    """{"mean": [C], "std": [C]} float32 from a `.npz` or a `.json` with those keys."""
    if os.path.isdir(path):
        path = os.path.join(path, STATS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no latent stats at {path}: expected the latent_stats.npz written by "
            f"launch/extract_latents.py"
        )
    if path.endswith(".json"):
        with open(path) as f:
            raw = json.load(f)
    else:
        with np.load(path) as f:
            raw = {k: f[k] for k in f.files}
    missing = [k for k in ("mean", "std") if k not in raw]
    if missing:
        raise ValueError(f"latent stats {path} lack {missing}; expected keys mean and std [C]")
    mean = np.asarray(raw["mean"], np.float32).reshape(-1)
    std = np.asarray(raw["std"], np.float32).reshape(-1)
    if mean.shape != std.shape or np.any(std <= 0):
        raise ValueError(f"latent stats {path}: mean {mean.shape}, std {std.shape} (must be > 0)")
    return {"mean": mean, "std": std}


def normalize(z, mean, std, multiplier: float = 1.0):
    """Reference ImgLatentDataset: (z - mean) / std * multiplier, channels last."""
    return (z - mean) / std * multiplier


def denormalize(x, mean, std, multiplier: float = 1.0):
    """Inverse of `normalize` (reference inference.py: x / multiplier * std + mean)."""
    return x / multiplier * std + mean


# ---------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------
class _Parse(grain.transforms.RandomMap):
    """bytes -> {"latent" [h, w, C] float32 (normalised), "label" int32}: picks the image or its
    flip with probability 1/2 from grain's per-record rng (so a resumed run picks the same)."""

    def __init__(self, shape, dtype, mean, std, multiplier, random_flip):
        self.shape, self.dtype = tuple(shape), dtype
        self.mean, self.std, self.multiplier = mean, std, multiplier
        self.random_flip = random_flip

    def random_map(self, record: bytes, rng: np.random.Generator) -> dict[str, np.ndarray]:
        z, label = decode_record(record, self.shape, self.dtype)
        which = int(rng.random() < 0.5) if self.random_flip else 0
        latent = z[which]
        if self.mean is not None:
            latent = normalize(latent, self.mean, self.std, self.multiplier).astype(np.float32)
        return {"latent": latent, "label": np.int32(label)}


class GlobalBatchSampler:
    """A grain sampler whose global batches do not depend on the number of hosts or workers.

    One shuffled, endless stream of records (a new permutation every epoch) is cut into global
    batches of `per_host * shard_count`; host h reads positions [h * per_host, (h + 1) * per_host)
    of every global batch, so 1 host or N hosts train on the same batches (the same sets as the
    reference's DistributedSampler, whose rank r reads perm[r::world_size]). The random flip is
    drawn from the stream position, so it is host-independent as well. Checkpoints record
    `repr(sampler)`: a run resumes with the same number of hosts and workers.

    grain's DataLoader asks for global index g = local_index * shard_count + shard_index, and
    with W workers, worker (k mod W) reads local indices k and emits whole batches, taken round
    robin; `__getitem__` maps g back to (host batch n, position j) and then to its stream
    position n * global_batch + h * per_host + j.
    """

    def __init__(self, num_records: int, per_host: int, shard_count: int, workers: int, seed: int):
        if num_records <= 0:
            raise ValueError(f"num_records={num_records}: the latent index lists no records")
        self.num_records, self.per_host = num_records, per_host
        self.shard_count, self.workers, self.seed = shard_count, max(workers, 1), seed
        self._keys = grain.MapDataset.range(num_records).shuffle(seed=seed)

    def __len__(self) -> int:
        return sys.maxsize

    def __repr__(self) -> str:  # grain checks it on restore: a resumed run must read the same
        return (
            f"GlobalBatchSampler(num_records={self.num_records}, per_host={self.per_host}, "
            f"shard_count={self.shard_count}, workers={self.workers}, seed={self.seed})"
        )

    def position(self, index: int) -> int:
        """The stream position of the record that grain's global index `index` reads."""
        host, local = index % self.shard_count, index // self.shard_count
        worker, in_worker = local % self.workers, local // self.workers
        batch = (in_worker // self.per_host) * self.workers + worker
        return (batch * self.shard_count + host) * self.per_host + in_worker % self.per_host

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        pos = self.position(index)
        return grain.RecordMetadata(
            index=index,
            record_key=int(self._keys[pos]),
            rng=np.random.Generator(np.random.Philox(key=self.seed + pos)),
        )


class LatentIterator(LoaderIterator):
    """Per-host batches {"latent" [B, h, w, C] float32, "label" [B] int32} (see
    `batches.LoaderIterator` for the checkpointable state)."""


def make_train_iterator(
    config: ml_collections.ConfigDict,
    global_batch_size: int,
    seed: int,
    *,
    stats: dict[str, np.ndarray] | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> tuple[LatentIterator, dict[str, Any]]:
    """The shuffled, endless training pipeline of this host, and the index of the latents.

    Each host yields its `global_batch_size // process_count` slice of every global batch (see
    `GlobalBatchSampler`). `stats` default to the data folder's latent_stats.npz (needed when
    `latent_norm`)."""
    if not config.data_dir:
        raise ValueError("data.data_dir is empty: give the output folder of extract_latents.py")
    index = load_index(config.data_dir)
    files = [os.path.join(config.data_dir, s["file"]) for s in index["shards"]]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"latent shards listed in the index are missing: {missing}")
    if config.latent_norm and stats is None:
        stats = load_stats(config.data_dir)
    index_count = int(shard_index if shard_index is not None else jax.process_index())
    count = int(shard_count if shard_count is not None else jax.process_count())
    if global_batch_size % count:
        raise ValueError(
            f"global batch size {global_batch_size} is not a multiple of {count} processes"
        )
    shard = grain.sharding.ShardOptions(
        shard_index=index_count, shard_count=count, drop_remainder=True
    )
    source = grain.sources.ArrayRecordDataSource(files)
    per_host = global_batch_size // count
    sampler = GlobalBatchSampler(len(source), per_host, count, config.worker_count, seed)
    parse = _Parse(
        index["shape"],
        index["dtype"],
        stats["mean"] if config.latent_norm else None,
        stats["std"] if config.latent_norm else None,
        float(config.latent_multiplier),
        bool(config.random_flip),
    )
    if config.worker_count > 0 and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain reads absl flags in its workers (see vavae_jax.data)
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[parse, grain.transforms.Batch(per_host, drop_remainder=True)],
        shard_options=shard,
        worker_count=config.worker_count,
        worker_buffer_size=config.worker_buffer_size,
    )
    return LatentIterator(loader, len(source), per_host), index
