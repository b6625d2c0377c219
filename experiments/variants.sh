#!/usr/bin/env bash
# The "beyond the paper" train-ini options under attack (issue 3): one InI victim per option, the paper recipe
# otherwise (OOD = the other MNIST-family set), beside the paper recipe itself and the undefended victim, each
# attacked with KnockoffNets on POOLS. Resumable: a cell whose artifact exists is skipped. Then `evaluate` writes
# one report; `python experiments/summarise.py --variants DIR/metrics.h5` pivots it, with each victim's diagnostics.
#
#   experiments/variants.sh [--smoke] [--jobs N] [--seeds "0"] [--datasets mnist] [--out DIR]
#
# VARIANTS (default: all of them, in this order):
#   kl-attacker      --kl-direction attacker: the gradient terms' KL as a soft-label thief trains, KL(p_V||p_C)
#   surrogates-3     --surrogates 3: an ensemble of three frozen random surrogates
#   refresh-reinit   --refresh-every 1 --refresh reinit: new random surrogates every epoch
#   refresh-distill  --refresh-every 1 --refresh distill: surrogates trained briefly on the victim's OOD outputs
#   bn-mixed         --arch lenet5_bn --bn-mode mixed: LeNet-5 with BatchNorm, the official handling
#   bn-joint         --arch lenet5_bn --bn-mode joint: ID and OOD in one forward
# The bn-* victims are compared with an undefended LeNet-5-BN victim, the others with the plain LeNet-5 ones.
# Reductions from the environment, as in lofo.sh: VICTIM_EPOCHS (50), LR_STEP (20), BUDGET (50000), STEPS (7800
# surrogate SGD steps per cell), POOLS (sklearn-digits fashionmnist: the pool that leaks most from the paper recipe,
# then the one it trained on), LABELS (soft hard), COMPILE (off: every victim eager, so the options differ from
# the reference in nothing else; auto compiles the long runs).
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0; JOBS=2; SEEDS=0; DATASETS=mnist; OUT=artifacts/variants
source experiments/_cells.sh
parse_options "jobs seeds datasets out" "$@"

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # one thread a cell: cells run side by side instead
if [ "$SMOKE" = 1 ]; then
    LIMIT="--limit 600 --val-size 100"; VICTIM_EPOCHS=1; LR_STEP=1; STEPS=3; BUDGET=300; SEEDS=0; DATASETS=mnist
    OUT=${OUT}-smoke; SMALL="--diagnostic-images 64 --refresh-steps 2"; POOLS=${POOLS-sklearn-digits}
    LABELS=${LABELS-soft}
else
    LIMIT=""; VICTIM_EPOCHS=${VICTIM_EPOCHS:-50}; LR_STEP=${LR_STEP:-20}; STEPS=${STEPS:-7800}
    BUDGET=${BUDGET:-50000}; SMALL=""
fi
VARIANTS=${VARIANTS-kl-attacker surrogates-3 refresh-reinit refresh-distill bn-mixed bn-joint}
POOLS=${POOLS-sklearn-digits fashionmnist}; LABELS=${LABELS-soft hard}; COMPILE=${COMPILE:-off}

flags_of() {  # flags_of VARIANT: its train-ini options
    case $1 in
        kl-attacker) echo "--kl-direction attacker" ;;
        surrogates-3) echo "--surrogates 3" ;;
        refresh-reinit) echo "--refresh-every 1 --refresh reinit" ;;
        refresh-distill) echo "--refresh-every 1 --refresh distill" ;;
        bn-mixed) echo "--arch lenet5_bn --bn-mode mixed" ;;
        bn-joint) echo "--arch lenet5_bn --bn-mode joint" ;;
        *) echo "error: unknown variant $1" >&2; return 2 ;;
    esac
}
for v in $VARIANTS; do flags_of "$v" > /dev/null; done  # an unknown name fails before any work

mkdir -p "$OUT/data" "$OUT/victims" "$OUT/stolen" "$OUT/logs"

prepare_all $DATASETS $(for d in $DATASETS; do other_family "$d"; done) $POOLS
declare -A epochs
for name in $POOLS; do epochs[$name]=$(epochs_for "$OUT/data/$name.h5"); done

recipe="--epochs $VICTIM_EPOCHS --lr-step $LR_STEP --device cpu"
victims="undefended faithful"  # the references, then the options
case " $VARIANTS " in *" bn-"*) victims="$victims undefended-bn" ;; esac
for v in $VARIANTS; do victims="$victims ini-$v"; done
cells=$(mktemp)
for s in $SEEDS; do
    : > "$cells"
    for d in $DATASETS; do
        data=$OUT/data/$d.h5; ood=$OUT/data/$(other_family "$d").h5
        cell "$OUT/victims/$d-undefended-s$s.h5" train --dataset "$data" $recipe --seed "$s" >> "$cells"
        in_list undefended-bn "$victims" && cell "$OUT/victims/$d-undefended-bn-s$s.h5" train --arch lenet5_bn \
            --dataset "$data" $recipe --seed "$s" >> "$cells"
        cell "$OUT/victims/$d-faithful-s$s.h5" train-ini --dataset "$data" --ood "$ood" --compile "$COMPILE" \
            $recipe $SMALL --seed "$s" >> "$cells"
        for v in $VARIANTS; do
            cell "$OUT/victims/$d-ini-$v-s$s.h5" train-ini --dataset "$data" --ood "$ood" $(flags_of "$v") \
                --compile "$COMPILE" $recipe $SMALL --seed "$s" >> "$cells"
        done
    done
    run_cells "$cells"

    : > "$cells"  # the leakiest pool first, soft before hard: an interrupted run holds the headline column
    for pool in $POOLS; do
        for label in $LABELS; do
            for d in $DATASETS; do
                for v in $victims; do
                    knockoff_cell "$OUT/stolen/$d-$v-s$s-knockoff-$label-$pool.h5" "$OUT/victims/$d-$v-s$s.h5" none \
                        "$label" "$OUT/data/$pool.h5" "${epochs[$pool]}" "$s" >> "$cells"
                done
            done
        done
    done
    run_cells "$cells"
done
rm -f "$cells"

evaluate_all
