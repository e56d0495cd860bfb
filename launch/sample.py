"""Samples a LightningDiT run (EMA weights) and decodes with its VA-VAE: FID .npz or a demo grid.

  python launch/sample.py --workdir=runs/lightningdit_xl --out=samples/xl_64ep \
      --num_samples=50000 --batch_size=256
  python launch/sample.py --workdir=runs/lightningdit_xl --out=samples/demo --grid_only \
      --classes=975,3,207,387,388,88,979,279

Reference: inference.py (Euler ODE, 250 steps, timestep shift 0.3, CFG on the first 3 channels
inside the interval t >= cfg_interval_start; de-normalise x / multiplier * std + mean; decode;
uint8 by tokenizer/vavae.py `decode_to_images`: clamp(127.5 x + 128, 0, 255) truncated).
The latent stats and the tokenizer come from the checkpoint meta (never from flags; reference
issue #34). The guidance settings default to the run's `config.sample` (10.0 / 0.11 for the
64-epoch model, 6.7 / 0.125 for the 800-epoch one).

Labels are class balanced (sample i has label i % num_classes, then a permutation drawn from
--seed); chunk c of --batch_size samples uses the noise of fold_in(key(seed), c), so every chunk
is reproducible on its own. Each chunk is written atomically (tmp + rename) as
`chunk_00012.npz`; a rerun with the same settings skips finished chunks. At the end the chunks
are merged into `samples_<N>.npz` with `arr_0` uint8 [N, H, W, 3] (ADM evaluator format) and
`labels` [N], exactly N images in label order of the permutation.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys
import time
import zipfile
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from lightningdit_jax import data as latent_data  # noqa: E402
from lightningdit_jax import sampling  # noqa: E402
from lightningdit_jax import train as dit_train  # noqa: E402
from vavae_jax.runtime import checkpoint as ckpt_lib  # noqa: E402
from vavae_jax.runtime import sharding  # noqa: E402

log = logging.getLogger("launch.sample")

SETTINGS_FILE = "sample_settings.json"
# Reference inference.py demo labels.
DEMO_CLASSES = (975, 3, 207, 387, 388, 88, 979, 279)


# ---------------------------------------------------------------------------------------------
# Loading and checks
# ---------------------------------------------------------------------------------------------
def check_workdir(workdir: str) -> None:
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


def _autoencoder_config(ref: Any):
    """The AutoencoderConfig of a tokenizer reference: a dict of fields, or a config file
    variant string of configs/ ("vavae_f16d32.py[:variant]")."""
    from vavae_jax import model as vae_model

    if isinstance(ref, dict):
        return vae_model.AutoencoderConfig(**ref)
    if isinstance(ref, str) and ref:
        file, _, variant = ref.partition(":")
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
        import importlib

        from vavae_jax import train as vae_train

        mod = importlib.import_module(pathlib.Path(file).stem)
        return vae_train.autoencoder_config(mod.get_config(variant or None))
    raise ValueError(f"tokenizer config {ref!r}: expected a dict of fields or 'file.py[:variant]'")


def load_decoder(path: str, meta: dict[str, Any], dtype: str | None = None):
    """The VA-VAE AutoencoderKL from --tokenizer or the checkpoint meta's tokenizer path: an
    export directory, a vavae trainer workdir or an official .pt."""
    from vavae_jax import convert

    ref = meta.get("tokenizer") or {}
    path = path or ref.get("path", "")
    if not path:
        raise ValueError(
            "the checkpoint meta names no tokenizer (tokenizer.path was empty at training): pass "
            "--tokenizer=<VA-VAE export dir written by launch/convert.py vavae>"
        )
    p = pathlib.Path(path)
    if p.is_dir():
        if (p / convert.EXPORT_JSON).is_file():
            return convert.load_export(p, dtype=dtype)["autoencoder"]
        if (p / "checkpoints").is_dir():  # a vavae trainer workdir (launch/train.py)
            return convert.load_trainer_workdir(p, dtype=dtype)[0]
        raise FileNotFoundError(
            f"tokenizer {path} holds no {convert.EXPORT_JSON} and no checkpoints/: expected a "
            f"VA-VAE export directory (launch/convert.py vavae --out=...) or trainer workdir"
        )
    if p.is_file():  # an official .pt: its architecture is the meta's tokenizer config
        cfg = _autoencoder_config(ref.get("config"))
        if dtype is not None:
            import dataclasses

            cfg = dataclasses.replace(cfg, dtype=dtype)
        ae, _ = convert.load_tokenizer(p, cfg)
        return ae
    raise FileNotFoundError(
        f"tokenizer {path} not found (named by "
        f"{'the checkpoint meta' if path == ref.get('path') else '--tokenizer'}); pass "
        f"--tokenizer=<VA-VAE export dir written by launch/convert.py vavae>"
    )


def check_compatible(ae, mcfg, meta, stats) -> None:
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


# ---------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------
class Sampler:
    """noise + labels -> uint8 images [B, H, W, 3], batch sharded over the mesh's data axis."""

    def __init__(self, model, ae, stats, mesh, settings: dict[str, Any]):
        self.model, self.mesh, self.s = model, mesh, settings
        self.mcfg = model.config
        self.z_sh = sharding.batch_sharding(mesh, 4)
        self.y_sh = sharding.batch_sharding(mesh, 1)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
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
        s, n = self.s, len(y)
        pad = -n % self.mesh.size
        z0 = np.concatenate([z0, np.zeros((pad, *z0.shape[1:]), z0.dtype)])
        y = np.concatenate([y.astype(np.int32), np.zeros(pad, np.int32)])
        z0 = jax.device_put(z0, self.z_sh)
        y = jax.device_put(y, self.y_sh)
        x = sampling.sample_ode(
            self.model,
            z0,
            y,
            num_steps=s["num_steps"],
            method=s["method"],
            timestep_shift=s["timestep_shift"],
            cfg_scale=s["cfg_scale"],
            cfg_interval_start=s["cfg_interval_start"],
            cfg_channels=s["cfg_channels"],
        )
        images = self._decode(self.ae_state, x)
        return np.asarray(multihost_utils.process_allgather(images, tiled=True))[:n]


def _load(workdir, tokenizer, dtype, mesh, step):
    check_workdir(workdir)
    meta = dit_train.load_meta(workdir, step)
    stats = latent_stats(meta)
    model, meta, config = dit_train.load_ema_model(workdir, mesh, step=meta["step"], dtype=dtype)
    ae = load_decoder(tokenizer, meta, dtype)
    check_compatible(ae, model.config, meta, stats)
    return model, ae, stats, meta, config


def _settings(config, overrides: dict[str, Any]) -> dict[str, Any]:
    """Guidance and ODE settings: flags given (not None) override the run's config.sample."""
    s = config.sample.to_dict()
    s.setdefault("method", "euler")
    for k, v in overrides.items():
        if v is not None:
            s[k] = v
    return {
        k: s[k]
        for k in (
            "num_steps",
            "method",
            "timestep_shift",
            "cfg_scale",
            "cfg_interval_start",
            "cfg_channels",
        )
    }


def _atomic_savez(path: str, **arrays) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _chunk_path(out: str, c: int) -> str:
    return os.path.join(out, f"chunk_{c:05d}.npz")


def _check_settings(out: str, settings: dict[str, Any]) -> None:
    """A rerun must use the settings of the chunks already written (else they would mix)."""
    path = os.path.join(out, SETTINGS_FILE)
    if os.path.exists(path):
        old = json.loads(pathlib.Path(path).read_text())
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


def sample(
    workdir: str,
    out: str,
    *,
    num_samples: int,
    batch_size: int,
    seed: int = 0,
    tokenizer: str = "",
    step: int | None = None,
    dtype: str | None = None,
    num_steps: int | None = None,
    method: str | None = None,
    timestep_shift: float | None = None,
    cfg_scale: float | None = None,
    cfg_interval_start: float | None = None,
    cfg_channels: str | None = None,
    keep_chunks: bool = False,
    max_chunks: int | None = None,
    progress: bool = True,
) -> str | None:
    """Writes `out/samples_<num_samples>.npz`; returns its path (None when stopped early after
    `max_chunks` newly written chunks, which simulates a preemption). Settings left None come
    from the run's config.sample."""
    if num_samples <= 0:
        raise ValueError(f"num_samples={num_samples}: must be positive")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}: must be positive")
    mesh = sharding.make_mesh(-1, 1)
    # Settings first (meta and config.json only, no weights): a rerun must match them.
    check_workdir(workdir)
    meta = dit_train.load_meta(workdir, step)
    config = ml_collections.ConfigDict(
        json.loads((ckpt_lib.as_path(workdir) / "config.json").read_text())
    )
    s = _settings(
        config,
        dict(
            num_steps=num_steps,
            method=method,
            timestep_shift=timestep_shift,
            cfg_scale=cfg_scale,
            cfg_interval_start=cfg_interval_start,
            cfg_channels=cfg_channels,
        ),
    )
    settings = dict(
        s,
        workdir=str(ckpt_lib.as_path(workdir)),
        step=int(meta["step"]),
        tokenizer=tokenizer or meta["tokenizer"]["path"],
        num_samples=num_samples,
        batch_size=batch_size,
        seed=seed,
        dtype=dtype or "",
    )
    pid = jax.process_index()
    if pid == 0:
        os.makedirs(out, exist_ok=True)
        _check_settings(out, settings)
    final = os.path.join(out, f"samples_{num_samples}.npz")
    if os.path.exists(final):
        log.info("%s exists: nothing to do", final)
        return final
    model, ae, stats, meta, config = _load(workdir, tokenizer, dtype, mesh, meta["step"])
    mcfg = model.config
    log.info("sampling %d images from %s step %d: %s", num_samples, workdir, meta["step"], s)
    sampler = Sampler(model, ae, stats, mesh, s)
    labels = class_balanced_labels(num_samples, mcfg.num_classes, seed)
    num_chunks = -(-num_samples // batch_size)
    done = np.array([os.path.exists(_chunk_path(out, c)) for c in range(num_chunks)])
    done = np.asarray(multihost_utils.broadcast_one_to_all(done), bool)  # process 0 decides
    n_done = int(sum(min(batch_size, num_samples - c * batch_size) for c in np.flatnonzero(done)))
    pbar = None
    if progress and pid == 0:
        from tqdm import tqdm

        pbar = tqdm(
            total=num_samples, initial=n_done, unit="img", desc="sample", dynamic_ncols=True
        )
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
                pbar.update(hi - lo)
                pbar.set_postfix(img_s=f"{n_new / (time.perf_counter() - t0):.2f}")
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
    **overrides,
) -> str:
    """One sample per class in `classes` -> `out/grid_<step>.png` with `columns` images a row
    (the reference demo mode: 2x4 for 8 classes)."""
    if not classes:
        raise ValueError("--classes is empty: give class indices such as 975,3,207")
    mesh = sharding.make_mesh(-1, 1)
    model, ae, stats, meta, config = _load(workdir, tokenizer, dtype, mesh, step)
    nc = model.config.num_classes
    bad = [k for k in classes if not 0 <= k < nc]
    if bad:
        raise ValueError(f"--classes {bad} are outside [0, {nc}) for this model")
    s = _settings(config, overrides)
    sampler = Sampler(model, ae, stats, mesh, s)
    y = np.asarray(classes, np.int32)
    images = sampler(sampler.noise(jax.random.key(seed), len(y)), y)
    rows = -(-len(images) // columns)
    h, w = images.shape[1:3]
    grid = np.zeros((rows * h, columns * w, 3), np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = im
    path = os.path.join(out, f"grid_{meta['step']:07d}.png")
    if jax.process_index() == 0:
        from vavae_jax.runtime.logging import save_png

        save_png(path, grid)
        log.info("wrote %s (classes %s)", path, classes)
    return path


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
_FLAGS = flags.FLAGS


def define_flags() -> None:
    """Only when run as a script: tests import several launch modules into one process."""
    flags.DEFINE_string("workdir", None, "LightningDiT run directory (launch/train.py --workdir).")
    flags.DEFINE_string("out", None, "Output directory for chunks, samples_<N>.npz or the grid.")
    flags.DEFINE_string(
        "tokenizer", "", "VA-VAE export dir or trainer workdir. Default: the checkpoint meta's."
    )
    flags.DEFINE_integer("step", None, "Checkpoint step. Default: the latest.")
    flags.DEFINE_integer("num_samples", 50_000, "Number of images (FID-50k: 50000).")
    flags.DEFINE_integer(
        "batch_size", 128, "Images per chunk (global; best a multiple of the devices)."
    )
    flags.DEFINE_integer("num_steps", None, "ODE grid points (reference 250). Default: run config.")
    flags.DEFINE_enum("method", None, list(sampling.ODE_METHODS), "ODE solver. Default: euler.")
    flags.DEFINE_float(
        "timestep_shift", None, "Timestep shift (reference 0.3). Default: run config."
    )
    flags.DEFINE_float(
        "cfg_scale", None, "CFG scale (10.0 64-ep, 6.7 800-ep). Default: run config."
    )
    flags.DEFINE_float(
        "cfg_interval_start", None, "CFG from this t on (0.11 / 0.125). Default: run config."
    )
    flags.DEFINE_enum(
        "cfg_channels", None, ["first3", "all"], "Guided channels. Default: run config."
    )
    flags.DEFINE_integer("seed", 0, "Seed of the labels' permutation and of the noise.")
    flags.DEFINE_string(
        "dtype", "", "Compute dtype override (float32, bfloat16). Default: configs'."
    )
    flags.DEFINE_bool("keep_chunks", False, "Keep chunk_*.npz after the merge.")
    flags.DEFINE_bool("grid_only", False, "Only write a demo grid PNG of --classes.")
    flags.DEFINE_list("classes", [str(c) for c in DEMO_CLASSES], "Classes of the demo grid.")
    flags.DEFINE_integer("grid_columns", 4, "Images per row of the demo grid.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from vavae_jax.runtime import distributed
    from vavae_jax.runtime.logging import setup_python_logging

    setup_python_logging()
    distributed.initialize("auto")
    if not _FLAGS.workdir or not _FLAGS.out:
        raise app.UsageError("--workdir and --out are required")
    overrides = dict(
        num_steps=_FLAGS.num_steps,
        method=_FLAGS.method,
        timestep_shift=_FLAGS.timestep_shift,
        cfg_scale=_FLAGS.cfg_scale,
        cfg_interval_start=_FLAGS.cfg_interval_start,
        cfg_channels=_FLAGS.cfg_channels,
    )
    common = dict(
        seed=_FLAGS.seed, tokenizer=_FLAGS.tokenizer, step=_FLAGS.step, dtype=_FLAGS.dtype or None
    )
    if _FLAGS.grid_only:
        try:
            classes = [int(c) for c in _FLAGS.classes]
        except ValueError as e:
            raise app.UsageError(f"--classes={_FLAGS.classes}: expected integers") from e
        demo_grid(
            _FLAGS.workdir,
            _FLAGS.out,
            classes,
            columns=_FLAGS.grid_columns,
            **common,
            **overrides,
        )
        return
    sample(
        _FLAGS.workdir,
        _FLAGS.out,
        num_samples=_FLAGS.num_samples,
        batch_size=_FLAGS.batch_size,
        keep_chunks=_FLAGS.keep_chunks,
        progress=_FLAGS.progress,
        **common,
        **overrides,
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
