"""The real pipeline: a small model really trained on the real data -> convert (TFLite, ONNX,
OpenVINO int8) -> bench on a fixed stratified Testing subset -> gate passes; and the gate fails on
genuinely broken artifacts (int8 calibrated on blank images, a model with shuffled head weights).

Thresholds. The session's small model (64 px, width 0.5, 600 training images) reaches only ~58 % on
this subset and many of its predictions are near-ties: int8 changes about one prediction in ten while
accuracy stays within a few images (measured on 100 per class: agreement 0.875-0.92, accuracy -1.0 to
+0.5 pp, worst class -7 pp; see benchmarks/results/gate.md). The clinical defaults (0.5 pp, 1 pp,
0.99) rightly refuse that, so the good artifacts are gated at limits for this model (5 pp, 15 pp per
class, agreement 0.8) plus McNemar's test. The broken artifacts lose far more (measured: accuracy -26
and -44.5 pp, agreement 0.40 and 0.00).
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
from edgebrain.convert import convert
from edgebrain.gate import ERROR, FAIL, PASS, gate

pytestmark = pytest.mark.slow

PER_CLASS = 100
GOOD_TARGETS = ["tflite", "onnx", "openvino"]
LIMITS: dict[str, Any] = {"max_drop": 5.0, "max_class_drop": 15.0, "min_agreement": 0.8,
                          "non_inferiority": "mcnemar"}
CLI_LIMITS = ["--max-drop", "5", "--max-class-drop", "15", "--min-agreement", "0.8", "--non-inferiority", "mcnemar"]
FAST = BenchOptions(warmup=2, min_runs=5, min_seconds=0.0, throughput_min_runs=2, throughput_min_seconds=0.0,
                    n_boot=500)


def _bench(arts: list[Path], data_dir: Path, reference: Path, out: Path) -> Path:
    bench([str(a) for a in arts], data_dir, device="host", reference=reference, out=out, options=FAST,
          per_class=PER_CLASS, threads=2)
    return out / "results.json"


def _detail(rep: Any) -> str:
    return "\n".join(f"{s.key} {c.name} {c.status}: {c.message}" for s in rep.subjects for c in s.checks)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def good(trained_small: Path, data_dir: Path, work: Path) -> dict[str, Any]:
    model = trained_small / "model.keras"
    # convert's own verification (validation split) at this model's level of int8 agreement
    arts = convert(model, GOOD_TARGETS, ["int8"], work / "good", verify_n=64, min_agreement=0.7, overwrite=True)
    results = _bench([a.path for a in arts], data_dir, model, work / "bench-good")
    return {"model": model, "artifacts": arts, "results": results}


@pytest.fixture(scope="module")
def broken(trained_small: Path, data_dir: Path, work: Path) -> dict[str, Any]:
    model = trained_small / "model.keras"
    # (a) int8 calibrated on blank images: constant near-black images in the Kaggle layout (distinct
    # files, so they are not collapsed as duplicates). convert's verification would reject it; it is
    # written without verification so that the gate alone has to catch it.
    blank = work / "blank-calib"
    classes = json.loads((trained_small / "model_card.json").read_text())["class_names"]
    for c in classes:
        d = blank / "Training" / c
        d.mkdir(parents=True)
        for i in range(160):
            g = i % 4
            Image.new("RGB", (64 + i, 64 + i), (g, g, g)).save(d / f"blank-{i:03d}.png")
    blank_arts = convert(model, ["tflite"], ["int8"], work / "blank", calib=blank, calib_size=32, no_verify=True,
                         overwrite=True)
    assert blank_arts[0].manifest["calibration"]["size"] == 32

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
    shuffled_arts = convert(shuffled / "model.keras", ["tflite"], ["fp32"], work / "shuffled-art", verify_n=32,
                            overwrite=True)

    results = _bench([a.path for a in blank_arts + shuffled_arts], data_dir, model, work / "bench-broken")
    return {"results": results, "blank": blank_arts[0], "shuffled": shuffled_arts[0]}


def test_pipeline_gate_passes_on_good_artifacts(good: dict[str, Any], tmp_path: Path) -> None:
    res = json.loads(good["results"].read_text())
    assert res["data"]["n"] == 4 * PER_CLASS and res["data"]["split"] == "Testing"
    assert {r["target"] for r in res["results"]} == set(GOOD_TARGETS)
    assert all(r["precision"] == "int8" for r in res["results"])
    ref_acc = res["reference"]["accuracy"]
    assert ref_acc >= 0.5, "the small model did not learn (chance is 0.25): the pipeline would prove nothing"

    rep = gate(good["results"], **LIMITS)
    assert rep.status == PASS and rep.exit_code == 0, _detail(rep)
    assert len(rep.subjects) == 3
    for s in rep.subjects:
        assert s.check("integrity").status == PASS  # type: ignore[union-attr]  # real manifests, re-hashed
        assert s.metrics["accuracy"] >= ref_acc - LIMITS["max_drop"] / 100

    # the CLI, with the reports CI would publish, and a baseline recorded and compared
    junit, summary, base = tmp_path / "junit.xml", tmp_path / "summary.md", tmp_path / "baseline.json"
    limits = CLI_LIMITS
    r = CliRunner().invoke(cli, ["gate", str(good["results"]), *limits, "--junit", str(junit),
                                 "--summary", str(summary), "--baseline", str(base), "--update-baseline"])
    assert r.exit_code == 0, r.output
    assert "gate: PASS" in r.output and base.is_file()
    import xml.etree.ElementTree as ET

    root = ET.parse(junit).getroot()
    assert root.get("failures") == "0" and root.get("errors") == "0" and int(root.get("tests", "0")) == 3 * 10
    assert summary.read_text().startswith("## ✅ edgebrain gate: PASS")
    b = json.loads(base.read_text())
    assert b["source"]["sha256"] == res["reference"]["artifact_sha256"]
    assert b["data"]["list_hash"] == res["data"]["list_hash"]
    r = CliRunner().invoke(cli, ["gate", str(good["results"]), *limits, "--baseline", str(base),
                                 "--max-latency-ratio", "10"])
    assert r.exit_code == 0, r.output


def test_pipeline_gate_fails_on_broken_artifacts(broken: dict[str, Any]) -> None:
    res = json.loads(broken["results"].read_text())
    by_name = {r["name"]: r for r in res["results"]}
    blank_name, shuffled_name = broken["blank"].name, broken["shuffled"].name
    assert set(by_name) == {blank_name, shuffled_name}

    rep = gate(broken["results"], **LIMITS)
    assert rep.status != PASS and rep.exit_code != 0
    subj = {s.name: s for s in rep.subjects}
    detail = _detail(rep)

    # (a) blank calibration: the artifact is the one measured (integrity passes); its numbers fail
    blank = subj[blank_name]
    assert blank.check("integrity").status == PASS, detail  # type: ignore[union-attr]
    for c in ("accuracy", "agreement", "non_inferiority"):
        assert blank.check(c).status == FAIL, detail  # type: ignore[union-attr]
    # (b) shuffled head: every accuracy check fails, and it is not even the reference's model
    sh = subj[shuffled_name]
    for c in ("accuracy", "class_recall", "agreement", "non_inferiority"):
        assert sh.check(c).status == FAIL, detail  # type: ignore[union-attr]
    integrity = sh.check("integrity")
    assert integrity is not None and integrity.status == ERROR and "another model" in integrity.message
    # gating on the numbers alone (no hash check) still fails: a regression, exit 1
    assert gate(broken["results"], artifact_check=False, **LIMITS).exit_code == 1
    # and at the clinical defaults too
    assert gate(broken["results"], artifact_check=False).exit_code == 1
