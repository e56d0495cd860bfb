"""Where does a step's device time go? A `jax.profiler` trace, summarised by kernel.

  summary = profile(lambda: step(...), steps=3, logdir="/tmp/trace")
  print(format_summary(summary))

`profile` runs a function under `jax.profiler.trace` and reads the XSpace back with
`jax.profiler.ProfileData` (no TensorBoard needed). On GPU the device planes hold one event per
kernel launch on each stream; each kernel is put in a category by its name (cuBLAS / cuDNN /
XLA-generated fusions / copies / collectives) and the time per category and per kernel is summed
and divided by the number of profiled steps. The XLA op names of the kernels (the `hlo_op`
statistic, when the runtime records it) are summed as well, so that a fusion's kernel can be found
in the HLO dump. CPU traces have no device plane: `profile` then says so rather than returning an
empty summary.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax

# First match wins; the names are those of cuBLAS(Lt) / CUTLASS / nvjet GEMMs, cuDNN's attention
# kernels, XLA's generated fusions (loop_*, input_*, *_fusion, triton_*) and the runtime's copies.
CATEGORIES: tuple[tuple[str, re.Pattern], ...] = (
    ("collective", re.compile(r"nccl|all_reduce|all_gather|reduce_scatter|collective", re.I)),
    ("attention", re.compile(r"sdpa|flash|fmha|attention|cudnn_generated", re.I)),
    ("convolution", re.compile(r"convolution|implicit|fprop|dgrad|wgrad", re.I)),
    ("gemm", re.compile(r"gemm|xmma|cutlass|nvjet|cublas|gemv|matmul|wgmma|hgmma|sm\d+_", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|transpose", re.I)),
    ("reduction", re.compile(r"reduce|reduction|softmax|norm", re.I)),
    ("fusion", re.compile(r"fusion|loop_|triton|convert|multiply|add|select|broadcast", re.I)),
)


def categorize(kernel_name: str) -> str:
    """The category of a GPU kernel from its name ("other" when nothing matches)."""
    for name, pattern in CATEGORIES:
        if pattern.search(kernel_name):
            return name
    return "other"


def summarize_events(events: Iterable[tuple[str, float, str | None]], steps: int) -> dict[str, Any]:
    """(kernel name, duration ns, hlo op or None) events -> time per step by category, kernel
    and HLO op (milliseconds), most expensive first."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    by_cat: dict[str, float] = collections.defaultdict(float)
    by_kernel: dict[str, list] = collections.defaultdict(lambda: [0.0, 0, ""])
    by_op: dict[str, float] = collections.defaultdict(float)
    total = 0.0
    for name, dur_ns, op in events:
        cat = categorize(name)
        by_cat[cat] += dur_ns
        k = by_kernel[name]
        k[0] += dur_ns
        k[1] += 1
        k[2] = cat
        if op:
            by_op[op] += dur_ns
        total += dur_ns
    ms = 1e-6 / steps
    return dict(
        steps=steps,
        kernel_ms_per_step=total * ms,
        by_category_ms={c: v * ms for c, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        top_kernels=[
            dict(name=n, ms=v[0] * ms, launches_per_step=v[1] / steps, category=v[2])
            for n, v in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])
        ],
        top_hlo_ops=[
            dict(op=o, ms=v * ms) for o, v in sorted(by_op.items(), key=lambda kv: -kv[1])
        ],
    )


GAP_BUCKETS_US = (10.0, 100.0)  # idle gaps: launch-sized, short, long (host waits, syncs)


def idle_gaps(spans: Iterable[tuple[float, float, str]], steps: int, top: int = 10) -> dict:
    """(start ns, end ns, kernel name) of every kernel of one device over `steps` profiled steps
    -> where the device sat idle inside them. The kernels' union is walked in time order; the
    `steps - 1` longest gaps are the host's time between two steps (each one is blocked on) and
    are left out. Per step: the span from the first kernel to the last, the busy and idle time,
    the number of gaps and the idle time by gap length, and the longest gaps with the kernels on
    either side (a long gap before one kernel is a host wait or a sync, many short ones are
    launch latency)."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    spans = sorted(spans)
    if not spans:
        raise ValueError("idle_gaps: no kernel spans")
    merged: list[list] = []  # [start, end, first name, last name]
    for start, end, name in spans:
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1][1], merged[-1][3] = end, name
        else:
            merged.append([start, end, name, name])
    gaps = [(nxt[0] - cur[1], cur[3], nxt[2]) for cur, nxt in zip(merged, merged[1:], strict=False)]
    by_length = sorted(gaps, key=lambda g: -g[0])
    between, inside = by_length[: steps - 1], by_length[steps - 1 :]
    ms = 1e-6 / steps
    buckets = {f"<{GAP_BUCKETS_US[0]:g}us": 0.0, f"<{GAP_BUCKETS_US[1]:g}us": 0.0, "longer": 0.0}
    for dur, _, _ in inside:
        us = dur / 1e3
        key = next(
            (k for k, lim in zip(buckets, GAP_BUCKETS_US, strict=False) if us < lim), "longer"
        )
        buckets[key] += dur * ms
    busy = sum(end - start for start, end, _, _ in merged)
    return dict(
        span_ms_per_step=(merged[-1][1] - merged[0][0] - sum(g[0] for g in between)) * ms,
        busy_ms_per_step=busy * ms,
        idle_ms_per_step=sum(g[0] for g in inside) * ms,
        gaps_per_step=len(inside) / steps,
        idle_ms_per_step_by_gap=buckets,
        longest_gaps=[
            dict(us=dur / 1e3, after=a[:100], before=b[:100]) for dur, a, b in inside[:top]
        ],
    )


def device_events(
    xplane_path: str, spans: list | None = None
) -> tuple[list[tuple[str, float, str | None]], list[str]]:
    """Kernel events of every device plane of an `.xplane.pb` and the names of those planes.
    With `spans` (a list), also appends (start ns, end ns, name) of each kernel of the first
    device plane to it, for `idle_gaps`."""
    data = jax.profiler.ProfileData.from_file(xplane_path)
    events, planes = [], []
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        planes.append(plane.name)
        for line in plane.lines:
            # GPU planes: "Stream #N(...)" lines hold the kernels; "XLA Modules" / "XLA Ops" /
            # "Steps" lines are derived views of the same time and would count it twice.
            if not line.name.startswith("Stream"):
                continue
            for e in line.events:
                stats = dict(e.stats)
                op = stats.get("hlo_op") or stats.get("long_name")
                events.append((e.name, float(e.duration_ns), str(op) if op else None))
                if spans is not None and len(planes) == 1:
                    spans.append((float(e.start_ns), float(e.end_ns), e.name))
    return events, planes


def host_events(xplane_path: str, steps: int, top: int = 30) -> list[dict[str, Any]]:
    """The host threads' traced events of an `.xplane.pb` (the runtime's dispatch, argument
    handling, thunk launches, waits), by name: inclusive milliseconds per step (a nested event
    counts inside its parent too), calls per step and the thread, longest first."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    data = jax.profiler.ProfileData.from_file(xplane_path)
    acc: dict[tuple[str, str], list] = collections.defaultdict(lambda: [0.0, 0])
    for plane in data.planes:
        if not plane.name.startswith("/host:"):
            continue
        for line in plane.lines:
            for e in line.events:
                a = acc[(e.name[:120], line.name)]
                a[0] += float(e.duration_ns)
                a[1] += 1
    rows = sorted(acc.items(), key=lambda kv: -kv[1][0])[:top]
    return [
        dict(name=name, thread=thread, ms=v[0] * 1e-6 / steps, calls_per_step=v[1] / steps)
        for (name, thread), v in rows
    ]


def profile(fn: Callable[[], Any], steps: int, logdir: str) -> dict[str, Any]:
    """Runs `fn()` `steps` times under the profiler (each result blocked on) and summarises the
    device kernels per step, with the calls' median wall time under the profiler (the wall of
    the very launches the timeline shows, to set against its span). `fn` should be compiled and
    warm already."""
    os.makedirs(logdir, exist_ok=True)
    walls = []
    with jax.profiler.trace(logdir):
        for _ in range(steps):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            walls.append(time.perf_counter() - t)
    paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"jax.profiler wrote no .xplane.pb under {logdir}")
    spans: list = []
    path = max(paths, key=os.path.getmtime)
    events, planes = device_events(path, spans)
    if not events:
        raise RuntimeError(
            f"the trace in {logdir} has no device kernel events (device planes: {planes or None});"
            " kernel summaries need a GPU backend"
        )
    summary = summarize_events(events, steps)
    summary["wall_ms_per_step"] = statistics.median(walls) * 1e3
    summary["device_planes"] = planes
    summary["timeline"] = idle_gaps(spans, steps)
    summary["host_events"] = host_events(path, steps)
    return summary


def format_summary(summary: dict[str, Any], top: int = 25) -> str:
    lines = [f"  device kernel time: {summary['kernel_ms_per_step']:.2f} ms/step"]
    if "wall_ms_per_step" in summary:
        lines.append(f"  wall per call under the profiler: {summary['wall_ms_per_step']:.2f} ms")
    if tl := summary.get("timeline"):
        by_gap = ", ".join(f"{k} {v:.2f}" for k, v in tl["idle_ms_per_step_by_gap"].items())
        lines.append(
            f"  first kernel to last: {tl['span_ms_per_step']:.2f} ms/step, busy "
            f"{tl['busy_ms_per_step']:.2f}, idle {tl['idle_ms_per_step']:.2f} in "
            f"{tl['gaps_per_step']:.0f} gaps (ms by gap length: {by_gap})"
        )
    for cat, ms in summary["by_category_ms"].items():
        share = ms / summary["kernel_ms_per_step"] if summary["kernel_ms_per_step"] else 0.0
        lines.append(f"    {cat:<12} {ms:8.2f} ms  {share:6.1%}")
    if host := summary.get("host_events"):
        lines.append("  host events, inclusive (ms/step, calls/step):")
        for h in host[:8]:
            lines.append(f"    {h['ms']:8.3f} {h['calls_per_step']:6.0f}  {h['name'][:100]}")
    lines.append(f"  top {top} kernels (ms/step, launches/step):")
    for k in summary["top_kernels"][:top]:
        lines.append(
            f"    {k['ms']:8.3f} {k['launches_per_step']:6.0f}  [{k['category']}] {k['name'][:110]}"
        )
    return "\n".join(lines)
