"""``edgebrain bench --robustness``: accuracy and agreement under a fixed, seeded set of perturbations.

Every model (the FP32 reference and each artifact) sees the same perturbed images: each
evaluation scan is decoded at its original resolution, perturbed (:data:`edgebrain.perturb.SUITE`:
gamma, contrast, noise, blur, JPEG quality, resolution, greyscale), then resized and preprocessed
exactly as that model's spec says (resize method, normalisation, mean/std). Noise is seeded per
image and condition, so a run is reproducible. A seeded, stratified subsample keeps the suite
affordable (``per_class``).

Per model and condition: accuracy, the drop from its own clean accuracy (percentage points),
top-1 agreement with the reference under the same perturbation, and stability (agreement with its
own clean predictions). Per artifact: whether it degrades more than the reference under each
perturbation (``extra_drop_pp``: its drop minus the reference's drop).
Edge artifacts run through the TensorFlow-free :class:`edgebrain.predict.Predictor`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from . import data as D
from . import perturb as P
from .errors import DataError, ImageLoadError
from .imageio import load_rgb, resize_rgb

log = logging.getLogger(__name__)

Model = Callable[[np.ndarray], np.ndarray]  # uint8 RGB batch at the model size -> probabilities
# An artifact "degrades more" than the reference when its extra drop exceeds this many points
# and two images (one image alone is noise).
MORE_PP = 1.0


def conditions(suite: Sequence[tuple[str, Sequence[float]]] = P.SUITE) -> list[tuple[str, float]]:
    return [(name, float(s)) for name, strengths in suite for s in strengths]


def condition_label(name: str, strength: float) -> str:
    if name == "resolution":
        return f"resolution {int(strength)} px" if strength > 4 else f"resolution {strength:g}x"
    return "grayscale" if name == "grayscale" else f"{name} {strength:g}"


def _model_fn(item: Any, threads: int | None, unsafe: bool) -> Model:
    """A bench Item -> a function of uint8 RGB batches at the model size (outputs in the item's order)."""
    if item.kind == "edge":
        from .predict import Predictor

        pred = Predictor(item.artifact, threads=threads, verify=False, warmup=False)
        return pred.infer
    from .bench import KerasRunner

    # threads=None: TensorFlow may already be initialised in this process (its thread pools are fixed then)
    runner = KerasRunner(str(item.path), None, "cpu", unsafe)
    spec = item.spec
    return lambda x: runner.run(spec.apply(x))


def _decode(samples: Sequence[D.Sample]) -> tuple[list[np.ndarray], list[D.Sample], list[dict[str, str]]]:
    imgs: list[np.ndarray] = []
    kept: list[D.Sample] = []
    failed: list[dict[str, str]] = []
    for s in samples:
        try:
            imgs.append(load_rgb(s.path))
            kept.append(s)
        except ImageLoadError as exc:
            failed.append({"file": s.rel, "problem": exc.reason})
    return imgs, kept, failed


def _predict(fn: Model, imgs: Sequence[np.ndarray], spec: Any, perm: list[int], batch: int = 32) -> np.ndarray:
    """Resize with the model's own method, run in batches -> predicted class (dataset order)."""
    out: list[np.ndarray] = []
    for i in range(0, len(imgs), batch):
        x = np.stack([resize_rgb(im, spec.size, spec.resize) for im in imgs[i:i + batch]])
        out.append(np.asarray(fn(x))[:, perm].argmax(axis=1))
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


def evaluate(items: Sequence[Any], reference: Any | None, samples: Sequence[D.Sample], class_names: Sequence[str],
             *, per_class: int | None = 50, seed: int = 0, threads: int | None = None, unsafe: bool = False,
             suite: Sequence[tuple[str, Sequence[float]]] = P.SUITE,
             say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the suite on ``reference`` (optional) and ``items`` -> the ``robustness`` block of results.json."""
    from .bench import _class_perm

    say = say or log.info
    chosen = D.subset(list(samples), per_class, seed) if per_class else list(samples)
    imgs, kept, failed = _decode(chosen)
    if not kept:
        raise DataError("robustness: none of the chosen images could be decoded")
    y = np.asarray([s.label for s in kept], np.int64)
    models = ([reference] if reference is not None else []) + list(items)
    fns = [_model_fn(it, threads, unsafe) for it in models]
    perms = [_class_perm(it, class_names) for it in models]
    conds = [("clean", 0.0), *conditions(suite)]
    preds = np.zeros((len(models), len(conds), len(kept)), np.int64)
    for ci, (name, strength) in enumerate(conds):
        say(f"robustness: {ci + 1}/{len(conds)} {condition_label(name, strength) if ci else 'clean'} "
            f"({len(kept)} images x {len(models)} model(s))")
        pert = imgs if name == "clean" else [P.apply(name, im, strength, seed=(seed, ci, k))
                                             for k, im in enumerate(imgs)]
        for mi, (it, fn) in enumerate(zip(models, fns)):
            preds[mi, ci] = _predict(fn, pert, it.spec, perms[mi])
    records = [_model_record(it, preds[mi], y, conds, preds[0] if reference is not None else None,
                             is_ref=(reference is not None and mi == 0)) for mi, it in enumerate(models)]
    if reference is not None:
        for rec in records[1:]:
            _vs_reference(rec, records[0], len(kept))
    return {"n": len(kept), "per_class": per_class, "seed": seed, "device": "host",
            "suite": [{"perturbation": n, "strengths": [float(s) for s in st]} for n, st in suite],
            "reference": records[0] if reference is not None else None,
            "results": records[1:] if reference is not None else records, "failed": failed}


def _model_record(item: Any, pred: np.ndarray, y: np.ndarray, conds: list[tuple[str, float]],
                  ref_pred: np.ndarray | None, is_ref: bool) -> dict[str, Any]:
    clean = float((pred[0] == y).mean())
    rows = []
    for ci, (name, strength) in enumerate(conds[1:], start=1):
        acc = float((pred[ci] == y).mean())
        rows.append({"perturbation": name, "strength": strength, "label": condition_label(name, strength),
                     "accuracy": acc, "drop_pp": round((clean - acc) * 100.0, 3),
                     "stability": float((pred[ci] == pred[0]).mean()),
                     "agreement_reference": None if ref_pred is None else float((pred[ci] == ref_pred[ci]).mean())})
    worst = max(rows, key=lambda r: r["drop_pp"]) if rows else None
    per_pert: dict[str, dict[str, Any]] = {}
    for r in rows:
        cur = per_pert.get(r["perturbation"])
        if cur is None or r["drop_pp"] > cur["drop_pp"]:
            per_pert[r["perturbation"]] = {"strength": r["strength"], "drop_pp": r["drop_pp"],
                                           "accuracy": r["accuracy"]}
    return {"name": item.name, "path": str(item.path), "target": item.target, "precision": item.precision,
            "reference": is_ref, "clean_accuracy": clean, "conditions": rows, "worst_by_perturbation": per_pert,
            "worst_drop_pp": worst["drop_pp"] if worst else 0.0, "worst_condition": worst["label"] if worst else None}


def _vs_reference(rec: dict[str, Any], ref: dict[str, Any], n: int) -> None:
    """Does the artifact lose more than the reference under each perturbation? More means an extra
    drop above MORE_PP points and above two images (one flip alone is noise)."""
    limit = max(MORE_PP, 200.0 / max(1, n))
    out = []
    for mine, theirs in zip(rec["conditions"], ref["conditions"]):
        extra = round(mine["drop_pp"] - theirs["drop_pp"], 3)
        out.append({"label": mine["label"], "extra_drop_pp": extra, "more_than_reference": extra > limit})
    rec["vs_reference"] = out
    rec["degrades_more_than_reference"] = [r["label"] for r in out if r["more_than_reference"]]
    rec["max_extra_drop_pp"] = max((r["extra_drop_pp"] for r in out), default=0.0)


# ----------------------------------------------------------------------------- tables and plot


def _models(rob: dict[str, Any]) -> list[dict[str, Any]]:
    return ([rob["reference"]] if rob.get("reference") else []) + list(rob.get("results") or [])


def _label(rec: dict[str, Any]) -> str:
    return f"reference ({rec['name']})" if rec.get("reference") else f"{rec['name']} ({rec['precision']})"


def summary_rows(rob: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Model | clean accuracy | worst drop per perturbation (pp) | worst | worse than the reference under."""
    perts = [s["perturbation"] for s in rob.get("suite", [])]
    cols = ["model", "clean acc", *[f"{p} Δpp" for p in perts], "worst Δpp", "degrades more than FP32 under"]
    rows = []
    for rec in _models(rob):
        w = rec.get("worst_by_perturbation", {})
        more = rec.get("degrades_more_than_reference")
        rows.append([_label(rec), f"{100 * rec['clean_accuracy']:.2f}%",
                     *[f"{w[p]['drop_pp']:+.1f}" if p in w else "-" for p in perts],
                     f"{rec['worst_drop_pp']:+.1f} ({rec['worst_condition']})",
                     "-" if more is None else (", ".join(more) or "none")])
    return cols, rows


def condition_rows(rob: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Condition | accuracy of each model (its drop in pp) | agreement with the reference."""
    models = _models(rob)
    cols = ["condition", *[_label(m) for m in models]]
    rows = [["clean", *[f"{100 * m['clean_accuracy']:.1f}%" for m in models]]]
    for i, c in enumerate(models[0]["conditions"] if models else []):
        cells = [c["label"]]
        for m in models:
            r = m["conditions"][i]
            agree = "" if r.get("agreement_reference") is None or m.get("reference") else \
                f", agree {100 * r['agreement_reference']:.0f}%"
            cells.append(f"{100 * r['accuracy']:.1f}% ({0.0 - r['drop_pp']:+.1f}{agree})")
        rows.append(cells)
    return cols, rows


def markdown(rob: dict[str, Any]) -> list[str]:
    if rob.get("error"):
        return ["## Robustness", "", f"Not measured: {rob['error']}", ""]
    lines = ["## Robustness", "",
             f"{rob['n']} images ({rob.get('per_class') or 'all'} per class, seed {rob['seed']}), perturbed on the "
             "original scan, then resized and preprocessed as each model's spec says. Δpp: accuracy drop from the "
             "model's own clean accuracy, worst strength per perturbation.", ""]
    for cols, rows in (summary_rows(rob), condition_rows(rob)):
        lines += ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
        lines += ["| " + " | ".join(rows_i) + " |" for rows_i in rows]
        lines.append("")
    if rob.get("failed"):
        lines += [f"- skipped {f['file']}: {f['problem']}" for f in rob["failed"]] + [""]
    return lines


def plot(rob: dict[str, Any]) -> Any:
    """Accuracy against strength, one panel per perturbation, one line per model (a matplotlib Figure)."""
    from matplotlib.figure import Figure

    suite = rob.get("suite", [])
    models = _models(rob)
    fig = Figure(figsize=(3.2 * max(1, len(suite)), 3.0))
    axes = fig.subplots(1, max(1, len(suite)), squeeze=False)[0]
    for ax, s in zip(axes, suite):
        xs = [str(int(v)) if v > 4 else f"{v:g}" for v in s["strengths"]]
        for m in models:
            acc = [100 * c["accuracy"] for c in m["conditions"] if c["perturbation"] == s["perturbation"]]
            ax.plot(["clean", *xs], [100 * m["clean_accuracy"], *acc], marker="o",
                    linestyle="--" if m.get("reference") else "-", label=_label(m))
        ax.set_title(s["perturbation"], fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_ylabel("accuracy %", fontsize=8)
    axes[0].legend(fontsize=6, loc="lower left")
    return fig


def robustness_table(rob: dict[str, Any]) -> Any:
    """A rich Table of :func:`summary_rows` for the console."""
    from rich.table import Table

    if rob.get("error"):
        return f"robustness: not measured: {rob['error']}"
    cols, rows = summary_rows(rob)
    t = Table(title=f"robustness: n={rob['n']}, worst accuracy drop per perturbation (pp)")
    for c in cols:
        t.add_column(c, justify="left" if c in ("model", cols[-1]) else "right")
    for r in rows:
        t.add_row(*r)
    return t
