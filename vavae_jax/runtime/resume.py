"""Resuming a run with a changed config: refuse what cannot resume, record what can.

`check_resume` runs before any Orbax restore (both trainers, through `loop.restore_or_init`)
and compares what the run saved with what the new invocation would build:
  - the state: tree paths, shapes and dtypes of the abstract state against the checkpoint's
    array metadata (read without restoring an array). Any difference is an architecture change,
    whatever config field caused it; the changed config fields are named as its likely cause.
  - the config: the latest checkpoint's `config` item (else the workdir's config.json) against
    the new config, field by field (`optim.lr`). A changed `ARCHITECTURE` field is refused even
    where the shapes happen to agree (`model.resolution` of a convolutional VAE).
  - the data pipeline: grain restores an iterator only into a pipeline with the same
    `worker_count`, sampler (records, seed, per-host batch, hosts) and data source, and raises
    otherwise. The checkpoint's iterator state is compared with the new iterator's first.
A refusal is one `ResumeConfigError` listing the fields (old -> new) and the fix. Since no
restore was attempted, no traceback of Orbax's async threads buries it.

Any other change (the learning rate, an extended `total_steps`, the mesh, the progress bar...)
is accepted: `record_resume` logs one line per field (old -> new) and records it in the workdir
(process 0 writes; `record_start` writes both files for a new run):
  config.json           the config now in force (what sampling and export read back)
  config_history.jsonl  one JSON object per line: the first, written when the run starts, is
                        {"time", "step": 0, "config": <the whole config>}; then one per start
                        that changed the config: {"time", "step": <resumed step>,
                        "changes": {"optim.lr": [old, new], ...}} ("<absent>" for a field that
                        one side lacks). Replaying the changes onto the first line gives the
                        config in force from any step on.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from vavae_jax.runtime import checkpoint as ckpt_lib

log = logging.getLogger(__name__)

HISTORY_FILE = "config_history.jsonl"
ABSENT = "<absent>"

# The config fields that define what the saved state is (both trainers' configs): a change is
# refused even where the shapes agree. Fields outside this list that change the state's shapes
# (`optim.grad_clip_norm` 0 -> 1 adds an optimizer state, `model.class_dropout_prob` 0.1 -> 0
# drops the null-label row) are caught by the state comparison.
ARCHITECTURE = (
    "model.*",  # the autoencoder / the DiT
    "use_vf",  # VA-VAE: the VF projection exists
    "teacher.preset",  # VA-VAE: the VF projection's width
    "loss.disc_num_layers",  # VA-VAE: the discriminator
    "loss.disc_ndf",
    "loss.train_logvar",  # VA-VAE: logvar trained (in the optimizer state) or fixed
    "ema.enabled",  # VA-VAE: an EMA copy in the state
)
# Under model.*, switches of how the same parameters are computed or regularised.
NOT_ARCHITECTURE = (
    "model.remat_policy",
    "model.scan_unroll",
    "model.scan_layers",
    "model.attention_impl",
    "model.dropout",
    "model.class_dropout_prob",
    # How the blocks' products round (LightningDiT): the same parameters. Delayed FP8 scaling
    # adds amax histories to the state, which the state comparison refuses to add or drop.
    "model.precision",
    "model.fp8_scaling",
    "model.fp8_amax_history",
)
# Fields that set the data iterator grain restores (its sampler, source and workers).
DATA_PIPELINE = ("data.*", "seed", "global_batch_size")
# Fields that only steer this invocation (how long, how often, how shown): never a cause of an
# architecture change, so not named as one.
_RUN_CONTROL = (
    "total_steps",
    "num_epochs",
    "progress_bar",
    "*_every_steps",
    "keep_checkpoints",
    "num_grid_images",
    "grid_sample_steps",
    "sample.*",
    "mesh.*",
    "sharding",
    "dtype",
)
# What grain compares when it restores an iterator state (grain DataLoader._validate_state).
_GRAIN_CHECKED = ("worker_count", "sampler", "data_source")
_MAX_LISTED = 5


class ResumeConfigError(ValueError):
    """The workdir's checkpoint cannot be resumed with this config (nothing was restored)."""


def _matches(field: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(field, p) for p in patterns)


def is_architecture(field: str) -> bool:
    return _matches(field, ARCHITECTURE) and not _matches(field, NOT_ARCHITECTURE)


def as_json(config) -> dict[str, Any]:
    """The config as the checkpoint stores it (tuples become lists)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(d, default=str))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim.lr": 1e-4, ...}: nested dicts to dotted fields (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (old, new)} for every dotted field that differs (ABSENT where one side lacks it)."""
    a, b = flatten(old), flatten(new)
    return {
        k: (a.get(k, ABSENT), b.get(k, ABSENT))
        for k in sorted(set(a) | set(b))
        if a.get(k, ABSENT) != b.get(k, ABSENT)
    }


def _fmt(v: Any) -> str:
    return v if v == ABSENT else repr(v)  # as on the command line: True, 'fsdp', [1, 2]


def _lines(changes: Mapping[str, tuple[Any, Any]]) -> list[str]:
    return [f"  {k}: {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in changes.items()]


def state_differences(abstract_state, stored: Mapping[str, Any]) -> list[str]:
    """One line per array whose path, shape or dtype differs between `abstract_state` and the
    checkpoint's metadata `stored` ({"a/b": ArrayMetadata}, `Checkpointer.state_metadata`)."""
    want = ocp.tree.to_flat_dict(abstract_state, sep="/")

    def desc(x) -> str:
        return f"{tuple(np.shape(x))} {np.dtype(x.dtype).name}"

    # Changed shapes first: they name the cause better than the arrays that come and go.
    out = [
        f"{k}: {desc(stored[k])} -> {desc(want[k])}"
        for k in sorted(set(want) & set(stored))
        if desc(stored[k]) != desc(want[k])
    ]
    out += [f"{k}: absent -> {desc(want[k])}" for k in sorted(set(want) - set(stored))]
    out += [f"{k}: {desc(stored[k])} -> absent" for k in sorted(set(stored) - set(want))]
    return out


def _summary(lines: list[str]) -> list[str]:
    more = len(lines) - _MAX_LISTED
    return lines[:_MAX_LISTED] + ([f"... and {more} more"] if more > 0 else [])


def check_resume(
    ckpt, step: int, abstract_state, config, *, data_iterator, workdir
) -> dict[str, tuple[Any, Any]] | None:
    """The config changes since the checkpoint `step` of `ckpt` (None: no stored config to
    compare with, a warning says so); raises `ResumeConfigError` for a change that cannot
    resume (see the module docstring). Every process calls it: all raise alike."""
    workdir = ckpt_lib.as_path(workdir)
    new = as_json(config)
    stored = ckpt.stored_config(step)
    if stored is None and (workdir / "config.json").exists():
        stored = json.loads((workdir / "config.json").read_text())
    if stored is None:
        log.warning(
            "checkpoint step %d in %s stores no config and %s has no config.json: config "
            "changes cannot be listed; only the state and data layouts are checked",
            step,
            ckpt.directory,
            workdir,
        )
    changes = config_diff(stored, new) if stored is not None else {}
    where = f"cannot resume {workdir} at step {step} with this config"

    # ---- architecture: the state's layout, then the fields that define it -------------------
    state_diff = state_differences(abstract_state, ckpt.state_metadata(step))
    arch = {k: v for k, v in changes.items() if is_architecture(k)}
    if state_diff or arch:
        named = arch or {k: v for k, v in changes.items() if not _matches(k, _RUN_CONTROL)}
        lines = _lines(named) or [
            "  (no config field differs: the code's state layout changed since the checkpoint)"
        ]
        if state_diff:
            lines.append(f"  saved state -> this config's state ({len(state_diff)} arrays):")
            lines += [f"    {s}" for s in _summary(state_diff)]
        raise ResumeConfigError(
            f"{where}: the architecture differs from the checkpoint's:\n"
            + "\n".join(lines)
            + f"\nTrain this architecture in a new --workdir{_init_hint(config, arch)}, or "
            f"resume with the old values."
        )

    # ---- data: what grain validates when it restores the iterator position -----------------
    saved_it = ckpt.data_state(step) if data_iterator is not None else None
    if saved_it is not None:
        new_it = json.loads(data_iterator.get_state())
        grain_diff = [
            f"    {k}: {saved_it.get(k)} -> {new_it.get(k)}"
            for k in _GRAIN_CHECKED
            if saved_it.get(k) != new_it.get(k)
        ]
        if grain_diff:
            named = {k: v for k, v in changes.items() if _matches(k, DATA_PIPELINE)}
            raise ResumeConfigError(
                f"{where}: grain restores the data iterator's position only into the same "
                f"pipeline, and it differs:\n"
                + "\n".join(_lines(named) + ["  grain's iterator state (saved -> new):"])
                + "\n"
                + "\n".join(grain_diff)
                + "\nResume with the old values, or train this config in a new --workdir."
            )
    return changes if stored is not None else None


def _init_hint(config, arch: Mapping[str, Any]) -> str:
    """VA-VAE: weights of the same model.* can seed the new run (init_from takes an official
    .pt or an export; not a trainer workdir). LightningDiT has no such field."""
    if "init_from" not in config or any(k.startswith("model.") for k in arch):
        return ""
    return " (--config.init_from=<official .pt or export> starts it from autoencoder weights)"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _append_history(workdir: pathlib.Path, entry: dict[str, Any]) -> None:
    path = workdir / HISTORY_FILE
    text = path.read_text() if path.exists() else ""  # epath has no append mode
    path.write_text(text + json.dumps(entry, sort_keys=True, default=str) + "\n")


def record_start(workdir, config) -> None:
    """A new run (process 0): config.json and the first history line, the whole config."""
    if jax.process_index() != 0:
        return
    workdir = ckpt_lib.as_path(workdir)
    ckpt_lib.save_json(workdir / "config.json", as_json(config))
    _append_history(workdir, {"time": _now(), "step": 0, "config": as_json(config)})


def record_resume(workdir, config, step: int, changes: dict[str, tuple[Any, Any]] | None):
    """A resumed run (process 0): logs each change (old -> new), appends them to the history
    and rewrites config.json to the config now in force."""
    if jax.process_index() != 0:
        return
    workdir = ckpt_lib.as_path(workdir)
    if changes:
        log.info("config changed since step %d (old -> new):", step)
        for line in _lines(changes):
            log.info("%s", line)
        entry = {"time": _now(), "step": step, "changes": {k: list(v) for k, v in changes.items()}}
        _append_history(workdir, entry)
    ckpt_lib.save_json(workdir / "config.json", as_json(config))
