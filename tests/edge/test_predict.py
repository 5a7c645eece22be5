"""``edgebrain.predict`` and ``edgebrain predict`` with a really trained model on real scans.

The artifacts are built from the ``trained_small`` model: FP32 and full-integer int8 TFLite
(representative dataset = the model's calibration split), manifest written with
``edgebrain.artifact.write_manifest``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgebrain.artifact import load_manifest, write_manifest
from edgebrain.errors import IntegrityError
from edgebrain.predict import Failure, Prediction, Predictor, find_images

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


# ----------------------------------------------------------------------------- fixtures


def build_tflite_artifact(model_path: Path, out: Path, data_dir: Path, precision: str) -> Path:
    """A TFLite artifact folder: ``fp32``, or ``int8`` (full-integer, int8 I/O, calibrated on the
    model's own calibration split, never on Testing)."""
    from edgebrain import data as D
    from edgebrain.io import environment_facts, sha256_file
    from edgebrain.modelcard import ModelCard
    from edgebrain.models import load_keras_model
    from edgebrain.tfenv import import_tf

    tf = import_tf()
    card = ModelCard.find(model_path)
    assert card is not None
    spec = card.preprocess
    conv = tf.lite.TFLiteConverter.from_keras_model(load_keras_model(model_path))
    calib_info = None
    if precision == "int8":
        ds = D.scan(data_dir)
        calib = D.splits_for(ds, card.data["split_seed"], card.data["fractions"])["calib"]
        arr = D.load_arrays(D.subset(calib, 24, 0), spec.size, desc="calib")

        def representative():  # type: ignore[no-untyped-def]
            for x in arr.x:
                yield [spec.apply(x[None]).astype(np.float32)]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
        calib_info = {"size": len(arr.x), "split": "calib", "seed": 0, "method": "representative_dataset"}
    out.mkdir(parents=True)
    (out / "model.tflite").write_bytes(conv.convert())
    write_manifest(out, {
        "name": out.name, "target": "tflite", "precision": precision, "model_file": "model.tflite",
        "source": {"path": str(model_path), "sha256": sha256_file(model_path), "format": "tf-keras",
                   "variant": card.variant},
        "class_names": card.class_names, "input_shape": card.input_shape, "preprocess": spec.to_dict(),
        "model_card": {"variant": card.variant, "data": card.data},
        "quantization": {"method": "TFLiteConverter full-integer", "io": "int8"} if calib_info else None,
        "calibration": calib_info, "pruning": None, "runtime_options": {}, "ops": {}, "verification": {},
        "versions": environment_facts()["packages"], "command": "test fixture",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "warnings": [],
    })
    return out


@pytest.fixture(scope="module")
def arts(trained_small: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict-artifacts")
    model = trained_small / "model.keras"
    return {p: build_tflite_artifact(model, root / f"lite64-{p}", data_dir, p) for p in ("fp32", "int8")}


@pytest.fixture(scope="module")
def reference(trained_small: Path, data_dir: Path) -> dict[str, object]:
    """The FP32 Keras model's probabilities on every Testing image (TensorFlow, the reference)."""
    from edgebrain import data as D
    from edgebrain.modelcard import ModelCard
    from edgebrain.models import load_keras_model
    from edgebrain.train import predict_probs

    card = ModelCard.find(trained_small)
    assert card is not None
    arr = D.load_arrays(D.scan(data_dir).split("Testing"), card.preprocess.size, desc="Testing")
    probs = predict_probs(load_keras_model(trained_small / "model.keras"), arr.x, card.preprocess)
    return {"files": [s.path for s in arr.samples], "probs": probs, "x": arr.x, "y": arr.y}


@pytest.fixture(scope="module")
def int8(arts: dict[str, Path]) -> Predictor:
    return Predictor(arts["int8"], threads=2)


@pytest.fixture(scope="module")
def scan(data_dir: Path) -> Path:
    for f in sorted((data_dir / "Testing" / "meningioma").iterdir()):
        with Image.open(f) as im:
            if im.mode == "L":
                return f
    raise AssertionError("no greyscale JPEG in Testing/meningioma")


def write_dicom(path: Path, pixels: np.ndarray, **attrs: object) -> Path:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, meta.MediaStorageSOPInstanceUID, "MR"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------- agreement with FP32


def test_fp32_artifact_reproduces_the_keras_model_on_every_testing_file(arts: dict[str, Path],
                                                                         reference: dict) -> None:
    """The whole edge path (file -> decode -> resize -> preprocess -> LiteRT) is the training
    pipeline: with the FP32 artifact, every Testing label equals the Keras model's."""
    p = Predictor(arts["fp32"], threads=2)
    files, want = reference["files"], reference["probs"]
    assert len(files) >= 1300
    got = np.array([[p.predict(f).probabilities[c] for c in p.class_names] for f in files])
    assert (got.argmax(1) == want.argmax(1)).mean() == 1.0
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_int8_artifact_agrees_with_fp32_on_testing(int8: Predictor, reference: dict) -> None:
    """Item 6: predict with the int8 artifact on real Testing images vs the FP32 model."""
    files, want = reference["files"], reference["probs"]
    preds = [int8.predict(f) for f in files]
    labels = np.array([p.index for p in preds])
    agree = float((labels == want.argmax(1)).mean())
    assert len(files) >= 200
    assert agree >= 0.99, f"int8 vs FP32 top-1 agreement {agree:.4f} on {len(files)} Testing images"
    # and the batched array path gives the same labels as the per-file path
    assert np.array_equal(int8.probabilities(reference["x"]).argmax(1), labels)


# ----------------------------------------------------------------------------- the API


def test_prediction_fields(int8: Predictor, scan: Path) -> None:
    r = int8.predict(scan, top_k=2)
    assert isinstance(r, Prediction) and r.file == str(scan)
    assert r.label in CLASSES and r.label == CLASSES[r.index]
    assert set(r.probabilities) == set(CLASSES)
    assert abs(sum(r.probabilities.values()) - 1.0) < 0.02
    assert r.probability == max(r.probabilities.values()) == r.top_k[0][1]
    assert [k for k, _ in r.top_k][0] == r.label and len(r.top_k) == 2 and r.top_k[0][1] >= r.top_k[1][1]
    assert r.latency_ms > 0 and set(r.timings_ms) == {"decode", "preprocess", "infer"}
    assert r.latency_ms >= r.timings_ms["infer"]
    assert r.image_size == (224, 224)
    d = r.to_dict()
    assert json.loads(json.dumps(d))["label"] == r.label
    assert int8.describe()["precision"] == "int8" and int8.describe()["runtime"].startswith("ai-edge-litert")


def test_greyscale_rgb_odd_size_and_arrays_give_consistent_results(int8: Predictor, scan: Path,
                                                                   tmp_path: Path) -> None:
    from edgebrain.imageio import load_rgb, resize_rgb

    base = int8.predict(scan)
    with Image.open(scan) as im:
        g = np.asarray(im.convert("L"))
    # the same pixels as a 2-D greyscale array, an RGB array, a PIL image and an RGB PNG file
    for x in (g, np.stack([g] * 3, -1), Image.fromarray(g)):
        assert int8.predict(x).probabilities == base.probabilities
    Image.fromarray(np.stack([g] * 3, -1)).save(tmp_path / "rgb.png")
    assert int8.predict(tmp_path / "rgb.png").probabilities == base.probabilities
    # an odd-sized file is resized like any other: file and array paths agree exactly
    odd = Image.fromarray(g).resize((301, 157), Image.BICUBIC)
    odd.save(tmp_path / "odd.bmp")
    r = int8.predict(tmp_path / "odd.bmp")
    assert r.image_size == (157, 301)
    want = int8.infer(resize_rgb(load_rgb(tmp_path / "odd.bmp"), int8.size)[None])[0]
    assert np.allclose([r.probabilities[c] for c in CLASSES], want)
    assert int8.predict(np.asarray(odd)).probabilities == r.probabilities


def test_16bit_png_and_16bit_dicom(int8: Predictor, scan: Path, tmp_path: Path) -> None:
    """16-bit files from a real scan: the loader maps them back to the 8-bit picture (PNG by
    min-max, DICOM through its window), and the prediction is the one for those pixels."""
    with Image.open(scan) as im:
        g = np.asarray(im.convert("L"))
    g16 = g.astype(np.uint16) * 257  # full 16-bit range
    Image.fromarray(g16).save(tmp_path / "scan16.png")
    lo, hi = int(g.min()), int(g.max())
    want_png = np.rint((g.astype(float) - lo) / (hi - lo) * 255).astype(np.uint8)
    r = int8.predict(tmp_path / "scan16.png")
    assert r.probabilities == int8.predict(want_png).probabilities

    raw = g.astype(np.uint16) * 16 + 1000
    dcm = write_dicom(tmp_path / "scan.dcm", raw, RescaleSlope=1, RescaleIntercept=-1000,
                      WindowCenter=2040, WindowWidth=4080)
    r = int8.predict(dcm)
    assert r.label in CLASSES and r.file == str(dcm)
    assert r.probabilities == int8.predict(g).probabilities  # the window maps back to the original pixels
    # a DICOM file without an extension (as scanners write them) is found and read by its magic
    noext = write_dicom(tmp_path / "IM0001", raw, RescaleSlope=1, RescaleIntercept=-1000,
                        WindowCenter=2040, WindowWidth=4080)
    batch = int8.predict_many([tmp_path])
    assert str(noext) in [p.file for p in batch.predictions]


def test_bad_files_are_reported_by_name_and_the_rest_continue(int8: Predictor, scan: Path,
                                                              tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    good.write_bytes(scan.read_bytes())
    (tmp_path / "truncated.jpg").write_bytes(scan.read_bytes()[:1500])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "scan.gif").write_bytes(b"GIF89a")
    (tmp_path / "report.dcm").write_text("not DICOM either")
    bad = ["truncated.jpg", "empty.png", "notes.jpg", "scan.gif", "report.dcm", "missing.jpg"]
    batch = int8.predict_many([good, *(tmp_path / b for b in bad), good])
    assert [p.file for p in batch.predictions] == [str(good)]  # duplicates collapse to one
    errors = {Path(f.file).name: f.error for f in batch.failures}
    assert set(errors) == set(bad)
    assert "truncated" in errors["truncated.jpg"]
    assert "empty" in errors["empty.png"]
    assert "not an image" in errors["notes.jpg"] or "identify" in errors["notes.jpg"]
    assert "unsupported file type .gif" in errors["scan.gif"]
    assert "DICOM" in errors["report.dcm"]
    assert errors["missing.jpg"] == "file not found"
    assert not batch.ok and len(batch) == 7 - 1


def test_folders_are_walked(int8: Predictor, data_dir: Path, tmp_path: Path) -> None:
    src = sorted((data_dir / "Testing" / "notumor").iterdir())[:3]
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for i, f in enumerate(src):
        (tmp_path / ("a" if i else "a/b") / f.name).write_bytes(f.read_bytes())
    (tmp_path / ".hidden" / "x.jpg").write_bytes(src[0].read_bytes())
    (tmp_path / "a" / "README.txt").write_text("notes")
    images, failures, skipped = find_images([tmp_path])
    assert sorted(p.name for p in images) == sorted(f.name for f in src)
    assert failures == [] and [Path(s).name for s in skipped] == ["README.txt"]
    assert len(find_images([tmp_path], recursive=False)[0]) == 0
    batch = int8.predict_many(tmp_path)
    assert len(batch.predictions) == 3 and batch.ok and batch.skipped == skipped


def test_tampered_or_incomplete_artifacts_are_refused(arts: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "tampered"
    shutil.copytree(arts["int8"], bad)
    with open(bad / "model.tflite", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(IntegrityError, match="does not match the manifest"):
        Predictor(bad)
    with pytest.raises(IntegrityError, match="no manifest.json"):
        Predictor(tmp_path)
    # a manifest whose class list does not fit the model's outputs
    wrong = tmp_path / "wrong-classes"
    shutil.copytree(arts["int8"], wrong)
    m = load_manifest(wrong).manifest
    (wrong / "manifest.json").unlink()
    write_manifest(wrong, {**{k: v for k, v in m.items() if k not in ("files", "artifact_sha256")},
                           "class_names": ["a", "b", "c"]})
    from edgebrain.errors import ModelError

    with pytest.raises(ModelError, match="4 outputs but the manifest lists 3"):
        Predictor(wrong)


def test_iter_predict_yields_failures_in_order(int8: Predictor, scan: Path, tmp_path: Path) -> None:
    out = list(int8.iter_predict([scan, tmp_path / "nope.png", np.zeros((5, 7), np.uint8), np.zeros((3, 3, 2))]))
    assert [type(r).__name__ for r in out] == ["Prediction", "Failure", "Prediction", "Failure"]
    assert isinstance(out[3], Failure) and "shape" in out[3].error


# ----------------------------------------------------------------------------- the command


def _cli(*args: str) -> object:
    from edgebrain.cli import cli

    return CliRunner().invoke(cli, ["predict", *args])


def test_cli_help() -> None:
    res = _cli("--help")
    assert res.exit_code == 0  # type: ignore[attr-defined]
    for opt in ("--json", "--top-k", "--explain", "--explain-budget-s", "--explain-reference", "Exit status"):
        assert opt in res.output  # type: ignore[attr-defined]


def test_cli_json_shape_and_exit_codes(arts: dict[str, Path], scan: Path, tmp_path: Path) -> None:
    res = _cli(str(arts["int8"]), str(scan), "--json", "--top-k", "2")
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    doc = json.loads(res.stdout)  # type: ignore[attr-defined]
    assert set(doc) == {"artifact", "predictions", "failures", "skipped", "summary"}
    assert doc["artifact"]["precision"] == "int8" and doc["artifact"]["class_names"] == CLASSES
    (p,) = doc["predictions"]
    assert set(p) >= {"file", "label", "probabilities", "top_k", "latency_ms", "timings_ms"}
    assert p["file"] == str(scan) and len(p["top_k"]) == 2 and set(p["probabilities"]) == set(CLASSES)
    assert doc["summary"] == {**doc["summary"], "images": 1, "ok": 1, "failed": 0}

    (tmp_path / "broken.jpg").write_bytes(scan.read_bytes()[:900])
    res = _cli(str(arts["int8"]), str(scan), str(tmp_path / "broken.jpg"), "--json")
    assert res.exit_code == 1  # type: ignore[attr-defined]
    doc = json.loads(res.stdout)  # type: ignore[attr-defined]
    assert doc["summary"]["ok"] == 1 and doc["failures"][0]["file"] == str(tmp_path / "broken.jpg")
    assert "broken.jpg" in res.stderr  # type: ignore[attr-defined]

    res = _cli(str(arts["int8"]), str(scan))  # human-readable lines
    assert res.exit_code == 0 and str(scan) in res.stdout  # type: ignore[attr-defined]
    assert "ms" in res.stdout and "1 classified, 0 failed" in res.stderr  # type: ignore[attr-defined]

    empty = tmp_path / "empty-dir"
    empty.mkdir()
    assert _cli(str(arts["int8"]), str(empty)).exit_code == 2  # type: ignore[attr-defined]
    res = _cli(str(tmp_path), str(scan))  # not an artifact
    assert res.exit_code == 2 and "manifest.json" in res.output  # type: ignore[attr-defined]
    assert _cli(str(arts["int8"])).exit_code == 2  # type: ignore[attr-defined]  # no images: usage error
    assert _cli(str(arts["int8"]), str(scan), "--top-k", "0").exit_code == 2  # type: ignore[attr-defined]


def test_cli_explain_writes_overlays(arts: dict[str, Path], trained_small: Path, scan: Path,
                                     tmp_path: Path) -> None:
    out = tmp_path / "explain"
    res = _cli(str(arts["int8"]), str(scan), "--json", "--explain", str(out), "--explain-budget-s", "1",
               "--explain-reference", str(trained_small / "model.keras"))
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    doc = json.loads(res.stdout)  # type: ignore[attr-defined]
    ex = doc["predictions"][0]["explanation"]
    assert set(ex["files"]) == {"occlusion", "reference_occlusion", "gradcam"}
    for f in ex["files"].values():
        with Image.open(f) as im:
            assert im.format == "PNG" and min(im.size) >= 224
    assert ex["occlusion"]["class"] == doc["predictions"][0]["label"]
    assert set(ex["drift"]) >= {"drift", "pearson", "spearman", "box_iou"}
    summary = json.loads((out / "explanations.json").read_text())
    assert summary["images"][0]["file"] == str(scan)
