"""Fail closed on bad inputs: DICOM windows (pydicom's modality / VOI LUT functions), images that
decode to a constant, every unreadable dataset entry listed by `data check`, and the gate's
unreadable-image and self-consistency rules."""

from __future__ import annotations

import json
import os
import shutil
import socket
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgebrain.errors import ImageLoadError
from edgebrain.imageio import load_rgb

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def write_dicom(path: Path, pixels: np.ndarray, **attrs: Any) -> Path:
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
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def scan12(data_dir: Path) -> np.ndarray:
    """A real Testing scan as 12-bit scanner values (grey * 16)."""
    f = sorted((data_dir / "Testing" / "glioma").iterdir())[0]
    g = np.asarray(Image.open(f).convert("L"), np.uint16)
    return g * 16


@pytest.mark.parametrize("window,why", [
    ({"WindowCenter": "NaN", "WindowWidth": 400}, "non-finite VOI window"),
    ({"WindowCenter": 2000, "WindowWidth": "inf"}, "non-finite VOI window"),
    ({"WindowCenter": "-inf", "WindowWidth": 400}, "non-finite VOI window"),
    ({"WindowCenter": 2000, "WindowWidth": 0}, "degenerate VOI window"),
    ({"WindowCenter": 2000, "WindowWidth": -50}, "degenerate VOI window"),
    ({"WindowCenter": 2000}, "incomplete VOI window"),
    ({"WindowCenter": -90000, "WindowWidth": 10}, "decodes to a constant image"),
])
def test_unusable_dicom_windows_are_refused_by_name(tmp_path: Path, scan12: np.ndarray, window: dict[str, Any],
                                                    why: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the non-finite DS values it writes
        p = write_dicom(tmp_path / "bad.dcm", scan12, **window)
    with pytest.raises(ImageLoadError, match=why) as exc:
        load_rgb(p)
    assert str(p) in str(exc.value)


def test_dicom_voi_lut_sequence_and_sigmoid_use_pydicom(tmp_path: Path, scan12: np.ndarray) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    # A VOI LUT that maps 12-bit values to 8 bits (value // 16): the original greyscale back.
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = (np.arange(4096) // 16).astype(np.uint16).tobytes()
    p = write_dicom(tmp_path / "lut.dcm", scan12, VOILUTSequence=Sequence([item]),
                    WindowCenter="NaN", WindowWidth=400)  # the LUT wins over a (broken) window
    got = load_rgb(p)[..., 0].astype(int)
    grey = (scan12 // 16).astype(int)
    lo, hi = 0, 255  # the LUT's own output range
    assert np.abs(got - np.rint((grey - lo) / (hi - lo) * 255)).max() <= 1
    # SIGMOID (PS3.3 C.11.2.1.3.1): pydicom's formula, scaled from its output range to 0..255
    p2 = write_dicom(tmp_path / "sig.dcm", scan12, WindowCenter=2048, WindowWidth=1024, VOILUTFunction="SIGMOID")
    sig = load_rgb(p2)[..., 0].astype(float)
    want = 255.0 / (1 + np.exp(-4 * (scan12.astype(float) - 2048) / 1024))
    assert np.abs(sig - want).max() <= 1.0
    # LINEAR as the standard defines it (center - 0.5, width - 1): the full 12-bit window gives the scan
    p3 = write_dicom(tmp_path / "lin.dcm", scan12, WindowCenter=2048, WindowWidth=4096)
    lin = load_rgb(p3)[..., 0].astype(int)
    assert np.abs(lin - (scan12 / 4095 * 255)).max() <= 1


def test_nan_rescale_is_refused(tmp_path: Path, scan12: np.ndarray) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = write_dicom(tmp_path / "nan-slope.dcm", scan12, RescaleSlope="NaN", RescaleIntercept=0)
    with pytest.raises(ImageLoadError, match="non-finite pixel values after the modality rescale"):
        load_rgb(p)


def _dataset(tmp_path: Path, data_dir: Path) -> Path:
    root = tmp_path / "ds"
    for split in ("Training", "Testing"):
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            for f in sorted((data_dir / split / c).iterdir())[:2]:
                shutil.copy(f, d / f.name)
    return root


def test_data_check_lists_every_entry_it_could_not_read(tmp_path: Path, data_dir: Path) -> None:
    from edgebrain.cli import cli
    from edgebrain.data import check

    root = _dataset(tmp_path, data_dir)
    g = root / "Testing" / "glioma"
    (g / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")  # dangling
    (g / "loop-a.jpg").symlink_to(g / "loop-b.jpg")
    (g / "loop-b.jpg").symlink_to(g / "loop-a.jpg")  # a loop
    (g / "x.jpg").mkdir()  # a folder named like an image
    Image.new("L", (40, 40), 17).save(g / "flat.png")  # decodes, but to a constant
    (root / "Testing" / "notes.jpg").write_bytes(b"outside any class folder")
    sock = socket.socket(socket.AF_UNIX)
    sock_path = g / "s.jpg"
    try:
        sock.bind(str(sock_path))
    except OSError:  # pragma: no cover - some file systems refuse sockets
        sock_path = None
    try:
        rep = check(root)
    finally:
        sock.close()
    probs = {Path(p["path"]).name: p["problem"] for p in rep["problems"]}
    assert "dangling symbolic link" in probs["gone.jpg"]
    assert "symbolic link loop" in probs["loop-a.jpg"] and "symbolic link loop" in probs["loop-b.jpg"]
    assert "folder" in probs["x.jpg"]
    assert "constant image" in probs["flat.png"]
    assert "outside any class folder" in probs["notes.jpg"]
    if sock_path is not None:
        assert "not a regular file" in probs["s.jpg"]
    if sock_path is not None:
        os.unlink(sock_path)
    res = CliRunner().invoke(cli, ["data", "check", str(root), "--json"])
    assert res.exit_code == 1
    assert {Path(p["path"]).name for p in json.loads(res.output[res.output.index("{"):])["problems"]} >= {
        "gone.jpg", "loop-a.jpg", "x.jpg", "flat.png", "notes.jpg"}


# ----------------------------------------------------------------------------- gate


def _record(name: str, cm: list[list[int]], **over: Any) -> dict[str, Any]:
    """A bench record computed from a confusion matrix (rows: true class), as bench writes it."""
    a = np.asarray(cm)
    sup = a.sum(1)
    rec = {
        "artifact": f"artifacts/{name}", "name": name, "artifact_sha256": "c" * 64, "target": "tflite",
        "precision": "int8", "n": int(a.sum()),
        "device": {"profile": "host", "label": "host", "runtime": "x", "threads": 1, "transport": "local",
                   "fingerprint": {"arch": "x86_64", "cpu": "cpu", "cores": 2}},
        "accuracy": float(np.trace(a) / a.sum()), "accuracy_ci95": [0.0, 1.0], "macro_f1": 0.9,
        "per_class": {c: {"precision": 0.9, "recall": float(a[i, i] / sup[i]), "f1": 0.9, "support": int(sup[i])}
                      for i, c in enumerate(CLASSES)},
        "confusion_matrix": cm, "agreement": 1.0, "mcnemar": {"b": 0, "c": 0, "p_value": 1.0}, "ece": 0.01,
        "flips": [], "dedup": None,
        "latency_ms": {"p50": 5.0, "p90": 6.0, "p99": 7.0, "mean": 5.0, "std": 0.1, "n": 50},
        "throughput_ips": 200.0, "cold_start_ms": 10.0, "e2e_ms": 6.0, "peak_rss_mb": 50.0,
        "size_bytes": 1000, "gzip_bytes": 900,
    }
    rec.update(over)
    return rec


CM = [[9, 1, 0, 0], [0, 10, 0, 0], [0, 0, 9, 0], [0, 0, 1, 7]]  # 37 images


def _results(failed: list[dict[str, str]] | None = None, rec: dict[str, Any] | None = None,
             ref: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "schema_version": 1, "kind": "edgebrain-bench-results", "created": "2025-01-01T00:00:00",
        "command": "edgebrain bench ...",
        "data": {"root": "/data", "split": "Testing", "n": 37, "list_hash": "1" * 64, "dedup_n": None,
                 "class_names": CLASSES, "failed": [] if failed is None else failed},
        "reference": ref or _record("reference", CM, target="tensorflow", precision="fp32"),
        "results": [rec or _record("tflite-int8", CM)], "errors": [],
    }


def _write(tmp_path: Path, doc: dict[str, Any], name: str = "r.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def test_the_fixture_passes_the_gate(tmp_path: Path) -> None:
    from edgebrain.gate import gate

    rep = gate(_write(tmp_path, _results()), artifact_check=False)
    assert rep.exit_code == 0, rep.to_dict()


def test_unscored_images_fail_the_gate_unless_allowed(tmp_path: Path) -> None:
    """15 of 52 images unreadable: bench scored the other 37; the gate no longer passes with a note."""
    from edgebrain.cli import cli
    from edgebrain.gate import gate

    failed = [{"file": f"Testing/glioma/bad-{i}.jpg", "problem": "corrupt or truncated image"} for i in range(15)]
    p = _write(tmp_path, _results(failed))
    rep = gate(p, artifact_check=False)
    c = rep.subjects[0].check("unreadable")
    assert rep.exit_code == 1 and c is not None and c.status == "fail"
    assert "15 of 52" in c.message and "bad-0.jpg" in c.message and "28.8 %" in c.message
    assert gate(p, artifact_check=False, max_unreadable=14).exit_code == 1
    assert gate(p, artifact_check=False, max_unreadable=15).exit_code == 0
    res = CliRunner().invoke(cli, ["gate", str(p), "--no-artifact-check"])
    assert res.exit_code == 1 and "15 of 52" in res.output
    res = CliRunner().invoke(cli, ["gate", str(p), "--no-artifact-check", "--max-unreadable", "15"])
    assert res.exit_code == 0, res.output
    # results that do not say what could not be read: untrusted
    doc = _results()
    del doc["data"]["failed"]
    assert gate(_write(tmp_path, doc, "nofailed.json"), artifact_check=False).exit_code == 2


def test_results_that_contradict_themselves_are_not_trusted(tmp_path: Path) -> None:
    from edgebrain.gate import gate

    def status(rec: dict[str, Any] | None = None, ref: dict[str, Any] | None = None) -> tuple[int, str]:
        rep = gate(_write(tmp_path, _results(rec=rec, ref=ref), "x.json"), artifact_check=False)
        c = rep.subjects[0].check("consistency")
        return rep.exit_code, (c.message if c else "") + " ".join(rep.errors)

    # accuracy edited up, recalls and matrix untouched
    code, msg = status(_record("tflite-int8", CM, accuracy=0.99))
    assert code == 2 and "contradicts its per-class recalls" in msg
    # a recall edited, the matrix untouched
    rec = _record("tflite-int8", CM)
    rec["per_class"]["glioma"]["recall"] = 1.0
    code, msg = status(rec)
    assert code == 2 and "glioma: recall 1.0000 but the confusion matrix says 9/10" in msg
    # a matrix that counts other images than the run
    code, msg = status(_record("tflite-int8", [[9, 1, 0, 0], [0, 10, 0, 0], [0, 0, 9, 0], [0, 0, 1, 6]],
                               n=37))
    assert code == 2 and "counts 36 images but n is 37" in msg
    # missing, or not a matrix of counts
    code, msg = status(_record("tflite-int8", CM, confusion_matrix=None))
    assert code == 2 and "confusion_matrix is missing" in msg
    code, msg = status(_record("tflite-int8", CM, confusion_matrix=[[9.5, 0.5, 0, 0]] * 4))
    assert code == 2 and "confusion_matrix is missing or not a 4x4" in msg
    # the reference itself
    code, msg = status(ref=_record("reference", CM, accuracy=0.5, target="tensorflow", precision="fp32"))
    assert code == 2 and "reference: accuracy" in msg


def test_fuzz_finding_malformed_results_are_an_error_not_a_traceback(tmp_path: Path) -> None:
    """Found by tests/edge/test_fuzz.py: ``"warnings": 1`` in results.json was a TypeError in gate."""
    from edgebrain.cli import cli
    from edgebrain.gate import gate

    doc = _results()
    doc["warnings"] = 1
    p = _write(tmp_path, doc)
    rep = gate(p, artifact_check=False, max_drop=0.7)
    assert rep.exit_code == 2 and str(p) in rep.errors[0] and "malformed results" in rep.errors[0]
    assert rep.thresholds.max_drop == 0.7
    res = CliRunner().invoke(cli, ["gate", str(p), "--no-artifact-check"])
    assert res.exit_code == 2 and "malformed results" in res.output
