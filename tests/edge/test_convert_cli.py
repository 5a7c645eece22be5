"""``edgebrain convert`` from the command line: help, skips, verification failures, tampering,
calibration overlap and interrupted conversions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgebrain import data as D
from edgebrain.artifact import load_manifest
from edgebrain.cli import cli
from edgebrain.convert import LOCK_FILE
from edgebrain.converters import TARGETS
from edgebrain.converters.onnx_target import ONNXTarget
from edgebrain.errors import IntegrityError


class BrokenTarget(ONNXTarget):
    """An ONNX target whose conversion silently corrupts the classifier (flips the last layer)."""

    name = "broken"
    precisions = ("fp32",)

    def build(self, ctx: Any, precision: str, out: Path) -> Any:
        import onnx
        from onnx import numpy_helper

        built = super().build(ctx, precision, out)
        m = onnx.load(str(out / built.model_file))
        last = [t for t in m.graph.initializer if len(t.dims) == 2][-1]
        w = numpy_helper.to_array(last)
        last.CopyFrom(numpy_helper.from_array(-w * 5.0, last.name))
        onnx.save(m, str(out / built.model_file))
        return built


class CrashingTarget(ONNXTarget):
    name = "crashing"
    precisions = ("fp32",)
    exc: type[BaseException] = RuntimeError

    def build(self, ctx: Any, precision: str, out: Path) -> Any:
        (out / "model.onnx").write_bytes(b"half a model")
        raise self.exc("the converter died half-way")


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, ["convert", *[str(a) for a in args]], catch_exceptions=False)


def test_convert_help() -> None:
    res = CliRunner().invoke(cli, ["convert", "--help"])
    assert res.exit_code == 0
    for flag in ("--to", "--precision", "--calib", "--calib-size", "--prune", "--out", "--verify-n",
                 "--min-agreement", "--allow-overlap", "--unsafe", "--max-drop", "--onnx-format"):
        assert flag in res.output


def test_every_target_option_has_a_flag() -> None:
    """A target option without a flag could only be set from Python (e.g. --strip-names, --equalize)."""
    from edgebrain.cli.convert import command
    from edgebrain.convert import target_options

    params = {p.name for p in command.params}
    missing = set(target_options()) - params
    assert not missing, missing
    res = CliRunner().invoke(cli, ["convert", "--help"])
    assert "--keep-names" in res.output and "--no-equalize" in res.output


@pytest.mark.slow
def test_convert_fp32_and_skip_unsupported(tiny_model: Path, data_dir: Path, tmp_path: Path,
                                           cache_env: Path) -> None:
    out = tmp_path / "arts"
    res = _invoke(tiny_model, "--to", "onnx", "--precision", "fp32,bf16", "--out", out, "--verify-n", "8",
                  "--data", data_dir)
    assert res.exit_code == 0, res.output
    assert "skipped" in res.output and "bf16" in res.output
    art = load_manifest(out / "onnx-fp32")
    m = art.manifest
    assert m["verification"]["passed"] and m["verification"]["n"] == 8
    assert m["command"].startswith("edgebrain convert ") and "--precision fp32,bf16" in m["command"]
    assert not (out / "onnx-bf16").exists()
    summary = json.loads((out / "convert_summary.json").read_text())
    assert summary["skipped"][0]["precision"] == "bf16" and summary["skipped"][0]["reason"]
    # an existing artifact is not overwritten by accident
    res = _invoke(tiny_model, "--to", "onnx", "--precision", "fp32", "--out", out, "--verify-n", "8")
    assert res.exit_code != 0 and "--overwrite" in res.output

    # tampering: any change to the model file is refused downstream
    tampered = tmp_path / "tampered"
    shutil.copytree(out / "onnx-fp32", tampered)
    with open(tampered / "model.onnx", "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    with pytest.raises(IntegrityError, match="does not match the manifest"):
        load_manifest(tampered)


@pytest.mark.slow
def test_verification_failure_moves_artifact_aside(tiny_model: Path, data_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, cache_env: Path) -> None:
    monkeypatch.setitem(TARGETS, "broken", BrokenTarget())
    out = tmp_path / "arts"
    res = _invoke(tiny_model, "--to", "broken,onnx", "--precision", "fp32", "--out", out, "--verify-n", "16",
                  "--data", data_dir)
    assert res.exit_code == 1, res.output
    assert "rejected" in res.output.lower()
    assert not (out / "broken-fp32").exists()
    rejected = out / "broken-fp32.rejected"
    m = json.loads((rejected / "manifest.json").read_text())
    assert m["verification"]["passed"] is False
    with pytest.raises(IntegrityError, match="failed verification"):
        load_manifest(rejected)
    load_manifest(out / "onnx-fp32")  # the good target in the same run is still written


@pytest.mark.slow
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_crash_leaves_no_half_artifact(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       exc: type[BaseException]) -> None:
    t = CrashingTarget()
    t.exc = exc
    monkeypatch.setitem(TARGETS, "crashing", t)
    out = tmp_path / "arts"
    if exc is KeyboardInterrupt:
        from edgebrain.convert import convert

        with pytest.raises(KeyboardInterrupt):
            convert(tiny_model, "crashing", "fp32", out, verify_n=4)
    else:
        res = _invoke(tiny_model, "--to", "crashing", "--precision", "fp32", "--out", out, "--verify-n", "4")
        assert res.exit_code == 1 and "died half-way" in res.output
    assert not (out / "crashing-fp32").exists()
    # the folder lock stays (removing a lock file races with a second run); nothing else may be left
    assert [p.name for p in out.iterdir() if p.name not in ("convert_summary.json", LOCK_FILE)] == []


@pytest.mark.slow
def test_calibration_overlap_refused_from_cli(tiny_model: Path, data_dir: Path, dataset: D.Dataset,
                                             tmp_path: Path, cache_env: Path) -> None:
    calib = tmp_path / "calib" / "glioma"
    calib.mkdir(parents=True)
    leak = dataset.split("Testing")[0]
    shutil.copy2(leak.path, calib / "innocent-name.jpg")
    out = tmp_path / "arts"
    res = _invoke(tiny_model, "--to", "onnx", "--precision", "int8", "--out", out, "--calib", tmp_path / "calib",
                  "--data", data_dir)
    assert res.exit_code != 0
    assert "evaluation set" in res.output and "innocent-name.jpg" in res.output
    assert not (out / "onnx-int8").exists()


@pytest.mark.slow
def test_clear_errors(tmp_path: Path, tiny_model: Path) -> None:
    res = _invoke(tmp_path / "nope.keras", "--to", "onnx", "--precision", "fp32", "--out", tmp_path / "o")
    assert res.exit_code != 0 and "model not found" in res.output
    res = _invoke(tiny_model, "--to", "coreml", "--precision", "fp32", "--out", tmp_path / "o")
    assert res.exit_code != 0 and "unknown target" in res.output
    res = _invoke(tiny_model, "--to", "onnx", "--precision", "int4", "--out", tmp_path / "o")
    assert res.exit_code != 0 and "unknown precision" in res.output
    res = _invoke(tiny_model, "--to", "tflite", "--precision", "bf16", "--out", tmp_path / "o")
    assert res.exit_code != 0 and "nothing to convert" in res.output
    broken = tmp_path / "broken-card"
    shutil.copytree(tiny_model.parent, broken)
    card = json.loads((broken / "model_card.json").read_text())
    del card["class_names"]
    (broken / "model_card.json").write_text(json.dumps(card))
    res = _invoke(broken / "model.keras", "--to", "onnx", "--precision", "fp32", "--out", tmp_path / "o")
    assert res.exit_code != 0 and "model_card.json: not a valid model card (missing 'class_names')" in res.output
    assert "Traceback" not in res.output


class FlakyInt8Target(BrokenTarget):
    """ONNX int8 whose default build corrupts the classifier; its fallback setting builds it right."""

    name = "flaky"
    precisions = ("int8",)
    options = {"flaky_fix": False}
    int8_fallbacks = [{"flaky_fix": True}]
    int8_candidates: list[dict[str, Any]] = []

    def int8_fallbacks_for(self, ctx: Any) -> list[dict[str, Any]]:
        return list(self.int8_fallbacks)  # only its own fix, not ONNX's per-channel fallback

    def build(self, ctx: Any, precision: str, out: Path) -> Any:
        import numpy as np
        import onnx
        from onnx import numpy_helper

        built = ONNXTarget.build(self, ctx, precision, out)
        if not ctx.options.get("flaky_fix"):  # negate the classifier's (int8) weights
            m = onnx.load(str(out / built.model_file))
            last = [t for t in m.graph.initializer if len(t.dims) == 2][-1]
            w = numpy_helper.to_array(last)
            flipped = np.clip(-w.astype(np.int32), -127, 127).astype(w.dtype) if w.dtype.kind in "iu" else -w
            last.CopyFrom(numpy_helper.from_array(flipped, last.name))
            onnx.save(m, str(out / built.model_file))
        return built

    def load(self, artifact: Any, threads: int | None = None) -> Any:
        from edgebrain.runtime import ONNXRunner

        return ONNXRunner(artifact.model_file, threads=threads)


def test_int8_fallback_is_chosen_on_validation_and_recorded(trained_small: Path, data_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, cache_env: Path) -> None:
    """A really trained model: the corrupted default int8 disagrees, the fallback agrees."""
    monkeypatch.setitem(TARGETS, "flaky", FlakyInt8Target())
    out = tmp_path / "arts"
    res = _invoke(trained_small, "--to", "flaky", "--precision", "int8", "--out", out, "--verify-n", "24",
                  "--calib-size", "16", "--data", data_dir, "--min-agreement", "0.5")
    assert res.exit_code == 0, res.output
    m = load_manifest(out / "flaky-int8").manifest
    fb = m["quantization"]["fallback"]
    assert fb["chosen"] == "flaky_fix=True"
    first, second = fb["attempts"]
    assert first["settings"] == "default" and second["settings"] == "flaky_fix=True"
    assert second["top1_agreement"] > first["top1_agreement"]
    assert m["verification"]["top1_agreement"] == pytest.approx(second["top1_agreement"], abs=1e-6)
    assert any("fallback chosen" in w for w in m["warnings"])
    # a target that is only a module in converters/ is loaded through its own Target.load
    from edgebrain.runtime import ONNXRunner, load_runner

    assert isinstance(load_runner(load_manifest(out / "flaky-int8")), ONNXRunner)
    # turned off: the default build stands (and is rejected by verification here)
    res = _invoke(trained_small, "--to", "flaky", "--precision", "int8", "--out", tmp_path / "off", "--verify-n", "24",
                  "--calib-size", "16", "--data", data_dir, "--min-agreement", "0.9", "--int8-fallback-below", "0")
    assert res.exit_code == 1, res.output
    assert (tmp_path / "off" / "flaky-int8.rejected").is_dir()


@pytest.mark.slow
def test_int8_search_keeps_the_best_calibration_on_validation(trained_small: Path, data_dir: Path,
                                                              tmp_path: Path, cache_env: Path) -> None:
    """ONNX int8 builds min/max and percentile ranges, keeps the one that agrees best with the
    source on the validation images (ties: lower mean KL), and records both; a method the user
    chose is never replaced; --no-int8-search builds the default only."""
    common = ["--to", "onnx", "--precision", "int8", "--verify-n", "48", "--calib-size", "32", "--data", data_dir,
              "--min-agreement", "0.5", "--int8-fallback-below", "0"]
    res = _invoke(trained_small, *common, "--out", tmp_path / "s")
    assert res.exit_code == 0, res.output
    m = load_manifest(tmp_path / "s" / "onnx-int8").manifest
    sel = m["quantization"]["selection"]
    assert [a["settings"] for a in sel["attempts"]] == ["default", "calib_method=percentile"]
    default, pct = sel["attempts"]
    assert default["mean_kl"] != pct["mean_kl"]  # two different builds were measured
    best = max(sel["attempts"], key=lambda a: (a["top1_agreement"], -a["mean_kl"]))
    assert sel["chosen"] == best["settings"]
    assert m["calibration"]["method"] == ("percentile" if best is pct else "minmax")
    assert m["verification"]["mean_kl"] == pytest.approx(best["mean_kl"], rel=1e-5)
    assert m["verification"]["top1_agreement"] == pytest.approx(best["top1_agreement"], abs=1e-6)
    assert m["verification"]["selected_on_these_images"] is True  # the optimism is stated
    assert m["verification"]["evidence"] == "validation split"
    assert "fallback" not in m["quantization"]
    assert len([p for p in (tmp_path / "s").iterdir() if p.name.startswith("onnx-int8")]) == 1

    res = _invoke(trained_small, *common, "--calib-method", "minmax", "--out", tmp_path / "mm")
    assert res.exit_code == 0, res.output
    mm = load_manifest(tmp_path / "mm" / "onnx-int8").manifest
    assert mm["calibration"]["method"] == "minmax"
    assert mm["quantization"]["selection"]["attempts"][1]["skipped"] == "set explicitly: calib_method"
    assert mm["quantization"]["selection"]["chosen"] == "default"

    res = _invoke(trained_small, *common, "--no-int8-search", "--out", tmp_path / "off")
    assert res.exit_code == 0, res.output
    off = load_manifest(tmp_path / "off" / "onnx-int8").manifest
    assert "selection" not in off["quantization"] and off["calibration"]["method"] == "minmax"
    assert "selected_on_these_images" not in off["verification"]  # one build: an unbiased check
    assert off["verification"]["mean_kl"] == pytest.approx(default["mean_kl"], rel=1e-5)
    assert "--no-int8-search" in off["command"]
