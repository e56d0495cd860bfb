"""Shared by both sides of the LightningDiT training-parity runs (issue 18, item 2): the work
folder, the latent files, the batch list, the injected t / noise / label drop, the validation and
sampling inputs, the per-step log, the weight-exchange format and the plots.

The scripts beside this file run as `python3 launch/parity/<script>.py`, which puts this folder
on sys.path, so they `import dit_common` (launch/ is no package). This module needs numpy at
import; the functions that read our latent shards or our models import lightningdit_jax (jax)
where they are used, so the reference side (dit_reference.py) never imports jax through it;
matplotlib and PIL are imported by the plots.

Work folder (`--work`, written by dit_make_init.py, then by the runs):
  data/train_latents.npy   [N, 2, h, w, C] float32: the raw latents of each train image and of
                           its horizontal flip (launch/extract_latents.py's records, in order)
  data/train_labels.npy    [N] int32
  data/val_latents.npy     [V, h, w, C] float32: raw latents of the validation subset (unflipped)
  data/val_labels.npy      [V] int32
  data/stats.npz           mean, std [C]: the train extraction's latent_stats.npz; both sides
                           normalise x1 = (z - mean) / std * multiplier
  plan/plan.json           the settings (`read_plan`): preset, model fields, batch, steps, K, ...
  plan/batches.npz         index [S, B] int32 (into train), flip [S, B] uint8 (which latent)
  plan/inject.npz          the first K steps: t [K, B] float32, noise [K, B, h, w, C] float32 (NHWC),
                           drop [K, B] bool (label replaced by the null label)
  plan/val.npz             t [T] float32 (logit-normal quantiles), noise [T, V, h, w, C] float32
  plan/sample.npz          noise [M, h, w, C] float32, labels [M] int32 (per_class per class)
  init/reference_init.pt   {"model", "ema"}: the initial state made by the reference's code
  init/nnx/                the same converted by lightningdit_jax.convert (launch/convert.py)
  logs/<run>.jsonl         one JSON object per line: first {"meta": ...}, then one per step
  ckpt/<run>/step_NNNNNNN.npz   weights after N updates: "model/<key>", "ema/<key>" with the
                           reference's state-dict names and layouts (float32 numpy)
  eval/by_<side>.json      validation losses of every checkpoint, computed by that side
  samples/<run>__by_<side>.npy  sampled latents (normalised, NHWC); images/... uint8 decoded

Steps: the log's "step" s is the index into the batch list; its loss is that of batch s with
the weights after s updates. A checkpoint "step_N" holds the weights after N updates.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import json
import pathlib
import statistics
import sys
import types

import numpy as np

PLAN_FORMAT = "dit_parity_plan/v1"
# Per step: the optimised loss (= mse + cos), its two terms, the global gradient norm before
# the update and the parameter norm after it.
LOG_KEYS = ("loss", "mse", "cos", "grad_norm", "param_norm")
# Fields of lightningdit_jax.model.LightningDiTConfig that are keyword arguments of the
# reference `LightningDiT.__init__` (the architecture; dtype, remat, scan are ours only).
REFERENCE_FIELDS = (
    "input_size",
    "patch_size",
    "in_channels",
    "hidden_size",
    "depth",
    "num_heads",
    "mlp_ratio",
    "class_dropout_prob",
    "num_classes",
    "learn_sigma",
    "use_qknorm",
    "use_swiglu",
    "use_rope",
    "use_rmsnorm",
    "wo_shift",
)


# ---------------------------------------------------------------------------------------------
# The work folder
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Work:
    root: pathlib.Path

    @classmethod
    def at(cls, path) -> Work:
        return cls(pathlib.Path(path).resolve())

    def __getattr__(self, name):  # data, plan, init, logs, ckpt, eval, samples, images, compare
        if name in ("data", "plan", "init", "logs", "ckpt", "eval", "samples", "images", "compare"):
            return self.root / name
        raise AttributeError(name)

    def log(self, run: str) -> pathlib.Path:
        return self.root / "logs" / f"{run}.jsonl"

    def checkpoint(self, run: str, step: int) -> pathlib.Path:
        return self.root / "ckpt" / run / f"step_{step:07d}.npz"

    def checkpoints(self) -> list[tuple[str, int, pathlib.Path]]:
        """Every (run, step, path) under ckpt/, sorted."""
        out = []
        for path in sorted((self.root / "ckpt").glob("*/step_*.npz")):
            out.append((path.parent.name, int(path.stem.split("_")[1]), path))
        return out

    def sample_file(self, run: str, side: str) -> pathlib.Path:
        return self.root / "samples" / f"{run}__by_{side}.npy"


def read_plan(work: Work) -> dict:
    path = work.plan / "plan.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run launch/parity/dit_make_init.py first")
    plan = json.loads(path.read_text())
    if plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"{path}: format {plan.get('format')!r}, expected {PLAN_FORMAT!r}")
    return plan


def write_json(path, obj) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    tmp.replace(path)


def int_list(text: str) -> list[int]:
    return sorted({int(s) for s in str(text).split(",") if s.strip()})


# ---------------------------------------------------------------------------------------------
# Latents: our extraction's shards -> one array (both sides read the .npy files)
# ---------------------------------------------------------------------------------------------
def read_extracted(latent_dir) -> tuple[np.ndarray, np.ndarray, dict]:
    """All records of a launch/extract_latents.py folder in index order: latents [N, 2, h, w, C]
    float32 (image, flip), labels [N] int32, and its index. Uses our reader (jax imported)."""
    from lightningdit_jax import data as data_lib

    index = data_lib.load_index(str(latent_dir))
    shape = index["shape"]
    zs, ys = [], []
    for shard in index["shards"]:
        z, y = data_lib.read_shard(
            str(pathlib.Path(latent_dir) / shard["file"]), shape, index["dtype"]
        )
        if len(z) != shard["count"]:
            raise ValueError(f"{shard['file']}: {len(z)} records, the index says {shard['count']}")
        zs.append(z)
        ys.append(y)
    return np.concatenate(zs), np.concatenate(ys).astype(np.int32), index


def read_stats(latent_dir) -> dict[str, np.ndarray]:
    from lightningdit_jax import data as data_lib

    return data_lib.load_stats(str(latent_dir))


class Data:
    """What a training side reads: the train latents (memory-mapped), labels, stats, the batch
    list and the injected inputs of the first K steps."""

    def __init__(self, work: Work, plan: dict):
        self.plan = plan
        self.latents = np.load(work.data / "train_latents.npy", mmap_mode="r")
        self.labels = np.load(work.data / "train_labels.npy")
        with np.load(work.data / "stats.npz") as f:
            self.mean, self.std = f["mean"].astype(np.float32), f["std"].astype(np.float32)
        self.multiplier = float(plan["latent_multiplier"])
        with np.load(work.plan / "batches.npz") as f:
            self.index, self.flip = f["index"], f["flip"]
        self.inject_steps = int(plan["inject_steps"])
        self._inject = None
        if self.inject_steps:
            with np.load(work.plan / "inject.npz") as f:
                self._inject = {k: f[k] for k in ("t", "noise", "drop")}

    @property
    def num_steps(self) -> int:
        return int(self.index.shape[0])

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(raw latents [B, h, w, C] float32, labels [B] int32) of batch `step`."""
        idx, flip = self.index[step], self.flip[step].astype(np.int64)
        z = np.asarray(self.latents[idx, flip], np.float32)  # one of the pair per record
        return z, self.labels[idx].astype(np.int32)

    def injected(self, step: int) -> dict[str, np.ndarray] | None:
        """{"t" [B], "noise" [B, h, w, C], "drop" [B] bool} of the first K steps, else None."""
        if step >= self.inject_steps:
            return None
        return {k: v[step] for k, v in self._inject.items()}


def read_val(work: Work) -> dict[str, np.ndarray]:
    """{"latents" [V, h, w, C] raw, "labels" [V], "t" [T], "noise" [T, V, h, w, C]}."""
    out = {
        "latents": np.load(work.data / "val_latents.npy"),
        "labels": np.load(work.data / "val_labels.npy").astype(np.int32),
    }
    with np.load(work.plan / "val.npz") as f:
        out.update(t=f["t"].astype(np.float32), noise=f["noise"])
    return out


def read_sample_inputs(work: Work) -> tuple[np.ndarray, np.ndarray]:
    with np.load(work.plan / "sample.npz") as f:
        return f["noise"].astype(np.float32), f["labels"].astype(np.int32)


# ---------------------------------------------------------------------------------------------
# The plan: batch list, injected inputs, validation grid, sampling noise (numpy, seeded)
# ---------------------------------------------------------------------------------------------
def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def make_batches(num_records: int, steps: int, batch: int, seed: int):
    """index [S, B] int32, flip [S, B] uint8: the reference loader's order (DataLoader with
    shuffle=True, drop_last=True: a new permutation each epoch, its last partial batch dropped)
    and its flip choice (ImgLatentDataset: the flip's latent with probability 1/2)."""
    if batch > num_records:
        raise ValueError(f"batch {batch} is larger than the {num_records} train records")
    rng = _rng(seed, 0)
    per_epoch = num_records // batch
    batches = []
    while len(batches) < steps:
        perm = rng.permutation(num_records)
        batches.extend(perm[i * batch : (i + 1) * batch] for i in range(per_epoch))
    index = np.stack(batches[:steps]).astype(np.int32)
    flip = (rng.random((steps, batch)) < 0.5).astype(np.uint8)
    return index, flip


def make_inject(steps: int, batch: int, shape, seed: int, dropout_prob: float):
    """The first `steps` steps' t, noise and label drop, in the reference's distributions:
    t = sigmoid(n), n ~ N(0, 1) (transport.sample_logit_normal: float64, then float32), noise
    ~ N(0, I) [B, h, w, C], drop ~ Bernoulli(dropout_prob) (LabelEmbedder.token_drop)."""
    rng = _rng(seed, 1)
    n = rng.standard_normal((steps, batch))
    t = (1.0 / (1.0 + np.exp(-n))).astype(np.float32)
    noise = rng.standard_normal((steps, batch, *shape), dtype=np.float32)
    drop = rng.random((steps, batch)) < dropout_prob
    return t, noise, drop


def val_times(count: int) -> np.ndarray:
    """t_k = sigmoid(Phi^-1((k + 1/2) / count)): the training distribution's quantiles, so that
    the mean over the grid estimates the expected training loss."""
    nd = statistics.NormalDist()
    q = [nd.inv_cdf((k + 0.5) / count) for k in range(count)]
    return (1.0 / (1.0 + np.exp(-np.asarray(q, np.float64)))).astype(np.float32)


def make_val_noise(count_t: int, count_v: int, shape, seed: int) -> np.ndarray:
    return _rng(seed, 2).standard_normal((count_t, count_v, *shape), dtype=np.float32)


def make_sample_inputs(classes, per_class: int, shape, seed: int):
    """noise [M, h, w, C], labels [M]: `per_class` samples of each class, class-major."""
    labels = np.repeat(np.asarray(classes, np.int32), per_class)
    noise = _rng(seed, 3).standard_normal((len(labels), *shape), dtype=np.float32)
    return noise, labels


def choose_val(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` validation records (all when count <= 0 or >= N), sorted, drawn with `seed`."""
    n = len(labels)
    if count <= 0 or count >= n:
        return np.arange(n)
    return np.sort(_rng(seed, 4).choice(n, count, replace=False))


# ---------------------------------------------------------------------------------------------
# Log
# ---------------------------------------------------------------------------------------------
class LogWriter:
    """JSON lines: {"meta": ...} first, then {"step": s, "time": seconds, "injected": bool,
    <LOG_KEYS>} per step; `finish` appends {"end": ...} (throughput, checkpoints)."""

    def __init__(self, path, meta: dict):
        from vavae_common import JsonLines  # the same unbuffered appends as the VA-VAE logs

        self.out = JsonLines(path)
        self.out.line({"meta": meta})

    def write(self, step: int, values: dict, seconds: float, injected: bool) -> None:
        row = {"step": int(step), "time": round(float(seconds), 4), "injected": bool(injected)}
        row.update({k: float(values[k]) for k in LOG_KEYS if k in values})
        self.out.line(row)

    def finish(self, end: dict) -> None:
        self.out.line({"end": end})
        self.out.close()


def read_log(path) -> tuple[dict, dict[str, np.ndarray], dict]:
    """(meta, {key: values over steps} with "step", "time", "injected", end)."""
    meta, end, rows = {}, {}, []
    for line in pathlib.Path(path).read_text().splitlines():
        obj = json.loads(line)
        if "meta" in obj:
            meta = obj["meta"]
        elif "end" in obj:
            end = obj["end"]
        else:
            rows.append(obj)
    keys = ["step", "time", "injected", *[k for k in LOG_KEYS if rows and k in rows[0]]]
    return meta, {k: np.asarray([r.get(k, np.nan) for r in rows], np.float64) for k in keys}, end


def throughput(log: dict[str, np.ndarray], batch: int, skip: int = 20) -> float | None:
    """Images per second between log step `skip` and the last (compiles and warm-up left out)."""
    t, s = log["time"], log["step"]
    if len(t) <= skip + 1:
        return None
    return float((s[-1] - s[skip]) * batch / max(t[-1] - t[skip], 1e-9))


# ---------------------------------------------------------------------------------------------
# Weights: the exchange format (reference names and layouts) and ours -> it
# ---------------------------------------------------------------------------------------------
def save_weights(path, **groups: dict[str, np.ndarray]) -> None:
    """`groups` name -> {reference key: array}; written as "<group>/<key>" (float32)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {
        f"{g}/{k}": np.ascontiguousarray(v, np.float32)
        for g, sd in groups.items()
        for k, v in sd.items()
    }
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **flat)
    tmp.replace(path)


def load_weights(path, group: str) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        prefix = group + "/"
        out = {k[len(prefix) :]: f[k] for k in f.files if k.startswith(prefix)}
    if not out:
        raise ValueError(f"{path} holds no {group!r} weights")
    return out


def torch_state_dict(model) -> dict[str, np.ndarray]:
    """Our LightningDiT -> the reference's state dict (numpy): the inverse of
    lightningdit_jax.convert.from_torch_state_dict (names from its `expected_keys`, kernels back
    to [out, in] / OIHW, the stacked blocks split, the RoPE tables as the buffers)."""
    from flax import nnx

    from lightningdit_jax import convert
    from lightningdit_jax.model import Buffer, rope_tables

    config = model.config
    state = nnx.state(model, nnx.Any(nnx.Param, Buffer))
    flat = {
        tuple(str(p) for p in path): np.asarray(v[...], np.float32)
        for path, v in nnx.to_flat_state(state)
    }
    out = {}
    for key, (path, block) in convert.expected_keys(config).items():
        value = flat[path] if block is None else flat[path][block]
        if path[-1] == "kernel" and value.ndim == 2:
            value = value.T  # [in, out] -> [out, in]
        elif path[-1] == "kernel" and value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        out[key] = np.ascontiguousarray(value)
    if config.use_rope:
        cos, sin = rope_tables(config.head_dim, config.grid_size)
        out.update(dict(zip(convert.ROPE_KEYS, (cos, sin))))
    return out


# ---------------------------------------------------------------------------------------------
# The reference's packages (as launch/bench/bench_reference.py imports them)
# ---------------------------------------------------------------------------------------------
def stub_fairscale() -> None:
    """Its models/rmsnorm.py imports fairscale (unused by RMSNorm): a stand-in when missing."""
    try:
        import fairscale  # noqa: F401
    except ImportError:
        layers = types.ModuleType("fairscale.nn.model_parallel.layers")
        for name in ("ColumnParallelLinear", "ParallelEmbedding", "RowParallelLinear"):
            setattr(layers, name, object)
        for name in (
            "fairscale",
            "fairscale.nn",
            "fairscale.nn.model_parallel",
            "fairscale.nn.model_parallel.initialize",
        ):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["fairscale.nn.model_parallel.layers"] = layers


def import_reference(ref_dir) -> None:
    """The checkout's models/ and transport/ packages under their own names (they import each
    other as `models.x`, `transport.x`), without putting the checkout on sys.path."""
    ref = pathlib.Path(ref_dir).resolve()
    if not (ref / "models" / "lightningdit.py").is_file():
        raise SystemExit(
            f"--ref_dir={ref}: no models/lightningdit.py (a hustvl/LightningDiT clone)"
        )
    stub_fairscale()
    for name in ("models", "transport"):
        if name in sys.modules:
            continue
        spec = importlib.machinery.PathFinder.find_spec(name, [str(ref)])
        if spec is None:
            raise SystemExit(f"--ref_dir={ref}: no {name}/ package there")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def reference_model(model_fields: dict):
    """The reference `LightningDiT` of our config fields (train.py passes the same keywords)."""
    from models.lightningdit import LightningDiT

    return LightningDiT(**{k: model_fields[k] for k in REFERENCE_FIELDS}, use_checkpoint=False)


# ---------------------------------------------------------------------------------------------
# Comparison helpers and plots (dit_compare.py)
# ---------------------------------------------------------------------------------------------
def relative_diff(a: np.ndarray, b: np.ndarray, floor: float = 1e-12) -> np.ndarray:
    """|a - b| / max(|a|, |b|, floor)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), floor)


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over `window` steps (shorter at the start)."""
    c = np.cumsum(np.insert(np.asarray(x, np.float64), 0, 0.0))
    n = np.arange(1, len(x) + 1)
    lo = np.maximum(n - window, 0)
    return (c[n] - c[lo]) / (n - lo)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tile_grid(rows: list[list[np.ndarray]], tile: int, gap_after: int | None = None) -> np.ndarray:
    """uint8 [H, W, 3] of rows of uint8 [h, w, 3] images resized to `tile` px; a white gap
    column of tile/4 after column `gap_after` (between the two models)."""
    from PIL import Image

    cols = max(len(r) for r in rows)
    gap = tile // 4 if gap_after is not None else 0
    out = np.full((tile * len(rows), tile * cols + gap, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            if im.shape[:2] != (tile, tile):
                im = np.asarray(Image.fromarray(im).resize((tile, tile), Image.BICUBIC))
            x = j * tile + (gap if gap_after is not None and j > gap_after else 0)
            out[i * tile : (i + 1) * tile, x : x + tile] = im
    return out


def save_png(path, image: np.ndarray) -> None:
    from PIL import Image

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, optimize=True)
