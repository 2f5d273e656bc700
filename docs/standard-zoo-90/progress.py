"""Where the 90-epoch standard runs stand: one markdown row per run folder (epochs done of each stage, the last
epoch's validation clean / PGD-10 accuracy, the means over the last 15 epochs, the convergence rule's verdict once
the run is finished, own training minutes, the median seconds of the last stage's epochs (an epoch during which the
chains were paused counts the pause; the median does not) and the devices).

    PYTHONPATH=. python docs/standard-zoo-90/progress.py model_store/standard-runs
"""

from __future__ import annotations

import sys
from pathlib import Path
from statistics import fmean, median

from training.recipes import get_recipe
from training.run_files import read_defense_json
from training.runs import VALIDATION_KEYS, base_config, describe_rise, train_seconds, trained_on, validation_rise

BLOCK = 15  # epochs per mean: one epoch's figure on 1,000 validation images moves by 0.5-1 point from the next


def clean_and_pgd(epochs: list[dict]) -> str:
    """The mean validation clean / PGD-10 accuracy of ``epochs``, in points."""
    return " / ".join(f"{100 * fmean(e[key] for e in epochs):.1f}" for key in VALIDATION_KEYS)


def row(run_dir: Path) -> str:
    info = read_defense_json(run_dir)
    planned = get_recipe(info["defense"]).config(info["preset"])
    # A stage the run took over from its base (it records the base's "run") was planned by the base's settings.
    done_of_planned = [(stage["name"], len(stage["history"]),
                        (base_config(planned) if "run" in stage else planned).for_stage(stage["name"]).epochs)
                       for stage in info["stages"]]
    stages = [f"{name} {done}/{epochs}" for name, done, epochs in done_of_planned]
    history = [stage for stage in info["stages"] if stage["history"]][-1]["history"]
    block = history[-BLOCK:]
    end, means = clean_and_pgd(history[-1:]), f"{clean_and_pgd(block)} ({block[0]['epoch']}-{block[-1]['epoch']})"
    # A run finished under an earlier, shorter plan (THAT's 90-epoch robust stage, now 120) is training again.
    complete = info.get("finished") and all(done >= epochs for _, done, epochs in done_of_planned)
    verdict = describe_rise(validation_rise(info)) if complete else "training"
    return (f"| {info['defense']} | {', '.join(stages)} | {end} | {means} | {verdict} | "
            f"{train_seconds(info) / 60:.1f} | {median(e['seconds'] for e in history):.0f} | {', '.join(trained_on(info))} |")


def main(folder: str) -> None:
    print("| run | epochs done | last epoch: val clean / PGD-10 | mean of the last 15 | rule | own min | s/epoch | device |")
    print("|---|---|---|---|---|---|---|---|")
    for run_dir in sorted(Path(folder).glob("*-standard-*")):
        if (run_dir / "defense.json").is_file():  # written after the first epoch
            print(row(run_dir))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "model_store/standard-runs")
