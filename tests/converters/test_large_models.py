"""Large models: int8 calibration in bounded memory, a clear refusal when it cannot fit, the memory
figure in the summary and manifests, and --time-budget stopping the int8 search cleanly.

Tiny models here (plumbing); benchmarks/large_model_memory.py measures the VGG16 at 240 px."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def _tiny(tmp_path: Path, data_dir: Path) -> Path:
    from edgebrain.modelcard import ModelCard
    from edgebrain.preprocess import PreprocessSpec
    from edgebrain.tfenv import import_tf

    k = import_tf().keras
    inp = k.Input((32, 32, 3))
    x = k.layers.Conv2D(8, 3, activation="relu")(inp)
    x = k.layers.Conv2D(8, 3, activation="relu")(x)
    x = k.layers.GlobalAveragePooling2D()(x)
    src = tmp_path / "m"
    src.mkdir()
    k.Model(inp, k.layers.Dense(4, activation="softmax", name="predictions")(x)).save(src / "model.keras")
    ModelCard("custom", CLASSES, PreprocessSpec.named("rescale", 32), [32, 32, 3],
              data={"root": str(data_dir), "split_seed": 42}).save(src)
    return src


@pytest.fixture(scope="module")
def tiny_src(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny(tmp_path_factory.mktemp("large"), data_dir)


COMMON: dict[str, Any] = dict(calib_size=24, verify_n=16, min_agreement=0.01, int8_fallback_below=None,
                              int8_search=False)


def _scales(model_file: Path) -> dict[str, float]:
    import onnx
    from onnx import numpy_helper

    out = {}
    for init in onnx.load(str(model_file)).graph.initializer:
        a = numpy_helper.to_array(init)
        if init.name.endswith("_scale") and a.size == 1:
            out[init.name] = float(a)
    return out


def test_histogram_calibration_runs_a_few_images_at_a_time(tiny_src: Path, tmp_path: Path, cache_env: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """quantize_static keeps every calibration image's activations until the end (24.4 GB for a VGG16
    at 240 px with percentile ranges); the ONNX target feeds the calibrator passes that fit the step
    budget."""
    from onnxruntime.quantization import calibrate

    from edgebrain.convert import convert

    seen: list[int] = []
    orig = calibrate.HistogramCalibrater.collect_data

    def spy(self: Any, reader: Any) -> None:
        # count the images this call holds at once (the reader is drained inside one call)
        class Counting:
            def get_next(self_inner) -> Any:
                item = reader.get_next()
                if item:
                    seen_now.append(len(next(iter(item.values()))))
                return item

        seen_now: list[int] = []
        orig(self, Counting())
        seen.append(sum(seen_now))

    monkeypatch.setattr(calibrate.HistogramCalibrater, "collect_data", spy)
    monkeypatch.setenv("EDGEBRAIN_STEP_MEMORY_MB", "1")
    art = convert(tiny_src, "onnx", "int8", tmp_path / "p", calib_method="percentile", **COMMON)[0]
    st = art.manifest["quantization"]["calibration_streaming"]
    assert seen and max(seen) == st["images_per_pass"] < 24
    assert sum(seen) == 24 and len(seen) == st["passes"]
    per = st["activation_mb_per_image"]
    assert st["held_mb_per_pass"] <= 1.0 + 1e-6 and per > 0 and st["budget_mb"] == 1.0
    assert st["all_images_at_once_mb"] == pytest.approx(per * 24, rel=0.05)


def test_min_max_ranges_do_not_depend_on_the_pass_size(tiny_src: Path, tmp_path: Path, cache_env: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from edgebrain.convert import convert

    kw = dict(COMMON, strip_names=False, calib_method="minmax")
    big = convert(tiny_src, "onnx", "int8", tmp_path / "big", **kw)[0]
    monkeypatch.setenv("EDGEBRAIN_STEP_MEMORY_MB", "0.05")
    small = convert(tiny_src, "onnx", "int8", tmp_path / "small", **kw)[0]
    assert small.manifest["quantization"]["calibration_streaming"]["images_per_pass"] == 1
    assert big.manifest["quantization"]["calibration_streaming"]["images_per_pass"] > 1
    a, b = _scales(big.model_file), _scales(small.model_file)
    # (tf2onnx numbers some node names differently in each export: compare the scales themselves)
    assert len(a) >= 3 and len(a) == len(b)
    assert sorted(a.values()) == pytest.approx(sorted(b.values()), rel=1e-6)


def test_calibration_that_cannot_fit_is_refused_with_a_message(tiny_src: Path, tmp_path: Path, cache_env: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from edgebrain import memory
    from edgebrain.convert import ConvertFailed, convert

    monkeypatch.setattr(memory, "available_bytes", lambda: 10_000)
    with pytest.raises(ConvertFailed) as ei:
        convert(tiny_src, "onnx", "int8", tmp_path / "o", **COMMON)
    err = ei.value.summary["failed"][0]["error"]
    assert "onnx int8 calibration" in err and "needs about" in err and "available" in err
    assert json.loads((tmp_path / "o" / "convert_summary.json").read_text())["failed"]
    assert not list((tmp_path / "o").glob(".convert-work-*"))


def test_memory_figure_in_summary_and_manifest(tiny_src: Path, tmp_path: Path, cache_env: Path) -> None:
    from edgebrain.convert import convert

    arts = convert(tiny_src, "onnx", "fp32,int8", tmp_path / "o", **COMMON)
    summary = json.loads((tmp_path / "o" / "convert_summary.json").read_text())
    mem = summary["memory"]
    assert mem["peak_rss_mb"] > 50 and "VmHWM" in mem["measured"]
    for a in arts:
        m = a.manifest["memory"]
        assert 50 < m["peak_rss_mb"] <= mem["peak_rss_mb"]
        assert mem["per_artifact_mb"][a.path.name] == m["peak_rss_mb"]
    assert summary["time_budget"] is None


@pytest.mark.slow
def test_time_budget_stops_the_int8_search_and_keeps_the_verified_build(
        tiny_src: Path, tmp_path: Path, cache_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget runs out during the first int8 build: the percentile candidate is not tried, the
    verified default build is written, and the target after it is reported as not started."""
    from edgebrain.convert import ConvertFailed, convert
    from edgebrain.converters.onnx_target import ONNXTarget

    orig = ONNXTarget.build

    def build(self: Any, ctx: Any, precision: str, out: Path) -> Any:
        b = orig(self, ctx, precision, out)
        ctx.deadline.seconds = 1e-6  # spent from now on
        return b

    monkeypatch.setattr(ONNXTarget, "build", build)
    kw = dict(COMMON, int8_search=True)
    with pytest.raises(ConvertFailed) as ei:
        convert(tiny_src, "onnx,openvino", "int8", tmp_path / "o", time_budget=3600, **kw)
    s = ei.value.summary
    (art,) = ei.value.artifacts
    sel = art.manifest["quantization"]["selection"]
    assert sel["chosen"] == "default"
    assert any("time budget" in a.get("skipped", "") for a in sel["attempts"])
    assert art.manifest["verification"]["passed"]
    assert [f["target"] for f in s["failed"]] == ["openvino"]
    assert "not started: the time budget" in s["failed"][0]["error"]
    assert s["time_budget"]["spent"] is True


@pytest.mark.slow
def test_accuracy_control_stops_at_the_budget(tiny_src: Path, tmp_path: Path, cache_env: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """NNCF accuracy control (the OpenVINO int8 fallback) reports progress and stops at its next
    evaluation once the budget is spent; the verified plain int8 build is kept."""
    from edgebrain.convert import convert
    from edgebrain.converters.openvino_target import OpenVINOTarget

    orig = OpenVINOTarget.build
    calls: list[dict[str, Any]] = []

    def build(self: Any, ctx: Any, precision: str, out: Path) -> Any:
        calls.append(dict(ctx.options))
        if ctx.options.get("max_drop") is not None:
            ctx.deadline.seconds = 1e-6  # spent while accuracy control runs
        return orig(self, ctx, precision, out)

    monkeypatch.setattr(OpenVINOTarget, "build", build)
    kw = dict(COMMON, int8_fallback_below=1.01)  # every build is below: the fallback runs
    (art,) = convert(tiny_src, "openvino", "int8", tmp_path / "o", time_budget=3600, **kw)
    assert any(c.get("max_drop") is not None for c in calls)
    fb = art.manifest["quantization"]["fallback"]
    stopped = [a for a in fb["attempts"] if "stopped" in a]
    assert stopped and "accuracy-control evaluation" in stopped[0]["stopped"]
    assert art.manifest["quantization"]["method"] == "nncf.quantize"
    assert art.manifest["verification"]["passed"]


def test_budgeted_validation_reports_and_stops(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from edgebrain.converters.openvino_target import _budgeted_validation
    from edgebrain.progress import BudgetExpired, Deadline

    monkeypatch.delenv("EDGEBRAIN_QUIET", raising=False)

    class Compiled:
        def output(self, i: int) -> int:
            return 0

        def __call__(self, x: np.ndarray) -> dict[int, np.ndarray]:
            return {0: np.array([[0.1, 0.9]])}

    d = Deadline(3600)
    validate = _budgeted_validation(d, 2)
    acc, per = validate(Compiled(), [(None, 1), (None, 0)])
    assert acc == 0.5 and per == [1.0, 0.0]
    assert "accuracy control" in capsys.readouterr().err  # the first evaluation is reported at once
    d.seconds = 1e-6
    with pytest.raises(BudgetExpired, match="time budget"):
        validate(Compiled(), [(None, 1)])


def test_inference_batches_follow_the_activation_size(tiny_src: Path, tmp_path: Path, cache_env: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Verification and reference outputs ran 32 / 64 images at once: 4 to 8 GB of activations for
    a VGG16 at 240 px. The batch now follows the model's activation size and the step budget."""
    from edgebrain.converters.base import activation_bytes, inference_batch
    from edgebrain.converters.source import load_source

    src = load_source(tiny_src, workdir=tmp_path)
    per = activation_bytes(src)
    # 32x32x3 input, two 8-channel convolutions (30x30, 28x28), pooled features and the head
    assert per == 4 * (32 * 32 * 3 + 30 * 30 * 8 + 28 * 28 * 8 + 8 + 4)
    assert inference_batch(src) == 64
    # the runtime's working memory counts as twice the activations
    monkeypatch.setenv("EDGEBRAIN_STEP_MEMORY_MB", str(20 * per / 2**20))
    assert inference_batch(src) == 10 and inference_batch(src, most=4) == 4
    monkeypatch.setenv("EDGEBRAIN_STEP_MEMORY_MB", "0.001")
    assert inference_batch(src) == 1

