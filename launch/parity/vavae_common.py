"""Shared by both sides of the VA-VAE training-parity runs (issue 18): the batch list, the
images, the per-step log, the shared posterior noise and the plots.

The scripts beside this file run as `python3 launch/parity/<script>.py`, which puts this folder
on sys.path, so they `import vavae_common` (launch/ is no package). It needs numpy and PIL;
jax for the posterior noise, matplotlib for the plots (imported where used).

Batch list (`batches.json`, written by `vavae_make_init.py lists`): the sorted relative paths of
the train subset and of the validation images, and per step the indices (into `train`) and
horizontal-flip flags of its images. Both sides read it; the first steps of the one list are
the exact phase, all of it the free phase.

Images: every JPEG is decoded and resized once (`load_image`: PIL bicubic 224 -> 256, to uint8)
into `.npy` caches that both sides memory-map (`vavae_make_init.py make`); a batch is
`uint8 / 127.5 - 1` (the reference's ImageNet dataset scaling), flipped where the list says.

Log: one JSON object per line and step, the keys of `LOG_KEYS` (absent ones are left out), the
same names on both sides (the reference's log names; ours are its `train/...` metrics).
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

BATCHES_FORMAT = "vavae_parity_batches/v1"

# Per-step log: every loss term, both adaptive weights, the GAN factor, the gradient norms
# (generator: the parameters of the generator optimizer; discriminator: its parameters) and the
# generator's parameter norm after the update.
LOG_KEYS = (
    "total_loss",
    "nll_loss",
    "rec_loss",
    "kl_loss",
    "g_loss",
    "vf_loss",
    "d_weight",
    "vf_weight",
    "disc_factor",
    "disc_loss",
    "logits_real",
    "logits_fake",
    "logvar",
    "grad_norm_g",
    "grad_norm_d",
    "param_norm_g",
)


# ---------------------------------------------------------------------------------------------
# Images and the batch list
# ---------------------------------------------------------------------------------------------
def load_image(path: str | pathlib.Path, size: int) -> np.ndarray:
    """One image as uint8 [size, size, 3]: RGB, PIL bicubic resize when not already that size
    (imagenette-224 -> 256, so that the 16x16 latent grid meets DINOv2's 16x16 tokens at 224)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def make_steps(num_images: int, steps: int, batch: int, seed: int) -> tuple[list, list]:
    """(indices, flips) per step: epochs of seeded permutations of the subset, flips p = 0.5."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < steps * batch:
        order.extend(rng.permutation(num_images).tolist())
    idx = np.asarray(order[: steps * batch]).reshape(steps, batch)
    flips = rng.integers(0, 2, size=(steps, batch))
    return idx.tolist(), flips.tolist()


def write_batches(path, *, train, val, indices, flips, seed, source) -> None:
    doc = dict(
        format=BATCHES_FORMAT,
        source=source,
        seed=seed,
        batch_size=len(indices[0]),
        num_steps=len(indices),
        train=list(train),
        val=list(val),
        indices=indices,
        flips=flips,
    )
    pathlib.Path(path).write_text(json.dumps(doc))


def read_batches(path) -> dict:
    doc = json.loads(pathlib.Path(path).read_text())
    if doc.get("format") != BATCHES_FORMAT:
        raise ValueError(f"{path}: not a batch list of format {BATCHES_FORMAT}")
    return doc


def load_cache(cache_dir, split: str) -> np.ndarray:
    """The uint8 image cache [N, S, S, 3] of `split` ("train" / "val"), memory-mapped."""
    return np.load(pathlib.Path(cache_dir) / f"{split}_u8.npy", mmap_mode="r")


def to_float(images_u8: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 in [-1, 1] (the reference dataset's `image / 127.5 - 1`)."""
    return np.asarray(images_u8, np.float32) / np.float32(127.5) - np.float32(1.0)


def batch_at(cache: np.ndarray, batches: dict, step: int) -> np.ndarray:
    """The float32 NHWC batch of `step` in [-1, 1], flipped where the list says."""
    x = np.array(cache[np.asarray(batches["indices"][step])])
    flip = np.asarray(batches["flips"][step], bool)
    x[flip] = x[flip][:, :, ::-1]
    return to_float(x)


# ---------------------------------------------------------------------------------------------
# The posterior noise of our step, for the reference's exact phase
# ---------------------------------------------------------------------------------------------
def step_key_bits(seed: int, step: int):
    """The raw key our side passes to its step at `step` (`rng_bits`)."""
    import jax

    return jax.random.key_data(jax.random.fold_in(jax.random.key(seed), step))


def posterior_eps(seed: int, step: int, shape_nhwc: tuple[int, ...]) -> np.ndarray:
    """The N(0, 1) draw of `z = mean + std * eps` inside our step at `step`, NHWC float32.

    Mirrors vavae_jax/train_step.py (`rng_sample, rng_lpips = jax.random.split(rng)`;
    `eps = jax.random.normal(rng_sample, mean.shape, jnp.float32)`). If that changes, the
    exact phase departs from its first step (the kl and nll terms), which the comparison shows.
    """
    import jax
    import jax.numpy as jnp

    rng = jax.random.wrap_key_data(step_key_bits(seed, step))
    rng_sample, _ = jax.random.split(rng)
    return np.asarray(jax.random.normal(rng_sample, shape_nhwc, jnp.float32))


# ---------------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------------
class JsonLines:
    """A JSON-lines file written one unbuffered append per line: no Python buffer that a forked
    child could inherit and write again, and no line split between two writes (a CPU smoke run
    once logged "}{{" where a newline belonged). Both harnesses' logs use it."""

    def __init__(self, path, *, append: bool = False):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC)
        self.fd = os.open(self.path, flags, 0o644)

    def line(self, obj: dict) -> None:
        data = (json.dumps(obj) + "\n").encode()
        if os.write(self.fd, data) != len(data):
            raise OSError(f"{self.path}: short write")

    def close(self) -> None:
        os.close(self.fd)


class LogWriter:
    """JSON lines, one per step: {"step": i, "time": s, <LOG_KEYS present>}."""

    def __init__(self, path, meta: dict, *, append: bool = False):
        """`append`: a resumed run adds its rows (after a second meta line) to its log."""
        self.out = JsonLines(path, append=append)
        self.out.line({"meta": meta})

    def write(self, step: int, values: dict, seconds: float) -> None:
        row = {"step": step, "time": round(seconds, 4)}
        row.update({k: float(values[k]) for k in LOG_KEYS if k in values})
        self.out.line(row)

    def close(self) -> None:
        self.out.close()


def read_log(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, {key: values over steps}) of a log; "step" is a key too."""
    meta, rows = {}, []
    for line in pathlib.Path(path).read_text().splitlines():
        obj = json.loads(line)
        if "meta" in obj:
            meta = obj["meta"]
        else:
            rows.append(obj)
    keys = ["step", "time", *[k for k in LOG_KEYS if rows and k in rows[0]]]
    return meta, {k: np.asarray([r.get(k, np.nan) for r in rows], np.float64) for k in keys}


def relative_diff(a: np.ndarray, b: np.ndarray, floor: float = 1e-6) -> np.ndarray:
    """|a - b| / max(|a|, |b|, floor): 0 where both are 0 (the GAN terms before disc_start)."""
    return np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), floor)


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over `window` steps (shorter at the start)."""
    c = np.cumsum(np.insert(np.asarray(x, np.float64), 0, 0.0))
    n = np.arange(1, len(x) + 1)
    lo = np.maximum(n - window, 0)
    return (c[n] - c[lo]) / (n - lo)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------
def plot_curves(runs: dict, keys, path, *, title: str, window: int = 1, rel_to: str | None = None):
    """One panel per key, every run overlaid (smoothed over `window` steps); with `rel_to`, a
    last panel of the largest relative difference of each run to that run over the keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if all(k in log for log in runs.values())]
    n = len(keys) + (1 if rel_to else 0)
    cols = 4
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, log in runs.items():
            ax.plot(log["step"], smooth(log[key], window), label=label, lw=1)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
    if rel_to:
        ax = axes.flat[len(keys)]
        ref = runs[rel_to]
        for label, log in runs.items():
            if label == rel_to:
                continue
            m = min(len(ref["step"]), len(log["step"]))
            rel = np.max([relative_diff(log[k][:m], ref[k][:m]) for k in keys], axis=0)
            ax.semilogy(ref["step"][:m], np.maximum(rel, 1e-12), label=f"{label} vs {rel_to}")
        ax.axhline(1e-4, color="gray", ls="--", lw=0.8)
        ax.set_title("max relative difference over the terms", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_grid(rows: list[np.ndarray], path, tile: int = 128) -> None:
    """A PNG of uint8 NHWC rows (same count each), tiles resized to `tile` pixels."""
    from PIL import Image

    tiles = [[Image.fromarray(im).resize((tile, tile), Image.BICUBIC) for im in r] for r in rows]
    grid = Image.new("RGB", (tile * len(tiles[0]), tile * len(tiles)))
    for i, r in enumerate(tiles):
        for j, im in enumerate(r):
            grid.paste(im, (j * tile, i * tile))
    grid.save(path)
