"""Artifact folders written by ``edgebrain convert``: a model file plus ``manifest.json``.

TensorFlow-free. The manifest carries everything downstream commands need (target,
precision, preprocessing, classes, hashes, versions), so ``bench``, ``predict`` and
``gate`` never repeat a flag. :func:`load_manifest` refuses an artifact whose files no
longer match the recorded sha256, whose manifest no longer matches its own digest
(``integrity.manifest_sha256``: classes, preprocessing, input spec, file list, precision ...),
that names a file outside its folder, or, given a public key, that is unsigned or mis-signed.
A manifest written before digests existed (no ``integrity`` block) is refused with a clear
error: convert the model again.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import IntegrityError
from .io import atomic_write_json, dumps, read_json, sha256_file
from .preprocess import PreprocessSpec

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: the manifest carries its own digest (``integrity``)
KIND = "edgebrain-artifact"
INTEGRITY = "integrity"
DIGEST_SCHEME = "sha256-canonical-json-v1"


@dataclass
class Artifact:
    path: Path  # the artifact folder
    manifest: dict[str, Any]

    @property
    def target(self) -> str:
        return str(self.manifest["target"])

    @property
    def precision(self) -> str:
        return str(self.manifest["precision"])

    @property
    def model_file(self) -> Path:
        return self.path / self.manifest["model_file"]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.get("class_names") or [])

    @property
    def preprocess(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.manifest["preprocess"])

    @property
    def name(self) -> str:
        return self.manifest.get("name") or self.path.name


def file_hashes(folder: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() not in exclude
    }


def write_manifest(folder: Path, manifest: dict[str, Any], signing_key: Any = None) -> dict[str, Any]:
    """Fill in the file hashes and the manifest's own digest (signed with ``signing_key``, an
    Ed25519 private key, when given) and write ``manifest.json`` atomically."""
    folder = Path(folder)
    m = {**{k: v for k, v in manifest.items() if k != INTEGRITY}, "manifest_version": MANIFEST_VERSION,
         "kind": KIND}
    m["files"] = file_hashes(folder)
    if m.get("model_file") not in m["files"]:
        raise IntegrityError(f"{folder}: model file {m.get('model_file')!r} missing")
    m["artifact_sha256"] = m["files"][m["model_file"]]
    m = json.loads(dumps(m))  # what the file will hold (NumPy scalars, paths as JSON): the digest covers that
    m[INTEGRITY] = seal(m, signing_key)
    atomic_write_json(folder / MANIFEST, m)
    return m


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces, ASCII), ``integrity`` left out."""
    body = {k: v for k, v in manifest.items() if k != INTEGRITY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def seal(manifest: dict[str, Any], signing_key: Any = None) -> dict[str, Any]:
    """The ``integrity`` block for a manifest: its digest, and a signature of it with ``signing_key``."""
    digest = manifest_digest(manifest)
    block: dict[str, Any] = {"scheme": DIGEST_SCHEME, "manifest_sha256": digest}
    if signing_key is not None:
        from .signing import sign_digest

        block["signature"] = sign_digest(digest, signing_key)
    return block


# Files a copy between machines may add (Finder, Explorer); never read by a runtime.
_OS_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every listed file present with its sha256, the model file's hash equal to the recorded
    ``artifact_sha256``, and no file in the folder that the manifest does not list (a runtime could
    read it: OpenVINO weights, ONNX external data)."""
    files = manifest.get("files")
    if not files or not isinstance(files, dict):
        raise IntegrityError(f"{folder}: manifest lists no file hashes")
    model_file = manifest.get("model_file")
    if model_file not in files:
        raise IntegrityError(f"{folder}: the manifest does not list a hash for its model file {model_file!r}")
    if "artifact_sha256" in manifest and manifest["artifact_sha256"] != files[model_file]:
        raise IntegrityError(f"{folder}: the manifest's artifact_sha256 differs from the hash it lists for "
                             f"{model_file}: the manifest was edited; refusing to use it")
    unlisted = [rel for p in sorted(Path(folder).rglob("*"))
                if p.is_file() and (rel := p.relative_to(folder).as_posix()) != MANIFEST
                and p.name not in _OS_FILES and not p.name.startswith("._") and rel not in files]
    if unlisted:
        raise IntegrityError(f"{folder}: {', '.join(unlisted[:5])} {'is' if len(unlisted) == 1 else 'are'} not in "
                             "the manifest (added after conversion); remove it or convert again")
    for rel, want in files.items():
        p = folder / rel
        if not p.is_file():
            raise IntegrityError(f"{folder}: {rel} listed in the manifest is missing")
        got = sha256_file(p)
        if got != want:
            raise IntegrityError(
                f"{p}: sha256 {got[:12]}… does not match the manifest ({want[:12]}…): the artifact was "
                "modified after conversion; refusing to use it"
            )


def check_relative(folder: Path, rel: Any, what: str) -> Path:
    """``folder / rel`` for a manifest path that stays inside ``folder`` (no absolute path, no ``..``,
    no link leading out); IntegrityError otherwise."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise IntegrityError(f"{folder}: the manifest's {what} {rel!r} is not a relative file name")
    pp = PurePosixPath(rel)
    if pp.is_absolute() or ".." in pp.parts or (len(rel) > 1 and rel[1] == ":"):
        raise IntegrityError(f"{folder}: the manifest's {what} {rel!r} points outside the artifact folder; "
                             "refusing it")
    p = folder / rel
    try:
        inside = p.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError) as exc:  # symlink loops
        raise IntegrityError(f"{folder}: the manifest's {what} {rel!r} cannot be resolved ({exc})") from exc
    if not inside:
        raise IntegrityError(f"{folder}: {rel} is a link to a file outside the artifact folder; refusing it")
    return p


def check_digest(folder: Path, m: dict[str, Any], mpath: Path) -> str:
    """The manifest's own digest must match its content; returns it. Legacy manifests are refused."""
    block = m.get(INTEGRITY)
    if block is None:
        raise IntegrityError(
            f"{mpath}: this manifest has no integrity digest (written by an edgebrain before manifest "
            "digests, manifest_version 1): its classes and preprocessing are unprotected, so it is not "
            "loaded; convert the model again with this version (docs/integrity.md)")
    if not isinstance(block, dict) or block.get("scheme") != DIGEST_SCHEME \
            or not isinstance(block.get("manifest_sha256"), str):
        raise IntegrityError(f"{mpath}: unknown or malformed integrity block (expected scheme {DIGEST_SCHEME})")
    got = manifest_digest(m)
    if got != block["manifest_sha256"]:
        raise IntegrityError(
            f"{mpath}: the manifest does not match its own digest (sha256 {got[:12]}… vs recorded "
            f"{block['manifest_sha256'][:12]}…): it was edited after conversion (classes, preprocessing, "
            "file hashes ...); refusing to use it")
    return got


def _check_fields(m: dict[str, Any], mpath: Path) -> None:
    for key in ("target", "precision", "model_file", "preprocess"):
        if key not in m:
            raise IntegrityError(f"{mpath}: missing {key!r}")
    for key in ("target", "precision", "model_file"):
        if not isinstance(m[key], str):
            raise IntegrityError(f"{mpath}: {key!r} must be a string, not {type(m[key]).__name__}")
    names = m.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(c, str) for c in names)):
        raise IntegrityError(f"{mpath}: class_names must be a list of strings")
    shape = m.get("input_shape")
    if shape is not None and (not isinstance(shape, list) or not 2 <= len(shape) <= 3
                              or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise IntegrityError(f"{mpath}: input_shape must be [height, width, channels] of positive integers")
    why = preprocess_problem(m["preprocess"])
    if why:
        raise IntegrityError(f"{mpath}: invalid preprocess block: {why}")
    files = m.get("files")
    if files is not None and (not isinstance(files, dict) or not all(
            isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h) for h in files.values())):
        raise IntegrityError(f"{mpath}: files must map each file name to its sha256 (64 hex digits)")


_RESIZE_METHODS = ("bilinear", "bicubic", "nearest", "area")


def _finite_numbers(v: Any, n: int) -> bool:
    return (isinstance(v, list) and len(v) == n
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v))


def preprocess_problem(d: Any) -> str | None:
    """What is wrong with a manifest's ``preprocess`` block (None when it is usable)."""
    if not isinstance(d, dict):
        return "not an object"
    for key in ("height", "width", "channels"):
        v = d.get(key, 3 if key == "channels" else None)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= 65536:
            return f"{key} must be a positive integer, not {v!r}"
    if d.get("mode", "scale") not in ("scale", "caffe"):
        return f"unknown mode {d.get('mode')!r} (scale or caffe)"
    if not _finite_numbers(d.get("mean", [0.0, 0.0, 0.0]), 3):
        return "mean must be 3 finite numbers"
    std = d.get("std", [255.0, 255.0, 255.0])
    if not _finite_numbers(std, 3) or any(x == 0 for x in std):
        return "std must be 3 finite non-zero numbers"
    if d.get("resize", "bilinear") not in _RESIZE_METHODS:
        return f"unknown resize method {d.get('resize')!r}"
    if not isinstance(d.get("name", ""), str) or not isinstance(d.get("extra", {}), dict):
        return "name must be a string and extra an object"
    return None


def load_manifest(path: str | Path, verify: bool = True, public_key: Any = None) -> Artifact:
    """An artifact folder (or its manifest.json, or its model file) -> Artifact.

    Always checked: the manifest's own digest, its fields' types, and that every path in it stays
    in the folder. ``verify`` also re-hashes every file. ``public_key`` (an Ed25519 public key, or
    a path to one) requires a valid signature by that key."""
    p = Path(path)
    if not p.exists():
        raise IntegrityError(f"{p}: no such file or folder")
    folder = p if p.is_dir() else p.parent
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise IntegrityError(f"{folder}: no {MANIFEST} (not an edgebrain artifact folder)")
    try:
        m = read_json(mpath)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise IntegrityError(f"{mpath}: not valid JSON ({exc})") from exc
    except OSError as exc:
        raise IntegrityError(f"{mpath}: cannot read it ({exc.strerror or exc})") from exc
    if not isinstance(m, dict) or m.get("kind") != KIND:
        raise IntegrityError(f"{mpath}: not an edgebrain artifact manifest")
    digest = check_digest(folder, m, mpath)
    _check_fields(m, mpath)
    if public_key is not None:
        from .signing import load_public_key, verify_digest

        key = load_public_key(public_key) if isinstance(public_key, (str, Path)) else public_key
        verify_digest(digest, m[INTEGRITY].get("signature"), key, str(folder))
    check_relative(folder, m["model_file"], "model_file")
    files = m.get("files")
    for rel in files if isinstance(files, dict) else []:
        check_relative(folder, rel, "file")
    if isinstance(m.get("verification"), dict) and m["verification"].get("passed") is False:
        raise IntegrityError(f"{folder}: this artifact failed verification at conversion time")
    if verify:
        verify_files(folder, m)
    return Artifact(folder, m)


def raw_artifact(model_file: str | Path, preprocess: PreprocessSpec, class_names: list[str] | None,
                 precision: str = "unknown") -> Artifact:
    """Wrap a bare .tflite/.onnx/.xml file from elsewhere (no manifest): caller supplies the spec."""
    p = Path(model_file)
    target = {".tflite": "tflite", ".onnx": "onnx", ".xml": "openvino"}.get(p.suffix.lower())
    if target is None:
        raise IntegrityError(f"{p}: unknown model file type (expected .tflite, .onnx or .xml)")
    m = {
        "manifest_version": MANIFEST_VERSION, "kind": KIND, "target": target, "precision": precision,
        "model_file": p.name, "preprocess": preprocess.to_dict(), "class_names": class_names or [],
        "input_shape": [preprocess.height, preprocess.width, preprocess.channels],
        "files": {p.name: sha256_file(p)}, "source": {"path": str(p), "note": "raw file, no manifest"},
    }
    m["artifact_sha256"] = m["files"][p.name]
    return Artifact(p.parent, m)


def is_artifact_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest_unchecked(path: str | Path) -> dict[str, Any]:
    return read_json(Path(path) / MANIFEST)
