"""The exported ONNX graphs' interface: what ``training.export`` writes and the serving runtime runs.

Torch-free (numpy and, when a session is made, onnxruntime), so that a serving worker on the ONNX
backend runs the graphs without importing torch or the export's model code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

EXPORT_JSON = "export.json"
INPUT_NAME, OUTPUT_NAME = "pixels", "scores"


def onnx_session(model: bytes | str | Path, device: str = "cpu") -> Any:
    """An ONNX Runtime session, on the CUDA provider when ``device`` is a GPU and onnxruntime has it."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=providers)


def graph_outputs(session: Any, x: np.ndarray) -> np.ndarray:
    """Run an exported graph on a batch of pixels."""
    return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
