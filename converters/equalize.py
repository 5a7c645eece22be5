"""Cross-layer equalisation of depthwise -> pointwise convolution pairs (Nagel et al., "Data-Free
Quantization Through Weight Equalization and Bias Correction", ICCV 2019).

With one int8 scale per weight tensor (per-tensor quantisation), a depthwise convolution whose
channels span very different ranges after BatchNorm folding loses its small channels to rounding.
Because ReLU(x / s) = ReLU(x) / s for s > 0, channel c of the depthwise output can be divided by
s_c and the matching input row of the following 1x1 convolution multiplied by s_c without changing
the float model. Choosing s_c = sqrt(r1_c / r2_c) (r1, r2: the channel's weight ranges in the two
layers, BatchNorm folded as the converters fold it) gives both layers the same per-channel range,
so per-tensor scales waste less. The float model's outputs are unchanged up to rounding.

Pairs handled (tf-keras / Keras 3 models, layers of the top-level model or nested models):

* ``SeparableConv2D`` (depth multiplier 1): its own depthwise and pointwise kernels, with the
  BatchNorm that follows it folded into the pointwise side;
* ``DepthwiseConv2D`` -> [``BatchNormalization``] -> [ReLU] -> ``Conv2D`` 1x1 (groups 1)
  -> [``BatchNormalization``], each step the only reader of the one before.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_RELU = ("relu",)


def _bn_factor(bn: Any) -> np.ndarray | None:
    """gamma / sqrt(var + eps) of an inference-mode BatchNormalization (None if it has no gamma)."""
    if not (getattr(bn, "scale", False) and getattr(bn, "center", False)):
        return None
    gamma, _beta, _mean, var = bn.get_weights()
    return np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + bn.epsilon)


def _only_reader(layer: Any) -> Any | None:
    outs = [n.outbound_layer for n in getattr(layer, "outbound_nodes", [])]
    outs = [o for o in outs if o is not None]
    return outs[0] if len(outs) == 1 and len(getattr(layer, "outbound_nodes", [])) == 1 else None


def _is_relu(layer: Any) -> bool:
    t = type(layer).__name__
    if t == "ReLU":
        return getattr(layer, "max_value", None) is None and not float(getattr(layer, "negative_slope", 0.0) or 0.0) \
            and not float(getattr(layer, "threshold", 0.0) or 0.0)
    if t == "Activation":
        act = getattr(layer, "activation", None)
        return getattr(act, "__name__", "") in _RELU
    return False


def _scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """s_c = sqrt(r1_c / r2_c), 1 where a range is 0 (dead channel), limited to [1e-4, 1e4]."""
    ok = (r1 > 0) & (r2 > 0)
    s = np.ones_like(r1)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    return np.clip(s, 1e-4, 1e4)


def _spread(r: np.ndarray) -> float:
    """max / median of the per-channel ranges: how much a per-tensor scale wastes."""
    med = float(np.median(r[r > 0])) if np.any(r > 0) else 0.0
    return float(r.max() / med) if med > 0 else 0.0


def _all_layers(model: Any) -> list[Any]:
    out: list[Any] = []
    for layer in getattr(model, "layers", []):
        if getattr(layer, "layers", None) and type(layer).__name__ in ("Functional", "Model", "Sequential"):
            out += _all_layers(layer)
        else:
            out.append(layer)
    return out


def equalize_depthwise(model: Any) -> dict[str, Any]:
    """Equalise every depthwise -> pointwise pair of ``model`` in place (see the module doc).

    Returns ``{"pairs": n, "layers": [{"depthwise", "pointwise", "spread_before", "spread_after"},
    ...]}`` where the spreads are max/median of the depthwise side's folded per-channel weight
    ranges (1 is ideal for one scale per tensor)."""
    done: list[dict[str, Any]] = []
    for layer in _all_layers(model):
        kind = type(layer).__name__
        if kind == "SeparableConv2D" and int(getattr(layer, "depth_multiplier", 1)) == 1:
            ws = layer.get_weights()
            dk, pk = np.asarray(ws[0], np.float64), np.asarray(ws[1], np.float64)
            nxt = _only_reader(layer)
            g = _bn_factor(nxt) if nxt is not None and type(nxt).__name__ == "BatchNormalization" else None
            r1 = np.abs(dk).max(axis=(0, 1, 3))
            r2 = np.abs(pk[0, 0] * (g if g is not None else 1.0)[None, :]).max(axis=1)
            s = _scales(r1, r2)
            ws[0] = (dk / s[None, None, :, None]).astype(np.float32)
            ws[1] = (pk * s[None, None, :, None]).astype(np.float32)
            layer.set_weights(ws)
            done.append({"depthwise": layer.name, "pointwise": layer.name, "spread_before": _spread(r1),
                         "spread_after": _spread(r1 / s)})
        elif kind == "DepthwiseConv2D" and int(getattr(layer, "depth_multiplier", 1)) == 1:
            chain = [layer]
            cur = _only_reader(layer)
            bn = None
            if cur is not None and type(cur).__name__ == "BatchNormalization":
                bn, cur = cur, _only_reader(cur)
            if cur is not None and _is_relu(cur):
                cur = _only_reader(cur)
            pw = cur
            if pw is None or type(pw).__name__ != "Conv2D" or tuple(pw.kernel_size) != (1, 1) \
                    or int(getattr(pw, "groups", 1)) != 1:
                continue
            chain.append(pw)
            f = _bn_factor(bn) if bn is not None else np.ones(1)
            if f is None:
                continue
            nbn = _only_reader(pw)
            g = _bn_factor(nbn) if nbn is not None and type(nbn).__name__ == "BatchNormalization" else None
            dws = layer.get_weights()
            dk = np.asarray(dws[0], np.float64)
            r1 = np.abs(dk[:, :, :, 0] * f[None, None, :]).max(axis=(0, 1))
            pws = pw.get_weights()
            pk = np.asarray(pws[0], np.float64)
            r2 = np.abs(pk[0, 0] * (g if g is not None else 1.0)[None, :]).max(axis=1)
            s = _scales(r1, r2)
            if bn is not None:  # the BatchNorm output is divided by s: gamma and beta
                bw = bn.get_weights()
                bw[0] = (bw[0] / s).astype(np.float32)
                bw[1] = (bw[1] / s).astype(np.float32)
                bn.set_weights(bw)
            else:
                dws[0] = (dk / s[None, None, :, None]).astype(np.float32)
                if len(dws) > 1:
                    dws[1] = (np.asarray(dws[1], np.float64) / s).astype(np.float32)
                layer.set_weights(dws)
            pws[0] = (pk * s[None, None, :, None]).astype(np.float32)
            pw.set_weights(pws)
            done.append({"depthwise": layer.name, "pointwise": pw.name, "spread_before": _spread(r1),
                         "spread_after": _spread(r1 / s)})
    return {"pairs": len(done), "layers": done}
