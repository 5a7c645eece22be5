"""Conformance zoo: keras.applications networks as users bring them (Keras 3 / tf-keras, nested /
flattened base, ONNX exports NHWC / NCHW, fixed / dynamic batch) through convert -> bench ->
predict. The models are built offline (benchmarks/zoo_models.py, weights=None) and briefly fitted
on real images so that int8 agreement means something.

Fast subset (make test): one small Keras 3 MobileNetV2 in the fine-tuning layout, converted once
to every target at fp32 and int8 and reused by the bench / predict / raw-ONNX checks. The whole
zoo (every architecture x format x layout, and the ONNX exports) is marked ``zoo``: make test-zoo.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from edgebrain.cli import cli

ROOT = Path(__file__).resolve().parents[2]
CLASSES = "glioma,meningioma,notumor,pituitary"


def _bench_module(name: str) -> Any:
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _cli(args: list[str]) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _images(data_dir: Path, n: int = 2) -> list[Path]:
    return sorted((data_dir / "Testing" / "meningioma").glob("*.jpg"))[:n]


# --------------------------------------------------------------------------- fast subset


@pytest.fixture(scope="module")
def mnv2(data_dir: Path, cache_env: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A Keras 3 MobileNetV2 (alpha 0.35, 32 px, nested base, Keras 'tf' preprocessing), fitted
    briefly on 160 real images; its ONNX export (input 'pixel_values', dynamic batch); and one
    convert run to tflite, onnx and openvino at fp32 and int8."""
    Z = _bench_module("zoo_models")
    root = tmp_path_factory.mktemp("zoo")
    es = Z.build_family("mobilenetv2", 32, root, data_dir, fit_per_class=40, epochs=2, formats=("keras3",),
                        layouts=("nested",), onnx=({"nchw": False, "dynamic_batch": True},
                                                   {"nchw": True, "dynamic_batch": False, "input_name": "input.1"}))
    by = {e.id: e for e in es}
    src = by["mobilenetv2-keras3-nested"].path
    out = root / "converted"
    res = _cli(["convert", src, "--to", "tflite,onnx,openvino", "--precision", "fp32,int8", "--data", data_dir,
                "--calib-size", 64, "--verify-n", 64, "--no-int8-search", "--int8-fallback-below", 0.5,
                "--preprocess", "xception", "--classes", CLASSES, "--out", out])
    return {"src": src, "out": out, "convert": res, "root": root,
            "onnx_nhwc": by["mobilenetv2-onnx-nhwc-dynbatch"].path, "onnx_nchw": by["mobilenetv2-onnx-nchw-batch1"].path}


def _built(mnv2: dict[str, Any]) -> list[Path]:
    return sorted(p.parent for p in mnv2["out"].glob("*/manifest.json") if not p.parent.name.endswith(".rejected"))


@pytest.mark.slow
@pytest.mark.train
def test_keras3_applications_model_converts_to_every_target(mnv2: dict[str, Any]) -> None:
    """The fine-tuning layout (nested keras.applications base, Keras 3 file) gives verified fp32
    artifacts on every target; an int8 artifact is verified, or rejected with its agreement stated
    (a briefly fitted net's int8 may miss the bar) - never a traceback. Equalisation's skipped layers
    are recorded, not fatal."""
    res = mnv2["convert"]
    assert "Traceback" not in res.output
    rejected = []
    for t in ("tflite", "onnx", "openvino"):
        for p in ("fp32", "int8"):
            folder = mnv2["out"] / f"{t}-{p}"
            if p == "int8" and not folder.exists():
                folder = folder.with_name(folder.name + ".rejected")
                rejected.append(folder.name)
            m = json.loads((folder / "manifest.json").read_text())
            v = m["verification"]
            assert v["split"] == "val" and m["source"]["format"] == "keras3"
            assert v["passed"] is (folder.suffix != ".rejected")
            assert (v["top1_agreement"] >= 0.99) is v["passed"]
            if not v["passed"]:
                assert f"{t} {p}" in res.output and "agreement" in res.output
    assert res.exit_code == (1 if rejected else 0), res.output
    assert len(rejected) < 3, f"every int8 artifact rejected: {res.output}"
    q = json.loads(next(mnv2["out"].glob("tflite-int8*/manifest.json")).read_text())["quantization"]
    # MobileNetV2's depthwise convolutions are followed by ReLU6: equalisation cannot apply, so the
    # int8 weights keep per-channel scales and the reason names the layer
    assert "per-channel" in q["weights"] and "cannot be cross-layer equalised" in q["weight_scales"]
    assert "max_value=6" in q["weight_scales"]


@pytest.mark.slow
@pytest.mark.train
def test_bench_takes_the_keras3_file_as_reference(mnv2: dict[str, Any], data_dir: Path, tmp_path: Path) -> None:
    arts = [a for a in _built(mnv2) if a.name.endswith("int8")] or [mnv2["out"] / "tflite-fp32"]
    arts = [*arts, mnv2["out"] / "onnx-fp32"]
    res = _cli(["bench", *arts, "--reference", mnv2["src"], "--data", data_dir, "--per-class", 5, "--out",
                tmp_path / "b", "--warmup", 1, "--min-runs", 3, "--min-seconds", 0.1])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "b" / "results.json").read_text())
    edge = [r for r in doc["results"] if r["kind"] != "keras"]
    assert len(edge) == len(arts) and all(r["n"] == 20 for r in edge)
    assert all(r["agreement"] is not None for r in edge)
    assert next(r for r in edge if r["target"] == "onnx" and r["precision"] == "fp32")["agreement"] == 1.0


@pytest.mark.slow
@pytest.mark.train
def test_predict_every_artifact_and_the_keras3_explain_reference(mnv2: dict[str, Any], data_dir: Path,
                                                                 tmp_path: Path) -> None:
    imgs = _images(data_dir)
    built = _built(mnv2)
    assert len(built) >= 4
    for art in built:
        res = _cli(["predict", art, *imgs, "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["summary"]["ok"] == 2
    res = _cli(["predict", mnv2["out"] / "onnx-fp32", imgs[0], "--explain", tmp_path / "x", "--explain-budget-s", 0,
                "--explain-reference", mnv2["src"]])
    assert res.exit_code == 0, res.output


@pytest.mark.slow
@pytest.mark.train
def test_raw_onnx_bench_and_predict_with_any_input_name(mnv2: dict[str, Any], data_dir: Path,
                                                       tmp_path: Path) -> None:
    """A raw .onnx (input 'pixel_values', dynamic batch) runs in bench and predict from
    --preprocess/--classes; a raw NCHW file is refused with what to do instead."""
    onnx_file = mnv2["onnx_nhwc"]
    res = _cli(["bench", onnx_file, "--preprocess", "xception", "--classes", CLASSES, "--input-size", 32,
                "--reference", mnv2["src"], "--data", data_dir, "--per-class", 3, "--out", tmp_path / "b",
                "--warmup", 1, "--min-runs", 3, "--min-seconds", 0.1])
    assert res.exit_code == 0, res.output
    rec = next(r for r in json.loads((tmp_path / "b" / "results.json").read_text())["results"] if r["kind"] != "keras")
    assert rec["agreement"] == 1.0  # the float export computes what the Keras 3 file computes
    imgs = _images(data_dir)
    res = _cli(["predict", onnx_file, *imgs, "--preprocess", "xception", "--classes", CLASSES, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["summary"]["ok"] == 2
    res = _cli(["predict", onnx_file, *imgs])  # no --preprocess: a usage error naming what is missing
    assert res.exit_code == 2 and "--preprocess" in res.output
    res = _cli(["predict", mnv2["onnx_nchw"], *imgs, "--preprocess", "xception", "--classes", CLASSES])
    assert res.exit_code == 2 and "NCHW" in res.output and "edgebrain convert" in res.output


@pytest.mark.slow
@pytest.mark.train
def test_batch1_export_that_cannot_be_batched_is_refused_with_the_way_out(mnv2: dict[str, Any], data_dir: Path,
                                                                          tmp_path: Path) -> None:
    """tf2onnx with a fixed batch of 1 squeezes the batch away inside the graph: no other batch size
    can run, so the file is refused up front with what to export instead (never a traceback)."""
    res = _cli(["convert", mnv2["onnx_nchw"], "--to", "onnx,openvino", "--precision", "int8", "--data", data_dir,
                "--preprocess", "xception", "--classes", CLASSES, "--out", tmp_path / "c"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "batch size is fixed at 1" in res.output and "dynamic batch" in res.output


# --------------------------------------------------------------------------- the whole zoo


def _zoo_ids() -> list[tuple[str, str, str]]:
    Z = _bench_module("zoo_models")
    return [(a, f, lay) for a in Z.ZOO for f in ("keras3", "tf-keras", "savedmodel") for lay in Z.LAYOUTS]


@pytest.fixture(scope="module")
def zoo_args() -> Any:
    zoo = _bench_module("zoo")
    return zoo.argparse.Namespace(calib_size=64, verify_n=100, per_class=5, int8_search=False, timeout=3600)


def _check_entry(res: dict[str, Any], log: Path) -> None:
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, f"{res['id']}: a traceback in {log}"
    if res["missing"]:  # refused: the reason is stated
        assert res["convert"].get("error"), f"{res['id']}: {res['missing']} missing without a reason"
    rows = res["rows"]
    assert rows, f"{res['id']}: nothing converted ({res['convert'].get('error')})"
    # fp32 always verifies; an int8 artifact verifies or is rejected for its stated agreement
    assert all(r["passed"] for r in rows if r["precision"] == "fp32"), rows
    assert all(r["passed"] is (r["agreement"] >= 0.99) for r in rows), rows
    assert res["bench"]["rc"] == 0 and all(rc == 0 for rc in res["predict"].values()), res


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.train
@pytest.mark.parametrize("arch,fmt,layout", _zoo_ids())
def test_zoo_keras(arch: str, fmt: str, layout: str, data_dir: Path, cache_env: Path, zoo_args: Any,
                   tmp_path: Path) -> None:
    Z, zoo = _bench_module("zoo_models"), _bench_module("zoo")
    (e,) = Z.build_family(arch, zoo.SIZES[arch], tmp_path / "models", data_dir, fit_per_class=60, epochs=2,
                          formats=(fmt,), layouts=(layout,))
    res = zoo.run_entry(e, tmp_path, str(data_dir), zoo_args)
    _check_entry(res, tmp_path / "logs" / f"{e.id}.log")
    assert not res["missing"], res["convert"]


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.train
@pytest.mark.parametrize("arch", ["resnet50", "mobilenetv2", "densenet121", "efficientnetb0"])
@pytest.mark.parametrize("nchw,dynamic", [(False, True), (True, True), (True, False)])
def test_zoo_onnx(arch: str, nchw: bool, dynamic: bool, data_dir: Path, cache_env: Path, zoo_args: Any,
                  tmp_path: Path) -> None:
    Z, zoo = _bench_module("zoo_models"), _bench_module("zoo")
    es = Z.build_family(arch, zoo.SIZES[arch], tmp_path / "models", data_dir, fit_per_class=60, epochs=2,
                        formats=(), layouts=("nested",),
                        onnx=({"nchw": nchw, "dynamic_batch": dynamic, "input_name": "input.1"},))
    (e,) = es
    res = zoo.run_entry(e, tmp_path, str(data_dir), zoo_args)
    if not dynamic and not res["rows"]:  # a batch the exporter baked into the graph: refused, with the way out
        assert "batch size is fixed" in res["convert"]["error"]
        return
    _check_entry(res, tmp_path / "logs" / f"{e.id}.log")
    assert res["missing"] == ["tflite-fp32", "tflite-int8"] and "no ONNX -> TFLite path" in res["convert"]["error"]


@pytest.mark.zoo
def test_zoo_builder_shares_one_function_across_flavours_and_layouts(tmp_path: Path) -> None:
    """The zoo's premise: the Keras 3 / tf-keras, nested / flattened files of an architecture hold
    the same weights and compute the same function (so one table row speaks for all)."""
    Z = _bench_module("zoo_models")
    ref = Z.build("mobilenetv3small", 32, "keras3", "nested", seed=1)
    rng = np.random.default_rng(0)  # weights away from the initialisation (BatchNorm variances stay > 0)
    ref.set_weights([w * rng.uniform(0.5, 1.5, w.shape) + rng.normal(0, 0.05, w.shape) for w in ref.get_weights()])
    x = rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    for flavour in Z.FLAVOURS:
        m = Z.build("mobilenetv3small", 32, flavour, "flat", seed=2)
        assert np.abs(np.asarray(m(x, training=False)) - np.asarray(ref(x, training=False))).max() > 0
        assert Z.copy_weights(ref, m, x) <= 1e-4
    with pytest.raises(ValueError, match="at least 71"):
        Z.build("xception", 64)
