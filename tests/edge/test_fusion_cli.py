"""``edgebrain predict`` and ``edgebrain bench`` with CT images (--ct-dir / --ct-csv) for a model
trained on fused MRI+CT input: pairing, per-file failures, refusals, and the same fused pixels
as training and the Python Predictor path.

No real CT is available: CT inputs are synthetic renderings of real MRI scans
(edgebrain.fusion.synthetic_ct)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from edgebrain import data as D
from edgebrain import fusion as F
from edgebrain.artifact import load_manifest, write_manifest


def _cli(*args: str) -> Any:
    from edgebrain.cli import cli

    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def fused(data_dir: Path, dataset: D.Dataset, cache_env: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, Path]:
    """A resnet50-lite (32 px, width 0.25) trained 2 epochs on wavelet-fused MRI + synthetic CT, its
    TFLite fp32 artifact, and a small dataset (2 Testing + 1 Training image per class, linked from
    the real data) whose CT folder lacks the partner of one Testing image."""
    from edgebrain.convert import convert
    from edgebrain.train import TrainConfig, train

    seed, per_class, eval_pc = 5, 12, 4
    splits = D.splits_for(dataset, seed, {"val": 0.10, "calib": 0.05})
    needed = (D.subset(splits["train"], per_class, seed) + D.subset(splits["val"], 4, seed)
              + D.subset(dataset.split("Testing"), eval_pc, seed))
    root = tmp_path_factory.mktemp("fusedcli")
    F.make_synthetic_ct_dir(needed, data_dir, root / "train-ct", seed=0)
    model = root / "model"
    train(TrainConfig(variant="resnet50-lite", data_dir=str(data_dir), out=str(model), input_size=32, width=0.25,
                      epochs=2, batch_size=16, per_class=per_class, eval_per_class=eval_pc, seed=seed,
                      fuse="wavelet", ct_dir=str(root / "train-ct")))
    (art,) = convert(model / "model.keras", ["tflite"], ["fp32"], root / "arts", verify_n=16)
    ds = root / "ds"
    for split, k in (("Testing", 2), ("Training", 1)):
        for c in dataset.class_names:
            (ds / split / c).mkdir(parents=True)
            for s in [s for s in dataset.split(split) if s.class_name == c][k + 3 : 2 * k + 3]:
                (ds / split / c / s.path.name).symlink_to(s.path)
    testing = D.scan(ds).split("Testing")
    assert len(testing) == 8
    unpaired = testing[3]
    F.make_synthetic_ct_dir([s for s in testing if s != unpaired], ds, root / "ct", seed=1)
    return {"model": model, "art": art.path, "ds": ds, "ct": root / "ct", "unpaired": unpaired.path,
            "root": root}


def _plain_copy(art: Path, dst: Path) -> Path:
    """The same artifact with its fusion record removed (a plain-MRI model as far as the manifest says)."""
    shutil.copytree(art, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["preprocess"] = {**m["preprocess"], "extra": {}}
    write_manifest(dst, {k: v for k, v in m.items() if k not in ("files", "artifact_sha256")})
    return dst


def _keras_probs(model_dir: Path, x: np.ndarray) -> np.ndarray:
    from edgebrain.modelcard import ModelCard
    from edgebrain.models.variants import load_keras_model

    card = ModelCard.find(model_dir)
    assert card is not None
    return np.asarray(load_keras_model(model_dir / "model.keras")(card.preprocess.apply(x), training=False))


def test_help_lists_the_ct_options() -> None:
    for cmd in ("predict", "bench"):
        res = _cli(cmd, "--help")
        assert res.exit_code == 0, res.output
        for opt in ("--ct-dir", "--ct ", "--ct-csv", "--pairs", "fused MRI+CT"):
            assert opt in res.output, (cmd, opt)


def test_manifest_carries_the_fusion(fused: dict[str, Path]) -> None:
    art = load_manifest(fused["art"])
    assert F.fusion_of(art) == F.FusionSpec(method="wavelet")


def test_predict_pairs_fuses_and_reports_the_unpaired_mri(fused: dict[str, Path]) -> None:
    testing = fused["ds"] / "Testing"
    res = _cli("predict", str(fused["art"]), str(testing), "--ct-dir", str(fused["ct"]), "--json")
    assert res.exit_code == 1, res.output  # one MRI has no CT partner
    doc = json.loads(res.stdout)
    assert doc["summary"]["ok"] == 7 and doc["summary"]["failed"] == 1
    (fail,) = doc["failures"]
    assert fail["file"] == str(fused["unpaired"]) and "no CT partner" in fail["error"]
    assert fused["unpaired"].name in res.stderr
    assert doc["fusion"]["method"] == "wavelet" and doc["fusion"]["pairing"] == "name"
    # the same pixels as training / the Predictor path, and the Keras model's own answer on them
    from edgebrain.predict import Predictor

    pred = Predictor(fused["art"], threads=1)
    xs = []
    for p in doc["predictions"]:
        ct = Path(p["ct_file"])
        assert ct.stem == Path(p["file"]).stem and ct.suffix == ".png"
        x = F.load_fused(p["file"], ct, pred.artifact)
        xs.append(x)
        again = pred.predict(x)
        assert again.label == p["label"]
        np.testing.assert_allclose([p["probabilities"][c] for c in pred.class_names],
                                   [again.probabilities[c] for c in pred.class_names], atol=1e-5)
        assert set(p["timings_ms"]) == {"decode", "fuse", "preprocess", "infer"}
    ref = _keras_probs(fused["model"], np.stack(xs))
    got = np.array([[p["probabilities"][c] for c in pred.class_names] for p in doc["predictions"]])
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_predict_with_a_pairs_csv(fused: dict[str, Path], tmp_path: Path) -> None:
    testing = fused["ds"] / "Testing"
    files = sorted(p for p in testing.rglob("*.jpg") if p != fused["unpaired"])[:2]
    rows = ["mri,ct"] + [f"{f.relative_to(testing).as_posix()},Testing/{f.parent.name}/{f.stem}.png" for f in files]
    csv = tmp_path / "pairs.csv"
    csv.write_text("\n".join(rows) + "\n")
    res = _cli("predict", str(fused["art"]), str(testing), "--pairs", str(csv), "--ct", str(fused["ct"]), "--json")
    assert res.exit_code == 1, res.output
    doc = json.loads(res.stdout)
    assert sorted(p["file"] for p in doc["predictions"]) == sorted(str(f) for f in files)
    assert len(doc["failures"]) == 6 and all("no CT partner in pairs CSV" in f["error"] for f in doc["failures"])
    assert doc["fusion"]["pairing"] == "csv"
    # a single file given directly: CSV paths relative to the current folder
    res = _cli("predict", str(fused["art"]), str(files[0]), "--pairs", str(csv), "--ct", str(fused["ct"]))
    assert res.exit_code == 1 and "no CT partner" in res.output  # the CSV row is relative to Testing/, not here


def test_predict_refusals(fused: dict[str, Path], tmp_path: Path) -> None:
    one = next((fused["ds"] / "Testing").rglob("*.jpg"))
    res = _cli("predict", str(fused["art"]), str(one))
    assert res.exit_code == 2 and "fused MRI+CT" in res.output and "--ct-dir" in res.output
    plain = _plain_copy(fused["art"], tmp_path / "plain")
    res = _cli("predict", str(plain), str(one), "--ct-dir", str(fused["ct"]))
    assert res.exit_code == 2 and "takes plain MRI" in res.output
    res = _cli("predict", str(fused["art"]), str(one), "--ct-dir", str(tmp_path / "nope"))
    assert res.exit_code == 2 and "CT folder not found" in res.output
    res = _cli("predict", str(fused["art"]), str(one), "--ct-dir", str(fused["ct"]), "--explain", str(tmp_path / "e"))
    assert res.exit_code == 2 and "--explain" in res.output


def test_predictor_predict_fused_errors(fused: dict[str, Path], tmp_path: Path) -> None:
    from edgebrain.errors import ImageLoadError
    from edgebrain.predict import Predictor

    one = next((fused["ds"] / "Testing").rglob("*.jpg"))
    with pytest.raises(ImageLoadError, match="CT partner of"):
        Predictor(fused["art"], threads=1).predict_fused(one, tmp_path / "missing.png")
    with pytest.raises(F.FusionError, match="takes plain MRI"):
        Predictor(_plain_copy(fused["art"], tmp_path / "plain"), threads=1).predict_fused(one, one)


def test_bench_fuses_on_the_host_and_reports_the_unpaired_mri(fused: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bench"
    res = _cli("bench", str(fused["art"]), "--data", str(fused["ds"]), "--ct-dir", str(fused["ct"]), "--out",
               str(out), "--threads", "1", "--warmup", "1", "--min-runs", "5", "--min-seconds", "0.1",
               "--batch", "2")
    assert res.exit_code == 1, res.output  # every model ran; one MRI had no CT partner
    assert "1 MRI image(s) could not be paired" in res.output
    doc = json.loads((out / "results.json").read_text())
    from edgebrain.bench import validate_results

    validate_results(doc)
    assert doc["errors"] == []
    d = doc["data"]
    rel = f"Testing/{fused['unpaired'].parent.name}/{fused['unpaired'].name}"
    assert d["n"] == 7 and d["n_requested"] == 8
    assert [f["file"] for f in d["failed"]] == [rel] and "no CT partner" in d["failed"][0]["problem"]
    fu = d["fusion"]
    assert fu["method"] == "wavelet" and fu["mode"] == "rgb" and fu["n_fused"] == 7 and fu["n_failed"] == 1
    assert fu["input_size"] == [32, 32] and fu["fuse_ms_host"]["n"] == 7
    assert fu["ct_dir"] == str(fused["ct"].resolve())
    # the reference (Keras, TensorFlow) ran on the same fused inputs as the artifact: fp32 agrees fully,
    # and its accuracy is the Keras model's on load_fused inputs computed here
    (r,) = doc["results"]
    assert doc["reference"] is not None and r["agreement"] == 1.0
    pairing = F.CTPairing(ct_dir=fused["ct"], mri_root=fused["ds"])
    samples = [s for s in D.scan(fused["ds"]).split("Testing") if s.path != fused["unpaired"]]
    spec = load_manifest(fused["art"])
    x = np.stack([F.load_fused(s.path, pairing.find(s.path), spec) for s in samples])
    ref = _keras_probs(fused["model"], x)
    y = np.array([s.label for s in samples])
    acc = float(np.mean(ref.argmax(1) == y))
    assert doc["reference"]["accuracy"] == pytest.approx(acc)
    assert r["accuracy"] == pytest.approx(acc)
    from edgebrain.bench import expected_calibration_error

    # ECE depends on every probability: the same fused pixels, not just the same labels
    assert doc["reference"]["ece"] == pytest.approx(expected_calibration_error(ref, y), abs=1e-6)
    assert r["ece"] == pytest.approx(expected_calibration_error(ref, y), abs=1e-5)
    md = (out / "results.md").read_text()
    assert "MRI + CT fused (wavelet" in md and rel in md


def test_bench_refusals(fused: dict[str, Path], tmp_path: Path) -> None:
    res = _cli("bench", str(fused["art"]), "--data", str(fused["ds"]), "--out", str(tmp_path / "o1"),
               "--no-reference")
    assert res.exit_code == 1 and "fused MRI+CT" in res.output and "--ct-dir" in res.output
    plain = _plain_copy(fused["art"], tmp_path / "plain")
    res = _cli("bench", str(plain), "--data", str(fused["ds"]), "--ct", str(fused["ct"]), "--out",
               str(tmp_path / "o2"), "--no-reference")
    assert res.exit_code == 1 and "takes plain MRI" in res.output
    res = _cli("bench", str(fused["art"]), str(plain), "--data", str(fused["ds"]), "--ct", str(fused["ct"]),
               "--out", str(tmp_path / "o3"), "--no-reference")
    assert res.exit_code == 1 and "takes plain MRI" in res.output
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))
