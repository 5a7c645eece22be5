"""Cross-layer equalisation: the float function is unchanged, the depthwise weight ranges even out."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgebrain.converters.equalize import equalize_depthwise


def _model(seed: int = 0) -> Any:
    """DW -> BN -> ReLU -> 1x1 -> BN (the lite block), a SeparableConv2D -> BN (Xception's), and a
    depthwise conv followed by a 3x3 conv (not a pair). BatchNorm statistics spread the folded
    per-channel ranges over two orders of magnitude, as trained BatchNorms do."""
    from edgebrain.tfenv import import_tf

    k = import_tf().keras
    k.utils.set_random_seed(seed)
    L = k.layers
    inp = k.Input((16, 16, 8))
    y = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(inp)
    y = L.BatchNormalization(name="dw_bn")(y)
    y = L.ReLU(name="dw_relu")(y)
    y = L.Conv2D(12, 1, use_bias=False, name="pw")(y)
    y = L.BatchNormalization(name="pw_bn")(y)
    y = L.SeparableConv2D(16, 3, padding="same", use_bias=False, name="sep")(y)
    y = L.BatchNormalization(name="sep_bn")(y)
    y = L.Activation("relu", name="sep_relu")(y)
    y = L.DepthwiseConv2D(3, padding="same", name="dw_alone")(y)
    y = L.Conv2D(8, 3, padding="same", name="conv3")(y)
    out = L.Dense(4, activation="softmax")(L.GlobalAveragePooling2D()(y))
    m = k.Model(inp, out)
    rng = np.random.default_rng(seed)
    for layer in m.layers:
        if isinstance(layer, L.BatchNormalization):
            g, b, mu, var = layer.get_weights()
            n = g.shape[0]
            layer.set_weights([np.exp(rng.normal(0, 1.5, n)).astype(np.float32) * rng.choice([-1, 1], n),
                               rng.normal(0, 0.5, n).astype(np.float32), rng.normal(0, 0.3, n).astype(np.float32),
                               np.exp(rng.normal(0, 1.0, n)).astype(np.float32)])
    return m


def _folded_dw(m: Any) -> np.ndarray:
    """The lite block's depthwise kernel with its BatchNorm folded in, per channel."""
    dk = m.get_layer("dw").get_weights()[0][:, :, :, 0]
    g, _b, _mu, var = m.get_layer("dw_bn").get_weights()
    return dk * (g / np.sqrt(var + m.get_layer("dw_bn").epsilon))[None, None, :]


def _per_tensor_sqnr(w: np.ndarray) -> float:
    """Median over channels (last axis) of each channel's SQNR (dB) under symmetric int8
    quantisation with one scale for the whole tensor: small channels lose most."""
    s = np.abs(w).max() / 127.0
    q = np.clip(np.round(w / s), -127, 127) * s
    ax = tuple(range(w.ndim - 1))
    return float(np.median(10 * np.log10((w ** 2).sum(axis=ax) / np.maximum(((w - q) ** 2).sum(axis=ax), 1e-30))))


def test_equalisation_keeps_the_function_and_evens_the_ranges() -> None:
    m = _model()
    x = np.random.default_rng(1).normal(size=(8, 16, 16, 8)).astype(np.float32)
    before = m(x, training=False).numpy()
    dw_before = _folded_dw(m)
    sep_before = m.get_layer("sep").get_weights()[0]

    rep = equalize_depthwise(m)

    after = m(x, training=False).numpy()
    assert np.abs(after - before).max() < 1e-5
    assert rep["pairs"] == 2  # the lone depthwise conv before a 3x3 conv is not a pair
    assert {(r["depthwise"], r["pointwise"]) for r in rep["layers"]} == {("dw", "pw"), ("sep", "sep")}
    lite = next(r for r in rep["layers"] if r["depthwise"] == "dw")
    assert lite["spread_after"] < lite["spread_before"] / 2
    # what it is for: one int8 scale for the whole depthwise kernel loses much less
    assert _per_tensor_sqnr(_folded_dw(m)) > _per_tensor_sqnr(dw_before) + 6
    assert not np.allclose(m.get_layer("sep").get_weights()[0], sep_before)


def test_a_depthwise_output_read_twice_is_left_alone() -> None:
    """Rescaling a tensor that another layer also reads would change that layer's input."""
    from edgebrain.tfenv import import_tf

    k = import_tf().keras
    L = k.layers
    inp = k.Input((8, 8, 4))
    d = L.DepthwiseConv2D(3, padding="same", name="dw")(inp)
    a = L.Conv2D(4, 1, name="pw")(d)
    m = k.Model(inp, L.Add()([a, d]))
    w = [v.copy() for v in m.get_weights()]
    assert equalize_depthwise(m)["pairs"] == 0
    assert all(np.array_equal(p, q) for p, q in zip(w, m.get_weights(), strict=True))


def _keras3_nested(k: Any) -> Any:
    """A Keras 3 model in the keras.applications layout (base model nested in the classifier):
    Xception's SeparableConv2D -> BN, MobileNetV2's DW -> BN -> ReLU6 -> 1x1, a plain DW -> BN ->
    ReLU -> 1x1 and a DW -> BN -> swish -> 1x1 (EfficientNet)."""
    L = k.layers
    k.utils.set_random_seed(0)
    inp = k.Input((16, 16, 8))
    y = L.SeparableConv2D(12, 3, padding="same", use_bias=False, name="sep")(inp)
    y = L.BatchNormalization(name="sep_bn")(y)
    y = L.Activation("relu")(y)
    for name, act in (("mb2", L.ReLU(6.0, name="mb2_relu6")), ("plain", L.ReLU(name="plain_relu")),
                      ("eff", L.Activation("swish", name="eff_swish"))):
        y = L.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"{name}_dw")(y)
        y = L.BatchNormalization(name=f"{name}_bn")(y)
        y = act(y)
        y = L.Conv2D(12, 1, use_bias=False, name=f"{name}_pw")(y)
    base = k.Model(inp, L.GlobalAveragePooling2D()(y), name="base")
    outer_in = k.Input((16, 16, 8))
    return k.Model(outer_in, L.Dense(4, activation="softmax")(base(outer_in)))


def test_keras3_nested_applications_layout_is_equalised_where_it_can_be() -> None:
    """Keras 3 layers keep their readers in ``_outbound_nodes``: the SeparableConv2D's BatchNorm was
    not found and the conversion crashed ('float' object is not subscriptable). Patterns that are
    not scale-equivariant are skipped with the reason, never an error."""
    from edgebrain.tfenv import import_tf

    import_tf()
    import keras

    from edgebrain.converters.equalize import equalization_plan

    m = _keras3_nested(keras)
    x = np.random.default_rng(2).normal(size=(4, 16, 16, 8)).astype(np.float32)
    before = np.asarray(m(x, training=False))
    plan = equalization_plan(m)
    rep = equalize_depthwise(m)
    assert np.abs(np.asarray(m(x, training=False)) - before).max() < 1e-5
    assert plan["pairs"] == ["sep", "plain_dw"] and plan["depthwise"] == 4
    assert {(r["depthwise"], r["pointwise"]) for r in rep["layers"]} == {("sep", "sep"), ("plain_dw", "plain_pw")}
    why = {s["layer"]: s["reason"] for s in rep["skipped"]}
    assert set(why) == {"mb2_dw", "eff_dw"}
    assert "max_value=6" in why["mb2_dw"] and "swish" in why["eff_dw"]


def test_per_tensor_weights_only_when_every_depthwise_layer_is_equalised(tmp_path: Any) -> None:
    """A model with depthwise layers that equalisation must leave alone keeps per-channel scales
    (per-tensor would round their small channels away), and says which layer and why."""
    from types import SimpleNamespace

    from edgebrain.converters.base import BuildContext, weight_scales
    from edgebrain.tfenv import import_tf

    import_tf()
    import keras

    src = SimpleNamespace(model=_keras3_nested(keras), is_keras=True, notes={})
    ctx = BuildContext(source=src, workdir=tmp_path, options={}, int8_checked=True)  # type: ignore[arg-type]
    per_channel, why = weight_scales(ctx, "tflite_per_channel", False)
    assert per_channel and "2 of 4" in why and "mb2_dw" in why
