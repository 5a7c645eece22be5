"""Where in the image a prediction comes from: heatmaps, boxes and PNG overlays.

* :func:`occlusion` works with any model given as a function ``uint8 RGB batch -> probabilities``,
  so with every edge artifact (TFLite, ONNX, OpenVINO) and TensorFlow-free. Patches are slid
  over the image, coarse to fine, in batches, until a time budget is spent; the heatmap is the
  drop in the class probability when a pixel is covered.
* :func:`gradcam` (Selvaraju et al., 2017) needs the Keras model and TensorFlow (imported
  lazily, full install only).
* :func:`saliency_drift` compares two maps of the same image and class (e.g. the int8 artifact's
  and the FP32 model's): 1 - Pearson correlation, Spearman correlation, and the boxes' IoU.
* :func:`render_overlay` writes the heatmap and box over the original image as a PNG.

Heatmaps are float32 (H, W) in [0, 1] at the model's input size; boxes are
(x0, y0, x1, y1) in pixels, x1/y1 exclusive.
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .io import atomic_write_bytes

Box = tuple[int, int, int, int]
ProbFn = Callable[[np.ndarray], np.ndarray]  # uint8 RGB (N, H, W, 3) -> probabilities (N, C)


@dataclass
class Explanation:
    method: str  # "occlusion" | "gradcam"
    class_index: int
    heatmap: np.ndarray  # float32 (H, W) in [0, 1], model input size
    box: Optional[Box]  # model-input pixels; None when no region changes the prediction
    class_name: str | None = None
    baseline_prob: float | None = None
    max_drop: float | None = None  # occlusion: largest drop in the class probability
    evaluations: int = 0
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    positions: list[Box] = field(default_factory=list)  # occlusion patches evaluated

    def box_in(self, size_hw: tuple[int, int]) -> Optional[Box]:
        """The box scaled from the model input to an image of ``size_hw`` (height, width)."""
        if self.box is None:
            return None
        h0, w0 = self.heatmap.shape
        h, w = size_hw
        x0, y0, x1, y1 = self.box
        return (int(math.floor(x0 * w / w0)), int(math.floor(y0 * h / h0)),
                int(math.ceil(x1 * w / w0)), int(math.ceil(y1 * h / h0)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "class": self.class_name, "class_index": self.class_index,
            "box": list(self.box) if self.box else None,
            "baseline_prob": None if self.baseline_prob is None else round(self.baseline_prob, 6),
            "max_drop": None if self.max_drop is None else round(self.max_drop, 6),
            "evaluations": self.evaluations, "seconds": round(self.seconds, 3), "params": self.params,
        }


# ----------------------------------------------------------------------------- boxes


def _dilate(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    out[1:] |= m[:-1]
    out[:-1] |= m[1:]
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    return out


def box_from_heatmap(heat: np.ndarray, threshold: float = 0.5) -> Optional[Box]:
    """Bounding box of the connected region (4-neighbour) around the peak where the map is at
    least ``threshold`` x its peak. None for a flat or empty map."""
    heat = np.asarray(heat, np.float32)
    peak = float(heat.max()) if heat.size else 0.0
    if not np.isfinite(peak) or peak <= 0.0 or float(heat.min()) >= peak:
        return None
    mask = heat >= threshold * peak
    region = np.zeros_like(mask)
    region[np.unravel_index(int(np.argmax(heat)), heat.shape)] = True
    while True:
        grown = _dilate(region) & mask
        if np.array_equal(grown, region):
            break
        region = grown
    ys, xs = np.nonzero(region)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def box_iou(a: Optional[Box], b: Optional[Box]) -> float | None:
    if a is None or b is None:
        return None
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else None


# ----------------------------------------------------------------------------- occlusion


def _grid(n: int, patch: int, stride: int) -> list[int]:
    """Patch origins along one axis: every ``stride``, the last one flush with the edge."""
    if patch >= n:
        return [0]
    out = list(range(0, n - patch + 1, stride))
    if out[-1] != n - patch:
        out.append(n - patch)
    return out


def _positions(h: int, w: int, patch: int, stride: int) -> list[Box]:
    return [(x, y, x + patch, y + patch) for y in _grid(h, patch, stride) for x in _grid(w, patch, stride)]


def _fill_value(img: np.ndarray, fill: str) -> np.ndarray:
    if fill == "mean":
        return img.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
    if fill == "black":
        return np.zeros(3, np.uint8)
    raise ValueError(f"unknown occlusion fill {fill!r} (mean | black)")


class _Evaluator:
    """Runs occluded copies in fixed-size batches (no interpreter re-allocation; falls back to
    batch 1 for models with a fixed batch dimension) and accumulates the heatmap."""

    def __init__(self, fn: ProbFn, img: np.ndarray, class_index: int, batch: int, fill: np.ndarray) -> None:
        self.fn, self.img, self.ci, self.batch, self.fill = fn, img, class_index, max(1, batch), fill
        h, w = img.shape[:2]
        self.sum = np.zeros((h, w), np.float64)
        self.cnt = np.zeros((h, w), np.float64)
        self.base = float(self._run(img[None])[0, class_index])
        self.done: list[Box] = []
        self.seconds_per_eval: float | None = None

    def _run(self, xb: np.ndarray) -> np.ndarray:
        return np.asarray(self.fn(xb), np.float32)

    def run(self, boxes: list[Box]) -> None:
        i = 0
        while i < len(boxes):
            chunk = boxes[i:i + self.batch]
            i += len(chunk)
            xb = np.repeat(self.img[None], self.batch, axis=0)
            for j, (x0, y0, x1, y1) in enumerate(chunk):
                xb[j, y0:y1, x0:x1] = self.fill
            t0 = time.perf_counter()
            try:
                probs = self._run(xb)[: len(chunk), self.ci]
            except Exception:
                if self.batch == 1:
                    raise
                self.batch = 1  # a model with a fixed batch of one
                probs = np.array([self._run(xb[j:j + 1])[0, self.ci] for j in range(len(chunk))])
            dt = (time.perf_counter() - t0) / max(1, len(chunk))
            self.seconds_per_eval = dt if self.seconds_per_eval is None else 0.5 * (self.seconds_per_eval + dt)
            for (x0, y0, x1, y1), p in zip(chunk, probs):
                self.sum[y0:y1, x0:x1] += self.base - float(p)
                self.cnt[y0:y1, x0:x1] += 1.0
            self.done.extend(chunk)

    def drop_map(self) -> np.ndarray:
        return np.where(self.cnt > 0, self.sum / np.maximum(self.cnt, 1.0), 0.0)


def occlusion(fn: ProbFn, image: np.ndarray, class_index: int, budget_s: float = 10.0,
              patch: float | int = 0.2, batch: int = 16, fill: str = "mean", min_stride: int = 2,
              positions: list[Box] | None = None, class_name: str | None = None,
              threshold: float = 0.5) -> Explanation:
    """Occlusion sensitivity (Zeiler & Fergus, 2014) of ``class_index`` for one image.

    ``image`` is uint8 RGB at the model's input size; ``fn`` maps such a batch to probabilities.
    The patch (a fraction of the image side, or pixels) is slid first with stride = patch, then
    with the stride halved level by level down to ``min_stride``; each finer level is spent
    first where the map is hottest, and evaluation stops when ``budget_s`` is spent (the
    first, non-overlapping level always runs so that the whole image is covered).
    ``positions``, when given, evaluates exactly those patches (no budget): used to compare two
    models on identical occlusions.
    """
    t0 = time.perf_counter()
    img = np.ascontiguousarray(image, dtype=np.uint8)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3); got {img.shape}")
    h, w = img.shape[:2]
    p = int(round(patch * min(h, w))) if isinstance(patch, float) else int(patch)
    p = max(1, min(p, h, w))
    fillv = _fill_value(img, fill)
    ev = _Evaluator(fn, img, class_index, batch, fillv)
    levels: list[dict[str, Any]] = []
    if positions is not None:
        ev.run(list(positions))
        levels.append({"stride": None, "evaluated": len(positions), "of": len(positions)})
    else:
        deadline = t0 + float(budget_s)
        stride = p
        seen: set[Box] = set()
        while True:
            cand = [b for b in _positions(h, w, p, stride) if b not in seen]
            if not levels:
                todo = cand  # the coarse level always runs: full coverage
            else:
                left = deadline - time.perf_counter()
                per = ev.seconds_per_eval or 1e-3
                can = int(left / per)
                if can <= 0:
                    break
                if can < len(cand):
                    # Finest detail where the current map is hottest.
                    heat = ev.drop_map()
                    cand.sort(key=lambda b: -float(heat[b[1]:b[3], b[0]:b[2]].mean()))
                    can = (can // ev.batch) * ev.batch or can
                todo = cand[:can]
            ev.run(todo)
            seen.update(todo)
            levels.append({"stride": stride, "evaluated": len(todo), "of": len(cand)})
            if stride <= min_stride or len(todo) < len(cand):
                break
            stride = max(min_stride, stride // 2)
    drop = ev.drop_map().astype(np.float32)
    max_drop = float(drop.max())
    heat = np.clip(drop, 0.0, None)
    heat = heat / max_drop if max_drop > 1e-6 else np.zeros_like(heat)
    return Explanation(
        method="occlusion", class_index=int(class_index), class_name=class_name,
        heatmap=heat.astype(np.float32), box=box_from_heatmap(heat, threshold) if max_drop > 1e-6 else None,
        baseline_prob=ev.base, max_drop=max_drop, evaluations=len(ev.done) + 1,
        seconds=time.perf_counter() - t0,
        params={"patch": p, "fill": fill, "fill_value": fillv.tolist(), "batch": ev.batch, "levels": levels,
                "budget_s": None if positions is not None else float(budget_s), "threshold": threshold},
        positions=list(ev.done),
    )


# ----------------------------------------------------------------------------- Grad-CAM (TensorFlow)


def _last_conv_layer(model: Any) -> str:
    for layer in reversed(model.layers):
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4 and not layer.__class__.__name__.startswith("InputLayer"):
            return str(layer.name)
    raise ValueError("no 4-D (convolutional) layer found for Grad-CAM; pass layer=")


def gradcam(model: Any, image: np.ndarray, spec: Any, class_index: int, layer: str | None = None,
            class_name: str | None = None, threshold: float = 0.5) -> Explanation:
    """Grad-CAM of a tf-keras classifier for ``class_index``.

    ``image`` is uint8 RGB at the model's input size, ``spec`` its
    :class:`~edgebrain.preprocess.PreprocessSpec`. The gradient is taken of the class logit
    (the input of a final softmax Dense layer) when the model ends in one, else of the
    probability. ``layer`` defaults to the last layer with a 4-D output.
    """
    import importlib

    from .tfenv import import_tf

    tf = import_tf()
    K = importlib.import_module(type(model).__module__.split(".")[0])  # tf_keras or Keras 3: the model's own
    t0 = time.perf_counter()
    name = layer or _last_conv_layer(model)
    last = model.layers[-1]
    use_logit = (isinstance(last, K.layers.Dense)
                 and getattr(last.activation, "__name__", "") == "softmax")
    outs = [model.get_layer(name).output, last.input if use_logit else model.output]
    grad_model = K.Model(model.inputs, outs)
    x = tf.convert_to_tensor(spec.apply(np.asarray(image, np.uint8)[None].astype(np.float32)))
    with tf.GradientTape() as tape:
        conv, head = grad_model(x, training=False)
        if use_logit:
            score = tf.matmul(head, last.kernel[:, class_index:class_index + 1])[:, 0] + last.bias[class_index]
        else:
            score = head[:, class_index]
    grads = tape.gradient(score, conv)
    weights = tf.reduce_mean(grads, axis=(1, 2))  # (1, C)
    cam = tf.nn.relu(tf.reduce_sum(conv * weights[:, None, None, :], axis=-1))[0].numpy().astype(np.float32)
    h, w = image.shape[:2]
    from PIL import Image

    cam = np.asarray(Image.fromarray(np.ascontiguousarray(cam, np.float32)).resize((w, h), Image.BILINEAR), np.float32)
    peak = float(cam.max())
    heat = cam / peak if peak > 1e-12 else np.zeros_like(cam)
    prob = float(model(x, training=False).numpy()[0, class_index])
    return Explanation(
        method="gradcam", class_index=int(class_index), class_name=class_name, heatmap=heat,
        box=box_from_heatmap(heat, threshold) if peak > 1e-12 else None, baseline_prob=prob,
        evaluations=1, seconds=time.perf_counter() - t0,
        params={"layer": name, "score": "logit" if use_logit else "probability", "threshold": threshold},
    )


def keras_prob_fn(model: Any, spec: Any, batch: int = 64) -> ProbFn:
    """A Keras model as an occlusion ``fn`` (uint8 RGB batch -> probabilities). Needs TensorFlow."""

    def fn(xb: np.ndarray) -> np.ndarray:
        out = [model(spec.apply(xb[i:i + batch]), training=False).numpy() for i in range(0, len(xb), batch)]
        return np.concatenate(out).astype(np.float32)

    return fn


# ----------------------------------------------------------------------------- drift


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (Spearman)."""
    order = np.argsort(v, kind="mergesort")
    sv = v[order]
    ranks = np.empty(len(v), np.float64)
    _, start, counts = np.unique(sv, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    a = a - a.mean()
    b = b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else None


def saliency_drift(a: Explanation | np.ndarray, b: Explanation | np.ndarray,
                   box_a: Optional[Box] = None, box_b: Optional[Box] = None) -> dict[str, Any]:
    """How far two saliency maps of the same image and class disagree.

    ``drift`` = 1 - Pearson correlation of the [0, 1]-normalised maps (0: identical pattern,
    1: unrelated, 2: inverted); ``spearman`` is the rank correlation; ``box_iou`` the IoU of the
    two boxes. The maps must have the same shape (both at the model input size).
    """
    ha = a.heatmap if isinstance(a, Explanation) else np.asarray(a, np.float32)
    hb = b.heatmap if isinstance(b, Explanation) else np.asarray(b, np.float32)
    if ha.shape != hb.shape:
        raise ValueError(f"saliency maps differ in shape: {ha.shape} vs {hb.shape}")
    box_a = box_a if box_a is not None else (a.box if isinstance(a, Explanation) else box_from_heatmap(ha))
    box_b = box_b if box_b is not None else (b.box if isinstance(b, Explanation) else box_from_heatmap(hb))

    def norm(h: np.ndarray) -> np.ndarray:
        h = h.astype(np.float64).ravel()
        lo, hi = float(h.min()), float(h.max())
        return (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)

    na, nb = norm(ha), norm(hb)
    r = _pearson(na, nb)
    rs = _pearson(_ranks(na), _ranks(nb))
    return {
        "drift": None if r is None else round(1.0 - r, 6),
        "pearson": None if r is None else round(r, 6),
        "spearman": None if rs is None else round(rs, 6),
        "box_iou": None if (iou := box_iou(box_a, box_b)) is None else round(iou, 6),
        "box_a": list(box_a) if box_a else None,
        "box_b": list(box_b) if box_b else None,
    }


# ----------------------------------------------------------------------------- overlays

# Fallback colormap (matplotlib's "jet" anchors) when matplotlib is not installed.
_JET = np.array([[0, 0, 0.5], [0, 0, 1], [0, 0.5, 1], [0, 1, 1], [0.5, 1, 0.5], [1, 1, 0], [1, 0.5, 0],
                 [1, 0, 0], [0.5, 0, 0]], np.float32)


def colormap(heat: np.ndarray, name: str = "jet") -> np.ndarray:
    """[0, 1] map -> uint8 RGB via matplotlib's colormap (a built-in jet when it is absent)."""
    h = np.clip(np.asarray(heat, np.float32), 0.0, 1.0)
    try:
        from matplotlib import colormaps

        rgb = colormaps[name](h)[..., :3]
    except ImportError:
        pos = h * (len(_JET) - 1)
        i0 = np.floor(pos).astype(int).clip(0, len(_JET) - 2)
        t = (pos - i0)[..., None]
        rgb = _JET[i0] * (1 - t) + _JET[i0 + 1] * t
    return np.clip(np.rint(np.asarray(rgb) * 255.0), 0, 255).astype(np.uint8)


def render_overlay(image: np.ndarray, expl: Explanation, title: str | None = None, alpha: float = 0.5,
                   cmap: str = "jet", min_side: int = 256) -> bytes:
    """PNG bytes: the heatmap blended over ``image`` (uint8 RGB, any size; the original is best)
    with the box drawn and an optional title. Small images are enlarged to ``min_side``."""
    from PIL import Image, ImageDraw

    rgb = np.asarray(image, np.uint8)
    h, w = rgb.shape[:2]
    scale = max(1.0, min_side / max(1, min(h, w)))
    H, W = int(round(h * scale)), int(round(w * scale))
    base = Image.fromarray(rgb).resize((W, H), Image.BILINEAR) if (H, W) != (h, w) else Image.fromarray(rgb)
    heat = np.asarray(Image.fromarray(np.ascontiguousarray(expl.heatmap, np.float32)).resize((W, H), Image.BILINEAR))
    heat = np.clip(heat, 0.0, 1.0)
    colour = colormap(heat, cmap).astype(np.float32)
    a = (alpha * heat)[..., None]
    out = np.asarray(base, np.float32) * (1 - a) + colour * a
    im = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    box = expl.box_in((H, W))
    if box is not None:
        x0, y0, x1, y1 = box
        lw = max(2, int(round(min(H, W) / 128)))
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(0, 255, 0), width=lw)
    if title:
        tw = int(draw.textlength(title)) + 8
        draw.rectangle([0, 0, min(W, tw), 14], fill=(0, 0, 0))
        draw.text((4, 2), title, fill=(255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_overlay(path: str | Path, image: np.ndarray, expl: Explanation, title: str | None = None,
                  **kw: Any) -> Path:
    """Write :func:`render_overlay` to ``path`` atomically."""
    p = Path(path)
    atomic_write_bytes(p, render_overlay(image, expl, title, **kw))
    return p


# ----------------------------------------------------------------------------- one image, end to end


@dataclass
class ExplainResult:
    """Everything :func:`explain` computed for one image."""

    prediction: Any  # edgebrain.predict.Prediction
    original: np.ndarray  # uint8 RGB, the image as decoded (any size)
    occlusion: Explanation  # the artifact's map
    reference: Optional[Explanation] = None  # the reference model's map on the same occlusions
    gradcam: Optional[Explanation] = None  # Grad-CAM of the reference Keras model
    drift: Optional[dict[str, Any]] = None  # saliency_drift(occlusion, reference)

    def to_dict(self) -> dict[str, Any]:
        h, w = self.original.shape[:2]
        d: dict[str, Any] = {"occlusion": {**self.occlusion.to_dict(),
                                           "box_original": _lst(self.occlusion.box_in((h, w)))}}
        if self.reference is not None:
            d["reference_occlusion"] = {**self.reference.to_dict(),
                                        "box_original": _lst(self.reference.box_in((h, w)))}
        if self.gradcam is not None:
            d["gradcam"] = {**self.gradcam.to_dict(), "box_original": _lst(self.gradcam.box_in((h, w)))}
        if self.drift is not None:
            d["drift"] = self.drift
        return d


def _lst(b: Optional[Box]) -> list[int] | None:
    return list(b) if b is not None else None


def explain(predictor: Any, x: Any, budget_s: float = 10.0, patch: float | int = 0.2, batch: int = 16,
            reference: Any = None, reference_spec: Any = None, gradcam_layer: str | None = None,
            top_k: int | None = None) -> ExplainResult:
    """Classify ``x`` with ``predictor`` and localise its predicted class.

    ``reference`` (optional) is the FP32 model to compare with: another
    :class:`~edgebrain.predict.Predictor` (an FP32 artifact) or a tf-keras model (then also
    Grad-CAM; ``reference_spec`` defaults to the predictor's preprocessing). The reference map
    uses exactly the occlusions the artifact's map used, so the drift compares like with like;
    it is computed after the budget, which bounds the artifact's map only.
    """
    from .imageio import as_rgb_array, load_rgb, resize_rgb

    original = load_rgb(x) if isinstance(x, (str, Path)) else as_rgb_array(x)
    pred = predictor.predict(x, top_k=top_k, name=str(x) if isinstance(x, (str, Path)) else None)
    small = resize_rgb(original, predictor.size, predictor.spec.resize)
    occ = occlusion(predictor.infer, small, pred.index, budget_s=budget_s, patch=patch, batch=batch,
                    class_name=pred.label)
    res = ExplainResult(pred, original, occ)
    if reference is None:
        return res
    if hasattr(reference, "infer") and hasattr(reference, "size"):
        if tuple(reference.size) != tuple(predictor.size):
            raise ValueError(f"reference input size {reference.size} differs from the artifact's {predictor.size}")
        ref_small = resize_rgb(original, reference.size, reference.spec.resize)
        res.reference = occlusion(reference.infer, ref_small, pred.index, patch=occ.params["patch"], batch=batch,
                                  positions=occ.positions, class_name=pred.label)
    else:  # a tf-keras model
        spec = reference_spec or predictor.spec
        shape = tuple(int(d) for d in reference.input_shape[1:3])
        if shape != tuple(predictor.size):
            raise ValueError(f"reference model input size {shape} differs from the artifact's {predictor.size}")
        ref_small = resize_rgb(original, predictor.size, spec.resize)
        res.reference = occlusion(keras_prob_fn(reference, spec), ref_small, pred.index, patch=occ.params["patch"],
                                  batch=batch, positions=occ.positions, class_name=pred.label)
        try:
            res.gradcam = gradcam(reference, ref_small, spec, pred.index, layer=gradcam_layer, class_name=pred.label)
        except ValueError as exc:  # e.g. the conv layers are inside a nested base model: the maps go on without it
            logging.getLogger(__name__).warning("Grad-CAM of the reference skipped: %s", exc)
    res.drift = saliency_drift(occ, res.reference)
    return res
