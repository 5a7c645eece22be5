"""The seed papers' model variants, built with tf-keras.

Heads follow the figures of "Implementing Deep Learning Models for Accurate Brain
Abnormality Detection and Positioning Using MRI and CT" (figures 4-9):

=================  ===========================================================  ========
variant            backbone -> head                                             figure
=================  ===========================================================  ========
resnet50           ResNet50 (avg-pooled, 2048) -> Flatten -> Dropout ->          4
                   Dense 128 -> Dropout -> Dense 4
resnet50-lite      depthwise-separable residual net in ResNet50's [3,4,6,3]      5
                   stage layout (the paper's equations) -> GAP -> Dense 64 ->
                   Dropout -> Dense 4
resnet50-ft        pretrained ResNet50, lower layers frozen -> GAP -> Dense 128   6
                   -> BatchNorm -> Dropout -> Dense 4, L2 on trainable weights
xception           Xception (with its 1000-way top, as in the figure) ->         7
                   Flatten -> Dropout -> Dense 128 -> Dropout -> Dense 4
xception-lite      reduced Xception (separable convs, BN+ReLU, residual;         8
                   fewer middle-flow blocks) -> Flatten -> Dropout -> Dense 128
                   -> Dropout -> Dense 4
xception-ft        pretrained Xception (avg-pooled), lower layers frozen ->       9
                   Flatten -> Dropout -> Dense 128 -> BN -> Dropout -> Dense 4, L2
sr-resnet50        learned x2 super-resolution front end (ESPCN-style sub-pixel   SR paper
                   convolution, residual over bilinear upsampling) -> resnet50
=================  ===========================================================  ========

``width`` < 1 builds the same topology (same depth and block counts) with fewer
channels, for tests and CPU training; width 1 uses ``keras.applications`` itself,
which is also what loads ImageNet weights.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import ModelError, WeightsUnavailableError
from ..tfenv import import_tf, keras


@dataclass(frozen=True)
class VariantInfo:
    name: str
    family: str  # resnet50 | xception
    figure: str
    default_size: int
    pretrained_capable: bool
    description: str


VARIANTS: dict[str, VariantInfo] = {
    "resnet50": VariantInfo("resnet50", "resnet50", "fig. 4", 224, True, "ResNet50 + Flatten/Dropout/Dense128/Dropout/Dense4"),
    "resnet50-lite": VariantInfo("resnet50-lite", "resnet50", "fig. 5", 224, False, "separable residual net (ResNet50 stages) + GAP/Dense64/Dropout/Dense4"),
    "resnet50-ft": VariantInfo("resnet50-ft", "resnet50", "fig. 6", 224, True, "pretrained ResNet50, lower layers frozen + GAP/Dense128/BN/Dropout/Dense4, L2"),
    "xception": VariantInfo("xception", "xception", "fig. 7", 299, True, "Xception (1000-way top) + Flatten/Dropout/Dense128/Dropout/Dense4"),
    "xception-lite": VariantInfo("xception-lite", "xception", "fig. 8", 299, False, "reduced Xception + Flatten/Dropout/Dense128/Dropout/Dense4"),
    "xception-ft": VariantInfo("xception-ft", "xception", "fig. 9", 299, True, "pretrained Xception, lower layers frozen + Dense128/BN/Dropout/Dense4, L2"),
    "sr-resnet50": VariantInfo("sr-resnet50", "resnet50", "SR paper", 224, True, "x2 ESPCN-style SR front end -> resnet50 classifier"),
}

# Our own backbones train from scratch on a few thousand images: Keras' default BN momentum (0.99)
# leaves the moving statistics far from the batch statistics after a few hundred steps, which
# wrecks inference-mode accuracy. 0.9 tracks them within ~50 steps.
BN_MOMENTUM = 0.9

WEIGHT_FILES = {
    # keras.applications' own file names and addresses (cached in ~/.keras/models)
    ("resnet50", False): "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ("resnet50", True): "resnet50_weights_tf_dim_ordering_tf_kernels.h5",
    ("xception", False): "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ("xception", True): "xception_weights_tf_dim_ordering_tf_kernels.h5",
}


def _keras_cache_file(family: str, include_top: bool) -> Path:
    base = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    return base / "models" / WEIGHT_FILES[(family, include_top)]


def _check_imagenet_available(family: str, include_top: bool, timeout: float = 10.0) -> None:
    """Fail fast (no hang) when ImageNet weights are neither cached nor downloadable."""
    cached = _keras_cache_file(family, include_top)
    if cached.is_file():
        return
    host = "storage.googleapis.com"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return
    except OSError as exc:
        raise WeightsUnavailableError(
            f"ImageNet weights for {family} are not in the Keras cache ({cached}) and {host} "
            f"cannot be reached ({exc}). Download '{cached.name}' on a connected machine and copy it to "
            f"{cached.parent}/, or use --weights none (train from scratch) or --weights PATH."
        ) from exc


# ----------------------------------------------------------------------------- backbones


def _resnet50_backbone(inp: Any, width: float, weights: str | None, pooling: str | None) -> Any:
    K = keras()
    if width == 1.0:
        # Nested Functional backbone, as in the paper's figures ("resnet50 (Functional)").
        base = K.applications.ResNet50(include_top=False, weights=weights, input_shape=tuple(inp.shape[1:]),
                                       pooling=pooling)
        return base(inp), base
    if weights:
        raise ModelError("ImageNet weights exist only for width 1.0")
    L = K.layers

    def block(x: Any, filters: int, stride: int, conv_shortcut: bool, name: str) -> Any:
        if conv_shortcut:
            sc = L.Conv2D(4 * filters, 1, strides=stride, name=name + "_0_conv")(x)
            sc = L.BatchNormalization(epsilon=1.001e-5, momentum=BN_MOMENTUM, name=name + "_0_bn")(sc)
        else:
            sc = x
        x = L.Conv2D(filters, 1, strides=stride, name=name + "_1_conv")(x)
        x = L.BatchNormalization(epsilon=1.001e-5, momentum=BN_MOMENTUM, name=name + "_1_bn")(x)
        x = L.Activation("relu", name=name + "_1_relu")(x)
        x = L.Conv2D(filters, 3, padding="same", name=name + "_2_conv")(x)
        x = L.BatchNormalization(epsilon=1.001e-5, momentum=BN_MOMENTUM, name=name + "_2_bn")(x)
        x = L.Activation("relu", name=name + "_2_relu")(x)
        x = L.Conv2D(4 * filters, 1, name=name + "_3_conv")(x)
        x = L.BatchNormalization(epsilon=1.001e-5, momentum=BN_MOMENTUM, name=name + "_3_bn")(x)
        x = L.Add(name=name + "_add")([sc, x])
        return L.Activation("relu", name=name + "_out")(x)

    c = lambda f: max(8, int(f * width))  # noqa: E731
    x = L.ZeroPadding2D(3, name="conv1_pad")(inp)
    x = L.Conv2D(c(64), 7, strides=2, name="conv1_conv")(x)
    x = L.BatchNormalization(epsilon=1.001e-5, momentum=BN_MOMENTUM, name="conv1_bn")(x)
    x = L.Activation("relu", name="conv1_relu")(x)
    x = L.ZeroPadding2D(1, name="pool1_pad")(x)
    x = L.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    for si, (filters, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=2):
        for b in range(blocks):
            x = block(x, c(filters), stride if b == 0 else 1, b == 0, f"conv{si}_block{b + 1}")
    if pooling == "avg":
        x = L.GlobalAveragePooling2D(name="avg_pool")(x)
    return x, None


def _xception_backbone(inp: Any, width: float, weights: str | None, pooling: str | None,
                       include_top: bool = False, middle_blocks: int = 8) -> Any:
    K = keras()
    if width == 1.0 and middle_blocks == 8:
        base = K.applications.Xception(include_top=include_top, weights=weights,
                                       input_shape=tuple(inp.shape[1:]), pooling=None if include_top else pooling)
        return base(inp), base
    if weights:
        raise ModelError("ImageNet weights exist only for the full Xception (width 1.0)")
    return _separable_net(inp, width, middle_blocks, include_top, pooling, prefix="xc"), None


def _separable_net(inp: Any, width: float, middle_blocks: int, include_top: bool, pooling: str | None,
                   prefix: str) -> Any:
    """Xception topology: entry flow, ``middle_blocks`` middle-flow blocks, exit flow."""
    L = keras().layers
    c = lambda f: max(8, int(f * width))  # noqa: E731
    x = L.Conv2D(c(32), 3, strides=2, use_bias=False, name=f"{prefix}_b1_conv1")(inp)
    x = L.BatchNormalization(momentum=BN_MOMENTUM, name=f"{prefix}_b1_bn1")(x)
    x = L.Activation("relu", name=f"{prefix}_b1_relu1")(x)
    x = L.Conv2D(c(64), 3, padding="same", use_bias=False, name=f"{prefix}_b1_conv2")(x)
    x = L.BatchNormalization(momentum=BN_MOMENTUM, name=f"{prefix}_b1_bn2")(x)
    x = L.Activation("relu", name=f"{prefix}_b1_relu2")(x)
    for i, f in enumerate([128, 256, 728], start=2):
        sc = L.Conv2D(c(f), 1, strides=2, padding="same", use_bias=False, name=f"{prefix}_b{i}_sc")(x)
        sc = L.BatchNormalization(momentum=BN_MOMENTUM, name=f"{prefix}_b{i}_scbn")(sc)
        if i > 2:
            x = L.Activation("relu", name=f"{prefix}_b{i}_pre")(x)
        x = L.SeparableConv2D(c(f), 3, padding="same", use_bias=False, name=f"{prefix}_b{i}_sep1")(x)
        x = L.BatchNormalization(momentum=BN_MOMENTUM, name=f"{prefix}_b{i}_bn1")(x)
        x = L.Activation("relu", name=f"{prefix}_b{i}_relu")(x)
        x = L.SeparableConv2D(c(f), 3, padding="same", use_bias=False, name=f"{prefix}_b{i}_sep2")(x)
        x = L.BatchNormalization(momentum=BN_MOMENTUM, name=f"{prefix}_b{i}_bn2")(x)
        x = L.MaxPooling2D(3, strides=2, padding="same", name=f"{prefix}_b{i}_pool")(x)
        x = L.Add(name=f"{prefix}_b{i}_add")([x, sc])
    for m in range(middle_blocks):
        sc = x
        for k in range(3):
            x = L.Activation("relu", name=f"{prefix}_m{m}_relu{k}")(x)
            x = L.SeparableConv2D(c(728), 3, padding="same", use_bias=False, name=f"{prefix}_m{m}_sep{k}")(x)
            x = L.BatchNormalization(momentum=BN_MOMENTUM, name=f"{prefix}_m{m}_bn{k}")(x)
        x = L.Add(name=f"{prefix}_m{m}_add")([x, sc])
    sc = L.Conv2D(c(1024), 1, strides=2, padding="same", use_bias=False, name=f"{prefix}_x_sc")(x)
    sc = L.BatchNormalization(momentum=BN_MOMENTUM, name=f"{prefix}_x_scbn")(sc)
    x = L.Activation("relu", name=f"{prefix}_x_pre")(x)
    x = L.SeparableConv2D(c(728), 3, padding="same", use_bias=False, name=f"{prefix}_x_sep1")(x)
    x = L.BatchNormalization(momentum=BN_MOMENTUM, name=f"{prefix}_x_bn1")(x)
    x = L.Activation("relu", name=f"{prefix}_x_relu1")(x)
    x = L.SeparableConv2D(c(1024), 3, padding="same", use_bias=False, name=f"{prefix}_x_sep2")(x)
    x = L.BatchNormalization(momentum=BN_MOMENTUM, name=f"{prefix}_x_bn2")(x)
    x = L.MaxPooling2D(3, strides=2, padding="same", name=f"{prefix}_x_pool")(x)
    x = L.Add(name=f"{prefix}_x_add")([x, sc])
    x = L.SeparableConv2D(c(1536), 3, padding="same", use_bias=False, name=f"{prefix}_x_sep3")(x)
    x = L.BatchNormalization(momentum=BN_MOMENTUM, name=f"{prefix}_x_bn3")(x)
    x = L.Activation("relu", name=f"{prefix}_x_relu3")(x)
    x = L.SeparableConv2D(c(2048), 3, padding="same", use_bias=False, name=f"{prefix}_x_sep4")(x)
    x = L.BatchNormalization(momentum=BN_MOMENTUM, name=f"{prefix}_x_bn4")(x)
    x = L.Activation("relu", name=f"{prefix}_x_relu4")(x)
    x = L.GlobalAveragePooling2D(name=f"{prefix}_avg_pool")(x) if (pooling == "avg" or include_top) else x
    if include_top:
        x = L.Dense(1000, activation="softmax", name=f"{prefix}_predictions")(x)
    return x


def _lite_resnet_backbone(inp: Any, width: float) -> Any:
    """The paper's Lightweight ResNet50 equations: 3x3 input conv, then residual blocks of
    depthwise 3x3 -> BN/ReLU -> pointwise 1x1 -> BN, added to the (projected) input, ReLU.
    Stage layout [3, 4, 6, 3] as in ResNet50."""
    L = keras().layers
    c = lambda f: max(8, int(f * width))  # noqa: E731
    x = L.Conv2D(c(32), 3, strides=2, padding="same", use_bias=False, name="lite_stem_conv")(inp)
    x = L.BatchNormalization(momentum=BN_MOMENTUM, name="lite_stem_bn")(x)
    x = L.Activation("relu", name="lite_stem_relu")(x)
    for si, (filters, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
        for b in range(blocks):
            stride = 2 if b == 0 else 1
            name = f"lite_s{si + 1}_b{b + 1}"
            if b == 0:
                sc = L.Conv2D(c(filters), 1, strides=stride, use_bias=False, name=name + "_proj")(x)
                sc = L.BatchNormalization(momentum=BN_MOMENTUM, name=name + "_proj_bn")(sc)
            else:
                sc = x
            y = L.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=name + "_dw")(x)
            y = L.BatchNormalization(momentum=BN_MOMENTUM, name=name + "_dw_bn")(y)
            y = L.Activation("relu", name=name + "_dw_relu")(y)
            y = L.Conv2D(c(filters), 1, use_bias=False, name=name + "_pw")(y)
            y = L.BatchNormalization(momentum=BN_MOMENTUM, name=name + "_pw_bn")(y)
            x = L.Add(name=name + "_add")([y, sc])
            x = L.Activation("relu", name=name + "_out")(x)
    return x


# ----------------------------------------------------------------------------- SR front end


def _depth_to_space_layer() -> type:
    K = keras()
    tf = import_tf()

    @K.utils.register_keras_serializable(package="edgebrain", name="DepthToSpace")
    class DepthToSpace(K.layers.Layer):
        """Sub-pixel convolution shuffle (ESPCN): (H, W, C*r*r) -> (H*r, W*r, C)."""

        def __init__(self, scale: int = 2, **kw: Any) -> None:
            super().__init__(**kw)
            self.scale = int(scale)

        def call(self, x: Any) -> Any:
            return tf.nn.depth_to_space(x, self.scale)

        def compute_output_shape(self, s: Any) -> Any:
            r = self.scale
            return (s[0], None if s[1] is None else s[1] * r, None if s[2] is None else s[2] * r, s[3] // (r * r))

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "scale": self.scale}

    return DepthToSpace


_D2S: type | None = None


def depth_to_space_cls() -> type:
    global _D2S
    if _D2S is None:
        _D2S = _depth_to_space_layer()
    return _D2S


def build_sr(lr_size: int | None, scale: int = 2, width: float = 1.0, name: str = "sr") -> Any:
    """ESPCN/FSRCNN-style x``scale`` SR net (scale 2, 3 or 4), residual over bilinear upsampling.

    Feature extraction (5x5), non-linear mapping (3x3), then one sub-pixel convolution to
    ``3 * scale**2`` channels and a depth-to-space shuffle. ``lr_size=None`` builds a fully
    convolutional net (any input size: training on patches); the weights of a net built at
    one size load into a net built at another. The last convolution starts near zero, so an
    untrained net is bilinear upsampling.

    Works in the classifier's preprocessed space (input and output share the spec)."""
    if int(scale) not in (2, 3, 4):
        raise ModelError(f"SR scale must be 2, 3 or 4, got {scale}")
    K = keras()
    L = K.layers
    c = lambda f: max(4, int(f * width))  # noqa: E731
    inp = K.Input((lr_size, lr_size, 3), name=f"{name}_input")
    x = L.Conv2D(c(64), 5, padding="same", activation="relu", name=f"{name}_feat")(inp)
    x = L.Conv2D(c(32), 3, padding="same", activation="relu", name=f"{name}_map")(x)
    x = L.Conv2D(3 * scale * scale, 3, padding="same", name=f"{name}_subpix",
                 kernel_initializer=K.initializers.RandomNormal(stddev=1e-3, seed=0))(x)
    x = depth_to_space_cls()(scale, name=f"{name}_shuffle")(x)
    up = L.UpSampling2D(scale, interpolation="bilinear", name=f"{name}_up")(inp)
    out = L.Add(name=f"{name}_out")([up, x])
    return K.Model(inp, out, name=name)


# ----------------------------------------------------------------------------- builder


def _resolve_weights(weights: str | None, variant: VariantInfo, width: float, include_top: bool) -> tuple[str | None, str | None]:
    """-> (keras weights arg, path to load after building)."""
    if weights in (None, "", "none", "None"):
        return None, None
    if weights == "imagenet":
        if not variant.pretrained_capable:
            raise ModelError(f"{variant.name} has no ImageNet weights (it is a from-scratch design); use --weights none")
        if width != 1.0:
            raise ModelError("ImageNet weights need --width 1.0")
        _check_imagenet_available(variant.family, include_top)
        return "imagenet", None
    p = Path(weights)
    if not p.exists():
        raise ModelError(f"--weights: {weights!r} is neither 'imagenet', 'none' nor an existing file")
    return None, str(p)


def build_model(
    variant: str,
    input_size: int | None = None,
    num_classes: int = 4,
    width: float = 1.0,
    weights: str | None = None,
    dropout: float = 0.5,
    l2: float = 1e-4,
    freeze_fraction: float = 0.75,
    freeze_backbone: bool | None = None,
    sr_scale: int = 2,
) -> Any:
    """Build a variant. ``input_size`` is the classifier's input (sr-resnet50 takes size/scale)."""
    if variant not in VARIANTS:
        raise ModelError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    info = VARIANTS[variant]
    size = input_size or info.default_size
    min_size = 71 if (info.family == "xception" and width == 1.0 and not variant.endswith("lite")) else 32
    if size < min_size:
        raise ModelError(f"{variant} needs input size >= {min_size}, got {size}")
    K = keras()
    L = K.layers
    reg = K.regularizers.l2(l2) if variant.endswith("-ft") else None
    include_top = variant == "xception"
    kw, path = _resolve_weights(weights, info, width, include_top)

    if variant == "sr-resnet50":
        if size % sr_scale:
            raise ModelError(f"sr-resnet50: input size {size} must be divisible by the SR scale {sr_scale}")
        lr = size // sr_scale
        sr = build_sr(lr, sr_scale, width=max(width, 0.25))
        cls = build_model("resnet50", size, num_classes, width, weights=kw, dropout=dropout,
                          freeze_backbone=freeze_backbone)
        inp = K.Input((lr, lr, 3), name="input_lowres")
        out = cls(sr(inp))
        model = K.Model(inp, out, name="sr_resnet50")
        if path:
            model.load_weights(path)
        return model

    inp = K.Input((size, size, 3), name="image")
    base = None
    if variant in ("resnet50", "resnet50-ft"):
        pooling = "avg"
        feats, base = _resnet50_backbone(inp, width, kw, pooling)
    elif variant == "xception":
        feats, base = _xception_backbone(inp, width, kw, None, include_top=True)
    elif variant == "xception-ft":
        feats, base = _xception_backbone(inp, width, kw, "avg")
    elif variant == "resnet50-lite":
        feats = _lite_resnet_backbone(inp, width)
    elif variant == "xception-lite":
        feats = _separable_net(inp, width * 0.5, 2, False, "avg", prefix="xl")
    else:  # pragma: no cover
        raise ModelError(variant)

    # Backbone freezing: fig. 4 trains only the head on a pretrained base; -ft freezes lower layers.
    if base is not None:
        if freeze_backbone is None:
            freeze_backbone = kw == "imagenet" and variant == "resnet50"
        if freeze_backbone:
            base.trainable = False
        elif variant.endswith("-ft") and kw == "imagenet":
            n_freeze = int(len(base.layers) * freeze_fraction)
            for layer in base.layers[:n_freeze]:
                layer.trainable = False
            for layer in base.layers:
                if isinstance(layer, L.BatchNormalization):
                    layer.trainable = False  # keep pretrained statistics
                elif layer.trainable and reg is not None and hasattr(layer, "kernel_regularizer"):
                    layer.kernel_regularizer = reg

    if variant == "resnet50-lite":
        x = L.GlobalAveragePooling2D(name="head_gap")(feats)
        x = L.Dense(64, activation="relu", name="head_dense")(x)
        x = L.Dropout(dropout, name="head_dropout")(x)
    elif variant == "resnet50-ft":
        x = L.Flatten(name="head_flatten")(feats)
        x = L.Dense(128, activation="relu", kernel_regularizer=reg, name="head_dense")(x)
        x = L.BatchNormalization(momentum=BN_MOMENTUM, name="head_bn")(x)
        x = L.Dropout(dropout, name="head_dropout")(x)
    elif variant == "xception-ft":
        x = L.Flatten(name="head_flatten")(feats)
        x = L.Dropout(dropout, name="head_dropout1")(x)
        x = L.Dense(128, activation="relu", kernel_regularizer=reg, name="head_dense")(x)
        x = L.BatchNormalization(momentum=BN_MOMENTUM, name="head_bn")(x)
        x = L.Dropout(dropout, name="head_dropout2")(x)
    else:  # resnet50, xception, xception-lite: figs 4, 7, 8
        if len(feats.shape) == 4:
            feats = L.GlobalAveragePooling2D(name="head_gap")(feats)
        x = L.Flatten(name="head_flatten")(feats)
        x = L.Dropout(dropout, name="head_dropout1")(x)
        x = L.Dense(128, activation="relu", name="head_dense")(x)
        x = L.Dropout(dropout, name="head_dropout2")(x)
    out = L.Dense(num_classes, activation="softmax", kernel_regularizer=reg, name="predictions")(x)
    model = K.Model(inp, out, name=variant.replace("-", "_"))
    if path:
        model.load_weights(path)
    return model


def load_keras_model(path: str | Path, unsafe: bool = False) -> Any:
    """Load a tf-keras model (.keras / .h5 / SavedModel dir). Lambda layers and other arbitrary
    code are refused unless ``unsafe`` (Keras safe_mode)."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model not found: {p}")
    K = keras()
    depth_to_space_cls()  # register custom layers
    try:
        if p.suffix == ".keras":
            return K.models.load_model(p, compile=False, safe_mode=not unsafe)
        if p.suffix in (".h5", ".hdf5"):
            if not unsafe and _h5_has_lambda(p):
                raise ModelError(f"{p}: contains a Lambda layer (arbitrary code); refusing without --unsafe")
            return K.models.load_model(p, compile=False)
        if p.is_dir():
            # tf-keras applies safe_mode to .keras archives only: a SavedModel's Lambda layers would
            # be rebuilt from their pickled bytecode. Refused here, as for .h5.
            if not unsafe and _savedmodel_has_lambda(p):
                raise ModelError(f"{p}: contains a Lambda layer (arbitrary code); refusing without --unsafe")
            return K.models.load_model(p, compile=False)
    except ModelError:
        raise
    except ValueError as exc:
        if "safe_mode" in str(exc) or "Lambda" in str(exc) or "lambda" in str(exc):
            raise ModelError(f"{p}: refused unsafe deserialisation (Lambda / arbitrary code). "
                             "Re-run with --unsafe only if you trust the file.") from exc
        raise ModelError(f"{p}: cannot load as a tf-keras model: {exc}") from exc
    except Exception as exc:
        msg = str(exc)
        msg = msg if len(msg) <= 600 else msg[:600] + " …"  # Keras puts the whole model config in some errors
        hint = " (a Keras 3 file? edgebrain convert/bench read those too)" if "keras.src" in msg else ""
        raise ModelError(f"{p}: cannot load as a tf-keras model ({type(exc).__name__}: {msg}){hint}") from exc
    raise ModelError(f"{p}: unsupported model file (expected .keras, .h5 or a SavedModel folder)")


def _has_lambda(obj: Any) -> bool:
    """Any ``class_name == "Lambda"`` in a decoded Keras config (searched as data, so JSON
    escapes such as ``Lambd\\u0061`` cannot hide it)."""
    if isinstance(obj, dict):
        return obj.get("class_name") == "Lambda" or any(_has_lambda(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_lambda(v) for v in obj)
    return False


def _json_has_lambda(text: str | bytes, where: Path) -> bool:
    import json

    try:
        return _has_lambda(json.loads(text))
    except ValueError as exc:
        raise ModelError(f"{where}: the stored Keras config is not valid JSON ({exc}); refusing to load it") from exc


def _h5_has_lambda(p: Path) -> bool:
    import h5py

    with h5py.File(p, "r") as f:
        cfg = f.attrs.get("model_config")
    if cfg is None:
        return False
    return _json_has_lambda(cfg, p)


def _savedmodel_has_lambda(p: Path) -> bool:
    """Keras layer configs of a SavedModel folder (one JSON document per node of keras_metadata.pb)."""
    meta = p / "keras_metadata.pb"
    if not meta.is_file():
        return False  # not a Keras SavedModel: tf-keras cannot rebuild layers from it anyway
    from tf_keras.protobuf import saved_metadata_pb2

    saved = saved_metadata_pb2.SavedMetadata()
    try:
        saved.ParseFromString(meta.read_bytes())
    except Exception as exc:
        raise ModelError(f"{meta}: not a readable Keras metadata file ({exc}); refusing to load it") from exc
    return any(_json_has_lambda(node.metadata, meta) for node in saved.nodes)


def count_params(model: Any) -> dict[str, int]:
    import numpy as np

    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    total = int(model.count_params())
    return {"total": total, "trainable": trainable, "non_trainable": total - trainable}


def variant_table() -> list[dict[str, Any]]:
    return [vars(v) for v in VARIANTS.values()]


BuildFn = Callable[..., Any]
