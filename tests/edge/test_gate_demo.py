"""`make demo`: the model it picks, when it trains, what it reuses, and the summary it ends with."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgebrain import demo

ROOT = Path(__file__).resolve().parents[2]


def _fake_model(folder: Path, settings: dict[str, Any]) -> None:
    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(b"placeholder: choose_model only reads the card")
    training = {k: v for k, v in settings.items() if k != "variant"}
    (folder / "model_card.json").write_text(json.dumps({"variant": settings["variant"], "training": training}))


def _makefile_xception_settings() -> dict[str, Any]:
    """The demo model's `edgebrain train` line in the Makefile ($(XDEMO)), parsed."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if "train xception-ft" in ln and "--out $(XDEMO)" in ln)
    flags = dict(re.findall(r"--([a-z-]+) ([^\s-][^\s]*)", line))
    return {"variant": "xception-ft", "input_size": int(flags["size"]), "width": float(flags["width"]),
            "epochs": int(flags["epochs"]), "batch_size": int(flags["batch-size"]), "lr": float(flags["lr"]),
            "lr_schedule": flags["lr-schedule"], "patience": int(flags["patience"]), "seed": int(flags["seed"]),
            "flip": "--flip" in line, "out_dir": line.split("--out ")[1].split()[0]}


def test_demo_model_is_the_documented_makefile_model() -> None:
    """The demo trains exactly what `make models` builds as $(XDEMO) (README row (d)), into the
    same folder, so either command reuses the other's model."""
    mk = _makefile_xception_settings()
    assert mk.pop("out_dir") == "$(XDEMO)"
    assert "XDEMO := $(MODELS)/" + demo.DOCUMENTED_DIR in (ROOT / "Makefile").read_text()
    assert {k: v for k, v in demo.DOCUMENTED.items() if k != "per_class"} == mk
    assert demo.DOCUMENTED["per_class"] is None  # the whole Training split, not a quick subset


def test_documented_model_is_reused_when_settings_match(tmp_path: Path, capsys: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "train_documented", lambda *a: pytest.fail("must not train"))
    models = tmp_path / "models"
    _fake_model(models / demo.DOCUMENTED_DIR, demo.DOCUMENTED)
    path, how = demo.choose_model(models, tmp_path / "out", tmp_path / "data")
    assert how == "reused" and path == models / demo.DOCUMENTED_DIR / "model.keras"
    assert "REUSING the demo's model" in capsys.readouterr().out


def test_missing_model_is_trained_into_the_models_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained: list[Path] = []
    monkeypatch.setattr(demo, "train_documented", lambda folder, data: trained.append(folder))
    path, how = demo.choose_model(tmp_path / "models", tmp_path / "out", tmp_path / "data")
    assert how == "trained" and trained == [tmp_path / "models" / demo.DOCUMENTED_DIR]
    assert path == tmp_path / "models" / demo.DOCUMENTED_DIR / "model.keras"


def test_a_model_with_other_settings_is_never_overwritten(tmp_path: Path, capsys: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    trained: list[Path] = []
    monkeypatch.setattr(demo, "train_documented", lambda folder, data: trained.append(folder))
    models = tmp_path / "models"
    _fake_model(models / demo.DOCUMENTED_DIR, {**demo.DOCUMENTED, "epochs": 3})
    path, how = demo.choose_model(models, tmp_path / "out", tmp_path / "data")
    assert how == "trained" and trained == [tmp_path / "out" / "model"]
    assert "left alone" in capsys.readouterr().out
    # ... and the next run reuses the one it trained
    _fake_model(tmp_path / "out" / "model", demo.DOCUMENTED)
    path, how = demo.choose_model(models, tmp_path / "out", tmp_path / "data")
    assert how == "reused" and path == tmp_path / "out" / "model" / "model.keras"


def _rec(target: str, precision: str, acc: float, p50: float, agreement: float | None = None) -> dict[str, Any]:
    return {"name": f"m-{target}-{precision}", "target": target, "precision": precision, "accuracy": acc,
            "agreement": agreement, "size_bytes": 4_000_000 if precision == "fp32" else 1_000_000,
            "latency_ms": {"p50": p50}}


def test_summary_rows_compare_int8_with_the_same_runtime() -> None:
    doc = {"results": [_rec("tflite", "fp32", 0.97, 4.0), _rec("tflite", "int8", 0.968, 1.0, 0.995),
                       _rec("onnx", "fp32", 0.97, 3.0), _rec("onnx", "int8", 0.97, 2.0, 0.999)]}
    statuses = {"m-tflite-fp32": "pass", "m-tflite-int8": "pass", "m-onnx-fp32": "pass", "m-onnx-int8": "fail"}
    rows = demo.summary_rows(doc, statuses, ["openvino int8: top-1 agreement 0.95 < 0.99"])
    assert rows[0] == ["tflite", "97.00 %", "96.80 %", "99.50 %", "4.00 MB -> 1.00 MB", "4.00 -> 1.00 ms",
                       "4.00x", "PASS"]
    assert rows[1][-1] == "FAIL" and rows[1][6] == "1.50x"
    assert rows[2][-1] == "REJECTED"  # rejected at conversion is never a pass


def test_demo_help_and_missing_data(tmp_path: Path) -> None:
    r = CliRunner().invoke(demo.main, ["--help"])
    assert r.exit_code == 0 and "--data" in r.output and "gate" in r.output
    r = CliRunner().invoke(demo.main, ["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "dataset not found" in r.output
