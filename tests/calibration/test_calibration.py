"""Calibration sets: stratified seeded sampling, sources, overlap refusal, caching (real data)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edgebrain import data as D
from edgebrain.calibration import (
    CalibrationError,
    build_calibration,
    eval_hashes,
    folder_samples,
    resolve_method,
    stratified_sample,
)
from edgebrain.preprocess import PreprocessSpec

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
SPEC = PreprocessSpec.named("rescale", 32)


def _copy(samples: list[D.Sample], dst: Path, by_class: bool = True) -> None:
    for s in samples:
        d = dst / s.class_name if by_class else dst
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy2(s.path, d / s.path.name)


def test_stratified_sample_is_proportional_seeded_and_exact(dataset: D.Dataset) -> None:
    pool = D.splits_for(dataset)["calib"]
    a = stratified_sample(pool, 40, seed=1)
    b = stratified_sample(pool, 40, seed=1)
    c = stratified_sample(pool, 40, seed=2)
    assert len(a) == 40
    assert [s.rel for s in a] == [s.rel for s in b]
    assert [s.rel for s in a] != [s.rel for s in c]
    counts = D.class_counts(a, CLASSES)
    share = D.class_counts(pool, CLASSES)
    for k in CLASSES:  # proportional within rounding, every class present
        assert counts[k] >= 1
        assert abs(counts[k] - 40 * share[k] / len(pool)) <= 1.0
    assert len(stratified_sample(pool, 10_000, seed=0)) == len(pool)


def test_split_source_never_uses_testing_content(data_dir: Path, cache_env: Path) -> None:
    cs = build_calibration(SPEC, CLASSES, 48, 0, data_root=data_dir)
    testing = eval_hashes(data_dir)
    assert len(cs) == 48 and cs.x.shape == (48, 32, 32, 3) and cs.x.dtype == np.float32
    assert not {s.sha256 for s in cs.samples} & testing
    info = cs.info
    assert info["source"] == "split" and info["split"] == "calib" and info["stratified"] is True
    assert sum(info["per_class"].values()) == 48 and min(info["per_class"].values()) >= 1
    assert info["overlap_check"]["checked"] is True and info["overlap_check"]["overlap"] == 0
    # the candidates really are the calibration split minus Testing duplicates
    ds = D.scan(data_dir)
    calib = D.splits_for(ds, 42, D.DEFAULT_FRACTIONS)["calib"]
    dup = sum(1 for s in calib if s.sha256 in testing)
    assert info["overlap_check"]["excluded_from_candidates"] == dup
    assert info["candidates"] == len(calib) - dup
    assert {s.rel for s in cs.samples} <= {s.rel for s in calib}
    # preprocessed exactly as the spec says
    raw = D.load_arrays(cs.samples[:3], (32, 32), use_cache=False).x
    np.testing.assert_allclose(cs.x[:3], SPEC.apply(raw), rtol=0, atol=1e-6)
    m = cs.manifest("minmax", "tflite")
    assert {"list_hash", "per_class", "size", "seed", "method", "split"} <= set(m)
    assert len(cs.list_text().splitlines()) == 48


def test_same_request_same_list_hash_and_cache(data_dir: Path, cache_env: Path) -> None:
    a = build_calibration(SPEC, CLASSES, 24, 3, data_root=data_dir)
    cached = list(cache_env.glob("calib-*.npz"))
    assert cached, "preprocessed tensors are cached"
    b = build_calibration(SPEC, CLASSES, 24, 3, data_root=data_dir)
    assert a.info["list_hash"] == b.info["list_hash"]
    np.testing.assert_array_equal(a.x, b.x)
    c = build_calibration(SPEC, CLASSES, 24, 4, data_root=data_dir)
    assert c.info["list_hash"] != a.info["list_hash"]


def test_overlap_with_testing_is_refused_then_allowed_loudly(data_dir: Path, dataset: D.Dataset,
                                                              tmp_path: Path, cache_env: Path) -> None:
    testing = {s.sha256 for s in dataset.split("Testing")}
    clean = [s for s in D.splits_for(dataset)["train"] if s.sha256 not in testing]
    train = D.subset(clean, 3, seed=0)
    leak = D.subset(dataset.split("Testing"), 1, seed=0)[:2]
    folder = tmp_path / "calib"
    _copy(train + leak, folder)
    with pytest.raises(CalibrationError, match="evaluation set") as ei:
        build_calibration(SPEC, CLASSES, 8, 0, calib_dir=folder, data_root=data_dir)
    assert leak[0].path.name in str(ei.value) or leak[1].path.name in str(ei.value)
    cs = build_calibration(SPEC, CLASSES, 8, 0, calib_dir=folder, data_root=data_dir, allow_overlap=True)
    assert cs.info["overlap_check"]["overlap"] == 2 and cs.info["overlap_check"]["allowed"] is True
    assert any("WARNING" in w and "optimistic" in w for w in cs.info["warnings"])


def test_folder_layouts(data_dir: Path, dataset: D.Dataset, tmp_path: Path, cache_env: Path) -> None:
    testing = {s.sha256 for s in dataset.split("Testing")}
    clean = [s for s in D.splits_for(dataset)["train"] if s.sha256 not in testing]
    train = D.subset(clean, 4, seed=1)
    # one folder per class
    _copy(train, tmp_path / "classes")
    src = folder_samples(tmp_path / "classes", CLASSES)
    assert src.kind == "classes" and len(src.candidates) == 16
    assert {s.label for s in src.candidates} == {0, 1, 2, 3}
    cs = build_calibration(SPEC, CLASSES, 8, 0, calib_dir=tmp_path / "classes", data_root=data_dir)
    assert cs.info["per_class"] == {c: 2 for c in CLASSES}
    assert not any("no calibration image of class" in w for w in cs.info["warnings"])
    # a class missing from the folders: calibrates on the rest and says so
    _copy([s for s in train if s.class_name != "notumor"], tmp_path / "three")
    cs = build_calibration(SPEC, CLASSES, 6, 0, calib_dir=tmp_path / "three", data_root=data_dir)
    assert cs.info["per_class"]["notumor"] == 0
    assert any("no calibration image of class 'notumor'" in w for w in cs.info["warnings"])
    # flat folder: no labels, still works, says it is not stratified
    _copy(train, tmp_path / "flat", by_class=False)
    cs = build_calibration(SPEC, CLASSES, 5, 0, calib_dir=tmp_path / "flat", data_root=data_dir)
    assert len(cs) == 5 and cs.info["stratified"] is False and cs.info["per_class"] is None
    # Kaggle layout: its calibration split is used
    src = folder_samples(data_dir, CLASSES)
    assert src.kind == "kaggle" and src.split == "calib"
    # no evaluation set known: works, but the manifest says the overlap was not checked
    cs = build_calibration(SPEC, CLASSES, 4, 0, calib_dir=tmp_path / "classes")
    assert cs.info["overlap_check"]["checked"] is False
    assert any("NOT checked" in w for w in cs.info["warnings"])


def test_bad_calibration_folders_are_named(tmp_path: Path, dataset: D.Dataset) -> None:
    with pytest.raises(CalibrationError, match="not found"):
        folder_samples(tmp_path / "nope", CLASSES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="empty"):
        folder_samples(tmp_path / "empty", CLASSES)
    wrong = tmp_path / "wrong" / "tumour"
    wrong.mkdir(parents=True)
    shutil.copy2(dataset.split("Training")[0].path, wrong / "a.jpg")
    with pytest.raises(CalibrationError, match="tumour"):
        folder_samples(tmp_path / "wrong", CLASSES)
    (tmp_path / "noimg" / "glioma").mkdir(parents=True)
    (tmp_path / "noimg" / "glioma" / "notes.txt").write_text("x")
    with pytest.raises(CalibrationError, match="no images"):
        folder_samples(tmp_path / "noimg", CLASSES)
    with pytest.raises(CalibrationError, match="calibration images"):
        build_calibration(SPEC, CLASSES, 8, 0)


def test_unreadable_calibration_image_is_reported(tmp_path: Path, dataset: D.Dataset, cache_env: Path) -> None:
    d = tmp_path / "c" / "glioma"
    d.mkdir(parents=True)
    for s in D.subset(dataset.split("Training"), 1, seed=0)[:1]:
        shutil.copy2(s.path, d / "good.jpg")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    cs = build_calibration(SPEC, CLASSES, 4, 0, calib_dir=tmp_path / "c", use_cache=False)
    assert len(cs) == 1
    assert any("broken.jpg" in w for w in cs.info["warnings"])


def test_methods_per_backend() -> None:
    assert resolve_method("ort", "entropy") == ("entropy", None)
    assert resolve_method("ort", None) == ("minmax", None)
    used, warn = resolve_method("tflite", "percentile")
    assert used == "minmax" and warn and "tflite" in warn
    with pytest.raises(ValueError):
        resolve_method("ort", "magic")
