#!/bin/bash
# The standard preset with its 15-epoch tail: the 30-epoch job's runs (docs/standard-zoo-cpu/) continued where that is
# exact, the runs built on them trained anew where their base changed; a later session resumes by running this again.
cd /work/tail
export PYTHONPATH=/work/tail/src OMP_NUM_THREADS=2
echo "START $(date -u +%FT%TZ) commit $(git -C src rev-parse --short HEAD) host $(hostname) cpu $(lscpu | sed -n 's/Model name: *//p') nproc $(nproc)" >> logs/times.log
/work/main/.venv/bin/robustserve run --preset standard --suite cpu --no-serve --runs runs --results RESULTS.tail.md >> logs/run_tail.log 2>&1
echo "END $(date -u +%FT%TZ) rc=$?" >> logs/times.log
