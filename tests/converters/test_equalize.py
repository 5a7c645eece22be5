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
