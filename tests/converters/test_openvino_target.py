"""OpenVINO target specifics on a really trained small model and real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgebrain.converters.openvino_target import constant_bytes, shorten_names


def _ov_model() -> object:
    import openvino as ov
    from openvino import opset13 as ops

    rng = np.random.default_rng(0)
    p = ops.parameter([1, 3, 8, 8], np.float32, name="image")
    w = ops.constant(rng.normal(size=(4, 3, 3, 3)).astype(np.float32))
    c = ops.convolution(p, w, [1, 1], [1, 1], [1, 1], [1, 1], name="model/block1_conv1/Conv2D")
    c.output(0).get_tensor().set_names({"model/block1_conv1/Conv2D:0"})
    r = ops.relu(c, name="model/block1_act/Relu")
    r.output(0).get_tensor().set_names({"model/block1_act/Relu:0"})
    g = ops.reduce_mean(r, ops.constant(np.array([2, 3], np.int64)), False, name="model/gap/Mean")
    g.output(0).get_tensor().set_names({"probs"})
    return ov.Model([g], [p], "m")


def test_shorten_names_keeps_the_interface_and_the_outputs(tmp_path: Path) -> None:
    import openvino as ov

    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    ov.save_model(_ov_model(), str(tmp_path / "named.xml"))
    m = _ov_model()
    rep = shorten_names(m)
    ov.save_model(m, str(tmp_path / "short.xml"))
    named, short = (tmp_path / "named.xml").read_text(), (tmp_path / "short.xml").read_text()
    assert "block1" not in short and "block1_conv1/Conv2D" in named
    assert rep["bytes_saved"] > 0 and len(named) - len(short) >= rep["bytes_saved"] - 16
    core = ov.Core()
    back = core.read_model(str(tmp_path / "short.xml"))
    assert back.inputs[0].get_names() == {"image"} and back.outputs[0].get_names() == {"probs"}
    a = core.compile_model(str(tmp_path / "named.xml"), "CPU")(x)[0]
    b = core.compile_model(back, "CPU")(x)[0]
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_int8_quantises_the_fp16_compressed_ir_by_default(trained_small: Path, tmp_path: Path,
                                                          cache_env: Path) -> None:
    """Default: NNCF quantises the FP16-compressed IR, so the biases it leaves unquantised are f16 in
    the int8 IR (smaller model.bin) while the weights are int8 and the same int8 kernels run;
    --openvino-int8-ir fp32 keeps them f32."""
    from edgebrain.artifact import load_manifest
    from edgebrain.convert import convert

    kw = dict(calib_size=32, verify_n=48, min_agreement=0.7, int8_search=False, int8_fallback_below=0)
    convert(trained_small, "openvino", "int8", tmp_path / "f16", **kw)
    convert(trained_small, "openvino", "int8", tmp_path / "f32", openvino_int8_ir="fp32", **kw)
    a16 = load_manifest(tmp_path / "f16" / "openvino-int8")
    a32 = load_manifest(tmp_path / "f32" / "openvino-int8")
    q16, q32 = a16.manifest["quantization"], a32.manifest["quantization"]
    assert (q16["ir"], q16["unquantised_constants"]) == ("fp16", "f16")
    assert (q32["ir"], q32["unquantised_constants"]) == ("fp32", "f32")

    assert q16["ir_reason"].startswith("default") and q32["ir_reason"] == "chosen"
    c16, c32 = constant_bytes(a16.path / "model.xml"), constant_bytes(a32.path / "model.xml")
    assert q16["constant_bytes"] == c16 and q32["constant_bytes"] == c32  # what the saved IRs hold
    assert c16["i8"] == c32["i8"] > 0  # as many int8 weight bytes
    assert c16.get("f16", 0) > 0 and c32.get("f16", 0) == 0  # biases f16 / f32
    assert c32["f32"] - c16["f32"] >= c16["f16"]  # the f16 constants take half the bytes they did as f32
    bin16, bin32 = (a16.path / "model.bin").stat().st_size, (a32.path / "model.bin").stat().st_size
    assert bin32 - bin16 >= c16["f16"] - 64, (bin16, bin32)
    # what the CPU runs is the same: int8 convolutions, nothing else in float
    assert a16.manifest["ops"]["op_counts"] == a32.manifest["ops"]["op_counts"]
    assert a16.manifest["ops"]["int8_ops"] > 0
    # FP16 biases cost this weak model (many near-ties) no more than rounding noise: the mean
    # probability error against the source stays close to the f32-bias one (top-1 flips of
    # near-ties are too coarse to compare on 48 images; the real models are measured by
    # benchmarks/convert_targets.py)
    v16, v32 = a16.manifest["verification"], a32.manifest["verification"]
    assert v16["passed"] and v32["passed"]
    assert v16["mean_abs_dp"] <= v32["mean_abs_dp"] + 0.01, (v16, v32)
