"""What every served defense says about an image, over REST, and the side-by-side table the page shows.

An endpoint is one served model in one mode (``dhat`` x main/second/both, ``ducat`` x recovered/raw,
``that_knn`` x knn, ...), listed from ``serving.package.SERVED_MODELS``. ``ask_all`` sends one PNG to
every endpoint; a model this TorchServe does not serve (404) is left out, any other refusal stays in
its row as a message. ``comparison_html`` renders the clean and adversarial replies side by side
with probability bars and the defenses' attack signals; each cell shows only what the reply says.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.client import Client, ClientError
from serving.package import SERVED_MODELS
from training.errors import RobustServeError

Reply = dict[str, Any]
TOP_K = 3  # bars per cell
NEIGHBOURS_SHOWN = 8


@dataclass(frozen=True)
class Endpoint:
    model: str  # TorchServe model name
    mode: str
    parameter: str  # the request field that picks the mode
    recipe: str  # the run it serves

    @property
    def label(self) -> str:
        return f"{self.model} · {self.mode}"

    @property
    def options(self) -> dict[str, str]:
        return {self.parameter: self.mode}


def served_endpoints() -> list[Endpoint]:
    """Every (model, mode) the packaging can serve, defenses first (``SERVED_MODELS``' order)."""
    from training.recipes import get_recipe

    return [Endpoint(model.name, mode, model.mode_parameter, model.recipe) for model in SERVED_MODELS.values()
            for mode in (model.modes or get_recipe(model.recipe).serving_modes)]


@dataclass(frozen=True)
class Answer:
    endpoint: Endpoint
    reply: Reply | None  # None when the endpoint refused the image
    error: str | None = None


class ServerDown(RobustServeError):
    """TorchServe answered nothing; the message says what to do."""


def ask_all(client: Client, png: bytes, endpoints: Sequence[Endpoint], top_k: int = TOP_K) -> list[Answer]:
    """The reply of every served endpoint for one PNG (concurrently), in ``endpoints`` order."""

    def ask(endpoint: Endpoint) -> Answer | None:
        try:
            return Answer(endpoint, client.predict(png, model=endpoint.model, top_k=top_k, **endpoint.options))
        except ClientError as err:
            if err.status == 0:  # nothing listens: no row can say anything
                raise ServerDown(str(err)) from None
            return None if err.status == 404 else Answer(endpoint, None, f"HTTP {err.status}: {err.message}")

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = [a for a in pool.map(ask, endpoints) if a is not None]
    if not answers:
        raise ServerDown(f"TorchServe at {client.url} serves none of the demo's models "
                         f"({', '.join(sorted({e.model for e in endpoints}))}); package and serve some first")
    if all(a.reply is None for a in answers):
        raise ServerDown(f"TorchServe at {client.url} refused every request, e.g. {answers[0].error}")
    return answers


# ---------------------------------------------------------------------------------------------- rendering


def signal_text(reply: Reply) -> str:
    """A defense's attack signal in words, or "" when the reply has none."""
    signal = reply.get("signal") or {}
    if "dummy_class_hit" in signal:
        hit = "yes" if signal["dummy_class_hit"] else "no"
        return f"dummy-class hit: {hit} (raw: {signal['raw_prediction']['name']})"
    if "heads_disagree" in signal:
        verdict = "yes" if signal["heads_disagree"] else "no"
        return (f"heads disagree: {verdict} (main: {signal['main_head']['name']}, "
                f"second: {signal['second_head']['name']})")
    if "agreement" in signal:
        return f"kNN agreement: {signal['agreement']:.0%} of k = {signal['k']}"
    return ""


def percent(probability: float) -> str:
    return f"{100 * probability:.1f}%"


def _cell(answer: Answer | None) -> str:
    if answer is None:
        return '<td class="reply"></td>'
    if answer.reply is None:
        return f'<td class="reply refused">{html.escape(answer.error or "")}</td>'
    reply = answer.reply
    bars = "".join(
        f'<div class="bar"><span style="width:{100 * e["probability"]:.1f}%"></span>'
        f'<label>{html.escape(e["name"])} {percent(e["probability"])}</label></div>' for e in reply["top_k"])
    signal = signal_text(reply)
    return (f'<td class="reply"><div class="prediction">{html.escape(reply["prediction"]["name"])}</div>{bars}'
            + (f'<div class="signal">{html.escape(signal)}</div>' if signal else "") + "</td>")


def fooled(clean: Answer, adversarial: Answer | None) -> bool | None:
    """Whether the adversarial image changed the endpoint's prediction; None when either image got no reply."""
    if adversarial is None or clean.reply is None or adversarial.reply is None:
        return None
    return clean.reply["prediction"]["index"] != adversarial.reply["prediction"]["index"]


def _verdict(clean: Answer, adversarial: Answer | None) -> str:
    changed = fooled(clean, adversarial)
    if changed is None:
        return '<td class="verdict"></td>'
    return (f'<td class="verdict {"changed" if changed else "held"}">'
            f'{"fooled" if changed else "held"}</td>')


def comparison_html(clean: Sequence[Answer], adversarial: Sequence[Answer] | None, attacked: Endpoint) -> str:
    """The table of every endpoint's reply for the clean and the adversarial image; the attacked row marked."""
    by_endpoint = {a.endpoint: a for a in adversarial or ()}
    rows = []
    for answer in clean:
        endpoint = answer.endpoint
        mark = ' class="attacked"' if endpoint == attacked else ""
        rows.append(f'<tr{mark} data-model="{html.escape(endpoint.model)}" data-mode="{html.escape(endpoint.mode)}">'
                    f'<th>{html.escape(endpoint.label)}' + ("<br><small>attacked</small>" if mark else "") + "</th>"
                    f"{_cell(answer)}{_cell(by_endpoint.get(endpoint))}{_verdict(answer, by_endpoint.get(endpoint))}"
                    "</tr>")
    return ('<table id="comparison-table"><thead><tr><th>served model · mode</th><th>clean image</th>'
            '<th>adversarial image</th><th></th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def neighbours(reply: Reply, train_images: np.ndarray) -> list[tuple[np.ndarray, str]]:
    """The nearest training images of a kNN reply as captioned thumbnails (its ids index the training split)."""
    return [(train_images[n["id"]], f"#{n['id']} {n['name']} ({n['similarity']:.2f})")
            for n in reply.get("neighbours", [])[:NEIGHBOURS_SHOWN]]
