#!/bin/bash
# launch.sh <seconds>: start zoo_gpu.sh detached (unless it runs already), wait until it is done, a step failed, or
# <seconds> passed, then pack the logs and runs into $OUT (the unfinished runs' last.safetensors too, for resuming).
cd "$(dirname "$0")/.."
deadline=$(( $(date +%s) + ${1:-540} ))
mkdir -p logs
pgrep -f zoo_gpu.sh > /dev/null || [ -f logs/DONE ] || setsid nohup bash .gpu/zoo_gpu.sh > logs/zoo_gpu.out 2>&1 &
sleep 5
while [ $(date +%s) -lt $deadline ] && [ ! -f logs/DONE ]; do
  if grep -q "rc=[1-9]" logs/done.log 2>/dev/null; then echo "A STEP FAILED"; break; fi
  sleep 5
done
cat logs/done.log logs/times.log 2>/dev/null; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv 2>/dev/null
for f in logs/train-*.log logs/eval-*.log; do echo "== $f"; tail -c 1500 $f; done 2>/dev/null | tail -c 6000
keep=()
for d in runs/*/; do
  [ -d "$d" ] || continue
  if grep -q '"finished": true' "$d/defense.json" 2>/dev/null; then keep+=(--exclude="$d""last.safetensors"); fi
done
tar czf $OUT/pack.tgz "${keep[@]}" --exclude='memory_bank.safetensors' logs runs $( [ -f RESULTS.gpu.md ] && echo RESULTS.gpu.md ) 2>&1 | tail -3
cd $OUT && split -b 15M pack.tgz pack.tgz.part- && rm pack.tgz && ls -la
