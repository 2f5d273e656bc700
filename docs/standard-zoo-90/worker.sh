#!/bin/bash
# One one-thread chain training the standard (90-epoch) zoo: takes the first recipe in queue.txt whose base run
# and compared runs are finished (or that has none), trains and evaluates it with `robustserve run`, logs to
# logs/run_R.log and times.log. The compared runs count because `run` trains the runs a recipe's claims compare with
# (ACT's trades and pgd_at, DH-AT's trades_ft, ...): without the wait, two chains could train one run folder at once.
cd /work/train
export PYTHONPATH=/work/train/src OMP_NUM_THREADS=1
RS=/work/main/.venv/bin/robustserve
PY=/work/main/.venv/bin/python
while true; do
  pick=$(flock queue.lock $PY - <<'PYEOF'
from pathlib import Path
from training.recipes import get_recipe
from training.reproduction import compared_recipes
from training.runs import preset_run_dir, run_finished
queue = Path("queue.txt").read_text().split()
for i, r in enumerate(queue):
    needed = [b for b in [get_recipe(r).config("standard").base] if b] + compared_recipes([r])
    if all(run_finished(preset_run_dir(n, "standard", Path("runs"))) for n in needed):
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
