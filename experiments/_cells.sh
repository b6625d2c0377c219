# Shared by the experiment scripts (source it): their options, and resumable cells run side by side.
# The cell functions need OUT (logs go to $OUT/logs) and JOBS; PY is the python that runs cli.py.
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

# parse_options "NAMES" ARGS...: --smoke sets SMOKE=1; --NAME VALUE sets NAME's variable (upper case, - as _) for
# each NAME in NAMES; anything else is a one-line error and exit 2.
parse_options() {
    local allowed=$1 name; shift
    while [ $# -gt 0 ]; do
        name=${1#--}
        if [ "$1" = --smoke ]; then SMOKE=1
        elif [ "$1" = "$name" ] || ! in_list "$name" "$allowed"; then echo "error: unknown option $1" >&2; exit 2
        elif [ $# -lt 2 ]; then echo "error: option $1 needs a value" >&2; exit 2
        else name=${name//-/_}; printf -v "${name^^}" '%s' "$2"; shift
        fi
        shift
    done
}

# run_cells FILE: each line "OUTPUT<TAB>COMMAND"; skip cells whose OUTPUT exists, run the rest JOBS at a time.
# A cell checks again just before it starts, so an output another run (or a copy) made meanwhile is not redone.
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
    printf '%s\t%s\n' "$output" "[ -e $output ] || $PY cli.py $* --out $output > /dev/null 2> $OUT/logs/$(basename "${output%.*}").log || echo \"failed: $output (see $OUT/logs)\" >&2"
}

prepare_all() {  # prepare_all NAME...: each dataset once into OUT/data/NAME.h5 (LIMIT applies), side by side
    local list; list=$(mktemp)
    for name in "$@"; do cell "$OUT/data/$name.h5" prepare --dataset "$name" $LIMIT; done | sort -u > "$list"
    run_cells "$list"; rm -f "$list"
}

knockoff_cell() {  # knockoff_cell STOLEN VICTIM DEFENSE LABEL POOL.h5 EPOCHS SEED: a KnockoffNets cell, BUDGET queries
    cell "$1" steal --victim "$2" --defense "$3" --attack knockoff --label "$4" --pool "$5" --budget "$BUDGET" \
        --epochs "$6" --device cpu --seed "$7"
}

epochs_for() {  # epochs_for POOL.h5: surrogate epochs that give about STEPS steps of batch 128 at BUDGET queries
    $PY -c "import h5py, math, sys; n = min($BUDGET, len(h5py.File(sys.argv[1], 'r')['train/labels']));
print(max(1, math.ceil($STEPS * 128 / n)))" "$1"
}

results_in() {  # results_in DIR: the result files for evaluate (a checkpoint left by an interrupted cell is not one)
    ls "$1"/stolen/*.h5 "$1"/victims/*.h5 | grep -v '\.ckpt\.h5$'
}

evaluate_all() {  # evaluate_all [ARGS...]: every result in OUT into OUT/metrics.h5 and OUT/report; prints the path
    $PY cli.py evaluate $(results_in "$OUT") --out "$OUT/metrics.h5" --report "$OUT/report" "$@"
}

other_family() { [ "$1" = mnist ] && echo fashionmnist || echo mnist; }

in_list() { case " $2 " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }  # in_list WORD "LIST"
