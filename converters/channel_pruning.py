"""Structured (channel) pruning: remove whole convolution filters, so the model does fewer
multiply-accumulates on every runtime.

tfmot's magnitude pruning zeroes single weights: the int8 file gzips smaller, but dense CPU
kernels (XNNPACK, oneDNN, MLAS) do the same work. Removing filters changes the layer shapes, so
the artifact is faster everywhere. tfmot has no filter pruning for Keras, so this module does
the graph surgery itself, with Keras' own ``clone_model``, and leaves the fine-tuning to Keras.

What is pruned: every *prunable chain* ``A -> [BatchNormalization] -> [ReLU / Activation /
ZeroPadding2D] -> B``, A and B each a Conv2D or a SeparableConv2D, in which each layer's output
feeds only the next one (no residual or concatenation reads A's output). A's output channels
(and B's matching input channels: for a SeparableConv2D, its depthwise filters and the
pointwise rows they feed) can then be removed without touching any other layer. In ResNet50
(Keras applications naming, nested or not, and edgebrain's narrow builds) these are the first
two convolutions of every bottleneck block: ~60 % of the network's MACs. In Xception they are
the first two of the three separable convolutions of each middle-flow block, and the first of
the two in the entry/exit blocks (the others feed a residual addition). Channels are ranked by
the L1 norm of A's (pointwise) filter times the batch-norm scale ``|gamma| / sqrt(var + eps)``
that multiplies it (the filter's effective output magnitude), the ``ratio`` least important
are removed per chain (kept count rounded to a multiple of 8 for SIMD-friendly shapes), then
the model is fine-tuned on the train split.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgebrain.errors import ModelError
from edgebrain.preprocess import PreprocessSpec

from .pruning import _accuracy, _clone, _walk, _weights_gzip


@dataclass
class ChannelPruneConfig:
    ratio: float  # fraction of each prunable chain's channels to remove
    epochs: int = 6  # edgebrain convert --channel-epochs
    batch_size: int = 32
    lr: float = 1e-3  # --channel-lr, cosine to 0
    multiple: int = 8  # kept channel counts are multiples of this
    seed: int = 0


def _outbound(layer: Any) -> list[Any]:
    return [n.outbound_layer for n in getattr(layer, "_outbound_nodes", [])]


def _is_conv(layer: Any) -> bool:
    from edgebrain.tfenv import keras

    L = keras().layers
    # Conv2D itself (not its subclasses DepthwiseConv2D / Conv2DTranspose), no groups; or SeparableConv2D.
    if type(layer) is L.Conv2D:
        return int(getattr(layer, "groups", 1)) == 1
    return type(layer) is L.SeparableConv2D and str(layer.data_format) == "channels_last"


def _is_separable(layer: Any) -> bool:
    from edgebrain.tfenv import keras

    return type(layer) is keras().layers.SeparableConv2D


def _out_kernel(layer: Any) -> Any:
    """The kernel whose last axis is the layer's output channels."""
    return layer.pointwise_kernel if _is_separable(layer) else layer.kernel


def _passes_channels(layer: Any) -> bool:
    """Layers between A and B that keep the channel axis and act per channel."""
    from edgebrain.tfenv import keras

    L = keras().layers
    if type(layer) is L.BatchNormalization:
        axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        return list(axis) in ([-1], [3])
    if type(layer) is L.Activation:  # element-wise, except the softmax family (mixes channels)
        return getattr(layer.activation, "__name__", "") not in ("softmax", "log_softmax")
    return type(layer) in (L.ReLU, L.ZeroPadding2D)


def find_chains(model: Any) -> list[dict[str, Any]]:
    """Every prunable chain: {'a': path, 'between': [paths], 'b': path, 'channels': n}."""
    paths = {id(layer): path for path, layer in _walk(model)}
    outputs: set[int] = set()  # layers whose output is a (nested) model's output: read outside the chain
    for m in [model, *(layer for _, layer in _walk_models(model))]:
        outputs |= {id(x) for x in getattr(m, "_output_layers", [])}
    chains = []
    for path, layer in _walk(model):
        if not _is_conv(layer) or len(getattr(layer, "_inbound_nodes", [])) != 1:
            continue
        between: list[Any] = []
        cur = layer
        b = None
        while True:
            nxt = _outbound(cur)
            if len(nxt) != 1 or id(nxt[0]) not in paths or len(getattr(nxt[0], "_inbound_nodes", [])) != 1:
                break  # used twice, by a nested-model boundary, or shared: not prunable here
            n = nxt[0]
            if id(cur) in outputs:
                break
            if _is_conv(n):
                b = n
                break
            if not _passes_channels(n):
                break
            between.append(n)
            cur = n
        if b is None:
            continue
        chains.append({"a": path, "between": [paths[id(x)] for x in between], "b": paths[id(b)],
                       "channels": int(layer.filters)})
    return chains


def _walk_models(model: Any) -> list[tuple[str, Any]]:
    """Nested models (path, model), any depth."""
    from edgebrain.tfenv import keras

    K = keras()
    out = []
    for layer in model.layers:
        if isinstance(layer, K.Model):
            out.append((layer.name, layer))
            out.extend(_walk_models(layer))
    return out


def _importance(a: Any, between: list[Any]) -> np.ndarray:
    from edgebrain.tfenv import keras

    L = keras().layers
    k = np.asarray(_out_kernel(a))
    score = np.abs(k).reshape(-1, k.shape[-1]).sum(0)
    for x in between:
        if type(x) is L.BatchNormalization:
            gamma = np.asarray(x.gamma) if x.scale else np.ones(k.shape[-1], np.float32)
            var = np.asarray(x.moving_variance)
            score = score * np.abs(gamma) / np.sqrt(var + x.epsilon)
    return score


def _kept(n: int, ratio: float, multiple: int) -> int:
    keep = int(round(n * (1.0 - ratio) / multiple)) * multiple
    return int(min(n, max(multiple, keep)))


def macs(model: Any) -> int:
    """Multiply-accumulates of the Conv2D / DepthwiseConv2D / SeparableConv2D / Dense layers, batch 1."""
    from edgebrain.tfenv import keras

    L = keras().layers
    total = 0
    for _, layer in _walk(model):
        try:
            out = layer.output_shape
        except (AttributeError, RuntimeError):
            continue
        if isinstance(out, list) or out is None:
            continue
        spatial = int(np.prod([d for d in out[1:-1] if d])) if len(out) > 2 else 1
        if type(layer) is L.Conv2D:
            k = layer.kernel.shape
            total += spatial * int(k[0]) * int(k[1]) * int(k[2]) * int(k[3]) // max(1, int(layer.groups))
        elif type(layer) is L.DepthwiseConv2D:
            k = layer.depthwise_kernel.shape
            total += spatial * int(np.prod(k))
        elif type(layer) is L.SeparableConv2D:
            total += spatial * int(np.prod(layer.depthwise_kernel.shape)) + spatial * int(np.prod(layer.pointwise_kernel.shape))
        elif type(layer) is L.Dense:
            total += int(np.prod(layer.kernel.shape))
    return total


def shrink(model: Any, ratio: float, multiple: int = 8) -> tuple[Any, dict[str, Any]]:
    """The model with ``ratio`` of every prunable chain's channels removed (no fine-tuning).

    Returns (new model, {'chains': find_chains' list, each with 'kept' added}). ``ratio`` 0 gives
    an identical copy (tested: same outputs)."""
    from edgebrain.tfenv import keras

    K = keras()
    if not 0.0 <= ratio < 1.0:
        raise ModelError(f"--prune-channels must be a fraction in [0, 1), e.g. 0.25; got {ratio}")
    chains = find_chains(model)
    if not chains:
        raise ModelError("no prunable convolution chain found ((Separable)Conv2D -> [BatchNorm] -> [ReLU] -> "
                         "(Separable)Conv2D with no other reader of the first convolution's output); structured pruning does not apply to "
                         "this model")
    layers = dict(_walk(model))
    keep_out: dict[str, np.ndarray] = {}   # A path -> kept output channels
    keep_between: dict[str, np.ndarray] = {}
    keep_in: dict[str, np.ndarray] = {}    # B path -> kept input channels
    for ch in chains:
        a = layers[ch["a"]]
        n = int(a.filters)
        k = _kept(n, ratio, multiple)
        order = np.argsort(-_importance(a, [layers[p] for p in ch["between"]]), kind="stable")
        idx = np.sort(order[:k])
        keep_out[ch["a"]] = idx
        keep_in[ch["b"]] = idx
        for p in ch["between"]:
            keep_between[p] = idx
        ch["kept"] = k
    new_filters = {id(layers[p]): len(v) for p, v in keep_out.items()}

    def clone_fn(layer: Any) -> Any:
        if isinstance(layer, K.Model):
            if not getattr(layer, "_is_graph_network", False) and not isinstance(layer, K.Sequential):
                raise ModelError(f"nested subclassed model {layer.name!r} cannot be rebuilt with fewer channels")
            return K.models.clone_model(layer, clone_function=clone_fn)
        cfg = layer.get_config()
        if id(layer) in new_filters:
            cfg["filters"] = new_filters[id(layer)]
        return layer.__class__.from_config(cfg)

    new = K.models.clone_model(model, clone_function=clone_fn)
    old_layers = _walk(model)
    new_layers = _walk(new)
    if [p for p, _ in old_layers] != [p for p, _ in new_layers]:  # pragma: no cover - clone_model keeps names
        raise ModelError("rebuilt model's layers do not match the source's")
    for (path, old), (_, nl) in zip(old_layers, new_layers):
        ws = [np.asarray(w) for w in old.get_weights()]
        if not ws:
            continue
        if path in keep_between:  # BatchNormalization: every weight is per channel
            ws = [w[keep_between[path]] for w in ws]
        sep = _is_separable(old)
        if path in keep_in:
            idx = keep_in[path]
            ws[0] = ws[0][:, :, idx, :]  # Conv2D kernel / SeparableConv2D depthwise kernel: (h, w, in, .)
            if sep:  # pointwise rows: depthwise output channel c * multiplier + j reads input channel c
                mult = int(old.depth_multiplier)
                rows = (idx[:, None] * mult + np.arange(mult)[None, :]).reshape(-1)
                ws[1] = ws[1][:, :, rows, :]
        if path in keep_out:
            k = 1 if sep else 0  # the kernel whose last axis is the output channels; the bias follows it
            ws[k] = ws[k][..., keep_out[path]]
            if len(ws) > k + 1:
                ws[k + 1] = ws[k + 1][keep_out[path]]
        nl.set_weights(ws)
    return new, {"chains": chains}


def prune_channels(model: Any, cfg: ChannelPruneConfig, spec: PreprocessSpec, num_classes: int,
                   train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                   augment: Any = None) -> tuple[Any, dict[str, Any]]:
    """Remove ``cfg.ratio`` of the prunable channels and fine-tune -> (model, report).

    ``augment`` (uint8-range float batch -> batch) is applied to the training images, e.g. the
    model card's own training augmentation (:func:`edgebrain.train.augmenter_from_card`)."""
    from edgebrain.progress import enabled
    from edgebrain.tfenv import keras, set_seed
    from edgebrain.train import make_dataset

    if not 0.0 < cfg.ratio < 1.0:
        raise ModelError(f"--prune-channels must be a fraction in (0, 1), e.g. 0.25; got {cfg.ratio}")
    if cfg.epochs < 0:
        raise ModelError(f"--channel-epochs must be >= 0, got {cfg.epochs}")
    xt, yt = train
    if cfg.epochs and len(xt) == 0:
        raise ModelError("channel pruning fine-tunes on training images (the model card's train split or --data)")
    K = keras()
    set_seed(cfg.seed)
    small, info = shrink(model, cfg.ratio, cfg.multiple)
    xv, yv = val
    before_ft = _accuracy(small, xv, yv, spec)
    hist: dict[str, list[float]] = {}
    steps = int(math.ceil(len(xt) / cfg.batch_size)) * cfg.epochs
    if cfg.epochs:
        lr = K.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=steps)  # ends at 0: the model settles
        small.compile(optimizer=K.optimizers.Adam(lr), loss="categorical_crossentropy", metrics=["accuracy"])
        ds = make_dataset(xt, yt, spec, cfg.batch_size, num_classes, shuffle=True, seed=cfg.seed, augment=augment)
        val_ds = make_dataset(xv, yv, spec, cfg.batch_size, num_classes, False, cfg.seed) if len(xv) else None
        h = small.fit(ds, epochs=cfg.epochs, validation_data=val_ds,
                      verbose=(1 if sys.stderr.isatty() else 2) if enabled() else 0)
        hist = {k: [round(float(v), 5) for v in vs] for k, vs in h.history.items()}
        small = _clone(small)  # without the optimizer's state: saved files and sizes are the weights only
    m0, m1 = macs(model), macs(small)
    p0, p1 = int(model.count_params()), int(small.count_params())
    size_d, gz_d = _weights_gzip(model)
    size_p, gz_p = _weights_gzip(small)
    rep = {
        "method": "channels",
        "criterion": "L1 norm of the filter x batch-norm scale",
        "ratio": float(cfg.ratio),
        "chains": info["chains"],
        "channels_before": int(sum(c["channels"] for c in info["chains"])),
        "channels_after": int(sum(c["kept"] for c in info["chains"])),
        "macs_before": m0,
        "macs_after": m1,
        "macs_ratio": round(m1 / m0, 4) if m0 else None,
        "params_before": p0,
        "params_after": p1,
        "params_ratio": round(p1 / p0, 4) if p0 else None,
        "fine_tuning": {**asdict(cfg), "lr_schedule": "cosine to 0", "augmentation": augment is not None,
                        "steps": steps, "train_n": int(len(xt)), "val_n": int(len(xv)), "history": hist},
        "weights_bytes": size_p,
        "gzip_bytes": gz_p,
        "dense_weights_bytes": size_d,
        "dense_gzip_bytes": gz_d,
        "dense_val_accuracy": _accuracy(model, xv, yv, spec),
        "pruned_val_accuracy_before_fine_tuning": before_ft,
        "pruned_val_accuracy": _accuracy(small, xv, yv, spec),
    }
    return small, rep
