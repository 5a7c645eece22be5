"""Gate: artifacts rejected at conversion are failures in every summary; small classes are decided
by an exact test (which rule decided is named)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgebrain.artifact import write_manifest
from edgebrain.cli import cli
from edgebrain.gate import ERROR, FAIL, PASS, gate, junit_xml, markdown_summary
from edgebrain.preprocess import PreprocessSpec

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
SRC = "a" * 64


def _artifact(root: Path, name: str) -> tuple[Path, str]:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(f"model {name}".encode() * 10)
    m = write_manifest(folder, {
        "name": name, "target": "onnx", "precision": name.split("-")[1], "model_file": "model.onnx",
        "preprocess": PreprocessSpec.named("rescale", 32).to_dict(), "class_names": CLASSES,
        "input_shape": [32, 32, 3], "source": {"path": "model.keras", "sha256": SRC, "format": "tf-keras"},
        "verification": {"passed": True}})
    return folder, m["artifact_sha256"]


def _record(name: str, correct: list[int], support: int, folder: Path | None = None, sha: str | None = None,
            flips: list[dict[str, str]] | None = None) -> dict[str, Any]:
    recalls = [k / support for k in correct]
    acc = sum(correct) / (support * len(correct))
    n = support * len(correct)
    # paired counts that agree with the accuracies: the listed flips, else every change a loss
    lost = sum(1 for f in flips or [] if f["ref_label"] == f["true_label"] != f["label"])
    gained = sum(1 for f in flips or [] if f["label"] == f["true_label"] != f["ref_label"])
    if flips is None:
        lost = max(0, sum(REF) - sum(correct)) if support == 50 else 0
    rec = {
        "artifact": str(folder) if folder else "runs/m/model.keras", "name": name,
        "artifact_sha256": sha or SRC, "target": "onnx", "precision": name.split("-")[-1],
        "device": {"profile": "host", "label": "host", "fingerprint": {"arch": "x86_64", "cpu": "x", "cores": 2},
                   "runtime": "onnxruntime", "threads": 2, "ran_on": "CPU", "transport": "local"},
        "accuracy": acc, "accuracy_ci95": [acc - 0.03, min(1.0, acc + 0.03)], "macro_f1": acc,
        "per_class": {c: {"precision": r, "recall": r, "f1": r, "support": support} for c, r in zip(CLASSES, recalls)},
        "confusion_matrix": _cm(correct, support), "agreement": 1.0 - (len(flips) if flips else lost) / n,
        "mcnemar": {"b": lost, "c": gained, "p_value": 1.0}, "ece": 0.02,
        "latency_ms": {"p50": 5.0, "p90": 5.5, "p99": 6.0, "mean": 5.0, "std": 0.1, "n": 50},
    }
    if flips is not None:
        rec.update({"flips": flips, "n_flips": len(flips)})
    return rec


REF = [47, 45, 49, 48]  # correct images per class out of 50


def _cm(correct: list[int], support: int) -> list[list[int]]:
    """A confusion matrix that agrees with the counts (misses go to the next class)."""
    k = len(correct)
    cm = [[0] * k for _ in range(k)]
    for i, c in enumerate(correct):
        cm[i][i] = c
        cm[i][(i + 1) % k] = support - c
    return cm


def _doc(recs: list[dict[str, Any]], support: int = 50) -> dict[str, Any]:
    ref = _record("reference-fp32", REF, support)
    return {"schema_version": 1, "kind": "edgebrain-bench-results", "created": "2025-01-01T00:00:00",
            "data": {"root": "/data", "split": "Testing", "n": support * 4, "list_hash": "b" * 64,
                     "class_names": CLASSES, "failed": []},
            "reference": ref, "results": recs, "errors": []}


def _write(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture()
def art(tmp_path: Path) -> tuple[Path, str]:
    return _artifact(tmp_path / "artifacts", "onnx-int8")


# ----------------------------------------------------------------------------- rejected at conversion


def _convert_summary(folder: Path, source_sha: str = SRC) -> Path:
    return _write(folder / "convert_summary.json", {
        "kind": "edgebrain-convert-summary", "source": {"path": "model.keras", "sha256": source_sha},
        "artifacts": [], "skipped": [],
        "rejected": [{"target": "tflite", "precision": "int8", "path": str(folder / "tflite-int8.rejected"),
                      "reason": "top-1 agreement 0.9712 < 0.99"}],
        "failed": [{"target": "openvino", "precision": "int8", "error": "NNCF quantisation failed (boom)"}]})


def test_rejected_at_conversion_fails_every_summary(tmp_path: Path, art: tuple[Path, str]) -> None:
    folder, sha = art
    results = _write(tmp_path / "results.json", _doc([_record("onnx-int8", REF, 50, folder, sha)]))
    assert gate(results).exit_code == 0  # the benchmarked artifact itself passes
    _convert_summary(folder.parent)  # convert wrote this into its --out, beside the artifacts
    rep = gate(results)
    assert rep.status == FAIL and rep.exit_code == 1
    conv = {s.name: s for s in rep.subjects if s.device == "conversion"}
    assert set(conv) == {"tflite-int8", "openvino-int8"}
    assert all(s.check("conversion").status == FAIL for s in conv.values())  # type: ignore[union-attr]
    md = markdown_summary(rep)
    assert md.startswith("## ❌ edgebrain gate: FAIL")
    assert "**tflite-int8@conversion** `conversion`: rejected at conversion by verification: top-1 agreement" in md
    assert "**openvino-int8@conversion** `conversion`: could not be converted: NNCF" in md
    junit = ET.fromstring(junit_xml(rep))
    fails = [tc for tc in junit.iter("testcase") if tc.get("name") == "conversion" and tc.find("failure") is not None]
    assert len(fails) == 2 and junit.get("failures") == "2"
    d = rep.to_dict()
    assert d["verdict"] == FAIL and sum(s["device"] == "conversion" for s in d["subjects"]) == 2


def test_convert_summary_given_explicitly_and_of_another_model(tmp_path: Path, art: tuple[Path, str]) -> None:
    folder, sha = art
    results = _write(tmp_path / "results.json", _doc([_record("onnx-int8", REF, 50, folder, sha)]))
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    _convert_summary(elsewhere)
    r = CliRunner().invoke(cli, ["gate", str(results), "--convert-summary", str(elsewhere / "convert_summary.json")])
    assert r.exit_code == 1, r.output
    assert "rejected at conversion" in r.output or "conversion" in r.output
    # a summary of another model: an explicit one is an error, one found beside the artifacts a note
    _convert_summary(elsewhere, source_sha="f" * 64)
    rep = gate(results, convert_summary=elsewhere / "convert_summary.json")
    assert rep.status == ERROR and "another model" in rep.errors[0]
    _convert_summary(folder.parent, source_sha="f" * 64)
    rep = gate(results)
    assert rep.status == PASS and any("another model" in n and "ignored" in n for n in rep.notes)
    rep = gate(results, convert_summary=tmp_path / "missing.json")
    assert rep.status == ERROR and "cannot be read" in rep.errors[0]


# ----------------------------------------------------------------------------- small samples


def _flip(true: str, ref: str, new: str) -> dict[str, str]:
    return {"file": f"{true}/x.jpg", "true_label": true, "ref_label": ref, "label": new}


def _class_rule(rep: Any) -> Any:
    return rep.subjects[0].check("class_recall")


def test_one_changed_image_in_a_class_of_50_is_decided_by_the_exact_test(tmp_path: Path,
                                                                       art: tuple[Path, str]) -> None:
    folder, sha = art
    one = [REF[0] - 1, *REF[1:]]  # one glioma lost: 2 pp > the 1 pp limit
    results = _write(tmp_path / "r.json", _doc([_record("onnx-int8", one, 50, folder, sha,
                                                        flips=[_flip("glioma", "glioma", "notumor")])]))
    rep = gate(results)
    c = _class_rule(rep)
    assert c.status == PASS, c.message
    assert "exact McNemar" in c.message and "glioma (n=50, one image 2.00 pp: 1 lost / 0 gained, p=0.5)" in c.message
    assert c.details["rules"]["glioma"]["rule"] == "exact McNemar (one-sided)"
    assert c.details["rules"]["glioma"]["pairs"] == "paired predictions (flips)"
    md = markdown_summary(rep)
    assert "exact McNemar test on the paired predictions, fail at p < 0.05" in md  # the rule in force
    assert "decided by an exact McNemar test" in md  # and the note on small classes says so
    # the pp limit, as before: a single flip fails
    strict = gate(results, class_rule="threshold")
    assert _class_rule(strict).status == FAIL and "(-2.00 pp)" in _class_rule(strict).message


def test_a_real_loss_in_a_small_class_still_fails(tmp_path: Path, art: tuple[Path, str]) -> None:
    folder, sha = art
    five = [REF[0] - 5, *REF[1:]]
    # no flips listed: counted as 5 losses and no gains, p = 0.5**5 = 0.031
    results = _write(tmp_path / "r.json", _doc([_record("onnx-int8", five, 50, folder, sha)]))
    c = _class_rule(gate(results))
    assert c.status == FAIL and "5 lost / 0 gained, exact McNemar p=0.0312 < 0.05" in c.message
    assert "least favourable" in c.details["rules"]["glioma"]["pairs"]
    # a net loss of 2 with the flips listed: 5 lost and 3 gained is p=0.36
    flips = [_flip("glioma", "glioma", "notumor")] * 5 + [_flip("glioma", "meningioma", "glioma")] * 3
    two = [REF[0] - 2, *REF[1:]]
    c = _class_rule(gate(_write(tmp_path / "f.json", _doc([_record("onnx-int8", two, 50, folder, sha, flips)]))))
    assert c.status == PASS and "5 lost / 3 gained, p=0.363" in c.message
    # flips that contradict the recall are not trusted
    c = _class_rule(gate(_write(tmp_path / "x.json", _doc([_record("onnx-int8", five, 50, folder, sha, flips)]))))
    assert c.status == ERROR and "disagree" in c.message


def test_large_classes_keep_the_pp_limit(tmp_path: Path, art: tuple[Path, str]) -> None:
    folder, sha = art
    ref = [190, 180, 198, 192]
    doc = _doc([_record("onnx-int8", [187, 180, 198, 192], 200, folder, sha)], support=200)
    doc["reference"] = _record("reference-fp32", ref, 200)
    c = _class_rule(gate(_write(tmp_path / "r.json", doc)))
    assert c.status == FAIL and "McNemar" not in c.message and "(-1.50 pp)" in c.message


def test_cli_class_rule(tmp_path: Path, art: tuple[Path, str]) -> None:
    folder, sha = art
    one = [REF[0] - 1, *REF[1:]]
    results = _write(tmp_path / "r.json", _doc([_record("onnx-int8", one, 50, folder, sha)]))
    assert CliRunner().invoke(cli, ["gate", str(results)]).exit_code == 0
    r = CliRunner().invoke(cli, ["gate", str(results), "--class-rule", "threshold"])
    assert r.exit_code == 1, r.output
