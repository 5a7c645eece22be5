"""ONNX int8: the calibration method asked for is the one applied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgebrain.artifact import load_manifest
from edgebrain.converters.onnx_target import ENTROPY_BINS

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def _activation_scales(model_file: Path) -> dict[str, float]:
    """Every scalar scale initializer of a QOperator model (activation scales; per-channel
    weight scales are vectors)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(model_file)).graph
    out = {}
    for init in g.initializer:
        a = numpy_helper.to_array(init)
        if init.name.endswith("_scale") and a.size == 1:
            out[init.name] = float(a)
    return out


def _save(model: Any, src: Path, data_dir: Path) -> Path:
    """``model`` as a source folder: model.keras plus a model card (rescale, 32 px, the real data)."""
    from edgebrain.modelcard import ModelCard
    from edgebrain.preprocess import PreprocessSpec

    src.mkdir()
    model.save(src / "model.keras")
    ModelCard("custom", CLASSES, PreprocessSpec.named("rescale", 32), [32, 32, 3],
              data={"root": str(data_dir), "split_seed": 42}).save(src)
    return src


def _tiny(tmp_path: Path, data_dir: Path, dense_head: bool = False) -> Path:
    from edgebrain.tfenv import import_tf

    k = import_tf().keras
    inp = k.Input((32, 32, 3))
    x = k.layers.Conv2D(8, 3, activation="relu")(inp)
    x = k.layers.Conv2D(8, 3, activation="relu")(x)
    x = k.layers.GlobalAveragePooling2D()(x)
    if dense_head:
        x = k.layers.Dense(16, activation="relu", name="hidden")(x)
    src = tmp_path / ("m-dense" if dense_head else "m")
    return _save(k.Model(inp, k.layers.Dense(4, activation="softmax", name="predictions")(x)), src, data_dir)


@pytest.mark.slow
def test_entropy_calibration_is_not_min_max(data_dir: Path, tmp_path: Path, cache_env: Path) -> None:
    """quantize_static alone builds its entropy calibrator with 128 bins, which leaves the full
    range as the only candidate (entropy == min/max). The ONNX target must really search."""
    from edgebrain.convert import convert

    src = _tiny(tmp_path, data_dir)
    # keep onnxruntime's tensor names: they tell the activation scales apart
    common: dict[str, Any] = dict(calib_size=32, verify_n=16, min_agreement=0.01, int8_fallback_below=None,
                                  strip_names=False)
    mm = convert(src, "onnx", "int8", tmp_path / "mm", calib_method="minmax", **common)[0]
    en = convert(src, "onnx", "int8", tmp_path / "en", calib_method="entropy", **common)[0]
    q = load_manifest(en.path).manifest
    assert q["calibration"]["method"] == "entropy"
    assert q["quantization"]["entropy_histogram"] == ENTROPY_BINS
    assert "entropy_histogram" not in load_manifest(mm.path).manifest["quantization"]
    s_mm, s_en = _activation_scales(mm.model_file), _activation_scales(en.model_file)
    common_names = sorted(set(s_mm) & set(s_en))
    assert len(common_names) >= 3
    # KL thresholds clip the long tail: never a wider range than min/max, narrower somewhere
    assert all(s_en[n] <= s_mm[n] * (1 + 1e-6) for n in common_names)
    assert any(s_en[n] < s_mm[n] * 0.99 for n in common_names)
    assert np.isfinite(q["verification"]["top1_agreement"])


def _op_types(model_file: Path) -> dict[str, str]:
    import onnx

    return {n.name: n.op_type for n in onnx.load(str(model_file)).graph.node}


@pytest.mark.slow
def test_float_logits_default(data_dir: Path, tmp_path: Path, cache_env: Path) -> None:
    """By default the last classifier layer (and only it) stays float; --onnx-int8-logits
    quantises it too."""
    from edgebrain.convert import convert

    src = _tiny(tmp_path, data_dir, dense_head=True)
    common: dict[str, Any] = dict(calib_size=16, verify_n=16, min_agreement=0.01, int8_fallback_below=None,
                                  int8_search=False, strip_names=False)  # node names identify the layers
    fl = convert(src, "onnx", "int8", tmp_path / "fl", **common)[0]
    q8 = convert(src, "onnx", "int8", tmp_path / "q8", float_logits=False, **common)[0]
    mf, m8 = load_manifest(fl.path).manifest, load_manifest(q8.path).manifest
    assert mf["quantization"]["float_logits"] is True and m8["quantization"]["float_logits"] is False
    ops_f, ops_8 = _op_types(fl.model_file), _op_types(q8.model_file)
    last = mf["quantization"]["nodes_excluded"]
    assert any("predictions" in n and ops_f[n] in ("MatMul", "Gemm") for n in last)
    # the hidden dense layer before it and every convolution stay int8
    assert "QLinearConv" in ops_f.values() and "MatMul" not in [ops_f[n] for n in ops_f if "hidden" in n]
    assert sum(t in ("MatMul", "Gemm") for t in ops_f.values()) == 1
    assert not any(t in ("MatMul", "Gemm") for t in ops_8.values())
    assert m8["quantization"]["nodes_excluded"] == []
    assert m8["ops"]["int8_ops"] - mf["ops"]["int8_ops"] == 2  # QLinearMatMul + QLinearAdd (its bias)


@pytest.mark.slow
def test_an_int8_artifact_with_no_int8_op_is_not_written(tiny_model: Path, data_dir: Path, tmp_path: Path,
                                                        cache_env: Path) -> None:
    """Keeping every node float (here: a --keep-float scope every node name contains) leaves
    nothing in int8: that is refused, not written as an "int8" artifact."""
    from edgebrain.convert import ConvertFailed, convert

    with pytest.raises(ConvertFailed, match="no operation of the converted model runs in integer"):
        convert(tiny_model, ["onnx"], ["int8"], tmp_path / "o", data=data_dir, verify_n=8, calib_size=8,
                keep_float="resnet50_lite", int8_search=False, int8_fallback_below=None)
    assert not (tmp_path / "o" / "onnx-int8").exists()


def _residual_relu(tmp_path: Path, data_dir: Path) -> Path:
    """Xception's pattern: a tensor read by a ReLU *and* by a later addition."""
    from edgebrain.tfenv import import_tf

    k = import_tf().keras
    k.utils.set_random_seed(3)
    inp = k.Input((32, 32, 3))
    t = k.layers.Conv2D(8, 3, padding="same", bias_initializer=k.initializers.Constant(-0.3), name="pre")(inp)
    r = k.layers.ReLU(name="shared_relu")(t)
    u = k.layers.Conv2D(8, 3, padding="same", name="branch")(r)
    s = k.layers.Add(name="residual")([t, u])
    x = k.layers.GlobalAveragePooling2D()(k.layers.ReLU()(s))
    src = tmp_path / "m-res"
    return _save(k.Model(inp, k.layers.Dense(4, activation="softmax", name="predictions")(x)), src, data_dir)


@pytest.mark.slow
def test_qoperator_keeps_a_relu_whose_input_is_also_read_elsewhere(data_dir: Path, tmp_path: Path,
                                                                  cache_env: Path) -> None:
    """onnxruntime's QOperator quantiser drops a ReLU after a quantised op and relies on the producer's
    range starting at 0, which it only sets when the ReLU is the tensor's sole reader. The shared ReLU
    must survive (kept float), so the int8 model computes the same function as the FP32 one."""
    import onnx
    import onnxruntime as ort

    from edgebrain.convert import convert

    src = _residual_relu(tmp_path, data_dir)
    common: dict[str, Any] = dict(calib_size=32, verify_n=16, min_agreement=0.01, int8_fallback_below=None,
                                  int8_search=False, strip_names=False)  # node names identify the ReLUs
    art = convert(src, ["onnx"], ["fp32", "int8"], tmp_path / "o", **common)
    fp32, int8 = (a for a in sorted(art, key=lambda a: a.name))
    q = load_manifest(int8.path).manifest["quantization"]
    kept = q["activations_kept_float"]
    assert len(kept) == 1 and "shared_relu" in kept[0] and kept[0] in q["nodes_excluded"]
    relus = [n for n in onnx.load(str(int8.model_file)).graph.node if n.op_type == "Relu"]
    assert [n.name for n in relus] == kept  # the other ReLU is folded into its convolution's range

    # The int8 probabilities follow the FP32 ones (a dropped ReLU moves them 0.03 on these images).
    from edgebrain import data as D

    ds = D.scan(data_dir)
    arr = D.load_arrays(D.subset(D.splits_for(ds)["val"], 8, seed=0), (32, 32))
    x = arr.x.astype(np.float32) / 255.0

    def probs(path: Path) -> np.ndarray:
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {s.get_inputs()[0].name: x[i:i + 1]})[0] for i in range(len(x))])

    p32, p8 = probs(fp32.model_file), probs(int8.model_file)
    assert np.abs(p8 - p32).max() < 0.005, np.abs(p8 - p32).max()


def test_op_count_sees_maxpool_on_uint8_as_int8(tmp_path: Path) -> None:
    """QOperator graphs run MaxPool directly on the uint8 output of a QLinear op: int8, not float.
    A MaxPool on float data stays float."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from edgebrain.converters.onnx_target import onnx_ops

    inits = [nh.from_array(np.array(0.1, np.float32), "s"), nh.from_array(np.array(0, np.uint8), "z")]
    pool = {"kernel_shape": [2, 2]}
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             h.make_node("MaxPool", ["xq"], ["pq"], name="pool_u8", **pool),
             h.make_node("DequantizeLinear", ["pq", "s", "z"], ["y"], name="dq"),
             h.make_node("MaxPool", ["x"], ["y2"], name="pool_f32", **pool)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 1, 8, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, None), h.make_tensor_value_info("y2", T.FLOAT, None)],
                     inits)
    path = tmp_path / "m.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), str(path))
    ops = onnx_ops(path)
    assert ops["op_counts"] == {"quantized": {"MaxPool": 1}, "float": {"MaxPool": 1}}
    assert ops["boundary_ops"] == 2


def test_shorten_names_keeps_the_function_and_the_interface(tmp_path: Path) -> None:
    """Intermediate tensors, initializers and nodes get short names; the graph's inputs and outputs
    keep theirs; outputs are bitwise the same; the file shrinks."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from edgebrain.converters.onnx_target import shorten_names

    rng = np.random.default_rng(0)
    long = "model/block_with_a_long_name/"
    inits = [nh.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), long + "conv/kernel"),
             nh.from_array(rng.normal(size=4).astype(np.float32), long + "conv/bias")]
    nodes = [h.make_node("Conv", ["image", long + "conv/kernel", long + "conv/bias"], [long + "conv:0"],
                         name=long + "Conv2D", doc_string="exported by a converter", pads=[1, 1, 1, 1]),
             h.make_node("Relu", [long + "conv:0"], [long + "relu:0"], name=long + "Relu"),
             h.make_node("ReduceMean", [long + "relu:0"], ["probs"], name=long + "Mean", axes=[2, 3], keepdims=0)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("image", T.FLOAT, [1, 3, 8, 8])],
                     [h.make_tensor_value_info("probs", T.FLOAT, [1, 4])], inits,
                     value_info=[h.make_tensor_value_info(long + "conv:0", T.FLOAT, [1, 4, 8, 8])])
    path = tmp_path / "m.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), str(path))
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    size = path.stat().st_size

    done = shorten_names(path)

    assert done is not None and done["bytes_saved"] == size - path.stat().st_size > 0
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    names = [*(i.name for i in m.graph.initializer), *(o for n in m.graph.node for o in n.output),
             *(n.name for n in m.graph.node), *(v.name for v in m.graph.value_info)]
    assert not any(long in n for n in names), names
    assert [i.name for i in m.graph.input] == ["image"] and [o.name for o in m.graph.output] == ["probs"]
    assert all(not n.doc_string for n in m.graph.node)
    after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert np.array_equal(before, after)
