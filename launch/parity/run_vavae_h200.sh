#!/usr/bin/env bash
# The VA-VAE half of issue 18 (items 1 and 4) on one H200, as one command from the repo root
# (about 8.5 minutes; carry .whl, .data/imagenette-parity or its .zip, and .ref/LightningDiT/vavae):
#
#   bash launch/parity/run_vavae_h200.sh
#
# Before, here, once: the train subset (4200 of 9469 JPEGs) + 500 val images and the batch list,
#   python3 launch/parity/vavae_make_init.py lists --src=../shared/data/imagenette-224 \
#     --out=.data/imagenette-parity
# and in .whl the project's wheels plus taming-transformers-rom1504 (the reference imports taming).
#
# Timeline (everything on the one GPU at once where memory allows; batch 8 leaves it room):
#   +0     ours_exact (float32, highest precision) and ours_free (bfloat16) start compiling from
#          shapes; they wait for the converted files and for the float64 control to end
#   +5     vavae_make_init.py make: image caches, random DINOv2-L / LPIPS files, the
#          reference's init (seed 0)
#   +50    ref_exact (float32, TF32 off, our noise) and ref_f64 (the same in float64, F64_STEPS:
#          the round-off control; twice the memory, so it runs before the free references)
#          start; launch/convert.py converts LPIPS and the init for ours
#   ~+100  ref_f64 done: ref_free_s0 (as shipped, the common init) and ref_free_s1 (as shipped,
#          its own init of seed 1) start; ours start stepping once compiled
#   +BUDGET_S  every run stops stepping (a run stopped early evaluates where it stopped)
#   then   ours evaluates every saved reconstruction of the 500 val images (PSNR / SSIM /
#          LPIPS, the LPIPS random) and vavae_compare.py writes the verdicts and figures
# PHASES (default exact,f64,free) picks the runs: exact = ours_exact + ref_exact, f64 = ref_f64
# (with ref_exact when exact is not picked), free = ours_free + ref_free_s0 + ref_free_s1,
# free32 = ours_free32 (ours in float32, the free phase's other settings: which differences are
# bf16's). A second command on the same warm machine reuses $W (make and convert are skipped when
# their files are there), e.g. PHASES=free first, then PHASES=f64 EXACT_STEPS=20.
# The reference steps at ~1.7 steps/s at batch 8, so 1000 free steps take two commands: every
# free reference run saves its state at its end ($W/<run>.state.pt); RESUME=1 continues the free
# references from there (ours, done in the first command, are not run again) and the comparison
# then covers the whole run.
# ours_free writes its final weights to $W/tokenizer (an export folder: the DiT run's TOKENIZER).
# OURS_NOISE_SEEDS (default 0) runs ours in the free phase once per noise seed (posterior noise
# and LPIPS dropout; seed 0 is ours_free, seed s ours_free_n$s): our own spread, beside the
# references'. REF_RUNS=0 skips the free references and compares with the logs of an earlier
# session instead: REF_LOGS=<folder with ref_free_s0.jsonl, ref_free_s1.jsonl and eval.json>, e.g.
#   PHASES=free OURS_NOISE_SEEDS=0,1,2 REF_RUNS=0 REF_LOGS=docs/parity/2026-12-04_h200_vavae_run3 \
#     BUDGET_S=480 W=runs/vavae_parity bash launch/parity/run_vavae_h200.sh
# same = ours_same + ref_same: the free phase with the exact phase's random draws (our posterior
# noise on both sides, LPIPS dropout off) at the free phase's precision (bf16 ours, TF32 convs in
# the reference), the reference from the common init; RESUME=1 continues ref_same. Is a difference
# of the free phase the random draws' (run 4's grad_norm_g), or the rest?
#   PHASES=same BUDGET_S=470 W=runs/vavae_parity bash launch/parity/run_vavae_h200.sh
#   RESUME=1 PHASES=same BUDGET_S=470 W=runs/vavae_parity bash launch/parity/run_vavae_h200.sh
# Work files go under $W, the results (6 small files) under $OUT.
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-/tmp/vavae_parity_out}
W=${W:-/tmp/vavae_parity}
REF=${REF:-.ref/LightningDiT}
DATA=${DATA:-.data/imagenette-parity}
EXACT_STEPS=${EXACT_STEPS:-300}
DISC_START=${DISC_START:-200} # Lightning global steps, 2 per iteration: the GAN joins at 100
F64_STEPS=${F64_STEPS:-20}
FREE_STEPS=${FREE_STEPS:-1000}
EVAL_STEPS=${EVAL_STEPS:-0,250,500,1000}
BUDGET_S=${BUDGET_S:-440} # stepping ends then; evaluation and comparison take ~70 s more
PHASES=${PHASES:-exact,f64,free}
RESUME=${RESUME:-0}
OURS_NOISE_SEEDS=${OURS_NOISE_SEEDS:-0}
REF_RUNS=${REF_RUNS:-1}
REF_LOGS=${REF_LOGS:-}
if [ "$REF_RUNS" = 0 ] && [[ ",$PHASES," == *",free,"* ]]; then
  for f in ref_free_s0.jsonl ref_free_s1.jsonl eval.json; do
    [ -f "$REF_LOGS/$f" ] || { echo "REF_RUNS=0 needs REF_LOGS=<folder with $f> (got '$REF_LOGS')" >&2; exit 2; }
  done
fi
# The shapes (a CPU smoke run of this script: SIZE=32 MODEL=tiny TEACHER=dinov2-tiny TEACHER_RES=112)
SIZE=${SIZE:-256}
MODEL=${MODEL:-f16d32}
TEACHER=${TEACHER:-dinov2-large}
TEACHER_RES=${TEACHER_RES:-224}
P=launch/parity
if [ ! -d "$DATA" ] && [ -f "$DATA.zip" ]; then # carried zipped: the folder's files cost more
  python3 -m zipfile -e "$DATA.zip" "$(dirname "$DATA")" || { echo "cannot unzip $DATA.zip" >&2; exit 1; }
fi
[ -f "$DATA/batches.json" ] || { echo "no $DATA/batches.json (nor $DATA.zip): run vavae_make_init.py lists" >&2; exit 2; }
mkdir -p "$W/logs" "$OUT"
log() { echo "[$(($(date +%s) - T0)) s] $*"; }

if [ "${WHEELS:-1}" = 1 ] && ls .whl/*.whl >/dev/null 2>&1; then # WHEELS=0: use what is installed
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 10 >"$W/logs/gpu.csv" &
  SAMPLER=$!
fi
DEADLINE=$((T0 + BUDGET_S))
SHARED="--batches=$DATA/batches.json --cache=$W/cache --teacher=$W/teacher --teacher_resolution=$TEACHER_RES --disc_start=$DISC_START --deadline=$DEADLINE"
REFRUN="python3 $P/vavae_reference.py --ref_dir=$REF --model=$MODEL --vgg=$W/vgg16_random.pth --lpips_heads=$W/lpips_heads_random.pth --threads=2 $SHARED"
# Memory caps (no preallocation; the fraction bounds what XLA may take): float32 runs 0.3 of the
# 140 GB, the bf16 one 0.2; the two free references take ~33 GB each (run 2: 108 GB in all).
OURS32="env XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.3"
OURS16="env XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.2"
OURS="python3 $P/vavae_ours.py train --preset=$MODEL --teacher_preset=$TEACHER --init=$W/init --lpips=$W/lpips.npz --wait_for=$W/converted,$W/f64_done $SHARED"
FREE="--steps=$FREE_STEPS --eval_steps=$EVAL_STEPS --recon_dir=$W/recon"
declare -A PIDS=()
start() { # name, command words...
  local name=$1
  shift
  log "start $name"
  "$@" >"$W/logs/$name.log" 2>&1 &
  PIDS[$name]=$!
}
has() { [[ ",$PHASES," == *",$1,"* ]]; }
rm -f "$W/f64_done"
has f64 || touch "$W/f64_done"
# shellcheck disable=SC2086 # the command strings split into words on purpose
{
  has exact && start ours_exact $OURS32 $OURS --phase=exact --steps="$EXACT_STEPS" --out="$W/ours_exact.jsonl"
  if has free && [ "$RESUME" != 1 ]; then
    for n in ${OURS_NOISE_SEEDS//,/ }; do
      if [ "$n" = 0 ]; then
        start ours_free $OURS16 $OURS --phase=free $FREE --tag=ours_free --out="$W/ours_free.jsonl" \
          --export_final="$W/tokenizer"
      else
        start ours_free_n$n $OURS16 $OURS --phase=free --noise_seed="$n" $FREE --tag=ours_free_n$n \
          --out="$W/ours_free_n$n.jsonl"
      fi
    done
  fi
  if has same && [ "$RESUME" != 1 ]; then # the free phase without random draws: see above
    start ours_same $OURS16 $OURS --phase=free --lpips_dropout=off $FREE --tag=ours_same \
      --out="$W/ours_same.jsonl"
  fi
  if has free32 && [ "$RESUME" != 1 ]; then
    start ours_free32 $OURS32 $OURS --phase=free --dtype=float32 $FREE --tag=ours_free32 \
      --out="$W/ours_free32.jsonl"
  fi

  if [ -f "$W/init.pt" ] && [ -d "$W/cache" ]; then
    log "make: reusing $W (image caches, teacher, LPIPS, init)"
  else
    log "make: image caches, random teacher and LPIPS, the reference's init"
    python3 $P/vavae_make_init.py make --root="$DATA" --out="$W" --size="$SIZE" \
      --teacher_preset="$TEACHER" --teacher_resolution="$TEACHER_RES" --ref_dir="$REF" \
      --model="$MODEL" --disc_start="$DISC_START" --workers="$(nproc)" >"$W/logs/make.log" 2>&1 ||
      { tail -30 "$W/logs/make.log"; exit 1; }
  fi
  if has exact || has f64; then
    start ref_exact $REFRUN --phase=exact --init="$W/init.pt" --steps="$EXACT_STEPS" --out="$W/ref_exact.jsonl"
  fi
  has f64 && start ref_f64 $REFRUN --phase=exact --float64 --init="$W/init.pt" --steps="$F64_STEPS" --out="$W/ref_f64.jsonl"

  if [ -f "$W/converted" ]; then
    log "convert: reusing $W/lpips.npz and $W/init"
  else
    log "convert (launch/convert.py lpips, vavae)"
    python3 launch/convert.py lpips --vgg="$W/vgg16_random.pth" --heads="$W/lpips_heads_random.pth" \
      --out="$W/lpips.npz" >"$W/logs/convert_lpips.log" 2>&1 || tail -30 "$W/logs/convert_lpips.log"
    python3 launch/convert.py vavae --pt="$W/init.pt" --out="$W/init" --preset="$MODEL" \
      >"$W/logs/convert_vavae.log" 2>&1 || tail -30 "$W/logs/convert_vavae.log"
    touch "$W/converted"
  fi
  if has f64; then
    wait "${PIDS[ref_f64]}"
    log "ref_f64 ended (rc=$?); $(tail -1 "$W/logs/ref_f64.log" | cut -c1-300)"
    unset "PIDS[ref_f64]"
    touch "$W/f64_done"
  fi
  if has free && [ "$REF_RUNS" != 0 ]; then
    for s in 0 1; do
      run=ref_free_s$s
      from="--init=$W/init.pt" # seed 1: its own init (the spread of two seeds includes the init)
      [ $s = 1 ] && from=""
      [ "$RESUME" = 1 ] && from="--resume_state=$W/$run.state.pt"
      start $run $REFRUN --phase=free $from --seed=$s $FREE --tag=$run --out="$W/$run.jsonl" \
        --save_state="$W/$run.state.pt"
    done
  fi
  if has same; then
    from="--init=$W/init.pt"
    [ "$RESUME" = 1 ] && from="--resume_state=$W/ref_same.state.pt"
    start ref_same $REFRUN --phase=free --shared_noise --lpips_dropout=off $from --seed=0 $FREE \
      --tag=ref_same --out="$W/ref_same.jsonl" --save_state="$W/ref_same.state.pt"
  fi
}
for name in "${!PIDS[@]}"; do
  wait "${PIDS[$name]}" && s=ok || s="FAILED rc=$?"
  log "$name: $s; $(grep -v '^\s*$' "$W/logs/$name.log" | tail -1 | cut -c1-500)"
done

if has free || has free32 || has same; then
  log "evaluate the reconstructions"
  python3 $P/vavae_ours.py eval --cache="$W/cache" --lpips="$W/lpips.npz" --out="$W/eval.json" \
    "$W"/recon/*.npy >"$W/logs/eval.log" 2>&1 || tail -20 "$W/logs/eval.log"
fi
log "compare"
if has exact || has f64; then
  ours_exact=$W/ours_exact.jsonl
  [ -f "$ours_exact" ] || ours_exact=$W/ref_exact.jsonl # f64 alone: the reference against itself
  python3 $P/vavae_compare.py exact --ours="$ours_exact" --ref="$W/ref_exact.jsonl" \
    --ref64="$W/ref_f64.jsonl" --json="$OUT/vavae_exact.json" --plot="$OUT/vavae_exact.png" \
    2>"$W/logs/compare_exact.log" || tail -20 "$W/logs/compare_exact.log"
fi
if has free; then
  ours=()
  for f in "$W"/ours_free.jsonl "$W"/ours_free32.jsonl "$W"/ours_free_n*.jsonl; do
    [ -f "$f" ] && ours+=("$f")
  done
  refs=("$W/ref_free_s0.jsonl" "$W/ref_free_s1.jsonl")
  evals=("$W/eval.json")
  if [ "$REF_RUNS" = 0 ]; then # the earlier session's references, their tags prefixed "prior/"
    refs=("prior/ref_free_s0=$REF_LOGS/ref_free_s0.jsonl" "prior/ref_free_s1=$REF_LOGS/ref_free_s1.jsonl")
    evals=("prior:$REF_LOGS/eval.json" "$W/eval.json")
  fi
  python3 $P/vavae_compare.py free --ours "${ours[@]}" --refs "${refs[@]}" --eval "${evals[@]}" \
    --recon_dir="$W/recon" --cache="$W/cache" --json="$OUT/vavae_free.json" \
    --plot="$OUT/vavae_free.png" --grid="$OUT/vavae_recon.png" \
    2>"$W/logs/compare_free.log" || tail -20 "$W/logs/compare_free.log"
fi
if has same; then # one reference run: its "band" is the run itself
  python3 $P/vavae_compare.py free --ours "$W/ours_same.jsonl" --refs "$W/ref_same.jsonl" \
    --eval "$W/eval.json" --json="$OUT/vavae_same.json" --plot="$OUT/vavae_same.png" \
    2>"$W/logs/compare_same.log" || tail -20 "$W/logs/compare_same.log"
fi
[ -n "${SAMPLER:-}" ] && kill "$SAMPLER"
(cd "$W" && tar -czf "$OUT/vavae_logs.tar.gz" logs ./*.jsonl $(ls eval.json 2>/dev/null))
log "done: $(ls "$OUT" | tr '\n' ' ')"
