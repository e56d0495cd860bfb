"""The reference side of the VA-VAE training-parity runs (issue 18): hustvl/LightningDiT's own
`AutoencoderKL` (vavae/ldm/models/autoencoder.py) with its own `LPIPSWithDiscriminator`, its own
`training_step` (manual optimisation, two Adam optimizers) and its own optimizers, driven by a
pytorch_lightning Trainer as its main.py does, over the shared batch list.

  python3 launch/parity/vavae_reference.py --ref_dir=.ref/LightningDiT --phase=exact \\
      --batches=.data/imagenette-parity/batches.json --cache=W/cache --init=W/init.pt \\
      --teacher=W/teacher --vgg=W/vgg16_random.pth --lpips_heads=W/lpips_heads_random.pth \\
      --steps=300 --disc_start=200 --out=W/ref_exact.jsonl

The model is the reference's `vavae/configs/f16d32_vfdinov2.yaml` (`--model=tiny` shrinks the
autoencoder to vavae_jax's `tiny` preset for CPU smoke runs), lr 1e-4 as its main.py sets it,
disc_start from `--disc_start` (Lightning global steps: 2 per iteration, so 200 = iteration 100).
The reference is not part of this project: `--ref_dir` is a checkout of
github.com/hustvl/LightningDiT. Its `vavae/ldm` package (whose modules import each other as
`ldm.*`) is imported with importlib under the name `ldm`, without touching sys.path; `taming` is
the installed taming-transformers(-rom1504) package, which the reference imports.

Phases:
  exact  float32 with TF32 off (cuBLAS and cuDNN), LPIPS in eval mode (no dropout), and the
         posterior noise of our step (`--noise_seed`) instead of torch.randn (stub 4).
         `--float64` runs it in float64 (Lightning "64-true"): the round-off control that
         shows how far float32 itself lets two correct implementations drift apart.
  free   as it ships: `precision: 32` with torch's default TF32 settings (convolutions may use
         TF32), LPIPS dropout on (its main.py's ImageLogger puts the `.eval()`ed LPIPS back in
         training mode at the first image log), torch's own noise, `--seed` for everything.
         `--shared_noise` and `--lpips_dropout=off` take the random draws out of it (the free
         phase's precision, the exact phase's draws): is a free-phase difference the draws'?

No weight can be downloaded, so the loaders are stubbed; each stub loads the harness's RANDOM
weights, the same files our side loads (`vavae_make_init.py make` writes them):
  1. taming LPIPS: `torchvision.models.vgg16(pretrained=True)` inside taming's `vgg16` ->
     torchvision's vgg16 with the features of `--vgg` (random).
  2. taming `LPIPS.load_from_pretrained` (downloads vgg.pth) -> the heads of `--lpips_heads`
     (random, non-negative).
  3. `foundation_models.create_foundation_model("dinov2")` (timm hf-hub download) -> timm's
     `vit_large_patch14_dinov2(pretrained=False, dynamic_img_size=True)` of the shape of the
     transformers folder `--teacher` (random), its weights renamed to timm's names; width from
     the folder instead of the hard-coded 1024 (equal for dinov2-large).
  4. exact phase or `--shared_noise`: `DiagonalGaussianDistribution.sample` uses our step's eps
     (`vavae_common.posterior_eps`) instead of `torch.randn`.
  5. images not 256 px (tiny CPU runs) only: `aux_foundation_model.forward_dinov2` resizes to
     `--teacher_resolution` instead of 224 and reshapes to the token grid instead of h // 16.
  6. `--float64` only: `AutoencoderKL.get_input` returns float64 (it ends in `.float()`).
Per step it writes the loss module's own log values (captured from its forward), the gradient
norms of both optimizers' parameters and the generator's parameter norm, in vavae_common's
format; at `--eval_steps` it saves the reconstructions (posterior mode) of the val cache.
`--deadline` (unix time) stops the run early (Lightning's should_stop), evaluating that step too.

Resume across device commands (the reference steps at 1.7 steps/s at batch 8: 1000 steps do not
fit one 10-minute command): `--save_state=F` writes, when the run ends or stops, the trainable
weights (the state dict without the frozen teacher and LPIPS), both Adam states, the iteration
and torch's RNG states; a later run with `--resume_state=F` (same other flags) loads them, sets
Lightning's optimizer-step count (the reference's `global_step`, which gates the GAN) to two per
iteration done, continues the batch list and the noise at that iteration and appends to `--out`.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import pathlib
import sys
import time
import types
import warnings

import numpy as np
import vavae_common as common

# vavae_jax.model.PRESETS["tiny"] in the reference's ddconfig names.
TINY = dict(
    ddconfig=dict(
        ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], z_channels=8,
        resolution=32,
    ),
    embed_dim=8,
)  # fmt: skip


def import_reference(ref_dir) -> None:
    """Registers <ref_dir>/vavae/ldm as the package `ldm` (a namespace package there)."""
    root = pathlib.Path(ref_dir).resolve() / "vavae"
    spec = importlib.machinery.PathFinder.find_spec("ldm", [str(root)])
    if spec is None or not (root / "ldm" / "models" / "autoencoder.py").is_file():
        raise SystemExit(f"--ref_dir={ref_dir}: no vavae/ldm/models/autoencoder.py there")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ldm"] = module
    if spec.loader is not None:
        spec.loader.exec_module(module)


def timm_state_dict(sd: dict) -> dict:
    """transformers Dinov2Model names (checkpoint or 5.x module names) -> timm
    `vit_*_patch14_dinov2` names (fused qkv, `ls1.gamma`); the mask token is dropped (timm has
    none). Harness-local: the inverse of vavae_jax.foundation's timm mapping."""
    legacy = {
        ".attention.attention.query.": ".attention.q_proj.",
        ".attention.attention.key.": ".attention.k_proj.",
        ".attention.attention.value.": ".attention.v_proj.",
        ".attention.output.dense.": ".attention.o_proj.",
    }
    src = {}
    for k, v in sd.items():
        for old, new in legacy.items():
            k = k.replace(old, new)
        src[k] = v
    out = {
        "cls_token": src.pop("embeddings.cls_token"),
        "pos_embed": src.pop("embeddings.position_embeddings"),
        "patch_embed.proj.weight": src.pop("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": src.pop("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": src.pop("layernorm.weight"),
        "norm.bias": src.pop("layernorm.bias"),
    }
    src.pop("embeddings.mask_token", None)
    layers = sorted({int(k.split(".")[2]) for k in src if k.startswith("encoder.layer.")})
    import torch

    for i in layers:
        t, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for leaf in ("weight", "bias"):
            qkv = [src.pop(f"{t}attention.{n}_proj.{leaf}") for n in "qkv"]
            out[f"{b}attn.qkv.{leaf}"] = torch.cat(qkv, 0)
            out[f"{b}attn.proj.{leaf}"] = src.pop(f"{t}attention.o_proj.{leaf}")
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{b}{n}.{leaf}"] = src.pop(f"{t}{n}.{leaf}")
        out[f"{b}ls1.gamma"] = src.pop(f"{t}layer_scale1.lambda1")
        out[f"{b}ls2.gamma"] = src.pop(f"{t}layer_scale2.lambda1")
    if src:
        raise ValueError(f"teacher: unmapped transformers keys {sorted(src)[:10]}")
    return out


def load_teacher(folder):
    """The timm DINOv2 of the transformers folder `folder`, frozen (as get_dinov2_encoder)."""
    import timm
    from safetensors.torch import load_file

    cfg = json.loads((pathlib.Path(folder) / "config.json").read_text())
    model = timm.create_model(
        "vit_large_patch14_dinov2",
        pretrained=False,
        dynamic_img_size=True,
        num_classes=0,
        embed_dim=cfg["hidden_size"],
        depth=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        img_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        mlp_ratio=cfg["mlp_ratio"],
    )
    model.load_state_dict(timm_state_dict(load_file(pathlib.Path(folder) / "model.safetensors")))
    model.requires_grad_(False)
    return model, int(cfg["hidden_size"])


def install_stubs(args) -> None:
    """Stubs 1-5 of the module docstring (call after import_reference)."""
    import torch
    import torchvision
    from ldm.models import foundation_models as fm
    from ldm.modules.distributions import distributions
    from taming.modules.losses import lpips as taming_lpips

    def vgg16_from_file(pretrained=True, **_):  # stub 1
        model = torchvision.models.vgg16(weights=None)
        missing, unexpected = model.load_state_dict(torch.load(args.vgg), strict=False)
        if unexpected or any(not k.startswith("classifier.") for k in missing):
            raise ValueError(f"{args.vgg}: missing {missing}, unexpected {unexpected}")
        return model

    taming_lpips.models = types.SimpleNamespace(vgg16=vgg16_from_file)

    def load_heads(self, name="vgg_lpips"):  # stub 2
        heads = torch.load(args.lpips_heads)
        missing, unexpected = self.load_state_dict(heads, strict=False)
        if unexpected or any(k.startswith("lin") for k in missing):
            raise ValueError(f"{args.lpips_heads}: missing {missing}, unexpected {unexpected}")

    taming_lpips.LPIPS.load_from_pretrained = load_heads
    fm.create_foundation_model = lambda type: load_teacher(args.teacher)  # stub 3

    if our_noise(args):  # stub 4

        def sample(self):
            shape = tuple(self.mean.shape)  # [B, C, h, w]
            nhwc = (shape[0], shape[2], shape[3], shape[1])
            eps = common.posterior_eps(args.noise_seed, NOISE_STEP[0], nhwc).transpose(0, 3, 1, 2)
            return self.mean + self.std * torch.from_numpy(np.ascontiguousarray(eps)).to(
                self.mean.device
            )

        distributions.DiagonalGaussianDistribution.sample = sample

    if args.image_size != 256:  # stub 5
        res = args.teacher_resolution

        def forward_dinov2(self, x):
            b = x.shape[0]
            x = torch.nn.functional.interpolate(
                x, size=(res, res), mode="bilinear", align_corners=False
            )
            tokens = self.model.forward_features(x)[:, 1:]
            g = int(round(tokens.shape[1] ** 0.5))
            return tokens.reshape(b, g, g, -1).permute(0, 3, 1, 2)

        fm.aux_foundation_model.forward_dinov2 = forward_dinov2


NOISE_STEP = [0]  # the iteration whose eps stub 4 draws (set by the recorder)


def our_noise(args) -> bool:
    """Whether the posterior noise is our step's (stub 4): the exact phase, or --shared_noise."""
    return args.phase == "exact" or args.shared_noise


def lpips_dropout(args) -> bool:
    """The LPIPS heads' dropout: the phase's (free: on, as shipped; exact: off) unless set."""
    return args.phase == "free" if args.lpips_dropout == "phase" else args.lpips_dropout == "on"


def model_config(ref_dir, model: str, disc_start: int) -> dict:
    """The reference yaml's `model` section, with disc_start (and the tiny shape) replaced."""
    import yaml

    path = pathlib.Path(ref_dir) / "vavae" / "configs" / "f16d32_vfdinov2.yaml"
    cfg = yaml.safe_load(path.read_text())["model"]
    cfg["params"].pop("monitor", None)
    cfg["params"]["lossconfig"]["params"]["disc_start"] = disc_start
    if model == "tiny":
        cfg["params"]["ddconfig"].update(TINY["ddconfig"])
        cfg["params"]["embed_dim"] = TINY["embed_dim"]
    elif model != "f16d32":
        raise ValueError(f"--model={model!r}: expected f16d32 or tiny")
    return cfg


def build_model(args, seed: int):
    """The reference AutoencoderKL as its main.py makes it: seed_everything, then
    instantiate_from_config; learning_rate = base_learning_rate."""
    import pytorch_lightning as pl
    from ldm.util import instantiate_from_config

    cfg = model_config(args.ref_dir, args.model, args.disc_start)
    pl.seed_everything(seed, verbose=False)
    model = instantiate_from_config(cfg)
    model.learning_rate = cfg["base_learning_rate"]
    return model


# State-dict groups the harness shares as their own files (teacher, LPIPS), not in init.pt.
FROZEN_PREFIXES = ("foundation_model.", "loss.perceptual_loss.")


def load_init(model, path) -> None:
    """init.pt (a path) or an already loaded {"state_dict": ...} into `model`."""
    import torch

    obj = path if isinstance(path, dict) else torch.load(path, map_location="cpu")
    sd = obj["state_dict"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad = [k for k in missing if not k.startswith(FROZEN_PREFIXES)]
    if bad or unexpected:
        raise ValueError(f"{path}: missing {bad[:10]}, unexpected {unexpected[:10]}")


def reconstruct(model, val: np.ndarray, batch: int = 25) -> np.ndarray:
    """decode(encode(x).mode()) of the val cache, float16 NHWC in the model's precision."""
    import torch

    out = np.empty(val.shape, np.float16)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(val), batch):
            x = torch.from_numpy(common.to_float(val[i : i + batch])).permute(0, 3, 1, 2)
            rec = model.decode(model.encode(x.to(model.device)).mode())
            out[i : i + batch] = rec.permute(0, 2, 3, 1).float().cpu().numpy()
    model.train(was_training)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref_dir", required=True, help="a checkout of hustvl/LightningDiT")
    p.add_argument("--phase", choices=("exact", "free"), required=True)
    p.add_argument("--batches", required=True)
    p.add_argument("--cache", required=True, help="the image caches of vavae_make_init.py make")
    p.add_argument("--init", default="", help="init.pt (the common init); empty: --seed's init")
    p.add_argument("--teacher", required=True, help="transformers DINOv2 folder (random)")
    p.add_argument("--vgg", required=True, help="random torchvision VGG16 features .pth")
    p.add_argument("--lpips_heads", required=True, help="random LPIPS heads .pth")
    p.add_argument("--model", default="f16d32", help="f16d32 (the yaml) or tiny")
    p.add_argument("--teacher_resolution", type=int, default=224)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--disc_start", type=int, default=200, help="Lightning global steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise_seed", type=int, default=0, help="our step's noise (exact phase)")
    p.add_argument(
        "--shared_noise", action="store_true",
        help="free phase: our step's posterior noise (stub 4) instead of torch's",
    )  # fmt: skip
    p.add_argument(
        "--lpips_dropout", choices=("phase", "on", "off"), default="phase",
        help="LPIPS dropout: the phase's (exact off, free on) or set",
    )  # fmt: skip
    p.add_argument("--eval_steps", default="", help="e.g. 0,250,500,1000")
    p.add_argument("--recon_dir", default="")
    p.add_argument("--tag", default="ref")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--float64", action="store_true", help="exact phase: a float64 control")
    p.add_argument("--deadline", type=float, default=0, help="unix time: stop stepping then")
    p.add_argument("--save_final", default="", help="the final weights, init.pt's format")
    p.add_argument("--save_state", default="", help="resumable state written at the end")
    p.add_argument("--resume_state", default="", help="continue from a --save_state file")
    p.add_argument("--out", required=True, help="per-step log (.jsonl)")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # jax only draws the shared noise (CPU)
    for message in (".*no logger configured.*", ".*does not have many workers.*"):
        warnings.filterwarnings("ignore", message)  # Lightning's, once per logged name
    import torch

    torch.set_num_threads(args.threads)
    if args.float64 and args.phase != "exact":
        raise SystemExit("--float64 is a control of the exact phase")
    if args.phase == "exact":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    batches = common.read_batches(args.batches)
    train_u8 = common.load_cache(args.cache, "train")
    args.image_size = int(train_u8.shape[1])
    import_reference(args.ref_dir)
    install_stubs(args)
    import pytorch_lightning as pl

    model = build_model(args, args.seed)
    resume = None
    if args.resume_state:
        resume = torch.load(args.resume_state, map_location="cpu", weights_only=False)
        load_init(model, {"state_dict": resume["state_dict"]})
    elif args.init:
        load_init(model, args.init)
    if args.float64:  # stub 6: get_input ends in .float(); the control needs float64 inputs
        get_input = model.get_input
        model.get_input = lambda batch, k: get_input(batch, k).double()
    train(args, pl, torch, model, batches, train_u8, resume)


def train(args, pl, torch, model, batches, train_u8, resume=None) -> None:
    start = int(resume["step"]) if resume else 0  # iterations already done
    if start >= args.steps:
        raise SystemExit(f"{args.resume_state} is at step {start}: nothing left of --steps")
    eval_steps = {int(s) for s in args.eval_steps.split(",") if s}
    val = common.load_cache(args.cache, "val") if eval_steps else None
    captured: dict = {}
    loss_forward = model.loss.forward

    def recording_forward(*a, **kw):  # the loss module's own log values, per optimizer_idx
        loss, log = loss_forward(*a, **kw)
        captured.update({k.split("/", 1)[1]: v.detach() for k, v in log.items()})
        return loss, log

    model.loss.forward = recording_forward
    meta = dict(
        side="reference", phase=args.phase, seed=args.seed, init=args.init, steps=args.steps,
        disc_start=args.disc_start, torch=torch.__version__, device=_device_name(torch),
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        tf32_cudnn=torch.backends.cudnn.allow_tf32, lpips_dropout=lpips_dropout(args),
        dtype="float64" if args.float64 else "float32",
        noise=f"ours, seed {args.noise_seed}" if our_noise(args) else "torch",
    )  # fmt: skip
    if resume:
        meta["resumed_at"] = start
    writer = common.LogWriter(args.out, meta, append=bool(resume))
    recon_dir = pathlib.Path(args.recon_dir) if args.recon_dir else None

    def save_recon(step: int, module) -> None:
        if step in eval_steps and recon_dir is not None:
            recon_dir.mkdir(parents=True, exist_ok=True)
            np.save(recon_dir / f"{args.tag}_step{step:05d}.npy", reconstruct(module, val))

    class Recorder(pl.Callback):
        def on_train_start(self, trainer, module):
            self.start = time.perf_counter()
            if resume:  # the optimizers exist now (configure_optimizers ran)
                for opt, state in zip(trainer.optimizers, resume["optimizers"], strict=True):
                    opt.load_state_dict(state)
                progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
                progress.total.ready = progress.total.completed = 2 * start
                if trainer.global_step != 2 * start:
                    raise RuntimeError(f"global_step {trainer.global_step}, expected {2 * start}")
                torch.set_rng_state(resume["rng_cpu"])
                if resume["rng_cuda"] is not None and torch.cuda.is_available():
                    torch.cuda.set_rng_state(resume["rng_cuda"])
            else:
                save_recon(0, module)

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            NOISE_STEP[0] = start + batch_idx
            module.loss.perceptual_loss.train(lpips_dropout(args))  # dropout: see docstring
            captured.clear()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            opt_g, opt_d = trainer.optimizers
            norms = {
                "grad_norm_g": _norm([q.grad for q in _params(opt_g) if q.grad is not None]),
                "grad_norm_d": _norm([q.grad for q in _params(opt_d) if q.grad is not None]),
                "param_norm_g": _norm(list(_params(opt_g))),
            }
            names = list(captured) + list(norms)
            values = [
                float(v.detach().double().cpu()) for v in [*captured.values(), *norms.values()]
            ]
            step = start + batch_idx
            writer.write(step, dict(zip(names, values)), time.perf_counter() - self.start)
            late = bool(args.deadline) and time.time() > args.deadline
            if late and step + 1 < args.steps:  # the last state is evaluated too
                eval_steps.add(step + 1)
                trainer.should_stop = True
            save_recon(step + 1, module)

    class Steps(torch.utils.data.Dataset):  # the batch list from iteration `start` on
        def __len__(self):
            return args.steps - start

        def __getitem__(self, i):
            return {"image": torch.from_numpy(common.batch_at(train_u8, batches, start + i))}

    trainer = pl.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=1,
        precision="64-true" if args.float64 else 32,  # 32: the yaml's trainer.precision
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Recorder()],
    )
    loader = torch.utils.data.DataLoader(Steps(), batch_size=None, shuffle=False)
    trainer.fit(model, train_dataloaders=loader)
    writer.close()
    if args.save_final:  # init.pt's format: launch/convert.py vavae converts it
        sd = model.state_dict()
        sd = {k: v for k, v in sd.items() if not k.startswith(FROZEN_PREFIXES)}
        torch.save({"state_dict": sd}, args.save_final)
    steps_done = trainer.global_step // 2  # two optimizer steps per iteration
    if args.save_state:
        sd = {k: v for k, v in model.state_dict().items() if not k.startswith(FROZEN_PREFIXES)}
        torch.save(
            dict(
                state_dict=sd,
                optimizers=[opt.state_dict() for opt in trainer.optimizers],
                step=steps_done,
                rng_cpu=torch.get_rng_state(),
                rng_cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            ),
            args.save_state,
        )
    print(json.dumps(dict(meta, steps_done=steps_done, log=str(args.out))))


def _params(opt):
    for group in opt.param_groups:
        yield from group["params"]


def _norm(tensors):
    import torch

    return torch.linalg.vector_norm(torch.stack([t.detach().double().norm() for t in tensors]))


def _device_name(torch) -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
