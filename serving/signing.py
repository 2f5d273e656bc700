"""Ed25519 signatures for model archives, checked before TorchServe loads anything.

An archive's ``MANIFEST.json`` (SHA-256 of every file, checked by the runtime) catches corruption,
but whoever can write to the model store can rewrite it, and the handler that checks it is inside
the archive. A signature made where the archive is built, with a key that never reaches the
serving machine, closes that: ``robustserve serve start --verify-key`` checks every archive it is
about to load against the public key and refuses to start on a missing, stale or foreign signature,
and it turns TorchServe's model API off so nothing unchecked is registered later.

The signature covers the archive's SHA-256 *and its file name*, so a signed archive can neither be
altered nor served as another model. It lives beside the archive as ``<name>.mar.sig`` (JSON).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from training.checkpoint import write_json
from training.errors import RobustServeError, cannot_write
from training.run_files import sha256_file

SIGNATURE_SUFFIX = ".sig"
SIGNING_KEY, VERIFY_KEY = "signing_key.pem", "verify_key.pem"
_DOMAIN = b"robustserve model archive v1\n"  # what is signed is never mistaken for another protocol's message


class SignatureError(RobustServeError):
    """A key that cannot be read, or an archive whose signature is missing or does not verify."""


def signature_path(archive: Path) -> Path:
    return archive.with_name(archive.name + SIGNATURE_SUFFIX)


def _message(name: str, sha256: str) -> bytes:
    return _DOMAIN + f"{name}\n{sha256}\n".encode()


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (a private key is never readable by others, even
    briefly); O_EXCL: never overwrite, even a file that appeared after the caller looked."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as handle:
        handle.write(data)


def generate_keys(folder: Path) -> tuple[Path, Path]:
    """A new Ed25519 key pair in ``folder``: ``signing_key.pem`` (private, mode 0600: keep it where archives
    are built) and ``verify_key.pem`` (public: give it to the servers). Returns both paths."""
    folder = Path(folder)
    private = Ed25519PrivateKey.generate()
    signing, verify = folder / SIGNING_KEY, folder / VERIFY_KEY
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for path in (signing, verify):
            if path.exists():
                raise SignatureError(f"{path} already exists; keys are never overwritten, choose another folder")
        _write_new(signing, private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()), 0o600)
        _write_new(verify, private.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
    except OSError as err:
        raise SignatureError(cannot_write(folder, err, "choose another folder")) from err
    return signing, verify


def _read_key(path: Path, private: bool) -> Ed25519PrivateKey | Ed25519PublicKey:
    kind = "private (signing)" if private else "public (verify)"
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise SignatureError(f"cannot read the {kind} key {path}: {err.strerror or err}") from None
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError):
        key = None
    wanted = Ed25519PrivateKey if private else Ed25519PublicKey
    if not isinstance(key, wanted):
        raise SignatureError(f"{path} is not an unencrypted Ed25519 {kind} key in PEM "
                             f"(`robustserve keygen` makes a pair)")
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    return _read_key(path, private=True)  # type: ignore[return-value]


def load_verify_key(path: Path) -> Ed25519PublicKey:
    return _read_key(path, private=False)  # type: ignore[return-value]


def sign_archive(archive: Path, key: Ed25519PrivateKey) -> Path:
    """Write ``<archive>.sig`` (atomically) and return its path."""
    sha256 = sha256_file(archive)
    record = {"algorithm": "ed25519", "archive": archive.name, "sha256": sha256,
              "signature": base64.b64encode(key.sign(_message(archive.name, sha256))).decode()}
    target = signature_path(archive)
    write_json(target, record)
    return target


def verify_archive(archive: Path, key: Ed25519PublicKey) -> None:
    """Raise SignatureError unless ``<archive>.sig`` is this key's signature of this archive under this name."""
    path = signature_path(archive)
    try:
        record = json.loads(path.read_text())
        signature = base64.b64decode(record["signature"], validate=True)
    except FileNotFoundError:
        raise SignatureError(f"{archive} has no signature ({path.name}); sign it with "
                             f"`robustserve package --sign-key`") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SignatureError(f"{path} is not a signature file: {err}") from None
    sha256 = sha256_file(archive)
    try:
        key.verify(signature, _message(archive.name, sha256))
    except InvalidSignature:
        if record.get("archive") == archive.name and record.get("sha256") != sha256:
            why = "the archive changed after it was signed"
        elif record.get("archive") != archive.name:
            why = f"it was signed as {record.get('archive')!r}"
        else:
            why = "it was signed with another key"
        raise SignatureError(f"{archive} does not match its signature: {why}") from None
