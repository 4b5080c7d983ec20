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
#   LR [1e-2], SCALAR_LR [LR]: `--dqc-lr` and CompSRT's `--dqc-scalar-lr` (a value or W=LR pairs)
#   STAGES ["base split_qkv prune prune_official channel_w2 channel_w3 channel_w4"]
#   DATA, PY: see compress_stages.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/compress_stages.sh"

OUT="${OUT:-/work/scratch/modes17}"
ITERS="${ITERS:-200}"
BATCH="${BATCH:-2}"
PATCH="${PATCH:-32}"
NORM="${NORM:-ln}"
LR="${LR:-1e-2}"
SCALAR_LR="${SCALAR_LR:-$LR}"
STAGES="${STAGES:-base split_qkv prune prune_official channel_w2 channel_w3 channel_w4}"
CAPTION="Protocol: SwinIR-light x4 ${NORM} reference checkpoint; CompSRT, DQC ${ITERS} iterations x batch ${BATCH} of ${PATCH} px LR patches (lr ${LR}, alpha/beta lr ${SCALAR_LR}; W=LR pairs are per weight width; held-out selection every 50 it); 32 calibration patches (64 px) from BSD200; Set5 + Set14 (full); CPU, 1 thread. Each row changes one setting against the default (W2A2, no pruning, one qkv input quantiser)."

stage_args() {
    local bits=2 lat=0 extra=()  # latency only where storage differs: 3 runs, 128 px
    case "$1" in
        base) ;;
        split_qkv) extra=(--qkv-inputs split) ;;
        prune) extra=(--prune 0.4) ;;
        prune_official) extra=(--prune 0.4 --prune-mode official) ;;
        channel_w[234])
            bits="${1#channel_w}"; extra=(--prune 0.4 --prune-mode channel --save-packed); lat=3 ;;
        sweep_w[234]_p[1-9])
            bits="${1:7:1}"; extra=(--prune "0.${1: -1}" --save-packed); lat=3 ;;
        *) echo "unknown stage $1" >&2; exit 2 ;;
    esac
    NAME="$1"
    ARGS=(--model "src/irformer/weights/swinir_light_x4_${NORM}.safetensors"
          --method compsrt --wbits "$bits" "${extra[@]}"
          --dqc-iters "$ITERS" --dqc-batch "$BATCH" --dqc-patch "$PATCH" --val-every 50
          --dqc-lr "$LR" --dqc-scalar-lr "$SCALAR_LR"
          --dqc-keep-activations --latency-repeats "$lat")
}

run_stages
