#!/bin/bash
# The tail doubled (30 cosine + 30 at a tenth of the lr) for the runs whose fitted line still rose a point over the
# 45-epoch preset's tail, continued from their 45-epoch runs. One thread beside the tail job's last run.
cd /work/tail-exp
export OMP_NUM_THREADS=${THREADS:-1}
for r in ${RECIPES:-trades mart consistency_at that}; do
  echo "START $r $(date -u +%FT%TZ) commit $(git -C /work/main rev-parse --short HEAD)" >> times.log
  /work/main/.venv/bin/robustserve train $r --preset standard --epochs 60 --set tail_epochs=30 --out runs/$r-standard-fashion_mnist-smallcnn --resume --no-progress >> exp.log 2>&1
  echo "END $r $(date -u +%FT%TZ) rc=$?" >> times.log
done
