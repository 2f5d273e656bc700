#!/bin/bash
# worker.sh NAME RECIPES: one of two `robustserve run` chains of the tail job side by side, one thread each (two
# one-thread jobs do 1.5x the PGD-AT steps of one two-thread job on this 2-core EPYC); a chain holds each run's
# bases. A later session resumes by running the same command again. THREADS=2 gives a chain both cores once it
# runs alone.
cd /work/tail
export PYTHONPATH=/work/tail/src OMP_NUM_THREADS=${THREADS:-1}
echo "START $1 $(date -u +%FT%TZ) commit $(git -C src rev-parse --short HEAD) recipes $2 threads $OMP_NUM_THREADS nproc $(nproc)" >> logs/times.log
/work/main/.venv/bin/robustserve run --preset standard --suite cpu --no-serve --runs runs --recipes "$2" --results RESULTS.$1.md >> logs/run_$1.log 2>&1
echo "END $1 $(date -u +%FT%TZ) rc=$?" >> logs/times.log
