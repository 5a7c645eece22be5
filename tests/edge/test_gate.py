"""The gate against results files built here (plus real artifact folders written with
edgebrain.artifact.write_manifest, so the hash check is the real one)."""

from __future__ import annotations

import copy
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgebrain.artifact import write_manifest
from edgebrain.cli import cli
from edgebrain.gate import (
    BASELINE_KIND,
    ERROR,
    FAIL,
    PASS,
    SKIP,
    GateError,
    gate,
    junit_xml,
    markdown_summary,
)
from edgebrain.preprocess import PreprocessSpec

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
SRC = "a" * 64
LIST_HASH = "b" * 64
SUPPORT = 100
FP = {"hostname": "runner-1", "os": "Linux", "cpu": "Test CPU 3000", "arch": "x86_64", "cores": 2,
      "isa": ["avx2"], "memory_mb": 8000, "packages": {"numpy": "2.4.6"}}


def make_artifact(root: Path, name: str, target: str = "tflite", precision: str = "int8",
                  source_sha: str = SRC, payload: bytes | None = None) -> tuple[Path, str]:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.tflite").write_bytes(payload if payload is not None else f"model {name}".encode() * 10)
    m = write_manifest(folder, {
        "name": name, "target": target, "precision": precision, "model_file": "model.tflite",
        "preprocess": PreprocessSpec.named("rescale", 32).to_dict(), "class_names": CLASSES,
        "input_shape": [32, 32, 3], "source": {"path": "model.keras", "sha256": source_sha, "format": "tf-keras"},
        "verification": {"passed": True},
    })
    return folder, m["artifact_sha256"]


def record(name: str, recalls: list[float], agreement: float = 1.0, p50: float = 10.0,
           folder: Path | None = None, sha: str | None = None, device: str = "host",
           fingerprint: dict[str, Any] | None = None, ci: list[float] | None = None,
           mcnemar: dict[str, Any] | None = None, target: str = "tflite", precision: str = "int8") -> dict[str, Any]:
    acc = sum(recalls) / len(recalls)  # equal support per class
    return {
        "artifact": str(folder) if folder else f"artifacts/{name}", "name": name,
        "artifact_sha256": sha or "c" * 64, "target": target, "precision": precision,
        "device": {"profile": device, "label": device, "fingerprint": dict(fingerprint or FP), "runtime": "ai-edge-litert 2.3.0",
                   "threads": 2, "ran_on": "CPU", "transport": "local"},
        "accuracy": acc, "accuracy_ci95": ci or [acc - 0.02, min(1.0, acc + 0.02)], "macro_f1": acc,
        "per_class": {c: {"precision": r, "recall": r, "f1": r, "support": SUPPORT} for c, r in zip(CLASSES, recalls)},
        "confusion_matrix": consistent_cm(recalls),
        "agreement": agreement, "mcnemar": mcnemar or {"b": 0, "c": 0, "p_value": 1.0}, "ece": 0.02,
        "flips": [], "dedup": None,
        "latency_ms": {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.3, "mean": p50, "std": 0.1, "n": 50},
        "throughput_ips": 1000 / p50, "cold_start_ms": 50.0, "e2e_ms": p50 + 2, "peak_rss_mb": 100.0,
        "size_bytes": 1000, "gzip_bytes": 900,
    }


def consistent_cm(recalls: list[float], support: int = SUPPORT) -> list[list[int]]:
    """A confusion matrix that agrees with the recalls (misses go to the next class)."""
    k = len(recalls)
    cm = [[0] * k for _ in range(k)]
    for i, r in enumerate(recalls):
        cm[i][i] = round(r * support)
        cm[i][(i + 1) % k] = support - cm[i][i]
    return cm


REF_RECALLS = [0.95, 0.90, 0.99, 0.96]


def results_doc(recs: list[dict[str, Any]], ref_recalls: list[float] | None = None,
                list_hash: str = LIST_HASH, src: str = SRC) -> dict[str, Any]:
    ref = record("reference", ref_recalls or REF_RECALLS, sha=src, target="tensorflow", precision="fp32")
    ref["artifact"] = "runs/lite/model.keras"
    ref["device"]["runtime"] = "tensorflow 2.21.0"
    return {
        "schema_version": 1, "kind": "edgebrain-bench-results", "created": "2025-01-01T00:00:00",
        "command": "edgebrain bench ...",
        "data": {"root": "/data", "split": "Testing", "n": SUPPORT * 4, "list_hash": list_hash, "dedup_n": 380,
                 "class_names": CLASSES, "failed": []},
        "reference": ref, "results": recs, "errors": [],
    }


def write(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture()
def arts(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    return {n: make_artifact(tmp_path / "artifacts", n, t, p)
            for n, t, p in [("tflite-int8", "tflite", "int8"), ("onnx-int8", "onnx", "int8")]}


def good_results(arts: dict[str, tuple[Path, str]], **kw: Any) -> dict[str, Any]:
    recs = []
    for name, (folder, sha) in arts.items():
        t, p = name.split("-")
        recs.append(record(name, [0.95, 0.90, 0.99, 0.96], agreement=0.995, folder=folder, sha=sha,
                           target=t, precision=p, **kw))
    return results_doc(recs)


def test_fixture_matches_the_bench_results_schema(arts: dict[str, tuple[Path, str]]) -> None:
    """The results built here are what bench writes (its JSON Schema), so the gate is tested on the contract."""
    from edgebrain.bench import validate_results

    validate_results(good_results(arts))


def statuses(rep: Any) -> dict[str, dict[str, str]]:
    return {s.key: {c.name: c.status for c in s.checks} for s in rep.subjects}


# ----------------------------------------------------------------------------- pass / each failing check


def test_pass_case(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    rep = gate(write(tmp_path / "r.json", good_results(arts)))
    assert rep.status == PASS and rep.exit_code == 0, markdown_summary(rep)
    (tmp_path / "bench").mkdir()
    write(tmp_path / "bench" / "results.json", good_results(arts))
    assert gate(tmp_path / "bench").exit_code == 0  # bench's --out folder works too
    st = statuses(rep)
    assert set(st) == {"tflite-int8@host", "onnx-int8@host"}
    for checks in st.values():
        assert checks["integrity"] == PASS
        assert checks["accuracy"] == checks["class_recall"] == checks["agreement"] == PASS
        assert checks["non_inferiority"] == SKIP and checks["latency"] == SKIP


def test_overall_accuracy_drop_fails(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    doc = good_results(arts)
    folder, sha = arts["tflite-int8"]
    # every class loses 0.75 pp: overall drop 0.75 pp > 0.5, each class drop 0.75 <= 1.0
    doc["results"][0] = record("tflite-int8", [r - 0.0075 for r in REF_RECALLS], 0.995, folder=folder, sha=sha)
    rep = gate(write(tmp_path / "r.json", doc))
    st = statuses(rep)
    assert st["tflite-int8@host"]["accuracy"] == FAIL
    assert st["tflite-int8@host"]["class_recall"] == PASS
    assert st["onnx-int8@host"]["accuracy"] == PASS
    assert rep.status == FAIL and rep.exit_code == 1
    c = rep.subjects[0].check("accuracy")
    assert c is not None and c.value == pytest.approx(0.75) and "0.5 pp" in c.message
    # a looser limit lets the same numbers through
    assert gate(tmp_path / "r.json", max_drop=1.0).exit_code == 0


def test_class_recall_drop_fails_even_when_average_holds(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    doc = good_results(arts)
    folder, sha = arts["tflite-int8"]
    # glioma loses 3 pp, notumor gains 1, pituitary gains 2 (capped at 1.0): overall unchanged
    doc["results"][0] = record("tflite-int8", [0.92, 0.90, 1.00, 0.98], 0.995, folder=folder, sha=sha)
    rep = gate(write(tmp_path / "r.json", doc))
    st = statuses(rep)["tflite-int8@host"]
    assert st["accuracy"] == PASS and st["class_recall"] == FAIL
    msg = rep.subjects[0].check("class_recall").message  # type: ignore[union-attr]
    assert "glioma" in msg and "meningioma" not in msg and "(-3.00 pp)" in msg
    assert rep.exit_code == 1


def test_agreement_fails(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    doc = good_results(arts)
    doc["results"][1]["agreement"] = 0.97
    rep = gate(write(tmp_path / "r.json", doc))
    assert statuses(rep)["onnx-int8@host"]["agreement"] == FAIL
    assert statuses(rep)["tflite-int8@host"]["agreement"] == PASS
    assert rep.exit_code == 1
    assert gate(tmp_path / "r.json", min_agreement=0.95).exit_code == 0


def test_min_accuracy_floor(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    # a reference that is itself bad: the artifacts match it, so only an absolute floor can say no
    poor = [0.5, 0.4, 0.6, 0.5]
    recs = [record(n, poor, 1.0, folder=f, sha=sh, target=n.split("-")[0]) for n, (f, sh) in arts.items()]
    p = write(tmp_path / "r.json", results_doc(recs, ref_recalls=poor))
    assert gate(p).exit_code == 0
    rep = gate(p, min_accuracy=0.9)
    assert all(st["min_accuracy"] == FAIL for st in statuses(rep).values()) and rep.exit_code == 1
    assert "50.00% < floor 90.00%" in rep.subjects[0].check("min_accuracy").message  # type: ignore[union-attr]
    assert gate(p, min_accuracy=0.5).exit_code == 0
    with pytest.raises(GateError):
        gate(p, min_accuracy=90)


def test_non_inferiority_ci(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    doc = good_results(arts)
    ref_acc = sum(REF_RECALLS) / 4
    doc["results"][0]["accuracy_ci95"] = [ref_acc - 0.03, ref_acc + 0.01]  # lower bound 3 pp below
    doc["results"][1]["accuracy_ci95"] = [ref_acc - 0.015, ref_acc + 0.01]
    p = write(tmp_path / "r.json", doc)
    assert gate(p).exit_code == 0  # off by default
    rep = gate(p, non_inferiority="ci", ni_margin=2.0)
    st = statuses(rep)
    assert st["tflite-int8@host"]["non_inferiority"] == FAIL
    assert st["onnx-int8@host"]["non_inferiority"] == PASS
    assert rep.exit_code == 1
    assert gate(p, non_inferiority="ci", ni_margin=3.5).exit_code == 0
    doc["results"][1]["accuracy_ci95"] = [0.9]
    assert statuses(gate(write(p, doc), non_inferiority="ci"))["onnx-int8@host"]["non_inferiority"] == ERROR


def test_non_inferiority_mcnemar(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    doc = good_results(arts)
    folder, sha = arts["tflite-int8"]
    # 12 images lost and 2 gained out of 400: acc 2.5 pp lower, McNemar p ~ 0.013
    lost = [r - 0.025 for r in REF_RECALLS]
    doc["results"][0] = record("tflite-int8", lost, 0.965, folder=folder, sha=sha,
                               mcnemar={"b": 12, "c": 2, "p_value": 0.0129})
    p = write(tmp_path / "r.json", doc)
    rep = gate(p, non_inferiority="mcnemar", max_drop=5, max_class_drop=5, min_agreement=0.9)
    st = statuses(rep)
    assert st["tflite-int8@host"]["non_inferiority"] == FAIL, rep.subjects[0].checks
    assert st["onnx-int8@host"]["non_inferiority"] == PASS
    assert rep.exit_code == 1
    assert gate(p, non_inferiority="mcnemar", alpha=0.01, max_drop=5, max_class_drop=5,
                min_agreement=0.9).exit_code == 0
    # counts that contradict the accuracies are not trusted
    doc["results"][0]["mcnemar"] = {"b": 2, "c": 12, "p_value": 0.0129}
    rep = gate(write(p, doc), non_inferiority="mcnemar", max_drop=5, max_class_drop=5, min_agreement=0.9)
    assert statuses(rep)["tflite-int8@host"]["non_inferiority"] == ERROR and rep.exit_code == 2


# ----------------------------------------------------------------------------- fails closed


def test_empty_results_file_fails_closed(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    p = tmp_path / "r.json"
    p.write_text("")
    rep = gate(p)
    assert rep.exit_code == 2 and "empty" in rep.errors[0]
    assert gate(tmp_path / "missing.json").exit_code == 2
    assert "results file not found" in gate(tmp_path).errors[0]  # a folder without results.json
    p.write_text("{not json")
    assert "not valid JSON" in gate(p).errors[0]
    doc = good_results(arts)
    doc["results"] = []
    rep = gate(write(p, doc))
    assert rep.exit_code == 2 and any("nothing to gate" in e for e in rep.errors)
    doc = good_results(arts)
    doc["kind"] = "something-else"
    assert gate(write(p, doc)).exit_code == 2


def test_artifact_bench_could_not_run_fails_closed(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    doc = good_results(arts)
    doc["errors"] = [{"artifact": "artifacts/openvino-int8", "name": "openvino-int8", "device": "host",
                      "error": "openvino is not installed"}]
    doc["warnings"] = ["onnx-int8: its model was trained on a different dataset version"]
    doc["results"][0]["device"]["warnings"] = ["profile says 4 cores, the device has 2"]
    rep = gate(write(tmp_path / "r.json", doc))
    assert rep.exit_code == 2
    bad = [s for s in rep.subjects if s.status == ERROR]
    assert [s.key for s in bad] == ["openvino-int8@host"]
    assert "openvino is not installed" in bad[0].checks[0].message
    md = markdown_summary(rep)
    assert "openvino is not installed" in md and "different dataset version" in md and "4 cores" in md


@pytest.mark.parametrize("path", ["accuracy", "agreement", "per_class.glioma.recall", "per_class.notumor"])
def test_missing_metric_fails_closed(tmp_path: Path, arts: dict[str, tuple[Path, str]], path: str) -> None:
    doc = good_results(arts)
    cur = doc["results"][0]
    *parents, last = path.split(".")
    for k in parents:
        cur = cur[k]
    del cur[last]
    rep = gate(write(tmp_path / "r.json", doc))
    assert rep.exit_code == 2, statuses(rep)
    errs = [c for s, c in rep.failures() if c.status == ERROR]
    assert errs and all(s is not None and s.name == "tflite-int8" for s, c in rep.failures())
    assert any(path.split(".")[-1] in c.message for c in errs)


@pytest.mark.parametrize("bad", [float("nan"), None, "0.9", 1.5, -0.1])
def test_non_finite_or_out_of_range_metric_fails_closed(tmp_path: Path, arts: dict[str, tuple[Path, str]],
                                                        bad: Any) -> None:
    doc = good_results(arts)
    doc["results"][1]["accuracy"] = bad
    p = tmp_path / "r.json"
    p.write_text(json.dumps(doc, allow_nan=True))
    rep = gate(p)
    assert statuses(rep)["onnx-int8@host"]["accuracy"] == ERROR and rep.exit_code == 2


def test_scored_on_different_images_fails_closed(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    doc = good_results(arts)
    doc["results"][0]["n"] = 399
    doc["reference"]["n"] = 400
    doc["data"]["failed"] = [{"file": "Testing/glioma/x.jpg", "problem": "truncated JPEG"}]
    rep = gate(write(tmp_path / "r.json", doc))
    c = rep.subjects[0].check("accuracy")
    assert c is not None and c.status == ERROR and "not a paired comparison" in c.message
    assert rep.subjects[1].check("accuracy").status == PASS  # type: ignore[union-attr]
    assert any("Testing/glioma/x.jpg" in n for n in rep.notes) and rep.exit_code == 2


def test_missing_reference_fails_closed(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    doc = good_results(arts)
    del doc["reference"]
    rep = gate(write(tmp_path / "r.json", doc))
    assert rep.exit_code == 2 and any("no reference" in e for e in rep.errors)
    assert all(c.status == ERROR for s in rep.subjects for c in s.checks if c.name == "accuracy")
    doc = good_results(arts)
    del doc["reference"]["per_class"]["pituitary"]["recall"]
    assert gate(write(tmp_path / "r.json", doc)).exit_code == 2


def test_tampered_artifact_fails_closed(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    p = write(tmp_path / "r.json", good_results(arts))
    assert gate(p).exit_code == 0
    folder, _ = arts["onnx-int8"]
    (folder / "model.tflite").write_bytes(b"swapped weights")
    rep = gate(p)
    st = statuses(rep)
    assert st["onnx-int8@host"]["integrity"] == ERROR and st["tflite-int8@host"]["integrity"] == PASS
    assert "does not match the manifest" in rep.subjects[1].check("integrity").message  # type: ignore[union-attr]
    assert rep.exit_code == 2
    # the numbers alone would have passed: only --no-artifact-check lets them through
    assert gate(p, artifact_check=False).exit_code == 0


def test_artifact_that_failed_verification_fails(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    folder = tmp_path / "rejected" / "tflite-int8.rejected"
    folder.mkdir(parents=True)
    (folder / "model.tflite").write_bytes(b"int8 model that disagreed with its source")
    m = write_manifest(folder, {
        "name": "tflite-int8", "target": "tflite", "precision": "int8", "model_file": "model.tflite",
        "preprocess": PreprocessSpec.named("rescale", 32).to_dict(), "class_names": CLASSES,
        "source": {"sha256": SRC}, "verification": {"passed": False, "top1_agreement": 0.41, "threshold": 0.99},
    })
    doc = good_results(arts)
    doc["results"][0]["artifact"], doc["results"][0]["artifact_sha256"] = str(folder), m["artifact_sha256"]
    rep = gate(write(tmp_path / "r.json", doc))
    c = rep.subjects[0].check("integrity")
    assert c is not None and c.status == FAIL and "failed verification" in c.message and rep.exit_code == 1


def test_result_measured_on_another_artifact_fails_closed(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    doc = good_results(arts)
    doc["results"][0]["artifact_sha256"] = "d" * 64  # folder re-converted since it was benchmarked
    rep = gate(write(tmp_path / "r.json", doc))
    assert statuses(rep)["tflite-int8@host"]["integrity"] == ERROR and rep.exit_code == 2
    # converted from another model than the reference
    other, sha = make_artifact(tmp_path / "other", "tflite-int8", source_sha="e" * 64)
    doc = good_results(arts)
    doc["results"][0]["artifact"], doc["results"][0]["artifact_sha256"] = str(other), sha
    rep = gate(write(tmp_path / "r.json", doc))
    msg = rep.subjects[0].check("integrity").message  # type: ignore[union-attr]
    assert rep.exit_code == 2 and "another model" in msg


def test_missing_artifact_folder(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    doc = good_results(arts)
    doc["results"][0]["artifact"] = str(tmp_path / "gone" / "tflite-int8")
    p = write(tmp_path / "r.json", doc)
    rep = gate(p)
    c = rep.subjects[0].check("integrity")
    assert c is not None and c.status == ERROR and "not found" in c.message and "--no-artifact-check" in c.message
    assert rep.exit_code == 2
    rep = gate(p, artifact_check=False)
    assert rep.exit_code == 0 and rep.subjects[0].check("integrity").status == SKIP  # type: ignore[union-attr]
    assert "OFF" in markdown_summary(rep)
    # relative paths resolve against --artifact-root
    doc["results"][0]["artifact"] = "tflite-int8"
    assert gate(write(p, doc), artifact_root=tmp_path / "artifacts").exit_code == 0


def test_usage_errors(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    p = write(tmp_path / "r.json", good_results(arts))
    with pytest.raises(GateError):
        gate(p, min_agreement=1.5)
    with pytest.raises(GateError):
        gate(p, max_drop=-1)
    with pytest.raises(GateError):
        gate(p, non_inferiority="bayes")
    with pytest.raises(GateError):
        gate(p, update_baseline=True)


# ----------------------------------------------------------------------------- baselines


def test_baseline_write_compare_and_latency(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    p = write(tmp_path / "r.json", good_results(arts))
    bpath = tmp_path / "ci" / "baseline.json"
    rep = gate(p, baseline=bpath, update_baseline=True)
    assert rep.exit_code == 0 and rep.baseline_written == str(bpath)
    b = json.loads(bpath.read_text())
    assert b["kind"] == BASELINE_KIND and b["source"]["sha256"] == SRC
    assert b["data"]["list_hash"] == LIST_HASH and b["data"]["n"] == 400
    assert {a["name"] for a in b["artifacts"]} == {"tflite-int8", "onnx-int8"}
    a0 = b["artifacts"][0]
    assert a0["device_fingerprint"] == {"profile": "host", "arch": "x86_64", "cpu": "Test CPU 3000", "cores": 2}
    assert a0["latency_ms"]["p50"] == 10.0 and a0["recall"]["glioma"] == pytest.approx(0.95)
    assert [f.name for f in bpath.parent.iterdir()] == ["baseline.json"]  # atomic: no temp files left

    rep = gate(p, baseline=bpath)
    assert rep.exit_code == 0
    assert all(st["latency"] == PASS and st["baseline_accuracy"] == PASS for st in statuses(rep).values())

    slow = good_results(arts, p50=16.0)  # x1.6 > 1.5
    rep = gate(write(tmp_path / "slow.json", slow), baseline=bpath)
    assert all(st["latency"] == FAIL for st in statuses(rep).values()) and rep.exit_code == 1
    assert "x1.60" in rep.subjects[0].check("latency").message  # type: ignore[union-attr]
    assert gate(tmp_path / "slow.json", baseline=bpath, max_latency_ratio=2.0).exit_code == 0


def test_baseline_accuracy_regression(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    folder, sha = arts["tflite-int8"]
    better = [r + 0.005 for r in REF_RECALLS]
    p = write(tmp_path / "r.json", results_doc([record("tflite-int8", better, 0.995, folder=folder, sha=sha)]))
    bpath = tmp_path / "baseline.json"
    assert gate(p, baseline=bpath, update_baseline=True).exit_code == 0
    # a later conversion: 0.4 pp below the reference (within limits) but 0.9 pp below what was approved
    later = [r - 0.004 for r in REF_RECALLS]
    p2 = write(tmp_path / "r2.json", results_doc([record("tflite-int8", later, 0.995, folder=folder, sha=sha)]))
    rep = gate(p2, baseline=bpath)
    st = statuses(rep)["tflite-int8@host"]
    assert st["accuracy"] == PASS and st["baseline_accuracy"] == FAIL and rep.exit_code == 1


def test_baseline_refuses_other_model_data_or_device(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    p = write(tmp_path / "r.json", good_results(arts))
    bpath = tmp_path / "baseline.json"
    gate(p, baseline=bpath, update_baseline=True)
    base = json.loads(bpath.read_text())

    def mismatch(edit: Any) -> str:
        b = copy.deepcopy(base)
        edit(b)
        bp = write(tmp_path / "b2.json", b)
        rep = gate(p, baseline=bp)
        assert rep.exit_code == 2
        assert all(st["latency"] == ERROR for st in statuses(rep).values())
        return " ".join(rep.errors)

    assert "source model sha256" in mismatch(lambda b: b["source"].update(sha256="f" * 64))
    assert "list_hash" in mismatch(lambda b: b["data"].update(list_hash="0" * 64))
    assert "class_names" in mismatch(lambda b: b["data"].update(class_names=CLASSES[:3]))
    msg = mismatch(lambda b: [a["device_fingerprint"].update(cpu="Raspberry Pi 4") for a in b["artifacts"]])
    assert "device 'host'" in msg and "cpu" in msg and "Raspberry Pi 4" in msg

    # an artifact that was never approved has nothing to compare with
    doc = good_results(arts)
    extra, sha = make_artifact(tmp_path / "artifacts", "openvino-int8", "openvino", "int8")
    doc["results"].append(record("openvino-int8", REF_RECALLS, 0.995, folder=extra, sha=sha,
                                 target="openvino", precision="int8"))
    rep = gate(write(tmp_path / "r3.json", doc), baseline=bpath)
    assert statuses(rep)["openvino-int8@host"]["latency"] == ERROR and rep.exit_code == 2
    # missing or foreign baseline files
    assert gate(p, baseline=tmp_path / "nope.json").exit_code == 2
    assert gate(p, baseline=write(tmp_path / "x.json", {"kind": "x"})).exit_code == 2


def test_update_baseline_refused_when_gate_fails(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    doc = good_results(arts)
    doc["results"][0]["agreement"] = 0.5
    bpath = tmp_path / "baseline.json"
    bpath.write_text("{\"kind\": \"previous\"}")
    rep = gate(write(tmp_path / "r.json", doc), baseline=bpath, update_baseline=True)
    assert rep.exit_code == 1 and rep.baseline_written is None
    assert json.loads(bpath.read_text()) == {"kind": "previous"}
    assert any("NOT written" in n for n in rep.notes)


# ----------------------------------------------------------------------------- reports


def test_junit_xml_parses_and_counts(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    doc = good_results(arts)
    doc["results"][0]["agreement"] = 0.9  # fail
    del doc["results"][1]["per_class"]["glioma"]["recall"]  # error
    rep = gate(write(tmp_path / "r.json", doc))
    root = ET.fromstring(junit_xml(rep))
    assert root.tag == "testsuites"
    cases = root.findall(".//testcase")
    assert len(cases) == 2 * 10  # artifact x device x check
    fails = root.findall(".//testcase/failure")
    errs = root.findall(".//testcase/error")
    assert len(fails) == 1 and "agreement" in fails[0].get("message", "")
    # the missing recall: class_recall cannot be computed, and the record no longer adds up
    assert len(errs) == 2 and all("glioma" in e.get("message", "") for e in errs)
    assert root.get("failures") == "1" and root.get("errors") == "2" and root.get("tests") == "20"
    assert int(root.get("skipped", "0")) == 2 * 4  # min accuracy, non-inferiority, baseline accuracy, latency
    suites = {s.get("name") for s in root.findall("testsuite")}
    assert suites == {"tflite-int8 @ host", "onnx-int8 @ host"}
    # results-level errors get their own suite
    root = ET.fromstring(junit_xml(gate(tmp_path / "nope.json")))
    assert root.get("errors") == "1" and root.find(".//testcase/error") is not None


def test_markdown_summary_content(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    doc = good_results(arts)
    doc["results"][0]["agreement"] = 0.9
    rep = gate(write(tmp_path / "r.json", doc))
    md = markdown_summary(rep)
    assert md.startswith("## ❌ edgebrain gate: FAIL")
    for needle in ("| max accuracy drop | 0.5 pp |", "| max per-class recall drop | 1 pp |",
                   "| min top-1 agreement | 0.99 |", "| non-inferiority | off |",
                   "| min accuracy (absolute) | off |", "tflite-int8", "onnx-int8",
                   "**tflite-int8@host** `agreement`", "0.9000 (< 0.99)", "Exit code 1", "n=400"):
        assert needle in md, needle
    # every artifact row has one cell per check + verdict
    rows = [ln for ln in md.splitlines() if ln.startswith("| tflite-int8 ") or ln.startswith("| onnx-int8 ")]
    assert len(rows) == 2 and all(r.count("|") == 17 for r in rows)
    ok = markdown_summary(gate(write(tmp_path / "ok.json", good_results(arts))))
    assert ok.startswith("## ✅ edgebrain gate: PASS") and "Why it did not pass" not in ok
    # one image per class is 1 pp here: the summary says so
    assert "one image" not in ok
    small = good_results(arts)
    for r in [small["reference"], *small["results"]]:
        for c in r["per_class"].values():
            c["support"] = 40
    assert "glioma 2.50 pp (n=40)" in markdown_summary(gate(write(tmp_path / "s.json", small)))


def test_report_dict_is_json(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    rep = gate(write(tmp_path / "r.json", good_results(arts)))
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["verdict"] == "pass" and d["exit_code"] == 0 and len(d["subjects"]) == 2
    assert not math.isnan(d["subjects"][0]["metrics"]["accuracy"])


# ----------------------------------------------------------------------------- CLI


def test_cli_help() -> None:
    r = CliRunner().invoke(cli, ["gate", "--help"])
    assert r.exit_code == 0, r.output
    for opt in ("--baseline", "--update-baseline", "--max-drop", "--max-class-drop", "--min-agreement",
                "--max-latency-ratio", "--junit", "--summary", "--no-artifact-check", "--non-inferiority"):
        assert opt in r.output
    assert "0 pass, 1 regression, 2" in r.output
    assert "gate" in CliRunner().invoke(cli, ["--help"]).output


def test_cli_exit_codes_and_reports(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    run = CliRunner().invoke
    ok = write(tmp_path / "ok.json", good_results(arts))
    junit, summary, rj = tmp_path / "out" / "junit.xml", tmp_path / "out" / "summary.md", tmp_path / "out" / "g.json"
    r = run(cli, ["gate", str(ok), "--junit", str(junit), "--summary", str(summary), "--json", str(rj)])
    assert r.exit_code == 0, r.output
    assert "gate: PASS" in r.output and "0.5 pp" in r.output
    assert ET.parse(junit).getroot().get("failures") == "0"
    assert summary.read_text().startswith("## ✅") and json.loads(rj.read_text())["verdict"] == "pass"

    bad = good_results(arts)
    bad["results"][0]["agreement"] = 0.9
    bad_p = write(tmp_path / "bad.json", bad)
    r = run(cli, ["gate", str(bad_p), "--junit", str(junit), "--summary", str(summary)])
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output and "agreement" in r.output
    assert ET.parse(junit).getroot().get("failures") == "1"
    assert run(cli, ["gate", str(bad_p), "--min-agreement", "0.8"]).exit_code == 0

    empty = tmp_path / "empty.json"
    empty.write_text("")
    r = run(cli, ["gate", str(empty), "--junit", str(junit)])
    assert r.exit_code == 2 and "empty" in r.output
    assert ET.parse(junit).getroot().get("errors") == "1"  # CI still gets a report

    assert run(cli, ["gate", str(ok), "--max-latency-ratio", "1.2"]).exit_code == 2  # needs --baseline
    assert run(cli, ["gate", str(ok), "--min-agreement", "2"]).exit_code == 2
    assert run(cli, ["gate", str(ok), "--update-baseline"]).exit_code == 2
    assert run(cli, ["gate", str(ok), "--no-such-option"]).exit_code == 2
    assert run(cli, ["gate"]).exit_code == 2

    bpath = tmp_path / "baseline.json"
    r = run(cli, ["gate", str(ok), "--baseline", str(bpath), "--update-baseline"])
    assert r.exit_code == 0 and bpath.is_file() and "baseline written" in r.output
    r = run(cli, ["gate", str(ok), "--baseline", str(bpath), "--max-latency-ratio", "1.2"])
    assert r.exit_code == 0, r.output
    other = good_results(arts)
    other["data"]["list_hash"] = "9" * 64
    r = run(cli, ["gate", str(write(tmp_path / "o.json", other)), "--baseline", str(bpath)])
    assert r.exit_code == 2 and "list_hash" in r.output


# ----------------------------------------------------------------------------- CI examples


def _commands(text: str, prog: str) -> list[list[str]]:
    """Every `edgebrain PROG ...` invocation in a CI file, continuation lines joined."""
    import shlex

    lines = text.splitlines()
    out = []
    for i, ln in enumerate(lines):
        head = ln.strip().lstrip("- ")
        if not (f"bin/edgebrain {prog} " in ln or head.startswith(f"edgebrain {prog} ")):
            continue
        indent = len(ln) - len(ln.lstrip())
        parts = [ln.split(f"edgebrain {prog} ", 1)[1]]
        j = i + 1
        while j < len(lines):
            nxt = lines[j]
            cont = parts[-1].rstrip().endswith("\\")
            deeper = len(nxt) - len(nxt.lstrip()) > indent and not nxt.lstrip().startswith(("- ", "#"))
            if not (cont or deeper) or not nxt.strip():
                break
            parts.append(nxt.strip())
            j += 1
        out.append(shlex.split(" ".join(p.rstrip("\\").strip() for p in parts)))
    return out


@pytest.mark.parametrize("name", ["github-actions.yml", "gitlab-ci.yml"])
def test_ci_examples_use_real_gate_options(name: str) -> None:
    from edgebrain.cli.gate import command

    text = (Path(__file__).resolve().parents[2] / "docs" / "ci" / name).read_text()
    cmds = _commands(text, "gate")
    assert cmds, f"no edgebrain gate call in {name}"
    for args in cmds:
        ctx = command.make_context("gate", list(args))  # raises on an unknown option
        assert ctx.params["junit"] is not None and ctx.params["summary"] is not None
        assert ctx.params["baseline"] is not None
    assert "junit" in text and "make venv artifacts/models/resnet50-lite-128/model.keras" in text and "$DATA" in text
    # the convert and bench steps use options those commands really have
    from edgebrain.cli.bench import command as bench_cmd
    from edgebrain.cli.convert import command as convert_cmd

    for prog, cmd in (("convert", convert_cmd), ("bench", bench_cmd)):
        calls = _commands(text, prog)
        assert calls, f"no edgebrain {prog} call in {name}"
        for args in calls:
            cmd.make_context(prog, list(args))


def test_gate_never_imports_tensorflow(tmp_path: Path, arts: dict[str, tuple[Path, str]]) -> None:
    """The gate runs in slim CI images: a whole gate run (CLI, reports) without TensorFlow."""
    import subprocess
    import sys

    p = write(tmp_path / "r.json", good_results(arts))
    code = (
        "import sys\n"
        "from edgebrain.cli import main\n"
        "try:\n"
        f"    main(['gate', {str(p)!r}, '--junit', {str(tmp_path / 'j.xml')!r}, '--summary', {str(tmp_path / 's.md')!r}])\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "assert 'tensorflow' not in sys.modules and 'tf_keras' not in sys.modules, 'TensorFlow was imported'\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
