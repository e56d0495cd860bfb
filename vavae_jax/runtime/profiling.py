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


def device_events(xplane_path: str) -> tuple[list[tuple[str, float, str | None]], list[str]]:
    """Kernel events of every device plane of an `.xplane.pb` and the names of those planes."""
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
    return events, planes


def profile(fn: Callable[[], Any], steps: int, logdir: str) -> dict[str, Any]:
    """Runs `fn()` `steps` times under the profiler (each result blocked on) and summarises the
    device kernels per step. `fn` should be compiled and warm already."""
    os.makedirs(logdir, exist_ok=True)
    with jax.profiler.trace(logdir):
        for _ in range(steps):
            jax.block_until_ready(fn())
    paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"jax.profiler wrote no .xplane.pb under {logdir}")
    events, planes = device_events(max(paths, key=os.path.getmtime))
    if not events:
        raise RuntimeError(
            f"the trace in {logdir} has no device kernel events (device planes: {planes or None});"
            " kernel summaries need a GPU backend"
        )
    summary = summarize_events(events, steps)
    summary["device_planes"] = planes
    return summary


def format_summary(summary: dict[str, Any], top: int = 25) -> str:
    lines = [f"  device kernel time: {summary['kernel_ms_per_step']:.2f} ms/step"]
    for cat, ms in summary["by_category_ms"].items():
        share = ms / summary["kernel_ms_per_step"] if summary["kernel_ms_per_step"] else 0.0
        lines.append(f"    {cat:<12} {ms:8.2f} ms  {share:6.1%}")
    lines.append(f"  top {top} kernels (ms/step, launches/step):")
    for k in summary["top_kernels"][:top]:
        lines.append(
            f"    {k['ms']:8.3f} {k['launches_per_step']:6.0f}  [{k['category']}] {k['name'][:110]}"
        )
    return "\n".join(lines)
