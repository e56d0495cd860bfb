"""Compares the two sides of the VA-VAE parity runs (issue 18) and draws the figures for docs/.

  python3 launch/parity/vavae_compare.py exact --ours=W/ours_exact.jsonl --ref=W/ref_exact.jsonl \\
      [--ref64=W/ref_exact_f64.jsonl] --window=50 --json=W/exact.json --plot=W/vavae_exact.png
  python3 launch/parity/vavae_compare.py free --ours W/ours_free.jsonl [W/ours_free32.jsonl ...] \\
      --refs W/ref_free_s0.jsonl W/ref_free_s1.jsonl --eval W/eval.json --recon_dir=W/recon \\
      --json=W/free.json --plot=W/vavae_free.png --grid=W/vavae_recon.png

exact: per step and term the relative difference |a - b| / max(|a|, |b|, 1e-6) of ours to the
reference; the first step where any term departs by more than 1e-4 (and which), the largest
difference of each term over the first `--window` steps and whether all stay within 1e-3. With
`--ref64` (the reference in float64) the same for ours and for the float32 reference against
it: how far float32 round-off alone moves a correct implementation.
free: the smoothed curves of every run overlaid, the metrics of `vavae_ours.py eval` at each
saved step, and whether each of our runs (bf16, float32, other noise seeds: `--ours`, each
`[TAG=]LOG`) lies within the reference seeds' range (the spread) there. Runs of two device
sessions compare through tags: `--ours run2/ours_free=<run 2's log> --eval run2:<run 2's eval>`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re

import numpy as np
import vavae_common as common

EXACT_TOL, DEPART_TOL = 1e-3, 1e-4
FREE_KEYS = tuple(k for k in common.LOG_KEYS if k not in ("disc_factor", "logvar", "param_norm_g"))


def diff_table(a: dict, b: dict, window: int) -> dict:
    """Per key: relative differences of run a to run b over their common steps."""
    n = min(len(a["step"]), len(b["step"]))
    keys = [k for k in common.LOG_KEYS if k in a and k in b]
    rel = {k: common.relative_diff(a[k][:n], b[k][:n]) for k in keys}
    first = None
    for i in range(n):
        k = max(keys, key=lambda k: rel[k][i])
        if rel[k][i] > DEPART_TOL:
            first = dict(step=i, key=k, a=a[k][i], b=b[k][i], rel=float(rel[k][i]))
            break
    w = min(window, n)
    per_key = {k: float(rel[k][:w].max()) for k in keys}
    worst = max(per_key, key=per_key.get)
    # The same against each term's scale (its RMS over the window): terms that cross zero
    # (g_loss, the logits) have huge relative differences where they pass through it.
    scaled = {}
    for k in keys:
        rms = float(np.sqrt(np.mean(b[k][:w] ** 2)))
        scaled[k] = float(np.max(np.abs(a[k][:w] - b[k][:w])) / rms) if rms > 0 else 0.0
    return dict(
        steps_compared=n,
        first_departure=first,
        window=w,
        max_rel_in_window=per_key,
        worst_in_window=dict(key=worst, rel=per_key[worst]),
        within_tol=bool(per_key[worst] <= EXACT_TOL),
        max_diff_over_rms_in_window=scaled,
    )


def cmd_exact(args) -> dict:
    meta_o, ours = common.read_log(args.ours)
    meta_r, ref = common.read_log(args.ref)
    out = dict(ours=meta_o, ref=meta_r, ours_vs_ref=diff_table(ours, ref, args.window))
    runs = {"ours (float32)": ours, "reference (float32)": ref}
    meta_64, ref64 = common.read_log(args.ref64) if args.ref64 else ({}, {"step": []})
    if args.ref64 and not len(ref64["step"]):
        out["ref64"] = dict(meta_64, note="no step logged (the run failed: see its log)")
    elif args.ref64:
        out["ref64"] = meta_64
        out["ours_vs_ref64"] = diff_table(ours, ref64, args.window)
        out["ref_vs_ref64"] = diff_table(ref, ref64, args.window)
        runs["reference (float64)"] = ref64
    if args.plot:
        common.plot_curves(
            runs,
            common.LOG_KEYS,
            args.plot,
            title="VA-VAE exact phase: same init, batches and noise, float32",
            rel_to="reference (float32)",
        )
    return out


def _tagged(spec: str) -> tuple[str, str]:
    """Splits "TAG=LOG" into (TAG, LOG); a bare LOG is tagged with its file name's stem."""
    tag, sep, path = spec.partition("=")
    return (tag, path) if sep else (pathlib.Path(spec).stem, spec)


def _eval_table(specs: list[str]) -> dict:
    """{run tag: {step: {metric: value}}} from `vavae_ours.py eval`'s json files, merged (a
    later file's entries win). "PREFIX:PATH" prefixes that file's tags with "PREFIX/", so that
    runs of two device sessions that share a tag (e.g. ours_free) can be told apart."""
    table: dict = {}
    for spec in specs:
        prefix, sep, path = spec.partition(":") if ":" in spec else ("", "", spec)
        results = json.loads(pathlib.Path(path).read_text())["results"]
        for name, values in results.items():
            m = re.fullmatch(r"(.+)_step(\d+)", name)
            if m:
                tag = f"{prefix}/{m.group(1)}" if sep else m.group(1)
                table.setdefault(tag, {})[int(m.group(2))] = values
    return table


def _within(ours: float, refs: list[float], rtol: float = 1e-4) -> dict:
    """Whether ours lies in the references' range (widened by rtol: equal starts tie)."""
    lo, hi = min(refs), max(refs)
    tol = rtol * max(abs(lo), abs(hi))
    inside = bool(lo - tol <= ours <= hi + tol)
    return dict(ours=ours, ref_min=lo, ref_max=hi, spread=hi - lo, inside=inside)


def cmd_free(args) -> dict:
    ours = {}  # tag: (label, log)
    for spec in args.ours:
        tag, path = _tagged(spec)
        meta, log = common.read_log(path)
        if not len(log["step"]):
            raise SystemExit(f"free: ours {tag} ({path}) logged no step")
        ours[tag] = (f"{tag} ({meta.get('compute_dtype')})", log)
    refs, failed = {}, []
    for spec in args.refs:
        tag, path = _tagged(spec)
        log = common.read_log(path)[1]
        if len(log["step"]):
            refs[tag] = log
        else:
            failed.append(path)  # named, not compared
    if not refs:
        raise SystemExit(f"free: no reference run logged a step ({failed})")
    out: dict = dict(window=args.smooth, failed_reference_runs=failed, ours={})
    table = _eval_table(args.eval) if args.eval else None
    for tag, (_, log) in ours.items():
        out["ours"][tag] = dict(curves=_curves(log, list(refs.values()), args))
        if table is not None:
            out["ours"][tag]["metrics"] = _metrics(table, tag, list(refs))
    if table is not None:
        out["eval"] = table
    if args.plot:
        runs = {label: log for label, log in ours.values()}
        runs.update({f"{tag} (reference)": log for tag, log in refs.items()})
        title = f"VA-VAE free phase (moving average over {args.smooth} steps)"
        common.plot_curves(runs, FREE_KEYS, args.plot, window=args.smooth, title=title)
    if args.grid and args.recon_dir:
        out["grid"] = recon_grid(args, [*ours, *refs])
    return out


def _curves(ours: dict, refs: list[dict], args) -> dict:
    """{step: {term: ours' moving average inside the references'?}} at --at and the last step
    all of them reached."""
    n = min(len(r["step"]) for r in [ours, *refs])
    keys = [k for k in FREE_KEYS if k in ours]
    smoothed = [{k: common.smooth(log[k], args.smooth) for k in keys} for log in (ours, *refs)]
    out = {}
    for step in sorted({min(int(s), n) for s in args.at.split(",")} | {n}):
        values = {k: [float(s[k][step - 1]) for s in smoothed] for k in keys}
        out[step] = {k: _within(v[0], v[1:]) for k, v in values.items()}
    return out


def _metrics(table: dict, tag: str, ref_tags: list[str]) -> dict:
    """Val metrics of run `tag` against the references' at the steps where all saved one."""
    out = {}
    for step, values in sorted(table.get(tag, {}).items()):
        refs_at = [table[t][step] for t in ref_tags if step in table.get(t, {})]
        if len(refs_at) == len(ref_tags):
            out[step] = {m: _within(v, [r[m] for r in refs_at]) for m, v in values.items()}
    return out


def recon_grid(args, tags: list[str]) -> str:
    """Val images, then each run's reconstructions at its last saved step (8 columns)."""
    rd = pathlib.Path(args.recon_dir)
    rows = [common.load_cache(args.cache, "val")[:8]] if args.cache else []
    for tag in tags:
        files = sorted(rd.glob(f"{tag}_step*.npy"))
        if files:
            rec = np.load(files[-1], mmap_mode="r")[:8].astype(np.float32)
            rows.append(np.clip(np.floor(127.5 * rec + 128.0), 0, 255).astype(np.uint8))
    common.save_grid(rows, args.grid)
    return str(args.grid)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("exact")
    q.add_argument("--ours", required=True)
    q.add_argument("--ref", required=True)
    q.add_argument("--ref64", default="")
    q.add_argument("--window", type=int, default=50)
    q.add_argument("--json", default="")
    q.add_argument("--plot", default="")
    q = sub.add_parser("free")
    q.add_argument(
        "--ours",
        nargs="+",
        required=True,
        help="[TAG=]LOG ... (TAG: the run's eval and recon tag; default the log's file stem)",
    )
    q.add_argument("--refs", nargs="+", required=True, help="[TAG=]LOG ...")
    q.add_argument(
        "--eval", nargs="*", default=[], help="[PREFIX:]JSON ... of vavae_ours.py eval, merged"
    )
    q.add_argument("--at", default="250,500,1000", help="steps of the curve comparison")
    q.add_argument("--smooth", type=int, default=50)
    q.add_argument("--recon_dir", default="")
    q.add_argument("--cache", default="", help="image caches (the grid's first row)")
    q.add_argument("--json", default="")
    q.add_argument("--plot", default="")
    q.add_argument("--grid", default="")
    args = p.parse_args(argv)
    out = cmd_exact(args) if args.command == "exact" else cmd_free(args)
    text = json.dumps(out, indent=1, default=float)
    if args.json:  # the whole result there; the verdicts on stdout
        pathlib.Path(args.json).write_text(text)
        print(json.dumps(_short(out), indent=1, default=float))
    else:
        print(text)
    return out


def _short(out: dict) -> dict:
    short = {}
    for name, table in out.items():
        if name.endswith(("_vs_ref", "_vs_ref64")):
            keep = ("steps_compared", "first_departure", "worst_in_window", "within_tol")
            short[name] = {k: table[k] for k in keep}
    for tag, run in out.get("ours", {}).items():
        for step, metrics in run.get("metrics", {}).items():
            short[f"{tag}: metrics@{step}"] = {m: (round(v["ours"], 4), round(v["ref_min"], 4),
                                                   round(v["ref_max"], 4), v["inside"])
                                               for m, v in metrics.items()}  # fmt: skip
        for step, curves in run["curves"].items():
            inside = sorted(k for k, v in curves.items() if v["inside"])
            short[f"{tag}: curves inside@{step}"] = inside
    return short


if __name__ == "__main__":
    main()
