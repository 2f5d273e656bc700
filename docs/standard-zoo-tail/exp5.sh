#!/bin/bash
# exp5.sh NAME: one of two one-thread workers (two one-thread jobs do 1.5x the steps of one two-thread job on this
# 2-core EPYC) that take jobs from queue5.txt until it is empty: the rest of exp4 (trades, 60 cosine + 30 tail), and
# act, mart, consistency_at, that continued from their 60-epoch runs in runs/ to 90 (30 cosine + 60 tail), in copies
# in runs90/ as exp3.sh did for pgd_at and trades. A job cut by a session's end is resumed by running both workers
# again after putting its name back at the head of the queue (each worker logs what it took in times.log).
cd /work/tail-exp
export OMP_NUM_THREADS=${THREADS:-1}
while true; do
  job=$(flock queue5.lock sh -c 'j=$(head -n1 queue5.txt); [ -n "$j" ] && sed -i 1d queue5.txt; echo "$j"')
  [ -z "$job" ] && break
  echo "START5 $1 $job $(date -u +%FT%TZ) commit $(git -C /work/main rev-parse --short HEAD) threads $OMP_NUM_THREADS" >> times.log
  if [ "$job" = trades-a60 ]; then
    args="trades --preset standard --epochs 90 --set tail_epochs=30 --out runs-anneal60/trades-standard-fashion_mnist-smallcnn"
  else
    src=runs/$job-standard-fashion_mnist-smallcnn dst=runs90/$job-standard-fashion_mnist-smallcnn
    [ -d $dst ] || cp -a $src $dst
    args="$job --preset standard --epochs 90 --set tail_epochs=60 --out $dst"
  fi
  /work/main/.venv/bin/robustserve train $args --resume --no-progress >> exp5-$job.log 2>&1
  echo "END5 $1 $job $(date -u +%FT%TZ) rc=$?" >> times.log
done
