#!/usr/bin/env bash
# Leave-one-family-out (issue 7): does InI's induction hold against attacker pools the defense never saw?
# For each pool family, an InI victim is trained with that family left out of its OOD data (--preset, default
# broad) and attacked with it: KnockoffNets, soft and hard labels. Beside it, the same attacks on the undefended
# victim and on the paper's recipe (faithful InI, OOD = the other MNIST-family set), and on the perturbation
# baselines: each defense of BASELINES wrapped around the undefended victim, adaptive misinformation around its
# own victim (outlier exposure on the other MNIST-family set; file names as in experiments/grid.sh). Families the
# preset never trains on (sklearn-digits for an MNIST victim: same task) attack the victim trained on all the
# others. Resumable: a cell whose artifact exists is skipped. Then `evaluate` writes one report.
#
#   experiments/lofo.sh [--smoke] [--jobs N] [--seeds "0 1 2"] [--datasets "mnist fashionmnist"] [--preset broad]
#                       [--out DIR]
#
# Reductions from the environment, each to be stated with the results: VICTIM_EPOCHS (50), LR_STEP (20),
# BUDGET (50000; knockoff asks at most one query per pool image), STEPS (7800: the surrogate's SGD steps, so the
# epochs are STEPS x 128 / transfer-set size: 20 epochs at 50,000 queries, more for a small pool), REFERENCE_SEEDS
# (every seed: the seeds whose paper-recipe victim is trained and whose undefended and paper-recipe victims are
# attacked; the undefended victim of every seed is still trained, as the benign-accuracy bar), BASELINES (the
# perturbation defenses; smoke: two of them) and BASELINE_SEEDS (default REFERENCE_SEEDS).
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0; JOBS=2; SEEDS="0 1 2"; DATASETS="mnist fashionmnist"; PRESET=broad; OUT=artifacts/lofo
source experiments/_cells.sh
parse_options "jobs seeds datasets preset out" "$@"

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # one thread a cell: cells run side by side instead
FAMILIES="sklearn-digits skimage-patches generated"  # besides the other MNIST-family set
if [ "$SMOKE" = 1 ]; then
    LIMIT="--limit 600 --val-size 100"; VICTIM_EPOCHS=1; LR_STEP=1; STEPS=3; BUDGET=300
    SEEDS=0; DATASETS=mnist; OUT=${OUT}-smoke; SMALL="--diagnostic-images 64"
    BASELINES=${BASELINES-reverse-sigmoid adaptive-misinformation}
else
    LIMIT=""; VICTIM_EPOCHS=${VICTIM_EPOCHS:-50}; LR_STEP=${LR_STEP:-20}; STEPS=${STEPS:-7800}
    BUDGET=${BUDGET:-50000}; SMALL=""
fi
REFERENCE_SEEDS=${REFERENCE_SEEDS-$SEEDS}
BASELINES=${BASELINES-reverse-sigmoid mad mad-argmax top1 grad2 adaptive-misinformation}
BASELINE_SEEDS=${BASELINE_SEEDS-$REFERENCE_SEEDS}
references_for() { in_list "$1" "$REFERENCE_SEEDS"; }
baselines_for() { in_list "$1" "$BASELINE_SEEDS" && [ -n "$BASELINES" ]; }
mkdir -p "$OUT/data" "$OUT/victims" "$OUT/stolen" "$OUT/logs"

same_task() { [ "$1" = mnist ] && [ "$2" = sklearn-digits ]; }  # digits: a defense should answer them

prepare_all mnist fashionmnist $FAMILIES
cells=$(mktemp)
declare -A epochs  # surrogate epochs per pool, read once
for name in mnist fashionmnist $FAMILIES; do epochs[$name]=$(epochs_for "$OUT/data/$name.h5"); done

recipe="--epochs $VICTIM_EPOCHS --lr-step $LR_STEP --device cpu"
for s in $SEEDS; do
    : > "$cells"
    for d in $DATASETS; do
        data=$OUT/data/$d.h5; pools="$(other_family "$d") $FAMILIES"
        trainable=""; for p in $pools; do same_task "$d" "$p" || trainable="$trainable $p"; done
        cell "$OUT/victims/$d-undefended-s$s.h5" train --dataset "$data" $recipe --seed "$s" >> "$cells"
        references_for "$s" && cell "$OUT/victims/$d-faithful-s$s.h5" train-ini --dataset "$data" \
            --ood "$OUT/data/$(other_family "$d").h5" $recipe $SMALL --seed "$s" >> "$cells"
        baselines_for "$s" && in_list adaptive-misinformation "$BASELINES" && cell "$OUT/victims/$d-am-s$s.h5" train \
            --objective outlier-exposure --dataset "$data" --ood "$OUT/data/$(other_family "$d").h5" $recipe \
            --seed "$s" >> "$cells"
        for held in $pools all; do
            ood=""; for p in $trainable; do [ "$p" = "$held" ] || ood="$ood,$OUT/data/$p.h5"; done
            [ "$held" = all ] && { [ "$(echo $trainable | wc -w)" = "$(echo $pools | wc -w)" ] && continue; }
            same_task "$d" "$held" && continue  # attacked by the victim trained on all trainable families
            name=$PRESET-no-$held; [ "$held" = all ] && name=$PRESET-all
            cell "$OUT/victims/$d-$name-s$s.h5" train-ini --dataset "$data" --preset "$PRESET" \
                --ood "${ood#,}" $recipe $SMALL --seed "$s" >> "$cells"
        done
    done
    run_cells "$cells"

    : > "$cells"
    # The preset's cells first, soft before hard (the headline), then the undefended and paper-recipe references,
    # then the perturbation baselines: an interrupted run holds the columns the claim rests on.
    groups=preset; references_for "$s" && groups="$groups references"; baselines_for "$s" && groups="$groups baselines"
    for group in $groups; do
        for label in soft hard; do
            for d in $DATASETS; do
                for pool in $(other_family "$d") $FAMILIES; do
                    case $group in  # victim:defense pairs
                        preset) pairs=$PRESET-no-$pool:none; same_task "$d" "$pool" && pairs=$PRESET-all:none ;;
                        references) pairs="undefended:none faithful:none" ;;
                        baselines) pairs=""; for b in $BASELINES; do
                                [ "$b" = adaptive-misinformation ] && pairs="$pairs am:$b" || pairs="$pairs undefended:$b"
                            done ;;
                    esac
                    for pair in $pairs; do
                        v=${pair%%:*}; defense=${pair#*:}; name=$d-$v-s$s; [ "$defense" = none ] || name=$d-$v-$defense-s$s
                        [ "$defense" = top1 ] && [ "$label" = soft ] && continue  # top1 answers labels only
                        knockoff_cell "$OUT/stolen/$name-knockoff-$label-$pool.h5" "$OUT/victims/$d-$v-s$s.h5" \
                            "$defense" "$label" "$OUT/data/$pool.h5" "${epochs[$pool]}" "$s" >> "$cells"
                    done
                done
            done
        done
    done
    run_cells "$cells"
done
rm -f "$cells"

evaluate_all
