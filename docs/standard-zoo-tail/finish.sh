#!/bin/bash
# finish.sh: once all twelve runs are finished and evaluated: RESULTS.md assembled from their stored attack rows (no
# attack runs again; main's code), then every zoo entry replaced by its tailed run. Run alone (two threads).
set -e
cd /work/tail
export OMP_NUM_THREADS=2
echo "START finish $(date -u +%FT%TZ) commit $(git -C /work/main rev-parse --short HEAD)" >> logs/times.log
/work/main/.venv/bin/robustserve run --preset standard --suite cpu --no-serve --runs runs --results RESULTS.md >> logs/run_finish.log 2>&1
echo "RESULTS $(date -u +%FT%TZ)" >> logs/times.log
cd /work/main
.venv/bin/robustserve zoo add /work/tail/runs/*-standard-fashion_mnist-smallcnn --command "robustserve run --preset standard --suite cpu (the 30-epoch runs of docs/standard-zoo-cpu/ continued by the preset's 15-epoch tail, or trained anew where their base's weights changed; one-thread chains on two CPU cores: docs/standard-zoo-tail/)" >> /work/tail/logs/run_finish.log 2>&1
echo "END finish $(date -u +%FT%TZ)" >> /work/tail/logs/times.log
