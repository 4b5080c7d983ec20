# Shared driver of the resumable, staged `irformer compress run` scripts (sourced by
# dqc_budget_curve.sh and compress_variants.sh; not run on its own).
#
# The caller sets STAGES (words), CAPTION, OUT and defines `stage_args STAGE`, which sets
# NAME (the stage's folder under OUT) and the array ARGS (its own `compress run` arguments:
# model, method, bits, DQC budget, ...) and may set BENCH (default Set5,Set14). Every stage
# also gets the BSD200 calibration set, CPU, --resume. A finished stage leaves OUT/NAME/done and is skipped; a
# killed one resumes (measured rows kept, an interrupted distillation continues from its
# dqc_state). At the end `irformer compress report` merges the stages into OUT/tables.
# Environment: DATA [../shared/data relative to the repo], PY [/work/main/.venv/bin/python].

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${DATA:-$(cd "$REPO/.." && pwd)/shared/data}"
PY="${PY:-/work/main/.venv/bin/python}"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

run_stages() {
    mkdir -p "$OUT"
    cd "$REPO"
    echo "$(date -u +%FT%TZ) start: repo $REPO at $(git rev-parse --short HEAD 2>/dev/null || echo '?'), out $OUT"
    local done_dirs=() stage dir
    for stage in $STAGES; do
        BENCH=Set5,Set14
        stage_args "$stage"
        dir="$OUT/$NAME"
        if [[ -f "$dir/done" ]]; then
            echo "$(date -u +%FT%TZ) $stage: done earlier, skipped"
            done_dirs+=("$dir")
            continue
        fi
        echo "$(date -u +%FT%TZ) $stage: running into $dir"
        "$PY" -m irformer compress run "${ARGS[@]}" \
            --calib "$DATA/train/BSD200" --bench "$BENCH" --data-root "$DATA" --device cpu \
            --no-progress --caption "$CAPTION" --out "$dir" --resume
        date -u +%FT%TZ > "$dir/done"
        done_dirs+=("$dir")
        echo "$(date -u +%FT%TZ) $stage: finished"
    done
    "$PY" -m irformer compress report "${done_dirs[@]}" --out "$OUT/tables" --caption "$CAPTION"
    echo "$(date -u +%FT%TZ) all stages done; tables in $OUT/tables"
}
