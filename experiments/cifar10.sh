#!/usr/bin/env bash
# CIFAR-10 ResNet-18, the paper's second setting, sized for a GPU: undefended and InI victims (150 epochs, LR step
# 50, OOD = Tiny ImageNet at 32x32 when present, else CIFAR-100, else skimage patches), KnockoffNets with the
# CIFAR-100 train split as pool (50,000 soft and hard queries), and the perturbation defenses on the undefended
# victim; then `evaluate`. Resumable: finished artifacts are skipped.
#
#   experiments/cifar10.sh [--smoke] [--seeds "0 1 2"] [--device cuda] [--out DIR]
#
# --smoke runs the same chain on CPU in minutes: a 1,000-image slice, 1 epoch, 500 queries. Offline, where
# CIFAR-10 cannot be read, it says so and uses the generated 3x32x32 pool as a stand-in for both sets.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0; SEEDS="0 1 2"; DEVICE=auto; OUT=artifacts/cifar10
source experiments/_cells.sh
parse_options "seeds device out" "$@"

if [ "$SMOKE" = 1 ]; then
    OUT=${OUT}-smoke; SEEDS=0; LIMIT="--limit 1000 --val-size 200"; EPOCHS=1; LR_STEP=1; BUDGET=500; SURROGATE_EPOCHS=1
    SMALL="--batch-size 32"; INI_SMALL="--batch-size 32 --diagnostic-images 64"
else
    LIMIT=""; EPOCHS=150; LR_STEP=50; BUDGET=50000; SURROGATE_EPOCHS=${SURROGATE_EPOCHS:-50}; SMALL=""; INI_SMALL=""
fi
mkdir -p "$OUT/data" "$OUT/victims" "$OUT/stolen" "$OUT/logs"

prepared() {  # prepared NAME [FLAGS...]: prepare once, print the path; "" when the dataset is not available
    local name=$1; shift
    local out=$OUT/data/$name.h5
    [ -e "$out" ] || $PY cli.py prepare --dataset "$name" "$@" $LIMIT --out "$out" > /dev/null 2> "$OUT/logs/prepare-$name.log" \
        || { echo "($name not available: $(tail -n 1 "$OUT/logs/prepare-$name.log"))" >&2; return 0; }
    echo "$out"
}

data=$(prepared cifar10)
pool=$(prepared cifar100)
ood=$(prepared tinyimagenet --size 32 --channels 3)
[ -n "$ood" ] || ood=$pool
[ -n "$ood" ] || ood=$(prepared skimage-patches)
if [ -z "$data" ]; then
    [ "$SMOKE" = 1 ] || { echo "error: CIFAR-10 is needed for the full run" >&2; exit 1; }
    echo "smoke: CIFAR-10 unavailable offline, using the generated pool as victim data" >&2
    data=$(prepared generated)
fi
[ -n "$pool" ] || pool=$(prepared skimage-patches)

run() {  # run OUTPUT ARGS...: one stage unless its output exists
    local output=$1; shift
    [ -e "$output" ] && return 0
    echo "$*" >&2
    $PY cli.py "$@" --out "$output" > /dev/null 2> "$OUT/logs/$(basename "${output%.*}").log" \
        || { echo "failed: $output (see $OUT/logs)" >&2; return 0; }
}

recipe="--arch resnet18 --epochs $EPOCHS --lr-step $LR_STEP --device $DEVICE"
for s in $SEEDS; do
    run "$OUT/victims/undefended-s$s.h5" train --dataset "$data" $recipe $SMALL --seed "$s"
    run "$OUT/victims/ini-s$s.h5" train-ini --dataset "$data" --ood "$ood" $recipe $INI_SMALL --seed "$s"
    for pair in "undefended:none" "undefended:reverse-sigmoid" "undefended:mad" "ini:none"; do
        v=${pair%%:*}; defense=${pair#*:}
        for label in soft hard; do
            run "$OUT/stolen/$v-$defense-s$s-knockoff-$label.h5" steal --victim "$OUT/victims/$v-s$s.h5" \
                --defense "$defense" --attack knockoff --label "$label" --pool "$pool" --budget "$BUDGET" \
                --epochs "$SURROGATE_EPOCHS" --device "$DEVICE" --seed "$s"
        done
    done
done
evaluate_all
