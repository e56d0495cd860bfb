"""The training-loop conventions both trainers share: SIGTERM handling, the divergence check
one step late, the progress bar, and the logging / sample-grid / checkpoint cadence."""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax

from vavae_jax.runtime import checkpoint as ckpt_lib
from vavae_jax.runtime import resume

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


def restore_or_init(
    ckpt, abstract_state, init, *, data_iterator, config, workdir, on_ready=None
) -> tuple:
    """(state, start_step): the latest checkpoint of `ckpt` restored into `abstract_state`
    (with the data iterator's position), or `init()` for a new run (every process saves
    checkpoints). Before a restore, `resume.check_resume` refuses a config whose architecture
    or data pipeline differs from the checkpoint's (`ResumeConfigError`; `ckpt` is closed);
    other changes are logged. Process 0 keeps `config.json` (the config in force) and
    `config_history.jsonl` in `workdir` (see vavae_jax.runtime.resume). `on_ready()` is called
    once the run is known to go ahead, before the restore or the init (the trainers start their
    step's compile there, so that a refused config compiles nothing)."""
    latest = ckpt.latest_step()
    if latest is not None:
        try:
            changes = resume.check_resume(
                ckpt, latest, abstract_state, config, data_iterator=data_iterator, workdir=workdir
            )
        except resume.ResumeConfigError:
            ckpt.close()
            raise
        if on_ready is not None:
            on_ready()
        state = ckpt.restore(latest, abstract_state, data_iterator=data_iterator)["state"]
        start_step = int(state["step"])
        log.info("resumed from step %d in %s", start_step, ckpt.directory)
        resume.record_resume(workdir, config, start_step, changes)
        return state, start_step
    if on_ready is not None:
        on_ready()
    state = init()
    resume.record_start(workdir, config)
    return state, 0


def finished_step(ckpt_dir, total_steps: int) -> int | None:
    """The latest checkpoint step in `ckpt_dir` when it has reached `total_steps` (the run is
    complete: says so and how to extend it), else None. Read before anything is built, so that
    re-running a finished run costs seconds and writes nothing (no new TensorBoard file)."""
    directory = ckpt_lib.as_path(ckpt_dir)
    if not directory.exists():
        return None
    ckpt = ckpt_lib.Checkpointer(directory, async_save=False)
    try:
        latest = ckpt.latest_step()
    finally:
        ckpt.close()
    if latest is None or latest < total_steps:
        return None
    if jax.process_index() == 0:
        log.info(
            "run complete: step %d of total_steps=%d is already checkpointed in %s; nothing to "
            "train. To train further, rerun the same command with --config.total_steps=<more "
            "than %d>",
            latest,
            total_steps,
            directory,
            latest,
        )
    return latest


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def progress_bar(enabled: bool, start: int, total: int, desc: str, unit: str = "step"):
    """A tqdm bar on process 0 when `enabled` and a terminal watches (stderr is a TTY), else
    None: a captured log gets the plain log lines alone, not a bar's carriage-return redraws."""
    if not enabled or jax.process_index() != 0 or not _is_tty(sys.stderr):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit=unit, dynamic_ncols=True)


class Progress:
    """Progress of a long job that is not a training loop (latent extraction, sampling,
    evaluation): a tqdm bar where a terminal watches (stderr a TTY), else a plain log line at
    most every `every_s` seconds and one at the end (count, rate, ETA), so that a captured log
    shows how far the job got without a bar's carriage-return redraws. `enabled=False`: silent.

        bar = Progress(total, "extract", unit="img", initial=done)
        bar.update(n, img_s="123.4")
        bar.close()
    """

    def __init__(
        self, total: int, desc: str, *, unit: str = "it", initial: int = 0,
        enabled: bool = True, every_s: float = 30.0,
    ):  # fmt: skip
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.enabled, self.n, self.start_n = enabled, initial, initial
        self.t0 = self._last = time.perf_counter()
        self.bar = progress_bar(enabled, initial, total, desc, unit)

    def update(self, n: int, **postfix) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(**postfix)
        elif self.enabled and time.perf_counter() - self._last >= self.every_s:
            self._line()

    def _line(self, done: bool = False) -> None:
        self._last = now = time.perf_counter()
        rate = (self.n - self.start_n) / max(now - self.t0, 1e-9)
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        text += f", {rate:.1f} {self.unit}/s"
        if not done and rate > 0 and self.total > self.n:
            text += f", ETA {_duration((self.total - self.n) / rate)}"
        log.info("%s", text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled:
            self._line(done=True)
            self.enabled = False


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _TqdmStream:
    """A file-like console stream that writes each record above the bar (tqdm.write)."""

    def write(self, text: str) -> None:
        from tqdm import tqdm

        text = text.rstrip("\n")
        if text:
            tqdm.write(text, file=sys.stderr)

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def console_logs_above(pbar):
    """While the bar `pbar` is shown, the console handlers of the root logger write above it.
    absl's handler (launch/ scripts run under absl.app) wraps a StreamHandler that
    tqdm.contrib.logging.logging_redirect_tqdm does not see: it kept writing into the bar, and
    that helper's extra handler printed every record a second time. Here each console
    StreamHandler, absl's inner one included, gets a stream that writes through tqdm.write;
    formats and levels stay as they are."""
    if pbar is None:
        yield
        return
    swapped = []
    for handler in logging.getLogger().handlers:
        for h in (handler, getattr(handler, "python_handler", None)):
            stream = getattr(h, "stream", None)
            if isinstance(h, logging.StreamHandler) and stream in (sys.stdout, sys.stderr):
                swapped.append((h, h.setStream(_TqdmStream())))
    try:
        yield
    finally:
        for h, stream in swapped:
            h.setStream(stream)


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
    - Each log also prints one plain line on process 0 through Python logging (step, the
      `log_keys` metrics, images/s, ETA) for runs that nobody watches; while a bar is shown,
      log records go through tqdm.write so that they do not garble it (`console_logs_above`).
      The bar is shown only where a terminal watches (stderr a TTY).
    - On exit the checkpointer (waiting for saves in flight), the writer and the bar are closed;
      a run that reached `total_steps` logs one completion line.
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
        log_keys: Sequence[str] = (),
    ):
        self.config, self.ckpt, self.writer = config, ckpt, writer
        self.start_step, self.total_steps = start_step, total_steps
        self.loss_key, self.norm_key = loss_key, norm_key
        # The plain log line's metrics: the loss first, then the trainer's other key terms.
        self.log_keys = (loss_key, *(k for k in log_keys if k != loss_key))
        self.stop_after_steps = stop_after_steps
        self.signal: int | None = None
        self.last_good = ckpt.latest_step()
        self.pending = None  # (step, metrics) of the previous step, checked one step late
        self.pbar = progress_bar(config.progress_bar, start_step, total_steps, desc)
        self._t0, self._steps_since = time.perf_counter(), 0
        self._started = self._t0
        self._rate_t0 = None  # (time, step) after the first step: ETA without the compile
        self.step = start_step
        self._old_handler = None
        self._redirect = contextlib.ExitStack()

    def __enter__(self) -> LoopControl:
        self._old_handler = signal.signal(signal.SIGTERM, self._on_signal)
        self._redirect.enter_context(console_logs_above(self.pbar))
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            self.ckpt.close()
            self.writer.close()
            if self.pbar is not None:
                self.pbar.close()
        finally:
            self._redirect.close()
            signal.signal(signal.SIGTERM, self._old_handler)
        if exc_type is None and self.step >= self.total_steps > self.start_step:
            self._log_completion()

    def _log_completion(self) -> None:
        if jax.process_index() != 0:
            return
        logdir = getattr(self.writer, "logdir", None)
        log.info(
            "training complete: step %d/%d (%d steps in %s); checkpoints in %s%s",
            self.step,
            self.total_steps,
            self.step - self.start_step,
            _duration(time.perf_counter() - self._started),
            self.ckpt.directory,
            f"; logs: tensorboard --logdir {logdir}" if logdir is not None else "",
        )

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
        self.step = step
        self._steps_since += 1
        if self._rate_t0 is None:
            self._rate_t0 = (time.perf_counter(), step)
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
        if jax.process_index() == 0:
            log.info("%s", self.log_line(step, m))
        self._t0, self._steps_since = time.perf_counter(), 0
        return m

    def log_line(self, step: int, m: dict[str, Any]) -> str:
        """`step 40/80 (50%) | total_loss 0.4321 rec_loss 0.1234 | 12.3 img/s | ETA 0:01:05`."""
        terms = " ".join(
            f"{k.removeprefix('train/')} {float(m[k]):.4g}" for k in self.log_keys if k in m
        )
        parts = [f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%)", terms]
        parts.append(f"{m['train/images_per_s']:.1f} img/s")
        t_first, s_first = self._rate_t0 or (None, step)
        if step > s_first and step < self.total_steps:
            rate = (step - s_first) / (time.perf_counter() - t_first)
            parts.append(f"ETA {_duration((self.total_steps - step) / rate)}")
        return " | ".join(p for p in parts if p)

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
