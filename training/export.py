"""Export a finished run for serving: per serving mode an eager module and an ONNX graph, both checked.

For every serving mode (``Recipe.modes``) of the run:

* the **eager** module is the run's ``best.safetensors`` rebuilt by the recipe's model code
  (``load_run``); the serving runtime's torch backend runs ``ServingMode.exported`` of it;
* the **ONNX** graph is ``ServingMode.exported`` traced by ``torch.onnx.export`` with a dynamic batch
  axis: input ``pixels`` [batch, C, H, W] in [0, 1], output ``scores`` (logits, DH-AT's stacked
  heads, DUCAT's 2C logits or THAT's query feature; ``ServingMode.postprocess`` says which).

A graph is accepted only when, on real test images of the run's dataset, ONNX Runtime's output is
within ``MAX_ABS_DIFF`` of PyTorch's and the mode's predictions (``ServingMode.scores`` of each
output, argmax) are identical. Everything lands in ``run_dir/export/``; ``export.json`` records the
checks, the weights' SHA-256 and the tool versions, and is written last, so a folder with an
``export.json`` is a complete, checked export. The graphs' input and output names and running them
are ``training.onnx_io``, which the serving runtime shares without importing this module.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, atomic_write, write_json
from .errors import RobustServeError
from .onnx_io import EXPORT_JSON, INPUT_NAME, OUTPUT_NAME, graph_outputs, onnx_session
from .recipes import ServingMode
from .run_files import sha256_file
from .runs import BEST, load_run, load_test_subset

EXPORT_DIR = "export"
MAX_ABS_DIFF = 1e-3  # float32 graphs: observed differences are ~1e-6 on logits
PARITY_IMAGES = 64
EXPORT_FORMAT = 1  # bumped when export.json changes shape; an older export is redone


class ExportError(RobustServeError):
    """An export that failed its parity check (the graph is not written)."""


def onnx_bytes(module: torch.nn.Module, example: torch.Tensor) -> bytes:
    """``module`` as an ONNX model (torch.export-based exporter) with a dynamic batch axis."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter narrates its passes as warnings
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), verbose=False)
    return program.model_proto.SerializeToString()


def _check_parity(mode_name: str, mode: ServingMode, graph: bytes, x: torch.Tensor) -> dict[str, Any]:
    with torch.no_grad():
        expected = mode.exported(x)
        expected_prediction = mode.module(x).argmax(1)
    got = torch.from_numpy(graph_outputs(onnx_session(graph), x.numpy()))
    with torch.no_grad():
        got_prediction = mode.scores(got).argmax(1)
    max_abs_diff = float((got - expected).abs().max())
    same = bool(torch.equal(got_prediction, expected_prediction))
    if got.shape != expected.shape or max_abs_diff > MAX_ABS_DIFF or not same:
        raise ExportError(f"mode {mode_name!r}: the ONNX graph differs from PyTorch on {len(x)} test images "
                          f"(shape {tuple(got.shape)} vs {tuple(expected.shape)}, max |diff| {max_abs_diff:.3g} "
                          f"> {MAX_ABS_DIFF:g} or {int((got_prediction != expected_prediction).sum())} "
                          f"predictions differ); not exported")
    return {"images": len(x), "max_abs_diff": max_abs_diff, "same_predictions": same}


def export_run(run_dir: str | Path, *, data_root: str | None = None) -> dict[str, Any]:
    """Export every serving mode of the finished run in ``run_dir`` to ``run_dir/export/``; returns export.json."""
    run_dir = Path(run_dir)
    run = load_run(run_dir, which="best", device="cpu")
    info = run.info
    if not info.get("finished", False):
        raise CheckpointError(f"{run_dir} is not a finished run; train it to the end first")
    x, _, _ = load_test_subset(info, PARITY_IMAGES, data_root or info["config"].get("data_root"))
    out = run_dir / EXPORT_DIR
    out.mkdir(exist_ok=True)
    modes: dict[str, Any] = {}
    for name, mode in run.modes().items():
        mode.exported.eval()
        graph = onnx_bytes(mode.exported, x[:2])
        parity = _check_parity(name, mode, graph, x)
        atomic_write(out / f"{name}.onnx", lambda tmp, data=graph: tmp.write_bytes(data))
        with torch.no_grad():
            output_shape = list(mode.exported(x[:1]).shape[1:])
        modes[name] = {"onnx": f"{name}.onnx", "onnx_sha256": hashlib.sha256(graph).hexdigest(),
                       "postprocess": mode.postprocess, "output_shape": output_shape,
                       "description": mode.description, "parity": parity}
    import onnx
    import onnxruntime

    record = {"format": EXPORT_FORMAT, "run": str(run_dir), "defense": info["defense"], "weights": BEST,
              "weights_sha256": sha256_file(run_dir / BEST), "input": {"name": INPUT_NAME,
                                                                      "shape": ["batch", *info["input_shape"]]},
              "output": OUTPUT_NAME, "serving_modes": list(modes), "modes": modes,
              "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}}
    write_json(out / EXPORT_JSON, record)
    return record


def current_export(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's export.json when it was made, in this format, from the current best weights; else None."""
    path = Path(run_dir) / EXPORT_DIR / EXPORT_JSON
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    current = record.get("format") == EXPORT_FORMAT and record.get("weights_sha256") == sha256_file(Path(run_dir) / BEST)
    return record if current else None

