# Shared by the experiment scripts (source it): resumable cells run side by side.
# Needs PY (the python to run cli.py with), OUT (logs go to $OUT/logs) and JOBS.

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

results_in() {  # results_in DIR: the result files for evaluate (a checkpoint left by an interrupted cell is not one)
    ls "$1"/stolen/*.h5 "$1"/victims/*.h5 | grep -v '\.ckpt\.h5$'
}

other_family() { [ "$1" = mnist ] && echo fashionmnist || echo mnist; }

in_list() { case " $2 " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }  # in_list WORD "LIST"
