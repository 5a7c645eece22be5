"""TFLite int8 weight scales: per-tensor where it is safe and verified, per-channel otherwise."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edgebrain.artifact import load_manifest
from edgebrain.converters.base import BuildContext, depthwise_layers, equalize_wanted
from edgebrain.converters.onnx_target import ONNXTarget
from edgebrain.converters.openvino_target import OpenVINOTarget
from edgebrain.converters.tflite_target import TFLiteTarget

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def _keras(depthwise_nested: bool) -> Any:
    from edgebrain.tfenv import import_tf

    tf = import_tf()
    k = tf.keras
    inp = k.Input((32, 32, 3))
    x = k.layers.Conv2D(8, 3, activation="relu")(inp)
    if depthwise_nested:  # a depthwise -> pointwise pair inside a nested model, as Keras applications nest backbones
        sub_in = k.Input(x.shape[1:])
        sub = k.Model(sub_in, k.layers.Conv2D(8, 1)(k.layers.DepthwiseConv2D(3)(sub_in)))
        x = sub(x)
    x = k.layers.GlobalAveragePooling2D()(x)
    return k.Model(inp, k.layers.Dense(4, activation="softmax")(x))


def _ctx(model: Any, checked: bool, opt: Any = "auto", equalize: Any = "auto") -> BuildContext:
    src = SimpleNamespace(model=model, is_keras=True)
    return BuildContext(source=src, workdir=Path("."),  # type: ignore[arg-type]
                        options={"tflite_per_channel": opt, "onnx_per_channel": opt, "openvino_per_channel": opt,
                                 "equalize": equalize},
                        int8_checked=checked)


def test_auto_weight_scales_rule() -> None:
    t = TFLiteTarget()
    plain, dw = _keras(False), _keras(True)
    assert depthwise_layers(plain) == 0 and depthwise_layers(dw) == 1
    per_channel, why = t._per_channel(_ctx(plain, checked=True))
    assert per_channel is False and why.startswith("auto: per-tensor")
    # per-channel is the first fallback when the per-tensor build agrees too little
    assert t.int8_fallbacks_for(_ctx(plain, checked=True))[0] == {"tflite_per_channel": True}
    # not verified (--no-verify / fallbacks off): the standard per-channel scales
    assert t._per_channel(_ctx(plain, checked=False))[0] is True
    assert t._per_channel(_ctx(dw, checked=False))[0] is True
    # depthwise convolutions: per-tensor after cross-layer equalisation, per-channel as the fallback
    ctx = _ctx(dw, checked=True)
    per_channel, why = t._per_channel(ctx)
    assert per_channel is False and "equalised" in why
    assert equalize_wanted(ctx, per_channel) and not equalize_wanted(_ctx(plain, checked=True), False)
    assert not equalize_wanted(ctx, True)  # per-channel scales do not need it
    assert t.int8_fallbacks_for(ctx)[0] == {"tflite_per_channel": True}
    # without equalisation depthwise models keep per-channel scales
    assert t._per_channel(_ctx(dw, checked=True, equalize=False))[0] is True
    assert t.int8_fallbacks_for(_ctx(dw, checked=True, equalize=False)) == [{"float_head": True}]
    # weights clustered by --prune-cluster: equalisation would spread each layer's shared values
    clustered = _ctx(dw, checked=True)
    clustered.source.notes = {"weight_clusters": 16}
    per_channel, why = t._per_channel(clustered)
    assert per_channel is True and "clustered to 16 values" in why
    assert not equalize_wanted(clustered, per_channel)
    # the user's choice stands
    assert t._per_channel(_ctx(dw, checked=True, opt=False)) == (False, "set explicitly")
    assert t.int8_fallbacks_for(_ctx(plain, checked=True, opt=True)) == [{"float_head": True}]


def test_auto_weight_scales_rule_onnx() -> None:
    """ONNX keeps per-channel scales, except on verified depthwise models (per-tensor after equalisation)."""
    t = ONNXTarget()
    plain, dw = _keras(False), _keras(True)
    assert t._per_channel(_ctx(plain, checked=True)) == (True, "auto: per-channel")
    assert t.int8_fallbacks_for(_ctx(plain, checked=True)) == [{"float_head": True}]
    per_channel, why = t._per_channel(_ctx(dw, checked=True))
    assert per_channel is False and "equalised" in why
    assert t.int8_fallbacks_for(_ctx(dw, checked=True)) == [{"onnx_per_channel": True}, {"float_head": True}]
    assert t._per_channel(_ctx(dw, checked=False))[0] is True
    assert t._per_channel(_ctx(dw, checked=True, equalize=False))[0] is True
    assert t._per_channel(_ctx(dw, checked=True, opt=True)) == (True, "set explicitly")


def test_auto_weight_scales_rule_openvino() -> None:
    """OpenVINO (NNCF) keeps per-channel scales, except on verified depthwise models: per-tensor after
    equalisation, then per-channel, then accuracy control on the per-channel model."""
    t = OpenVINOTarget()
    plain, dw = _keras(False), _keras(True)
    assert t._per_channel(_ctx(plain, checked=True)) == (True, "auto: per-channel")
    assert t.int8_fallbacks_for(_ctx(plain, checked=True)) == t.int8_fallbacks
    ctx = _ctx(dw, checked=True)
    per_channel, why = t._per_channel(ctx)
    assert per_channel is False and "equalised" in why and equalize_wanted(ctx, per_channel)
    fbs = t.int8_fallbacks_for(ctx)
    assert fbs[0] == {"openvino_per_channel": True}
    assert fbs[1]["max_drop"] and fbs[1]["openvino_per_channel"] is True
    assert t._per_channel(_ctx(dw, checked=False))[0] is True
    assert t._per_channel(_ctx(dw, checked=True, equalize=False))[0] is True
    assert t._per_channel(_ctx(dw, checked=True, opt=False)) == (False, "set explicitly")
    assert t.int8_fallbacks_for(_ctx(dw, checked=True, opt=False)) == t.int8_fallbacks


def _conv_scales(model_file: Path) -> list[int]:
    """Number of quantisation scales of every CONV_2D weight tensor in a .tflite file."""
    from tensorflow.lite.python import schema_py_generated as fb

    m = fb.ModelT.InitFromObj(fb.Model.GetRootAsModel(model_file.read_bytes(), 0))
    conv = fb.BuiltinOperator.CONV_2D
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in m.operatorCodes]
    g = m.subgraphs[0]
    return [len(g.tensors[op.inputs[1]].quantization.scale) for op in g.operators if codes[op.opcodeIndex] == conv]


@pytest.mark.slow
def test_per_tensor_default_for_plain_convs(data_dir: Path, tmp_path: Path, cache_env: Path) -> None:
    """A model without depthwise convolutions gets one weight scale per tensor (a smaller file);
    --tflite-per-channel gives one per output channel."""
    from edgebrain.convert import convert
    from edgebrain.modelcard import ModelCard
    from edgebrain.preprocess import PreprocessSpec

    src = tmp_path / "plain"
    src.mkdir()
    _keras(False).save(src / "model.keras")
    ModelCard("custom", CLASSES, PreprocessSpec.named("rescale", 32), [32, 32, 3],
              data={"root": str(data_dir), "split_seed": 42}).save(src)
    common: dict[str, Any] = dict(calib_size=16, verify_n=16, min_agreement=0.01, int8_fallback_below=0.01)
    auto = convert(src, "tflite", "int8", tmp_path / "auto", **common)[0]
    pc = convert(src, "tflite", "int8", tmp_path / "pc", tflite_per_channel=True, **common)[0]
    qa, qp = load_manifest(auto.path).manifest["quantization"], load_manifest(pc.path).manifest["quantization"]
    assert qa["weight_scales"].startswith("auto: per-tensor") and "per-tensor" in qa["weights"]
    assert qp["weight_scales"] == "set explicitly" and "per-channel" in qp["weights"]
    assert _conv_scales(auto.model_file) == [1]
    assert _conv_scales(pc.model_file) == [8]
    assert auto.model_file.stat().st_size < pc.model_file.stat().st_size
    assert np.isfinite(load_manifest(auto.path).manifest["verification"]["top1_agreement"])


@pytest.mark.slow
def test_float_logits_default(data_dir: Path, tmp_path: Path, cache_env: Path) -> None:
    """int8 keeps only the last fully-connected layer and the softmax in float by default;
    --int8-logits quantises them too; int8 model I/O never gets float logits."""
    from edgebrain.convert import convert
    from edgebrain.modelcard import ModelCard
    from edgebrain.preprocess import PreprocessSpec
    from edgebrain.tfenv import import_tf

    k = import_tf().keras
    inp = k.Input((32, 32, 3))
    x = k.layers.GlobalAveragePooling2D()(k.layers.Conv2D(8, 3, activation="relu")(inp))
    x = k.layers.Dense(16, activation="relu", name="hidden")(x)
    src = tmp_path / "dense-head"
    src.mkdir()
    k.Model(inp, k.layers.Dense(4, activation="softmax", name="predictions")(x)).save(src / "model.keras")
    ModelCard("custom", CLASSES, PreprocessSpec.named("rescale", 32), [32, 32, 3],
              data={"root": str(data_dir), "split_seed": 42}).save(src)
    common: dict[str, Any] = dict(calib_size=16, verify_n=16, min_agreement=0.01, int8_fallback_below=None)
    fl = load_manifest(convert(src, "tflite", "int8", tmp_path / "fl", **common)[0].path).manifest
    q8 = load_manifest(convert(src, "tflite", "int8", tmp_path / "q8", float_logits=False, **common)[0].path).manifest
    io8 = load_manifest(convert(src, "tflite", "int8", tmp_path / "io8", tflite_io="int8", **common)[0].path).manifest
    assert fl["quantization"]["float_logits"] is True
    assert any("predictions" in n for n in fl["quantization"]["float_logits_nodes"])
    assert not any("hidden" in n for n in fl["quantization"]["float_logits_nodes"])
    assert sorted(fl["ops"]["float_op_types"]) == ["FULLY_CONNECTED", "SOFTMAX"]
    assert fl["ops"]["int8_ops"] >= 3  # conv, mean, the hidden dense layer
    assert q8["quantization"]["float_logits"] is False and q8["ops"]["float_ops"] == 0
    assert io8["quantization"]["float_logits"] is False and io8["ops"]["float_ops"] == 0
    assert fl["ops"]["int8_ops"] == q8["ops"]["int8_ops"] - 2
    assert io8["quantization"]["io"] == "int8"
    # int8 model I/O asked for explicitly is never turned into float I/O by keeping layers float
    from edgebrain.convert import ConvertFailed

    with pytest.raises(ConvertFailed, match="--tflite-io int8 .* cannot keep the classifier head float"):
        convert(src, "tflite", "int8", tmp_path / "io8-head", tflite_io="int8", float_head=True, **common)


@pytest.mark.slow
def test_failed_selective_quantisation_is_recorded(data_dir: Path, tmp_path: Path, cache_env: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """When selective quantisation (float logits) fails, the float-builtins conversion is used and
    the manifest says the classifier is int8 after all; a float stage is never quantised."""
    from edgebrain.convert import convert
    from edgebrain.errors import EdgebrainError
    from edgebrain.modelcard import ModelCard
    from edgebrain.preprocess import PreprocessSpec

    src = tmp_path / "plain"
    src.mkdir()
    _keras(False).save(src / "model.keras")
    ModelCard("custom", CLASSES, PreprocessSpec.named("rescale", 32), [32, 32, 3],
              data={"root": str(data_dir), "split_seed": 42}).save(src)

    def broken(*a: Any, **k: Any) -> Any:
        raise RuntimeError("denylist not supported")

    monkeypatch.setattr(TFLiteTarget, "_selective", staticmethod(broken))
    common: dict[str, Any] = dict(calib_size=16, verify_n=16, min_agreement=0.01, int8_fallback_below=None)
    m = load_manifest(convert(src, "tflite", "int8", tmp_path / "fb", **common)[0].path).manifest
    q = m["quantization"]
    assert q["float_fallback"] is True and q["float_logits"] is False and q["float_logits_nodes"] == []
    assert any("could not be kept float" in w for w in m["warnings"])
    assert m["ops"]["float_ops"] == 0  # really all int8
    with pytest.raises(EdgebrainError, match="cannot be kept float"):
        convert(src, "tflite", "int8", tmp_path / "sc", keep_float="conv", **common)


def test_strip_tensor_names_keeps_the_function_and_the_signature() -> None:
    """Tensor names and the description go; the signature (input/output names) stays, so the
    signature runner still works; outputs are bitwise the same; the file shrinks."""
    from edgebrain.converters.tflite_target import strip_tensor_names
    from edgebrain.runtime import tflite_interpreter_class
    from edgebrain.tfenv import import_tf

    tf = import_tf()
    model = _keras(False)
    blob = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    stripped, done = strip_tensor_names(blob)
    assert done["bytes_saved"] == len(blob) - len(stripped) > 0
    Interpreter, _ = tflite_interpreter_class()
    x = np.random.default_rng(0).random((1, 32, 32, 3), dtype=np.float32)
    outs, names = [], []
    for b in (blob, stripped):
        it = Interpreter(model_content=b)
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        outs.append(it.get_tensor(it.get_output_details()[0]["index"]))
        names.append([t["name"] for t in it.get_tensor_details()])
        sig = it.get_signature_runner()
        outs.append(next(iter(sig(**{next(iter(sig.get_input_details())): x}).values())))
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    assert any(names[0]) and not any(names[1])
