"""A worker on the ONNX backend runs without the training stack: in a fresh interpreter, importing the handler
and the runtime, loading an extracted archive and answering a request imports neither torch nor the training
engine, evaluation, recipes or their plotting and progress bars, and the reply is the one a process that has
them all gives. (TorchServe 0.12's own worker process imports torch for its wire protocol; an engine that mounts
the runtime by itself does not.)"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from serving.runtime import Runtime

ROOT = Path(__file__).resolve().parents[2]
NOT_IMPORTED = ("torch", "matplotlib", "tqdm", "training.engine", "training.evaluate", "training.recipes",
                "training.runs", "training.export", "training.checkpoint")
WORKER = r"""
import json, sys
from pathlib import Path

import handlers.base  # the handlers' module; it imports TorchServe's ts only in initialize
from serving.runtime import Runtime

runtime = Runtime(sys.argv[1], backend="onnx", device="cpu")
[(status, reply)] = runtime.handle([{"body": Path(sys.argv[2]).read_bytes()}])
print(json.dumps({"status": status, "reply": reply, "modules": sorted(sys.modules)}))
"""


def gray_png(height: int, width: int) -> bytes:
    """A gradient, made with Pillow alone."""
    image = Image.new("L", (width, height))
    image.putdata([(3 * row + 5 * col) % 256 for row in range(height) for col in range(width)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("model", ["pgd_at", "ducat", "that_knn"])  # plain logits, DUCAT's pairing, THAT's FAISS bank
def test_an_onnx_worker_imports_no_training_stack(model, served_store, tmp_path):
    folder = tmp_path / model
    with zipfile.ZipFile(served_store / f"{model}.mar") as archive:
        archive.extractall(folder)
    _, height, width = json.loads((folder / "defense.json").read_text())["input_shape"]
    image = tmp_path / "image.png"
    image.write_bytes(gray_png(height, width))

    done = subprocess.run([sys.executable, "-c", WORKER, str(folder), str(image)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    worker = json.loads(done.stdout.strip().splitlines()[-1])
    loaded = [name for name in worker["modules"]
              if any(name == heavy or name.startswith(heavy + ".") for heavy in NOT_IMPORTED)]
    assert loaded == [], f"the worker imported {loaded}"

    [(status, reply)] = Runtime(folder, backend="onnx", device="cpu").handle([{"body": image.read_bytes()}])
    assert worker["status"] == status == 200
    assert json.dumps(worker["reply"]) == json.dumps(reply)
