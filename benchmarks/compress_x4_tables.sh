#!/usr/bin/env bash
# CompSRT's ablation (Figure 6 / Table 7) and its Table 2 at x4 on the reference checkpoints
# (issue 17 items 2 and 4), resumable; then the Table 5 statistics.
#
# Stages (STAGES, in order):
#   ablation_NORM  W2A2, Set5 + Set14: 2DQuant; + Hadamard on weights; + on weights and
#                  activations; + scalar decomposition with Hadamard on weights; CompSRT; CompSRT
#                  learning alpha/beta but not the bounds (`compsrt_scalars_only`)
#   table_NORM     W4A4 / W3A3 / W2A2 x minmax, 2DQuant, CompSRT, PTQ4ViT, NoisyQuant on
#                  `--bench paper` (Set5, Set14, B100 in full, and Urban100 / Manga109 where
#                  they exist under DATA)
# DQC: ITERS iterations of BATCH x PATCH px LR patches (the budget curve of
# dqc_budget_curve.sh: CompSRT gets its gain within 50 iterations at W2A2, 2DQuant by 1,000).
# After the table stages: `irformer compress significance` (CompSRT vs the best baseline per
# model and width, one-sided Wilcoxon over datasets + Cohen's d_z) into OUT/significance.md.
#
# Usage: OMP_NUM_THREADS=1 nice -n 10 setsid nohup benchmarks/compress_x4_tables.sh \
#            > /work/scratch/x4tables17/log.txt 2>&1 &
# Environment (defaults in brackets):
#   OUT [/work/scratch/x4tables17]  ITERS [200]  BATCH [2]  PATCH [32]
#   LR [1e-2], SCALAR_LR [LR]: `--dqc-lr` and CompSRT's `--dqc-scalar-lr` (alpha/beta), one
#   value or W=LR pairs per weight width (e.g. 4=1e-3,3=1e-3,2=1e-2)
#   STAGES ["ablation_ln ablation_iln table_ln table_iln"]   DATA, PY: see compress_stages.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/compress_stages.sh"

OUT="${OUT:-/work/scratch/x4tables17}"
ITERS="${ITERS:-200}"
BATCH="${BATCH:-2}"
PATCH="${PATCH:-32}"
LR="${LR:-1e-2}"
SCALAR_LR="${SCALAR_LR:-$LR}"
STAGES="${STAGES:-ablation_ln ablation_iln table_ln table_iln}"
CAPTION="Protocol: SwinIR-light x4 reference checkpoints; DQC ${ITERS} iterations x batch ${BATCH} of ${PATCH} px LR patches for the distilling methods (lr ${LR}, alpha/beta lr ${SCALAR_LR}; W=LR pairs are per weight width; held-out selection every 50 it; the paper: 4,000 x 16); 32 calibration patches (64 px) from BSD200; CPU, 1 thread."

stage_args() {
    local norm="${1#*_}" methods bits
    case "$1" in
        ablation_*)
            methods=2dquant,2dquant_had_w,2dquant_had_wa,2dquant_had_w_sd,compsrt,compsrt_scalars_only
            bits=2 ;;
        table_*)
            methods=minmax,2dquant,compsrt,ptq4vit,noisyquant
            bits=4,3,2
            BENCH=paper ;;
        *) echo "unknown stage $1" >&2; exit 2 ;;
    esac
    NAME="$1"
    ARGS=(--model "src/irformer/weights/swinir_light_x4_${norm}.safetensors"
          --method "$methods" --wbits "$bits"
          --dqc-iters "$ITERS" --dqc-batch "$BATCH" --dqc-patch "$PATCH" --dqc-lr "$LR" --val-every 50
          --dqc-scalar-lr "$SCALAR_LR"
          --dqc-keep-activations --latency-repeats 0)
}

run_stages
tables=()
for stage in $STAGES; do [[ "$stage" == table_* ]] && tables+=("$OUT/$stage"); done
if ((${#tables[@]})); then
    "$PY" -m irformer compress significance "${tables[@]}" --out "$OUT/significance.md"
fi
