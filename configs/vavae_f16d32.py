"""VA-VAE f16d32 with the DINOv2 VF loss: the reference's `vavae/configs/f16d32_vfdinov2.yaml`.

Launch:
  python launch/train.py --config=configs/vavae_f16d32.py --workdir=runs/vavae_f16d32 \
      --config.data.source=tfds --config.data.manual_dir=/data/imagenet
Variants (comma-separated after a colon; `small` may be combined with any):
  configs/vavae_f16d32.py            VA-VAE, 50 epochs (the paper's f16d32 tokenizer)
  configs/vavae_f16d32.py:ldm        the plain LDM baseline (no VF loss)
  configs/vavae_f16d32.py:long       the released model's 3-stage schedule as one run
  configs/vavae_f16d32.py:small      shrinks model, teacher and batch: runs on a laptop CPU in
                                     minutes on ../shared/data/imagenet-sample-256
Every field can be overridden with --config.a.b=value; mistyped names fail (lock_config=True).
Memory per device of the real step on a target, from shapes only (no data, no weights, no
accelerator): python launch/compile_check.py --config=configs/vavae_f16d32.py --topology=cpu:8
"""

from __future__ import annotations

import ml_collections


def _parse(arg: str | None) -> dict[str, bool]:
    known = {"vf", "ldm", "long", "small"}
    flags = {k: False for k in known}
    for part in filter(None, (arg or "").split(",")):
        if part not in known:
            raise ValueError(
                f"unknown variant {part!r} in {arg!r}; expected any of {sorted(known)}"
            )
        flags[part] = True
    if flags["ldm"] and flags["long"]:
        raise ValueError("variants 'ldm' and 'long' exclude each other")
    return flags


def _stage(epochs, vf_weight, distmat_margin, cos_margin, disc_start, reset_optimizers):
    return ml_collections.ConfigDict(
        dict(
            epochs=epochs,
            vf_weight=vf_weight,
            distmat_margin=distmat_margin,
            cos_margin=cos_margin,
            disc_start=disc_start,
            reset_optimizers=reset_optimizers,
        )
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    v = _parse(arg)
    c = ml_collections.ConfigDict()
    c.trainer = "vavae"
    c.variant = arg or ""
    c.seed = 0

    # --- the autoencoder (reference ddconfig + embed_dim) -------------------------------------
    c.model = ml_collections.ConfigDict(
        dict(
            ch=128,
            ch_mult=(1, 1, 2, 2, 4),
            num_res_blocks=2,
            attn_resolutions=(16,),
            z_channels=32,
            embed_dim=32,
            resolution=256,
            in_channels=3,
            out_ch=3,
            double_z=True,
            dropout=0.0,
        )
    )
    # Compute dtype: "auto" = bfloat16 on GPU/TPU, float32 on CPU. Parameters are float32.
    c.dtype = "auto"

    # --- the frozen DINOv2 teacher (use_vf: dinov2, reverse_proj: true) -----------------------
    c.use_vf = not v["ldm"]
    c.teacher = ml_collections.ConfigDict(
        dict(
            # A hub id (downloaded once by transformers' cache) or a local transformers directory
            # (config.json + model.safetensors, or flax_model.msgpack).
            path="facebook/dinov2-large",
            preset="dinov2-large",
            # Only for smoke runs: a randomly initialised teacher of `preset` when no weights are
            # reachable. The run logs loudly that the VF loss then aligns with noise.
            allow_random=False,
            # Side of the square the images are resized to for the teacher (the reference: 224,
            # i.e. 16x16 patch tokens, the latent grid of an f16 VAE at 256 px).
            resolution=224,
        )
    )
    # --- LPIPS (VGG16 features + linear heads) --------------------------------------------------
    c.lpips = ml_collections.ConfigDict(
        dict(
            # Our converted LPIPS file (launch/convert.py lpips --vgg=... --heads=...), or "random"
            # for smoke runs only.
            path="",
            allow_random=False,
        )
    )

    # --- loss (reference LPIPSWithDiscriminator params) ---------------------------------------
    c.loss = ml_collections.ConfigDict(
        dict(
            # In Lightning global steps, which the reference advances twice per iteration (two
            # optimizers stepped by hand): 5001 turns the GAN term on at iteration 2501.
            disc_start=5001,
            kl_weight=1.0e-6,
            pixelloss_weight=1.0,
            perceptual_weight=1.0,
            disc_factor=1.0,
            disc_weight=0.5,
            disc_loss="hinge",
            disc_num_layers=3,
            disc_ndf=64,
            logvar_init=0.0,
            # The reference optimizer omits `loss.logvar`, so it stays at logvar_init; True learns it.
            train_logvar=False,
            # The reference's LPIPS heads run with dropout 0.5 during training (its image logger
            # switches the eval()-ed LPIPS back to train mode); False evaluates them without.
            lpips_dropout=True,
            vf_weight=0.1,
            adaptive_vf=True,
            distmat_margin=0.25,
            cos_margin=0.5,
            distmat_weight=1.0,
            cos_weight=1.0,
        )
    )
    if v["ldm"]:
        c.loss.vf_weight = 0.0
        c.loss.adaptive_vf = False

    # --- optimisation: Adam(0.5, 0.9) for both, lr 1e-4 not scaled (reference main.py) ---------
    c.optim = ml_collections.ConfigDict(
        dict(lr=1.0e-4, disc_lr=1.0e-4, b1=0.5, b2=0.9, eps=1.0e-8, grad_clip_norm=0.0)
    )
    c.ema = ml_collections.ConfigDict(dict(enabled=False, decay=0.9999))

    # --- schedule: 8 images per GPU x 32 GPUs, 50 epochs ---------------------------------------
    c.global_batch_size = 256
    c.num_epochs = 50
    c.total_steps = -1  # -1: num_epochs (or the stages) x dataset size // global_batch_size
    # Stages turn the released model's three hand-chained runs into one run. Each stage sets the
    # VF weight and margins and restarts disc_start and (like the reference's weight_init
    # restarts) the optimizers.
    c.stages = []
    if v["long"]:
        c.stages = [
            _stage(100, 0.5, 0.0, 0.0, 5001, True),
            _stage(15, 0.1, 0.0, 0.0, 1, True),
            _stage(15, 0.1, 0.25, 0.5, 1, True),
        ]

    # --- data --------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict(
        dict(
            source="tfds",  # "tfds" or "folder"
            root="",  # folder source: <root>/<class>/<file>
            tfds_name="imagenet2012",
            tfds_split="train",
            tfds_data_dir="",
            manual_dir="",  # where imagenet2012's ILSVRC2012_img_*.tar live
            resolution=256,
            random_flip=True,
            worker_count=8,
            worker_buffer_size=2,
            max_records=-1,  # >0: use only the first N records (debugging)
        )
    )

    # --- devices -------------------------------------------------------------------------------
    # num_devices: -1 uses every device (all hosts); N > 0 the first N (single-host debugging).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, num_devices=-1))
    c.sharding = "dp"  # the VAE is small: replicate it ("fsdp" shards the larger weights)

    # --- checkpoints and logging ---------------------------------------------------------------
    c.init_from = ""  # an official VA-VAE .pt or one of our checkpoints
    c.checkpoint_every_steps = 5000
    c.keep_checkpoints = 3
    c.log_every_steps = 50
    c.image_every_steps = 1000
    c.num_grid_images = 8
    c.progress_bar = True  # shown where a terminal watches (stderr a TTY); log lines either way

    if v["small"]:
        _shrink(c)
    return c


def _shrink(c: ml_collections.ConfigDict) -> None:
    """The same job at CPU size: an f4 tiny VAE at 64 px (16x16 latents, like f16 at 256),
    a 2-layer DINOv2-shaped teacher and LPIPS with random weights, on the bundled sample images.
    (XLA's CPU convolutions are slow: 64 px keeps a step at a few seconds on 2 cores.)
    The variants name losses and schedules, never an architecture, so `small` replaces no model
    the user chose; its latents (16x16x32) are what LightningDiT's `small` (`tiny/2`) expects."""
    c.model.update(
        dict(
            ch=32,
            ch_mult=(1, 2, 4),
            num_res_blocks=1,
            attn_resolutions=(16,),
            z_channels=32,
            embed_dim=32,
            resolution=64,
        )
    )
    c.teacher.update(dict(path="", preset="dinov2-tiny", allow_random=True))
    c.lpips.update(dict(path="random", allow_random=True))
    c.loss.disc_start = 61  # Lightning steps: the GAN joins at iteration 31
    c.global_batch_size = 8
    c.num_epochs = 1
    c.total_steps = 80
    c.data.update(
        dict(
            source="folder",
            root="../shared/data/imagenet-sample-256",
            resolution=64,
            worker_count=0,
        )
    )
    c.mesh.update(dict(data=-1, fsdp=1))
    c.checkpoint_every_steps = 40
    c.log_every_steps = 10
    c.image_every_steps = 40
