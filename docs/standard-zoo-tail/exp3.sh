#!/bin/bash
# Does the tail's drift stop? The 60-epoch runs (30 cosine + 30 at a tenth of the lr) continued to 90 epochs
# (tail 60), in copies so that the 60-epoch folders stay the record of docs/standard-zoo-tail/. Two threads, alone.
cd /work/tail-exp
export OMP_NUM_THREADS=${THREADS:-2}
for r in ${RECIPES:-pgd_at trades}; do
  src=runs/$r-standard-fashion_mnist-smallcnn dst=runs90/$r-standard-fashion_mnist-smallcnn
  [ -d $dst ] || cp -a $src $dst
  echo "START90 $r $(date -u +%FT%TZ) commit $(git -C /work/main rev-parse --short HEAD)" >> times.log
  /work/main/.venv/bin/robustserve train $r --preset standard --epochs 90 --set tail_epochs=60 --out $dst --resume --no-progress >> exp3.log 2>&1
  echo "END90 $r $(date -u +%FT%TZ) rc=$?" >> times.log
done
