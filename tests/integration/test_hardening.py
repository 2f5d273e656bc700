"""Hardening: a corpus of bad requests sent over REST to every served model, and what must hold after it.

One real TorchServe (loopback, token auth) serves the archives of tiny trained runs of every serving
behaviour: pgd_at, trades, dhat, ducat, that and that_knn. Every kind of bad request in ``KINDS`` goes to
every model, all of them at once from a thread pool so that TorchServe batches them dynamically with each
other and with good requests sent alongside. Each must be answered with its expected 4xx status and a JSON
object holding a message that says what was wrong (the runtime's ``{"error", "status"}``, or TorchServe's own
``{"code", "type", "message"}`` for routing and authorization); the good requests in the same batches get
their 200. After the corpus every model's worker is the process it was before (same pid and start time: no
worker died or was restarted), the model log records no failed batch, and a good request to each model is
answered 200.

What TorchServe's frontend does on its own, found here and relied on:

* a body over ``max_request_size`` is refused by the frontend before any worker sees it: ``413`` with an
  empty body, no content type, and the connection closed (a client still sending may see a reset instead).
  ``serving.server`` sets the limit to 64 MiB, far above the runtime's 8 MiB image limit (11.2 MB as base64
  JSON), so a 50 MiB image gets the runtime's JSON 413; TorchServe's default, 6553500 bytes, would refuse
  some images the runtime accepts, with that bare 413;
* an unknown model or version: ``404`` with TorchServe's JSON (``ModelNotFoundException``,
  ``ModelVersionNotFoundException``);
* a missing or wrong token: ``400`` with ``InvalidKeyException`` (TorchServe does not answer 401);
* a GET (or PUT, DELETE) on ``/predictions/{model}`` reaches the handler like a POST: with no body it is
  answered as an empty request;
* TorchServe's worker turns a request's query parameters and form fields into a dict, so a name given twice
  keeps its last value; the handler learns the repeated names from its hook (``handlers.base``) and refuses.

``PROXY_KINDS`` go through the nginx proxy in front of the same TorchServe (``served_proxy``): a client that
sends its headers or body too slowly is cut off within the proxy's timeout, a body over its limit is refused
from its Content-Length or as it streams, plain HTTP on its TLS port is refused, each with a JSON message
from the proxy, and none of them reaches TorchServe (its access log never names their unique path).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from helpers import tls_exchange
from PIL import Image

from serving import proxy, server
from serving.decode import InputSpec

pytestmark = pytest.mark.slow

MODELS = ("pgd_at", "trades", "dhat", "ducat", "that", "that_knn")
KNN_MODELS = ("that_knn",)
SIZE = 28  # the tiny runs are Fashion-MNIST shaped: 28x28 gray
MAX_BYTES = InputSpec((1, SIZE, SIZE)).max_bytes  # the runtime's limit on an encoded image


# ---------------------------------------------------------------------------------------------- payloads


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def good_image() -> Image.Image:
    """A valid input: 28x28 gray noise (the prediction does not matter, only that it is answered)."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE), dtype=np.uint8), mode="L")


GOOD = png(good_image())


def _chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with a valid CRC, so that only what the chunk says is wrong."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header declares ``width`` x ``height`` 8-bit gray pixels: a decompression
    bomb is dangerous through what it declares, and a decoder that trusted it would allocate width x height."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


@cache
def real_bomb() -> bytes:
    """A real PNG of 4100x4100 black pixels: 16 KB that decode to 16.8 MB, just over the runtime's 4096x4096."""
    return png(Image.new("L", (4100, 4100)))


@cache
def text_bomb() -> bytes:
    """The good PNG with a zTXt chunk (before the pixels) that inflates to 64 MiB of text: Pillow caps text
    chunks (PngImagePlugin.MAX_TEXT_CHUNK) and raises instead of inflating it."""
    bomb = _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"A" * (64 * 1024 * 1024), 9))
    end_of_ihdr = 8 + 25  # signature, then IHDR: length, type, 13 bytes of data, CRC
    return GOOD[:end_of_ihdr] + bomb + GOOD[end_of_ihdr:]


@cache
def corrupt_png() -> bytes:
    """The good PNG with the middle of its compressed pixel data scrambled (chunk CRCs left as they were)."""
    start = GOOD.index(b"IDAT") + 4
    length = int.from_bytes(GOOD[start - 8:start - 4], "big")
    first, last = start + 10, start + length - 10
    return GOOD[:first] + bytes(b ^ 0x5A for b in GOOD[first:last]) + GOOD[last:]


def with_bad_crc(data: bytes, kind: bytes) -> bytes:
    """The PNG with the CRC of its first ``kind`` chunk flipped; the chunk's data are untouched."""
    start = data.index(kind) - 4
    end = start + 8 + int.from_bytes(data[start:start + 4], "big")
    return data[:end] + bytes(b ^ 0xFF for b in data[end:end + 4]) + data[end + 4:]


@cache
def json_bomb_by_size() -> bytes:
    """A pixel array 1 MiB over the JSON body limit: parsed, it would cost the worker seconds and hundreds of MB."""
    limit = InputSpec((1, SIZE, SIZE)).max_json_bytes
    row = b"[" + b",".join([b"0.5"] * SIZE) + b"]"
    rows = (limit + 2**20) // (len(row) + 1) + 1
    return b'{"pixels": [' + b",".join([row] * rows) + b"]}"


def json_bomb_by_values() -> bytes:
    """300,000 values in 600 kB: under the byte limit, far over the values a request can hold."""
    return b'{"pixels": [' + b",".join([b"0"] * 300_000) + b"]}"


def colour_image() -> bytes:
    """RGB whose channels differ: real colour, which a grayscale model must refuse rather than guess at."""
    pixels = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    pixels[..., 0] = 200
    return png(Image.fromarray(pixels, mode="RGB"))


@cache
def gif() -> bytes:
    """A valid 28x28 GIF: a real image, in a format the server does not parse."""
    buffer = io.BytesIO()
    good_image().save(buffer, format="GIF")
    return buffer.getvalue()


def transparent_image() -> bytes:
    return png(Image.new("RGBA", (SIZE, SIZE), (255, 255, 255, 0)))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def as_json(value: Any) -> bytes:
    # allow_nan (the default) writes NaN and Infinity literals, which Python's json (TorchServe's worker and
    # the runtime) reads back as floats: exactly what a careless client sends.
    return json.dumps(value).encode()


def pixels(value: Any = 0.5) -> list[list[Any]]:
    return [[value] * SIZE for _ in range(SIZE)]


def form(fields: dict[str, bytes] | list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body with ``fields`` (a field named data or image is sent as a file)."""
    boundary = "robustserve-hardening"
    parts = []
    for name, value in fields.items() if isinstance(fields, dict) else fields:
        filename = f'; filename="{name}.png"' if name in ("data", "image") else ""
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n\r\n'.encode()
                     + value + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# ---------------------------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Case:
    """One HTTP request and the answer it must get."""

    path: str
    body: bytes | None = None
    content_type: str | None = "application/json"
    status: int = 400
    message: str = ""  # must be in the reply's message (case-insensitive)
    method: str = "POST"
    auth: str = "inference"  # the key sent: "inference", "wrong" or "none"
    headers: tuple[tuple[str, str], ...] = ()  # more request headers


@dataclass(frozen=True)
class Model:
    """What a case may depend on: the model's name, the parameter that picks its mode, and its kNN bank."""

    name: str
    bank: int  # vectors in the kNN memory bank (that_knn), 0 for the others

    @property
    def mode_parameter(self) -> str:
        return "head" if self.name == "dhat" else "mode"

    @property
    def predictions(self) -> str:
        return f"/predictions/{self.name}"

    def k_case(self, k: Any, message: str) -> Case:
        """``k`` is a parameter of the kNN model only; every other model must call it unknown."""
        expected = message if self.name in KNN_MODELS else "unknown parameter(s) k"
        return Case(self.predictions, as_json({"image": b64(GOOD), "k": k}), message=expected)

    @property
    def foreign_header(self) -> tuple[str, str]:
        """A parameter header this model does not take: X-K, or X-Head for the kNN model."""
        return ("X-Head", "main") if self.name in KNN_MODELS else ("X-K", "5")


# Built once: the large payloads are shared by the six models' requests.
IMAGE_50_MIB = b"\x89PNG\r\n\x1a\n" + bytes(50 * 1024 * 1024 - 8)
OVER_LIMIT_BASE64 = as_json({"image": b64(b"\x89PNG\r\n\x1a\n" + bytes(MAX_BYTES - 7))})
TOO_LARGE = f"more than the limit of {MAX_BYTES}"
NOT_PNG_OR_JPEG = "expected a PNG or JPEG image"
NO_IMAGE = "no image in the request"

# TorchServe's other inference routes to a model; each reaches the same handler as /predictions/{m}.
ROUTES = {"model_predict": "/{m}/predict", "invocations": "/invocations?model_name={m}",
          "kserve_v1": "/v1/models/{m}:predict", "kserve_v2": "/v2/models/{m}/infer",
          "explanations": "/explanations/{m}"}

# kind -> the case for one model. A failing test is named [kind-model].
KINDS: dict[str, Callable[[Model], Case]] = {
    # -- bytes that are not a usable image
    "empty_body": lambda m: Case(m.predictions, b"", "image/png", message=NO_IMAGE),
    "not_an_image": lambda m: Case(m.predictions, b"this is not an image", "image/png", 415, NOT_PNG_OR_JPEG),
    "gif_image": lambda m: Case(m.predictions, gif(), "image/gif", 415, NOT_PNG_OR_JPEG),
    "truncated_png": lambda m: Case(m.predictions, GOOD[:70], "image/png", message="truncated or corrupt"),
    "truncated_jpeg": lambda m: Case(m.predictions, jpeg(good_image())[:200], "image/jpeg",
                                     message="truncated or corrupt"),
    "corrupt_png": lambda m: Case(m.predictions, corrupt_png(), "image/png", message="truncated or corrupt"),
    # Pillow never checks IDAT's CRC (the pixels decoded), and a bad IHDR CRC made its open fail as "unidentified".
    "png_bad_idat_crc": lambda m: Case(m.predictions, with_bad_crc(GOOD, b"IDAT"), "image/png",
                                       message="b'IDAT' chunk at byte 33 does not match its CRC"),
    "png_bad_ihdr_crc": lambda m: Case(m.predictions, with_bad_crc(GOOD, b"IHDR"), "image/png",
                                       message="b'IHDR' chunk at byte 8 does not match its CRC"),
    # -- too large: bytes, and pixels declared by the header (decompression bombs)
    "image_50_mib": lambda m: Case(m.predictions, IMAGE_50_MIB, "image/png", 413, TOO_LARGE),
    "base64_over_limit": lambda m: Case(m.predictions, OVER_LIMIT_BASE64, status=413, message=TOO_LARGE),
    # Refused from their size before any parser runs (the worker used to json.loads them first).
    "json_bomb_by_size": lambda m: Case(m.predictions, json_bomb_by_size(), status=413,
                                        message=f"the JSON body has {len(json_bomb_by_size())} bytes, more than"),
    "json_bomb_by_size_as_text": lambda m: Case(m.predictions, json_bomb_by_size(), "text/plain", 413,
                                                "the JSON body has"),
    "json_bomb_by_values": lambda m: Case(m.predictions, json_bomb_by_values(), status=413,
                                          message="the JSON body has 299999 commas"),
    "bomb_declaring_10g_pixels": lambda m: Case(m.predictions, png_declaring(100_000, 100_000), "image/png", 413,
                                                "too many pixels"),
    # Between Pillow's MAX_IMAGE_PIXELS and twice that Pillow only warns; the runtime makes the warning an error.
    "bomb_declaring_100m_pixels": lambda m: Case(m.predictions, png_declaring(10_000, 10_000), "image/png", 413,
                                                 "too many pixels"),
    "bomb_4100x4100_zeros": lambda m: Case(m.predictions, real_bomb(), "image/png", 413, "16810000 pixels"),
    "text_chunk_bomb": lambda m: Case(m.predictions, text_bomb(), "image/png", message="decompressed data too large"),
    # -- images of the wrong kind for the model
    "colour_to_gray_model": lambda m: Case(m.predictions, colour_image(), "image/png", message="grayscale"),
    "wrong_size": lambda m: Case(m.predictions, png(Image.new("L", (32, 32))), "image/png",
                                 message="expected a 28x28 image"),
    "transparent_pixels": lambda m: Case(m.predictions, transparent_image(), "image/png", message="transparent"),
    "cmyk_jpeg": lambda m: Case(m.predictions, jpeg(Image.new("CMYK", (SIZE, SIZE))), "image/jpeg",
                                message="unsupported image mode cmyk"),
    # -- JSON pixel arrays
    "pixels_nan": lambda m: Case(m.predictions, as_json({"pixels": pixels(float("nan"))}), message="nan"),
    "pixels_inf": lambda m: Case(m.predictions, as_json({"pixels": pixels(float("inf"))}), message="inf"),
    "pixels_0_255": lambda m: Case(m.predictions, as_json({"pixels": pixels(255)}), message="divide 0-255 values"),
    "pixels_ragged": lambda m: Case(m.predictions, as_json({"pixels": pixels()[:-1] + [[0.5]]}),
                                    message="rectangular"),
    "pixels_wrong_shape": lambda m: Case(m.predictions, as_json({"pixels": [[0.5] * 27] * 27}),
                                         message="expected a pixel array of shape"),
    "pixels_booleans": lambda m: Case(m.predictions, as_json({"pixels": pixels(True)}),
                                      message="expected a number in [0, 1]"),
    # -- JSON of the wrong types, or not JSON at all
    "image_is_a_number": lambda m: Case(m.predictions, as_json({"image": 5}), message='"image" must be'),
    "pixels_is_a_string": lambda m: Case(m.predictions, as_json({"pixels": "x"}), message='"pixels" must be'),
    "json_string_of_a_number": lambda m: Case(m.predictions, as_json("5"), message="invalid base64"),
    "json_number": lambda m: Case(m.predictions, as_json(5), message="expected image bytes"),
    "json_null": lambda m: Case(m.predictions, as_json(None), message=NO_IMAGE),
    "json_empty_object": lambda m: Case(m.predictions, as_json({}), message="exactly one of"),
    "image_and_pixels": lambda m: Case(m.predictions, as_json({"image": b64(GOOD), "pixels": pixels()}),
                                       message="exactly one of"),
    "invalid_json": lambda m: Case(m.predictions, b'{"image": ', message="does not parse"),
    "invalid_utf8_json": lambda m: Case(m.predictions, b'{"image": "\xff\xfe"}', message="does not parse"),
    # Python's json raises RecursionError, not ValueError, on deep nesting (was a 500 for the whole batch).
    "deeply_nested_json": lambda m: Case(m.predictions, b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
                                         message="does not parse"),
    "integer_of_5000_digits": lambda m: Case(m.predictions, b'{"pixels": [[' + b"9" * 5000 + b"]]}",
                                             message="does not parse"),
    "invalid_base64": lambda m: Case(m.predictions, as_json({"image": "not base64!"}), message="invalid base64"),
    "base64_of_text": lambda m: Case(m.predictions, as_json({"image": b64(b"hello")}), status=415,
                                     message=NOT_PNG_OR_JPEG),
    "data_url_not_base64": lambda m: Case(m.predictions, as_json({"image": "data:image/png,abc"}),
                                          message="base64 data url"),
    # -- parameters
    "unknown_parameter": lambda m: Case(m.predictions, as_json({"image": b64(GOOD), "colour": "red"}),
                                        message="unknown parameter(s) colour"),
    "unknown_mode": lambda m: Case(m.predictions, as_json({"image": b64(GOOD), m.mode_parameter: "bogus"}),
                                   message=f"{m.mode_parameter} must be one of"),
    # JSON sent as text/plain reaches the handler as a string; its options must be checked all the same
    # (they were silently ignored).
    "unknown_mode_as_text_plain": lambda m: Case(m.predictions, as_json({"image": b64(GOOD), m.mode_parameter: "x"}),
                                                 "text/plain", message=f"{m.mode_parameter} must be one of"),
    "top_k_zero": lambda m: Case(m.predictions, as_json({"image": b64(GOOD), "top_k": 0}),
                                 message="top_k must be from 1"),
    "top_k_not_a_number": lambda m: Case(m.predictions, as_json({"image": b64(GOOD), "top_k": "many"}),
                                         message="top_k must be an integer"),
    "top_k_float": lambda m: Case(m.predictions, as_json({"image": b64(GOOD), "top_k": 2.5}),
                                  message="top_k must be an integer"),
    # "²".isdigit() is True but int("²") raises, as int() does on over 4300 digits (both were 500s).
    "top_k_superscript_digit": lambda m: Case(f"/{m.name}/predict?top_k=%C2%B2", GOOD, "image/png",
                                              message="top_k must be an integer"),
    "top_k_of_5000_digits": lambda m: Case(m.predictions, as_json({"image": b64(GOOD), "top_k": "9" * 5000}),
                                           message="top_k must be an integer"),
    "k_zero": lambda m: m.k_case(0, "k must be from 1"),
    "k_over_the_bank": lambda m: m.k_case(m.bank + 1, f"k must be from 1 to {m.bank}"),
    "k_not_a_number": lambda m: m.k_case("ten", "k must be an integer"),
    "option_in_query_and_json": lambda m: Case(f"/{m.name}/predict?top_k=3", as_json({"image": b64(GOOD), "top_k": 4}),
                                               message="given more than once: top_k (the query string or a form "
                                                       "field and the JSON body)"),
    "option_in_query_and_header": lambda m: Case(f"/{m.name}/predict?top_k=3", GOOD, "image/png",
                                                 headers=(("X-Top-K", "3"),),
                                                 message="given more than once: top_k (the query string or a form "
                                                         "field and the X-Top-K header)"),
    "option_repeated_in_query": lambda m: Case(f"/invocations?model_name={m.name}&top_k=3&top_k=4", GOOD,
                                               "image/png", message="'top_k' given more than once in the query"),
    "option_repeated_in_json": lambda m: Case(m.predictions, f'{{"image": "{b64(GOOD)}", "top_k": 3, "top_k": 4}}'
                                              .encode(), message="the JSON body gives 'top_k' more than once"),
    "header_the_model_does_not_take": lambda m: Case(m.predictions, GOOD, "image/png", headers=(m.foreign_header,),
                                                     message="unknown parameter(s)"),
    "parameter_value_too_long": lambda m: Case(f"/{m.name}/predict?top_k={'1' * 100}", GOOD, "image/png", 413,
                                               "is 100 characters long"),
    "unknown_mode_in_query": lambda m: Case(f"/invocations?model_name={m.name}&{m.mode_parameter}=bogus", GOOD,
                                            "image/png", message=f"{m.mode_parameter} must be one of"),
    # -- forms
    "form_without_data": lambda m: Case(m.predictions, *form({"top_k": b"3"}), message=NO_IMAGE),
    "form_with_two_images": lambda m: Case(m.predictions, *form({"data": GOOD, "image": GOOD}),
                                           message="several images"),
    "form_with_two_data_fields": lambda m: Case(m.predictions, *form([("data", GOOD), ("data", png(Image.new(
        "L", (SIZE, SIZE))))]), message="'data' given more than once in the query string or form"),
    "form_data_not_an_image": lambda m: Case(m.predictions, *form({"data": b"hello"}), status=415,
                                             message=NOT_PNG_OR_JPEG),
    # -- every inference route of the model, with the wrong method, version, model or key
    **{f"gif_via_{route_name}": (lambda m, route=route: Case(route.format(m=m.name), gif(), "image/gif", 415,
                                                             NOT_PNG_OR_JPEG))
       for route_name, route in ROUTES.items()},
    "get_instead_of_post": lambda m: Case(m.predictions, method="GET", content_type=None, message=NO_IMAGE),
    "unknown_version": lambda m: Case(f"{m.predictions}/9.9", GOOD, "image/png", 404, "does not exist"),
    "unknown_model": lambda m: Case(f"{m.predictions}_missing", GOOD, "image/png", 404, "model not found"),
    "no_token": lambda m: Case(m.predictions, GOOD, "image/png", auth="none", message="token authorization failed"),
    "wrong_token": lambda m: Case(m.predictions, GOOD, "image/png", auth="wrong",
                                  message="token authorization failed"),
}
# Good requests sent amid the corpus: a bad request in a dynamic batch must not spoil the others' answers.
GOOD_CASES: dict[str, Callable[[Model], Case]] = {
    "png_body": lambda m: Case(m.predictions, GOOD, "image/png", 200),
    "base64_json": lambda m: Case(m.predictions, as_json({"image": b64(GOOD), "top_k": 3}), status=200),
    "pixels_json": lambda m: Case(m.predictions, as_json({"pixels": pixels()}), status=200),
}


# ---------------------------------------------------------------------------------------------- HTTP


@dataclass
class Answer:
    status: int
    content_type: str | None
    body: bytes
    reply: Any = field(init=False)

    def __post_init__(self) -> None:
        try:
            self.reply = json.loads(self.body)
        except ValueError:
            self.reply = None


def send(address: str, case: Case, keys: dict[str, str]) -> Answer:
    headers = ({"Content-Type": case.content_type} if case.content_type else {}) | dict(case.headers)
    token = {"inference": keys["inference"], "wrong": "not-the-key", "none": None}[case.auth]
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(address + case.path, data=case.body, method=case.method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return Answer(reply.status, reply.headers.get("Content-Type"), reply.read())
    except urllib.error.HTTPError as err:
        return Answer(err.code, err.headers.get("Content-Type"), err.read())


def workers(settings: server.ServerSettings, keys: dict[str, str]) -> dict[str, list[tuple[int, str, str]]]:
    """Model -> its workers as (pid, start time, status), from the management API."""
    found = {}
    for name in MODELS:
        request = urllib.request.Request(f"{settings.management_address}/models/{name}",
                                         headers={"Authorization": f"Bearer {keys['management']}"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            [description] = json.loads(reply.read())
        found[name] = [(int(w["pid"]), w["startTime"], w["status"]) for w in description["workers"]]
    return found


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def keys(served: server.ServerSettings) -> dict[str, str]:
    return server.read_keys(served)


@pytest.fixture(scope="module")
def models(served_store: Path) -> dict[str, Model]:
    with zipfile.ZipFile(served_store / "that_knn.mar") as archive:
        bank = json.loads(archive.read("served.json"))["postprocess"]["knn"]["index"]["vectors"]
    assert 1 < bank < 1000  # k over the bank must be over the bank, not over the runtime's cap of 1000
    return {name: Model(name, bank if name in KNN_MODELS else 0) for name in MODELS}


@dataclass
class CorpusRun:
    before: dict[str, list[tuple[int, str, str]]]  # the workers before the corpus
    answers: dict[tuple[str, str], tuple[Case, Answer]]  # (kind, model) -> what was sent and answered


@pytest.fixture(scope="module")
def corpus(served: server.ServerSettings, keys: dict[str, str], models: dict[str, Model]) -> CorpusRun:
    """Every kind (bad and good) to every model, all at once: TorchServe batches them together."""
    before = workers(served, keys)
    jobs = [(kind, name, build(models[name])) for kinds in (KINDS, GOOD_CASES) for kind, build in kinds.items()
            for name in MODELS]
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda job: send(served.inference_address, job[2], keys), jobs))
    return CorpusRun(before, {(kind, name): (case, answer) for (kind, name, case), answer in zip(jobs, answers,
                                                                                                 strict=True)})


# ---------------------------------------------------------------------------------------------- tests


def test_the_corpus_is_broad() -> None:
    assert len(KINDS) >= 20


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("kind", KINDS)
def test_bad_request_gets_its_4xx_with_a_json_message(kind: str, model: str, corpus: CorpusRun) -> None:
    case, answer = corpus.answers[kind, model]
    assert answer.status == case.status, (answer.status, answer.body[:300])
    assert answer.content_type is not None and answer.content_type.startswith("application/json")
    assert isinstance(answer.reply, dict), answer.body[:300]
    # The runtime answers {"error", "status", "model"}; TorchServe's frontend {"code", "type", "message"}.
    message = answer.reply.get("error") or answer.reply.get("message")
    assert isinstance(message, str) and case.message.lower() in message.lower(), message
    assert answer.reply.get("status", answer.reply.get("code")) == case.status
    if "error" in answer.reply:  # the runtime's own reply names the model
        assert answer.reply["model"] == model


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("kind", GOOD_CASES)
def test_good_requests_amid_the_corpus_are_answered(kind: str, model: str, corpus: CorpusRun) -> None:
    _, answer = corpus.answers[kind, model]
    assert answer.status == 200, answer.body[:300]
    assert answer.reply["model"] == model and answer.reply["prediction"]["name"]


@pytest.mark.parametrize("model", MODELS)
def test_no_worker_died_and_every_model_still_answers(model: str, served: server.ServerSettings,
                                                      keys: dict[str, str], corpus: CorpusRun) -> None:
    after = workers(served, keys)[model]
    assert after == corpus.before[model]  # same pid and start time: not a restarted worker
    assert [status for _, _, status in after] == ["READY"]
    assert all(psutil.pid_exists(pid) for pid, _, _ in after)
    answer = send(served.inference_address, Case(f"/predictions/{model}", GOOD, "image/png"), keys)
    assert answer.status == 200 and answer.reply["model"] == model


def test_the_model_log_records_no_failed_batch(served: server.ServerSettings, corpus: CorpusRun) -> None:
    log = (served.log_dir / "model_log.log").read_text(errors="replace")
    assert "robustserve: loaded" in log  # the right log: every model wrote this at load
    assert "robustserve: inference failed" not in log  # the handler's catch-all, answered 500


def test_the_frontend_limit_leaves_room_for_every_request_the_runtime_takes(served: server.ServerSettings) -> None:
    config = served.config_file.read_text().splitlines()
    assert f"max_request_size={served.max_request_bytes}" in config
    # The largest valid body: an image of max_bytes as base64 JSON (4/3 of it), plus parameters.
    assert served.max_request_bytes > 4 * (MAX_BYTES // 3 + 1) + 65536
    assert served.max_request_bytes > len(IMAGE_50_MIB)  # so the 50 MiB case above is the runtime's answer


def test_a_body_over_the_frontend_limit_is_refused_before_any_worker_sees_it(served: server.ServerSettings,
                                                                             keys: dict[str, str]) -> None:
    """Only the headers are sent: TorchServe checks Content-Length first and answers at once (a client still
    sending a body that large may see the connection reset instead of this answer)."""
    connection = http.client.HTTPConnection(served.host, served.inference_port, timeout=30)
    try:
        connection.putrequest("POST", "/predictions/pgd_at")
        connection.putheader("Authorization", f"Bearer {keys['inference']}")
        connection.putheader("Content-Type", "image/png")
        connection.putheader("Content-Length", str(served.max_request_bytes + 1))
        connection.endheaders()
        reply = connection.getresponse()
        # TorchServe's own 413: no body, no content type. What the runtime's JSON 413 cannot cover.
        assert reply.status == 413 and reply.read() == b"" and reply.getheader("Content-Type") is None
    finally:
        connection.close()


# ---------------------------------------------------------------------------------------------- through the proxy


def proxy_request(path: str, token: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", f"Authorization: Bearer {token}",
             *(f"{name}: {value}" for name, value in headers.items())]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


def torchserve_saw(served: server.ServerSettings, marker: str) -> bool:
    return marker in (served.log_dir / "access_log.log").read_text(errors="replace")


def wait_until_torchserve_saw(served: server.ServerSettings, marker: str, limit_s: float = 10) -> bool:
    """TorchServe writes its access log a little after the reply; a forwarded request shows within seconds."""
    deadline = time.monotonic() + limit_s
    while not torchserve_saw(served, marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


# kind -> (what the client sends for a path and token, the status the proxy answers with or None when it only
# closes the connection, a fragment of its JSON message, whether the client is cut off at the client timeout)
PROXY_KINDS: dict[str, tuple[Callable[[str, str, proxy.ProxySettings], list[bytes]], int | None, str, bool]] = {
    # A body promised and never sent: TorchServe alone held such a connection for good (issue 16). nginx closes
    # a timed-out connection without a reply (its access log says 408).
    "slow_body": (lambda path, token, s: [proxy_request(path, token, {"Content-Type": "image/png",
                                                                      "Content-Length": "1000"}, GOOD[:10])],
                  None, "", True),
    "slow_headers": (lambda path, token, s: [f"POST {path} HTTP/1.1\r\nHost: localhost\r\n".encode()],
                     None, "", True),
    "body_over_the_limit_by_content_length": (
        lambda path, token, s: [proxy_request(path, token, {"Content-Type": "image/png",
                                                            "Content-Length": str(s.max_body_bytes + 1)})],
        413, "larger than the limit of 12582912 bytes", False),
    "chunked_body_over_the_limit": (
        lambda path, token, s: [proxy_request(path, token, {"Content-Type": "application/json",
                                                            "Transfer-Encoding": "chunked"}),
                                f"{s.max_body_bytes + 1:x}\r\n".encode() + b"[" * (s.max_body_bytes + 1)
                                + b"\r\n0\r\n\r\n"],
        413, "larger than the limit", False),
}


@pytest.mark.parametrize("kind", PROXY_KINDS)
def test_the_proxy_refuses_slow_and_oversized_requests_before_torchserve_sees_them(
        kind: str, served: server.ServerSettings, served_proxy: proxy.ProxySettings, keys: dict[str, str]) -> None:
    build, status, message, slow = PROXY_KINDS[kind]
    marker = f"pgd_at-{kind}-{uuid.uuid4().hex}"  # a path only this request uses
    exchange = tls_exchange(served_proxy.host, served_proxy.port, proxy.client_context(served_proxy),
                            build(f"/predictions/{marker}", keys["inference"], served_proxy))
    assert exchange.status == status, exchange.reply[:300]
    if status is not None:
        reply = json.loads(exchange.body)
        assert reply["status"] == status and message in reply["error"]
    timeout = served_proxy.client_timeout_s
    if slow:  # cut off at the timeout, not before it and not long after (the test waits at most 30 s)
        assert timeout - 0.5 <= exchange.seconds <= timeout + 2 and exchange.first_byte_seconds is None, exchange
        if kind == "slow_body":  # the request line had arrived, so the proxy logs it, with its 408
            logged = (served_proxy.log_dir / "access.log").read_text().splitlines()
            assert any(marker in line and '" 408 ' in line for line in logged)
    else:  # answered at once, from the headers (nginx then lingers a little for the body it refused)
        assert exchange.first_byte_seconds is not None and exchange.first_byte_seconds < timeout, exchange
    # The same path, sent whole, does reach TorchServe (a 404: no such model), so its absence above means something.
    control = f"pgd_at-control-{uuid.uuid4().hex}"
    sent = tls_exchange(served_proxy.host, served_proxy.port, proxy.client_context(served_proxy),
                        [proxy_request(f"/predictions/{control}", keys["inference"],
                                       {"Content-Type": "image/png", "Content-Length": str(len(GOOD)),
                                        "Connection": "close"}, GOOD)])
    assert sent.status == 404 and wait_until_torchserve_saw(served, control)
    assert not torchserve_saw(served, marker)


def test_plain_http_on_the_proxy_port_gets_a_json_400(served_proxy: proxy.ProxySettings) -> None:
    connection = http.client.HTTPConnection(served_proxy.host, served_proxy.port, timeout=10)
    try:
        connection.request("POST", "/predictions/pgd_at", GOOD, {"Content-Type": "image/png"})
        reply = connection.getresponse()
        assert reply.status == 400 and "HTTPS only" in json.loads(reply.read())["error"]
    finally:
        connection.close()
