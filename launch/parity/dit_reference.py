"""The reference side of the LightningDiT parity runs (issue 18, item 2): hustvl/LightningDiT's
own model (models/lightningdit.py), transport (transport/: training_losses, Sampler) and its
train.py loop, over the shared batch list from the common init.

  python3 launch/parity/dit_reference.py train --work=W --run=ref_s0 --seed=0 [--dtype=float32]
  python3 launch/parity/dit_reference.py post --work=W        (= sample, then eval)

The reference is not part of this project: `--ref_dir` is a clone of github.com/hustvl/LightningDiT
(default .ref/LightningDiT); its models/ and transport/ packages are imported with importlib
(dit_common.import_reference; fairscale stubbed when missing, as launch/bench/bench_reference.py).
No jax is used here. The train loop is train.py's, single process (its DDP wrapper and
accelerate's `prepare` are identity maps on one GPU):
- LightningDiT of the plan's preset fields (train.py's keywords), `load_state_dict` of the
  common init (its `weight_init` path: model and EMA), `update_ema(ema, model, 0)` equivalent;
  model.train(), ema.eval(); ema frozen;
- AdamW(lr, weight_decay=0, betas=(0.9, beta2)) and the transport, both from the reference's
  configs/lightningdit_xl_vavae_f16d32.yaml (lr 2e-4, beta2 0.95; Linear, velocity, cosine loss,
  lognorm); `clip_grad_norm_` only if the yaml's optimizer section has max_grad_norm (it has not);
- loss = cos_loss.mean() + loss.mean(); zero_grad, backward, step, `update_ema` (decay 0.9999:
  ema = decay * ema + (1 - decay) * param for every named parameter, as its update_ema);
- precision: `--dtype=bfloat16` (default on a GPU) is accelerate's `mixed_precision="bf16"`, as
  run_train.sh launches it: the model's forward under torch.autocast(bfloat16) with its output
  turned to float32 (accelerate's convert_outputs_to_fp32), the loss and optimizer in float32,
  torch's default TF32 settings; `--dtype=float32` (the exact phase) turns TF32 off in cuBLAS
  and cuDNN and runs everything in float32.
- latents: the shared raw latents of the plan's batch (index, flip) in NCHW, normalised as its
  ImgLatentDataset: (z - mean) / std * multiplier with the shared stats.
Injected steps (the first K, plan/inject.npz), by two instance-level replacements, undone after
step K: `transport.sample` returns the file's (t, noise, x1) instead of drawing t (scipy's
logit-normal) and x0 (torch.randn); the labels arrive with the file's drop applied (the null
label) while `model.y_embedder.dropout_prob` is 0 so that its own `torch.rand` drop is off.
Seeds (`--seed`): torch.manual_seed and np.random.seed (scipy's t sampler draws from numpy's
global state) before the loop: they drive the free phase's t, noise and label drop only.

`eval`: the validation loss of every checkpoint under ckpt/ (ours and the reference's, loaded
with `load_state_dict(strict=True)` from the exchange format), model.eval() (no label drop), with
`transport.sample` replaced by the fixed t grid and noise. `sample`: its `Sampler.sample_ode`
(Euler through torchdiffeq, the shifted grid) with `forward_with_cfg` (CFG on 3 channels, the
interval), the batch doubled with the null label as its inference.py.
`--compile=off` disables the reference's two `@torch.compile`s (modulate, LabelEmbedder.forward)
for CPU debugging; on a GPU they run as shipped.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import time
from collections import OrderedDict

import dit_common as common
import numpy as np

DEFAULT_REF = pathlib.Path(__file__).resolve().parents[2] / ".ref" / "LightningDiT"
SIDE = "reference"
EMA_DECAY = 0.9999  # train.py's update_ema default


def reference_settings(ref_dir) -> dict:
    """The optimizer and transport sections of the reference's own config."""
    import yaml

    path = pathlib.Path(ref_dir) / "configs" / "lightningdit_xl_vavae_f16d32.yaml"
    cfg = yaml.safe_load(path.read_text())
    return dict(optimizer=cfg["optimizer"], transport=cfg["transport"], yaml=str(path))


def make_transport(settings):
    from transport import create_transport

    t = settings["transport"]
    return create_transport(
        t["path_type"],
        t["prediction"],
        t["loss_weight"],
        t["train_eps"],
        t["sample_eps"],
        use_cosine_loss=t.get("use_cosine_loss", False),
        use_lognorm=t.get("use_lognorm", False),
    )


class Torch:
    """torch, the device, the dtype and the model call of one process."""

    def __init__(self, args):
        import torch

        self.torch = torch
        if args.threads:
            torch.set_num_threads(args.threads)
        cuda = torch.cuda.is_available() and args.device != "cpu"
        self.device = torch.device("cuda" if cuda else "cpu")
        self.dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if cuda else "float32")
        if self.dtype == "float32":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.set_float32_matmul_precision("highest")
        compile_on = args.compile == "on" or (args.compile == "auto" and cuda)
        if not compile_on:
            torch._dynamo.config.disable = True
        self.compile = compile_on
        common.import_reference(args.ref_dir)

    def name(self) -> str:
        t = self.torch
        return t.cuda.get_device_name() if self.device.type == "cuda" else "cpu"

    def call(self, fn):
        """fn under accelerate's bf16 mixed precision (autocast, float32 outputs), or as is."""
        torch = self.torch
        if self.dtype == "float32":
            return fn

        def wrapped(*args, **kwargs):
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                out = fn(*args, **kwargs)
            return out.float()

        return wrapped

    def nchw(self, x: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(self.device)

    def stats(self, work: common.Work, plan: dict):
        with np.load(work.data / "stats.npz") as f:
            mean = self.torch.from_numpy(f["mean"]).view(1, -1, 1, 1).to(self.device)
            std = self.torch.from_numpy(f["std"]).view(1, -1, 1, 1).to(self.device)
        return mean, std, float(plan["latent_multiplier"])

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def build_model(tc: Torch, plan: dict):
    return common.reference_model(plan["model"]).to(tc.device)


def load_state(tc: Torch, model, state: dict) -> None:
    sd = {k: (v if hasattr(v, "dim") else tc.torch.from_numpy(v)) for k, v in state.items()}
    model.load_state_dict(sd, strict=True)


def state_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def update_ema(torch, ema_model, model, decay=EMA_DECAY):
    """train.py's update_ema: every named parameter, pos_embed included."""
    with torch.no_grad():
        ema_params = OrderedDict(ema_model.named_parameters())
        for name, param in model.named_parameters():
            ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


class GivenSample:
    """`transport.sample` replaced on the instance: the given (t, x0) with the batch's x1."""

    def __init__(self, transport):
        self.transport = transport

    def set(self, t, x0) -> None:
        self.transport.sample = lambda x1, sp_timesteps=None, shifted_mu=0: (t, x0, x1)

    def clear(self) -> None:
        self.transport.__dict__.pop("sample", None)


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
def train(args) -> dict:
    tc = Torch(args)
    torch = tc.torch
    work = common.Work.at(args.work)
    plan = common.read_plan(work)
    data = common.Data(work, plan)
    settings = reference_settings(args.ref_dir)
    steps = args.steps if args.steps > 0 else data.num_steps
    if steps > data.num_steps:
        raise SystemExit(f"--steps={steps}: the batch list has {data.num_steps} steps")
    inject = min(args.inject_steps if args.inject_steps >= 0 else data.inject_steps, steps)
    if inject > data.inject_steps:
        raise SystemExit(f"--inject_steps={inject}: the plan injects {data.inject_steps}")
    ckpt_steps = [s for s in common.int_list(args.ckpt_steps) if s <= steps]
    started = time.perf_counter()

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # noqa: NPY002 (scipy.stats.norm.rvs, its t sampler, draws here)
    model = build_model(tc, plan)
    ema = copy.deepcopy(model)
    init = torch.load(plan["init"]["pt"], map_location="cpu")
    load_state(tc, model, init["model"])
    load_state(tc, ema, init["ema"])
    for p in ema.parameters():
        p.requires_grad = False
    model.train()
    ema.eval()
    opt_cfg = settings["optimizer"]
    opt = torch.optim.AdamW(
        model.parameters(), lr=opt_cfg["lr"], weight_decay=0, betas=(0.9, opt_cfg["beta2"])
    )
    transport = make_transport(settings)
    given = GivenSample(transport)
    forward = tc.call(model)
    mean, std, mult = tc.stats(work, plan)
    null = int(plan["null_label"])
    dropout = model.y_embedder.dropout_prob
    trainable = [p for p in model.parameters() if p.requires_grad]

    meta = dict(
        side=SIDE,
        run=args.run,
        preset=plan["preset"],
        batch=plan["batch"],
        steps=steps,
        inject_steps=inject,
        seed=args.seed,
        dtype=tc.dtype,
        tf32=bool(torch.backends.cuda.matmul.allow_tf32),
        torch_compile=tc.compile,
        device=tc.name(),
        torch=torch.__version__,
        optimizer=opt_cfg,
        transport=settings["transport"],
        init=plan["init"]["pt"],
    )
    writer = common.LogWriter(work.log(args.run), meta)
    if 0 in ckpt_steps:
        common.save_weights(
            work.checkpoint(args.run, 0), model=state_numpy(model), ema=state_numpy(ema)
        )
    setup_s = time.perf_counter() - started
    t0 = time.perf_counter()
    for s in range(steps):
        z, y = data.batch(s)
        x = (tc.nchw(z) - mean) / std * mult
        labels = torch.from_numpy(y).long().to(tc.device)
        inj = data.injected(s) if s < inject else None
        if inj is not None:
            drop = torch.from_numpy(inj["drop"]).to(tc.device)
            labels = torch.where(drop, null, labels)
            model.y_embedder.dropout_prob = 0.0
            given.set(torch.from_numpy(inj["t"]).to(tc.device), tc.nchw(inj["noise"]))
        elif s == inject:
            model.y_embedder.dropout_prob = dropout
            given.clear()
        loss_dict = transport.training_losses(forward, x, dict(y=labels))
        mse = loss_dict["loss"].mean()
        cos = loss_dict["cos_loss"].mean()
        loss = cos + mse
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in trainable if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
        if "max_grad_norm" in opt_cfg:
            torch.nn.utils.clip_grad_norm_(trainable, opt_cfg["max_grad_norm"])
        opt.step()
        update_ema(torch, ema, model)
        with torch.no_grad():
            param_norm = torch.nn.utils.get_total_norm(trainable)
        values = torch.stack([loss, mse, cos, grad_norm, param_norm]).detach().float().tolist()
        if not np.isfinite(values[0]):
            raise FloatingPointError(f"{args.run}: loss {values[0]} at step {s}")
        writer.write(
            s, dict(zip(common.LOG_KEYS, values)), time.perf_counter() - t0, inj is not None
        )
        if s + 1 in ckpt_steps:
            common.save_weights(
                work.checkpoint(args.run, s + 1), model=state_numpy(model), ema=state_numpy(ema)
            )
    tc.sync()
    _, log, _ = common.read_log(work.log(args.run))
    end = dict(
        setup_s=round(setup_s, 1),
        train_s=round(time.perf_counter() - t0, 1),
        img_per_s=common.throughput(log, plan["batch"]),
        checkpoints=ckpt_steps,
    )
    writer.finish(end)
    print(dict(run=args.run, **end), flush=True)
    return end


# ---------------------------------------------------------------------------------------------
# eval, sample
# ---------------------------------------------------------------------------------------------
def evaluate(args) -> list[dict]:
    tc = Torch(args)
    torch = tc.torch
    work = common.Work.at(args.work)
    plan = common.read_plan(work)
    transport = make_transport(reference_settings(args.ref_dir))
    given = GivenSample(transport)
    model = build_model(tc, plan).eval()
    forward = tc.call(model)
    val = common.read_val(work)
    mean, std, mult = tc.stats(work, plan)
    x1_all = (tc.nchw(val["latents"]) - mean) / std * mult
    y_all = torch.from_numpy(val["labels"]).long().to(tc.device)
    runs = set(args.runs.split(",")) if args.runs else None
    groups = args.eval_weights.split(",")
    n = len(val["labels"])
    results = []
    started = time.perf_counter()
    for run, step, path in work.checkpoints():
        if runs is not None and run not in runs:
            continue
        for group in groups:
            load_state(tc, model, common.load_weights(path, group))
            per_t = []
            for k, t in enumerate(val["t"]):
                sums = dict(mse=0.0, cos=0.0)
                for lo in range(0, n, args.eval_batch):
                    hi = min(lo + args.eval_batch, n)
                    tt = torch.full((hi - lo,), float(t), dtype=torch.float32, device=tc.device)
                    given.set(tt, tc.nchw(val["noise"][k, lo:hi]))
                    with torch.no_grad():
                        ld = transport.training_losses(forward, x1_all[lo:hi], dict(y=y_all[lo:hi]))
                    sums["mse"] += float(ld["loss"].sum())
                    sums["cos"] += float(ld["cos_loss"].sum())
                per_t.append({key: v / n for key, v in sums.items()})
            given.clear()
            row = dict(
                evaluator=SIDE,
                run=run,
                step=step,
                weights=group,
                mse=float(np.mean([p["mse"] for p in per_t])),
                cos=float(np.mean([p["cos"] for p in per_t])),
                per_t=per_t,
            )
            row["loss"] = row["mse"] + row["cos"]
            results.append(row)
            print(f"eval {run} step {step} {group}: {row['loss']:.5f}", flush=True)
    meta = dict(
        evaluator=SIDE,
        dtype=tc.dtype,
        t=[float(t) for t in val["t"]],
        num_val=n,
        device=tc.name(),
        seconds=round(time.perf_counter() - started, 1),
    )
    common.write_json(work.eval / f"by_{SIDE}.json", dict(meta=meta, results=results))
    return results


def sample(args) -> None:
    tc = Torch(args)
    torch = tc.torch
    from transport import Sampler

    work = common.Work.at(args.work)
    plan = common.read_plan(work)
    transport = make_transport(reference_settings(args.ref_dir))
    sample_fn = Sampler(transport).sample_ode(
        sampling_method="euler",
        num_steps=args.num_steps,
        atol=1e-6,
        rtol=1e-3,
        reverse=False,
        timestep_shift=args.timestep_shift,
    )
    noise, labels = common.read_sample_inputs(work)
    null = int(plan["null_label"])
    model = build_model(tc, plan).eval()
    for run in filter(None, args.sample_runs.split(",")):
        found = [(s, p) for r, s, p in work.checkpoints() if r == run]
        if not found:
            raise FileNotFoundError(f"no checkpoint of run {run!r} under {work.ckpt}")
        step, path = found[-1]
        load_state(tc, model, common.load_weights(path, args.sample_weights))
        started = time.perf_counter()
        z = tc.nchw(noise)
        y = torch.from_numpy(labels).long().to(tc.device)
        with torch.no_grad():
            if args.cfg_scale > 1.0:  # inference.py: doubled batch, the null label, the interval
                z = torch.cat([z, z], 0)
                y = torch.cat([y, torch.full_like(y, null)], 0)
                kwargs = dict(
                    y=y,
                    cfg_scale=args.cfg_scale,
                    cfg_interval=True,
                    cfg_interval_start=args.cfg_interval_start,
                )
                out = sample_fn(z, tc.call(model.forward_with_cfg), **kwargs)[-1]
                out, _ = out.chunk(2, dim=0)
            else:
                out = sample_fn(z, tc.call(model.forward), y=y)[-1]
        x = out.float().permute(0, 2, 3, 1).cpu().numpy()
        dest = work.sample_file(run, SIDE)
        dest.parent.mkdir(parents=True, exist_ok=True)
        np.save(dest, x)
        common.write_json(
            dest.with_suffix(".json"),
            dict(
                run=run,
                step=step,
                weights=args.sample_weights,
                sampler=SIDE,
                dtype=tc.dtype,
                guidance=dict(
                    num_steps=args.num_steps,
                    method="euler",
                    timestep_shift=args.timestep_shift,
                    cfg_scale=args.cfg_scale,
                    cfg_interval_start=args.cfg_interval_start,
                    cfg_channels="first3",
                ),
                seconds=round(time.perf_counter() - started, 1),
            ),
        )
        print(f"sampled {run} step {step} -> {dest}", flush=True)


def post(args) -> None:
    sample(args)
    evaluate(args)


# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    base = argparse.ArgumentParser(add_help=False)
    base.add_argument("--work", required=True)
    base.add_argument("--ref_dir", default=str(DEFAULT_REF), help="a hustvl/LightningDiT clone")
    base.add_argument("--device", default="auto", choices=("auto", "cpu"))
    base.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    base.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    base.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")

    t = sub.add_parser("train", parents=[base])
    t.add_argument("--run", default="ref_s0")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=0, help="0: the whole batch list")
    t.add_argument("--inject_steps", type=int, default=-1, help="-1: the plan's K")
    t.add_argument("--ckpt_steps", default="0,1000,2000,3000")

    ev = argparse.ArgumentParser(add_help=False)
    ev.add_argument("--runs", default="", help="runs to evaluate (default: every run)")
    ev.add_argument("--eval_weights", default="model,ema")
    ev.add_argument("--eval_batch", type=int, default=250)
    sm = argparse.ArgumentParser(add_help=False)
    sm.add_argument("--sample_runs", default="ref_s0,ours")
    sm.add_argument("--sample_weights", default="model", choices=("model", "ema"))
    sm.add_argument("--num_steps", type=int, default=250)
    sm.add_argument("--timestep_shift", type=float, default=0.3)
    sm.add_argument("--cfg_scale", type=float, default=10.0)
    sm.add_argument("--cfg_interval_start", type=float, default=0.11)
    sub.add_parser("eval", parents=[base, ev])
    sub.add_parser("sample", parents=[base, sm])
    sub.add_parser("post", parents=[base, ev, sm])
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    {"train": train, "eval": evaluate, "sample": sample, "post": post}[args.command](args)


if __name__ == "__main__":
    main()
