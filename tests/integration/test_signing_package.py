"""serving.signing through ``robustserve package``: each archive of a tiny run signed, and a stale signature
dropped on an unsigned rebuild. (Signatures themselves: tests/unit/test_signing.py; the server's refusal to
start on a bad signature, with a real TorchServe: test_server.py.)"""

from __future__ import annotations

import pytest

from serving.cli import main
from serving.signing import generate_keys, load_verify_key, signature_path, verify_archive


@pytest.mark.slow
def test_package_signs_each_archive_and_an_unsigned_rebuild_drops_the_stale_signature(served_runs, tmp_path,
                                                                                      capsys):
    signing, verify = generate_keys(tmp_path / "keys")
    store = tmp_path / "store"
    assert main(["package", str(served_runs["that"]), "--model-store", str(store), "--sign-key", str(signing)]) == 0
    assert capsys.readouterr().out.count("(signed)") == 2  # that and that_knn
    key = load_verify_key(verify)
    for name in ("that.mar", "that_knn.mar"):
        verify_archive(store / name, key)

    assert main(["package", str(served_runs["that"]), "--model-store", str(store), "--models", "that"]) == 0
    assert not signature_path(store / "that.mar").exists()  # it would vouch for the archive it replaced
    verify_archive(store / "that_knn.mar", key)  # untouched

    assert main(["package", str(served_runs["that"]), "--model-store", str(store), "--sign-key", str(verify)]) == 2
    assert "is not an unencrypted Ed25519 private" in capsys.readouterr().err
