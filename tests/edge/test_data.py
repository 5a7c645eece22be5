"""The real-data pipeline: scanning, splits, duplicates, bad files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgebrain import data as D
from edgebrain.cli import cli


def test_scan_counts_match_dataset_readme(dataset: D.Dataset) -> None:
    assert dataset.class_names == ["glioma", "meningioma", "notumor", "pituitary"]
    assert len(dataset.split("Training")) == 5708
    assert len(dataset.split("Testing")) == 1311
    assert D.class_counts(dataset.split("Testing"), dataset.class_names) == {
        "glioma": 300, "meningioma": 306, "notumor": 405, "pituitary": 300}


def test_known_duplicates(dataset: D.Dataset) -> None:
    groups = D.duplicate_groups(dataset.samples)
    assert len(groups) == 300
    assert sum(1 for g in groups if len({s.split for s in g}) > 1) == 189
    assert not [g for g in groups if len({s.class_name for s in g}) > 1]
    dd = D.dedup_eval(dataset)
    train_hashes = {s.sha256 for s in dataset.split("Training")}
    assert dd and not any(s.sha256 in train_hashes for s in dd)
    assert len({s.sha256 for s in dd}) == len(dd)
    assert len(dd) < 1311


def test_splits_are_stratified_seeded_and_disjoint(dataset: D.Dataset) -> None:
    a = D.splits_for(dataset, seed=3)
    b = D.splits_for(dataset, seed=3)
    c = D.splits_for(dataset, seed=4)
    assert [s.rel for s in a["calib"]] == [s.rel for s in b["calib"]]
    assert [s.rel for s in a["calib"]] != [s.rel for s in c["calib"]]
    hashes = {k: {s.sha256 for s in v} for k, v in a.items()}
    assert not hashes["train"] & hashes["val"]
    assert not hashes["train"] & hashes["calib"]
    assert not hashes["val"] & hashes["calib"]
    assert sum(len(a[k]) for k in ("train", "val", "calib")) == 5708
    n = len(dataset.split("Training"))
    assert abs(len(a["val"]) - 0.10 * n) < 20 and abs(len(a["calib"]) - 0.05 * n) < 20
    for cname in dataset.class_names:  # stratified: class share within 1.5 pp of the whole
        whole = sum(s.class_name == cname for s in dataset.split("Training")) / n
        part = sum(s.class_name == cname for s in a["val"]) / len(a["val"])
        assert abs(whole - part) < 0.015


def test_subset_is_fixed_and_stratified(dataset: D.Dataset) -> None:
    s1 = D.subset(dataset.split("Testing"), 10, seed=1)
    s2 = D.subset(dataset.split("Testing"), 10, seed=1)
    assert [s.rel for s in s1] == [s.rel for s in s2]
    assert D.class_counts(s1, dataset.class_names) == dict.fromkeys(dataset.class_names, 10)


def _mini_dataset(data_dir: Path, root: Path, per_class: int = 3) -> Path:
    for split in ("Training", "Testing"):
        for cdir in sorted((data_dir / split).iterdir()):
            dst = root / split / cdir.name
            dst.mkdir(parents=True)
            for f in sorted(cdir.iterdir())[:per_class]:
                shutil.copy(f, dst / f.name)
    return root


def test_bad_files_are_named_and_never_abort(data_dir: Path, tmp_path: Path, cache_env: Path) -> None:
    root = _mini_dataset(data_dir, tmp_path / "ds")
    g = root / "Training" / "glioma"
    good = sorted(g.iterdir())[0]
    (g / "empty.jpg").write_bytes(b"")
    (g / "truncated.jpg").write_bytes(good.read_bytes()[:400])
    (g / "notes.jpg").write_text("this is not an image")
    (g / "readme.txt").write_text("unsupported")
    rep = D.check(root, verify_hashes=True)
    probs = {Path(p["path"]).name: p["problem"] for p in rep["problems"]}
    assert set(probs) == {"empty.jpg", "truncated.jpg", "notes.jpg", "readme.txt"}
    assert "empty" in probs["empty.jpg"]
    assert "unsupported" in probs["readme.txt"]
    ds = D.scan(root)
    arr = D.load_arrays(ds.split("Training"), (32, 32), use_cache=False)
    failed = {Path(p).name for p, _ in arr.failed}
    assert failed == {"empty.jpg", "truncated.jpg", "notes.jpg"}
    assert len(arr.x) == 12 and arr.x.dtype == np.uint8 and arr.x.shape[1:] == (32, 32, 3)


def test_data_check_cli_reports_duplicates(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dedup.txt"
    res = CliRunner().invoke(cli, ["data", "check", str(data_dir), "--no-decode", "--json",
                                   "--write-dedup", str(out)])
    assert res.exit_code == 0, res.output
    import json

    rep = json.loads(res.output)
    assert rep["duplicates"]["groups"] == 300
    assert rep["duplicates"]["groups_across_splits"] == 189
    assert rep["images"] == 7019
    lines = out.read_text().splitlines()
    assert len(lines) == rep["dedup_testing"]["images"]
    ds = D.scan(data_dir)
    assert [s.rel for s in D.read_list(out, ds)] == [s.rel for s in D.dedup_eval(ds)]


def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(D.DataError, match="not found"):
        D.scan(tmp_path / "nope")
    res = CliRunner().invoke(cli, ["data", "check", str(tmp_path / "nope")])
    assert res.exit_code != 0 and "not found" in res.output


def test_load_arrays_resamples_as_the_model_card_says(dataset: D.Dataset, cache_env: Path) -> None:
    """The resize method reaches the decoder and the cache keeps the methods apart."""
    from edgebrain.imageio import load_for_model

    samples = D.subset(dataset.split("Testing"), 1)
    bil = D.load_arrays(samples, (64, 64))
    near = D.load_arrays(samples, (64, 64), resize="nearest")
    near_cached = D.load_arrays(samples, (64, 64), resize="nearest")
    assert not np.array_equal(bil.x, near.x)
    np.testing.assert_array_equal(near.x, near_cached.x)
    np.testing.assert_array_equal(near.x[0], load_for_model(samples[0].path, (64, 64), "nearest"))
    np.testing.assert_array_equal(bil.x[0], load_for_model(samples[0].path, (64, 64), "bilinear"))


def test_bench_dedup_rests_on_the_files_not_a_stale_manifest(data_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A Testing image replaced after MANIFEST.sha256 was written (here: by a copy of a Training
    image) is hashed as it is, so the deduplicated list drops it."""
    from edgebrain.bench import select_samples
    from edgebrain.io import sha256_file

    root = _mini_dataset(data_dir, tmp_path / "ds")
    files = sorted(p for p in root.rglob("*.jpg"))
    (root / "MANIFEST.sha256").write_text("".join(f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n"
                                                  for p in files))
    victim = sorted((root / "Testing" / "glioma").iterdir())[0]
    shutil.copy(sorted((root / "Training" / "glioma").iterdir())[0], victim)
    _, samples, dedup, info = select_samples(root)
    rel = victim.relative_to(root).as_posix()
    assert rel in {s.rel for s in samples} and dedup is not None and rel not in dedup
    assert next(s for s in samples if s.rel == rel).sha256 == sha256_file(victim)
    assert "differ from" in capsys.readouterr().err
    assert any(p["problem"] == "content differs from MANIFEST.sha256" for p in info["scan_problems"])
