"""Property-based fuzzing (hypothesis) of the loaders that read untrusted files: images and DICOM
(``edgebrain.imageio``), artifact manifests (``edgebrain.artifact.load_manifest``) and bench
results (``edgebrain.gate``).

The property everywhere: no traceback. A loader either returns a well-formed value or raises the
project's error naming the file; the gate always returns a verdict (exit 0, 1 or 2) with reasons.

Budget: short by default (``make test``); ``EDGEBRAIN_FUZZ=long`` (``make fuzz``) runs thousands
of inputs per test; ``EDGEBRAIN_FUZZ_EXAMPLES=N`` sets N per test. ``benchmarks/fuzz_counts.py`` reports the counts (BENCHMARKS.md)."""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgebrain.artifact import INTEGRITY, MANIFEST, load_manifest, manifest_digest, seal, write_manifest
from edgebrain.errors import ImageLoadError, IntegrityError
from edgebrain.imageio import load_resized, load_rgb
from edgebrain.preprocess import PreprocessSpec

pytestmark = pytest.mark.fuzz

LONG = os.environ.get("EDGEBRAIN_FUZZ", "").lower() == "long"
EXAMPLES = os.environ.get("EDGEBRAIN_FUZZ_EXAMPLES")  # overrides both budgets (a quicker long run)


def budget(short: int, long: int) -> Any:
    n = int(EXAMPLES) if EXAMPLES else long if LONG else short
    return settings(max_examples=n, deadline=None, database=None, derandomize=not LONG,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="edgebrain-fuzz-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def assert_image_or_named_error(path: Path) -> None:
    for load in (load_rgb, lambda p: load_resized(p, (24, 24))[0]):
        try:
            rgb = load(path)
        except ImageLoadError as exc:
            assert str(path) in str(exc) and exc.reason, exc
            assert len(str(exc)) < 1000  # a message, not a dump
            event("refused")
            continue
        assert isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8
        assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.shape[0] > 0 and rgb.shape[1] > 0
        event("decoded")


# ----------------------------------------------------------------------------- images


SUFFIXES = [".jpg", ".png", ".bmp", ".tif", ".dcm", ""]


@budget(40, 3000)
@given(data=st.binary(max_size=2048), suffix=st.sampled_from(SUFFIXES))
def test_arbitrary_bytes(work: Path, data: bytes, suffix: str) -> None:
    p = work / f"bytes{suffix}"
    p.write_bytes(data)
    assert_image_or_named_error(p)


def _encodings(data_dir: Path) -> dict[str, bytes]:
    src = sorted((data_dir / "Testing" / "meningioma").iterdir())[0]
    im = Image.open(src).convert("L").resize((48, 48))
    out = {".jpg": src.read_bytes()}
    for fmt, suf in (("PNG", ".png"), ("BMP", ".bmp"), ("TIFF", ".tif")):
        buf = io.BytesIO()
        im.save(buf, fmt)
        out[suf] = buf.getvalue()
    buf = io.BytesIO()
    im.convert("I;16").save(buf, "PNG")
    out[".16.png"] = buf.getvalue()
    dcm = Path(tempfile.mkdtemp()) / "x.dcm"
    _write_dicom(dcm, (np.asarray(im, np.uint16) * 16), {"WindowCenter": 2048, "WindowWidth": 4096})
    out[".dcm"] = dcm.read_bytes()
    shutil.rmtree(dcm.parent)
    return out


@pytest.fixture(scope="module")
def encodings(data_dir: Path) -> dict[str, bytes]:
    return _encodings(data_dir)


@budget(40, 3000)
@given(kind=st.sampled_from([".jpg", ".png", ".bmp", ".tif", ".16.png", ".dcm"]),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=8),
       cut=st.one_of(st.none(), st.floats(0, 1)),
       insert=st.one_of(st.none(), st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=64))))
def test_mutated_real_images(work: Path, encodings: dict[str, bytes], kind: str,
                             flips: list[tuple[float, int]], cut: float | None,
                             insert: tuple[float, bytes] | None) -> None:
    b = bytearray(encodings[kind])
    for pos, val in flips:
        b[int(pos * len(b))] = val
    if insert is not None:
        i = int(insert[0] * len(b))
        b[i:i] = insert[1]
    if cut is not None:
        b = b[: int(cut * len(b))]
    p = work / ("mutated" + (".png" if kind == ".16.png" else kind))
    p.write_bytes(bytes(b))
    assert_image_or_named_error(p)


# ----------------------------------------------------------------------------- DICOM attributes


def _write_dicom(path: Path, pixels: np.ndarray, attrs: dict[str, Any]) -> None:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.dcmwrite(str(path), ds, enforce_file_format=True)


DS_VALUES = st.one_of(st.sampled_from(["NaN", "inf", "-inf", 0, -1, 0.5, 1, 2, 40, 400, 4095, 4096, 65535, 1e6, -1e6,
                                       "1e308", "-0"]),
                      st.integers(-70000, 70000))


def _voi_lut(draw: Any) -> Any:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    n = draw(st.sampled_from([0, 1, 2, 16, 256, 4096]))
    item.LUTDescriptor = [n, draw(st.integers(-100, 5000)), draw(st.sampled_from([8, 10, 12, 16]))]
    k = draw(st.integers(0, 300))
    item.LUTData = np.asarray(draw(st.lists(st.integers(0, 65535), min_size=k, max_size=k)), np.uint16).tobytes()
    return Sequence([item])


@st.composite
def dicoms(draw: Any) -> tuple[np.ndarray, dict[str, Any]]:
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    signed = draw(st.booleans())
    dt = np.int16 if signed else np.uint16
    info = np.iinfo(dt)
    flat = draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=h * w, max_size=h * w))
    pixels = np.asarray(flat, dt).reshape(h, w)
    attrs: dict[str, Any] = {}
    if draw(st.booleans()):
        attrs["BitsStored"] = draw(st.integers(1, 16))
        attrs["HighBit"] = attrs["BitsStored"] - 1
    for key in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"):
        if draw(st.booleans()):
            attrs[key] = draw(st.one_of(DS_VALUES, st.lists(DS_VALUES, min_size=1, max_size=3)))
    if draw(st.booleans()):
        attrs["VOILUTFunction"] = draw(st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID", "BOGUS"]))
    if draw(st.booleans()):
        attrs["PhotometricInterpretation"] = draw(st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB",
                                                                   "PALETTE COLOR", "YBR_FULL"]))
    if draw(st.integers(0, 4)) == 0:
        attrs["VOILUTSequence"] = _voi_lut(draw)
    if draw(st.integers(0, 6)) == 0:
        attrs["NumberOfFrames"] = draw(st.integers(0, 3))
    return pixels, attrs


@budget(40, 3000)
@given(case=dicoms())
def test_generated_dicom_headers(work: Path, case: tuple[np.ndarray, dict[str, Any]]) -> None:
    pixels, attrs = case
    p = work / "gen.dcm"
    try:
        _write_dicom(p, pixels, attrs)
    except Exception:  # noqa: BLE001 - pydicom refuses to write some combinations: not an input
        event("not writable")
        assume(False)
    assert_image_or_named_error(p)
    try:
        grey = load_rgb(p)[..., 0]
    except ImageLoadError:
        return
    assert int(grey.min()) != int(grey.max())  # a constant decode is refused, never classified


# ----------------------------------------------------------------------------- JSON mutation


def json_values() -> st.SearchStrategy[Any]:
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                       st.text(max_size=20), st.sampled_from(["", "..", "../x", "/etc/hostname", "model.tflite",
                                                             "caffe", "scale", "nan", "\x00"]))
    return st.recursive(leaves, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                        max_leaves=8)


def mutate(data: Any, doc: Any, n: int) -> Any:
    """Apply ``n`` random edits (replace, delete, insert) at random depths of a JSON document."""
    doc = copy.deepcopy(doc)
    for _ in range(n):
        parent, key = None, None
        cur = doc
        while isinstance(cur, (dict, list)) and cur and data.draw(st.integers(0, 3)) > 0:
            keys = list(cur) if isinstance(cur, dict) else list(range(len(cur)))
            parent, key = cur, data.draw(st.sampled_from(keys))
            cur = cur[key]
        op = data.draw(st.sampled_from(["replace", "delete", "insert"]))
        if parent is None:
            if op == "replace":
                doc = data.draw(json_values())
            elif isinstance(doc, dict):
                doc[data.draw(st.text(max_size=8))] = data.draw(json_values())
            continue
        if op == "delete":
            del parent[key]
        elif op == "insert" and isinstance(cur, dict):
            cur[data.draw(st.text(max_size=8))] = data.draw(json_values())
        elif op == "insert" and isinstance(cur, list):
            cur.insert(data.draw(st.integers(0, len(cur))), data.draw(json_values()))
        else:
            parent[key] = data.draw(json_values())
    return doc


# ----------------------------------------------------------------------------- manifests


@pytest.fixture(scope="module")
def artifact(work: Path) -> tuple[Path, dict[str, Any]]:
    folder = work / "artifact"
    folder.mkdir()
    (folder / "model.tflite").write_bytes(b"TFL3 placeholder " * 16)
    (folder / "calibration.txt").write_text("a\nb\n")
    m = write_manifest(folder, {
        "name": "fuzz", "target": "tflite", "precision": "int8", "model_file": "model.tflite",
        "preprocess": PreprocessSpec.named("rescale", 32).to_dict(), "class_names": ["a", "b", "c", "d"],
        "input_shape": [32, 32, 3], "source": {"path": "m.keras", "sha256": "a" * 64}, "verification": {"passed": True},
        "runtime_options": {}, "calibration": {"list_file": "calibration.txt"},
    })
    return folder, m


def _use(art: Any) -> None:
    """What a runtime reads from a loaded artifact: none of it may raise anything but the project's errors."""
    _ = (art.target, art.precision, art.model_file, art.class_names, art.name)
    spec = art.preprocess
    spec.apply(np.zeros((1, spec.height, spec.width, 3), np.uint8))


def _load(folder: Path, m: Any, reseal: bool) -> str:
    if reseal and isinstance(m, dict):
        m[INTEGRITY] = seal(m)
    (folder / MANIFEST).write_text(json.dumps(m))
    try:
        art = load_manifest(folder)
    except IntegrityError as exc:
        assert str(folder) in str(exc), exc
        return "refused"
    _use(art)
    return "loaded"


@budget(40, 3000)
@given(data=st.data(), edits=st.integers(1, 4), reseal=st.booleans())
def test_mutated_manifests(work: Path, artifact: tuple[Path, dict[str, Any]], data: Any, edits: int,
                           reseal: bool) -> None:
    folder, good = artifact
    m = mutate(data, good, edits)
    outcome = _load(folder, m, reseal)
    event(f"{'resealed' if reseal else 'edited'}: {outcome}")
    if not reseal and outcome == "loaded":
        # only an edit that changed nothing the digest covers can load without a new digest
        assert isinstance(m, dict) and manifest_digest(m) == good[INTEGRITY]["manifest_sha256"]


@budget(25, 1000)
@given(raw=st.binary(max_size=512))
def test_manifest_bytes(work: Path, artifact: tuple[Path, dict[str, Any]], raw: bytes) -> None:
    folder, _ = artifact
    (folder / MANIFEST).write_bytes(raw)
    with pytest.raises(IntegrityError, match=str(folder)):
        load_manifest(folder)


# ----------------------------------------------------------------------------- gate results


CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
CM = [[9, 1, 0, 0], [0, 10, 0, 0], [0, 0, 9, 0], [0, 0, 1, 7]]


def _record(name: str, target: str = "tflite", precision: str = "int8") -> dict[str, Any]:
    a = np.asarray(CM)
    sup = a.sum(1)
    return {
        "artifact": f"artifacts/{name}", "name": name, "artifact_sha256": "c" * 64, "target": target,
        "precision": precision, "n": int(a.sum()),
        "device": {"profile": "host", "label": "host", "runtime": "x", "threads": 1, "transport": "local",
                   "fingerprint": {"arch": "x86_64", "cpu": "cpu", "cores": 2}, "warnings": []},
        "accuracy": float(np.trace(a) / a.sum()), "accuracy_ci95": [0.8, 0.95], "macro_f1": 0.9,
        "per_class": {c: {"precision": 0.9, "recall": float(a[i, i] / sup[i]), "f1": 0.9, "support": int(sup[i])}
                      for i, c in enumerate(CLASSES)},
        "confusion_matrix": CM, "agreement": 1.0, "mcnemar": {"b": 0, "c": 0, "p_value": 1.0}, "ece": 0.01,
        "flips": [], "dedup": None,
        "latency_ms": {"p50": 5.0, "p90": 6.0, "p99": 7.0, "mean": 5.0, "std": 0.1, "n": 50},
        "throughput_ips": 200.0, "cold_start_ms": 10.0, "e2e_ms": 6.0, "peak_rss_mb": 50.0,
        "size_bytes": 1000, "gzip_bytes": 900,
    }


RESULTS = {
    "schema_version": 1, "kind": "edgebrain-bench-results", "created": "2025-01-01T00:00:00", "command": "bench",
    "data": {"root": "/data", "split": "Testing", "n": 37, "list_hash": "1" * 64, "dedup_n": None,
             "class_names": CLASSES, "failed": []},
    "reference": _record("reference", "tensorflow", "fp32"), "results": [_record("tflite-int8")], "errors": [],
    "warnings": [],
}


def _gate(path: Path, **kw: Any) -> Any:
    from edgebrain.gate import gate, junit_xml, markdown_summary

    rep = gate(path, artifact_check=False, **kw)
    assert rep.exit_code in (0, 1, 2)
    if rep.exit_code:
        assert rep.failures() and all(c.message for _, c in rep.failures())
    markdown_summary(rep)
    junit_xml(rep)
    json.dumps(rep.to_dict(), allow_nan=True)
    return rep


def test_the_unmutated_results_pass(work: Path) -> None:
    p = work / "results.json"
    p.write_text(json.dumps(RESULTS))
    assert _gate(p).exit_code == 0


@budget(40, 3000)
@given(data=st.data(), edits=st.integers(1, 4))
def test_mutated_results(work: Path, data: Any, edits: int) -> None:
    doc = mutate(data, RESULTS, edits)
    p = work / "results.json"
    p.write_text(json.dumps(doc, allow_nan=True))
    rep = _gate(p, max_unreadable=data.draw(st.integers(0, 3)))
    guarded = any("malformed results" in e for e in rep.errors)  # caught by gate's last-resort guard
    event(f"exit {rep.exit_code}" + (" (malformed: guard)" if guarded else ""))


@budget(25, 1000)
@given(raw=st.binary(max_size=512))
def test_results_bytes(work: Path, raw: bytes) -> None:
    p = work / "results.json"
    p.write_bytes(raw)
    rep = _gate(p)
    assert rep.exit_code == 2 and str(p) in " ".join(rep.errors)
