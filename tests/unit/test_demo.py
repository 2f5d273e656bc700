"""The demo's logic: inputs, attacks, the black-box query budget and the REST comparison.

Conversion and the table are unit tests; the attacks against a real TorchServe are in
tests/integration/test_demo_server.py.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from demo.attacks import RestScores, grid_eps, quantise, square
from demo.inputs import MAX_UPLOAD_BYTES, InputError, convert_drawing, convert_file
from demo.rest import Answer, Endpoint, ask_all, comparison_html, percent, served_endpoints, verdict
from serving.client import ClientError

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------- inputs


def shirt(size: tuple[int, int], mode: str) -> Image.Image:
    """A dark object on a light background, off-centre, the way a photo or a drawing usually is."""
    image = Image.new("RGB", size, (235, 230, 225))
    w, h = size
    image.paste((30, 40, 90), (w // 5, h // 4, w // 2, h - h // 5))
    return image.convert(mode)


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("RGBA", "PNG"), ("P", "GIF"), ("CMYK", "JPEG"),
                                       ("RGB", "TIFF"), ("L", "BMP"), ("RGB", "WEBP"), ("I;16", "PNG")])
def test_an_upload_of_any_format_becomes_a_light_object_on_dark_28x28(mode, fmt, tmp_path):
    image = shirt((1200, 800), "L") if mode == "I;16" else shirt((1200, 800), mode)
    if mode == "I;16":  # 16-bit gray: levels 0..65535
        image = Image.fromarray(np.asarray(image, dtype=np.uint16) * 257)
    path = tmp_path / f"upload.{fmt.lower()}"
    image.save(path, format=fmt)
    converted = convert_file(path)
    assert converted.pixels.shape == (28, 28) and converted.pixels.dtype == np.uint8
    assert converted.steps[0][1].startswith(f"uploaded: {fmt}")
    assert converted.steps[-1][1].startswith("resized to 28x28")
    assert any("inverted" in caption for _, caption in converted.steps)
    assert max(s.size[0] for s, _ in converted.steps) <= 256  # the page gets thumbnails, not the original
    # Cropped to the object and padded: the object fills the middle, the border is background.
    assert converted.pixels[10:18, 10:18].mean() > 150 and converted.pixels[0].mean() < 10


def test_a_drawing_on_a_transparent_canvas_is_flattened_and_an_empty_one_refused():
    canvas = np.zeros((280, 280, 4), dtype=np.uint8)
    canvas[60:220, 120:160] = (0, 0, 0, 255)  # a black stroke, the rest transparent
    converted = convert_drawing({"composite": canvas})
    assert converted.pixels.shape == (28, 28)
    assert [c for _, c in converted.steps][1:3] == ["transparency flattened onto white", "grayscale"]
    assert converted.pixels[14, 14] > 200 and converted.pixels[14, 2] < 10
    for empty in (None, {"composite": None}, {"composite": np.zeros((280, 280, 4), dtype=np.uint8)}):
        with pytest.raises(InputError, match="draw something"):
            convert_drawing(empty)


def test_oversized_or_unreadable_uploads_are_refused_with_a_message(tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1400, 1400, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > MAX_UPLOAD_BYTES
    with pytest.raises(InputError, match=r"up to 5 MB"):
        convert_file(big)
    wide = tmp_path / "wide.png"
    Image.new("L", (5000, 8)).save(wide)  # a few hundred bytes, but too many pixels
    with pytest.raises(InputError, match=r"5000x8 pixels; the demo takes at most 4096x4096"):
        convert_file(wide)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(InputError, match="not an image") as refused:
        convert_file(text)
    # The upload lies in the server's temporary folder: the page names the file only.
    assert str(tmp_path) not in str(refused.value) and "notes.png" in str(refused.value)
    truncated = tmp_path / "cut.png"
    buffer = io.BytesIO()
    shirt((300, 300), "RGB").save(buffer, format="PNG")
    truncated.write_bytes(buffer.getvalue()[:400])
    with pytest.raises(InputError, match="could not be decoded") as refused:
        convert_file(truncated)
    assert str(tmp_path) not in str(refused.value)


# ---------------------------------------------------------------------------------------------- quantisation


@pytest.mark.parametrize("threat", ["linf", "l1_mean"])
def test_quantised_images_are_on_the_8_bit_grid_and_inside_the_ball(threat):
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (1, 1, 28, 28), generator=generator).float() / 255
    for eps in (0.0, 0.05, 0.1, 0.3):
        eps = grid_eps(eps)
        if threat == "linf":
            x_adv = (x + torch.empty_like(x).uniform_(-eps, eps, generator=generator)).clamp(0, 1)
        else:  # a perturbation whose mean |delta| is eps exactly, concentrated on a few pixels
            x_adv = x.clone().flatten()
            x_adv[:100] = (x_adv[:100] + eps * 784 / 100 * 0.999).clamp(max=1)
            x_adv = x_adv.view_as(x)
        q = quantise(x, x_adv, eps, threat)
        assert torch.equal(q.mul(255).round() / 255, q) and q.min() >= 0 and q.max() <= 1
        delta = (q - x).abs()
        assert (delta.max() if threat == "linf" else delta.mean()) <= eps + 1e-7


# ---------------------------------------------------------------------------------------------- the REST table


class CannedClient:
    """A client whose replies are given: what the table must show, and nothing else."""

    url = "http://canned"

    def __init__(self, replies: dict[tuple[str, str], dict], errors: dict[str, ClientError]) -> None:
        self.replies, self.errors, self.asked = replies, errors, []

    def predict(self, image: bytes, *, model: str, **options) -> dict:
        self.asked.append((model, options))
        if model in self.errors:
            raise self.errors[model]
        mode = next(v for k, v in options.items() if k != "top_k")
        return self.replies[(model, mode)]


def reply(model: str, mode: str, ranking: list[tuple[int, str, float]], **extra) -> dict:
    return {"model": model, "version": "1.0", "mode": mode,
            "prediction": {"index": ranking[0][0], "name": ranking[0][1]},
            "top_k": [{"index": i, "name": n, "probability": p} for i, n, p in ranking], **extra}


def cells(table: str, endpoint) -> list[str]:
    """The reply cells (clean, adversarial) of an endpoint's row in the comparison table."""
    row = table.split(f'data-model="{endpoint.model}" data-mode="{endpoint.mode}"')[1].split("</tr>")[0]
    return re.findall(r'<td class="reply[^"]*">(.*?)</td>', row)


def test_the_comparison_table_shows_each_served_endpoints_reply_and_signal():
    endpoints = [e for e in served_endpoints() if e.model in ("dhat", "ducat", "that_knn", "natural", "pgd_at")]
    disagree = {"heads_disagree": True, "main_head": {"index": 1, "name": "Trouser"},
                "second_head": {"index": 8, "name": "Bag"}}
    canned = {(e.model, e.mode): reply(e.model, e.mode, [(1, "Trouser", 0.7), (8, "Bag", 0.2), (0, "T-shirt", 0.1)],
                                       **({"signal": disagree} if e.mode == "both" else {}))
              for e in endpoints}
    dummy = reply("ducat", "raw", [(11, "dummy of Trouser", 0.6), (1, "Trouser", 0.3)],
                  signal={"dummy_class_hit": True})
    client = CannedClient(canned, {"natural": ClientError(404, "Model not found: natural"),
                                   "pgd_at": ClientError(413, "the image is over 8 MiB")})
    answers = ask_all(client, b"png", endpoints)  # type: ignore[arg-type]
    assert {m for m, _ in client.asked} == {e.model for e in endpoints}
    assert [a.endpoint for a in answers] == [e for e in endpoints if e.model != "natural"]  # 404: not served
    adversarial = [Answer(a.endpoint, dummy) if a.endpoint.mode == "raw" else a for a in answers]
    dhat_both = next(e for e in endpoints if e.label == "dhat · both")
    table = comparison_html(answers, adversarial, dhat_both)
    for answer, after in zip(answers, adversarial, strict=True):
        shown = cells(table, answer.endpoint)
        if answer.reply is None:
            assert shown == ["HTTP 413: the image is over 8 MiB"] * 2
            continue
        for cell, given in zip(shown, (answer.reply, after.reply), strict=True):
            assert f'<div class="prediction">{given["prediction"]["name"]}</div>' in cell
            assert all(f"{e['name']} {percent(e['probability'])}" in cell for e in given["top_k"])
    assert table.count("<small>attacked</small>") == 1
    assert 'class="attacked" data-model="dhat" data-mode="both"' in table
    assert "heads disagree: yes (main: Trouser, second: Bag)" in table
    ducat_raw = next(e for e in endpoints if e.label == "ducat · raw")
    assert "dummy-class hit: yes" in cells(table, ducat_raw)[1]
    # No true class given (an upload): whether the answer changed; pgd_at was refused, so no verdict there.
    assert table.count(">changed<") == 1 and table.count(">unchanged<") == len(answers) - 2
    assert "natural" not in table
    assert comparison_html(answers, adversarial, dhat_both, truth=1).count(">fooled<") == 1  # Trouser, then a dummy


def answer(index: int) -> Answer:
    endpoint = Endpoint("pgd_at", "default", "mode", "pgd_at")
    return Answer(endpoint, reply("pgd_at", "default", [(index, str(index), 1.0)]))


@pytest.mark.parametrize(("before", "after", "truth", "said"), [
    (1, 2, 1, "fooled"), (1, 1, 1, "held"), (3, 1, 1, "corrected"), (3, 3, 1, "wrong already"),
    (3, 4, 1, "wrong already"), (1, 2, None, "changed"), (1, 1, None, "unchanged")])
def test_the_verdict_judges_against_the_true_class_where_there_is_one(before, after, truth, said):
    """An attack that turned a wrong answer into the right one was called "fooled", a wrong answer that stayed
    wrong "held": with a test image's label the verdict is against it; an upload or a drawing has none."""
    assert verdict(answer(before), answer(after), truth) == said
    assert verdict(answer(before), Answer(answer(after).endpoint, None, "HTTP 400: no"), truth) is None


def test_square_sends_at_most_its_budget_of_queries_and_returns_its_best_query():
    """Against an endpoint it cannot fool, Square spends the whole budget, and not one query more."""
    sent = []

    def ask(png: bytes, top_k: int) -> dict:
        sent.append(png)
        pixels = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float64) / 255
        p0 = 0.6 + 0.3 * pixels.mean()  # class 0 always wins, less so on darker images
        return reply("m", "default", [(0, "a", p0), (1, "b", 1 - p0 - 0.01), (2, "c", 0.01)])

    x = torch.full((1, 1, 28, 28), 128 / 255)
    scores = RestScores(ask, label=0, budget=40)
    x_adv = square(scores, x, eps=grid_eps(0.1))
    assert scores.queries == len(sent) == 40
    assert (x_adv - x).abs().max() <= grid_eps(0.1) + 1e-7
    clean_margin = np.log((0.6 + 0.3 * 128 / 255) / (0.39 - 0.3 * 128 / 255))
    assert scores.best_margin < clean_margin and x_adv.mean() < x.mean()  # the darkest query it found is kept
