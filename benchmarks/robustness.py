"""Robustness before/after: clean Testing accuracy and the worst drop under ``bench --robustness``.

For each model given as ``TAG=FOLDER`` (a trained model folder with model.keras + model_card.json,
read in place): convert it to TFLite FP32 and int8 (``edgebrain convert`` defaults, calibration from
the card's split), then one ``edgebrain bench`` run on the full Testing split with the Keras model as
the FP32 reference and ``--robustness`` on a seeded subsample. Writes a Markdown report with

* clean Testing accuracy of the reference and both artifacts (all 1311 images), and the change
  from the first model given (the targets: no more than 0.3 pp lower);
* the worst accuracy drop per perturbation (and overall) for every model and artifact, and
  whether int8 degrades more than FP32 under each perturbation.

Example::

    nice -n 10 .venv/bin/python benchmarks/robustness.py \\
        --model before=../main/artifacts/models/xception-ft-w025-96 \\
        --model after=artifacts/models/xception-ft-w025-96-robust \\
        --data ../shared/data/brain-tumor-mri-224 --out artifacts/robustness-bench \\
        --per-class 50 --md benchmarks/results/robustness.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("EDGEBRAIN_QUIET", "1")


def _convert(model: Path, out: Path, data: Path) -> tuple[list[Path], list[str]]:
    from edgebrain.convert import convert

    paths, problems = [], []
    for precision in ("fp32", "int8"):
        try:
            arts = convert(model / "model.keras", ["tflite"], [precision], out, data=data, overwrite=True)
            paths += [a.path for a in arts]
        except Exception as exc:  # a rejected artifact is reported, the others are still measured
            problems.append(f"tflite {precision}: {type(exc).__name__}: {exc}")
    return paths, problems


def _measure(tag: str, model: Path, data: Path, out: Path, per_class: int, seed: int,
             bench_per_class: int | None = None) -> dict[str, Any]:
    from edgebrain.bench import BenchOptions, bench
    from edgebrain.modelcard import ModelCard

    t0 = time.time()
    arts, problems = _convert(model, out / tag / "artifacts", data)
    opts = BenchOptions(threads=2, warmup=2, min_runs=10, min_seconds=0.2, throughput_min_runs=2,
                        throughput_min_seconds=0.1, n_boot=500, seed=seed)
    doc = bench(arts, data, device="host", reference=model / "model.keras", out=out / tag / "bench", options=opts,
                overwrite=True, robustness=True, robustness_per_class=per_class, per_class=bench_per_class,
                command=f"benchmarks/robustness.py ({tag})")
    card = ModelCard.find(model)
    return {"tag": tag, "model": str(model),
            "options": {"per_class": per_class, "seed": seed, "bench_per_class": bench_per_class},
            "preprocess": card.preprocess.to_dict() if card else None,
            "training": {k: v for k, v in (card.training if card else {}).items()
                         if k.startswith("aug_") or k in ("brightness", "flip", "normalize", "resize")},
            "convert_problems": problems, "results": {k: v for k, v in doc.items() if not k.startswith("_")},
            "seconds": round(time.time() - t0, 1)}


def _row_models(m: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(label, main bench record, robustness record) for the reference and each artifact."""
    res = m["results"]
    rob = res.get("robustness") or {}
    by_name = {r["name"]: r for r in rob.get("results") or []}
    rows = [("FP32 reference (Keras)", res["reference"], rob.get("reference") or {})]
    rows += [(f"TFLite {r['precision']}", r, by_name.get(r["name"], {})) for r in res["results"]]
    return rows


def markdown(models: list[dict[str, Any]], command: str) -> str:
    perts = [s["perturbation"] for s in (models[0]["results"].get("robustness") or {}).get("suite", [])]
    first = {label: rec["accuracy"] for label, rec, _ in _row_models(models[0])}
    lines = ["# Robustness before/after", "", f"Command: `{command}`", ""]
    for m in models:
        rob = m["results"].get("robustness") or {}
        pre = m["preprocess"] or {}
        lines.append(f"- **{m['tag']}**: `{m['model']}`; normalize `{pre.get('normalize', 'none')}`, resize "
                     f"`{pre.get('resize', 'bilinear')}`; training augmentation {json.dumps(m['training'])}; "
                     f"robustness on {rob.get('n')} images ({rob.get('per_class')} per class, seed {rob.get('seed')}); "
                     f"{m['seconds']} s" + (f"; conversion problems: {'; '.join(m['convert_problems'])}"
                                            if m["convert_problems"] else ""))
    lines += ["", "## Clean Testing accuracy (all images) and worst robustness drop", "",
              "| model | artifact | Testing acc | Δ vs " + models[0]["tag"] + " (pp) | worst drop (pp) | "
              + " | ".join(f"{p} (pp)" for p in perts) + " | int8 degrades more than FP32 under |",
              "|---|---|---:|---:|---:|" + "---:|" * len(perts) + "---|"]
    for m in models:
        for label, rec, r in _row_models(m):
            w = r.get("worst_by_perturbation") or {}
            more = r.get("degrades_more_than_reference")
            lines.append(
                f"| {m['tag']} | {label} | {100 * rec['accuracy']:.2f}% | "
                f"{100 * (rec['accuracy'] - first.get(label, rec['accuracy'])):+.2f} | "
                f"{r.get('worst_drop_pp', float('nan')):.1f} ({r.get('worst_condition')}) | "
                + " | ".join(f"{w[p]['drop_pp']:.1f}" if p in w else "-" for p in perts)
                + f" | {'-' if more is None else (', '.join(more) or 'none')} |")
    from edgebrain.robustness import condition_rows

    for m in models:
        rob = m["results"].get("robustness")
        if not rob or rob.get("error"):
            continue
        cols, rows = condition_rows(rob)
        lines += ["", f"## {m['tag']}: accuracy per condition (drop in pp; agreement with the reference)", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="TAG=MODEL_FOLDER (repeat; the first is the "
                                                                    "baseline)")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--bench-per-class", type=int, default=None, help="clean accuracy on a Testing subset "
                                                                      "(default: every Testing image)")
    ap.add_argument("--reuse", action="store_true", help="reuse OUT/TAG/measure.json of a model measured before "
                                                          "with the same options")
    a = ap.parse_args(argv)
    command = "python benchmarks/robustness.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    models = []
    for spec in a.model:
        tag, _, folder = spec.partition("=")
        if not folder or not (Path(folder) / "model.keras").is_file():
            ap.error(f"--model {spec}: expected TAG=FOLDER with model.keras inside")
        from edgebrain.io import atomic_write_json, atomic_write_text, read_json

        cached = a.out / tag / "measure.json"
        want = {"per_class": a.per_class, "seed": a.seed, "bench_per_class": a.bench_per_class}
        old = read_json(cached) if a.reuse and cached.is_file() else None
        if old and old.get("options") == want and old.get("model") == folder:
            models.append(old)
            print(f"== {tag}: reused {cached}", file=sys.stderr)
            continue
        print(f"== {tag}: {folder}", file=sys.stderr)
        models.append(_measure(tag, Path(folder), a.data, a.out, a.per_class, a.seed, a.bench_per_class))
        atomic_write_json(cached, models[-1])

    atomic_write_json(a.out / "robustness.json", {"command": command, "models": models})
    md = markdown(models, command)
    if a.md:
        atomic_write_text(a.md, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
