#!/usr/bin/env bash
# CompSRT variants on the x4 reference checkpoint (issue 17 items 3 and 6), resumable:
# how far the official code's deviations move W2A2 PSNR, structured channel pruning, and the
# unstructured pruning sweep.
#
# One `irformer compress run` per stage, CompSRT with one DQC budget, scored on Set5 +
# Set14; each differs from `base` (W2A2) in one setting:
#   base          irformer's defaults (one qkv input quantiser, no pruning)
#   split_qkv     --qkv-inputs split: q, k and v each quantise the qkv input (their code)
#   prune         --prune 0.4 (magnitude, exact zeros, the 1-bit-mask storage model)
#   prune_official --prune 0.4 --prune-mode official (sampled threshold per forward, padded
#                 rows counted, pruned zeros quantised back)
#   channel_wB    --prune 0.4 --prune-mode channel at W B (B = 2, 3, 4; the paper's Table 8)
#   sweep_wB_pP   --prune 0.P (magnitude) at W B, packed file saved and reloaded (Figure 7:
#                 B = 3, 4 and P = 1..7; not in the default STAGES, ~2 CPU h for all 14)
# A finished stage leaves STAGE/done and is skipped; rerun to go on. At the end
# `irformer compress report` merges the stages into OUT/tables.
#
# Usage: OMP_NUM_THREADS=1 nice -n 10 setsid nohup benchmarks/compress_variants.sh \
#            > /work/scratch/modes17/log.txt 2>&1 &
#        STAGES="$(echo sweep_w{3,4}_p{1..7})" OUT=/work/scratch/sweep17 benchmarks/compress_variants.sh
# Environment (defaults in brackets):
#   OUT [/work/scratch/modes17]  ITERS [200]  BATCH [2]  PATCH [32]  NORM [ln]
#   STAGES ["base split_qkv prune prune_official channel_w2 channel_w3 channel_w4"]
#   DATA [../shared/data relative to the repo]  PY [/work/main/.venv/bin/python]
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-/work/scratch/modes17}"
ITERS="${ITERS:-200}"
BATCH="${BATCH:-2}"
PATCH="${PATCH:-32}"
NORM="${NORM:-ln}"
STAGES="${STAGES:-base split_qkv prune prune_official channel_w2 channel_w3 channel_w4}"
DATA="${DATA:-$(cd "$REPO/.." && pwd)/shared/data}"
PY="${PY:-/work/main/.venv/bin/python}"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

CAPTION="Protocol: SwinIR-light x4 ${NORM} reference checkpoint; CompSRT, DQC ${ITERS} iterations x batch ${BATCH} of ${PATCH} px LR patches (lr 1e-2, held-out selection every 50 it); 32 calibration patches (64 px) from BSD200; Set5 + Set14 (full); CPU, 1 thread. Each row changes one setting against the default (W2A2, no pruning, one qkv input quantiser)."

mkdir -p "$OUT"
cd "$REPO"
echo "$(date -u +%FT%TZ) start: repo $REPO at $(git rev-parse --short HEAD 2>/dev/null || echo '?'), out $OUT"
done_dirs=()
for stage in $STAGES; do
    bits=2
    lat=0  # latency only where the storage differs (pruned, packed): 3 runs, 1 thread, 128 px
    case "$stage" in
        base) extra=() ;;
        split_qkv) extra=(--qkv-inputs split) ;;
        prune) extra=(--prune 0.4) ;;
        prune_official) extra=(--prune 0.4 --prune-mode official) ;;
        channel_w[234]) bits="${stage#channel_w}"; extra=(--prune 0.4 --prune-mode channel --save-packed); lat=3 ;;
        sweep_w[234]_p[1-9])
            bits="${stage:7:1}"; extra=(--prune "0.${stage: -1}" --save-packed); lat=3 ;;
        *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
    dir="$OUT/$stage"
    if [[ -f "$dir/done" ]]; then
        echo "$(date -u +%FT%TZ) $stage: done earlier, skipped"
        done_dirs+=("$dir")
        continue
    fi
    echo "$(date -u +%FT%TZ) $stage: running into $dir"
    "$PY" -m irformer compress run \
        --model "src/irformer/weights/swinir_light_x4_${NORM}.safetensors" \
        --method compsrt --wbits "$bits" "${extra[@]}" \
        --calib "$DATA/train/BSD200" \
        --dqc-iters "$ITERS" --dqc-batch "$BATCH" --dqc-patch "$PATCH" --val-every 50 \
        --dqc-keep-activations \
        --bench Set5,Set14 --data-root "$DATA" --latency-repeats "$lat" --device cpu \
        --no-progress --caption "$CAPTION" --out "$dir" --resume
    date -u +%FT%TZ > "$dir/done"
    done_dirs+=("$dir")
    echo "$(date -u +%FT%TZ) $stage: finished"
done
"$PY" -m irformer compress report "${done_dirs[@]}" --out "$OUT/tables" --caption "$CAPTION"
echo "$(date -u +%FT%TZ) all stages done; tables in $OUT/tables"
