r"""Trains a model from an ml_collections config: VA-VAE or LightningDiT.

  python launch/train.py --config=configs/vavae_f16d32.py:small --workdir=runs/quickstart
  python launch/train.py --config=configs/vavae_f16d32.py --config.global_batch_size=128

Re-running the same command with the same --workdir resumes from its last checkpoint.
The config's fields and defaults: python launch/train.py --config=configs/vavae_f16d32.py --help
Multi-host: started automatically on TPU VMs and SLURM; elsewhere pass --coordinator_address,
--num_processes and --process_id on every host (on CPU, collectives go over gloo):

  python launch/train.py --config=... --workdir=runs/x \
      --coordinator_address=host0:1234 --num_processes=2 --process_id=0   # and =1 on host 1
"""

from __future__ import annotations

import logging
import os
import pathlib

from absl import app, flags
from ml_collections import config_flags

from vavae_jax.runtime import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file[:variants].", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (local or gs://). Default: runs/<config name>[_<variants>]."
)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Start jax.distributed (auto: on TPU pods, SLURM, or when --coordinator_address is given).",
)
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index.")
_STOP = flags.DEFINE_integer(
    "stop_after_steps",
    None,
    "Stop after this many steps of this invocation with a checkpoint, as on SIGTERM "
    "(a planned preemption; rerun the same command to resume).",
)
flags.mark_flag_as_required("config")


def default_workdir(config_arg: str) -> str:
    path, _, variant = config_arg.partition(":")
    name = pathlib.Path(path).stem + (f"_{variant.replace(',', '_')}" if variant else "")
    return str(pathlib.Path("runs") / name)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from lightningdit_jax import fp8
    from vavae_jax.runtime import distributed

    # Before JAX starts its backend, which reads XLA_FLAGS once.
    xla_flags = distributed.default_xla_flags(os.environ.get("XLA_FLAGS", ""))
    model = _CONFIG.value.get("model", None)
    precision = model.get("precision", "default") if model is not None else "default"
    os.environ["XLA_FLAGS"] = fp8.xla_flags(xla_flags, precision)
    from vavae_jax.runtime.logging import setup_python_logging

    setup_python_logging()
    distributed.initialize(_DISTRIBUTED.value, _COORD.value, _NPROC.value, _PID.value)
    try:
        fp8.check_backend(precision)
    except ValueError as e:  # one line, before anything is built or written
        raise SystemExit(f"launch/train.py: {e}") from None
    log = logging.getLogger("launch.train")
    log.info("devices: %s", distributed.describe())
    config = _CONFIG.value
    workdir = _WORKDIR.value or default_workdir(
        config_flags.get_config_filename(flags.FLAGS["config"])
    )
    trainer = config.get("trainer", None)
    if trainer == "vavae":
        from vavae_jax import train
    elif trainer == "lightningdit":
        from lightningdit_jax import train

        try:  # the model's fields, checked before anything is built or written
            train.model_config(config)
        except ValueError as e:
            raise SystemExit(f"launch/train.py: {e}") from None
    else:
        raise ValueError(f"config.trainer={trainer!r}: expected 'vavae' or 'lightningdit'")
    from vavae_jax.runtime.resume import ResumeConfigError

    try:
        train.run(config, workdir, stop_after_steps=_STOP.value)
    except ResumeConfigError as e:  # its message names the fields and the fix: no traceback
        raise SystemExit(f"launch/train.py: {e}") from None


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
