"""The real pipeline: a small model really trained on the real data -> convert (TFLite, ONNX,
OpenVINO int8) -> bench on a fixed stratified Testing subset -> gate passes; and the gate fails on
genuinely broken artifacts (int8 calibrated on blank images, a model with shuffled head weights).

Thresholds: the subset has 40 images per class (160 in all), so one image is 2.5 pp of a class's
recall and 0.625 pp of accuracy, more than the clinical defaults (0.5 / 1.0 pp) that are meant for the
full Testing split. The good artifacts are gated at thresholds of a few images; the broken ones lose
far more than that.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgebrain.bench import BenchOptions, bench
from edgebrain.cli import cli
from edgebrain.convert import ConvertFailed, convert
from edgebrain.gate import ERROR, FAIL, PASS, gate

pytestmark = pytest.mark.slow

PER_CLASS = 40
GOOD_TARGETS = ["tflite", "onnx", "openvino"]
# A few images' worth on 160 images: 3 images overall, 2 images in one class, 4 flips.
LIMITS = {"max_drop": 1.9, "max_class_drop": 5.1, "min_agreement": 0.975}
FAST = BenchOptions(warmup=2, min_runs=5, min_seconds=0.0, throughput_min_runs=2, throughput_min_seconds=0.0,
                    n_boot=500)


def _bench(arts: list[Path], data_dir: Path, reference: Path, out: Path) -> Path:
    bench([str(a) for a in arts], data_dir, device="host", reference=reference, out=out, options=FAST,
          per_class=PER_CLASS, threads=2)
    return out / "results.json"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def good(trained_small: Path, data_dir: Path, work: Path) -> dict[str, Any]:
    model = trained_small / "model.keras"
    arts = convert(model, GOOD_TARGETS, ["int8"], work / "good", calib_size=64, verify_n=64, overwrite=True)
    results = _bench([a.path for a in arts], data_dir, model, work / "bench-good")
    return {"model": model, "artifacts": arts, "results": results}


@pytest.fixture(scope="module")
def broken(trained_small: Path, data_dir: Path, work: Path) -> dict[str, Any]:
    model = trained_small / "model.keras"
    # (a) int8 calibrated on blank images: constant-colour JPEGs in the Kaggle layout
    blank = work / "blank-calib"
    rng = np.random.default_rng(0)
    classes = json.loads((trained_small / "model_card.json").read_text())["class_names"]
    for c in classes:
        d = blank / "Training" / c
        d.mkdir(parents=True)
        for i in range(160):
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            Image.new("RGB", (64, 64), colour).save(d / f"blank-{i:03d}.jpg", quality=95)
    # convert's own verification refuses it ...
    with pytest.raises(ConvertFailed) as exc:
        convert(model, ["tflite"], ["int8"], work / "blank-verified", calib=blank, calib_size=32, verify_n=64,
                overwrite=True)
    rejected = Path(exc.value.summary["rejected"][0]["path"])
    # ... so the gate is tested on the same conversion written without verification
    blank_arts = convert(model, ["tflite"], ["int8"], work / "blank", calib=blank, calib_size=32, no_verify=True,
                         overwrite=True)

    # (b) the trained model with its final Dense layer's kernel columns (and bias) permuted
    from edgebrain.models.variants import load_keras_model

    m = load_keras_model(model)
    head = [layer for layer in m.layers if layer.__class__.__name__ == "Dense"][-1]
    kernel, bias = head.get_weights()
    perm = np.roll(np.arange(kernel.shape[1]), 1)  # every class's weights move to another class
    head.set_weights([kernel[:, perm], bias[perm]])
    shuffled = work / "shuffled"
    shuffled.mkdir()
    m.save(shuffled / "model.keras")
    shutil.copy(trained_small / "model_card.json", shuffled / "model_card.json")
    shuffled_arts = convert(shuffled / "model.keras", ["tflite"], ["int8"], work / "shuffled-art", calib_size=64,
                            verify_n=64, overwrite=True)

    arts = [a.path for a in blank_arts + shuffled_arts]
    results = _bench(arts, data_dir, model, work / "bench-broken")
    return {"results": results, "blank": blank_arts[0], "shuffled": shuffled_arts[0], "rejected": rejected}


def test_pipeline_gate_passes_on_good_artifacts(good: dict[str, Any], tmp_path: Path) -> None:
    res = json.loads(good["results"].read_text())
    assert res["data"]["n"] == 4 * PER_CLASS and res["data"]["split"] == "Testing"
    assert {r["target"] for r in res["results"]} == set(GOOD_TARGETS)
    assert all(r["precision"] == "int8" for r in res["results"])
    ref_acc = res["reference"]["accuracy"]
    assert ref_acc >= 0.6, "the small model did not learn: the pipeline would prove nothing"

    rep = gate(good["results"], **LIMITS)
    detail = "\n".join(f"{s.key} {c.name} {c.status}: {c.message}" for s in rep.subjects for c in s.checks)
    assert rep.status == PASS and rep.exit_code == 0, detail
    assert len(rep.subjects) == 3
    for s in rep.subjects:
        assert s.check("integrity").status == PASS  # type: ignore[union-attr]  # real manifests, re-hashed
        assert s.metrics["accuracy"] >= ref_acc - LIMITS["max_drop"] / 100

    # the CLI, with the reports CI would publish, and a baseline recorded and compared
    junit, summary, base = tmp_path / "junit.xml", tmp_path / "summary.md", tmp_path / "baseline.json"
    limits = ["--max-drop", "1.9", "--max-class-drop", "5.1", "--min-agreement", "0.975"]
    r = CliRunner().invoke(cli, ["gate", str(good["results"]), *limits, "--junit", str(junit),
                                 "--summary", str(summary), "--baseline", str(base), "--update-baseline"])
    assert r.exit_code == 0, r.output
    assert "gate: PASS" in r.output and base.is_file()
    import xml.etree.ElementTree as ET

    root = ET.parse(junit).getroot()
    assert root.get("failures") == "0" and root.get("errors") == "0" and int(root.get("tests", "0")) == 3 * 8
    assert summary.read_text().startswith("## ✅ edgebrain gate: PASS")
    b = json.loads(base.read_text())
    assert b["source"]["sha256"] == res["reference"]["artifact_sha256"]
    assert b["data"]["list_hash"] == res["data"]["list_hash"]
    r = CliRunner().invoke(cli, ["gate", str(good["results"]), *limits, "--baseline", str(base),
                                 "--max-latency-ratio", "10"])
    assert r.exit_code == 0, r.output


def test_pipeline_gate_fails_on_broken_artifacts(good: dict[str, Any], broken: dict[str, Any],
                                                 data_dir: Path) -> None:
    res = json.loads(broken["results"].read_text())
    by_name = {r["name"]: r for r in res["results"]}
    blank_name, shuffled_name = broken["blank"].name, broken["shuffled"].name
    assert set(by_name) == {blank_name, shuffled_name}

    rep = gate(broken["results"], **LIMITS)
    assert rep.status != PASS and rep.exit_code != 0
    subj = {s.name: s for s in rep.subjects}
    detail = "\n".join(f"{s.key} {c.name} {c.status}: {c.message}" for s in rep.subjects for c in s.checks)

    # (a) blank calibration: the artifact is what was measured (integrity passes) and the numbers fail
    blank = subj[blank_name]
    assert blank.check("integrity").status == PASS, detail  # type: ignore[union-attr]
    assert blank.check("agreement").status == FAIL, detail  # type: ignore[union-attr]
    assert FAIL in {blank.check(c).status for c in ("accuracy", "class_recall")}, detail  # type: ignore[union-attr]
    # (b) shuffled head: every accuracy check fails, and it is not even the reference's model
    sh = subj[shuffled_name]
    for c in ("accuracy", "class_recall", "agreement"):
        assert sh.check(c).status == FAIL, detail  # type: ignore[union-attr]
    assert sh.check("integrity").status == ERROR and "another model" in sh.check("integrity").message  # type: ignore[union-attr]
    assert by_name[shuffled_name]["accuracy"] < by_name[blank_name]["accuracy"] or \
        by_name[shuffled_name]["agreement"] < 0.5
    # even gating on the numbers alone, with loose limits and the good artifacts' defaults, it fails
    assert gate(broken["results"], artifact_check=False, **LIMITS).exit_code == 1
    assert gate(broken["results"], artifact_check=False, max_drop=10, max_class_drop=20,
                min_agreement=0.8).exit_code == 1

    # the artifact convert rejected cannot pass either: bench refuses to load it, the gate fails it
    from edgebrain.artifact import read_manifest_unchecked

    assert read_manifest_unchecked(broken["rejected"])["verification"]["passed"] is False
    with pytest.raises(Exception, match="failed verification"):
        bench([str(broken["rejected"])], data_dir, device="host", per_class=1)
    doc = json.loads(good["results"].read_text())
    doc["results"][0]["artifact"] = str(broken["rejected"])
    p = broken["results"].parent.parent / "tampered-results.json"
    p.write_text(json.dumps(doc))
    rep = gate(p, **LIMITS)
    assert rep.exit_code != 0 and rep.subjects[0].check("integrity").status in (FAIL, ERROR)  # type: ignore[union-attr]
