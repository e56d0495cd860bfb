"""The results of the LightningDiT parity runs (issue 18, item 2), from a work folder: the exact
phase (per-step agreement over the injected steps), the free phase (smoothed train-loss curves,
the reference's seed spread), the validation-loss table (each side's checkpoints evaluated by
both sides) with the acceptance test, and the sample grids side by side.

  python3 launch/parity/dit_compare.py --work=W [--out=W/compare]

Writes `curves.png` (train loss and gradient norm, smoothed; validation loss by step; ours minus
the reference mean against the reference's seed-to-seed difference), `exact.png` (per-step
relative differences of the injected steps), `samples.png` (per class: ours | the reference,
both sampled from the same noise by their own sampler and decoded by the one tokenizer),
`summary.json` and `summary.md` (the tables). Runs that are absent are left out.

Acceptance (the issue's): at each evaluated step, ours lies within the spread of the two
reference seeds, or within 1% of the reference's validation loss (the mean of its seeds), by
either evaluator.
"""

from __future__ import annotations

import argparse
import json

import dit_common as common
import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--out", default="", help="default: <work>/compare")
    p.add_argument("--ours", default="ours")
    p.add_argument("--refs", default="ref_s0,ref_s1", help="the reference seeds' runs")
    p.add_argument(
        "--exact_pairs",
        default="ours_fp32:ref_fp32,ours:ref_s0,ref_s1:ref_s0",
        help="run pairs compared step by step over the injected steps",
    )
    p.add_argument("--window", type=int, default=100, help="smoothing of the train curves")
    p.add_argument("--tail", type=int, default=500, help="steps of the final train-loss mean")
    p.add_argument("--tile", type=int, default=128, help="pixels per sample in samples.png")
    return p.parse_args(argv)


def load_logs(work: common.Work) -> dict:
    return {p.stem: common.read_log(p) for p in sorted(work.logs.glob("*.jsonl"))}


# ---------------------------------------------------------------------------------------------
# Exact phase
# ---------------------------------------------------------------------------------------------
def weights_diff(work: common.Work, a: str, b: str, step: int) -> dict | None:
    """max over tensors of |a - b|_2 / |b|_2 of the online and EMA weights of two runs'
    checkpoints at `step` (None when either is missing)."""
    pa, pb = work.checkpoint(a, step), work.checkpoint(b, step)
    if not (pa.exists() and pb.exists()):
        return None
    out = {}
    for group in ("model", "ema"):
        wa, wb = common.load_weights(pa, group), common.load_weights(pb, group)
        rel = {
            k: float(np.linalg.norm(wa[k] - wb[k]) / max(np.linalg.norm(wb[k]), 1e-30)) for k in wb
        }
        worst = max(rel, key=rel.get)
        out[group] = dict(max_rel=rel[worst], tensor=worst)
    return dict(step=step, **out)


def exact_phase(logs: dict, pairs, work: common.Work) -> list[dict]:
    rows = []
    for a, b in pairs:
        if a not in logs or b not in logs:
            continue
        la, lb = logs[a][1], logs[b][1]
        k = int(min(logs[a][0]["inject_steps"], logs[b][0]["inject_steps"]))
        n = min(len(la["step"]), len(lb["step"]))
        rel = {key: common.relative_diff(la[key][:n], lb[key][:n]) for key in common.LOG_KEYS}
        worst = np.max([rel[key] for key in common.LOG_KEYS], axis=0)

        def first_over(x, limit):
            over = np.flatnonzero(x > limit)
            return int(over[0]) if len(over) else None

        rows.append(
            dict(
                pair=f"{a} vs {b}",
                dtypes=f"{logs[a][0].get('dtype')} / {logs[b][0].get('dtype')}",
                inject_steps=k,
                max_rel_injected={key: float(rel[key][:k].max()) if k else None for key in rel},
                loss_rel_per_step=[float(x) for x in rel["loss"][:k]],
                first_over_1e4=first_over(worst, 1e-4),
                first_over_1e3=first_over(worst, 1e-3),
                weights_after_k=weights_diff(work, a, b, k),
                rel=rel,
            )
        )
    return rows


def plot_exact(rows: list[dict], path) -> None:
    if not rows:
        return
    plt = common.pyplot()
    keys = common.LOG_KEYS
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for row in rows:
            k = row["inject_steps"]
            x = row["rel"][key][: 2 * max(k, 1)]
            ax.semilogy(np.arange(len(x)), np.maximum(x, 1e-10), lw=1, label=row["pair"])
            ax.axvline(k - 0.5, color="gray", lw=0.6)
        ax.axhline(1e-4, color="gray", ls="--", lw=0.6)
        ax.set_title(f"{key}: |a-b| / max(|a|,|b|)", fontsize=8)
        ax.set_xlabel("step (injected t/noise left of the line)", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Free phase and validation
# ---------------------------------------------------------------------------------------------
def free_phase(logs: dict, ours: str, refs: list[str], tail: int) -> dict:
    out = {}
    for run, (meta, log, end) in logs.items():
        n = len(log["step"])
        out[run] = dict(
            steps=n,
            dtype=meta.get("dtype"),
            side=meta.get("side"),
            final_train_loss=float(np.mean(log["loss"][-tail:])) if n else None,
            img_per_s=end.get("img_per_s"),
            train_s=end.get("train_s"),
        )
    present = [r for r in refs if r in logs]
    if ours in logs and len(present) == 2:
        vals = [out[r]["final_train_loss"] for r in present]
        out["_acceptance"] = dict(
            ours=out[ours]["final_train_loss"],
            refs=vals,
            spread=abs(vals[0] - vals[1]),
            ours_minus_ref_mean=out[ours]["final_train_loss"] - float(np.mean(vals)),
        )
    return out


def load_evals(work: common.Work) -> dict:
    """{evaluator: {(run, step, weights): row}}"""
    out = {}
    for path in sorted(work.eval.glob("by_*.json")):
        doc = json.loads(path.read_text())
        out[doc["meta"]["evaluator"]] = {
            (r["run"], r["step"], r["weights"]): r for r in doc["results"]
        }
    return out


def val_table(evals: dict, ours: str, refs: list[str]) -> list[dict]:
    rows = []
    keys = sorted({k for ev in evals.values() for k in ev})
    steps = sorted({(s, w) for (_, s, w) in keys})
    for step, weights in steps:
        for evaluator, ev in evals.items():
            row = dict(step=step, weights=weights, evaluator=evaluator)
            for run in sorted({r for (r, _, _) in keys}):
                if (run, step, weights) in ev:
                    row[run] = ev[(run, step, weights)]["loss"]
            present = [row[r] for r in refs if r in row]
            if ours in row and len(present) == 2:
                lo, hi, mean = min(present), max(present), float(np.mean(present))
                row["ref_spread"] = hi - lo
                row["ours_rel_to_ref_mean"] = (row[ours] - mean) / mean
                row["within_spread"] = bool(lo <= row[ours] <= hi)
                row["within_1pct"] = bool(abs(row[ours] - mean) <= 0.01 * mean)
                row["accepted"] = row["within_spread"] or row["within_1pct"]
            rows.append(row)
    return rows


def cross_eval(evals: dict) -> dict:
    """The largest relative difference between the two evaluators on the same checkpoint."""
    if len(evals) < 2:
        return {}
    a, b = list(evals.values())[:2]
    shared = sorted(set(a) & set(b))
    rel = [abs(a[k]["loss"] - b[k]["loss"]) / abs(b[k]["loss"]) for k in shared]
    return dict(checkpoints=len(shared), max_rel=float(max(rel)) if rel else None)


def plot_curves(logs, evals, ours, refs, window, path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    free = {r: v for r, v in logs.items() if v[0].get("steps", 0) > 2 * window}
    for run, (meta, log, _) in free.items():
        label = f"{run} ({meta.get('side')}, {meta.get('dtype')})"
        axes[0].plot(log["step"], common.smooth(log["loss"], window), lw=1, label=label)
        axes[1].semilogy(log["step"], common.smooth(log["grad_norm"], window), lw=1, label=run)
    axes[0].set_title(f"train loss (mse + cos), mean of {window} steps", fontsize=9)
    axes[1].set_title(f"gradient norm, mean of {window} steps", fontsize=9)
    if free:
        axes[0].legend(fontsize=7)
    # Validation: the model weights of the free runs after step 0 (at step 0 all share the one
    # init; the EMA, slow to leave it, is in the table), one colour per run, ours' evaluator as
    # a line with dots and the reference's as crosses on it.
    colors = {run: line.get_color() for run, line in zip(free, axes[0].get_lines(), strict=False)}
    markers = {"ours": "o", "reference": "x"}
    step0 = set()
    for evaluator, ev in evals.items():
        for run in [r for r in free if any(k[0] == r for k in ev)]:
            pts = sorted(
                (s, row["loss"]) for (r, s, w), row in ev.items() if r == run and w == "model"
            )
            step0.update(round(v, 4) for s, v in pts if s == 0)
            pts = [(s, v) for s, v in pts if s > 0]
            if not pts:
                continue
            s, v = zip(*pts)
            axes[2].plot(
                s, v, "-" if evaluator == "ours" else "none", marker=markers.get(evaluator, "."),
                ms=5, lw=1, color=colors.get(run), label=f"{run} (by {evaluator})",
            )  # fmt: skip
    at0 = f"; step 0: {min(step0):.4f}" if step0 else ""
    axes[2].set_title(f"validation loss, model weights{at0}", fontsize=9)
    if evals:
        axes[2].legend(fontsize=6)
    present = [r for r in refs if r in free]
    if ours in free and len(present) == 2:
        la, l0, l1 = (free[r][1] for r in (ours, *present))
        n = min(len(la["loss"]), len(l0["loss"]), len(l1["loss"]))
        s0, s1 = common.smooth(l0["loss"][:n], window), common.smooth(l1["loss"][:n], window)
        diff = common.smooth(la["loss"][:n], window) - 0.5 * (s0 + s1)
        half = 0.5 * np.abs(s0 - s1)
        steps = la["step"][:n]
        axes[3].fill_between(
            steps, -half, half, color="gray", alpha=0.3, label="ref seeds: +-|s0-s1|/2"
        )
        axes[3].plot(steps, diff, lw=1, label=f"{ours} - ref mean")
        axes[3].axhline(0, color="k", lw=0.5)
        axes[3].legend(fontsize=7)
    axes[3].set_title("smoothed train loss: ours minus the reference", fontsize=9)
    for ax in axes:
        ax.tick_params(labelsize=7)
        ax.set_xlabel("step", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------
def with_titles(grid: np.ndarray, titles: list[str], offset: int) -> np.ndarray:
    """A white strip above the grid with one title over each half."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (grid.shape[1], 24), "white")
    draw = ImageDraw.Draw(strip)
    for i, title in enumerate(titles):
        draw.text((4 + i * offset, 6), title, fill="black")
    return np.concatenate([np.asarray(strip), grid])


def samples(work: common.Work, ours: str, ref: str, tile: int, path) -> dict:
    out = {}
    plan = common.read_plan(work)
    per_class = int(plan["per_class"])
    a_path, b_path = work.images / f"{ours}__by_ours.npy", work.images / f"{ref}__by_reference.npy"
    if a_path.exists() and b_path.exists():
        a, b = np.load(a_path), np.load(b_path)
        rows = [[*a[i : i + per_class], *b[i : i + per_class]] for i in range(0, len(a), per_class)]
        grid = common.tile_grid(rows, tile, gap_after=per_class - 1)
        titles = [f"{ours}: ours (JAX), its sampler", f"{ref}: reference (PyTorch), its sampler"]
        common.save_png(path, with_titles(grid, titles, per_class * tile + tile // 4))
        out["grid"] = (
            f"{path} (rows: classes {plan['sample_classes']}; left {titles[0]}, right {titles[1]})"
        )
    # The two samplers on the same weights (same noise, labels, guidance): latent differences.
    for run in (ours, ref):
        p, q = work.sample_file(run, "ours"), work.sample_file(run, "reference")
        if p.exists() and q.exists():
            x, y = np.load(p), np.load(q)
            out[f"{run}: sampler ours vs reference"] = dict(
                max_abs=float(np.abs(x - y).max()),
                rms=float(np.sqrt(np.mean((x - y) ** 2))),
                rms_of_samples=float(np.sqrt(np.mean(y**2))),
            )
    settings = work.samples / f"{ours}__by_ours.json"
    if settings.exists():
        out["settings"] = json.loads(settings.read_text())
    return out


# ---------------------------------------------------------------------------------------------
def markdown(summary: dict, refs: list[str], ours: str) -> str:
    lines = ["# LightningDiT training parity", ""]
    lines += ["## Exact phase (injected t / noise / label drop)", ""]
    lines += [
        "| pair | dtypes | K | max rel (loss, mse, cos, grad_norm, param_norm) | first step > 1e-4 | > 1e-3 |"
    ]
    lines += ["|---|---|---|---|---|---|"]
    for row in summary["exact"]:
        m = row["max_rel_injected"]
        vals = ", ".join("-" if m[k] is None else f"{m[k]:.1e}" for k in common.LOG_KEYS)
        lines.append(
            f"| {row['pair']} | {row['dtypes']} | {row['inject_steps']} | {vals} | "
            f"{row['first_over_1e4']} | {row['first_over_1e3']} |"
        )
    for row in summary["exact"]:
        w = row["weights_after_k"]
        if w:
            lines.append(
                f"\n{row['pair']}: weights after the {w['step']} injected steps differ by at most "
                f"{w['model']['max_rel']:.1e} (model, {w['model']['tensor']}) and "
                f"{w['ema']['max_rel']:.1e} (EMA) relative (per-tensor L2)."
            )
    lines += ["", "## Train runs", "", "| run | side | dtype | steps | final train loss | img/s |"]
    lines += ["|---|---|---|---|---|---|"]
    for run, r in summary["free"].items():
        if run.startswith("_"):
            continue
        ips = "-" if r["img_per_s"] is None else f"{r['img_per_s']:.0f}"
        fl = "-" if r["final_train_loss"] is None else f"{r['final_train_loss']:.4f}"
        lines.append(f"| {run} | {r['side']} | {r['dtype']} | {r['steps']} | {fl} | {ips} |")
    lines += ["", "(img/s: while the runs shared one device; the benchmark's figures are alone.)"]
    if "_acceptance" in summary["free"]:
        a = summary["free"]["_acceptance"]
        lines += [
            "",
            f"Final train loss: ours {a['ours']:.4f}, reference seeds {a['refs'][0]:.4f} / "
            f"{a['refs'][1]:.4f} (spread {a['spread']:.4f}); ours - ref mean "
            f"{a['ours_minus_ref_mean']:+.4f}.",
        ]
    lines += ["", "## Validation loss (mse + cos over the t grid)", ""]
    runs = sorted({k for row in summary["val"] for k in row if k not in VAL_META})
    head = ["step", "weights", "evaluator", *runs, "ours rel to ref mean", "accepted"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["val"]:
        vals = [f"{row[r]:.5f}" if r in row else "-" for r in runs]
        rel = f"{row['ours_rel_to_ref_mean']:+.2%}" if "ours_rel_to_ref_mean" in row else "-"
        acc = str(row.get("accepted", "-"))
        lines.append(
            f"| {row['step']} | {row['weights']} | {row['evaluator']} | {' | '.join(vals)} | {rel} | {acc} |"
        )
    ce = summary.get("cross_eval") or {}
    if ce:
        lines += [
            "",
            f"Evaluators agree on {ce['checkpoints']} checkpoints to {ce['max_rel']:.1e} relative.",
        ]
    lines += ["", "## Samples", ""]
    for k, v in summary["samples"].items():
        lines.append(f"- {k}: {v}")
    return "\n".join(lines) + "\n"


VAL_META = {
    "step",
    "weights",
    "evaluator",
    "ref_spread",
    "ours_rel_to_ref_mean",
    "within_spread",
    "within_1pct",
    "accepted",
}


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = common.Work.at(args.work)
    out = common.Work.at(args.out).root if args.out else work.compare
    out.mkdir(parents=True, exist_ok=True)
    refs = [r for r in args.refs.split(",") if r]
    pairs = [tuple(p.split(":")) for p in args.exact_pairs.split(",") if p]
    logs = load_logs(work)
    exact = exact_phase(logs, pairs, work)
    plot_exact(exact, out / "exact.png")
    evals = load_evals(work)
    plot_curves(logs, evals, args.ours, refs, args.window, out / "curves.png")
    summary = dict(
        plan={k: v for k, v in common.read_plan(work).items() if k not in ("model",)},
        exact=[{k: v for k, v in row.items() if k != "rel"} for row in exact],
        free=free_phase(logs, args.ours, refs, args.tail),
        val=val_table(evals, args.ours, refs),
        cross_eval=cross_eval(evals),
        samples=samples(work, args.ours, refs[0] if refs else "", args.tile, out / "samples.png"),
    )
    common.write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(markdown(summary, refs, args.ours))
    print((out / "summary.md").read_text(), flush=True)
    return summary


if __name__ == "__main__":
    main()
