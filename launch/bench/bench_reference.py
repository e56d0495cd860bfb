"""Times the PyTorch reference (hustvl/LightningDiT) on this GPU, for side-by-side ratios.

  python launch/bench/bench_reference.py --ref_dir=/path/to/LightningDiT --out=ref.json

The reference is not part of this project: pass the folder of a checkout of
github.com/hustvl/LightningDiT (only its models/ and transport/ packages are imported). Measured
as its train.py runs them: LightningDiT with the paper's switches (SwiGLU, RoPE, RMSNorm), the
transport's `training_losses` (lognorm t, cosine loss) summed as in train.py, AdamW(lr 2e-4,
betas 0.9/0.95, no weight decay), `update_ema` with decay 0.9999, bf16 autocast (accelerate's
`mixed_precision="bf16"`), no gradient checkpointing, no torch.compile. The CFG forward is
`forward_with_cfg` at 2 x batch under bf16 autocast and no_grad, one sampling step. Each case:
warm-up, then the median of `--iters` steps with `torch.cuda.synchronize()`.

Its models/rmsnorm.py imports fairscale (unused by RMSNorm itself); when fairscale is missing a
stand-in module is registered so that the import succeeds.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import pathlib
import statistics
import sys
import time
import types
from collections import OrderedDict


def _stub_fairscale() -> None:
    try:
        import fairscale  # noqa: F401
    except ImportError:
        layers = types.ModuleType("fairscale.nn.model_parallel.layers")
        for name in ("ColumnParallelLinear", "ParallelEmbedding", "RowParallelLinear"):
            setattr(layers, name, object)
        mods = {
            "fairscale": types.ModuleType("fairscale"),
            "fairscale.nn": types.ModuleType("fairscale.nn"),
            "fairscale.nn.model_parallel": types.ModuleType("fairscale.nn.model_parallel"),
            "fairscale.nn.model_parallel.initialize": types.ModuleType(
                "fairscale.nn.model_parallel.initialize"
            ),
            "fairscale.nn.model_parallel.layers": layers,
        }
        sys.modules.update(mods)


def _import_reference(ref: pathlib.Path) -> None:
    """Imports the checkout's models/ and transport/ packages under their own names, as its
    train.py sees them (they import each other as `models.x`, `transport.x`), without putting
    the checkout on sys.path."""
    for name in ("models", "transport"):
        spec = importlib.machinery.PathFinder.find_spec(name, [str(ref)])
        if spec is None:
            raise SystemExit(f"--ref_dir={ref}: no {name}/ package there")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def _model(torch, models, preset: str):
    m = models[f"LightningDiT-{preset}"](
        input_size=16,
        in_channels=32,
        use_qknorm=False,
        use_swiglu=True,
        use_rope=True,
        use_rmsnorm=True,
        wo_shift=False,
    )
    return m.cuda()


def _time(torch, fn, iters: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return dict(median_s=statistics.median(times), min_s=min(times))


def bench_train(torch, models, create_transport, preset: str, batch: int, iters: int) -> dict:
    from copy import deepcopy

    model = _model(torch, models, preset)
    ema = deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    model.train()
    transport = create_transport("Linear", "velocity", None, None, None, True, True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0, betas=(0.9, 0.95))
    x = torch.randn(batch, 32, 16, 16, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")

    @torch.no_grad()
    def update_ema(decay=0.9999):  # train.py's update_ema
        ema_params = OrderedDict(ema.named_parameters())
        for name, param in model.named_parameters():
            ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            terms = transport.training_losses(model, x, dict(y=y))
            loss = terms["cos_loss"].mean() + terms["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_ema()

    r = _time(torch, step, iters)
    r["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return r  # the models are freed with this frame (main empties the cache)


def bench_cfg_forward(torch, models, preset: str, batch: int, iters: int) -> dict:
    model = _model(torch, models, preset).eval()
    x = torch.randn(2 * batch, 32, 16, 16, device="cuda")
    y = torch.cat(
        [
            torch.randint(0, 1000, (batch,), device="cuda"),
            torch.full((batch,), 1000, device="cuda"),
        ]
    )
    t = torch.full((2 * batch,), 0.5, device="cuda")

    @torch.no_grad()
    def fwd():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model.forward_with_cfg(x, t, y, 10.0, True, 0.11)

    return _time(torch, fwd, iters)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ref_dir", required=True, help="A checkout of hustvl/LightningDiT.")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--train", default="XL/1,64;B/1,256", help="';'-separated preset,batch")
    p.add_argument(
        "--cfg_forward",
        default="XL/1,128",
        help="';'-separated preset,batch (the CFG forward at 2x batch, the sampler's step)",
    )
    p.add_argument("--out", default="bench_reference.json")
    args = p.parse_args()
    ref = pathlib.Path(args.ref_dir).resolve()
    if not (ref / "models" / "lightningdit.py").is_file():
        raise SystemExit(f"--ref_dir={ref}: no models/lightningdit.py there")
    _stub_fairscale()
    _import_reference(ref)
    import torch
    from models.lightningdit import LightningDiT_models
    from transport import create_transport

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}, torch {torch.__version__}", flush=True)
    results = []
    for spec in filter(None, args.train.split(";")):
        preset, b = spec.split(",")
        r = bench_train(torch, LightningDiT_models, create_transport, preset, int(b), args.iters)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        r.update(case=f"reference_train_{preset}", batch=int(b), img_per_s=int(b) / r["median_s"])
        print(f"  {r['case']} b{b}: {r['median_s'] * 1e3:.1f} ms, {r['img_per_s']:.1f} img/s")
        results.append(r)
    for spec in filter(None, args.cfg_forward.split(";")):
        preset, b = spec.split(",")
        r = bench_cfg_forward(torch, LightningDiT_models, preset, int(b), args.iters)
        torch.cuda.empty_cache()
        r.update(
            case=f"reference_cfg_forward_{preset}",
            batch=int(b),
            img_per_s_at_250_steps=int(b) / (250 * r["median_s"]),
            hours_to_50k_at_250_steps=50000 / int(b) * 250 * r["median_s"] / 3600,
        )
        print(
            f"  {r['case']} 2x{b}: {r['median_s'] * 1e3:.1f} ms per step "
            f"({r['img_per_s_at_250_steps']:.2f} img/s at 250 steps)"
        )
        results.append(r)
    meta = dict(device=dev, torch=torch.__version__, date=time.strftime("%Y-%m-%d"), argv=sys.argv)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(dict(meta=meta, results=results), indent=2))


if __name__ == "__main__":
    main()
