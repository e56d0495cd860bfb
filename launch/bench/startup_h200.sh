#!/usr/bin/env bash
# The start-up measurements of BENCHMARKS.md ("Start-up as users run it"), on one GPU.
#   bash launch/bench/startup_h200.sh <part> <out_dir> [<sample images root>]
# part a: the former GPU-compiled random init of the DINOv2-large teacher (probe, 200 s cap),
#         then the main job with random frozen networks (the issue's command, GAN on from step 1
#         so that the step is the benchmark's full step).
# part b: the main job with the teacher and LPIPS loaded from files (a transformers
#         save_pretrained folder and launch/convert.py's LPIPS file, both random-weight), then
#         the latents of its tokenizer by launch/extract_latents.py with default flags.
# part c: latents of a random small tokenizer (16x16x32, as XL/1 expects), the LightningDiT
#         XL/1 trainer at batch 64 on them, and launch/bench/benchmark.py's XL/1 b64 step.
set -euo pipefail
part=$1; out=$2; images=${3:-../shared/data/imagenet-sample-256}
bench="python3 launch/bench/startup.py --log_dir=$out"
vae="python3 launch/train.py --config=configs/vavae_f16d32.py --config.data.source=folder \
 --config.data.root=$images --config.global_batch_size=32 --config.progress_bar=False \
 --config.loss.disc_start=1 --config.total_steps=120 --config.log_every_steps=20"
if [ "$part" = a ]; then
  $bench --out="$out/startup_a.json" \
    --case "old_init_dinov2l=timeout 200 python3 launch/bench/startup.py --probe_old_init=dinov2-large" \
    --case "vavae_random=$vae --workdir=runs/su_vavae_random --config.teacher.path= \
 --config.teacher.allow_random=True --config.lpips.path=random --config.lpips.allow_random=True"
elif [ "$part" = b ]; then
  w=runs/su_weights; mkdir -p $w
  python3 - "$w" <<'PY'
import sys, torch, torchvision, transformers
w = sys.argv[1]
torch.manual_seed(0)
cfg = transformers.Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                mlp_ratio=4, patch_size=14, image_size=518)
transformers.Dinov2Model(cfg).save_pretrained(f"{w}/dinov2-large-random")
torch.save(torchvision.models.vgg16().state_dict(), f"{w}/vgg16-random.pth")
PY
  python3 launch/convert.py lpips --vgg=$w/vgg16-random.pth --out=$w/lpips-random.npz
  $bench --out="$out/startup_b.json" \
    --case "vavae_files=$vae --workdir=runs/su_vavae_files --config.teacher.path=$w/dinov2-large-random \
 --config.lpips.path=$w/lpips-random.npz" \
    --case "extract=python3 launch/extract_latents.py --tokenizer=runs/su_vavae_files --source=folder \
 --root=$images --out_dir=runs/su_latents"
elif [ "$part" = c ]; then
  $bench --out="$out/startup_c.json" \
    --case "extract_small=python3 launch/extract_latents.py --allow_random --source=folder \
 --root=$images --resolution=64 --out_dir=runs/su_latents_small" \
    --case "dit_xl=python3 launch/train.py --config=configs/lightningdit_xl_vavae_f16d32.py \
 --workdir=runs/su_dit --config.data.data_dir=runs/su_latents_small --config.global_batch_size=64 \
 --config.model.remat_policy=none --config.total_steps=300 --config.log_every_steps=50 \
 --config.progress_bar=False"
  python3 launch/bench/benchmark.py --iters=20 --only=dit_train --dit_train="XL/1,64,bfloat16,none,loop" \
    --out="$out/startup_c_benchmark.json"
fi
