"""The ``robustserve`` command line: one registry of subcommands, one place that turns errors into one line.

Most heavy imports happen inside the commands; building the parser imports the modules whose defaults the
``package``, ``serve`` and ``bench`` options show (``serving.package`` brings torch and ``cryptography`` with it), so
``--help`` takes as long as importing torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from training.errors import USER_ERRORS, ConfigError

Handler = Callable[[argparse.Namespace], int]


@dataclass
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Handler


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    def decorator(run: Handler) -> Handler:
        COMMANDS[name] = Command(name, help, configure, run)
        return run

    return decorator


def _parse_value(text: str):
    """``--set`` values: JSON when it parses (numbers, lists, true/false/null), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _float_list(text: str) -> list[float]:
    """``--sweep 0,0.05,0.1``: comma-separated floats."""
    return [float(v) for v in text.split(",")]


# ---------------------------------------------------------------------------------------------- list


@command("list", "list architectures, recipes with their presets, datasets and attacks")
def cmd_list(args: argparse.Namespace) -> int:
    from training.attacks import ATTACKS
    from training.data import DATASETS
    from training.models import ARCHITECTURES
    from training.recipes import RECIPES

    print("architectures:")
    for info in ARCHITECTURES.values():
        print(f"  {info.name:<16} {info.input_size:>3}px  {info.description}")
    print("recipes [presets] (serving modes; the runs they start from):")
    for recipe in RECIPES.values():
        starts = f"; starts from {' or '.join(recipe.bases)}" if recipe.bases else ""
        print(f"  {recipe.id:<16} [{', '.join(recipe.presets)}] ({', '.join(recipe.serving_modes)}{starts})  "
              f"{recipe.description}")
    print("datasets:")
    for info in DATASETS.values():
        print(f"  {info.name:<16} {info.description}")
    print("attacks:")
    for name, cls in ATTACKS.items():
        print(f"  {name:<16} {'white-box' if cls.white_box else 'black-box'}  {(cls.__doc__ or '').strip().splitlines()[0]}")
    return 0


# ---------------------------------------------------------------------------------------------- train

# CLI flags that map one-to-one onto TrainConfig fields (dest name = field name).
TRAIN_FLAGS: list[tuple[str, type, str]] = [
    ("--dataset", str, "dataset name (default: the preset's)"),
    ("--arch", str, "architecture name (default: the preset's, else the dataset's)"),
    ("--data-root", str, "dataset folder (default: data/ or $ROBUSTSERVE_DATA)"),
    ("--epochs", int, "number of epochs"),
    ("--batch-size", int, "global batch size (split across DDP ranks)"),
    ("--lr", float, "initial learning rate"),
    ("--eps", float, "Linf radius of the training adversary"),
    ("--step-size", float, "PGD step size of the training adversary"),
    ("--attack-steps", int, "PGD steps of the training adversary"),
    ("--train-subset", int, "train on the first N shuffled training images"),
    ("--seed", int, "random seed"),
    ("--device", str, "cpu, cuda or cuda:N (default: cuda when available)"),
]


def _configure_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe id (see `robustserve list`)")
    p.add_argument("--preset", default="quick",
                   help="preset: quick (a pipeline check in minutes on 2 CPU cores), standard (the zoo's setting, "
                        "hours on 2 cores) or paper (a GPU)")
    for flag, kind, text in TRAIN_FLAGS:
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--download", action="store_true", help="download CIFAR where there is internet")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other TrainConfig field, e.g. --set params.beta=3 --set milestones=[50,75]")
    p.add_argument("--out", type=Path, help="run folder (default: runs/<recipe>-<preset>-<dataset>-<arch>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--force", action="store_true", help="discard an existing run in --out and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_overrides(args: argparse.Namespace) -> dict:
    overrides: dict = {}
    for flag, _, _ in TRAIN_FLAGS:
        field = flag[2:].replace("-", "_")
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    if args.download:
        overrides["download"] = True
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        if key.startswith("params."):
            overrides.setdefault("params", {})[key[len("params."):]] = _parse_value(value)
        else:
            overrides[key.replace("-", "_")] = _parse_value(value)
    return overrides


@command("train", "train a recipe (defense or baseline) into a run folder", _configure_train)
def cmd_train(args: argparse.Namespace) -> int:
    from training.engine import train
    from training.recipes import get_recipe
    from training.runs import LAST, run_dir_for

    config = get_recipe(args.recipe).config(args.preset, **train_overrides(args))
    out = Path(args.out) if args.out else run_dir_for(config)
    if args.resume and not (out / LAST).exists():  # a mistyped --out would otherwise train for hours from nothing
        print(f"robustserve: nothing to resume in {out} (no {LAST}): training it from the first epoch", file=sys.stderr)
    run_dir = train(config, out, resume=args.resume, force=args.force, progress=not args.no_progress)
    print(f"run saved in {run_dir}")
    return 0


# ---------------------------------------------------------------------------------------------- eval


# Named attack suites (`--suite`); options given on the command line go on top of the chosen one.
# The two reduced suites share PGD-20 and APGD-CE + APGD-T on 100 images, with no sweep.
_REDUCED = {"pgd_steps": 20, "autoattack_n": 100, "autoattack_version": "fast", "sweep": []}
SUITES: dict[str, dict] = {
    # evaluate_run's defaults: the whole test set, PGD-50 x 3 restarts under three losses, standard AutoAttack on 1,000.
    "full": {},
    # The standard zoo's evaluation on two CPU cores (the full suite is ~40 min per serving mode there): weaker
    # attacks on fewer images, so its robust figures are upper bounds of the full suite's; RESULTS.md says so.
    "cpu": {**_REDUCED, "n": 1000, "pgd_restarts": 1},
    # The quick preset's pipeline check, sized for two CPU cores and twelve serving modes: its wide intervals are
    # shown, and it is labelled as what it is.
    "pipeline-check": {**_REDUCED, "n": 300, "pgd_restarts": 2},
}
SUITE_NOTES = {
    "cpu": ("**A reduced attack suite** (`--suite cpu`, for two CPU cores): PGD-20 with one random start and "
            "APGD-CE + APGD-T on 100 images instead of the full suite's PGD-50 x 3 and standard AutoAttack on 1,000. "
            "Its robust figures are upper bounds of what the full suite (`--suite full`) would measure."),
}


def default_suite(preset: str) -> str:
    """The suite `run` uses when none is named: quick is a pipeline check, every other preset gets the full suite."""
    return "pipeline-check" if preset == "quick" else "full"


def _configure_attack_suite(p: argparse.ArgumentParser, default: str) -> None:
    """The evaluation's suite and its sizes and attack settings, shared by `eval` and `run`; an option not given
    keeps the suite's value (``default`` says which suite, for the help)."""
    p.add_argument("--suite", choices=list(SUITES), help=f"the attack suite (default: {default})")
    p.add_argument("--n", type=int, help=f"test images for clean, PGD and transfer attacks (default: {default})")
    p.add_argument("--pgd-steps", type=int)
    p.add_argument("--pgd-restarts", type=int, help="random starts per PGD attack")
    p.add_argument("--objectives", type=lambda t: [o.strip() for o in t.split(",") if o.strip()],
                   help="PGD losses, comma-separated: ce, margin (CW), dlr (default: all three)")
    p.add_argument("--autoattack-n", type=int,
                   help="test images (a prefix of the n) for AutoAttack, APGD-CE + APGD-T on each attack surface "
                        "and Square; 0 skips them")
    p.add_argument("--autoattack-version",
                   help="standard (APGD-CE, APGD-T, FAB-T, Square: the only one reported as AutoAttack), plus, rand, "
                        "or fast (APGD-CE + APGD-T, labelled so)")
    p.add_argument("--sweep", type=_float_list, help="comma-separated eps values for the accuracy-vs-eps curve")


def suite_settings(args: argparse.Namespace, suite: str) -> dict:
    """``evaluate_run``'s keyword arguments: the named ``suite``'s with the options given on the command line on top."""
    given = {name: getattr(args, name) for name in ("n", "pgd_steps", "pgd_restarts", "objectives", "autoattack_n",
                                                    "autoattack_version", "sweep")}
    return {**SUITES[suite], **{name: value for name, value in given.items() if value is not None}}


def _configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder (from `robustserve train`)")
    _configure_attack_suite(p, "full: the whole test set, PGD-50 x 3 restarts, standard AutoAttack on 1,000")
    p.add_argument("--eps", type=float, help="Linf radius (default: the run's training eps)")
    p.add_argument("--no-transfer", action="store_true", help="skip the transfer attacks from the base run")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--data-root", help="dataset folder (default: the run's)")


@command("eval", "evaluate every serving mode of a run under the attack suite -> report.json/.md, curves.png "
         "(finished attack rows are kept and reused)", _configure_eval)
def cmd_eval(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_run

    evaluate_run(args.run, **suite_settings(args, args.suite or "full"), eps=args.eps, transfer=not args.no_transfer,
                 device=args.device, data_root=args.data_root, progress=True)
    print((args.run / "report.md").read_text())
    return 0


# ---------------------------------------------------------------------------------------------- run


def recipe_list(text: str) -> list[str]:
    """``--recipes``: comma-separated recipe ids, or ``all``; every id is checked before anything is trained."""
    from training.recipes import RECIPES, get_recipe

    if text.strip() == "all":
        return list(RECIPES)
    ids = [r.strip() for r in text.split(",") if r.strip()]
    if not ids:
        raise ConfigError("--recipes names no recipe")
    for recipe_id in ids:
        get_recipe(recipe_id)
    return ids


# The quick pipeline check's recipes: the five defenses, each after the baseline it starts from or is compared
# with in its paper. MART and Consistency-AT are bases only on request (DUCAT and DH-AT accept them), so they stay
# out of it and keep it short on two cores. The standard preset and the zoo add them: the ten recipes of the zoo.
# (`--recipes all` also takes the matched-budget controls, which `run` trains anyway beyond quick.)
QUICK_RECIPES = "natural,aft_dra,pgd_at,ducat,act,that,trades,dhat"
ZOO_RECIPES = QUICK_RECIPES + ",mart,consistency_at"


def default_recipes(preset: str, zoo: Path | None) -> str:
    """``run``'s recipes when --recipes is not given: the pipeline check's for ``quick``, else the zoo's ten."""
    return QUICK_RECIPES if preset == "quick" and zoo is None else ZOO_RECIPES


def _configure_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipes",
                   help="comma-separated recipes to train (finished runs and stages are reused) and evaluate, or "
                        "serve from the zoo; `all` for every registered recipe (default: the quick preset's eight, "
                        f"{QUICK_RECIPES}; with another preset or --zoo, those and mart, consistency_at)")
    p.add_argument("--preset", default="quick", help="quick (a pipeline check, minutes), standard (the zoo's "
                                                     "models, hours on two cores) or paper")
    p.add_argument("--zoo", type=Path, nargs="?", const=Path("model_store/zoo"),
                   help="serve the committed model zoo (default folder model_store/zoo) instead of training")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="folder for the run folders")
    _configure_attack_suite(p, "pipeline-check for quick (300 images, PGD-20 x 2, APGD-CE + APGD-T on 100, no "
                               "sweep), full for the other presets")
    p.add_argument("--results", type=Path, default=Path("RESULTS.md"), help="where to write the results table")
    p.add_argument("--model-store", type=Path, default=Path("model_store"))
    p.add_argument("--no-serve", action="store_true",
                   help="stop after the results: do not package the runs, (re)start TorchServe or open the demo")
    p.add_argument("--no-demo", action="store_true",
                   help="stop once TorchServe serves the runs, without opening the Gradio demo")
    p.add_argument("--demo-port", type=int, default=7860, help="the demo's port on 127.0.0.1")


@command("run", "the main job: train every recipe (reusing finished runs), evaluate, print the results table, "
         "serve the runs and open the demo; or, with --zoo, serve the committed model zoo", _configure_run)
def cmd_run(args: argparse.Namespace) -> int:
    from serving import pipeline

    recipes = recipe_list(args.recipes or default_recipes(args.preset, args.zoo))
    if args.zoo is not None:
        run_dirs, runs_root, preset = pipeline.zoo_runs(args.zoo, recipes), args.zoo, "standard"
    else:
        from training.reproduction import compared_recipes

        suite = args.suite or default_suite(args.preset)
        # Beyond the quick pipeline check, the runs the claims compare with are trained and evaluated too (the
        # reproduction table needs them); only the recipes asked for are served.
        controls = compared_recipes(recipes) if args.preset != "quick" else []
        run_dirs, reports = pipeline.train_and_evaluate(recipes + controls, args.preset, args.runs,
                                                        suite_settings(args, suite))
        run_dirs = run_dirs[:len(recipes)]
        print(pipeline.write_results(reports, args.preset, args.results, suite, SUITE_NOTES.get(suite)))
        runs_root, preset = args.runs, args.preset
    if args.no_serve:
        return 0
    state_dir = pipeline.serve_runs(run_dirs, args.model_store)
    if not args.no_demo:
        open_demo(state_dir, runs_root, preset, args.demo_port)
    return 0


def open_demo(state_dir: Path, runs_root: Path, preset: str, port: int) -> None:
    """Run the `demo` command, which the demo package contributes (``PLUGIN_GROUP``): serving never imports it."""
    if "demo" not in COMMANDS:
        print("== the demo is not installed (no `demo` command); TorchServe keeps serving", flush=True)
        return
    argv = ["demo", "--state-dir", str(state_dir), "--runs", str(runs_root), "--preset", preset, "--port", str(port)]
    args = build_parser().parse_args(argv)
    args.handler(args)


# ---------------------------------------------------------------------------------------------- zoo


def _configure_zoo(p: argparse.ArgumentParser) -> None:
    # One sub-command per action, each with its own options: with the action and the run folders as two positionals
    # of one parser, argparse took `zoo add --zoo Z RUN` as an `add` of no runs and refused RUN.
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, help_text in [("add", "add finished, evaluated runs"),
                              ("check", "check every entry's files and clean accuracy on the whole test set"),
                              ("list", "list the entries with their clean accuracy and validation curve")]:
        a = actions.add_parser(action, help=help_text, description=help_text)
        if action == "add":
            a.add_argument("runs", type=Path, nargs="+", help="run folders to add")
            a.add_argument("--command", default="robustserve run --preset standard",
                           help="the command that made the runs, recorded in each entry")
        a.add_argument("--zoo", type=Path, default=Path("model_store/zoo"))
        a.add_argument("--data-root", help="dataset folder (default: the runs')")


@command("zoo", "the committed model zoo (model_store/zoo): add standard runs, check them, list them", _configure_zoo)
def cmd_zoo(args: argparse.Namespace) -> int:
    from training import zoo
    from training.run_files import read_defense_json
    from training.runs import describe_rise, validation_rise

    if args.action == "add":
        for run_dir in args.runs:
            print(f"added {zoo.add_run(run_dir, args.zoo, command=args.command, data_root=args.data_root)}")
        return 0
    for recipe, entry in zoo.entries(args.zoo).items():
        record = json.loads((entry / zoo.ZOO_JSON).read_text())
        figures = ", ".join(f"{mode} {acc['accuracy']:.1%}" for mode, acc in record["clean_accuracy"].items())
        figures += f"; {describe_rise(validation_rise(read_defense_json(entry)))}"
        if args.action == "check":
            zoo.check_entry(entry, args.data_root)
        print(f"{recipe:<15} {entry}  clean: {figures}  ({record['code_version']}){'  ok' if args.action == 'check' else ''}")
    return 0


# ---------------------------------------------------------------------------------------------- export / package


def _configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="finished run folder")
    p.add_argument("--data-root", help="dataset folder for the parity images (default: the run's)")


@command("export", "export every serving mode of a run to ONNX, checked against PyTorch on test images",
         _configure_export)
def cmd_export(args: argparse.Namespace) -> int:
    from training.export import export_run

    record = export_run(args.run, data_root=args.data_root)
    for mode, entry in record["modes"].items():
        parity = entry["parity"]
        print(f"{mode:<12} {entry['onnx']:<18} output {entry['output_shape']}  max |onnx - torch| "
              f"{parity['max_abs_diff']:.2e} on {parity['images']} test images, same predictions")
    print(f"export saved in {args.run / 'export'}")
    return 0


def _configure_package(p: argparse.ArgumentParser) -> None:
    from serving.package import PackageSettings

    defaults = PackageSettings()
    p.add_argument("run", type=Path, help="finished run folder")
    p.add_argument("--model-store", type=Path, default=Path("model_store"))
    p.add_argument("--models", help="comma-separated served models of this run (default: all, e.g. that,that_knn)")
    p.add_argument("--version", default=defaults.version)
    p.add_argument("--backend", default=defaults.backend, help="onnx (ONNX Runtime) or torch (eager)")
    p.add_argument("--knn-index", default=defaults.knn_index, help="flat (exact) or ivf, for THAT's kNN endpoint")
    p.add_argument("--nlist", type=int, help="IVF cells (default ~4 sqrt(bank size))")
    p.add_argument("--nprobe", type=int, default=defaults.nprobe, help="IVF cells searched per query")
    p.add_argument("--sign-key", type=Path, help="Ed25519 signing key (`robustserve keygen`): write <name>.mar.sig")


@command("package", "build the TorchServe archives (.mar) of a run in model_store/", _configure_package)
def cmd_package(args: argparse.Namespace) -> int:
    from serving.package import PackageSettings, package_run
    from serving.signing import load_signing_key

    settings = PackageSettings(version=args.version, backend=args.backend, knn_index=args.knn_index,
                               nlist=args.nlist, nprobe=args.nprobe)
    names = [n.strip() for n in args.models.split(",")] if args.models else None
    key = load_signing_key(args.sign_key) if args.sign_key else None  # a bad key fails before any packaging
    for archive in package_run(args.run, model_store=args.model_store, settings=settings, names=names,
                               sign_key=key):
        print(f"packaged {archive}" + (" (signed)" if key else ""))
    return 0


def _configure_keygen(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="where signing_key.pem and verify_key.pem go (never overwritten)")


@command("keygen", "make an Ed25519 key pair for signing archives (package --sign-key, serve --verify-key)",
         _configure_keygen)
def cmd_keygen(args: argparse.Namespace) -> int:
    from serving.signing import generate_keys

    signing, verify = generate_keys(args.folder)
    print(f"signing key {signing} (private, mode 0600: keep it where archives are built)\n"
          f"verify key  {verify} (public: give it to `robustserve serve start --verify-key`)")
    return 0


# ---------------------------------------------------------------------------------------------- serve / predict


def _configure_serve(p: argparse.ArgumentParser) -> None:
    from serving.server import ServerSettings

    defaults = ServerSettings()
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--model-store", type=Path, default=defaults.model_store)
    p.add_argument("--state-dir", type=Path, default=defaults.state_dir,
                   help="where the config, logs and TorchServe's key_file.json (the API tokens) go")
    p.add_argument("--host", default=defaults.host, help="bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--inference-port", type=int, default=defaults.inference_port)
    p.add_argument("--management-port", type=int, default=defaults.management_port)
    p.add_argument("--metrics-port", type=int, default=defaults.metrics_port)
    p.add_argument("--models", help="comma-separated .mar names to load (default: every archive in the store)")
    p.add_argument("--workers", type=int, default=defaults.workers, help="workers per model")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="TorchServe dynamic batch size")
    p.add_argument("--max-batch-delay-ms", type=int, default=defaults.max_batch_delay_ms)
    p.add_argument("--verify-key", type=Path,
                   help="Ed25519 public key: start only if every archive is signed with it; turns the model API off")
    p.add_argument("--proxy", action="store_true",
                   help="start: put nginx in front (TLS, client timeouts, body-size and per-client rate limits); "
                        "TorchServe stays on loopback and only the proxy's port is for clients (stop stops both)")
    p.add_argument("--proxy-host", default="127.0.0.1", help="the proxy's bind address (default 127.0.0.1)")
    p.add_argument("--proxy-port", type=int, default=8443)
    p.add_argument("--tls-cert", type=Path, help="the proxy's certificate chain, PEM (default: self-signed at start)")
    p.add_argument("--tls-key", type=Path, help="the private key of --tls-cert, PEM")


def server_settings(args: argparse.Namespace):
    from serving.server import ServerSettings

    models = tuple(m if m.endswith(".mar") else f"{m}.mar" for m in (n.strip() for n in args.models.split(","))
                   ) if getattr(args, "models", None) else ()
    return ServerSettings(model_store=args.model_store, state_dir=args.state_dir, host=args.host,
                          inference_port=args.inference_port, management_port=args.management_port,
                          metrics_port=args.metrics_port, models=models, workers=args.workers,
                          batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay_ms,
                          verify_key=getattr(args, "verify_key", None))


@command("serve", "start, stop or inspect TorchServe over model_store/ (loopback, token auth)", _configure_serve)
def cmd_serve(args: argparse.Namespace) -> int:
    from serving import proxy, server

    settings = server_settings(args)
    front = proxy.ProxySettings(state_dir=settings.state_dir, upstream=settings.inference_address, host=args.proxy_host,
                                port=args.proxy_port, tls_cert=args.tls_cert, tls_key=args.tls_key)
    if args.action == "start":
        if args.proxy:  # refuse before TorchServe starts
            front.check()
            proxy.nginx_binary()
        state = server.start(settings)
        if args.proxy:
            try:
                proxy.start(front)
            except BaseException:
                server.stop(settings)
                raise
    elif args.action == "stop":
        # The proxy first: it would answer 502 for a moment otherwise.
        stopped = [name for name, was_running in (("proxy", proxy.stop(front)), ("TorchServe", server.stop(settings)))
                   if was_running]
        print(f"stopped {' and '.join(stopped)}" if stopped else "no server was running")
        return 0
    else:
        state = server.status(settings)
    print(json.dumps({**state.as_dict(), "proxy": proxy.status(front)}, indent=2, default=str))
    return 0


def _configure_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", type=Path, help="an image file (PNG, JPEG) of the model's input size")
    p.add_argument("--model", default="dhat", help="served model name (see `robustserve serve status`)")
    p.add_argument("--param", "-p", action="append", default=[], metavar="NAME=VALUE",
                   help="a request parameter, repeatable: the model's mode (head=both for dhat, mode=raw for ducat), "
                        "top_k=3, k=20 for that_knn; the model says which it takes")
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--state-dir", type=Path, default=Path("runs/torchserve"), help="where the server's key file is")


@command("predict", "send one image to a served model and print its reply", _configure_predict)
def cmd_predict(args: argparse.Namespace) -> int:
    from serving.client import Client
    from serving.server import ServerSettings, read_keys

    token = read_keys(ServerSettings(state_dir=args.state_dir)).get("inference")
    if not args.image.is_file():
        raise ConfigError(f"no image file {args.image}")
    if any("=" not in item for item in args.param):
        raise ConfigError(f"--param takes NAME=VALUE, got {', '.join(i for i in args.param if '=' not in i)}")
    params = dict(item.partition("=")[::2] for item in args.param)
    reply = Client(args.url, token=token).predict(args.image, model=args.model, **params)
    print(json.dumps(reply, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------- bench


def _configure_bench(p: argparse.ArgumentParser) -> None:
    """One sub-command per registered benchmark, with the options that benchmark adds itself."""
    from serving.bench import BENCHMARKS

    which = p.add_subparsers(dest="what", required=True)
    for benchmark in BENCHMARKS.values():
        sp = which.add_parser(benchmark.name, help=benchmark.description, description=benchmark.description)
        benchmark.add_options(sp)
        sp.add_argument("--json", type=Path, help="also write the figures as JSON here")


@command("bench", "benchmarks: throughput figures, compared as ratios within one run", _configure_bench)
def cmd_bench(args: argparse.Namespace) -> int:
    from serving.bench import BENCHMARKS
    from serving.bench.common import format_table

    figures = BENCHMARKS[args.what].run(args)
    print(format_table(figures, title=f"bench {args.what}"))
    if args.json:
        from training.checkpoint import write_json

        write_json(args.json, figures)
    return 0


# ---------------------------------------------------------------------------------------------- main


PLUGIN_GROUP = "robustserve.commands"  # entry points of packages that add commands (the demo)


def load_plugins() -> None:
    """Import the modules that other installed packages register under ``PLUGIN_GROUP``; each adds its
    commands with ``@command`` as it is imported."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=PLUGIN_GROUP):
        entry.load()


def build_parser() -> argparse.ArgumentParser:
    load_plugins()
    parser = argparse.ArgumentParser(prog="robustserve", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS.values():
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(sp)
        sp.set_defaults(handler=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as err:
        print(f"robustserve: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robustserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m serving.cli`: run the registry of the module plugins register into, not this __main__ copy.
    from serving.cli import main as registered_main

    sys.exit(registered_main())
