"""Pieces of the training loop that both trainers share: the divergence check and the progress bar."""

from __future__ import annotations

import math

import jax


class TrainingDivergedError(RuntimeError):
    """The loss or the parameter norm stopped being finite; nothing was saved after it."""


def check_finite(pending, last_good, ckpt, *, loss_key: str, norm_key: str) -> None:
    """Raises `TrainingDivergedError` when the (step, metrics) of `pending` are not finite,
    naming the last good checkpoint of `ckpt` (after waiting for any save in flight)."""
    step, metrics = pending
    loss = float(metrics[loss_key])
    norm = float(metrics[norm_key])
    if not (math.isfinite(loss) and math.isfinite(norm)):
        ckpt.wait()
        where = (
            f"the last good checkpoint is step {last_good} in {ckpt.directory}"
            if last_good is not None
            else "no checkpoint was written yet"
        )
        raise TrainingDivergedError(
            f"loss {loss}, parameter norm {norm} after step {step + 1}; training stopped without "
            f"saving the diverged state; {where}. Lower the learning rate or check the data."
        )


def progress_bar(enabled: bool, start: int, total: int, desc: str):
    """A tqdm bar on process 0 when `enabled`, else None."""
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)
