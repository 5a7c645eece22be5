"""`make demo` picks the documented model only when it really is the documented one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from edgebrain import demo


def _fake_model(folder: Path, settings: dict[str, Any]) -> None:
    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(b"placeholder: choose_model only reads the card")
    training = {k: v for k, v in settings.items() if k != "variant"}
    (folder / "model_card.json").write_text(json.dumps({"variant": settings["variant"], "training": training}))


def test_documented_model_is_used_when_settings_match(tmp_path: Path, capsys: Any) -> None:
    models = tmp_path / "models"
    _fake_model(models / demo.DOCUMENTED_DIR, demo.DOCUMENTED)
    path, kind = demo.choose_model(models, tmp_path / "out", tmp_path / "data")
    assert kind == "documented" and path == models / demo.DOCUMENTED_DIR / "model.keras"
    assert "documented resnet50-lite at 128 px" in capsys.readouterr().out


def test_other_settings_fall_back_to_the_quick_model(tmp_path: Path, capsys: Any) -> None:
    models = tmp_path / "models"
    _fake_model(models / demo.DOCUMENTED_DIR, {**demo.DOCUMENTED, "epochs": 3})
    # an already trained quick model is reused (nothing is trained here)
    _fake_model(tmp_path / "out" / "model-quick", demo.QUICK)
    path, kind = demo.choose_model(models, tmp_path / "out", tmp_path / "data")
    out = capsys.readouterr().out
    assert kind == "quick" and path == tmp_path / "out" / "model-quick" / "model.keras"
    assert "epochs=3 (documented 30)" in out and "QUICKER model" in out and "reusing" in out


def test_demo_help_and_missing_data(tmp_path: Path) -> None:
    r = CliRunner().invoke(demo.main, ["--help"])
    assert r.exit_code == 0 and "--data" in r.output and "gate" in r.output
    r = CliRunner().invoke(demo.main, ["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "dataset not found" in r.output
