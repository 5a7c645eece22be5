"""The one interface every conversion target implements.

A :class:`Target` turns a :class:`~edgebrain.converters.source.Source` into the files of one
artifact folder at one precision (:meth:`Target.build`), says which precisions and source
formats it supports (with a reason when it does not), counts the ops that run in int8 vs
float where its format allows (:meth:`Target.count_ops`) and loads an artifact into an
edge runner (:meth:`Target.load`). Adding a runtime means adding one ``*_target.py``
module to this package that calls :func:`edgebrain.converters.registry.register`.
"""

from __future__ import annotations

import gzip
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from edgebrain.errors import EdgebrainError

if TYPE_CHECKING:
    from edgebrain.artifact import Artifact
    from edgebrain.calibration import CalibrationSet
    from edgebrain.runtime import Runner

    from .source import Source

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "dynamic", "int16x8")
CALIBRATED = frozenset({"int8", "int16x8"})  # precisions that need calibration images


class ConversionError(EdgebrainError):
    """A target could not produce an artifact (the message names the model and the step)."""


class UnsupportedPrecision(ConversionError):
    pass


@dataclass
class BuildContext:
    """What a target may use while building one artifact."""

    source: Source
    workdir: Path  # scratch folder shared by all targets of one run (exports are cached here)
    options: dict[str, Any]  # every target's options, defaults filled in
    calibration: Callable[[], CalibrationSet] | None = None  # lazy: built on first use
    validation: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None  # (x, y) of the val split
    calib_method: str | None = None  # --calib-method as asked
    # int8: node-name substrings whose ops stay float (e.g. "/sr/": an sr-resnet50 SR stage whose int8
    # policy in the model card says "float"), and the stage names they come from
    float_scopes: list[str] = field(default_factory=list)
    float_stages: list[str] = field(default_factory=list)
    # True when an int8 build is verified on the validation split and replaced by the target's
    # int8_fallbacks if it agrees too little (so a target may default to a leaner setting)
    int8_checked: bool = False
    # target options the user set (the rest of ``options`` are defaults): never overridden by
    # the int8 search or fallbacks
    explicit: frozenset[str] = frozenset()
    # the command's --time-budget (edgebrain.progress.Deadline); steps that can stop part-way ask it
    deadline: Any = None

    def calib(self) -> CalibrationSet:
        if self.calibration is None:
            raise ConversionError("this precision needs calibration images (--calib DIR or a model card with "
                                  "a data root)")
        return self.calibration()


@dataclass
class Built:
    """A target's result: files written into the build folder plus manifest fragments."""

    model_file: str  # relative to the build folder
    quantization: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    runtime_options: dict[str, Any] = field(default_factory=dict)
    ops: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # every file of the artifact (model_file included)
    names: dict[str, Any] | None = None  # debugging names removed from the model file (strip_names)


class Target(ABC):
    name: ClassVar[str]
    runtime: ClassVar[str]  # the edge runtime that loads it
    suffix: ClassVar[str]  # the model file's suffix
    precisions: ClassVar[tuple[str, ...]]
    source_formats: ClassVar[tuple[str, ...]] = ("tf-keras", "keras3", "onnx")
    options: ClassVar[dict[str, Any]] = {}  # option name -> default
    # int8 settings tried, in order, when the default int8 artifact agrees with the source on fewer
    # than --int8-fallback-below of the validation images (a key "calib_method" sets the calibration
    # method; other keys are target options). The user's explicit settings are never overridden.
    int8_fallbacks: ClassVar[list[dict[str, Any]]] = []
    # int8 weight scales: the target's per-channel option (True / False / "auto", see weight_scales),
    # whether auto may choose per-tensor for a model without depthwise convolutions, and the
    # fallbacks used instead of int8_fallbacks when auto chose per-tensor (per-channel first)
    weight_scale_option: ClassVar[str | None] = None
    per_tensor_without_depthwise: ClassVar[bool] = False
    int8_fallbacks_after_per_tensor: ClassVar[list[dict[str, Any]]] = []
    # int8 settings compared with the default on the validation split by every conversion (the
    # calibration methods the backend offers besides its default); the best is kept
    int8_candidates: ClassVar[list[dict[str, Any]]] = []
    option_help: ClassVar[dict[str, str]] = {}
    not_supported: ClassVar[dict[str, str]] = {}  # precision -> why not

    def unsupported(self, precision: str, source_format: str) -> str | None:
        """None when (precision, source format) can be built, else the reason it cannot."""
        if precision not in PRECISIONS:
            return f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})"
        if precision not in self.precisions:
            why = self.not_supported.get(precision, "")
            return (f"{self.name} does not offer {precision}" + (f": {why}" if why else "")
                    + f" (it offers {', '.join(self.precisions)})")
        if source_format not in self.source_formats:
            return f"{self.name} converts {', '.join(self.source_formats)} models, not {source_format}"
        return None

    @abstractmethod
    def build(self, ctx: BuildContext, precision: str, out: Path) -> Built:
        """Write the artifact's model file(s) for ``precision`` into ``out``."""

    def _per_channel(self, ctx: BuildContext) -> tuple[bool, str]:
        """(per-channel int8 weight scales?, why) from the target's ``weight_scale_option``."""
        if self.weight_scale_option is None:
            return True, "per-channel"
        return weight_scales(ctx, self.weight_scale_option, self.per_tensor_without_depthwise)

    def int8_fallbacks_for(self, ctx: BuildContext) -> list[dict[str, Any]]:
        """The int8 fallbacks that can differ from the default build for this source."""
        opt = self.weight_scale_option
        if opt and ctx.options.get(opt, "auto") == "auto" and not self._per_channel(ctx)[0]:
            return [dict(f) for f in self.int8_fallbacks_after_per_tensor]
        return list(self.int8_fallbacks)

    def int8_candidates_for(self, ctx: BuildContext) -> list[dict[str, Any]]:
        """The int8 settings to compare with the default build for this source."""
        return list(self.int8_candidates)

    def count_ops(self, model_file: Path) -> dict[str, Any] | None:
        """{int8_ops, float_ops, float_op_types, ...} from the written model, where countable."""
        return None

    def load(self, artifact: Artifact, threads: int | None = None) -> Runner:
        from edgebrain.runtime import load_runner

        return load_runner(artifact, threads=threads, use_registry=False)  # no loop back to this target


def equalized_source(ctx: BuildContext) -> tuple[Source, dict[str, Any]]:
    """``ctx.source`` after cross-layer equalisation of its depthwise -> pointwise pairs, checked on
    the first 32 calibration images, and the manifest block that says so."""
    from edgebrain.errors import ModelError

    probe = ctx.calib().x[:32] if ctx.calibration is not None else None
    try:
        eq, rep = ctx.source.equalized(probe)
    except ModelError as exc:  # an optional optimisation: the build goes on without it
        return ctx.source, {"method": "cross-layer equalisation", "applied": False, "reason": str(exc)}
    spreads = [(r["spread_before"], r["spread_after"]) for r in rep["layers"]]
    block = {"method": "cross-layer equalisation of depthwise -> pointwise pairs (Nagel et al. 2019); "
                       "the float model is unchanged",
             "pairs": rep["pairs"],
             "depthwise_range_spread": ({"before_median": float(np.median([b for b, _ in spreads])),
                                         "after_median": float(np.median([a for _, a in spreads])),
                                         "before_max": float(max(b for b, _ in spreads)),
                                         "after_max": float(max(a for _, a in spreads))} if spreads else None),
             "max_abs_dp_vs_source": rep.get("max_abs_dp_vs_source"),
             "skipped": rep.get("skipped", [])}
    return eq, block


def weight_scales(ctx: BuildContext, option: str, per_tensor_without_depthwise: bool) -> tuple[bool, str]:
    """(per-channel int8 weight scales?, why) from a target's ``option`` (True, False or "auto").

    auto: per-tensor when the int8 build is verified with fallbacks (per-channel is then the first
    fallback), after cross-layer equalisation on models with depthwise convolutions; a model
    without them gets per-tensor only if ``per_tensor_without_depthwise``."""
    opt = ctx.options.get(option, "auto")
    if isinstance(opt, bool):
        return opt, "set explicitly"
    if str(opt).lower() != "auto":
        raise ConversionError(f"{option} must be true, false or auto, got {opt!r}")
    dw = depthwise_layers(ctx.source.model) if ctx.source.is_keras else 0
    if not dw and not per_tensor_without_depthwise:
        return True, "auto: per-channel"
    if not ctx.int8_checked:
        return True, "auto: per-channel (the int8 build is not verified with fallbacks)"
    clusters = getattr(ctx.source, "notes", {}).get("weight_clusters")
    if dw and clusters:
        return True, (f"auto: per-channel ({dw} depthwise/separable convolution layer(s), weights clustered to "
                      f"{clusters} values per layer: equalisation would rescale each channel's copy of those "
                      "values differently and the int8 file would compress worse)")
    if dw and ctx.options.get("equalize", "auto") is False:
        return True, f"auto: per-channel ({dw} depthwise/separable convolution layer(s), no equalisation)"
    left = unequalizable(ctx.source.model) if dw else []
    if left:
        return True, (f"auto: per-channel ({len(left)} of {dw} depthwise/separable convolution layer(s) cannot be "
                      f"cross-layer equalised, e.g. {left[0]['layer']}: {left[0]['reason']})")
    return False, ("auto: per-tensor ("
                   + (f"{dw} depthwise/separable convolution layer(s), cross-layer equalised; " if dw else
                      "no depthwise convolution; ")
                   + "verified on the validation split, per-channel is the first fallback)")


def equalize_wanted(ctx: BuildContext, per_channel: bool) -> bool:
    """The ``equalize`` option: auto (per-tensor weights on a model with depthwise convolutions),
    True (every int8 build of a Keras source) or False."""
    opt = ctx.options.get("equalize", "auto")
    if not ctx.source.is_keras:
        if opt is True:
            raise ConversionError("--equalize needs a Keras source (cross-layer equalisation rescales its weights)")
        return False
    if isinstance(opt, bool):
        return opt
    if str(opt).lower() != "auto":
        raise ConversionError(f"equalize must be true, false or auto, got {opt!r}")
    return not per_channel and depthwise_layers(ctx.source.model) > 0


def unequalizable(model: Any) -> list[dict[str, str]]:
    """The depthwise layers of a Keras model that cross-layer equalisation leaves alone, with why."""
    from .equalize import equalization_plan

    return list(equalization_plan(model)["skipped"])


def depthwise_layers(model: Any) -> int:
    """Depthwise / separable convolution layers in a Keras model (nested models included)."""
    n = 0
    for layer in getattr(model, "layers", []):
        if type(layer).__name__ in ("DepthwiseConv2D", "SeparableConv2D"):
            n += 1
        elif getattr(layer, "layers", None):
            n += depthwise_layers(layer)
    return n


def gzip_size(path: Path) -> int:
    with open(path, "rb") as fh:
        return len(gzip.compress(fh.read(), compresslevel=9))


def file_sizes(folder: Path, files: list[str]) -> dict[str, Any]:
    size = sum(os.path.getsize(folder / f) for f in files)
    gz = sum(gzip_size(folder / f) for f in files)
    return {"size_bytes": size, "gzip_bytes": gz}


def activation_bytes(src: Source) -> int:
    """Bytes of the float activations of one image through ``src`` (0 when unknown): the ONNX
    graph's inferred shapes, or the Keras layers' output shapes."""
    try:
        if not src.is_keras and src.onnx_file is not None:
            from .onnx_target import activation_bytes_per_image

            return activation_bytes_per_image(Path(src.onnx_file))
        total = 0
        for layer in src.model.layers:
            outs = layer.output if isinstance(layer.output, (list, tuple)) else [layer.output]
            for t in outs:
                total += 4 * int(np.prod([d or 1 for d in tuple(t.shape)[1:]]))
        return total
    except Exception:  # an estimate: unknown shapes leave the default batch
        return 0


def inference_batch(src: Source, most: int = 64) -> int:
    """Images per inference call (verification, the source's reference outputs) within the step
    memory budget (:func:`edgebrain.memory.step_budget`), counting the runtime's working memory as
    twice the activations, at most ``most``: a VGG16 at 240 px has about 127 MB of activations per
    image, so 64 at once would take over 10 GB."""
    from edgebrain.memory import step_budget

    from .onnx_target import RUNTIME_FACTOR

    per = activation_bytes(src) * RUNTIME_FACTOR
    return most if per <= 0 else int(max(1, min(most, step_budget() // per)))
