#!/bin/bash
# One one-thread chain training the standard (90-epoch) zoo: takes the first recipe in queue.txt whose base run
# is finished (or that has none), trains and evaluates it with `robustserve run`, logs to logs/run_R.log and times.log.
cd /work/train
export PYTHONPATH=/work/train/src OMP_NUM_THREADS=1
RS=/work/main/.venv/bin/robustserve
PY=/work/main/.venv/bin/python
while true; do
  pick=$(flock queue.lock $PY - <<'PYEOF'
from pathlib import Path
from training.recipes import get_recipe
from training.runs import preset_run_dir, run_finished
queue = Path("queue.txt").read_text().split()
for i, r in enumerate(queue):
    base = get_recipe(r).config("standard").base
    if base is None or run_finished(preset_run_dir(base, "standard", Path("runs"))):
        Path("queue.txt").write_text("".join(q + "\n" for j, q in enumerate(queue) if j != i))
        print(r)
        break
else:
    print("WAIT" if queue else "")
PYEOF
)
  [ -z "$pick" ] && exit 0
  if [ "$pick" = WAIT ]; then sleep 60; continue; fi
  echo "START $1 $pick $(date -u +%FT%TZ)" >> times.log
  $RS run --preset standard --suite cpu --no-serve --runs runs --recipes $pick --results results/RESULTS.$pick.md >> logs/run_$pick.log 2>&1
  echo "END $1 $pick rc=$? $(date -u +%FT%TZ)" >> times.log
done
