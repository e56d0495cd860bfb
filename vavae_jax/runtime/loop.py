"""The training-loop conventions both trainers share: SIGTERM handling, the divergence check
one step late, the progress bar, and the logging / sample-grid / checkpoint cadence."""

from __future__ import annotations

import logging
import math
import pathlib
import signal
import time
from typing import Any

import jax

from vavae_jax.runtime import checkpoint as ckpt_lib

log = logging.getLogger(__name__)


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


def restore_or_init(ckpt, abstract_state, init, *, data_iterator, config, workdir) -> tuple:
    """(state, start_step): the latest checkpoint of `ckpt` restored into `abstract_state`
    (with the data iterator's position), or `init()` for a new run, whose `config.json` process
    0 writes into `workdir` (every process saves checkpoints)."""
    if ckpt.latest_step() is not None:
        state = ckpt.restore(None, abstract_state, data_iterator=data_iterator)["state"]
        start_step = int(state["step"])
        log.info("resumed from step %d in %s", start_step, ckpt.directory)
        return state, start_step
    state = init()
    if jax.process_index() == 0:
        ckpt_lib.save_json(pathlib.Path(workdir) / "config.json", config.to_dict())
    return state, 0


def progress_bar(enabled: bool, start: int, total: int, desc: str):
    """A tqdm bar on process 0 when `enabled`, else None."""
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)


class LoopControl:
    """One trainer loop's bookkeeping, used as a context manager around the `while` loop.

        with LoopControl(config, ckpt, writer, ...) as loop:
            while step < total_steps:
                state, metrics = jit_step(...)
                step = loop.stepped(step, metrics)
                if loop.log_due(step): loop.log(step, metrics)
                if loop.image_due(step): write the sample grid
                if loop.checkpoint_due(step): loop.save(step, state, data_iterator=...)
                if loop.stopping(step): break

    - SIGTERM (a preemption) sets a flag: the current step finishes, a checkpoint is saved and
      the loop stops; the previous handler is restored on exit. `stop_after_steps` simulates
      that after so many steps of this run (tests).
    - The metrics of each step are checked for a finite loss and parameter norm when the next
      step has been dispatched (no host stall), and before every log line and checkpoint, so a
      diverged state is never saved (`TrainingDivergedError` names the last good checkpoint).
    - `config` gives `log_every_steps`, `image_every_steps`, `checkpoint_every_steps`,
      `global_batch_size`, `optim.lr` and `progress_bar`; the last step always logs, writes a
      grid and saves.
    - On exit the checkpointer (waiting for saves in flight), the writer and the bar are closed.
    """

    def __init__(
        self,
        config,
        ckpt,
        writer,
        *,
        start_step: int,
        total_steps: int,
        desc: str,
        loss_key: str,
        norm_key: str,
        stop_after_steps: int | None = None,
    ):
        self.config, self.ckpt, self.writer = config, ckpt, writer
        self.start_step, self.total_steps = start_step, total_steps
        self.loss_key, self.norm_key = loss_key, norm_key
        self.stop_after_steps = stop_after_steps
        self.signal: int | None = None
        self.last_good = ckpt.latest_step()
        self.pending = None  # (step, metrics) of the previous step, checked one step late
        self.pbar = progress_bar(config.progress_bar, start_step, total_steps, desc)
        self._t0, self._steps_since = time.perf_counter(), 0
        self._old_handler = None

    def __enter__(self) -> LoopControl:
        self._old_handler = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.ckpt.close()
            self.writer.close()
            if self.pbar is not None:
                self.pbar.close()
        finally:
            signal.signal(signal.SIGTERM, self._old_handler)

    def _on_signal(self, signum, _frame) -> None:
        self.signal = signum
        log.warning("received signal %d: saving a checkpoint after the current step", signum)

    def _check(self) -> None:
        if self.pending is not None:
            check_finite(
                self.pending,
                self.last_good,
                self.ckpt,
                loss_key=self.loss_key,
                norm_key=self.norm_key,
            )

    def stepped(self, step: int, metrics: dict[str, Any]) -> int:
        """Records the step just dispatched (index `step`); returns the new step count."""
        self._check()  # the previous step's metrics: they are ready by now
        self.pending = (step, metrics)
        step += 1
        self._steps_since += 1
        if self.pbar is not None:
            self.pbar.update(1)
        if self.stop_after_steps is not None and step - self.start_step >= self.stop_after_steps:
            self.signal = signal.SIGTERM
        return step

    def log_due(self, step: int) -> bool:
        return step % self.config.log_every_steps == 0 or step == self.total_steps

    def image_due(self, step: int) -> bool:
        return step % self.config.image_every_steps == 0 or step == self.total_steps

    def checkpoint_due(self, step: int) -> bool:
        every = self.config.checkpoint_every_steps
        return step % every == 0 or step == self.total_steps or self.signal is not None

    def log(self, step: int, metrics: dict[str, Any], extra: dict[str, float] | None = None):
        """Writes the step's metrics plus throughput and learning rate; returns them."""
        self._check()
        m = jax.device_get(metrics)
        dt = time.perf_counter() - self._t0
        m["train/steps_per_s"] = self._steps_since / dt
        m["train/images_per_s"] = self._steps_since * self.config.global_batch_size / dt
        m["train/lr"] = self.config.optim.lr
        m.update(extra or {})
        self.writer.scalars(step, m)
        if self.pbar is not None:
            self.pbar.set_postfix(
                loss=f"{m[self.loss_key]:.4f}", img_s=f"{m['train/images_per_s']:.1f}"
            )
        self._t0, self._steps_since = time.perf_counter(), 0
        return m

    def save(self, step: int, state, **kwargs) -> None:
        """Checks the last metrics, then saves `state` at `step` (kwargs: the checkpointer's)."""
        self._check()
        self.ckpt.save(step, state, force=True, **kwargs)
        self.last_good = step

    def stopping(self, step: int) -> bool:
        """True after a signal (the checkpoint of `step` is saved by then)."""
        if self.signal is not None:
            log.warning("stopped by signal %d at step %d; checkpoint saved", self.signal, step)
            return True
        return False
