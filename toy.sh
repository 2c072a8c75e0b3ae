#!/usr/bin/env bash
# The toy-scale reproduction: the baseline and every growth regime on Tiny Shakespeare, each given
# the FLOPs the baseline spends in $BUDGET steps, same data, same seed; then the figure and table.
#
#   bash toy.sh [OUT] [extra train.py flags ...]      # about 45 minutes on 2 CPU cores
#
# Extra flags go to every run (the test suite shrinks the model and data with them).
set -euo pipefail
out=${1:-out/toy}
shift || true
budget=${BUDGET:-100}  # steps of the tiny preset: 410k tokens, 1.3 epochs of Tiny Shakespeare

run() {  # run NAME [regime flags ...]: a fresh run, so the log holds this run only
  local name=$1
  shift
  rm -rf "${out:?}/$name"
  python train.py --preset tiny --out "$out/$name" --budget-steps "$budget" --inc-steps "$budget" "$@" "${extra[@]}"
}

extra=("$@")
run baseline
run inc2-freeze --stages 2 --phase1-mode freeze
run inc2-isolate --stages 2 --phase1-mode isolate
run inc4-freeze --stages 4 --phase1-mode freeze
run inc4-isolate --stages 4 --phase1-mode isolate
run inc4-copy-top --stages 4 --grow-op copy-top
run apollo --regime apollo
run stack --regime stack
run gstack --regime gstack
run msg --regime msg
run zero --regime zero
runs=(baseline inc2-freeze inc2-isolate inc4-freeze inc4-isolate inc4-copy-top apollo stack gstack msg zero)
python plot.py "${runs[@]/#/$out/}" --out "$out/toy.png"
python plot.py "${runs[@]/#/$out/}" --table > "$out/table.md"
cat "$out/table.md"
