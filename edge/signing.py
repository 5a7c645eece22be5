"""Ed25519 signatures over artifact manifests (``convert --sign KEY``, ``predict/bench --verify-with PUB``).

The manifest's own digest (:func:`edgebrain.artifact.manifest_digest`) covers every field,
including the sha256 of every file, so signing that digest signs the whole artifact. Keys are
ordinary PEM files (PKCS#8 private key, SubjectPublicKeyInfo public key), the same that
``openssl genpkey -algorithm ed25519`` writes; an OpenSSH ``ssh-ed25519`` public key line is
accepted too. Uses the ``cryptography`` package (imported only when signing or verifying).
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any

from .errors import EdgebrainError, IntegrityError
from .io import atomic_write_bytes

ALGORITHM = "ed25519"


class SigningError(EdgebrainError):
    """A key that cannot be read or used."""


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SigningError("signing and --verify-with need the cryptography package: "
                           "pip install cryptography") from exc
    return serialization


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SigningError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from exc


def load_private_key(path: str | Path) -> Any:
    """A PEM Ed25519 private key (unencrypted PKCS#8, as ``edgebrain keygen`` or openssl writes it)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    ser = _crypto()
    data = _read(path, "private key")
    try:
        key = ser.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path}: a {type(key).__name__.lstrip('_')}, not an Ed25519 key")
    return key


def load_public_key(path: str | Path) -> Any:
    """A PEM (SubjectPublicKeyInfo) or OpenSSH ``ssh-ed25519`` public key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    ser = _crypto()
    data = _read(path, "public key")
    try:
        if data.lstrip().startswith(b"ssh-"):
            key = ser.load_ssh_public_key(data.strip())
        else:
            key = ser.load_pem_public_key(data)
    except (ValueError, TypeError, IndexError) as exc:
        raise SigningError(f"{path}: not a PEM or OpenSSH public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path}: a {type(key).__name__.lstrip('_')}, not an Ed25519 public key")
    return key


def key_id(public_key: Any) -> str:
    """sha256 of the raw 32-byte public key, first 16 hex digits: names the key in a manifest."""
    ser = _crypto()
    raw = public_key.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _message(digest: str) -> bytes:
    return f"edgebrain-manifest-v1:{digest}".encode("ascii")


def sign_digest(digest: str, private_key: Any) -> dict[str, str]:
    """The ``integrity.signature`` block for a manifest digest."""
    sig = private_key.sign(_message(digest))
    return {"algorithm": ALGORITHM, "key_id": key_id(private_key.public_key()),
            "value": base64.b64encode(sig).decode("ascii")}


def verify_digest(digest: str, signature: Any, public_key: Any, where: str) -> None:
    """Raise IntegrityError unless ``signature`` is a valid Ed25519 signature of ``digest``."""
    from cryptography.exceptions import InvalidSignature

    if not isinstance(signature, dict) or signature.get("algorithm") != ALGORITHM:
        raise IntegrityError(f"{where}: the artifact is not signed (no {ALGORITHM} signature in its manifest); "
                             "refusing it because a public key was given")
    try:
        raw = base64.b64decode(str(signature.get("value", "")), validate=True)
    except ValueError as exc:
        raise IntegrityError(f"{where}: the manifest's signature is not valid base64") from exc
    try:
        public_key.verify(raw, _message(digest))
    except InvalidSignature as exc:
        want = key_id(public_key)
        got = signature.get("key_id")
        hint = f" (signed with key {got}, checked with {want})" if got != want else " (the manifest was changed)"
        raise IntegrityError(f"{where}: the signature does not verify{hint}; refusing the artifact") from exc


def _write_private(path: Path, data: bytes) -> None:
    """Created with mode 0600 from the start (never readable by others, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def generate_keypair(private_path: str | Path, public_path: str | Path | None = None,
                     overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``private_path`` (PEM, mode 0600) and ``<private_path>.pub``."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    ser = _crypto()
    priv = Path(private_path)
    pub = Path(public_path) if public_path else priv.with_name(priv.name + ".pub")
    for p in (priv, pub):
        if p.exists() and not overwrite:
            raise SigningError(f"{p} exists (use --overwrite to replace it)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    _write_private(priv, pem)
    atomic_write_bytes(pub, key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub
