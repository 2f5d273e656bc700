"""A small REST client for the served models (standard library only).

    client = Client()                        # http://127.0.0.1:8080, the inference key from the server's key file
    client.predict("shirt.png", model="dhat", head="both")
    client.predict(pixels_array, model="that_knn", k=20)

Images go as JSON ``{"image": <base64>}`` (files, bytes) or ``{"pixels": [...]}`` (arrays in
[0, 1]); options ride in the same JSON body. A 4xx or 5xx reply raises ``ClientError`` with the
server's message.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np

from training.errors import RobustServeError

from .served_models import SERVED_MODELS

DEFAULT_URL = "http://127.0.0.1:8080"


class ClientError(RobustServeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def image_payload(image: str | Path | bytes | np.ndarray | Any) -> dict[str, Any]:
    """The JSON body part that carries ``image``: a path or encoded bytes as base64, an array as pixels."""
    if isinstance(image, str | Path):
        image = Path(image).read_bytes()
    if isinstance(image, bytes | bytearray):
        return {"image": base64.b64encode(bytes(image)).decode("ascii")}
    return {"pixels": np.asarray(image, dtype=np.float64).tolist()}


class Client:
    """``context``: the TLS context for an https:// url (e.g. ``serving.proxy.client_context``, which trusts the
    proxy's self-signed certificate); None: Python's default, the system's certificate authorities."""

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None, timeout: float = 60.0,
                 context: ssl.SSLContext | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.context = context

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> tuple[int, bytes]:
        """``(status, body)`` of one HTTP call; 4xx/5xx are returned, not raised."""
        headers = {"Content-Type": content_type}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        call = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(call, timeout=self.timeout, context=self.context) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ClientError(0, f"cannot reach {self.url} ({reason}); is TorchServe running? "
                                 f"(robustserve serve start)") from err

    def predict(self, image: str | Path | bytes | np.ndarray | Any, *, model: str, **options: Any) -> dict[str, Any]:
        """The model's reply for one image; ``options`` are request parameters (head, mode, k, top_k)."""
        body = {**image_payload(image), **{k: v for k, v in options.items() if v is not None}}
        status, raw = self.request("POST", f"/predictions/{model}", json.dumps(body).encode())
        try:
            reply = json.loads(raw)
        except ValueError:
            reply = {"error": raw.decode("utf-8", "replace")[:500]}
        if status != 200:
            message = reply.get("error") or reply.get("message") if isinstance(reply, dict) else str(reply)
            # TorchServe's frontend answers some refusals itself with an empty body (413 over max_request_size).
            raise ClientError(status, str(message) if message else HTTPStatus(status).phrase)
        return reply


def write_example_image(run_dir: Path, path: Path) -> Path:
    """The first evaluation test image of a run's dataset as a PNG at ``path`` (for the curl examples)."""
    from serving.decode import png_bytes
    from training.checkpoint import atomic_write
    from training.runs import load_test_subset, read_defense_json

    info = read_defense_json(Path(run_dir))
    x, _, _ = load_test_subset(info, 1, info["config"].get("data_root"))
    png = png_bytes(x[0])
    atomic_write(path, lambda tmp: tmp.write_bytes(png))
    return path


def curl_examples(inference_address: str, key_file: Path, image: Path, models: list[str]) -> list[str]:
    """Shell commands that exercise each served behaviour (the inference key read from ``key_file``)."""
    url = inference_address
    lines = [f"TOKEN=$(python3 -c 'import json; print(json.load(open(\"{key_file}\"))[\"inference\"][\"key\"])')",
             f"IMG={image}"]
    auth = '-H "Authorization: Bearer $TOKEN"'
    # Without a content type curl says form-urlencoded, and TorchServe's frontend fails to parse the PNG.
    png = "-H 'Content-Type: image/png' --data-binary @$IMG"
    curl = f"curl -s -w '\\n' {auth}"
    for model in models:
        # TorchServe passes query parameters on /<model>/predict, not on /predictions/<model> (its frontend).
        example = SERVED_MODELS[model].example if model in SERVED_MODELS else {}
        query = "&".join(f"{name}={value}" for name, value in example.items())
        lines.append(f"{curl} {png} '{url}/{model}/predict?{query}'" if query else
                     f"{curl} {png} {url}/predictions/{model}")
    if models:  # the other ways a parameter can arrive, on the first model: a form field, a header, a JSON body
        first = models[0]
        lines += [f"{curl} -F data=@$IMG -F top_k=3 {url}/predictions/{first}",
                  f"{curl} -H 'X-Top-K: 3' {png} {url}/predictions/{first}",
                  f"{curl} -H 'Content-Type: application/json' "
                  f"-d \"{{\\\"image\\\": \\\"$(base64 -w0 $IMG)\\\", \\\"top_k\\\": 3}}\" {url}/predictions/{first}"]
    return lines
