"""``edgebrain convert`` on an sr-resnet50 folder writes each pipeline stage as its own file
(same target and precision, hashed, listed in ``manifest.pipeline``, verified as a chain against
the source), and ``edgebrain bench`` times every stage. A tiny sr-resnet50 is really trained on
real images (SR net and classifier, one epoch each)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgebrain import data as D
from edgebrain.artifact import load_manifest
from edgebrain.errors import IntegrityError

FAST = dict(warmup=2, min_runs=10, min_seconds=0.2, throughput_min_runs=2, throughput_min_seconds=0.1, n_boot=200)


@pytest.fixture(scope="module")
def srr(data_dir: Path, cache_env: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sr-resnet50 at HR 32 px (LR 16 px), classifier width 0.25; SR net and classifier trained one
    epoch each on 16 train images per class."""
    from edgebrain.train import TrainConfig, train

    out = tmp_path_factory.mktemp("srr") / "sr-resnet50"
    train(TrainConfig(variant="sr-resnet50", data_dir=str(data_dir), out=str(out), input_size=32, width=0.25,
                      epochs=1, batch_size=32, per_class=16, eval_per_class=4, seed=3, sr_epochs=1,
                      sr_int8_check=False))
    return out


@pytest.fixture(scope="module")
def arts(srr: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from edgebrain.convert import convert

    out = tmp_path_factory.mktemp("srr-arts")
    got = convert(srr / "model.keras", ["tflite"], ["fp32", "int8"], out, calib_size=16, verify_n=24,
                  min_agreement=0.5)
    got += convert(srr / "model.keras", ["onnx"], ["fp32"], out, verify_n=24)
    return {f"{a.target}-{a.precision}": a.path for a in got}


def _manifest(p: Path) -> dict[str, Any]:
    return json.loads((p / "manifest.json").read_text())


def test_manifest_lists_the_converted_stages(arts: dict[str, Path], srr: Path) -> None:
    card = json.loads((srr / "model_card.json").read_text())["extra"]["pipeline"]["stages"]
    assert set(arts) == {"tflite-fp32", "tflite-int8", "onnx-fp32"}
    for key, path in arts.items():
        m = _manifest(path)
        stages = m["pipeline"]["stages"]
        assert [s["name"] for s in stages] == ["sr", "classifier"], key
        for st, c in zip(stages, card):
            assert st["input_shape"] == c["input_shape"] and st["output_shape"] == c["output_shape"]
            assert st["precision"] == m["precision"] and st["kept_float_by_policy"] is False
            assert st["model_file"].startswith(f"stages/{st['name']}/") and st["model_file"].endswith(
                ".tflite" if m["target"] == "tflite" else ".onnx")
            assert (path / st["model_file"]).is_file()
            digest = hashlib.sha256((path / st["model_file"]).read_bytes()).hexdigest()
            assert m["files"][st["model_file"]] == digest  # hashed like the model file
            assert st["source"]["file"] == c["file"] and st["size_bytes"] == (path / st["model_file"]).stat().st_size
        assert stages[0]["input_shape"] == m["input_shape"] == [16, 16, 3]
        assert stages[1]["output_shape"] == [len(m["class_names"])]
        # the size figure is the deployable composite's, not the stage files'
        assert m["size"]["size_bytes"] == (path / m["model_file"]).stat().st_size
        pv = m["pipeline"]["verification"]
        assert pv["passed"] is True and pv["n"] == 24 and [s["name"] for s in pv["stages"]] == ["sr", "classifier"]
        if m["precision"] == "fp32":
            assert pv["max_abs_dp"] <= 1e-3 and pv["stages"][0]["max_abs_diff"] < 1e-4
    int8 = _manifest(arts["tflite-int8"])["pipeline"]
    assert int8["stages"][0]["ops"]["int8_ops"] > 0 and int8["stages"][1]["ops"]["int8_ops"] > 0
    assert int8["stages"][0]["calibration_input"] == "the composite's calibration images"
    assert "'sr'" in int8["stages"][1]["calibration_input"]
    assert 20.0 < int8["verification"]["stages"][0]["psnr_db_vs_source"] < 100.0  # quantised, not garbage


def test_stage_files_reproduce_the_keras_stages(arts: dict[str, Path], srr: Path, dataset: D.Dataset) -> None:
    """Independent of convert's own check: real LR images through each converted stage file vs
    the stage's Keras model, and the chain vs the composite."""
    from edgebrain.models.variants import load_keras_model
    from edgebrain.runtime import RUNNERS

    lr = D.load_arrays(D.subset(dataset.split("Testing"), 3, 1), (16, 16)).x.astype(np.float32) / 255.0
    sr_k = load_keras_model(srr / "sr.keras")
    cls_k = load_keras_model(srr / "classifier.keras")
    full_k = load_keras_model(srr / "model.keras")
    want_sr = sr_k(lr, training=False).numpy()
    want = full_k(lr, training=False).numpy()
    for key in ("tflite-fp32", "onnx-fp32", "tflite-int8"):
        m = _manifest(arts[key])
        st = m["pipeline"]["stages"]
        r_sr = RUNNERS[m["target"]](arts[key] / st[0]["model_file"], threads=1)
        r_cls = RUNNERS[m["target"]](arts[key] / st[1]["model_file"], threads=1)
        got_sr = np.concatenate([r_sr.run_raw(lr[i : i + 1]) for i in range(len(lr))])
        got = np.concatenate([r_cls.run(got_sr[i : i + 1]) for i in range(len(lr))])
        assert got_sr.shape == want_sr.shape == (12, 32, 32, 3)
        d = np.abs(got_sr - want_sr)
        if m["precision"] == "int8":  # int8 activations: close on average, never exact
            assert 0 < d.mean() < 0.02, (key, d.mean())
        else:
            assert d.max() < 1e-4, (key, d.max())
            np.testing.assert_allclose(got, want, atol=1e-4)
            np.testing.assert_allclose(cls_k(got_sr, training=False).numpy(), want, atol=1e-4)


def test_stage_hashes_are_checked(arts: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "tampered"
    shutil.copytree(arts["tflite-fp32"], bad)
    f = bad / _manifest(bad)["pipeline"]["stages"][0]["model_file"]
    f.write_bytes(f.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(IntegrityError, match="stages/sr/model.tflite"):
        load_manifest(bad)
    load_manifest(arts["tflite-fp32"])  # the original still loads


def test_float_policy_keeps_the_sr_stage_float(srr: Path, tmp_path: Path) -> None:
    from edgebrain.convert import convert

    folder = tmp_path / "srr-float"
    shutil.copytree(srr, folder)
    card = json.loads((folder / "model_card.json").read_text())
    card["extra"]["pipeline"]["stages"][0]["int8_policy"] = {"decision": "float", "psnr_drop_db": 0.9,
                                                             "budget_psnr_drop_db": 0.5}
    (folder / "model_card.json").write_text(json.dumps(card))
    (art,) = convert(folder / "model.keras", ["onnx"], ["int8"], tmp_path / "out", calib_size=8, verify_n=8,
                     min_agreement=0.5)
    m = art.manifest
    assert m["quantization"]["float_stages"] == ["sr"]  # the composite keeps /sr/ float ...
    sr_st, cls_st = m["pipeline"]["stages"]
    assert sr_st["precision"] == "fp32" and sr_st["kept_float_by_policy"] is True  # ... and so does the stage
    assert sr_st["ops"]["int8_ops"] == 0 and sr_st["calibration_input"] is None
    assert cls_st["precision"] == "int8" and cls_st["ops"]["int8_ops"] > 0
    assert m["pipeline"]["verification"]["stages"][0]["max_abs_diff"] < 1e-4  # float SR stage: exact


def test_a_stage_that_cannot_be_converted_fails_naming_it(srr: Path, tmp_path: Path) -> None:
    from edgebrain.convert import convert
    from edgebrain.converters.base import ConversionError

    folder = tmp_path / "srr-broken"
    shutil.copytree(srr, folder)
    (folder / "classifier.keras").unlink()
    with pytest.raises(ConversionError, match="pipeline stage 'classifier'.*classifier.keras"):
        convert(folder / "model.keras", ["onnx"], ["fp32"], tmp_path / "o1", verify_n=4)
    shutil.copy(folder / "sr.keras", folder / "classifier.keras")  # wrong model for the stage
    with pytest.raises(ConversionError, match="pipeline stage 'classifier'.*input shape"):
        convert(folder / "model.keras", ["onnx"], ["fp32"], tmp_path / "o2", verify_n=4)
    assert not (tmp_path / "o1" / "onnx-fp32").exists() and not (tmp_path / "o2" / "onnx-fp32").exists()


def test_bench_reports_latency_per_stage(arts: dict[str, Path], data_dir: Path, tmp_path: Path) -> None:
    from edgebrain.bench import BenchOptions, bench, validate_results

    out = tmp_path / "bench"
    doc = bench([arts["tflite-fp32"], arts["tflite-int8"], arts["onnx-fp32"]], data_dir, out=out, per_class=2,
                no_reference=True, options=BenchOptions(threads=1, **FAST))
    validate_results(json.loads((out / "results.json").read_text()))
    assert doc["errors"] == [] and doc["data"]["n"] == 8
    for r in doc["results"]:
        m = _manifest(Path(r["artifact"]))
        st = r["stages"]
        assert [s["name"] for s in st] == ["sr", "classifier"], r["name"]
        for s, e in zip(st, m["pipeline"]["stages"]):
            assert "error" not in s, s
            assert s["model_file"] == e["model_file"] and s["precision"] == e["precision"]
            assert s["latency_ms"]["n"] >= 10 and 0 < s["latency_ms"]["p50"] <= s["latency_ms"]["max"]
    md = (out / "results.md").read_text()
    assert "## Pipeline stages" in md
    assert md.count("stages/sr/model.") == 3 and md.count("stages/classifier/model.") == 3


def test_stages_use_the_int8_setting_chosen_for_the_model(srr: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The int8 search picks a calibration setting for the composite model on the validation
    split; the stage files are quantised with that same setting. The candidate's verification is
    made to report perfect agreement and zero KL, so the choice is deterministic here."""
    import edgebrain.convert as C
    from edgebrain.convert import convert

    real = C._verify

    def verify(art: Any, target: Any, vs: Any, min_agreement: float, threads: Any) -> Any:
        res, w = real(art, target, vs, min_agreement, threads)
        if ".alt-" in art.path.name:  # the search's candidate build (ONNX: percentile ranges)
            res = {**res, "top1_agreement": 1.0, "mean_kl": 0.0}
        return res, w

    monkeypatch.setattr(C, "_verify", verify)
    a = convert(srr / "model.keras", ["onnx"], ["int8"], tmp_path / "o", calib_size=16, verify_n=24,
                min_agreement=0.01, int8_fallback_below=None)[0]
    m = _manifest(a.path)
    assert m["quantization"]["selection"]["chosen"] == "calib_method=percentile"
    assert m["calibration"]["method"] == "percentile"
    quantised = [st for st in m["pipeline"]["stages"] if st["precision"] == "int8"]
    assert quantised and all(st["calibration_method"] == "percentile" for st in quantised)
