"""The main job (`robustserve run`, `make run`): runs in, served models out.

Two ways in: train and evaluate every recipe of a preset into a runs folder, reusing finished runs
and stored attack rows (``train_and_evaluate``, then ``write_results``), or take the committed model
zoo as it is (``zoo_runs``). Either way ``serve_runs`` packages the runs and (re)starts TorchServe
over them. The command line (``serving.cli``) parses options, calls these and opens the demo.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from training.config import LENGTH_OF_TRAINING, TrainConfig
from training.errors import CheckpointError, ConfigError

# Settings that say where and how a run was read, not what it learnt.
WHERE_IT_RAN = frozenset({"device", "workers", "data_root", "download"})


def train_and_evaluate(recipe_ids: Sequence[str], preset: str, runs_root: Path,
                       suite: Mapping[str, Any]) -> tuple[list[Path], list[dict[str, Any]]]:
    """Train each recipe's ``preset`` run into ``runs_root`` unless it is finished (resuming an
    interrupted one), evaluate it with ``suite`` (``evaluate_run``'s settings; stored attack rows are
    read back) and return the run folders and their reports."""
    from training.engine import train
    from training.evaluate import evaluate_run
    from training.recipes import get_recipe
    from training.runs import LAST, base_changed, read_defense_json, run_dir_for, run_finished

    run_dirs, reports = [], []
    for recipe_id in recipe_ids:
        config = get_recipe(recipe_id).config(preset)
        run_dir = run_dir_for(config, runs_root)
        if not run_finished(run_dir):
            print(f"== {recipe_id}: training into {run_dir}", flush=True)
            train(config, run_dir, resume=True, runs_root=runs_root)
        elif base_changed(run_dir):  # trained on weights its base no longer serves: stale, whatever it cost
            print(f"== {recipe_id}: training anew into {run_dir}: its base run has changed since it was trained", flush=True)
            train(config, run_dir, force=True, runs_root=runs_root)
        else:
            print(f"== {recipe_id}: reusing {run_dir}", flush=True)
            # A finished run is kept whatever it cost; when the preset has only lengthened it, it is continued
            # where that is exact, else the change is named.
            changed = config.changed_settings(TrainConfig(**read_defense_json(run_dir)["config"]), ignore=WHERE_IT_RAN)
            why_kept = f"it was trained with other {', '.join(changed)} than the {preset} preset now gives"
            if changed and set(changed) <= LENGTH_OF_TRAINING:
                # Without its last epoch's checkpoint (a zoo entry has none) the engine would start the run over,
                # in place of the finished one: the run is kept and the note says why.
                if not (run_dir / LAST).exists():
                    why_kept += f", and it has no {LAST} to continue from"
                else:
                    print(f"   the {preset} preset now trains it for longer: continuing it", flush=True)
                    try:
                        train(config, run_dir, resume=True, runs_root=runs_root)
                        changed = []
                    except CheckpointError as err:
                        why_kept = str(err)
            if changed:
                print(f"   note: {why_kept}; move {run_dir} away and run again to train it anew", flush=True)
        reports.append(evaluate_run(run_dir, **suite, progress=True))
        run_dirs.append(run_dir)
    return run_dirs, reports


def write_results(reports: Sequence[dict[str, Any]], preset: str, path: Path, suite: str,
                  suite_note: str | None = None) -> str:
    """RESULTS.md from the reports: the command, the machine, the attack suite (``suite_note``: what sets a
    reduced one apart) and the table, and beyond the quick pipeline check the reproduction table of each
    paper's claims. Returns the text after the header."""
    from training.checkpoint import write_text
    from training.environment import describe_environment
    from training.evaluate import format_results_table, results_header
    from training.recipes import RECIPES
    from training.reproduction import REPRODUCTION_NOTE, format_reproduction_table

    table = format_results_table(reports, references={r.id: r.reference for r in RECIPES.values() if r.reference})
    if preset != "quick":
        table += f"\n## Reproduction of each paper's claims\n\n{REPRODUCTION_NOTE}\n\n{format_reproduction_table(reports)}"
    env = describe_environment()
    header = (f"# Results ({preset} preset)\n\nMade by `robustserve run --preset {preset} --suite {suite}` on "
              f"{env['device_name']}, {env['torch_threads']} torch threads, torch {env['torch']}, "
              f"{datetime.now(timezone.utc):%Y-%m-%d}. " + results_header(reports) + "\n\n" +
              (f"{suite_note}\n\n" if suite_note else ""))
    write_text(path, header + table + "\n")
    return table


def zoo_runs(zoo_root: Path, recipe_ids: Sequence[str]) -> list[Path]:
    """The zoo's entries (``training.zoo``) of ``recipe_ids``."""
    from training.zoo import entries

    found = entries(zoo_root)
    missing = [r for r in recipe_ids if r not in found]
    if missing:
        raise ConfigError(f"the model zoo in {zoo_root} has no {', '.join(missing)} (it has {', '.join(found) or 'none'}); "
                          f"train them with `robustserve run --preset standard` and add them (`robustserve zoo add`)")
    return [found[r] for r in recipe_ids]


def serve_runs(run_dirs: Sequence[Path], model_store: Path) -> Path:
    """Package every run, (re)start TorchServe over the store, print a curl example per behaviour and
    return the server's state folder."""
    from serving import server
    from serving.client import curl_examples, write_example_image
    from serving.package import package_run

    models = []
    for run_dir in run_dirs:
        names = [archive.stem for archive in package_run(run_dir, model_store=model_store)]
        print(f"== packaged {run_dir} as {', '.join(names)}", flush=True)
        models += names
    settings = server.ServerSettings(model_store=model_store, models=tuple(f"{m}.mar" for m in models))
    if server.stop(settings):
        print("== stopped the TorchServe that was running from this folder", flush=True)
    state = server.start(settings)
    image = write_example_image(run_dirs[0], settings.state_dir.absolute() / "example.png")
    print(f"== TorchServe is serving {', '.join(state.models)} on {state.inference_address} (127.0.0.1 only; the API "
          f"keys are in {state.key_file}; `robustserve serve stop` stops it). Try:")
    print("\n".join(curl_examples(state.inference_address, state.key_file, image, models)))
    return settings.state_dir
