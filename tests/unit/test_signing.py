"""serving.signing: Ed25519 signatures of model archives, bound to the archive's bytes and file name.
(The server's refusal to start on a bad signature, with a real TorchServe, is in test_server.py.)"""

from __future__ import annotations

import json
import shutil
import stat

import pytest

from serving.cli import main
from serving.signing import (
    SignatureError,
    generate_keys,
    load_signing_key,
    load_verify_key,
    sign_archive,
    signature_path,
    verify_archive,
)


@pytest.fixture
def keys(tmp_path):
    signing, verify = generate_keys(tmp_path / "keys")
    return load_signing_key(signing), load_verify_key(verify)


@pytest.fixture
def archive(tmp_path):
    path = tmp_path / "store" / "dhat.mar"
    path.parent.mkdir()
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 64)  # any bytes: the signature covers the file as it is
    return path


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path, capsys):
    assert main(["keygen", str(tmp_path / "k")]) == 0
    assert "signing key" in capsys.readouterr().out
    signing, verify = tmp_path / "k" / "signing_key.pem", tmp_path / "k" / "verify_key.pem"
    assert stat.S_IMODE(signing.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in signing.read_bytes() and b"PUBLIC KEY" in verify.read_bytes()
    before = signing.read_bytes()
    assert main(["keygen", str(tmp_path / "k")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists; keys are never overwritten" in err
    assert signing.read_bytes() == before


def test_a_signed_archive_verifies_and_its_signature_file_says_what_it_covers(keys, archive):
    signing, verify = keys
    path = sign_archive(archive, signing)
    assert path == signature_path(archive) == archive.with_name("dhat.mar.sig")
    record = json.loads(path.read_text())
    assert record["algorithm"] == "ed25519" and record["archive"] == "dhat.mar" and len(record["sha256"]) == 64
    verify_archive(archive, verify)
    assert sorted(p.name for p in archive.parent.iterdir()) == ["dhat.mar", "dhat.mar.sig"]  # no temp file left


def test_every_way_a_signature_can_fail_is_refused_with_the_reason(keys, archive, tmp_path):
    signing, verify = keys
    with pytest.raises(SignatureError, match="has no signature .*sign it with `robustserve package --sign-key`"):
        verify_archive(archive, verify)
    sign_archive(archive, signing)

    other = archive.with_name("natural.mar")  # a signed archive served under another model's name
    shutil.copy(archive, other)
    shutil.copy(signature_path(archive), signature_path(other))
    with pytest.raises(SignatureError, match="does not match its signature: it was signed as 'dhat.mar'"):
        verify_archive(other, verify)

    stranger = load_verify_key(generate_keys(tmp_path / "stranger")[1])
    with pytest.raises(SignatureError, match="signed with another key"):
        verify_archive(archive, stranger)

    data = bytearray(archive.read_bytes())
    data[100] ^= 1  # one bit
    archive.write_bytes(bytes(data))
    with pytest.raises(SignatureError, match="the archive changed after it was signed"):
        verify_archive(archive, verify)

    signature_path(archive).write_text("{not json")
    with pytest.raises(SignatureError, match="is not a signature file"):
        verify_archive(archive, verify)


def test_keys_of_the_wrong_kind_are_one_line_errors(keys, tmp_path):
    signing, verify = generate_keys(tmp_path / "pair")
    with pytest.raises(SignatureError, match="is not an unencrypted Ed25519 private .signing. key"):
        load_signing_key(verify)  # the public half given as the signing key
    with pytest.raises(SignatureError, match="is not an unencrypted Ed25519 public .verify. key"):
        load_verify_key(signing)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(SignatureError, match="is not an unencrypted Ed25519 public"):
        load_verify_key(garbage)
    with pytest.raises(SignatureError, match="cannot read the public .verify. key .*missing.pem"):
        load_verify_key(tmp_path / "missing.pem")


def test_serve_start_with_a_verify_key_refuses_an_unsigned_archive_in_one_line(tmp_path, capsys):
    import zipfile

    from helpers import free_server_ports

    store = tmp_path / "store"
    store.mkdir()
    with zipfile.ZipFile(store / "dhat.mar", "w") as mar:
        mar.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": "dhat", "modelVersion": "1.0"}}))
    _, verify = generate_keys(tmp_path / "keys")
    ports = free_server_ports()
    args = ["serve", "start", "--model-store", str(store), "--state-dir", str(tmp_path / "ts"), "--verify-key",
            str(verify), "--inference-port", str(ports["inference_port"]),
            "--management-port", str(ports["management_port"]), "--metrics-port", str(ports["metrics_port"])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dhat.mar has no signature" in err
    assert not (tmp_path / "ts").exists()  # nothing was written or started
