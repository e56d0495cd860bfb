"""LightningDiT on VA-VAE f16d32 latents: the reference's configs/lightningdit_xl_vavae_f16d32.yaml.

Launch (latents first: launch/extract_latents.py writes data_dir):
  python launch/train.py --config=configs/lightningdit_xl_vavae_f16d32.py \
      --workdir=runs/lightningdit_xl --config.data.data_dir=/data/imagenet_latents \
      --config.tokenizer.path=runs/vavae_export
Variants (comma-separated after a colon; `small` may be combined with any):
  configs/lightningdit_xl_vavae_f16d32.py          XL/1, 80k steps at batch 1024 (64 epochs)
  configs/lightningdit_xl_vavae_f16d32.py:B/1      any preset of lightningdit_jax.model.PRESETS
  configs/lightningdit_xl_vavae_f16d32.py:800ep    the 800-epoch run (1M steps; sample cfg 6.7)
  configs/lightningdit_xl_vavae_f16d32.py:small    CPU size: the `tiny/2` preset on the latents of
                                                   configs/vavae_f16d32.py:small (16x16x32, 1000
                                                   classes), batch 16, few steps
  configs/lightningdit_xl_vavae_f16d32.py:B/2,small  an explicit preset is kept: `small` then
                                                   shrinks only the schedule (batch, steps, logging)
Every field can be overridden with --config.a.b=value; mistyped names fail (lock_config=True).
Memory per device of the real step on a target, from shapes only (no data, no accelerator):
  python launch/compile_check.py --config=configs/lightningdit_xl_vavae_f16d32.py \
      --topology=tpu:v5e-64 --config.mesh.fsdp=8
The latents are the preset's [input_size, input_size, in_channels]: 16x16x32 for XL/1.
"""

from __future__ import annotations

import ml_collections


def _parse(arg: str | None) -> tuple[str | None, dict[str, bool]]:
    """(the preset named in `arg`, None when none is; the flags)."""
    from lightningdit_jax.model import PRESETS

    flags = {"800ep": False, "small": False}
    model = None
    for part in filter(None, (arg or "").split(",")):
        if part in flags:
            flags[part] = True
        elif part in PRESETS:
            if model is not None:
                raise ValueError(f"two model presets in {arg!r}: {model!r} and {part!r}")
            model = part
        else:
            raise ValueError(
                f"unknown variant {part!r} in {arg!r}; expected a model of {sorted(PRESETS)} "
                f"and/or any of {sorted(flags)}"
            )
    return model, flags


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    model, v = _parse(arg)
    c = ml_collections.ConfigDict()
    c.trainer = "lightningdit"
    c.variant = arg or ""
    c.seed = 0  # reference train.global_seed

    # --- the model (reference model: section; the switches are the preset's) --------------------
    c.model = ml_collections.ConfigDict(
        dict(
            preset=model or "XL/1",  # reference model_type LightningDiT-XL/1
            class_dropout_prob=0.1,  # label dropout for classifier-free guidance
            # 128 images per GPU (batch 1024 on 8 GPUs) needs remat on an 80 GB GPU: 42.9 GiB per
            # GPU with dots_no_batch, 119.5 GiB without (scanned blocks; docs/bench/JOURNAL.md).
            remat_policy="dots_no_batch",
            scan_unroll=1,
            # False: the blocks in a Python loop (+14% XL/1 training on an H100, docs/bench/JOURNAL.md;
            # about twice the compile time); True: one scanned block (fastest compile).
            scan_layers=False,
            # "auto": cuDNN's flash kernel on GPU in bf16 (+31% on the XL/1 step), XLA elsewhere;
            # "cudnn"; "xla" (materialises the scores).
            attention_impl="auto",
            # "default": matmuls in the compute dtype; "fp8": the blocks' linear layers multiply
            # float8 operands (lightningdit_jax/fp8.py; GPUs with FP8 tensor cores: Ada, Hopper,
            # Blackwell; an error elsewhere); "fp8_emulated": the same rounding on any backend.
            precision="default",
            # How the fp8 products scale: "current" (from each tensor in the same call: no state)
            # or "delayed" (from the last fp8_amax_history steps' maxima, kept in the state).
            fp8_scaling="current",
            fp8_amax_history=16,
        )
    )
    c.dtype = "auto"  # compute dtype: bfloat16 on GPU/TPU, float32 on CPU; parameters float32

    # --- transport (reference transport: section) --------------------------------------------
    c.transport = ml_collections.ConfigDict(
        dict(
            path_type="Linear",
            prediction="velocity",
            use_cosine_loss=True,
            use_lognorm=True,
        )
    )

    # --- optimisation: AdamW(lr 2e-4, betas (0.9, 0.95), weight decay 0) ------------------------
    c.optim = ml_collections.ConfigDict(
        dict(lr=2.0e-4, b1=0.9, b2=0.95, eps=1.0e-8, weight_decay=0.0, grad_clip_norm=0.0)
    )
    c.ema = ml_collections.ConfigDict(dict(decay=0.9999))
    c.global_batch_size = 1024
    c.total_steps = 80_000  # 64 epochs of ImageNet at batch 1024
    if v["800ep"]:
        c.total_steps = 1_000_000  # ~800 epochs

    # --- data: latent shards of launch/extract_latents.py ----------------------------------------
    c.data = ml_collections.ConfigDict(
        dict(
            data_dir="",
            latent_norm=True,
            latent_multiplier=1.0,
            random_flip=True,
            worker_count=8,
            worker_buffer_size=2,
        )
    )
    # The tokenizer the latents came from; recorded in the checkpoint so that sampling decodes
    # with the same VA-VAE. path: our export folder, a vavae trainer workdir or an official .pt;
    # config: its architecture as data (the fields of vavae_jax.model.AutoencoderConfig), used
    # only when path names another tokenizer than the latents' index.json and is a .pt (folders
    # and index.json carry their own).
    c.tokenizer = ml_collections.ConfigDict(dict(path="", config=_tokenizer_architecture()))

    # --- sampling defaults (reference sample: section; used for grids and launch/sample.py;
    # read as one lightningdit_jax.sampling.Guidance) --------------------------------------------
    c.sample = ml_collections.ConfigDict(
        dict(
            num_steps=250,
            timestep_shift=0.3,
            cfg_scale=6.7 if v["800ep"] else 10.0,
            cfg_interval_start=0.125 if v["800ep"] else 0.11,
            cfg_channels="first3",
        )
    )

    # --- devices -------------------------------------------------------------------------------
    # num_devices: -1 uses every device (all hosts); N > 0 the first N (single-host debugging).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, num_devices=-1))
    c.sharding = "fsdp"  # "dp" replicates; "fsdp" splits the embed axis over mesh.fsdp

    # --- checkpoints and logging (reference log_every 100, ckpt_every 20000) ------------------
    c.checkpoint_every_steps = 20_000
    c.keep_checkpoints = 3
    c.log_every_steps = 100
    c.image_every_steps = 10_000
    c.num_grid_images = 8
    c.grid_sample_steps = 50  # fewer ODE steps for the in-training grid than for FID
    c.progress_bar = True  # shown where a terminal watches (stderr a TTY); log lines either way

    if v["small"]:
        _shrink(c, keep_preset=model is not None)
    return c


def _tokenizer_architecture() -> dict:
    """VA-VAE f16d32 (reference vavae/configs/f16d32_vfdinov2.yaml), without the compute dtype."""
    import dataclasses

    from vavae_jax.model import PRESETS

    fields = dataclasses.asdict(PRESETS["f16d32"])
    del fields["dtype"]
    return fields


def _shrink(c: ml_collections.ConfigDict, *, keep_preset: bool) -> None:
    """The same job at CPU size. Without an explicit preset the model is `tiny/2`, which fits
    the latents of configs/vavae_f16d32.py:small (16x16x32, 1000 classes); an explicit one
    (`:B/2,small`, `:tiny,small` for 8x8x8 latents) is never replaced: only the schedule,
    batch and logging shrink."""
    if not keep_preset:
        c.model.preset = "tiny/2"
    c.global_batch_size = 16
    c.total_steps = 200
    c.data.worker_count = 0
    c.checkpoint_every_steps = 100
    c.log_every_steps = 10
    c.image_every_steps = 100
    c.grid_sample_steps = 10
    c.num_grid_images = 4
