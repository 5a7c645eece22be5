"""Does the int8 search's validation criterion rank calibration settings as the Testing split does?

    python benchmarks/int8_search.py --model artifacts/models/resnet50-lite-128 \\
        --data ../shared/data/brain-tumor-mri-224 --out artifacts/int8-search-lite [--md FILE]

``edgebrain convert`` builds, for each int8 target, the calibration settings its backend offers
(ONNX: min/max and percentile; OpenVINO: NNCF exact and fast bias correction; plus NNCF's
mean-min/max ranges here for comparison) and keeps the best on the validation split: highest top-1
agreement with the FP32 source, ties broken by the lowest mean KL divergence. This script builds
every setting on its own (``int8_search=False``, the setting given explicitly), then measures each
on the validation split (what the search sees) and on the whole Testing split (what it must
predict): top-1 agreement, flipped images, mean KL(source || artifact), accuracy, and the largest
drop of one class's recall. It marks the setting the search keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("EDGEBRAIN_QUIET", "1")

# (target, label, convert keyword arguments); the first of each target is its default
SETTINGS: list[tuple[str, str, dict[str, Any]]] = [
    ("onnx", "min/max (default)", {}),
    ("onnx", "percentile", {"calib_method": "percentile"}),
    ("openvino", "exact bias correction (default)", {}),
    ("openvino", "fast bias correction", {"nncf_fast_bias_correction": True}),
    ("openvino", "mean_minmax ranges (not searched)", {"nncf_activation_range": "mean_minmax"}),
]
SEARCHED = {("onnx", "min/max (default)"), ("onnx", "percentile"), ("openvino", "exact bias correction (default)"),
            ("openvino", "fast bias correction")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)

    from edgebrain.convert import _Data, convert
    from edgebrain.converters.source import load_source
    from edgebrain.metrics import agreement
    from edgebrain.runtime import load_runner

    src = load_source(args.model)
    dd = _Data(src, args.data)
    splits = {}
    for split in ("val", "test"):
        arr = dd.arrays(split, src.spec.size)
        x = src.spec.apply(arr.x).astype(np.float32)
        splits[split] = (x, np.asarray(arr.y), src.predict(x))

    rows: list[dict[str, Any]] = []
    for target, label, kw in SETTINGS:
        folder = args.out / f"{target}-{label.split(' ')[0].replace('/', '')}"
        # measured here, not gated: a setting below the verification threshold is still measured
        art = convert(args.model, target, "int8", folder, data=args.data, int8_search=False, int8_fallback_below=None,
                      min_agreement=0.01, overwrite=True, **kw)[0]
        runner = load_runner(art)
        row: dict[str, Any] = {"target": target, "setting": label, "size_bytes": art.manifest["size"]["size_bytes"]}
        for split, (x, y, ref) in splits.items():
            p = np.concatenate([np.asarray(runner.run(x[i : i + 32])) for i in range(0, len(x), 32)])
            ag = agreement(ref, p)
            recall_drop = max(float(np.mean(ref.argmax(1)[y == c] == c) - np.mean(p.argmax(1)[y == c] == c))
                              for c in np.unique(y))
            row[split] = {"n": int(len(x)), "agreement": ag["top1_agreement"], "mean_kl": ag["mean_kl"],
                          "flips": int(np.sum(ref.argmax(1) != p.argmax(1))),
                          "accuracy": float(np.mean(p.argmax(1) == y)), "source_accuracy": float(np.mean(ref.argmax(1) == y)),
                          "largest_recall_drop_pp": 100 * recall_drop}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def chosen(target: str) -> str:
        cands = [r for r in rows if r["target"] == target and (target, r["setting"]) in SEARCHED]
        return max(cands, key=lambda r: (r["val"]["agreement"], -r["val"]["mean_kl"]))["setting"]

    lines = [f"Model: `{args.model}`; validation {splits['val'][0].shape[0]} images, Testing {splits['test'][0].shape[0]} "
             "images.", "",
             "| target | setting | val agreement % (flips) | val mean KL | Testing agreement % (flips) | Testing mean KL "
             "| Testing accuracy % (Δ pp) | largest recall drop (pp) | kept by the search |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v, t = r["val"], r["test"]
        keep = "**yes**" if (r["target"], r["setting"]) in SEARCHED and chosen(r["target"]) == r["setting"] else ""
        lines.append(f"| {r['target']} | {r['setting']} | {100 * v['agreement']:.2f} ({v['flips']}) | {v['mean_kl']:.2e} | "
                     f"{100 * t['agreement']:.2f} ({t['flips']}) | {t['mean_kl']:.2e} | {100 * t['accuracy']:.2f} "
                     f"({100 * (t['accuracy'] - t['source_accuracy']):+.2f}) | {t['largest_recall_drop_pp']:.2f} | {keep} |")
    md = "\n".join(lines) + "\n"
    print(md)
    (args.out / "int8_search.json").write_text(json.dumps(rows, indent=1))
    if args.md:
        args.md.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
