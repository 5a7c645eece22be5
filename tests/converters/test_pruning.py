"""Pruning (tfmot) on a model with a nested Keras-applications backbone, on real images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgebrain import data as D
from edgebrain.modelcard import ModelCard
from edgebrain.preprocess import PreprocessSpec

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
SIZE = 32


def _nested_model() -> Any:
    from edgebrain.tfenv import keras

    K = keras()
    inp = K.Input((SIZE, SIZE, 3), name="image")
    backbone = K.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), alpha=0.35, include_top=False,
                                          weights=None, pooling="avg")
    x = backbone(inp)
    x = K.layers.Dense(64, activation="relu", name="head_dense")(x)
    out = K.layers.Dense(4, activation="softmax", name="predictions")(x)
    return K.Model(inp, out, name="nested")


@pytest.fixture(scope="module")
def small_data(dataset: D.Dataset, cache_env: Path) -> dict[str, Any]:
    sp = D.splits_for(dataset)
    tr = D.load_arrays(D.subset(sp["train"], 24, seed=0), (SIZE, SIZE))
    va = D.load_arrays(D.subset(sp["val"], 6, seed=0), (SIZE, SIZE))
    return {"train": (tr.x, tr.y), "val": (va.x, va.y)}


@pytest.mark.slow
def test_prune_nested_backbone_reaches_target_sparsity(small_data: dict[str, Any]) -> None:
    from edgebrain.converters.pruning import PruneConfig, _walk, prune_model

    model = _nested_model()
    before = [w.copy() for w in model.get_weights()]
    cfg = PruneConfig(sparsity=0.5, epochs=2, batch_size=16, lr=1e-3)
    pruned, rep = prune_model(model, cfg, PreprocessSpec.named("rescale", SIZE), 4,
                              small_data["train"], small_data["val"])
    # the target sparsity is reached, per layer and overall, inside the nested backbone too
    assert rep["achieved_overall"] == pytest.approx(0.5, abs=0.01)
    nested = {k: v for k, v in rep["per_layer"].items() if "/" in k and v["pruned"]}
    assert len(nested) >= 10, rep["per_layer"].keys()
    for name, v in nested.items():
        assert v["sparsity"] == pytest.approx(0.5, abs=0.02), name
    assert rep["per_layer"]["head_dense"]["pruned"] and rep["per_layer"]["head_dense"]["sparsity"] == pytest.approx(
        0.5, abs=0.02)
    assert not rep["per_layer"]["predictions"]["pruned"]  # 256 weights < min_params: left dense
    # strip_pruning removed every wrapper, recursively
    assert not [p for p, layer in _walk(pruned) if type(layer).__name__ == "PruneLowMagnitude"]
    # the zeros are really in the weights the converters will read
    k = pruned.get_layer("head_dense").kernel.numpy()
    assert abs(float(np.mean(k == 0)) - 0.5) < 0.02
    # gzip shows the effect; the input model was not modified
    assert rep["gzip_bytes"] < rep["dense_gzip_bytes"]
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert rep["schedule"]["type"] == "PolynomialDecay" and rep["fine_tuning"]["epochs"] == 2
    assert rep["pruned_val_accuracy"] is not None


@pytest.mark.long
@pytest.mark.slow
def test_prune_2x4_structured(small_data: dict[str, Any]) -> None:
    from edgebrain.converters.pruning import PruneConfig, prune_model

    model = _nested_model()
    cfg = PruneConfig(sparsity=0.5, epochs=1, batch_size=16, structured=True)
    _, rep = prune_model(model, cfg, PreprocessSpec.named("rescale", SIZE), 4, small_data["train"],
                         small_data["val"])
    assert rep["structured"] == "2:4"
    assert rep["m_by_n_2_4"]["all_layers_ok"] and rep["m_by_n_2_4"]["per_layer"]
    assert rep["achieved_overall"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.long
@pytest.mark.slow
def test_prune_then_sparsity_preserving_clustering(small_data: dict[str, Any]) -> None:
    from edgebrain.converters.pruning import PruneConfig, _walk, prune_model

    model = _nested_model()
    cfg = PruneConfig(sparsity=0.5, epochs=1, batch_size=16, lr=1e-3, clusters=8, cluster_epochs=1)
    pruned, rep = prune_model(model, cfg, PreprocessSpec.named("rescale", SIZE), 4,
                              small_data["train"], small_data["val"])
    c = rep["clustering"]
    assert c["clusters"] == 8 and c["preserve_sparsity"] and c["distinct_values"]
    # every clustered layer (nested ones too) has at most 8 distinct kernel values, zero among them
    assert c["max_distinct_values_per_layer"] <= 8
    assert any("/" in k for k in c["distinct_values"])
    k = pruned.get_layer("head_dense").kernel.numpy()
    assert len(np.unique(k)) <= 8 and 0.0 in np.unique(k)
    # clustering kept the sparsity pruning reached
    assert rep["achieved_overall"] == pytest.approx(0.5, abs=0.02)
    assert not [p for p, layer in _walk(pruned) if "Cluster" in type(layer).__name__]
    # fewer distinct values -> gzip shrinks further than pruning alone could with 7-bit-entropy weights
    assert rep["gzip_bytes"] < 0.6 * rep["dense_gzip_bytes"]


@pytest.mark.slow
def test_prune_refuses_bad_settings(small_data: dict[str, Any]) -> None:
    from edgebrain.converters.pruning import PruneConfig, prune_model
    from edgebrain.errors import ModelError

    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ModelError, match="sparsity"):
            prune_model(None, PruneConfig(sparsity=bad), PreprocessSpec.named("rescale", SIZE), 4,
                        small_data["train"], small_data["val"])


@pytest.mark.slow
def test_pruned_model_feeds_the_targets(data_dir: Path, tmp_path: Path, cache_env: Path) -> None:
    """convert --prune: the pruned model (saved with its card) is what every artifact is built from."""
    import onnx
    from onnx import numpy_helper

    from edgebrain.convert import convert

    src = tmp_path / "nested"
    src.mkdir()
    _nested_model().save(src / "model.keras")
    ModelCard("custom-nested", CLASSES, PreprocessSpec.named("rescale", SIZE), [SIZE, SIZE, 3],
              data={"root": str(data_dir), "split_seed": 42, "fractions": dict(D.DEFAULT_FRACTIONS)}).save(src)
    out = tmp_path / "out"
    # float_head: this barely-trained model's outputs are near-uniform, and an int8 softmax would turn
    # them into ties
    arts = convert(src, "tflite,onnx,openvino", "int8", out, prune=0.5, prune_epochs=1, prune_per_class=12,
                   calib_size=16, verify_n=16, min_agreement=0.5, float_head=True)
    assert {(a.target, a.precision) for a in arts} == {("tflite", "int8"), ("onnx", "int8"), ("openvino", "int8")}
    pruned_model = out / "pruned-sparse50" / "model.keras"
    assert pruned_model.is_file() and (out / "pruned-sparse50" / "model_card.json").is_file()
    for a in arts:
        assert a.path.name.endswith("-sparse50")
        p = a.manifest["pruning"]
        assert p["target_sparsity"] == 0.5 and p["achieved_overall"] == pytest.approx(0.5, abs=0.01)
        assert p["pruned_model"]["path"] == str(pruned_model)
        assert a.manifest["source"]["path"].endswith("nested/model.keras")  # the original source is recorded
        assert a.manifest["verification"]["passed"]
    onnx_int8 = next(a for a in arts if a.target == "onnx")
    g = onnx.load(str(onnx_int8.model_file)).graph
    big = [numpy_helper.to_array(t) for t in g.initializer
           if t.dims and int(np.prod(t.dims)) >= 4096 and t.data_type == onnx.TensorProto.INT8]
    zeros = sum(int(np.sum(w == 0)) for w in big) / sum(w.size for w in big)
    assert zeros > 0.4, zeros  # the int8 weights carry the sparsity
