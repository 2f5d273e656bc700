#!/bin/bash
# TRADES with a longer anneal: 60 cosine epochs at lr 0.01, then 30 at a tenth (90 in all, the budget of the
# 30 + 60 runs in runs90/). At 30 + 60 trades still rose (+0.6 / +1.3 over epochs 61-90), while trades_ft, a second
# 36-epoch cosine at 0.01 on the 45-epoch trades, went flat at 83.2 / 73.5: is it the anneal TRADES lacks?
# From nothing; resumes (--resume) where a session's end cut it. Two threads, alone.
cd /work/tail-exp
export OMP_NUM_THREADS=${THREADS:-2}
for r in ${RECIPES:-trades}; do
  echo "START-A60 $r $(date -u +%FT%TZ) commit $(git -C /work/main rev-parse --short HEAD)" >> times.log
  /work/main/.venv/bin/robustserve train $r --preset standard --epochs 90 --set tail_epochs=30 --out runs-anneal60/$r-standard-fashion_mnist-smallcnn --resume --no-progress >> exp4.log 2>&1
  echo "END-A60 $r $(date -u +%FT%TZ) rc=$?" >> times.log
done
