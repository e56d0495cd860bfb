"""The trainers' shared loop bookkeeping (`vavae_jax.runtime.loop.LoopControl`)."""

import os
import signal

import ml_collections
import numpy as np
import pytest

from vavae_jax.runtime.loop import LoopControl, TrainingDivergedError


class FakeCheckpointer:
    directory = "/ckpt"

    def __init__(self, latest=None):
        self.saved, self.closed, self.latest = [], False, latest

    def latest_step(self):
        return self.latest

    def save(self, step, state, **kwargs):
        self.saved.append((step, state, kwargs))

    def wait(self):
        pass

    def close(self):
        self.closed = True


class FakeWriter:
    def __init__(self):
        self.rows, self.closed = [], False

    def scalars(self, step, m):
        self.rows.append((step, dict(m)))

    def close(self):
        self.closed = True


def _config():
    return ml_collections.ConfigDict(
        dict(
            log_every_steps=2,
            image_every_steps=3,
            checkpoint_every_steps=4,
            global_batch_size=8,
            progress_bar=False,
            optim=dict(lr=1e-4),
        )
    )


def _run(total, start=0, stop_after=None, kill_at=None, nan_at=None, latest=None):
    """A loop over fake steps whose metrics are (loss, norm) = (1.0, 1.0) except at `nan_at`."""
    ckpt, writer = FakeCheckpointer(latest), FakeWriter()
    events = []
    loop = LoopControl(
        _config(),
        ckpt,
        writer,
        start_step=start,
        total_steps=total,
        desc="test",
        loss_key="loss",
        norm_key="norm",
        stop_after_steps=stop_after,
    )
    before = signal.getsignal(signal.SIGTERM)
    step = start
    try:
        with loop:
            while step < total:
                loss = np.float32("nan") if step == nan_at else np.float32(1.0)
                if step == kill_at:
                    os.kill(os.getpid(), signal.SIGTERM)  # a preemption during the step
                step = loop.stepped(step, {"loss": loss, "norm": np.float32(1.0)})
                if loop.log_due(step):
                    loop.log(step, {"loss": loss, "norm": np.float32(1.0)}, {"extra": 5.0})
                    events.append(("log", step))
                if loop.image_due(step):
                    events.append(("image", step))
                if loop.checkpoint_due(step):
                    loop.save(step, f"state{step}", meta={"m": 1})
                if loop.stopping(step):
                    break
    finally:
        assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored
        assert ckpt.closed and writer.closed
    return step, ckpt, writer, events


def test_cadence_of_logs_grids_and_checkpoints():
    step, ckpt, writer, events = _run(total=9)
    assert step == 9
    assert [s for s, *_ in ckpt.saved] == [4, 8, 9]  # every 4 and the last step
    assert ckpt.saved[0][2] == {"meta": {"m": 1}, "force": True}
    assert [e for e in events if e[0] == "log"] == [("log", s) for s in (2, 4, 6, 8, 9)]
    assert [e for e in events if e[0] == "image"] == [("image", s) for s in (3, 6, 9)]
    row = writer.rows[0][1]
    assert row["extra"] == 5.0 and row["train/lr"] == 1e-4
    assert row["train/images_per_s"] == pytest.approx(8 * row["train/steps_per_s"])


def test_sigterm_saves_after_the_current_step_and_stops():
    step, ckpt, _, _ = _run(total=100, start=10, kill_at=12)
    assert step == 13  # the step in flight finished
    assert [s for s, *_ in ckpt.saved] == [12, 13]  # 12: the cadence; 13: the signal


def test_stop_after_steps_simulates_a_preemption():
    step, ckpt, _, _ = _run(total=100, start=5, stop_after=2)
    assert step == 7 and [s for s, *_ in ckpt.saved] == [7]


def test_a_diverged_step_is_never_saved():
    with pytest.raises(TrainingDivergedError, match="last good checkpoint is step 4"):
        _run(total=9, nan_at=5)  # step index 5 -> step 6, caught before its log and save
    with pytest.raises(TrainingDivergedError, match="no checkpoint was written yet"):
        _run(total=9, nan_at=1)


def test_progress_without_a_terminal_logs_plain_lines(caplog, capsys):
    """No TTY (pytest captures stderr): no bar, a plain line per `every_s` and one at the end;
    disabled: nothing."""
    import logging

    from vavae_jax.runtime import loop

    assert loop.progress_bar(True, 0, 10, "x") is None  # the trainers' bar: also TTY-only
    with caplog.at_level(logging.INFO, logger="vavae_jax.runtime.loop"):
        bar = loop.Progress(10, "extract", unit="img", initial=2, every_s=0.0)
        assert bar.bar is None
        bar.update(3, img_s="1.0")
        bar.update(5)
        bar.close()
        bar.close()  # once only
        silent = loop.Progress(10, "quiet", enabled=False, every_s=0.0)
        silent.update(10)
        silent.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "vavae_jax.runtime.loop"]
    assert [ln.split(",")[0] for ln in lines] == [
        "extract: 5/10 img (50%)",
        "extract: 10/10 img (100%)",
        "extract: 10/10 img (100%)",
    ]
    assert "ETA" in lines[0] and "ETA" not in lines[-1]
    assert not any("quiet" in ln for ln in lines)
    assert "\r" not in capsys.readouterr().err  # no bar redraws


def test_console_logs_above_a_bar_print_each_record_once(capsys):
    """absl's handler wraps a StreamHandler (`python_handler`) that tqdm's own redirect missed:
    records came out twice. Every console StreamHandler, wrapped or not, writes through
    tqdm.write while the bar is shown, and gets its stream back after."""
    import logging
    import sys

    from vavae_jax.runtime import loop

    class Wrapper(logging.Handler):  # the shape of absl.logging.ABSLHandler
        def __init__(self):
            super().__init__()
            self.python_handler = logging.StreamHandler(sys.stderr)

        def emit(self, record):
            self.python_handler.emit(record)

    root = logging.getLogger()
    logger = logging.getLogger("test_console_logs_above")
    for handler in (Wrapper(), logging.StreamHandler(sys.stderr)):
        inner = getattr(handler, "python_handler", handler)
        root.addHandler(handler)
        try:
            with loop.console_logs_above(object()):  # any bar
                assert inner.stream is not sys.stderr
                logger.warning("record-one")
            assert inner.stream is sys.stderr
        finally:
            root.removeHandler(handler)
        assert capsys.readouterr().err.count("record-one") == 1, type(handler).__name__
