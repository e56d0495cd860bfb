#!/usr/bin/env bash
# LightningDiT training parity on one H200 (issue 18, item 2): ours and two reference seeds from
# one converted init on one batch list, the injected first K steps, cross-evaluated validation
# losses, samples side by side.
#
#   TOKENIZER=<VA-VAE run or export folder> bash launch/parity/run_dit_h200.sh prep,train
#   TOKENIZER=... bash launch/parity/run_dit_h200.sh post          (the second command)
#   (stages: prep, train, post, or all = prep,train,post; each stage reuses what earlier ones
#   left under $WORK, which stays on the machine between calls while it is warm)
#
# Settings (environment): TOKENIZER (the tokenizer the VA-VAE harness trained; prep and post),
# DATA=.data/imagenette-parity (train/ and val/ image folders), WORK=runs/dit_parity,
# REF=.ref/LightningDiT, PRESET=B/1, BATCH=64, STEPS=3000, K=50, CKPT=0,1000,2000,3000,
# RESOLUTION=256, VAL_COUNT=500, OUT (default $WORK/out; the device tool's $OUT when set);
# MEM_EXTRACT (0.3: each extraction's share of the GPU memory; lower beside other runs),
# REF_FLAGS / SAMPLE_FLAGS / EXTRACT_FLAGS (default --batch_size=64) are passed through (CPU
# smoke runs: REF_FLAGS=--compile=off, SAMPLE_FLAGS=--num_steps=20).
#
# Processes of the train stage, all at once on the one GPU (each its own CUDA context):
#   ours      dit_ours.py train, bf16 (the config's auto dtype), STEPS steps      ~75 s GPU
#   ref_s0    dit_reference.py train --seed=0, bf16 autocast as shipped          ~100 s GPU
#   ref_s1    dit_reference.py train --seed=1                                   ~100 s GPU
#   ours_fp32 dit_ours.py train --dtype=float32 --steps=K (the exact phase)      ~10 s GPU
#   ref_fp32  dit_reference.py train --dtype=float32 --steps=K (TF32 off)         ~10 s GPU
# The arithmetic behind B/1 at batch 64 (BENCHMARKS.md, one H200): the reference's B/1 step at
# batch 256 takes 117 ms (2184 img/s), ours 95 ms (2700 img/s). At batch 256, 3000 steps of the
# three runs are 3000 x (117 + 117 + 95) ms = 990 s of GPU time, batch 128 about 500 s: neither
# fits the ~8 minutes of one command with the rest. At batch 64 the GEMMs are those of B/2 at
# 256 (16384 tokens a step): about a quarter of the b256 step plus the per-step costs that do not
# shrink (AdamW + EMA over 130M parameters, ~5 GB of traffic, ~1.5 ms; the reference's ~1500
# kernel launches and its .item() per step): reference ~34 ms, ours ~25 ms a step, so 3000 steps
# are ~100 s and ~75 s; time-sliced on one GPU the three need ~280 s plus start-up (our compile
# ~60 s, the reference's two torch.compile'd functions) that overlaps the others' steps. The exact
# phase costs K x ~0.2 s per side (8.8 TFLOP a step in float32 without TF32). Memory: ours takes
# XLA_PYTHON_CLIENT_MEM_FRACTION of 0.25 (bf16) / 0.2 (fp32) of the 140 GB, each reference run
# ~10-20 GB: ~100 GB in all.
# Estimated wall time: prep ~70 s (two extractions at once, make_init ~30 s), train ~300 s,
# post ~110 s (both evaluators over 14 checkpoints x 2 weight sets, 500 latents x 8 t; sampling
# 2 models x 80 images x 250 Euler steps with CFG per side; decoding; the plots).
set -euo pipefail
cd "$(dirname "$0")/../.."
STAGES=${1:-all}
[ "$STAGES" = all ] && STAGES=prep,train,post
DATA=${DATA:-.data/imagenette-parity}
WORK=${WORK:-runs/dit_parity}
REF=${REF:-.ref/LightningDiT}
PRESET=${PRESET:-B/1}
BATCH=${BATCH:-64}
STEPS=${STEPS:-3000}
K=${K:-50}
CKPT=${CKPT:-0,1000,2000,3000}
RESOLUTION=${RESOLUTION:-256}
VAL_COUNT=${VAL_COUNT:-500}
RESULTS=${OUT:-$WORK/out}
REF_FLAGS=${REF_FLAGS:-}
SAMPLE_FLAGS=${SAMPLE_FLAGS:-}
EXTRACT_FLAGS=${EXTRACT_FLAGS:---batch_size=64}  # two extractions share the GPU
export PYTHONUNBUFFERED=1
if [ ! -d "$DATA" ] && [ -f "$DATA.zip" ]; then # carried zipped (run_vavae_h200.sh does the same)
  python3 -m zipfile -e "$DATA.zip" "$(dirname "$DATA")"
fi
if [ -d .whl ] && ! python3 -c "import grain, ml_collections, array_record" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$WORK/console" "$RESULTS"
P=launch/parity

# Runs the commands given as "name|command" in parallel; each one's output goes to
# $WORK/console/<name>.log; fails (after all have ended) if any failed.
parallel() {
  local pids=() names=() failed=0
  for job in "$@"; do
    local name=${job%%|*} cmd=${job#*|}
    echo "[$(date +%T)] start $name: $cmd"
    bash -c "$cmd" >"$WORK/console/$name.log" 2>&1 &
    pids+=($!)
    names+=("$name")
  done
  for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then
      echo "[$(date +%T)] done ${names[$i]}"
    else
      echo "[$(date +%T)] FAILED ${names[$i]}: tail of $WORK/console/${names[$i]}.log"
      tail -n 30 "$WORK/console/${names[$i]}.log"
      failed=1
    fi
  done
  return $failed
}

need_tokenizer() {
  if [ -z "${TOKENIZER:-}" ]; then
    echo "TOKENIZER is not set: the VA-VAE run or export folder whose latents to train on" >&2
    exit 2
  fi
}

stage_prep() {
  need_tokenizer
  local ex="XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_EXTRACT:-0.3} python3 launch/extract_latents.py \
 --tokenizer=$TOKENIZER --source=folder --resolution=$RESOLUTION $EXTRACT_FLAGS"
  parallel \
    "extract_train|$ex --root=$DATA/train --out_dir=$WORK/latents/train" \
    "extract_val|$ex --root=$DATA/val --out_dir=$WORK/latents/val"
  python3 $P/dit_make_init.py --work="$WORK" --train_latents="$WORK/latents/train" \
    --val_latents="$WORK/latents/val" --ref_dir="$REF" --preset="$PRESET" --batch="$BATCH" \
    --steps="$STEPS" --inject_steps="$K" --val_count="$VAL_COUNT" 2>&1 |
    tee "$WORK/console/make_init.log"
}

stage_train() {
  local ours="python3 $P/dit_ours.py train --work=$WORK"
  local ref="python3 $P/dit_reference.py train --work=$WORK --ref_dir=$REF $REF_FLAGS"
  parallel \
    "ours|XLA_PYTHON_CLIENT_MEM_FRACTION=0.25 $ours --run=ours --ckpt_steps=$CKPT" \
    "ref_s0|$ref --run=ref_s0 --seed=0 --ckpt_steps=$CKPT" \
    "ref_s1|$ref --run=ref_s1 --seed=1 --ckpt_steps=$CKPT" \
    "ours_fp32|XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 $ours --run=ours_fp32 --dtype=float32 \
 --steps=$K --ckpt_steps=$K" \
    "ref_fp32|$ref --run=ref_fp32 --dtype=float32 --steps=$K --ckpt_steps=$K"
  grep -h "img_per_s" "$WORK"/console/{ours,ref_s0,ref_s1}.log || true
}

stage_post() {
  need_tokenizer
  parallel \
    "post_ref|python3 $P/dit_reference.py post --work=$WORK --ref_dir=$REF $REF_FLAGS \
 --sample_runs=ref_s0,ours $SAMPLE_FLAGS" \
    "post_ours|XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 python3 $P/dit_ours.py post --work=$WORK \
 --sample_runs=ours,ref_s0 $SAMPLE_FLAGS --tokenizer=$TOKENIZER \
 --expect=ref_s0__by_reference,ours__by_reference --wait_s=300"
  python3 $P/dit_compare.py --work="$WORK" 2>&1 | tee "$WORK/console/compare.log"
  cp "$WORK/compare/curves.png" "$RESULTS/dit_curves.png"
  cp "$WORK/compare/exact.png" "$RESULTS/dit_exact.png"
  [ -f "$WORK/compare/samples.png" ] && cp "$WORK/compare/samples.png" "$RESULTS/dit_samples.png"
  cp "$WORK/compare/summary.md" "$RESULTS/dit_summary.md"
  tar -czf "$RESULTS/dit_results.tar.gz" -C "$WORK" logs eval compare/summary.json \
    plan/plan.json console $(cd "$WORK" && ls samples/*.json 2>/dev/null)
  ls -la "$RESULTS"
}

for stage in ${STAGES//,/ }; do
  echo "[$(date +%T)] === stage $stage ==="
  SECONDS=0
  "stage_$stage"
  echo "[$(date +%T)] === stage $stage: ${SECONDS} s ==="
done
