#!/bin/bash
# The standard zoo on the device: every recipe's `robustserve train --preset standard`, independent ones concurrently
# (a SmallCNN leaves the GPU mostly idle), each followed by its `robustserve eval --suite cpu`; then one
# `robustserve run --preset standard --suite cpu --no-serve`, which reuses all of it and writes the results.
# Env: EXTRA_TRAIN / EXTRA_EVAL (a dry run on the CPU). A second start resumes what the first left.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:$PWD/.gpu/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export ROBUSTSERVE_FASHION_MNIST_SOURCE=$PWD/.gpu/fmnist
mkdir -p logs
T0=$(date +%s)
echo "START $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null) $(nvidia-smi -L 2>/dev/null | head -1)" >> logs/times.log
rs() { python3 .gpu/rs.py "$@"; }
step() {  # step <recipe>: train (resuming an interrupted run), then evaluate; one line per step in logs/done.log
  local r=$1 rc d=runs/$1-standard-fashion_mnist-smallcnn
  if ! grep -q '"finished": true' $d/defense.json 2>/dev/null; then
    rs train $r --preset standard --no-progress $( [ -d $d ] && echo --resume --out $d ) $EXTRA_TRAIN > logs/train-$r.log 2>&1
    rc=$?; echo "train $r rc=$rc t=$(( $(date +%s) - T0 ))s" >> logs/done.log; [ $rc = 0 ] || return $rc
  fi
  if [ ! -f $d/report.json ]; then
    rs eval $d --suite cpu $EXTRA_EVAL > logs/eval-$r.log 2>&1
    rc=$?; echo "eval $r rc=$rc t=$(( $(date +%s) - T0 ))s" >> logs/done.log; return $rc
  fi
}
( step natural && step aft_dra ) &
( step pgd_at && { step ducat & step pgd_at_ft & wait; } ) &
( step trades && { step dhat & step trades_ft & wait; } ) &
step act & step that & step mart & step consistency_at &
wait
echo "TRAINED+EVALUATED t=$(( $(date +%s) - T0 ))s" >> logs/done.log
rs run --preset standard --suite cpu --no-serve --runs runs --results RESULTS.gpu.md $EXTRA_EVAL > logs/run.log 2>&1
echo "RUN rc=$? t=$(( $(date +%s) - T0 ))s" >> logs/done.log
echo "END $(date -u +%FT%TZ) $(( $(date +%s) - T0 ))s" >> logs/times.log
touch logs/DONE
