#!/usr/bin/env bash
# The MNIST / FashionMNIST LeNet-5 experiment grid (issue 5): victims x defenses x attacks x pools x seeds, chained
# through the CLI, then `evaluate` into a report. Resumable: a cell whose artifact exists is skipped, so rerun the
# same command after an interruption. Independent cells run side by side (--jobs), one torch thread each.
#
#   experiments/grid.sh [--smoke] [--jobs N] [--seeds "0 1 2"] [--datasets "mnist fashionmnist"] [--out DIR]
#
# Victims per dataset and seed, one recipe for all (SGD lr 0.1, momentum 0.5, wd 1e-3, StepLR 20, 50 epochs):
# undefended (train), InI (train-ini, official terms), adaptive misinformation (train --objective outlier-exposure).
# The OOD set both defenses train on is the other MNIST-family dataset; the attacker's pools are that same set
# ("seen") and the offline families the defenses never saw (sklearn-digits, skimage-patches, generated).
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0; JOBS=2; SEEDS="0 1 2"; DATASETS=""; OUT=artifacts/grid
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --jobs) JOBS=$2; shift ;;
        --seeds) SEEDS=$2; shift ;;
        --datasets) DATASETS=$2; shift ;;
        --out) OUT=$2; shift ;;
        *) echo "error: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # one thread a cell: cells run side by side instead
if [ "$SMOKE" = 1 ]; then
    # The same chain on 2,000-image slices, one seed, one epoch, one unseen pool: minutes, for testing the script.
    LIMIT="--limit 2000 --val-size 400"; VICTIM_EPOCHS=1; SURROGATE_EPOCHS=1; BUDGET=1000; DFME_BUDGET=2000
    JBDA="--attack-param rounds=2 --epochs 1"; OUT=${OUT}-smoke; SEEDS=0; DATASETS=${DATASETS:-mnist}
    UNSEEN_POOLS="generated"
else
    # Reductions, each stated in the report: surrogate training is cut where its curve has flattened.
    # Every reduction can be set from the environment (defaults: the full grid), e.g. for a 3-hour session
    # VICTIM_EPOCHS=10 LR_STEP=7 SURROGATE_EPOCHS=4 UNSEEN_POOLS=generated DFME_BUDGET=20000 experiments/grid.sh
    LIMIT=""; VICTIM_EPOCHS=${VICTIM_EPOCHS:-50}; SURROGATE_EPOCHS=${SURROGATE_EPOCHS:-20}; BUDGET=${BUDGET:-50000}
    DFME_BUDGET=${DFME_BUDGET:-200000}; JBDA=${JBDA:-}; UNSEEN_POOLS=${UNSEEN_POOLS:-sklearn-digits skimage-patches generated}
fi
DATASETS=${DATASETS:-mnist fashionmnist}
mkdir -p "$OUT/data" "$OUT/victims" "$OUT/stolen" "$OUT/logs"

# run_cells FILE: each line "OUTPUT<TAB>COMMAND"; skip cells whose OUTPUT exists, run the rest JOBS at a time.
run_cells() {
    local todo; todo=$(mktemp)
    while IFS=$'\t' read -r output command; do
        [ -e "$output" ] || printf '%s\t%s\n' "$output" "$command" >> "$todo"
    done < "$1"
    echo "$(wc -l < "$1") cells, $(wc -l < "$todo") to run" >&2
    cut -f2 "$todo" | tr '\n' '\0' | xargs -0 -r -P "$JOBS" -I{} bash -c '{}'
    rm -f "$todo"
}

cell() {  # cell OUTPUT ARGS...: one line for run_cells, its log beside the other logs
    local output=$1; shift
    printf '%s\t%s\n' "$output" "$PY cli.py $* --out $output > /dev/null 2> $OUT/logs/$(basename "${output%.*}").log || echo \"failed: $output (see $OUT/logs)\" >&2"
}

other_family() { [ "$1" = mnist ] && echo fashionmnist || echo mnist; }

# 1. data
cells=$(mktemp)
for name in $DATASETS $(for d in $DATASETS; do other_family "$d"; done) $UNSEEN_POOLS; do
    cell "$OUT/data/$name.h5" prepare --dataset "$name" $LIMIT >> "$cells"
done
sort -u "$cells" -o "$cells"; run_cells "$cells"

# 2-3. per seed (so that an interrupted grid holds whole seeds): the victims, trained once and reused by every
# attack, then the attacks: (victim, defense) pairs x attacks x pools
recipe="--epochs $VICTIM_EPOCHS --lr-step ${LR_STEP:-20} --device cpu"
steal="--device cpu --epochs $SURROGATE_EPOCHS"
for s in $SEEDS; do
    : > "$cells"
    for d in $DATASETS; do
        ood=$OUT/data/$(other_family "$d").h5
        cell "$OUT/victims/$d-undefended-s$s.h5" train --dataset "$OUT/data/$d.h5" $recipe --seed "$s" >> "$cells"
        cell "$OUT/victims/$d-ini-s$s.h5" train-ini --dataset "$OUT/data/$d.h5" --ood "$ood" $recipe --seed "$s" >> "$cells"
        cell "$OUT/victims/$d-am-s$s.h5" train --objective outlier-exposure --dataset "$OUT/data/$d.h5" --ood "$ood" \
            $recipe --seed "$s" >> "$cells"
    done
    run_cells "$cells"

    : > "$cells"
    for d in $DATASETS; do
        seen=$(other_family "$d")
        for pair in "undefended:none" "undefended:reverse-sigmoid" "undefended:mad" "undefended:top1" \
                    "undefended:grad2" "ini:none" "am:adaptive-misinformation"; do
            v=${pair%%:*}; defense=${pair#*:}; victim=$OUT/victims/$d-$v-s$s.h5; tag=$d-$v-$defense-s$s
            for pool in $seen $UNSEEN_POOLS; do
                for label in soft hard; do
                    [ "$defense" = top1 ] && [ "$label" = soft ] && continue  # top1 answers labels only
                    cell "$OUT/stolen/$tag-knockoff-$label-$pool.h5" steal --victim "$victim" --defense "$defense" \
                        --attack knockoff --label "$label" --pool "$OUT/data/$pool.h5" --budget "$BUDGET" $steal \
                        --seed "$s" >> "$cells"
                done
            done
            cell "$OUT/stolen/$tag-jbda.h5" steal --victim "$victim" --defense "$defense" --attack jbda \
                --device cpu $JBDA --seed "$s" >> "$cells"
            [ "$defense" = top1 ] || cell "$OUT/stolen/$tag-dfme.h5" steal --victim "$victim" --defense "$defense" \
                --attack dfme --budget "$DFME_BUDGET" --device cpu --seed "$s" >> "$cells"
        done
    done
    run_cells "$cells"
done
rm -f "$cells"

# 4. evaluate everything that exists into one report (failed cells are simply absent, and listed above)
$PY cli.py evaluate "$OUT"/stolen/*.h5 "$OUT"/victims/*.h5 --out "$OUT/metrics.h5" --report "$OUT/report" \
    ${BENCHMARK_JSON:+--benchmark "$BENCHMARK_JSON"}
