"""The inference runtime: one served model, from request payloads to JSON replies. No TorchServe here.

A served model lives in a folder (an extracted ``.mar``, see ``serving.package``):
``served.json`` (its name, version, modes, the request parameter that picks a mode, the backend),
``MANIFEST.json`` (SHA-256 of every other file, checked before anything is loaded), the run's
``defense.json`` and ``best.safetensors``, the ONNX graphs and ``export.json``, and the defense's
artifacts (DUCAT's ``pairing.json``, THAT's memory bank and FAISS index).

``Runtime.handle`` takes one batch of requests, each a payload (image bytes, base64 JSON or a pixel
array; ``serving.decode``) plus its options (from the JSON body, the query string, a form or a
``PARAMETER_HEADERS`` header), and returns ``(status, reply)`` per request: bad requests get a 4xx
with a message and do not disturb the others. One rule on every route: a parameter the model does
not take, a parameter given more than once (in two places, or twice in one) and a second image are
refused with a 400 that names them. Valid requests are grouped by mode and each group runs as one batch
through the backend (PyTorch eager or ONNX Runtime), then through the mode's post-processing
(``serving.postprocess``). Another engine (Triton, KServe, Ray Serve) can mount this class as it is.

On the ONNX backend (the default) the runtime needs onnxruntime, numpy, Pillow (and FAISS for a kNN mode):
it imports neither torch nor the training stack (only ``TorchBackend`` does, when it is chosen) and reads
archives with the torch-free ``training.run_files``, ``training.onnx_io`` and ``training.pairing``.
``tests/integration/test_runtime_imports.py`` holds it to that.
"""

from __future__ import annotations

import ctypes
import json
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from training.errors import RobustServeError
from training.onnx_io import EXPORT_JSON, graph_outputs, onnx_session
from training.pairing import ClassPairing
from training.run_files import read_defense_json, sha256_file

from .decode import InputSpec, RequestError, decode_image, is_json_text, option_text, parse_integer, parse_json
from .postprocess import POSTPROCESSORS, RAW_DUMMY_CLASSES, ModelContext, Reply, RequestOptions

SERVED_JSON = "served.json"
MANIFEST_JSON = "MANIFEST.json"
BACKENDS = ("onnx", "torch")
IMAGE_FIELDS = ("body", "data", "image", "file", "pixels")  # where a payload may arrive (JSON, form, raw)
MAX_TOP_K = 1000
# The request headers that carry a parameter, the same for every model: a model refuses the ones it does not
# take, as it refuses the same names in the JSON body or the query string.
PARAMETER_HEADERS = {"head": "X-Head", "mode": "X-Mode", "k": "X-K", "top_k": "X-Top-K"}
HEADER_PARAMETERS = {header.lower(): parameter for parameter, header in PARAMETER_HEADERS.items()}
MAX_OPTION_BYTES = 64  # a parameter value from the query string, a form field or a header; refused before decoding
JSON_CONTENT_TYPES = ("application/json",)
WITHHELD_RAW = ("the raw 2C scores of a model with a secret class pairing reveal the pairing to a client that "
                "sends enough queries, so this server does not serve them")
NO_IMAGE = ("no image in the request: send image bytes as the body, JSON {\"image\": <base64>} or "
            "{\"pixels\": [...]}, or a form field named data")


class ArchiveError(RobustServeError):
    """A model folder that must not be loaded: missing files or a manifest mismatch."""


def cuda_available() -> bool:
    """Whether the CUDA driver sees a GPU: what ``torch.cuda.is_available()`` answers, asked of the driver itself,
    so that a worker on the ONNX backend need not import torch (over a second and ~650 MiB) to learn it."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:  # no NVIDIA driver
        return False
    count = ctypes.c_int(0)
    return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


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
    # Per post-processing kind, the settings its PostProcessor.package wrote (kNN: default k, temperature, index)
    postprocess: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the modes withheld

    @classmethod
    def read(cls, folder: Path) -> ServedInfo:
        return cls.parse((Path(folder) / SERVED_JSON).read_text())

    @classmethod
    def from_archive(cls, archive: Path) -> ServedInfo:
        """The ``served.json`` inside a ``.mar``, without extracting anything else."""
        import zipfile

        with zipfile.ZipFile(archive) as mar:
            return cls.parse(mar.read(SERVED_JSON).decode())

    @classmethod
    def parse(cls, text: str) -> ServedInfo:
        data = json.loads(text)
        return cls(**{**data, "modes": tuple(data["modes"])})


class Backend(Protocol):
    def run(self, mode: str, pixels: np.ndarray) -> np.ndarray:
        """The mode's graph output for a batch of pixels [B, C, H, W] float32 in [0, 1]."""


class TorchBackend:
    """The eager modules: the run's weights rebuilt by the project's model code. Only this backend imports torch
    and the training stack, when it is chosen."""

    def __init__(self, folder: Path, modes: Sequence[str], device: str) -> None:
        from training.runs import load_run

        all_modes = load_run(folder, device=device).modes()
        self.graphs = {name: all_modes[name].exported.eval() for name in modes}
        self.device = device

    def run(self, mode: str, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
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
    pixels: np.ndarray  # [C, H, W] float32
    options: RequestOptions


def _short_text(name: str, value: Any) -> Any:
    """A parameter value from the query string, a form field or a header, refused by length before it is decoded."""
    if isinstance(value, bytes | bytearray | str) and len(value) > MAX_OPTION_BYTES:
        raise RequestError(f"the value of {reprlib.repr(name)} is {len(value)} characters long; parameter values "
                           f"are at most {MAX_OPTION_BYTES}", status=413)
    return option_text(value)


@dataclass(frozen=True)
class Fields:
    """One request as its transport delivered it.

    ``values``: the body, form fields and query parameters by name (TorchServe's dict for one request).
    ``headers``: the request headers (any case), of which only ``PARAMETER_HEADERS`` are read.
    ``content_types``: a value's content type where the transport knows it (the body's ``Content-Type``).
    ``repeated``: the names the transport saw more than once in the query string or form, whose values it
    merged into one (TorchServe keeps the last).
    """

    values: Mapping[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)
    content_types: Mapping[str, str] = field(default_factory=dict)
    repeated: tuple[str, ...] = ()


def _is_json_type(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media in JSON_CONTENT_TYPES or media.endswith("+json")


def withheld_modes(postprocess: Mapping[str, str], pairing: ClassPairing | None,
                   raw_with_secret_pairing: bool = False) -> dict[str, str]:
    """The modes a model must not serve, each with the reason: DUCAT's raw scores when its class pairing is
    secret, unless the operator turned them on (``PackageSettings.raw_with_secret_pairing``)."""
    if pairing is None or pairing.is_identity or raw_with_secret_pairing:
        return {}
    return {mode: WITHHELD_RAW for mode, kind in postprocess.items() if kind == RAW_DUMMY_CLASSES}


class Runtime:
    """One served model: request options and payloads in, replies out."""

    def __init__(self, folder: str | Path, *, backend: str | None = None, device: str | None = None) -> None:
        self.folder = Path(folder)
        verify_manifest(self.folder)
        self.served = ServedInfo.read(self.folder)
        self.info = read_defense_json(self.folder)
        self.device = device or ("cuda" if cuda_available() else "cpu")
        self.backend_name = backend or self.served.backend
        if self.backend_name not in BACKENDS:
            raise ArchiveError(f"unknown backend {self.backend_name!r}; known: {', '.join(BACKENDS)}")
        self.backend: Backend = BACKEND_CLASSES[self.backend_name](self.folder, self.served.modes, self.device)
        self.input_spec = InputSpec(shape=tuple(self.info["input_shape"]))  # type: ignore[arg-type]
        exported = json.loads((self.folder / EXPORT_JSON).read_text())["modes"]
        self.postprocess = {mode: exported[mode]["postprocess"] for mode in self.served.modes}
        self.context = ModelContext(tuple(self.info["classes"]))
        for kind in dict.fromkeys(self.postprocess.values()):
            POSTPROCESSORS[kind].load(self.folder, self.served.postprocess.get(kind, {}), self.context)
        pairing = self.context.pairing
        # The modes packaging left out, and any this archive lists that the rule withholds (an archive packaged
        # before the rule): it holds here, where the model is served.
        self.withheld = {**self.served.extra.get("withheld_modes", {}), **withheld_modes(
            self.postprocess, pairing, bool(self.served.extra.get("raw_with_secret_pairing", False)))}
        self.modes = tuple(mode for mode in self.served.modes if mode not in self.withheld)

    # -- requests -------------------------------------------------------------------------------

    @property
    def parameters(self) -> tuple[str, ...]:
        """The option names a request may carry."""
        own = (name for kind in self.postprocess.values() for name in POSTPROCESSORS[kind].parameters)
        return (self.served.mode_parameter, "top_k", *dict.fromkeys(own))

    def describe(self) -> dict[str, Any]:
        """What a client may ask this model (served on GET-like introspection and in the demo)."""
        return {"model": self.served.name, "version": self.served.version, "defense": self.served.defense,
                "modes": list(self.modes), "withheld_modes": dict(self.withheld),
                "mode_parameter": self.served.mode_parameter,
                "parameters": list(self.parameters), "backend": self.backend_name, "device": self.device,
                "input_shape": list(self.input_spec.shape), "classes": list(self.context.class_names),
                "knn": None if self.context.bank is None else {"bank_size": len(self.context.bank),
                                                               "default_k": self.context.default_k,
                                                               "index_device": self.context.bank.device}}

    def split(self, fields: Mapping[str, Any] | Fields) -> tuple[Any, dict[str, Any]]:
        """One request's fields -> (payload, options); a plain mapping is ``Fields(values=mapping)``.

        Options come from the query string or form fields, the ``PARAMETER_HEADERS`` headers and the JSON
        body's keys beside the image; each may be given once, in one place."""
        request = fields if isinstance(fields, Fields) else Fields(fields)
        if request.repeated:
            raise RequestError(f"{', '.join(map(repr, request.repeated))} given more than once in the query string "
                               "or form: send one image and each parameter once")
        payloads = [name for name in IMAGE_FIELDS if request.values.get(name) not in (None, b"", bytearray())]
        if not payloads:
            raise RequestError(NO_IMAGE)
        if len(payloads) > 1:
            raise RequestError(f"the request carries several images ({', '.join(payloads)}); send one")
        places: dict[str, list[str]] = {}
        options: dict[str, Any] = {}

        def add(name: str, value: Any, place: str) -> None:
            places.setdefault(name, []).append(place)
            options[name] = value

        for name, value in request.values.items():
            if name not in IMAGE_FIELDS:
                add(name, _short_text(name, value), "the query string or a form field")
        for header, value in request.headers.items():
            if header.lower() in HEADER_PARAMETERS:
                add(HEADER_PARAMETERS[header.lower()], _short_text(header, value), f"the {header} header")
        payload = request.values[payloads[0]]
        # JSON arrives as bytes (the server leaves bodies undecoded), as text from in-process callers, or parsed.
        # Parse it here, by the content type or by its first character, so that the limits apply before parsing
        # and its options are checked whatever the content type says.
        if isinstance(payload, bytes | bytearray | str) and (_is_json_type(request.content_types.get(payloads[0]))
                                                             or is_json_text(payload)):
            payload = parse_json(payload, self.input_spec)
            if payload is None:
                raise RequestError(NO_IMAGE)
        if isinstance(payload, dict):
            for key, value in payload.items():
                if key not in ("image", "pixels"):
                    add(key, value, "the JSON body")
        repeated = [f"{name} ({' and '.join(where)})" for name, where in places.items() if len(where) > 1]
        if repeated:
            raise RequestError(f"given more than once: {'; '.join(repeated)}. Give each parameter once")
        return payload, options

    def parse_options(self, options: Mapping[str, Any]) -> RequestOptions:
        unknown = sorted(set(options) - set(self.parameters))
        if unknown:
            raise RequestError(f"unknown parameter(s) {', '.join(unknown)} for model {self.served.name}; "
                               f"it takes: {', '.join(self.parameters)}")
        mode = option_text(options.get(self.served.mode_parameter, self.modes[0]))
        if isinstance(mode, str) and mode in self.withheld:  # a JSON list or object is no mode, and unhashable
            raise RequestError(f"{self.served.mode_parameter} {mode} is not served by model {self.served.name}: "
                               f"{self.withheld[mode]}", status=403)
        if mode not in self.modes:
            raise RequestError(f"{self.served.mode_parameter} must be one of {', '.join(self.modes)} for "
                               f"model {self.served.name}, got {reprlib.repr(mode)}")
        top_k = parse_integer("top_k", options.get("top_k", 5), 1, MAX_TOP_K)
        return RequestOptions(mode, top_k, POSTPROCESSORS[self.postprocess[mode]].options(options, self.context))

    def parse(self, fields: Mapping[str, Any] | Fields) -> Request:
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
            pixels = np.stack([requests[i].pixels for i in members]).astype(np.float32, copy=False)
            outputs = self.backend.run(mode, pixels)
            bodies = POSTPROCESSORS[self.postprocess[mode]].reply(outputs, [requests[i].options for i in members],
                                                                   self.context)
            for i, body in zip(members, bodies, strict=True):
                replies[i] = {"model": self.served.name, "version": self.served.version, "mode": mode, **body}
        return replies  # type: ignore[return-value]

    def handle(self, batch: Sequence[Mapping[str, Any] | Fields]) -> list[tuple[int, Reply]]:
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
