"""``edgebrain convert`` for a model trained on fused MRI+CT input: calibration and verification
on fused pairs built as in training (--ct-dir / --ct-csv, or the CT source in the model card),
unpaired images skipped and counted, and clear refusals.

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
from edgebrain.artifact import load_manifest

SEED = 5


def _cli(*args: Any) -> Any:
    from edgebrain.cli import cli

    return CliRunner().invoke(cli, ["convert", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def fused(data_dir: Path, dataset: D.Dataset, cache_env: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, Any]:
    """A resnet50-lite (32 px, width 0.25) trained 2 epochs on wavelet-fused MRI + synthetic CT. The CT
    folder covers the training subset, 4 validation and 4 calibration images per class and the
    evaluated Testing images; every other image of the splits has no CT partner."""
    from edgebrain.train import TrainConfig, train

    splits = D.splits_for(dataset, SEED, {"val": 0.10, "calib": 0.05})
    val = D.subset(splits["val"], 4, SEED)
    testing = {s.sha256 for s in dataset.split("Testing")}  # calibration never uses these
    calib = D.subset([s for s in splits["calib"] if s.sha256 not in testing], 4, SEED)
    needed = D.subset(splits["train"], 12, SEED) + val + calib + D.subset(dataset.split("Testing"), 4, SEED)
    root = tmp_path_factory.mktemp("convfused")
    ct = root / "ct"
    F.make_synthetic_ct_dir(needed, data_dir, ct, seed=0)
    model = root / "model"
    train(TrainConfig(variant="resnet50-lite", data_dir=str(data_dir), out=str(model), input_size=32, width=0.25,
                      epochs=2, batch_size=16, per_class=12, eval_per_class=4, seed=SEED, fuse="wavelet",
                      ct_dir=str(ct)))
    return {"model": model, "ct": ct, "root": root, "val": val, "calib": calib, "splits": splits}


def _keras_probs(model_dir: Path, x: np.ndarray) -> np.ndarray:
    from edgebrain.modelcard import ModelCard
    from edgebrain.models.variants import load_keras_model

    card = ModelCard.find(model_dir)
    assert card is not None
    return np.asarray(load_keras_model(model_dir / "model.keras")(card.preprocess.apply(x), training=False))


def test_help_lists_the_ct_options() -> None:
    from edgebrain.cli import cli

    res = CliRunner().invoke(cli, ["convert", "--help"])
    assert res.exit_code == 0, res.output
    for opt in ("--ct-dir", "--ct ", "--ct-csv", "--pairs", "fused MRI+CT"):
        assert opt in res.output, opt


def test_int8_calibrates_and_verifies_on_fused_pairs(fused: dict[str, Any], data_dir: Path) -> None:
    out = fused["root"] / "arts-int8"
    res = _cli(fused["model"] / "model.keras", "--to", "tflite", "--precision", "int8", "--out", out,
               "--ct-dir", fused["ct"], "--calib-size", "64", "--min-agreement", "0.5", "--json")
    assert res.exit_code == 0, res.output
    art = load_manifest(out / "tflite-int8")
    m = art.manifest
    # the artifact keeps the fusion, so bench / predict keep asking for CT images
    assert F.fusion_of(art) == F.FusionSpec(method="wavelet")
    assert "--ct-dir" in m["command"] and str(fused["ct"]) in m["command"]
    # calibration: only the calibration-split images with a CT partner (4 per class), the rest counted
    cal = m["calibration"]
    fu = cal["fusion"]
    assert fu["method"] == "wavelet" and fu["mode"] == "rgb" and fu["ct_dir"] == str(fused["ct"].resolve())
    assert fu["pairs"] == cal["size"] == len(fused["calib"]) == 16
    assert fu["unpaired_skipped"] > 0 and fu["unpaired_skipped"] + fu["pairs"] == fu["candidates_before_pairing"]
    assert cal["per_class"] == {c: 4 for c in art.class_names}
    listed = sorted(line.split("  ", 1)[1] for line in (out / "tflite-int8" / "calibration_list.txt")
                    .read_text().splitlines())
    assert listed == sorted(s.rel for s in fused["calib"])
    assert any("no CT partner" in w for w in cal["warnings"])
    # verification: the validation images with a CT partner, fused as in training
    v = m["verification"]
    assert v["split"] == "val" and v["n"] == len(fused["val"]) == 16
    assert v["fusion"]["pairs"] == 16 and v["fusion"]["unpaired_skipped"] > 0
    pairing = F.CTPairing(ct_dir=fused["ct"], mri_root=data_dir)
    x = np.stack([F.load_fused(s.path, pairing.find(s.path), art) for s in fused["val"]])
    y = np.array([s.label for s in fused["val"]])
    acc = float(np.mean(_keras_probs(fused["model"], x).argmax(1) == y))
    assert v["source_accuracy"] == pytest.approx(acc)
    summary = json.loads((out / "convert_summary.json").read_text())
    assert summary["calibration"]["fusion"]["pairs"] == 16


def test_calibration_and_verification_arrays_are_the_training_inputs(fused: dict[str, Any], data_dir: Path,
                                                                     tmp_path: Path) -> None:
    from edgebrain.calibration import CalibrationError, build_calibration
    from edgebrain.convert import _Data, _fusion_setup, _verify_set
    from edgebrain.converters.source import load_source
    from edgebrain.modelcard import ModelCard
    from edgebrain.train import load_split

    card = ModelCard.find(fused["model"])
    assert card is not None
    spec = card.preprocess
    cs = build_calibration(spec, card.class_names, 8, 0, data_root=data_dir, split_seed=SEED,
                           fractions=card.data["fractions"], ct_dir=fused["ct"])
    assert len(cs) == 8 and cs.info["fusion"]["pairs"] == 8
    # the same pixels edgebrain train feeds the model (train.load_split on fused pairs)
    ref = load_split(cs.samples, spec, "ref", str(fused["ct"]), data_dir)
    np.testing.assert_array_equal(cs.x, spec.apply(ref.x).astype(np.float32))
    plain = D.load_arrays(cs.samples, spec.size)
    assert not np.allclose(cs.x, spec.apply(plain.x))  # not the plain MRI
    # a pairs CSV works too: only the listed calibration images are used
    rows = ["mri,ct"] + [f"{s.rel},{s.rel.rsplit('.', 1)[0]}.png" for s in fused["calib"][:5]]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    cs2 = build_calibration(spec, card.class_names, 16, 0, data_root=data_dir, split_seed=SEED,
                            fractions=card.data["fractions"], ct_dir=fused["ct"], ct_csv=tmp_path / "pairs.csv")
    assert sorted(s.rel for s in cs2.samples) == sorted(s.rel for s in fused["calib"][:5])
    assert cs2.info["fusion"]["pairing"] == "csv"
    with pytest.raises(CalibrationError, match="--ct-dir"):
        build_calibration(spec, card.class_names, 8, 0, data_root=data_dir, split_seed=SEED,
                          fractions=card.data["fractions"])
    # verification set: fused validation pairs (CT folder taken from the model card)
    src = load_source(fused["model"] / "model.keras")
    dd = _Data(src, None)
    assert _fusion_setup(src, dd, None, None)[0] == str(fused["ct"].resolve())
    vs = _verify_set(src, dd, 6, None)
    assert vs.split == "val" and len(vs.x) == 6 and vs.fusion is not None
    want = spec.apply(load_split(fused["val"], spec, "ref", str(fused["ct"]), data_dir).x)
    matches = [np.where((want == row).all(axis=(1, 2, 3)))[0] for row in vs.x]  # each row: one fused val pair
    assert all(len(r) == 1 for r in matches) and len({int(r[0]) for r in matches}) == 6


def test_fused_model_without_ct_is_refused(fused: dict[str, Any], tmp_path: Path) -> None:
    moved = tmp_path / "model"
    shutil.copytree(fused["model"], moved)
    card_file = moved / "model_card.json"
    d = json.loads(card_file.read_text())
    gone = str(tmp_path / "gone-ct")
    d["extra"]["fusion"]["ct_dir"] = gone
    d["training"]["ct_dir"] = gone
    card_file.write_text(json.dumps(d))
    out = tmp_path / "arts"
    res = _cli(moved / "model.keras", "--to", "tflite", "--precision", "int8,fp32", "--out", out)
    assert res.exit_code == 1, res.output
    assert "fused MRI+CT" in res.output and "--ct-dir" in res.output and "--ct-csv" in res.output
    assert "gone-ct" in res.output  # names the CT folder the card records
    assert not out.exists() or not any(p.name.startswith("tflite") for p in out.iterdir())
    res = _cli(moved / "model.keras", "--to", "tflite", "--precision", "fp32", "--out", out, "--ct-dir",
               tmp_path / "nope")
    assert res.exit_code == 1 and "CT folder not found" in res.output


def test_plain_model_with_ct_is_refused(tiny_model: Path, fused: dict[str, Any], data_dir: Path,
                                        tmp_path: Path) -> None:
    res = _cli(tiny_model, "--to", "tflite", "--precision", "int8", "--out", tmp_path / "arts", "--data", data_dir,
               "--ct-dir", fused["ct"])
    assert res.exit_code == 1, res.output
    assert "takes plain MRI" in res.output and "Drop the CT option" in res.output
    assert not (tmp_path / "arts" / "tflite-int8").exists()
