#!/usr/bin/env bash
# DQC budget curve on the x4 reference checkpoints (issue 17 item 1), resumable.
#
# For each stage (model x bit width; W2A2 first, the width where DQC matters) one
# `irformer compress run` distils 2DQuant and CompSRT for the largest budget once and
# scores the kept bounds (and the last iterate where they differ) at every budget in
# ITERS on Set5 and Set14, with the alpha/beta magnitudes and bound shifts in grid
# steps (rows.jsonl "drift"; budget.md). A stage that finished leaves STAGE/done and
# is skipped; a killed stage resumes with --resume (measured rows are kept, the
# interrupted distillation continues from STAGE/dqc_state). Rerun this script to go on.
# At the end `irformer compress report` merges the stages into OUT/tables.
#
# Usage (one process, niced, in the background; the machine has 2 shared cores):
#   OMP_NUM_THREADS=1 nice -n 10 setsid nohup benchmarks/dqc_budget_curve.sh \
#       > /work/scratch/dqc17/log.txt 2>&1 &
# Environment (defaults in brackets):
#   OUT [/work/scratch/dqc17]   output root, one folder per stage
#   ITERS [0,50,200,1000]       DQC budgets scored in one run per configuration
#   BATCH [2] PATCH [32]        DQC batch and LR patch side (papers: 16 x 64); activations
#                               are kept for backward (~1.5x faster than recomputing the
#                               residual groups; small at this batch)
#   STAGES ["ln:2 iln:2 ln:4 iln:4"]   model:bits, in this order
#   DATA [../shared/data relative to the repo]  benchmarks and the BSD200 calibration set
#   PY [/work/main/.venv/bin/python]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/compress_stages.sh"

OUT="${OUT:-/work/scratch/dqc17}"
ITERS="${ITERS:-0,50,200,1000}"
BATCH="${BATCH:-2}"
PATCH="${PATCH:-32}"
STAGES="${STAGES:-ln:2 iln:2 ln:4 iln:4}"
CAPTION="Protocol: SwinIR-light x4 reference checkpoints; DQC ${ITERS} iterations x batch ${BATCH} of ${PATCH} px LR patches (lr 1e-2, held-out selection every 50 it); 32 calibration patches (64 px) from BSD200; Set5 + Set14 (full); CPU, 1 thread."

stage_args() {
    local norm="${1%%:*}" bits="${1##*:}"
    NAME="${norm}_w${bits}"
    ARGS=(--model "src/irformer/weights/swinir_light_x4_${norm}.safetensors"
          --method 2dquant,compsrt --wbits "$bits"
          --dqc-iters "$ITERS" --dqc-batch "$BATCH" --dqc-patch "$PATCH" --val-every 50
          --dqc-keep-activations --latency-repeats 0)
}

run_stages
