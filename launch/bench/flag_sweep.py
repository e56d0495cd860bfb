"""Runs `launch/bench/benchmark.py` once per XLA flag variant (each in its own process, since XLA
reads XLA_FLAGS once) and prints one table: time per call, and how far each variant's outputs
are from the first variant's (the forward's relative L2 error, the train step's loss).

  python launch/bench/flag_sweep.py --out_dir=/tmp/sweep -- --only=dit_train,dit_forward \
      --dit_train="XL/1,64,bfloat16,none,loop" --dit_forward="XL/1,256,bfloat16,loop" --iters=10

Variants are `name=flags` pairs separated by ';' (`--variants`); the first is the baseline
(usually `base=` with no flags). Flags that this XLA does not know make the variant fail, which
the table says; a variant that runs past `--timeout_s` is stopped and reported.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

DEFAULT_VARIANTS = ";".join(
    [
        "base=",
        "triton_any=--xla_gpu_triton_gemm_any=true",
        "cudnn_gemm2=--xla_gpu_cudnn_gemm_fusion_level=2",
        "cublaslt=--xla_gpu_enable_cublaslt=true",
    ]
)


def parse_variants(text: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, (v.strip() for v in text.split(";"))):
        name, sep, flags = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--variants: {item!r} is not name=flags")
        out.append((name, flags.strip()))
    if not out:
        raise SystemExit("--variants: no variant given")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--out_dir", required=True)
    p.add_argument("--timeout_s", type=float, default=300.0)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: benchmark.py args")
    args = p.parse_args()
    bench_args = [a for a in args.bench_args if a != "--"]
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = pathlib.Path(__file__).resolve().parent / "benchmark.py"
    rows, base = [], {}
    for name, flags in parse_variants(args.variants):
        env = dict(os.environ)
        env["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), flags]))
        cmd = [sys.executable, str(bench), *bench_args, f"--out={out_dir}/{name}.json"]
        cmd.append(f"--save_forward_out={out_dir}/{name}")
        print(f"== {name}: XLA_FLAGS={env['XLA_FLAGS']!r}", flush=True)
        t = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=args.timeout_s
            )
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
            log = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            status = f"timeout {args.timeout_s:.0f} s"
            log = (e.stdout or b"").decode() + (e.stderr or b"").decode()
        (out_dir / f"{name}.log").write_text(log)
        wall = time.perf_counter() - t
        if status != "ok":
            print(
                f"   {status} after {wall:.0f} s; last lines:\n" + "\n".join(log.splitlines()[-8:])
            )
            rows.append(dict(variant=name, flags=flags, status=status))
            (out_dir / "sweep.json").write_text(json.dumps(rows, indent=2))
            continue
        results = json.loads((out_dir / f"{name}.json").read_text())["results"]
        for r in results:
            if "median_s" not in r:
                continue
            row = dict(variant=name, flags=flags, status=status, case=r["case"])
            row.update(ms=r["median_s"] * 1e3, compile_s=r["compile_s"], img_per_s=r["img_per_s"])
            key = r["case"]
            npy = out_dir / f"{name}_{key}.npy"
            if npy.exists():
                out = np.load(npy).astype(np.float64)
                if key not in base:
                    base[key] = out
                ref = base[key]
                row["rel_err_vs_first"] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            if "loss" in r:
                base.setdefault(key + "/loss", r["loss"])
                row["loss"] = r["loss"]
                row["loss_vs_first"] = r["loss"] - base[key + "/loss"]
            rows.append(row)
            print(f"   {key}: {row['ms']:.2f} ms, compile {row['compile_s']:.0f} s", flush=True)
        (out_dir / "sweep.json").write_text(json.dumps(rows, indent=2))  # kept if stopped later
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=2))
    print(
        "\n| variant | case | ms/call | img/s | compile s | vs first |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        if r["status"] != "ok":
            print(f"| {r['variant']} | {r['status']} | | | | |")
            continue
        diff = (
            f"rel err {r['rel_err_vs_first']:.1e}"
            if "rel_err_vs_first" in r
            else f"loss {r['loss']:.5f} ({r['loss_vs_first']:+.1e})"
            if "loss" in r
            else ""
        )
        print(
            f"| {r['variant']} | {r['case']} | {r['ms']:.2f} | {r['img_per_s']:.1f} | "
            f"{r['compile_s']:.0f} | {diff} |"
        )


if __name__ == "__main__":
    main()
