"""Start-up and steady rate of the trainers, run as users run them (issue: "the main job does not
start on a GPU").

Each case is a shell command (normally `python3 launch/train.py ...`), run as a subprocess with
its output timestamped from the moment it was started. From the log it reads:
- `first_step_s`: when the trainer logged "first step finished" (wall time since launch, Python
  start-up and imports included);
- `compiles`: every "compiled <fn> in <s> s" line (vavae_jax.runtime.compile_log);
- `steady_img_s`: the rate of the plain log lines ("step 40/80 ... | 12.3 img/s"), the first
  interval (which holds the first step and its compile) left out.

  python3 launch/bench/startup.py --out=startup.json \
      --case "vavae=python3 launch/train.py --config=configs/vavae_f16d32.py ..."

`--probe_old_init=dinov2-large` times the former frozen-network initialisation instead: one
jitted random init compiled for the default device (the GPU), as `sharding.jit_init` did before
it moved to the host CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import threading
import time

COMPILE_RE = re.compile(r"compiled (\S+) in ([\d.]+) s")
STEP_RE = re.compile(r"step (\d+)/(\d+).*?\| ([\d.]+) img/s")


def run_case(name: str, command: str, timeout_s: float, log_dir: str | None) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(
        command,
        shell=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    lines: list[tuple[float, str]] = []

    def reader():
        for line in proc.stdout:
            t = time.perf_counter() - start
            lines.append((t, line.rstrip("\n")))
            print(f"[{name} {t:7.1f}s] {line.rstrip()}", flush=True)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        rc = "timeout"
    th.join(5)
    wall = time.perf_counter() - start
    if log_dir:
        with open(os.path.join(log_dir, f"startup_{name}.log"), "w") as f:
            f.writelines(f"{t:8.2f} {s}\n" for t, s in lines)
    first = next((t for t, s in lines if "first step finished" in s), None)
    compiles = [
        dict(fn=m.group(1), s=float(m.group(2)), at_s=round(t, 1))
        for t, s in lines
        if (m := COMPILE_RE.search(s))
    ]
    rates = [float(m.group(3)) for _, s in lines if (m := STEP_RE.search(s))]
    return dict(
        name=name,
        command=command,
        returncode=rc,
        wall_s=round(wall, 1),
        first_step_s=None if first is None else round(first, 1),
        compiles=compiles,
        rates_img_s=rates,
        steady_img_s=round(statistics.median(rates[1:]), 2) if len(rates) > 1 else None,
    )


def probe_old_init(preset: str) -> None:
    """The former `jit_init`: the DINOv2 / LPIPS random init compiled for the default device."""
    import dataclasses

    import jax
    from flax import nnx

    from vavae_jax import foundation
    from vavae_jax import lpips as lpips_lib
    from vavae_jax.runtime import compile_log

    compile_log.install(warn_after_s=30.0)
    if preset == "lpips":

        def init():
            return nnx.state(lpips_lib.LPIPS("bfloat16", rngs=nnx.Rngs(0)))
    else:
        cfg = dataclasses.replace(foundation.PRESETS[preset], dtype="bfloat16")

        def init():
            return nnx.state(foundation.Dinov2Model(cfg, rngs=nnx.Rngs(0)))

    t = time.perf_counter()
    state = jax.jit(init)()
    jax.block_until_ready(state)
    print(f"old jit init of {preset} on {jax.devices()[0]}: {time.perf_counter() - t:.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", action="append", default=[], help="name=shell command")
    p.add_argument("--timeout_s", type=float, default=420.0, help="per case")
    p.add_argument("--out", default="", help="JSON results")
    p.add_argument("--log_dir", default="", help="one timestamped log per case")
    p.add_argument("--probe_old_init", default="", help="dinov2-large | lpips (see docstring)")
    args = p.parse_args()
    if args.probe_old_init:
        probe_old_init(args.probe_old_init)
        return
    results = []
    for case in args.case:
        name, _, command = case.partition("=")
        results.append(run_case(name, command, args.timeout_s, args.log_dir or None))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    print("\n| case | rc | first step (s) | steady img/s | compiles over 5 s |")
    print("|---|---|---|---|---|")
    for r in results:
        slow = ", ".join(f"{c['fn']} {c['s']:.0f}" for c in r["compiles"] if c["s"] >= 5)
        print(
            f"| {r['name']} | {r['returncode']} | {r['first_step_s']} | {r['steady_img_s']} | "
            f"{slow} |"
        )


if __name__ == "__main__":
    main()
