"""The demo against TorchServe: the attacks run through ``Demo.attack`` against a real TorchServe serving the tiny
runs of ``served_runs`` (the ``demo`` fixture, in tests/conftest.py). Conversion and the table are unit tests, in
tests/unit/test_demo.py.
"""

from __future__ import annotations

import io
import json
import re
import time

import numpy as np
import pytest
import torch
from helpers import free_ports
from PIL import Image

from demo.app import Demo, build_app, state_dir_client
from demo.attacks import ATTACK_SPECS, attack_surface, grid_eps
from demo.rest import percent
from serving import server
from serving.client import Client
from training.errors import RobustServeError
from training.evaluate import measured_robustness
from training.runs import REPORT_JSON

pytestmark = pytest.mark.usefixtures("one_thread")


def cells(table: str, endpoint) -> list[str]:
    """The reply cells (clean, adversarial) of an endpoint's row in the comparison table."""
    row = table.split(f'data-model="{endpoint.model}" data-mode="{endpoint.mode}"')[1].split("</tr>")[0]
    return re.findall(r'<td class="reply[^"]*">(.*?)</td>', row)


# ---------------------------------------------------------------------------------------------- against TorchServe


@pytest.fixture(scope="module")
def client(served):
    return Client(served.inference_address, token=server.read_keys(served)["inference"])


@pytest.mark.slow
@pytest.mark.parametrize("attack, target", [("FGSM", "pgd_at · default"), ("PGD", "dhat · both"),
                                            ("DRA", "that · classifier"), ("APGD", "ducat · recovered"),
                                            ("Square (black-box)", "trades · default")])
def test_each_attack_stays_within_eps_and_changes_nothing_at_eps_0(attack, target, demo):
    source = demo.gallery_input(1)
    x = torch.from_numpy(source.unit)
    for eps in (0.0, 0.1):
        calls = []
        result = demo.attack(source, attack, target, eps, 5,
                             lambda n, total: calls.append((n, total)))  # noqa: B023 (called in this iteration)
        x_adv = torch.from_numpy(np.asarray(Image.open(io.BytesIO(result.adversarial_png)), np.float32))[None] / 255
        delta = (x_adv - x).abs()
        assert (delta.mean() if ATTACK_SPECS[attack].threat == "l1_mean" else delta.max()) <= grid_eps(eps) + 1e-6
        assert result.perturbation.shape == (28, 28) and result.perturbation.dtype == np.uint8
        assert calls and all(total in (None, ATTACK_SPECS[attack].expected_calls(5)) for _, total in calls)
        if eps == 0:  # a test image: judged against its class, and nothing changed
            assert result.adversarial_png == result.clean_png
            assert "**held**" in result.summary or "**wrong already**" in result.summary
    assert attack == "APGD" or delta.max() > 0  # the attack did perturb (APGD keeps x where it finds nothing)


@pytest.mark.slow
def test_the_page_shows_what_rest_returns_for_the_adversarial_png(demo, client):
    result = demo.attack(demo.gallery_input(0), "PGD", "dhat · both", 0.2, 10)
    assert {a.endpoint.model for a in result.adversarial} == {"pgd_at", "trades", "dhat", "ducat", "that", "that_knn"}
    for answer in result.adversarial:
        direct = client.predict(result.adversarial_png, model=answer.endpoint.model, top_k=3, **answer.endpoint.options)
        assert answer.reply == direct
        shown = cells(result.table, answer.endpoint)[1]
        assert f'<div class="prediction">{direct["prediction"]["name"]}</div>' in shown
        assert all(f"{e['name']} {percent(e['probability'])}" in shown for e in direct["top_k"])
    knn = next(a.reply for a in result.adversarial if a.endpoint.model == "that_knn")
    assert len(result.neighbours_adversarial) == 8
    for (image, caption), neighbour in zip(result.neighbours_adversarial, knn["neighbours"], strict=False):
        assert np.array_equal(image, demo.train_images[neighbour["id"]]) and caption.startswith(f"#{neighbour['id']} ")
    assert "attacked surface `module`" in result.summary and "aggregator" in result.summary
    # One image says little: the summary also gives what the run's evaluation measured, with intervals.
    report = json.loads((demo.run_dirs["dhat"] / REPORT_JSON).read_text())
    assert measured_robustness(report, "both") in result.summary
    assert re.search(r"worst case per image over \d+ attacks at eps 0.1 \d+\.\d \[\d+\.\d, \d+\.\d\] n=10",
                     result.summary)
    # DUCAT's secret pairing: the page names no dummy output and shows no raw prediction.
    assert not re.search(r"dummy (of |\d)", result.table) and "raw:" not in result.table


@pytest.mark.slow
def test_the_demo_asks_only_the_models_and_modes_the_server_serves(demo, served):
    """It asked mart, consistency_at, ... on every attack although they were not served (404s in TorchServe's
    access log), and DUCAT's raw mode although a secret pairing's raw scores are refused."""
    assert {e.label for e in demo.endpoints} == {
        "dhat · main", "dhat · second", "dhat · both", "that · classifier", "that_knn · knn", "ducat · recovered",
        "pgd_at · default", "trades · default"}
    access_log = served.log_dir / "access_log.log"
    start = access_log.stat().st_size
    result = demo.attack(demo.gallery_input(2), "FGSM", "pgd_at · default", 0.1, 1)
    assert len(result.clean) == len(result.adversarial) == len(demo.endpoints)
    time.sleep(1)  # TorchServe writes its access log a moment after each reply
    with open(access_log, "rb") as handle:
        handle.seek(start)
        asked = handle.read().decode(errors="replace").splitlines()
    assert len([line for line in asked if "/predictions/" in line]) >= 2 * len(demo.endpoints)
    assert not [line for line in asked if '" 404 ' in line or '" 403 ' in line]


@pytest.mark.slow
def test_white_box_attacks_use_the_adaptive_surface_where_the_mode_has_one(demo):
    surfaces = {label: attack_surface(demo.mode(demo.endpoint(label))).name
                for label in ("dhat · both", "dhat · main", "ducat · recovered", "that_knn · knn")}
    assert surfaces == {"dhat · both": "module", "dhat · main": "module", "ducat · recovered": "merged",
                        "that_knn · knn": "soft_knn"}


@pytest.mark.slow
def test_torchserve_down_or_unknown_gives_a_clear_message_in_the_page(demo, tmp_path):
    [port] = free_ports(1)
    down = Demo(lambda: Client(f"http://127.0.0.1:{port}", token="x"), demo.run_dirs, data_root=demo.data_root)
    with pytest.raises(RobustServeError, match=r"cannot reach http://127\.0\.0\.1:\d+ .*robustserve serve start"):
        down.attack(down.gallery_input(0), "PGD", "dhat · both", 0.1, 5)
    no_server = Demo(state_dir_client(tmp_path), demo.run_dirs, data_root=demo.data_root)
    page = build_app(no_server)
    on_attack = next(f.fn for f in page.fns.values() if f.name == "on_attack")
    outputs = on_attack(no_server.gallery_input(0), "PGD", "dhat · both", 0.1, 5)
    assert outputs[-1].startswith("**Could not do that:** no TorchServe key file at")
    assert "is the server running?" in outputs[-1] and "Traceback" not in outputs[-1]
    for eps, steps, message in ((0.5, 5, "eps must be from 0 to 0.3"), (0.1, 500, "steps must be from 1 to 100")):
        assert message in on_attack(demo.gallery_input(0), "PGD", "dhat · both", eps, steps)[-1]
