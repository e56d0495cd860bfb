"""Compile times, by function name, for the trainers and CLIs.

A user staring at a silent terminal cannot tell a slow XLA compile (or a single `ptxas` working
through one huge kernel) from a hang. `install()` listens to JAX's compile events:
- every backend compile that takes longer than `log_over_s` is logged with its function's name and
  duration, and kept for `compile_times()`;
- a compile still running after `warn_after_s` is logged as a WARNING with its function's name,
  and again every `warn_after_s` until it ends.

JAX reports each backend compile twice through `jax.monitoring`: a scalar event with the start
time when it begins and a duration event when it ends, both carrying `fun_name` (e.g.
`jit(train_step)`). Compiles served from the persistent compilation cache are reported the same way
and are fast.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from jax import monitoring

log = logging.getLogger(__name__)

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_lock = threading.Lock()
_state = dict(installed=False, warn_after_s=60.0, log_over_s=1.0)
_active: dict[int, list[list]] = {}  # thread id -> stack of [name, start, next warning time]
_finished: list[tuple[str, float]] = []  # (function name, seconds) of every compile


def _on_start(event: str, value: float, **kwargs) -> None:
    if event != BACKEND_COMPILE_EVENT:
        return
    name = str(kwargs.get("fun_name", "?"))
    now = time.monotonic()
    with _lock:
        _active.setdefault(threading.get_ident(), []).append(
            [name, now, now + _state["warn_after_s"]]
        )


def _on_end(event: str, duration: float, **kwargs) -> None:
    if event != BACKEND_COMPILE_EVENT:
        return
    name = str(kwargs.get("fun_name", "?"))
    with _lock:
        stack = _active.get(threading.get_ident(), [])
        if stack:
            stack.pop()
        _finished.append((name, float(duration)))
    if duration >= _state["warn_after_s"]:
        log.warning("compiled %s in %.1f s (XLA)", name, duration)
    elif duration >= _state["log_over_s"]:
        log.info("compiled %s in %.1f s", name, duration)


def _watchdog() -> None:
    while True:
        time.sleep(min(5.0, _state["warn_after_s"] / 4))
        now = time.monotonic()
        with _lock:
            due = []
            for stack in _active.values():
                for entry in stack:
                    if now >= entry[2]:
                        due.append((entry[0], now - entry[1]))
                        entry[2] = now + _state["warn_after_s"]
        for name, elapsed in due:
            log.warning(
                "still compiling %s after %.0f s (XLA compile; on GPUs ptxas may run on one core "
                "meanwhile). It is not hung; the time is reported when it ends.",
                name,
                elapsed,
            )


def install(*, warn_after_s: float = 60.0, log_over_s: float = 1.0) -> None:
    """Starts logging compiles of this process (idempotent; thresholds may be changed again)."""
    with _lock:
        _state.update(warn_after_s=float(warn_after_s), log_over_s=float(log_over_s))
        if _state["installed"]:
            return
        _state["installed"] = True
    monitoring.register_scalar_listener(_on_start)
    monitoring.register_event_duration_secs_listener(_on_end)
    threading.Thread(target=_watchdog, name="compile-watchdog", daemon=True).start()


def compile_times() -> list[tuple[str, float]]:
    """(function name, seconds) of every compile since `install()`, in order."""
    with _lock:
        return list(_finished)


def active() -> list[tuple[str, float]]:
    """(function name, seconds so far) of the compiles running now."""
    now = time.monotonic()
    with _lock:
        return [(e[0], now - e[1]) for stack in _active.values() for e in stack]


@contextlib.contextmanager
def phase(name: str, *, logger: logging.Logger = log):
    """Logs how long a start-up phase took ("phase <name>: 12.3 s")."""
    start = time.perf_counter()
    yield
    logger.info("%s: %.1f s", name, time.perf_counter() - start)


def report_first_step(started: float, metrics, *, logger: logging.Logger = log) -> float:
    """Waits for the first step's `metrics`, then logs how long after `started` (a
    `time.perf_counter()` reading at start-up) it finished and the compiles that took longer
    than a second until then. Returns the seconds to the first step."""
    import jax

    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - started
    slow = [f"{name} {secs:.1f} s" for name, secs in compile_times() if secs >= 1.0]
    logger.info(
        "first step finished %.1f s after start-up; compiles over 1 s: %s",
        elapsed,
        ", ".join(slow) or "none",
    )
    return elapsed


class InBackground:
    """`fn()` run in a daemon thread: an ahead-of-time compile that overlaps the rest of the
    start-up (state init or restore, the first batches). XLA compiles without holding the GIL.
    `result()` waits and returns its value, or raises its exception. A daemon thread does not
    keep a failed process alive until the compile ends."""

    def __init__(self, fn, name: str):
        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._value = fn()
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread by result())
            self._error = e

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value
