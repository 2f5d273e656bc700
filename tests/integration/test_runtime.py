"""The serving runtime on real archives, without TorchServe: every mode answers what the trained
module predicts, with both backends; DUCAT's recovery, DH-AT's head signal and THAT's kNN match a
local computation; a mixed batch is answered per request; bad input is a 4xx; parameters follow one rule
whatever carries them; DUCAT's secret pairing stays private; a changed archive is refused."""

from __future__ import annotations

import base64
import io
import json
import stat
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.package import PackageSettings, package_run
from serving.runtime import MANIFEST_JSON, ArchiveError, Fields, Runtime
from training.dummy_classes import PAIRING_FILE, ClassPairing, read_pairing, recover_dummy_classes, write_pairing
from training.knn import knn_search, knn_vote
from training.runs import load_run, load_test_subset

pytestmark = pytest.mark.usefixtures("one_thread")

N = 24


def extract(store, name, dest):
    """What TorchServe does with a .mar: unzip it into a folder."""
    folder = dest / name
    with zipfile.ZipFile(store / f"{name}.mar") as archive:
        archive.extractall(folder)
    return folder


def png(pixels: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((pixels[0] * 255).round().byte().numpy(), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def test_images(served_runs):
    info = json.loads((served_runs["dhat"] / "defense.json").read_text())
    x, y, _ = load_test_subset(info, N, None)
    return x, y


RAW_DUCAT = "ducat_raw"  # the ducat archive packaged with raw_with_secret_pairing: raw mode served


@pytest.fixture(scope="module")
def runtimes(served_store, served_runs, tmp_path_factory):
    """(model, backend) -> Runtime over the extracted archive (``RAW_DUCAT``: ducat with its raw scores served)."""
    dest = tmp_path_factory.mktemp("extracted")
    raw_store = tmp_path_factory.mktemp("raw_store")
    package_run(served_runs["ducat"], model_store=raw_store, settings=PackageSettings(raw_with_secret_pairing=True))
    cache = {}

    def get(name: str, backend: str = "onnx") -> Runtime:
        if (name, backend) not in cache:
            store, archive = (raw_store, "ducat") if name == RAW_DUCAT else (served_store, name)
            folder = dest / name if (dest / name).is_dir() else extract(store, archive, dest)
            if name == RAW_DUCAT and not (dest / name).is_dir():
                (dest / archive).rename(dest / name)
                folder = dest / name
            cache[name, backend] = Runtime(folder, backend=backend, device="cpu")
        return cache[name, backend]

    return get


def ask(runtime: Runtime, images: torch.Tensor, **options) -> list[dict]:
    results = runtime.handle([{"body": png(x), **options} for x in images])
    assert all(status == 200 for status, _ in results), results
    return [reply for _, reply in results]


CASES = [("pgd_at", "mode", "default"), ("trades", "mode", "default"), ("dhat", "head", "main"),
         ("dhat", "head", "second"), ("dhat", "head", "both"), ("ducat", "mode", "recovered"),
         (RAW_DUCAT, "mode", "raw"), ("that", "mode", "classifier"), ("that_knn", "mode", "knn")]
RUN_OF = {"that_knn": "that", RAW_DUCAT: "ducat"}
MODEL_OF = {RAW_DUCAT: "ducat"}


@pytest.mark.parametrize("backend", ["onnx", "torch"])
@pytest.mark.parametrize(("model", "parameter", "mode"), CASES)
def test_every_mode_answers_what_the_module_predicts(model, parameter, mode, backend, runtimes, served_runs,
                                                     test_images):
    x, _ = test_images
    local = load_run(served_runs[RUN_OF.get(model, model)]).modes()[mode]
    with torch.no_grad():
        expected = local.module(x).argmax(1).tolist()
    replies = ask(runtimes(model, backend), x, **{parameter: mode})
    assert [r["prediction"]["index"] for r in replies] == expected
    assert {r["mode"] for r in replies} == {mode} and {r["model"] for r in replies} == {MODEL_OF.get(model, model)}
    top = replies[0]["top_k"]
    assert len(top) == 5 and top[0]["probability"] >= top[-1]["probability"]


def test_dual_head_reports_disagreeing_heads(runtimes, served_runs, test_images):
    x, _ = test_images
    net = load_run(served_runs["dhat"]).model
    with torch.no_grad():
        main, second = net(x, output="main").argmax(1), net(x, output="second").argmax(1)
    replies = ask(runtimes("dhat"), x, head="both")
    assert [r["signal"]["heads_disagree"] for r in replies] == (main != second).tolist()
    assert [r["signal"]["main_head"]["index"] for r in replies] == main.tolist()
    assert [r["signal"]["second_head"]["index"] for r in replies] == second.tolist()


def test_ducat_recovery_and_signal_match_local_computation(runtimes, served_runs, test_images):
    x, _ = test_images
    run = load_run(served_runs["ducat"])
    modes = run.modes()
    with torch.no_grad():
        logits = run.model(x)
    pairing = modes["recovered"].module.pairing
    predicted, hit = recover_dummy_classes(logits, pairing)
    recovered = ask(runtimes("ducat"), x)  # recovered is the default mode
    assert [r["prediction"]["index"] for r in recovered] == predicted.tolist()
    assert [r["signal"]["dummy_class_hit"] for r in recovered] == hit.tolist()
    assert all(set(r["signal"]) == {"dummy_class_hit"} for r in recovered)  # nothing about which dummy class
    raw = ask(runtimes(RAW_DUCAT), x, mode="raw", top_k=20)
    assert [r["prediction"]["index"] for r in raw] == logits.argmax(1).tolist()
    probabilities = np.array([[e["probability"] for e in sorted(r["top_k"], key=lambda e: e["index"])] for r in raw])
    np.testing.assert_allclose(probabilities, torch.softmax(logits, 1).numpy(), atol=1e-5)
    # The tiny run's pairing is secret (the quick preset's): dummy outputs are numbered, not named after their class.
    assert not pairing.is_identity
    names = {e["index"]: e["name"] for e in raw[0]["top_k"]}
    assert [names[i] for i in range(20)] == [*run.info["classes"], *(f"dummy {j}" for j in range(10))]


@pytest.mark.parametrize("k", [1, 7, 50])
def test_knn_neighbours_and_scores_match_exact_search_and_eq8(k, runtimes, served_runs, test_images):
    x, _ = test_images
    knn = load_run(served_runs["that"]).modes()["knn"]
    bank = knn.module.bank
    with torch.no_grad():
        queries = knn.exported(x)
    similarities, rows = knn_search(queries, bank.features, k)
    scores = knn_vote(queries, bank, k, knn.module.temperature)
    replies = ask(runtimes("that_knn"), x, k=k, top_k=10)
    for i, reply in enumerate(replies):
        neighbours = reply["neighbours"]
        assert len(neighbours) == k and reply["signal"]["k"] == k
        np.testing.assert_allclose([n["similarity"] for n in neighbours], similarities[i].numpy(), atol=1e-5)
        assert {n["id"] for n in neighbours} == set(bank.ids[rows[i]].tolist())
        assert [n["label"] for n in neighbours] == [int(bank.labels[bank.ids.tolist().index(n["id"])])
                                                    for n in neighbours]
        assert reply["prediction"]["index"] == int(scores[i].argmax())
        shares = {e["index"]: e["probability"] for e in reply["top_k"]}
        expected = scores[i] / scores[i].sum()
        for index, share in shares.items():
            assert share == pytest.approx(float(expected[index]), abs=1e-5)
        agree = sum(n["label"] == reply["prediction"]["index"] for n in neighbours) / k
        assert reply["signal"]["agreement"] == pytest.approx(agree)


def test_one_batch_mixing_heads_and_bad_input_is_answered_per_request(runtimes, served_runs, test_images):
    x, _ = test_images
    net = load_run(served_runs["dhat"]).model
    heads = ["main", "both", "second", "both", "main"]
    batch = [{"body": png(x[i]), "head": bytearray(head.encode())} for i, head in enumerate(heads)]
    batch.insert(2, {"body": b"not an image", "head": bytearray(b"main")})
    batch.insert(4, {"body": png(x[0]), "head": bytearray(b"third")})
    results = runtimes("dhat").handle(batch)
    statuses = [status for status, _ in results]
    assert statuses == [200, 200, 415, 200, 400, 200, 200] or statuses == [200, 200, 400, 200, 400, 200, 200]
    answered = [reply for status, reply in results if status == 200]
    with torch.no_grad():
        for i, (head, reply) in enumerate(zip(heads, answered, strict=True)):
            assert reply["mode"] == head
            assert reply["prediction"]["index"] == int(net(x[i:i + 1], output=head).argmax())
    assert "head must be one of main, second, both" in results[4][1]["error"]


@pytest.mark.parametrize(("fields", "status", "message"), [
    ({"body": b""}, 400, "no image"),
    ({"data": b"\x89PNG\r\n\x1a\n" + b"\0" * 30}, None, ""),
    ({"body": {"image": "not base64!"}}, None, ""),
    ({"body": {"pixels": [[0.5] * 28] * 27}}, 400, "28"),
    ({"body": {"pixels": [[0.5] * 28] * 28, "top_k": 0}}, 400, "top_k"),
    ({"body": {"pixels": [[0.5] * 28] * 28, "hed": "both"}}, 400, "unknown parameter"),
    ({"body": {"pixels": [[0.5] * 28] * 28}, "head": bytearray(b"all")}, 400, "head must be one of"),
    ({"body": {"pixels": [[0.5] * 28] * 28, "head": "main"}, "head": bytearray(b"both")}, 400,
     "given more than once: head (the query string or a form field and the JSON body)"),
    ({"body": {"pixels": [[0.5] * 28] * 28, "head": "main"}, "head": bytearray(b"main")}, 400, "more than once"),
    ({"body": b'{"pixels": [[0.5]], "head": "main", "head": "both"}'}, 400, "gives 'head' more than once"),
    ({"body": b'{"image": "x"} ', "top_k": bytearray(b"9" * 65)}, 413, "'top_k' is 65 characters long"),
])
def test_bad_requests_get_a_4xx_with_a_message(fields, status, message, runtimes):
    [(got, reply)] = runtimes("dhat").handle([fields])
    assert 400 <= got < 500 and (status is None or got == status)
    assert message in reply["error"] and reply["status"] == got


PIXELS = [[0.5] * 28] * 28


@pytest.mark.parametrize(("fields", "message"), [
    (Fields({"body": b"PNG"}, repeated=("data",)), "'data' given more than once in the query string or form"),
    (Fields({"body": {"pixels": PIXELS}, "head": b"main"}, headers={"x-head": "both"}),
     "given more than once: head (the query string or a form field and the x-head header)"),
    (Fields({"body": {"pixels": PIXELS, "top_k": 3}}, headers={"X-Top-K": "3"}),
     "given more than once: top_k (the X-Top-K header and the JSON body)"),
    (Fields({"body": {"pixels": PIXELS}}, headers={"X-K": "5"}), "unknown parameter(s) k for model dhat"),
])
def test_one_rule_for_parameters_whatever_carries_them(fields, message, runtimes):
    """A parameter the model does not take, or one given twice, is a 400 naming it: in a header as in the query
    string, a form field or the JSON body (a header used to be ignored, or to lose against the query)."""
    [(status, reply)] = runtimes("dhat").handle([fields])
    assert status == 400 and message in reply["error"]
    [(status, reply)] = runtimes("dhat").handle([Fields({"body": {"pixels": PIXELS}}, headers={
        "X-Head": "both", "X-Forwarded-For": "10.0.0.1", "User-Agent": "curl"})])
    assert status == 200 and reply["mode"] == "both"  # a parameter header is read; other headers are not parameters


def test_json_is_refused_by_size_and_values_before_it_is_parsed(runtimes, monkeypatch):
    """A JSON body over the limits never reaches the parser, whatever its content type (a 60 MB pixel array cost
    the worker ~2 s and ~400 MB when TorchServe parsed it first)."""
    import serving.decode

    runtime = runtimes("pgd_at")
    spec = runtime.input_spec
    parsed = []
    monkeypatch.setattr(serving.decode.json, "loads", lambda *args, **kwargs: parsed.append(args) or {})
    too_long = b'{"pixels": [' + b"0.5" * (spec.max_json_bytes // 3) + b"]}"
    too_many = b'{"pixels": [' + b"0," * (spec.max_json_separators + 1) + b"0]}"
    for body, content_type, message in ((too_long, "application/json", "the JSON body has"),
                                        (too_long, "text/plain", "the JSON body has"),
                                        (too_many, "application/json", "commas (one per value after the first)")):
        [(status, reply)] = runtime.handle([Fields({"body": bytearray(body)}, content_types={"body": content_type})])
        assert status == 413 and message in reply["error"], reply
    assert parsed == []


def test_a_json_content_type_is_parsed_as_json(runtimes):
    """A JSON scalar sent as application/json is JSON (a base64 string, a number, null), as TorchServe's own
    decoding made it; the same bytes with another content type are an image's bytes."""
    runtime = runtimes("pgd_at")
    for body, content_type, status, message in ((b'"5"', "application/json; charset=utf-8", 400, "invalid base64"),
                                                (b"5", "application/json", 400, "expected image bytes"),
                                                (b"null", "application/json", 400, "no image in the request"),
                                                (b"5", "image/png", 415, "expected a PNG or JPEG")):
        [(got, reply)] = runtime.handle([Fields({"body": bytearray(body)}, content_types={"body": content_type})])
        assert (got, message in reply["error"]) == (status, True), reply


@pytest.mark.parametrize("k", [0, -1, "five", 10**6])
def test_knn_k_out_of_range_is_a_400(k, runtimes):
    [(status, reply)] = runtimes("that_knn").handle([{"body": {"pixels": [[0.5] * 28] * 28, "k": k}}])
    assert status == 400 and "k must be" in reply["error"]


def test_truncated_png_is_a_4xx(runtimes, test_images):
    x, _ = test_images
    [(status, reply)] = runtimes("pgd_at").handle([{"body": png(x[0])[:60]}])
    assert 400 <= status < 500 and reply["error"]


def test_a_secret_pairing_is_never_served_raw_unless_the_operator_turns_it_on(runtimes, served_runs, served_store,
                                                                              test_images):
    x, _ = test_images
    assert not read_pairing(served_runs["ducat"] / PAIRING_FILE).is_identity  # the quick preset's secret pairing
    ducat = runtimes("ducat")
    assert ducat.modes == ("recovered",) and "raw" in ducat.describe()["withheld_modes"]
    [(status, reply)] = ducat.handle([{"body": png(x[0]), "mode": "raw"}])
    assert status == 403 and "reveal the pairing" in reply["error"]
    with zipfile.ZipFile(served_store / "ducat.mar") as archive:
        served = json.loads(archive.read("served.json"))
    assert served["modes"] == ["recovered"] and "raw" in served["extra"]["withheld_modes"]
    assert runtimes(RAW_DUCAT).modes == ("recovered", "raw")  # packaged with raw_with_secret_pairing=True


def test_an_archive_listing_raw_with_a_secret_pairing_still_does_not_serve_it(served_runs, tmp_path, test_images):
    """An archive packaged before the rule lists raw in served.json without the operator's choice: the runtime
    withholds it all the same."""
    package_run(served_runs["ducat"], model_store=tmp_path, settings=PackageSettings(raw_with_secret_pairing=True))
    folder = extract(tmp_path, "ducat", tmp_path)
    served = json.loads((folder / "served.json").read_text())
    assert served["modes"] == ["recovered", "raw"]
    (folder / "served.json").write_text(json.dumps({**served, "extra": {}}))
    manifest = json.loads((folder / MANIFEST_JSON).read_text())
    from training.run_files import sha256_file

    manifest["sha256"]["served.json"] = sha256_file(folder / "served.json")
    (folder / MANIFEST_JSON).write_text(json.dumps(manifest))
    runtime = Runtime(folder, device="cpu")
    assert runtime.modes == ("recovered",)
    [(status, _)] = runtime.handle([{"body": png(test_images[0][0]), "mode": "raw"}])
    assert status == 403


def test_the_pairing_and_the_archives_holding_it_are_readable_by_their_owner_only(served_runs, tmp_path):
    write_pairing(tmp_path / PAIRING_FILE, ClassPairing.random(10, seed=1))
    assert stat.S_IMODE((tmp_path / PAIRING_FILE).stat().st_mode) == 0o600
    # The run folder's copy, written when training finishes, is private too.
    assert stat.S_IMODE((served_runs["ducat"] / PAIRING_FILE).stat().st_mode) == 0o600
    store = tmp_path / "store"
    for recipe in ("ducat", "pgd_at"):
        package_run(served_runs[recipe], model_store=store)
    assert stat.S_IMODE((store / "ducat.mar").stat().st_mode) == 0o600
    assert stat.S_IMODE((store / "pgd_at.mar").stat().st_mode) & 0o044  # no pairing: the usual permissions
    with zipfile.ZipFile(store / "ducat.mar") as archive:
        info = archive.getinfo(PAIRING_FILE)
    assert (info.external_attr >> 16) & 0o077 == 0  # and private again wherever it is extracted with its mode


def test_changed_archive_is_refused(served_store, tmp_path):
    folder = extract(served_store, "pgd_at", tmp_path)
    Runtime(folder)  # loads as packaged
    weights = folder / "best.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="best.safetensors does not match its SHA-256"):
        Runtime(folder)
    (folder / MANIFEST_JSON).unlink()
    with pytest.raises(ArchiveError, match="no readable MANIFEST.json"):
        Runtime(folder)


def test_ivf_index_searching_every_cell_finds_what_the_flat_index_finds(served_runs, tmp_path, test_images):
    from serving.package import PackageSettings, package_run

    settings = PackageSettings(knn_index="ivf", nlist=8, nprobe=8)
    [archive] = package_run(served_runs["that"], model_store=tmp_path / "store", settings=settings, names=["that_knn"])
    ivf = Runtime(extract(archive.parent, "that_knn", tmp_path), device="cpu")
    served = json.loads((tmp_path / "that_knn" / "served.json").read_text())
    assert served["postprocess"]["knn"]["index"] == {"kind": "ivf", "vectors": len(ivf.context.bank), "nlist": 8, "nprobe": 8}
    knn = load_run(served_runs["that"]).modes()["knn"]
    x, _ = test_images
    with torch.no_grad():
        expected = knn.module(x).argmax(1).tolist()
    replies = ask(ivf, x, k=knn.module.k)
    assert [r["prediction"]["index"] for r in replies] == expected
    _, rows = knn_search(knn.exported(x).detach(), knn.module.bank.features, knn.module.k)
    for reply, row in zip(replies, rows, strict=True):
        assert {n["id"] for n in reply["neighbours"]} == set(knn.module.bank.ids[row].tolist())


# ---------------------------------------------------------------------------------------------- fuzzing


# Field values as TorchServe hands them to a handler: parsed JSON, text, or raw bytes (query parameters
# and form fields arrive as bytearray). Mostly the known parameters with tricky values (weights by
# repetition), so that a bad value is usually the request's only fault and reaches its own check.
_TRICKY = st.sampled_from(["main", "both", "raw", "recovered", "knn", "0", "1", "5", "50", "1000", "1e3", "-1", "²",
                           "٣", " 7 ", "", "true", "null", "[1]", "{}", "9" * 30, "9" * 5000])
_OTHER = (st.integers(-2**70, 2**70) | st.floats() | st.booleans() | st.none() | st.text(max_size=8)
          | st.binary(max_size=8).map(bytearray) | st.lists(st.integers(), max_size=3))
_PARAMETER_VALUES = st.sampled_from([_TRICKY, _TRICKY, _OTHER]).flatmap(lambda values: values)
_PARAMETERS = st.sampled_from([st.sampled_from(["head", "mode", "k", "top_k"])] * 5 + [st.text(max_size=6)]).flatmap(
    lambda names: names)


@st.composite
def request_fields(draw, good_png: bytes) -> dict:
    """One request's fields: an image (good, mangled, or JSON carrying it and options) plus parameters."""
    options = draw(st.dictionaries(_PARAMETERS, _PARAMETER_VALUES, max_size=3))
    image = draw(st.sampled_from([good_png, good_png[:60], b"", b"{", b"[0.5]"]) | st.binary(max_size=40))
    body = draw(st.sampled_from(["bytes", "text", "bytearray", "json object", "json text"]))
    if body == "json object":
        payload = {"image": base64.b64encode(image).decode(), **{k: v for k, v in options.items()
                                                                 if not isinstance(v, bytearray)}}
        return {"body": payload}
    if body == "json text":
        return {"body": json.dumps({"image": base64.b64encode(image).decode(), **{
            k: v for k, v in options.items() if not isinstance(v, bytearray | float)}})}
    return {"body": {"bytes": image, "text": image.decode("latin-1"), "bytearray": bytearray(image)}[body],
            **options}


@pytest.mark.parametrize("model", ["dhat", "ducat", "that_knn"])
def test_fuzz_any_fields_get_an_answer_or_a_4xx_and_never_spoil_the_batch(model, runtimes, test_images):
    """Whatever the fields of a request, ``Runtime.handle`` answers it 200 or with a 4xx JSON message and never
    raises; the good request beside it in the same batch is still answered."""
    runtime = runtimes(model)
    good = png(test_images[0][0])
    expected = runtime.handle([{"body": good}])[0]

    @settings(max_examples=200, deadline=None, database=None)
    @given(request_fields(good))
    def check(fields: dict) -> None:
        (status, reply), beside = runtime.handle([fields, {"body": good}])
        assert beside == expected
        json.dumps(reply)
        if status != 200:
            assert 400 <= status < 500 and reply["error"] and reply["status"] == status, (fields, reply)

    check()
