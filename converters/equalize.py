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

Any other depthwise layer (a ReLU6 / swish / hard-swish or a squeeze-excite block between the two
convolutions, a depth multiplier above 1, an output read by several layers, ...) is left as it is
and listed in the report's ``skipped`` with the reason: equalisation is an optional optimisation and
never fails a conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

_RELU = ("relu",)
_DEPTHWISE = ("DepthwiseConv2D", "SeparableConv2D")


def _bn_factor(bn: Any) -> np.ndarray | None:
    """gamma / sqrt(var + eps) of an inference-mode BatchNormalization (None if it has no gamma)."""
    if not (getattr(bn, "scale", False) and getattr(bn, "center", False)):
        return None
    gamma, _beta, _mean, var = bn.get_weights()
    return np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + bn.epsilon)


def _out_nodes(layer: Any) -> list[Any]:
    """The nodes that read ``layer``'s output: tf-keras (``outbound_nodes``) and Keras 3
    (``_outbound_nodes``)."""
    nodes = getattr(layer, "outbound_nodes", None)
    if nodes is None:
        nodes = getattr(layer, "_outbound_nodes", None)
    return list(nodes or [])


def _node_layer(node: Any) -> Any | None:
    return getattr(node, "outbound_layer", None) or getattr(node, "operation", None)


def _only_reader(layer: Any) -> Any | None:
    nodes = _out_nodes(layer)
    return _node_layer(nodes[0]) if len(nodes) == 1 else None


def _readers_note(layer: Any) -> str:
    n = len(_out_nodes(layer))
    return f"the output of {layer.name} is read by {n} layers" if n else f"nothing reads the output of {layer.name}"


def _act_name(layer: Any) -> str:
    act = getattr(layer, "activation", None)
    return str(getattr(act, "__name__", act)) if act is not None else "linear"


def _is_relu(layer: Any) -> bool:
    t = type(layer).__name__
    if t == "ReLU":
        return getattr(layer, "max_value", None) is None and not float(getattr(layer, "negative_slope", 0.0) or 0.0) \
            and not float(getattr(layer, "threshold", 0.0) or 0.0)
    if t == "Activation":
        return _act_name(layer) in _RELU
    return False


def _is_bn(layer: Any) -> bool:
    if type(layer).__name__ != "BatchNormalization":
        return False
    axis = getattr(layer, "axis", -1)
    axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
    return axis in (-1, 3)


def _describe(layer: Any) -> str:
    t = type(layer).__name__
    if t == "Activation":
        return f"Activation {layer.name} ({_act_name(layer)})"
    if t == "ReLU":
        mv, ns = getattr(layer, "max_value", None), getattr(layer, "negative_slope", 0.0)
        return f"ReLU {layer.name} (max_value={mv}, negative_slope={ns})"
    return f"{t} {layer.name}"


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
        if getattr(layer, "layers", None):  # a nested model
            out += _all_layers(layer)
        else:
            out.append(layer)
    return out


@dataclass
class _Pair:
    dw: Any  # DepthwiseConv2D, or a SeparableConv2D (then also ``pw``)
    bn: Any | None  # BatchNormalization after a DepthwiseConv2D (rescaled instead of its kernel)
    pw: Any  # the 1x1 Conv2D whose input rows take the scales
    pw_bn: Any | None  # BatchNormalization after the pointwise side (folded into its ranges only)


def _1x1(layer: Any) -> bool:
    return type(layer).__name__ == "Conv2D" and tuple(layer.kernel_size) == (1, 1) \
        and int(getattr(layer, "groups", 1)) == 1 and getattr(layer, "data_format", "channels_last") == "channels_last"


def _find_pair(layer: Any) -> tuple[_Pair | None, str]:
    """The equalisable pair that starts at a depthwise layer, or (None, why not)."""
    dm = int(getattr(layer, "depth_multiplier", 1))
    if dm != 1:
        return None, f"depth multiplier {dm} (input and output channels do not match one to one)"
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return None, "channels_first data format"
    nxt = _only_reader(layer)
    if type(layer).__name__ == "SeparableConv2D":
        return _Pair(layer, None, layer, nxt if nxt is not None and _is_bn(nxt) else None), ""
    if _act_name(layer) not in ("linear", "relu"):
        return None, f"its own activation {_act_name(layer)} is not scale-equivariant (only ReLU is)"
    cur, bn, last = nxt, None, layer
    if cur is not None and type(cur).__name__ == "BatchNormalization":
        if not _is_bn(cur) or _bn_factor(cur) is None:
            return None, f"{cur.name}: a BatchNormalization without gamma/beta or not over the channel axis"
        bn = last = cur
        cur = _only_reader(cur)
    if cur is not None and type(cur).__name__ in ("Activation", "ReLU"):
        if not _is_relu(cur):
            return None, f"{_describe(cur)} between the depthwise and pointwise convolutions is not " \
                         "scale-equivariant (only ReLU is)"
        last, cur = cur, _only_reader(cur)
    if cur is None:
        return None, _readers_note(last) + " (a rescaling would reach every reader)"
    if not _1x1(cur):
        return None, f"followed by {_describe(cur)}, not a 1x1 convolution"
    nbn = _only_reader(cur)
    return _Pair(layer, bn, cur, nbn if nbn is not None and _is_bn(nbn) else None), ""


def _plan(model: Any) -> tuple[list[_Pair], list[dict[str, str]]]:
    pairs: list[_Pair] = []
    skipped: list[dict[str, str]] = []
    for layer in _all_layers(model):
        if type(layer).__name__ not in _DEPTHWISE:
            continue
        try:
            pair, why = _find_pair(layer)
        except Exception as exc:  # an unusual layer graph: leave the layer alone, say why
            pair, why = None, f"cannot follow its output ({type(exc).__name__}: {exc})"
        if pair is None:
            skipped.append({"layer": layer.name, "type": type(layer).__name__, "reason": why})
        else:
            pairs.append(pair)
    return pairs, skipped


def equalization_plan(model: Any) -> dict[str, Any]:
    """Which depthwise layers of ``model`` :func:`equalize_depthwise` would rescale, without changing
    anything: ``{"depthwise": n, "pairs": [names], "skipped": [{"layer", "type", "reason"}]}``."""
    pairs, skipped = _plan(model)
    return {"depthwise": len(pairs) + len(skipped), "pairs": [p.dw.name for p in pairs], "skipped": skipped}


def _ones_or(f: np.ndarray | None, n: int) -> np.ndarray:
    return f if f is not None else np.ones(n)


def _apply(p: _Pair) -> dict[str, Any]:
    """Rescale one pair in place (all weights computed before any is set)."""
    g = _bn_factor(p.pw_bn) if p.pw_bn is not None else None
    if p.dw is p.pw:  # SeparableConv2D: depthwise kernel, pointwise kernel[, bias]
        ws = p.dw.get_weights()
        dk, pk = np.asarray(ws[0], np.float64), np.asarray(ws[1], np.float64)
        r1 = np.abs(dk).max(axis=(0, 1, 3))
        r2 = np.abs(pk[0, 0] * _ones_or(g, pk.shape[-1])[None, :]).max(axis=1)
        s = _scales(r1, r2)
        ws[0] = (dk / s[None, None, :, None]).astype(np.float32)
        ws[1] = (pk * s[None, None, :, None]).astype(np.float32)
        p.dw.set_weights(ws)
        return {"depthwise": p.dw.name, "pointwise": p.pw.name, "spread_before": _spread(r1),
                "spread_after": _spread(r1 / s)}
    dws, pws = p.dw.get_weights(), p.pw.get_weights()
    dk, pk = np.asarray(dws[0], np.float64), np.asarray(pws[0], np.float64)
    f = _ones_or(_bn_factor(p.bn) if p.bn is not None else None, dk.shape[2])
    r1 = np.abs(dk[:, :, :, 0] * f[None, None, :]).max(axis=(0, 1))
    r2 = np.abs(pk[0, 0] * _ones_or(g, pk.shape[-1])[None, :]).max(axis=1)
    s = _scales(r1, r2)
    pws[0] = (pk * s[None, None, :, None]).astype(np.float32)
    if p.bn is not None:  # the BatchNorm output is divided by s: gamma and beta
        bw = p.bn.get_weights()
        bw[0] = (np.asarray(bw[0], np.float64) / s).astype(np.float32)
        bw[1] = (np.asarray(bw[1], np.float64) / s).astype(np.float32)
        p.bn.set_weights(bw)
    else:
        dws[0] = (dk / s[None, None, :, None]).astype(np.float32)
        if len(dws) > 1:
            dws[1] = (np.asarray(dws[1], np.float64) / s).astype(np.float32)
        p.dw.set_weights(dws)
    p.pw.set_weights(pws)
    return {"depthwise": p.dw.name, "pointwise": p.pw.name, "spread_before": _spread(r1),
            "spread_after": _spread(r1 / s)}


def equalize_depthwise(model: Any) -> dict[str, Any]:
    """Equalise every depthwise -> pointwise pair of ``model`` in place (see the module doc).

    Returns ``{"pairs": n, "layers": [{"depthwise", "pointwise", "spread_before", "spread_after"},
    ...], "skipped": [{"layer", "type", "reason"}, ...]}`` where the spreads are max/median of the
    depthwise side's folded per-channel weight ranges (1 is ideal for one scale per tensor) and
    ``skipped`` lists the depthwise layers left unchanged, with the reason."""
    pairs, skipped = _plan(model)
    done: list[dict[str, Any]] = []
    for p in pairs:
        try:
            done.append(_apply(p))
        except Exception as exc:  # weights of an unexpected shape: this layer stays as it is
            skipped.append({"layer": p.dw.name, "type": type(p.dw).__name__,
                            "reason": f"could not rescale ({type(exc).__name__}: {exc})"})
    return {"pairs": len(done), "layers": done, "skipped": skipped}
