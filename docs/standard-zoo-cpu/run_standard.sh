#!/bin/bash
# `robustserve run --preset standard` from nothing, at a fixed commit (the worktree src/), as one job; a later
# session resumes it by running this again (run reuses finished runs and resumes an interrupted one).
cd /work/fromnothing
export PYTHONPATH=/work/fromnothing/src OMP_NUM_THREADS=2
echo "START $(date -u +%FT%TZ) commit $(git -C src rev-parse --short HEAD) host $(hostname) cpu $(lscpu | sed -n 's/Model name: *//p') nproc $(nproc)" >> logs/times.log
/work/main/.venv/bin/robustserve run --preset standard --suite cpu --no-serve --runs runs --results RESULTS.fromnothing.md >> logs/run_standard.log 2>&1
echo "END $(date -u +%FT%TZ) rc=$?" >> logs/times.log
