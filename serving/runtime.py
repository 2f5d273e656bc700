"""The inference runtime: one served model, from request payloads to JSON replies. No TorchServe here.

A served model lives in a folder (an extracted ``.mar``, see ``serving.package``):
``served.json`` (its name, version, modes, the request parameter that picks a mode, the backend),
``MANIFEST.json`` (SHA-256 of every other file, checked before anything is loaded), the run's
``defense.json`` and ``best.safetensors``, the ONNX graphs and ``export.json``, and the defense's
artifacts (DUCAT's ``pairing.json``, THAT's memory bank and FAISS index).

``Runtime.handle`` takes one batch of requests, each a payload (image bytes, base64 JSON or a pixel
array; ``serving.decode``) plus its options (from the JSON body, the query string or a form),
and returns ``(status, reply)`` per request: bad requests get a 4xx with a message and do not
disturb the others. Valid requests are grouped by mode and each group runs as one batch
through the backend (PyTorch eager or ONNX Runtime), then through the mode's post-processing
(``serving.postprocess``). Another engine (Triton, KServe, Ray Serve) can mount this class as it is.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from training.errors import RobustServeError
from training.export import EXPORT_JSON, graph_outputs, onnx_session, sha256_file

from .decode import InputSpec, RequestError, decode_image
from .knn_index import FaissMemoryBank
from .postprocess import POSTPROCESSORS, ModelContext, Reply, RequestOptions

SERVED_JSON = "served.json"
MANIFEST_JSON = "MANIFEST.json"
BACKENDS = ("onnx", "torch")
IMAGE_FIELDS = ("body", "data", "image", "file", "pixels")  # where a payload may arrive (JSON, form, raw)
MAX_TOP_K = 1000


class ArchiveError(RobustServeError):
    """A model folder that must not be loaded: missing files or a manifest mismatch."""


def write_manifest(folder: Path) -> dict[str, str]:
    """Record the SHA-256 of every file in ``folder`` (flat) in ``MANIFEST.json``."""
    files = {p.name: sha256_file(p) for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != MANIFEST_JSON}
    (Path(folder) / MANIFEST_JSON).write_text(json.dumps({"sha256": files}, indent=2) + "\n")
    return files


def verify_manifest(folder: Path) -> dict[str, str]:
    """Check every file the manifest lists against its SHA-256; raise ``ArchiveError`` naming the first mismatch."""
    path = Path(folder) / MANIFEST_JSON
    try:
        files = json.loads(path.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ArchiveError(f"{folder}: no readable {MANIFEST_JSON} ({err}); refusing to load") from err
    for name, expected in files.items():
        target = Path(folder) / name
        if Path(name).name != name or not target.is_file():
            raise ArchiveError(f"{folder}: {name} is listed in {MANIFEST_JSON} but missing; refusing to load")
        if sha256_file(target) != expected:
            raise ArchiveError(f"{folder}: {name} does not match its SHA-256 in {MANIFEST_JSON} (the archive was "
                               f"changed after packaging); refusing to load")
    return files


@dataclass(frozen=True)
class ServedInfo:
    """``served.json``: how one TorchServe model serves a run."""

    name: str
    version: str
    defense: str
    modes: tuple[str, ...]  # the modes this model serves; the first is the default
    mode_parameter: str  # the request field that picks a mode ("head" for DH-AT, "mode" otherwise)
    backend: str
    knn_k: int | None = None  # default k of a kNN mode
    knn_temperature: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the FAISS index settings

    @classmethod
    def read(cls, folder: Path) -> ServedInfo:
        data = json.loads((Path(folder) / SERVED_JSON).read_text())
        return cls(**{**data, "modes": tuple(data["modes"])})


class Backend(Protocol):
    def run(self, mode: str, pixels: np.ndarray) -> np.ndarray:
        """The mode's graph output for a batch of pixels [B, C, H, W] float32 in [0, 1]."""


class TorchBackend:
    """The eager modules: the run's weights rebuilt by the project's model code."""

    def __init__(self, folder: Path, modes: Sequence[str], device: str) -> None:
        from training.runs import load_run

        all_modes = load_run(folder, device=device).modes()
        self.graphs = {name: all_modes[name].exported.eval() for name in modes}
        self.device = device

    @torch.no_grad()
    def run(self, mode: str, pixels: np.ndarray) -> np.ndarray:
        return self.graphs[mode](torch.from_numpy(pixels).to(self.device)).float().cpu().numpy()


class OnnxBackend:
    """The exported ONNX graphs in ONNX Runtime (CUDA provider on a GPU, else the CPU)."""

    def __init__(self, folder: Path, modes: Sequence[str], device: str) -> None:
        exported = json.loads((Path(folder) / EXPORT_JSON).read_text())["modes"]
        self.sessions = {name: onnx_session(Path(folder) / exported[name]["onnx"], device) for name in modes}

    def run(self, mode: str, pixels: np.ndarray) -> np.ndarray:
        return graph_outputs(self.sessions[mode], pixels)


BACKEND_CLASSES: dict[str, type] = {"onnx": OnnxBackend, "torch": TorchBackend}


@dataclass
class Request:
    pixels: torch.Tensor  # [C, H, W]
    options: RequestOptions


def _text(value: Any) -> Any:
    """TorchServe hands query and form values as bytes; everything else is already JSON-typed."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else value


def _integer(name: str, value: Any, low: int, high: int) -> int:
    value = _text(value)
    text = value.strip() if isinstance(value, str) else ""
    # ASCII digits only: str.isdigit() also accepts e.g. "²", which int() refuses; and at most 18 of them, so
    # that int() never meets Python's 4300-digit limit (either would raise ValueError: a 500, not a 400).
    digits = 0 < len(text) <= 18 and text.isascii() and text.isdigit()
    if isinstance(value, bool) or not (isinstance(value, int) or digits):
        raise RequestError(f"{name} must be an integer from {low} to {high}, got {reprlib.repr(value)}")
    number = int(value)
    if not low <= number <= high:
        raise RequestError(f"{name} must be from {low} to {high}, got {number}")
    return number


class Runtime:
    """One served model: request options and payloads in, replies out."""

    def __init__(self, folder: str | Path, *, backend: str | None = None, device: str | None = None) -> None:
        from training.checkpoint import read_defense_json
        from training.dummy_classes import PAIRING_FILE, read_pairing
        from training.runs import spec_from_info

        self.folder = Path(folder)
        verify_manifest(self.folder)
        self.served = ServedInfo.read(self.folder)
        self.info = read_defense_json(self.folder)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.backend_name = backend or self.served.backend
        if self.backend_name not in BACKENDS:
            raise ArchiveError(f"unknown backend {self.backend_name!r}; known: {', '.join(BACKENDS)}")
        self.backend: Backend = BACKEND_CLASSES[self.backend_name](self.folder, self.served.modes, self.device)
        spec = spec_from_info(self.info)
        self.input_spec = InputSpec(shape=tuple(spec.input_shape))  # type: ignore[arg-type]
        exported = json.loads((self.folder / EXPORT_JSON).read_text())["modes"]
        self.postprocess = {mode: exported[mode]["postprocess"] for mode in self.served.modes}
        pairing_path, bank = self.folder / PAIRING_FILE, None
        if "knn" in self.postprocess.values():
            bank = FaissMemoryBank.load(self.folder, self.served.knn_temperature)
        self.context = ModelContext(tuple(spec.class_names), read_pairing(pairing_path) if pairing_path.is_file()
                                    else None, bank)

    # -- requests -------------------------------------------------------------------------------

    @property
    def parameters(self) -> tuple[str, ...]:
        """The option names a request may carry."""
        knn = ("k",) if "knn" in self.postprocess.values() else ()
        return (self.served.mode_parameter, "top_k", *knn)

    def describe(self) -> dict[str, Any]:
        """What a client may ask this model (served on GET-like introspection and in the demo)."""
        return {"model": self.served.name, "version": self.served.version, "defense": self.served.defense,
                "modes": list(self.served.modes), "mode_parameter": self.served.mode_parameter,
                "parameters": list(self.parameters), "backend": self.backend_name, "device": self.device,
                "input_shape": list(self.input_spec.shape), "classes": list(self.context.class_names),
                "knn": None if self.context.bank is None else {"bank_size": len(self.context.bank),
                                                               "default_k": self.served.knn_k,
                                                               "index_device": self.context.bank.device}}

    def split(self, fields: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        """One request's fields (TorchServe's dict: body, form fields, query parameters) -> (payload, options)."""
        payloads = [name for name in IMAGE_FIELDS if fields.get(name) not in (None, b"", bytearray())]
        options = {k: _text(v) for k, v in fields.items() if k not in IMAGE_FIELDS}
        if not payloads:
            raise RequestError("no image in the request: send image bytes as the body, JSON {\"image\": <base64>} "
                               "or {\"pixels\": [...]}, or a form field named data")
        if len(payloads) > 1:
            raise RequestError(f"the request carries several images ({', '.join(payloads)}); send one")
        payload = fields[payloads[0]]
        # A JSON object arrives parsed when sent as application/json, as text when sent as text/plain, and as
        # bytes otherwise (or when TorchServe's own parse failed): parse the last two here, so that its options
        # are checked whatever the content type says.
        if isinstance(payload, bytes | bytearray | str) and payload.lstrip()[:1] in (b"{", "{"):
            try:
                payload = json.loads(payload)
            # ValueError: bad syntax or UTF-8, over-long integers; RecursionError: absurd nesting.
            except (ValueError, RecursionError) as err:
                raise RequestError(f"the body looks like JSON but does not parse: {err}") from err
        if isinstance(payload, dict):
            for key, value in payload.items():
                if key in ("image", "pixels"):
                    continue
                if key in options and options[key] != value:
                    raise RequestError(f"{key} is given twice with different values ({options[key]!r} and {value!r})")
                options[key] = value
        return payload, options

    def parse_options(self, options: Mapping[str, Any]) -> RequestOptions:
        unknown = sorted(set(options) - set(self.parameters))
        if unknown:
            raise RequestError(f"unknown parameter(s) {', '.join(unknown)} for model {self.served.name}; "
                               f"it takes: {', '.join(self.parameters)}")
        mode = _text(options.get(self.served.mode_parameter, self.served.modes[0]))
        if mode not in self.served.modes:
            raise RequestError(f"{self.served.mode_parameter} must be one of {', '.join(self.served.modes)} for "
                               f"model {self.served.name}, got {mode!r}")
        top_k = _integer("top_k", options.get("top_k", 5), 1, MAX_TOP_K)
        k = None
        if self.postprocess[mode] == "knn":
            assert self.context.bank is not None
            limit = min(len(self.context.bank), 1000)
            k = _integer("k", options.get("k", self.served.knn_k or 50), 1, limit)
        return RequestOptions(mode, top_k, k)

    def parse(self, fields: Mapping[str, Any]) -> Request:
        payload, options = self.split(fields)
        parsed = self.parse_options(options)
        return Request(decode_image(payload, self.input_spec), parsed)

    # -- inference ------------------------------------------------------------------------------

    def infer(self, requests: Sequence[Request]) -> list[Reply]:
        """Replies for valid requests: one backend batch per mode, in request order."""
        replies: list[Reply | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(request.options.mode, []).append(i)
        for mode, members in groups.items():
            pixels = torch.stack([requests[i].pixels for i in members]).numpy().astype(np.float32, copy=False)
            outputs = self.backend.run(mode, pixels)
            bodies = POSTPROCESSORS[self.postprocess[mode]](outputs, [requests[i].options for i in members],
                                                             self.context)
            for i, body in zip(members, bodies, strict=True):
                replies[i] = {"model": self.served.name, "version": self.served.version, "mode": mode, **body}
        return replies  # type: ignore[return-value]

    def handle(self, batch: Sequence[Mapping[str, Any]]) -> list[tuple[int, Reply]]:
        """``(HTTP status, reply)`` per request of one batch; a bad request never fails the others."""
        results: list[tuple[int, Reply] | None] = [None] * len(batch)
        valid: list[tuple[int, Request]] = []
        for i, fields in enumerate(batch):
            try:
                valid.append((i, self.parse(fields)))
            except RequestError as err:
                results[i] = (err.status, {"error": err.message, "status": err.status, "model": self.served.name})
        if valid:
            for (i, _), reply in zip(valid, self.infer([request for _, request in valid]), strict=True):
                results[i] = (200, reply)
        return results  # type: ignore[return-value]
