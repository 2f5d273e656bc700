"""No pickle anywhere: nothing in training/, serving/, handlers/ or demo/ can deserialise a pickle.

A pickle runs code of the file's choosing when it is loaded, so a tampered checkpoint, memory bank or
archive would be code execution on the training machine or inside a TorchServe worker. The project
stores weights and banks as safetensors, metadata as JSON, graphs as ONNX and indexes in FAISS's own
format; this test keeps it that way by parsing every module with ``ast`` (no import, no execution) and
refusing:

* any import of a pickle-based serialiser: ``pickle``, ``_pickle``, ``cPickle``, ``dill``, ``cloudpickle``,
  ``joblib``, ``shelve``, ``jsonpickle`` (also through ``importlib.import_module`` or ``__import__`` with a
  literal name). The import itself is refused, not only ``load``/``loads``: an alias or a ``getattr``
  would hide the call, and writing pickles is as much against the design as reading them;
* ``torch.load`` (also ``torch.serialization.load`` and ``torch.hub.load_state_dict_from_url``, which calls
  it) unless the call says ``weights_only=True`` literally. Recent torch defaults to True, but the code must
  not depend on which torch it runs on, and a variable or ``**kwargs`` cannot be checked;
* ``numpy.load`` with ``allow_pickle`` anything but a literal False (numpy's default, False, is fine);
* ``torch.jit.load`` and ``torch.package.PackageImporter``: a TorchScript archive is a zip of pickled
  constants plus code that runs in the process, and a torch.package unpickles arbitrary objects. The project
  exports ONNX, so it has no use for either, and a reviewer should see a deliberate exception here first;
* ``pandas.read_pickle``, and YAML loaders that build arbitrary objects (``yaml.unsafe_load``,
  ``yaml.full_load``, ``yaml.load`` without ``SafeLoader``/``CSafeLoader``).

Names are resolved through each module's imports (``import torch as T``, ``from torch import load as L``,
function-local imports included), so an alias does not slip through. ``test_the_scanner_flags`` checks
that each rule fires on a small synthetic source and stays quiet on the safe form.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("training", "serving", "handlers", "demo")
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "jsonpickle"}
NEEDS_WEIGHTS_ONLY = {"torch.load", "torch.serialization.load", "torch.hub.load_state_dict_from_url"}
FORBIDDEN_CALLS = {
    "torch.jit.load": "a TorchScript archive holds pickled constants and code that runs in the process",
    "torch.package.PackageImporter": "torch.package unpickles arbitrary objects",
    "pandas.read_pickle": "reads a pickle",
    "yaml.unsafe_load": "builds arbitrary Python objects",
    "yaml.full_load": "builds arbitrary Python objects",
}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader"}


@dataclass(frozen=True)
class Finding:
    where: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.where}:{self.line}: {self.what}"


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the qualified name it was imported as, from every import in the module."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                # `import torch.jit` binds `torch`; `import numpy as np` binds `np` to numpy.
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _qualified(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """``np.load`` -> ``numpy.load`` through the module's imports; None for anything but a dotted name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_constant(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _unchecked_kwargs(call: ast.Call) -> bool:
    return any(k.arg is None for k in call.keywords)  # **kwargs: whatever it holds cannot be checked here


def scan_source(source: str, where: str = "<source>") -> list[Finding]:
    """Every way ``source`` could deserialise a pickle (see the module docstring for the rules)."""
    tree = ast.parse(source, filename=where)
    aliases = _aliases(tree)
    findings: list[Finding] = []

    def flag(node: ast.AST, what: str) -> None:
        findings.append(Finding(where, getattr(node, "lineno", 0), what))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    flag(node, f"imports {alias.name}, a pickle-based serialiser")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PICKLE_MODULES:
            flag(node, f"imports from {node.module}, a pickle-based serialiser")
        elif isinstance(node, ast.Call):
            name = _qualified(node.func, aliases)
            if name is None:
                continue
            if name in ("importlib.import_module", "__import__") and node.args and isinstance(
                    node.args[0], ast.Constant) and str(node.args[0].value).split(".")[0] in PICKLE_MODULES:
                flag(node, f"imports {node.args[0].value} dynamically, a pickle-based serialiser")
            elif name in NEEDS_WEIGHTS_ONLY and not _is_constant(_keyword(node, "weights_only"), True):
                flag(node, f"calls {name} without weights_only=True: it would unpickle arbitrary objects")
            elif name == "numpy.load" and (_unchecked_kwargs(node) or (
                    _keyword(node, "allow_pickle") is not None and not _is_constant(_keyword(node, "allow_pickle"),
                                                                                    False))):
                flag(node, "calls numpy.load with allow_pickle not literally False")
            elif name in FORBIDDEN_CALLS:
                flag(node, f"calls {name}: {FORBIDDEN_CALLS[name]}")
            elif name == "yaml.load":
                loader = _keyword(node, "Loader")
                if loader is None and len(node.args) > 1:
                    loader = node.args[1]
                if loader is None or _qualified(loader, aliases) not in SAFE_YAML_LOADERS:
                    flag(node, "calls yaml.load without SafeLoader: it builds arbitrary Python objects")
    return findings


def scanned_files() -> list[Path]:
    return sorted(path for folder in SCANNED for path in (ROOT / folder).rglob("*.py"))


def test_no_module_can_deserialise_a_pickle() -> None:
    files = scanned_files()
    # Every scanned folder has modules: the scan cannot pass by finding nothing after a move.
    assert all(any(f.is_relative_to(ROOT / folder) for f in files) for folder in SCANNED)
    assert len(files) >= 40
    findings = [f for path in files for f in scan_source(path.read_text(), str(path.relative_to(ROOT)))]
    assert findings == [], "\n".join(map(str, findings))


SYNTHETIC = [
    # (source, number of findings)
    ("import torch\ntorch.load(f)\n", 1),
    ("import torch\ntorch.load(f, weights_only=True)\n", 0),
    ("import torch\ntorch.load(f, weights_only=False)\n", 1),
    ("import torch\ntorch.load(f, weights_only=flag)\n", 1),
    ("import torch\ntorch.load(f, **options)\n", 1),
    ("import torch as T\nT.load(f, map_location='cpu')\n", 1),
    ("from torch import load as restore\nrestore(f)\n", 1),
    ("def f():\n    from torch import serialization\n    return serialization.load(p)\n", 1),
    ("import torch\ntorch.hub.load_state_dict_from_url(url)\n", 1),
    ("import pickle\n", 1),
    ("import pickle as p\np.loads(b)\n", 1),
    ("from pickle import loads\n", 1),
    ("import dill\n", 1),
    ("import cloudpickle\n", 1),
    ("from joblib import load\n", 1),
    ("import importlib\nimportlib.import_module('pickle')\n", 1),
    ("__import__('dill')\n", 1),
    ("import numpy as np\nnp.load(f, allow_pickle=True)\n", 1),
    ("import numpy as np\nnp.load(f)\n", 0),
    ("import numpy as np\nnp.load(f, allow_pickle=False)\n", 0),
    ("import torch\ntorch.jit.load(f)\n", 1),
    ("from torch import jit\njit.load(f)\n", 1),
    ("import pandas as pd\npd.read_pickle(f)\n", 1),
    ("import yaml\nyaml.load(s)\n", 1),
    ("import yaml\nyaml.load(s, Loader=yaml.SafeLoader)\n", 0),
    ("import yaml\nyaml.safe_load(s)\n", 0),
    ("from safetensors.torch import load_file\nload_file(p)\n", 0),
    ("import json\njson.loads(s)\n", 0),
    ("model.load(f)\n", 0),  # a method named load on anything else is not torch.load
]


@pytest.mark.parametrize(("source", "expected"), SYNTHETIC)
def test_the_scanner_flags(source: str, expected: int) -> None:
    assert len(scan_source(source)) == expected, scan_source(source)
