"""ONNX files exported with a fixed batch of 1 (the default of many exporters): the batch is made
free where the graph allows it, else refused with what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgebrain.converters.source import load_source
from edgebrain.errors import ModelError


def _batch1_onnx(path: Path, nchw: bool, tail: str) -> Path:
    """Conv -> ReLU -> GAP -> (Flatten | Reshape to [1, 8] | Squeeze the batch away and Unsqueeze it
    back, as tf2onnx writes batch-1 graphs) -> Gemm, input 'input.1' of batch 1."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b"),
             numpy_helper.from_array(rng.normal(0, 1, (8, 4)).astype(np.float32), "fc"),
             numpy_helper.from_array(np.zeros(4, np.float32), "fb"),
             numpy_helper.from_array(np.array([1, 8], np.int64), "shape")]
    nodes = [helper.make_node("Transpose", ["input.1"], ["x"], perm=[0, 3, 1, 2])] if not nchw else []
    x = "x" if not nchw else "input.1"
    nodes += [helper.make_node("Conv", [x, "w", "b"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("GlobalAveragePool", ["r"], ["g"]),
              *{"flatten": [helper.make_node("Flatten", ["g"], ["f"])],
                "reshape": [helper.make_node("Reshape", ["g", "shape"], ["f"])],
                "squeeze": [helper.make_node("Squeeze", ["g", "axes"], ["s"]),
                            helper.make_node("Unsqueeze", ["s", "ax0"], ["f"])]}[tail],
              helper.make_node("Gemm", ["f", "fc", "fb"], ["logits"])]
    inits += [numpy_helper.from_array(np.array([0, 2, 3], np.int64), "axes"),
              numpy_helper.from_array(np.array([0], np.int64), "ax0")]
    shape = [1, 3, 32, 32] if nchw else [1, 32, 32, 3]
    g = helper.make_graph(nodes, "b1", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("nchw,tail", [(False, "flatten"), (True, "flatten"), (True, "reshape")])
def test_fixed_batch_onnx_source_runs_batches(tmp_path: Path, nchw: bool, tail: str) -> None:
    src = load_source(_batch1_onnx(tmp_path / "m.onnx", nchw, tail), preprocess="rescale",
                      classes=["glioma", "meningioma", "notumor", "pituitary"], workdir=tmp_path)
    assert "fixed at 1" in src.notes["batch"] and src.input_shape == [32, 32, 3]
    assert ("1 Reshape target shape(s)" in src.notes["batch"]) is (tail == "reshape")
    x = np.random.default_rng(1).uniform(0, 1, (5, 32, 32, 3)).astype(np.float32)
    together = src.predict(x)
    alone = np.concatenate([src.predict(x[i:i + 1]) for i in range(5)])
    assert together.shape == (5, 4) and np.allclose(together, alone, atol=1e-5)


def test_fixed_batch_that_cannot_change_is_refused_with_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="batch size is fixed at 1.*dynamic batch"):
        load_source(_batch1_onnx(tmp_path / "m.onnx", nchw=True, tail="squeeze"), preprocess="rescale",
                    classes=["glioma", "meningioma", "notumor", "pituitary"], workdir=tmp_path)
