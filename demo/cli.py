"""The `robustserve demo` command. The demo package contributes it to serving's command line through
the ``robustserve.commands`` entry point (pyproject.toml), so serving never imports the demo."""

from __future__ import annotations

import argparse
from pathlib import Path

from serving.cli import command


def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--state-dir", type=Path, default=Path("runs/torchserve"),
                   help="the running TorchServe's folder: its config.properties and key_file.json (inference key)")
    p.add_argument("--runs", type=Path, default=Path("runs"),
                   help="folder of the run folders (<recipe>-<preset>-fashion_mnist-smallcnn) the white-box attacks "
                        "load; model_store/zoo for the zoo")
    p.add_argument("--preset", default="quick", help="the preset of those runs (standard for the zoo)")
    p.add_argument("--data-root", help="dataset folder for the test images and kNN neighbours (default: the runs')")


@command("demo", "the Gradio demo: attack live inputs and compare every served defense over REST", _configure_demo)
def cmd_demo(args: argparse.Namespace) -> int:
    """Serve the Gradio demo against the TorchServe of ``--state-dir`` until Ctrl-C."""
    from demo.app import Demo, default_run_dirs, launch, state_dir_client

    backend = Demo(state_dir_client(args.state_dir), default_run_dirs(args.runs, args.preset), data_root=args.data_root)
    print(f"== robustserve demo on http://{args.host}:{args.port} (TorchServe from {args.state_dir}); Ctrl-C stops "
          f"the demo, `robustserve serve stop` the server", flush=True)
    try:
        launch(backend, host=args.host, port=args.port)
    except KeyboardInterrupt:
        print("== demo stopped", flush=True)
    return 0
