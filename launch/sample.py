r"""Samples a LightningDiT run (EMA weights) and decodes with its VA-VAE: FID .npz or a demo grid.

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

The work is `lightningdit_jax.pipeline` (`sample_npz`, `demo_grid`; `load_sampler` for labels ->
images in Python).
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from lightningdit_jax import pipeline, sampling

# Reference inference.py demo labels.
DEMO_CLASSES = (975, 3, 207, 387, 388, 88, 979, 279)


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
        "cfg_channels", None, list(sampling.CFG_CHANNELS), "Guided channels. Default: run config."
    )
    flags.DEFINE_integer("seed", 0, "Seed of the labels' permutation and of the noise.")
    flags.DEFINE_string(
        "dtype", "", "Compute dtype override (float32, bfloat16). Default: configs'."
    )
    flags.DEFINE_enum(
        "precision",
        None,
        ["default", "fp8", "fp8_emulated"],
        "The model's matmuls: default (in the compute dtype); fp8 (the blocks' products in "
        "float8, the weights quantised once per batch; GPUs with FP8 tensor cores only); "
        "fp8_emulated (fp8's rounding on any backend, slowly: fidelity checks). Default: the "
        "run's config.",
    )
    flags.DEFINE_bool("keep_chunks", False, "Keep chunk_*.npz after the merge.")
    flags.DEFINE_bool("grid_only", False, "Only write a demo grid PNG of --classes.")
    flags.DEFINE_list("classes", [str(c) for c in DEMO_CLASSES], "Classes of the demo grid.")
    flags.DEFINE_integer("grid_columns", 4, "Images per row of the demo grid.")
    flags.DEFINE_bool(
        "progress", True, "Progress: a bar on a terminal, else a log line every 30 s."
    )


def _run_precision() -> str:
    """--precision, else the run's model.precision from its config.json ("default" if absent)."""
    if _FLAGS.precision or not _FLAGS.workdir:
        return _FLAGS.precision or "default"
    from vavae_jax.runtime import checkpoint as ckpt_lib

    path = ckpt_lib.as_path(_FLAGS.workdir) / "config.json"  # local or gs://
    if not path.exists():
        return "default"  # pipeline.open_run says what is missing
    return json.loads(path.read_text()).get("model", {}).get("precision", "default")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from lightningdit_jax import fp8
    from vavae_jax.runtime import distributed
    from vavae_jax.runtime.logging import setup_python_logging

    # Before JAX starts its backend, which reads XLA_FLAGS once.
    precision = _run_precision()
    os.environ["XLA_FLAGS"] = fp8.xla_flags(os.environ.get("XLA_FLAGS", ""), precision)
    setup_python_logging()
    distributed.initialize("auto")
    if not _FLAGS.workdir or not _FLAGS.out:
        raise app.UsageError("--workdir and --out are required")
    try:
        fp8.check_backend(precision)
    except ValueError as e:  # one line, before anything is loaded or written
        raise SystemExit(f"launch/sample.py: {e}") from None
    overrides = dict(
        num_steps=_FLAGS.num_steps,
        method=_FLAGS.method,
        timestep_shift=_FLAGS.timestep_shift,
        cfg_scale=_FLAGS.cfg_scale,
        cfg_interval_start=_FLAGS.cfg_interval_start,
        cfg_channels=_FLAGS.cfg_channels,
    )
    common = dict(
        seed=_FLAGS.seed,
        tokenizer=_FLAGS.tokenizer,
        step=_FLAGS.step,
        dtype=_FLAGS.dtype or None,
        precision=_FLAGS.precision,
    )
    if _FLAGS.grid_only:
        try:
            classes = [int(c) for c in _FLAGS.classes]
        except ValueError as e:
            raise app.UsageError(f"--classes={_FLAGS.classes}: expected integers") from e
        pipeline.demo_grid(
            _FLAGS.workdir,
            _FLAGS.out,
            classes,
            columns=_FLAGS.grid_columns,
            **common,
            **overrides,
        )
        return
    pipeline.sample_npz(
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
