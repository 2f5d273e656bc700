"""What every served defense says about an image, over REST, and the side-by-side table the page shows.

An endpoint is one served model in one mode (``dhat`` x main/second/both, ``ducat`` x recovered,
``that_knn`` x knn, ...): what the running TorchServe loaded (``served_endpoints(state_dir)``: its
config.properties and each archive's served.json), or every model the packaging can serve when no
server ran yet. ``ask_all`` sends one PNG to every endpoint; a model this TorchServe does not serve
(404) is left out, any other refusal stays in its row as a message. ``comparison_html`` renders the
clean and adversarial replies side by side with probability bars, the defenses' attack signals and a
verdict per row (``verdict``: against the true class where the image has one); each cell shows only
what the reply says.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.client import Client, ClientError
from serving.runtime import ServedInfo
from serving.served_models import SERVED_MODELS
from serving.server import ServerSettings, read_config
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


def served_endpoints(state_dir: Path | None = None) -> list[Endpoint]:
    """Every (model, mode) to ask, defenses first (``SERVED_MODELS``' order).

    With ``state_dir``: the models its TorchServe loaded at start (config.properties' ``load_models``) in the
    modes each archive serves (its served.json: a secret DUCAT pairing's raw scores are not among them).
    Without one, or before any server wrote its config there: every model and mode the packaging can serve."""
    from training.recipes import get_recipe

    config = read_config(ServerSettings(state_dir=state_dir)) if state_dir is not None else {}
    if "load_models" not in config:
        return [Endpoint(model.name, mode, model.mode_parameter, model.recipe) for model in SERVED_MODELS.values()
                for mode in (model.modes or get_recipe(model.recipe).serving_modes)]
    store = Path(config["model_store"])
    served = [ServedInfo.from_archive(store / entry.split("=", 1)[1]) for entry in config["load_models"].split(",")
              if entry]
    order = list(SERVED_MODELS)
    served.sort(key=lambda info: order.index(info.name) if info.name in order else len(order))
    return [Endpoint(info.name, mode, info.mode_parameter, info.defense) for info in served for mode in info.modes]


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
        return f"dummy-class hit: {'yes' if signal['dummy_class_hit'] else 'no'}"
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


def verdict(clean: Answer, adversarial: Answer | None, truth: int | None) -> str | None:
    """What the attack did to one endpoint; None when either image got no reply.

    Against the true class where the image has one (a test image): ``fooled`` (right, then wrong), ``held``
    (right both times), ``corrected`` (wrong, then right) or ``wrong already`` (wrong both times). Without one
    (an upload, a drawing) only whether the prediction ``changed`` or stayed ``unchanged``."""
    if adversarial is None or clean.reply is None or adversarial.reply is None:
        return None
    before, after = clean.reply["prediction"]["index"], adversarial.reply["prediction"]["index"]
    if truth is None:
        return "changed" if before != after else "unchanged"
    if before == truth:
        return "held" if after == truth else "fooled"
    return "corrected" if after == truth else "wrong already"


def _verdict_cell(clean: Answer, adversarial: Answer | None, truth: int | None) -> str:
    said = verdict(clean, adversarial, truth)
    if said is None:
        return '<td class="verdict"></td>'
    return f'<td class="verdict {said.replace(" ", "-")}">{said}</td>'


def comparison_html(clean: Sequence[Answer], adversarial: Sequence[Answer] | None, attacked: Endpoint,
                    truth: int | None = None) -> str:
    """The table of every endpoint's reply for the clean and the adversarial image, each row's verdict (against
    the true class ``truth`` where known); the attacked row marked."""
    by_endpoint = {a.endpoint: a for a in adversarial or ()}
    rows = []
    for answer in clean:
        endpoint = answer.endpoint
        mark = ' class="attacked"' if endpoint == attacked else ""
        after = by_endpoint.get(endpoint)
        rows.append(f'<tr{mark} data-model="{html.escape(endpoint.model)}" data-mode="{html.escape(endpoint.mode)}">'
                    f'<th>{html.escape(endpoint.label)}' + ("<br><small>attacked</small>" if mark else "") + "</th>"
                    f"{_cell(answer)}{_cell(after)}{_verdict_cell(answer, after, truth)}"
                    "</tr>")
    return ('<table id="comparison-table"><thead><tr><th>served model · mode</th><th>clean image</th>'
            '<th>adversarial image</th><th></th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def neighbours(reply: Reply, train_images: np.ndarray) -> list[tuple[np.ndarray, str]]:
    """The nearest training images of a kNN reply as captioned thumbnails (its ids index the training split)."""
    return [(train_images[n["id"]], f"#{n['id']} {n['name']} ({n['similarity']:.2f})")
            for n in reply.get("neighbours", [])[:NEIGHBOURS_SHOWN]]
