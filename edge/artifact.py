"""Artifact folders written by ``edgebrain convert``: a model file plus ``manifest.json``.

TensorFlow-free. The manifest carries everything downstream commands need (target,
precision, preprocessing, classes, hashes, versions), so ``bench``, ``predict`` and
``gate`` never repeat a flag. :func:`load_manifest` refuses an artifact whose files no
longer match the recorded sha256.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import IntegrityError
from .io import atomic_write_json, read_json, sha256_file
from .preprocess import PreprocessSpec

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
KIND = "edgebrain-artifact"


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


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Fill in the file hashes and write ``manifest.json`` atomically."""
    folder = Path(folder)
    m = {"manifest_version": MANIFEST_VERSION, "kind": KIND, **manifest}
    m["files"] = file_hashes(folder)
    if m.get("model_file") not in m["files"]:
        raise IntegrityError(f"{folder}: model file {m.get('model_file')!r} missing")
    m["artifact_sha256"] = m["files"][m["model_file"]]
    atomic_write_json(folder / MANIFEST, m)
    return m


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


def load_manifest(path: str | Path, verify: bool = True) -> Artifact:
    """An artifact folder (or its manifest.json, or its model file) -> Artifact, hash-checked."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise IntegrityError(f"{folder}: no {MANIFEST} (not an edgebrain artifact folder)")
    try:
        m = read_json(mpath)
    except ValueError as exc:
        raise IntegrityError(f"{mpath}: not valid JSON ({exc})") from exc
    if m.get("kind") != KIND:
        raise IntegrityError(f"{mpath}: not an edgebrain artifact manifest")
    for key in ("target", "precision", "model_file", "preprocess"):
        if key not in m:
            raise IntegrityError(f"{mpath}: missing {key!r}")
    if m.get("verification", {}).get("passed") is False:
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
