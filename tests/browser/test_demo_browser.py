"""The demo end to end in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

The page runs in this process (Gradio in a background thread) against a real TorchServe. The test
picks a test image, runs PGD against ``dhat`` and reads back from the page the adversarial image it
shows and the predictions it shows for it; sending that image to the REST API must give exactly
those predictions, for every served model and mode. A screenshot of the page is kept in
``tests/artifacts/demo.png``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from helpers import free_ports
from PIL import Image

from demo.app import launch
from demo.attacks import grid_eps
from demo.rest import percent, served_endpoints
from serving import server
from serving.client import Client

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright's own browser download needs internet
ARTIFACTS = Path(__file__).parents[1] / "artifacts"  # tests/artifacts, git-ignored
EPS = 0.1


@pytest.fixture(scope="module")
def page_url(demo):  # noqa: F811
    [port] = free_ports(1)
    app = launch(demo, port=port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.float64) / 255


def test_pgd_against_dhat_in_the_page_shows_what_rest_returns_for_the_image_it_shows(page_url, served):  # noqa: F811
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (a test extra)")
    if not CHROMIUM.is_file():
        pytest.skip(f"no {CHROMIUM}: apt-get install chromium (make test installs it)")
    client = Client(served.inference_address, token=server.read_keys(served)["inference"])
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(page_url)
            page.get_by_label("Thumbnail 3 of 12").click()
            sync_api.expect(page.locator("#status")).to_contain_text("Input ready (test image:")
            assert page.locator("#attack input").input_value() == "PGD"
            assert page.locator("#target input").input_value() == "dhat · both"
            page.locator("#attack-button").click()
            sync_api.expect(page.locator("#status")).to_contain_text("Done.", timeout=60_000)
            shown = {name: page.request.get(page.locator(f"#{name} img").get_attribute("src")).body()
                     for name in ("clean", "adversarial")}
            rows = page.locator("#comparison-table tbody tr")
            table = [(row.get_attribute("data-model"), row.get_attribute("data-mode"),
                      row.locator("td.reply").nth(1).locator(".prediction").inner_text(),
                      row.locator("td.reply").nth(1).locator(".bar label").all_inner_texts())
                     for row in rows.all()]
            page.mouse.wheel(0, 10_000)  # the kNN thumbnails at the bottom load once scrolled into view
            page.wait_for_function("[...document.images].every(image => image.complete)")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
        finally:
            browser.close()
    endpoints = {(e.model, e.mode): e for e in served_endpoints()}
    clean, adversarial = pixels(shown["clean"]), pixels(shown["adversarial"])
    assert clean.shape == adversarial.shape == (28, 28)
    assert 0 < np.abs(adversarial - clean).max() <= grid_eps(EPS) + 1e-9
    assert {(model, mode) for model, mode, *_ in table} >= {("dhat", "main"), ("dhat", "second"), ("dhat", "both")}
    for model, mode, prediction, bars in table:
        reply = client.predict(shown["adversarial"], model=model, top_k=3, **endpoints[model, mode].options)
        assert prediction == reply["prediction"]["name"], (model, mode)
        assert bars == [f"{e['name']} {percent(e['probability'])}" for e in reply["top_k"]], (model, mode)
