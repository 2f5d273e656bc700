#!/bin/bash
# The tail doubled (30 cosine + 30 at a tenth of the lr) for pgd_at and act, continued from their 45-epoch runs:
# does the slow rise of the tail (~1 point per 15 epochs on the fitted line) flatten? One thread beside trades_ft.
cd /work/tail-exp
export OMP_NUM_THREADS=1
for r in pgd_at act; do
  echo "START $r $(date -u +%FT%TZ) commit $(git -C /work/main rev-parse --short HEAD)" >> times.log
  /work/main/.venv/bin/robustserve train $r --preset standard --epochs 60 --set tail_epochs=30 --out runs/$r-standard-fashion_mnist-smallcnn --resume --no-progress >> exp.log 2>&1
  echo "END $r $(date -u +%FT%TZ) rc=$?" >> times.log
done
