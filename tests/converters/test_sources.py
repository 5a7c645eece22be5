"""Sources from elsewhere: Keras 3 .keras files (nested backbone), ONNX files (NCHW), no model card."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edgebrain.artifact import load_manifest
from edgebrain.converters.source import detect_format, load_source
from edgebrain.errors import ModelError
from edgebrain.runtime import load_runner

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def _keras3_nested(path: Path, with_lambda: bool = False) -> Path:
    from edgebrain.tfenv import import_tf

    import_tf()
    import keras

    inp = keras.Input((32, 32, 3))
    x = inp
    if with_lambda:
        x = keras.layers.Lambda(lambda t: t * 2.0)(x)
    bb = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None,
                                        pooling="avg")
    out = keras.layers.Dense(4, activation="softmax")(bb(x))
    keras.Model(inp, out).save(path)
    return path


def _nchw_onnx(path: Path, opset: int = 17) -> Path:
    """A small NCHW classifier (Conv -> ReLU -> GAP -> Gemm -> Softmax), as PyTorch exports them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    fc = numpy_helper.from_array(rng.normal(0, 1, (8, 4)).astype(np.float32), "fc")
    fb = numpy_helper.from_array(np.zeros(4, np.float32), "fb")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["logits"]),
    ]
    g = helper.make_graph(nodes, "nchw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], [w, b, fc, fb])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


@pytest.mark.slow
def test_keras3_nested_model_without_card(tmp_path: Path, data_dir: Path, cache_env: Path) -> None:
    from edgebrain.convert import convert

    model = _keras3_nested(tmp_path / "k3.keras")
    assert detect_format(model)[0] == "keras3"
    out = tmp_path / "out"
    arts = convert(model, "tflite,onnx,openvino", "fp32", out, preprocess="imagenet", classes=",".join(CLASSES),
                   data=data_dir, verify_n=16)
    assert {a.target for a in arts} == {"tflite", "onnx", "openvino"}
    for a in arts:
        m = a.manifest
        assert m["source"]["format"] == "keras3" and m["model_card"] is None
        assert m["preprocess"]["name"] == "imagenet" and m["class_names"] == CLASSES
        assert any("no model_card.json" in w for w in m["warnings"])
        assert m["verification"]["passed"] and m["verification"]["split"] == "val"
        assert m["verification"]["max_abs_dp"] < 1e-3

    # bench finds the Keras 3 source from the manifests and runs it as the reference: no flag repeated
    from edgebrain.bench import BenchOptions, bench

    onnx_art = next(a for a in arts if a.target == "onnx")
    doc = bench([onnx_art.path], data_dir, out=tmp_path / "bench", per_class=2,
                options=BenchOptions(warmup=1, min_runs=3, min_seconds=0.05, throughput_min_runs=1,
                                     throughput_min_seconds=0.05, n_boot=100))
    assert doc["errors"] == []
    ref, (art_rec,) = doc["reference"], doc["results"]
    assert ref["target"] == "tensorflow" and ref["n"] == 8 and art_rec["agreement"] == 1.0

    # no --preprocess / --classes: still converts, and the manifest says what was assumed
    arts = convert(model, "onnx", "fp32", tmp_path / "out2", verify_n=8)
    m = arts[0].manifest
    assert m["preprocess"]["extra"] == {"assumed": True}
    assert any("ASSUMED" in w and "preprocessing" in w for w in m["warnings"])
    assert any("ASSUMED" in w and "class names" in w for w in m["warnings"])
    assert m["verification"]["split"] == "random-pixels" and "weak" in m["verification"]["evidence"]


@pytest.mark.slow
def test_keras3_lambda_refused_unless_unsafe(tmp_path: Path) -> None:
    model = _keras3_nested(tmp_path / "lam.keras", with_lambda=True)
    with pytest.raises(ModelError, match="unsafe"):
        load_source(model)
    src = load_source(model, unsafe=True)
    assert src.format == "keras3"


@pytest.mark.slow
def test_tf_keras_lambda_refused_in_every_format_unless_unsafe(tmp_path: Path) -> None:
    """.keras, .h5 and SavedModel folders: tf-keras's safe_mode covers only the first."""
    from edgebrain.models import load_keras_model
    from edgebrain.tfenv import keras as tfk

    K = tfk()
    inp = K.Input((8, 8, 3))
    out = K.layers.Dense(4, activation="softmax")(K.layers.GlobalAveragePooling2D()(
        K.layers.Lambda(lambda t: t * 2.0)(inp)))
    model = K.Model(inp, out)
    paths = [tmp_path / "lam.keras", tmp_path / "lam.h5", tmp_path / "lam_savedmodel"]
    model.save(paths[0])
    model.save(paths[1])
    model.save(paths[2], save_format="tf")
    x = np.random.default_rng(0).random((2, 8, 8, 3), np.float32)
    # the same .h5 with the class name JSON-escaped ("Lambd\u0061"): still a Lambda to tf-keras
    import h5py

    escaped = tmp_path / "escaped.h5"
    shutil.copy(paths[1], escaped)
    with h5py.File(escaped, "r+") as f:
        cfg = f.attrs["model_config"]
        cfg = cfg.decode() if isinstance(cfg, bytes) else cfg
        assert '"Lambda"' in cfg
        f.attrs["model_config"] = cfg.replace('"Lambda"', '"Lambd\\u0061"')
    for p in [*paths, escaped]:
        with pytest.raises(ModelError, match="Lambda|unsafe"):
            load_keras_model(p)
        loaded = load_keras_model(p, unsafe=True)
        np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


@pytest.mark.slow
def test_onnx_nchw_source(tmp_path: Path, data_dir: Path, cache_env: Path) -> None:
    import onnxruntime as ort

    from edgebrain.convert import convert

    model = _nchw_onnx(tmp_path / "nchw.onnx")
    out = tmp_path / "out"
    arts = convert(model, "tflite,onnx,openvino", "fp32,int8", out, preprocess="rescale",
                   classes=",".join(CLASSES), data=data_dir, calib_size=16, verify_n=24, min_agreement=0.5)
    summary = (out / "convert_summary.json").read_text()
    assert "ONNX source converts to the onnx and openvino targets only" in summary
    assert {(a.target, a.precision) for a in arts} == {("onnx", "fp32"), ("onnx", "int8"), ("openvino", "fp32"),
                                                      ("openvino", "int8")}
    x = np.random.default_rng(1).random((3, 32, 32, 3), dtype=np.float32)
    ref = ort.InferenceSession(str(model)).run(None, {"x": x.transpose(0, 3, 1, 2)})[0]
    ref = np.exp(ref - ref.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    assert {a.manifest["ops"]["opset"] for a in arts if a.target == "onnx"} == {17}
    # an older opset converts as it is to fp32; int8 needs opset 13 and says so
    from edgebrain.convert import ConvertFailed

    with pytest.raises(ConvertFailed, match="ONNX opset 11; int8 quantisation needs opset >= 13") as failed:
        convert(_nchw_onnx(tmp_path / "old.onnx", opset=11), "onnx", "fp32,int8", tmp_path / "old",
                preprocess="rescale", classes=",".join(CLASSES), data=data_dir, calib_size=16, verify_n=8)
    assert [(a.target, a.precision) for a in failed.value.artifacts] == [("onnx", "fp32")]
    assert failed.value.artifacts[0].manifest["ops"]["opset"] == 11
    for a in arts:
        art = load_manifest(a.path)
        assert art.manifest["source"]["layout"].startswith("NCHW")
        assert art.manifest["input_shape"] == [32, 32, 3]
        y = load_runner(art).run(x)
        if art.precision == "fp32":
            np.testing.assert_allclose(y, ref, atol=1e-4)
        else:
            assert art.manifest["ops"]["int8_ops"] > 0


@pytest.mark.slow
def test_source_errors_are_clear(tmp_path: Path, tiny_model: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_source(tmp_path / "missing.keras")
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a valid .keras"):
        load_source(tmp_path / "junk.keras")
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(ModelError, match="unsupported model file"):
        load_source(tmp_path / "model.pt")
    with pytest.raises(ModelError, match="contradicts the model card"):
        load_source(tiny_model, preprocess="caffe")
    with pytest.raises(ModelError, match="contradicts the model card"):
        load_source(tiny_model, classes=["a", "b", "c", "d"])
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="not a readable ONNX"):
        load_source(tmp_path / "bad.onnx", workdir=tmp_path)


def test_float_stages_from_model_card() -> None:
    """A pipeline stage whose int8 policy in the card says "float" (an SR front end whose int8 PSNR
    drop was over budget) is kept float in int8 artifacts; --keep-float adds more."""
    from types import SimpleNamespace

    from edgebrain.convert import _float_scopes
    from edgebrain.modelcard import ModelCard
    from edgebrain.preprocess import PreprocessSpec

    stages = [{"name": "sr", "layer_prefix": "sr/", "int8_policy": {"decision": "float", "psnr_drop_db": 0.9}},
              {"name": "classifier", "file": "classifier.keras"}]
    card = ModelCard("sr-resnet50", CLASSES, PreprocessSpec.named("rescale", 48), [48, 48, 3],
                     extra={"pipeline": {"stages": stages}})
    src = SimpleNamespace(card=card)
    assert _float_scopes(src, None) == (["/sr/"], ["sr"])
    assert _float_scopes(src, "head_dense") == (["head_dense", "/sr/"], ["--keep-float head_dense", "sr"])
    stages[0]["int8_policy"]["decision"] = "int8"
    assert _float_scopes(src, None) == ([], [])
    assert _float_scopes(SimpleNamespace(card=None), None) == ([], [])
