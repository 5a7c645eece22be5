"""Bench time grows linearly with the number of evaluation images.

    python benchmarks/bench_scaling.py [--model artifacts/models/resnet50-lite-128/model.keras]

Converts the trained model to TFLite int8 and ONNX fp32 (edgebrain.convert, cached), then runs
``edgebrain.bench.bench`` (reference + both artifacts, host, default timing rules) on fixed
stratified Testing subsets of 12 ... 200 images per class (48 / 100 / 200 / 400 / 800 images) and
fits wall time = fixed + per_image x n. Linear means the per-image cost is constant: the fit's
R^2 is ~1 and each run's time is within a few percent of the line; the per-image pass
(decode + preprocess + infer of every model, summed) costs the same per image at every size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGEBRAIN_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "artifacts" / "models" / "resnet50-lite-128" / "model.keras")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "brain-tumor-mri-224")
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench-scaling")
    ap.add_argument("--per-class", default="12,25,50,100,200")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--convert-only", action="store_true", help="Convert (cached), do not measure.")
    args = ap.parse_args()
    if not args.model.is_file():
        print(f"{args.model} not found (make models builds it)", file=sys.stderr)
        return 2

    from edgebrain.artifact import is_artifact_dir
    from edgebrain.bench import BenchOptions, bench
    from edgebrain.convert import convert

    adir = args.work / "artifacts"
    arts = [adir / n for n in ("tflite-int8", "onnx-fp32")]
    if not all(is_artifact_dir(a) for a in arts):
        a1 = convert(args.model, ["tflite"], ["int8"], adir, overwrite=True, threads=args.threads)
        a2 = convert(args.model, ["onnx"], ["fp32"], adir, overwrite=True, threads=args.threads)
        arts = [a1[0].path, a2[0].path]
    if args.convert_only:
        return 0
    rows = []
    opts = BenchOptions(threads=args.threads)
    for pc in [int(v) for v in args.per_class.split(",")]:
        load = [round(v, 2) for v in os.getloadavg()]
        with tempfile.TemporaryDirectory() as td:
            t0 = time.perf_counter()
            doc = bench(arts, args.data, device="host", reference=args.model, out=Path(td) / "o", per_class=pc,
                        options=opts)
            wall = time.perf_counter() - t0
        recs = [doc["reference"], *doc["results"]]
        per_model = {r["name"]: r["worker_wall_s"] for r in recs}
        # the per-image pass of every model (decode + preprocess + infer, summed over the images)
        image_pass = sum(r["e2e"]["total"]["mean"] * r["e2e"]["total"]["n"] for r in recs) / 1000.0
        rows.append({"per_class": pc, "n": doc["data"]["n"], "wall_s": wall, "worker_wall_s": per_model,
                     "image_pass_s": image_pass, "load_average": load})
        print(f"{doc['data']['n']} images: {wall:.1f} s (workers {per_model})", file=sys.stderr, flush=True)
    n = np.array([r["n"] for r in rows], float)
    t = np.array([r["wall_s"] for r in rows], float)
    slope, icept = np.polyfit(n, t, 1)
    pred = icept + slope * n
    r2 = 1.0 - float(np.sum((t - pred) ** 2) / np.sum((t - t.mean()) ** 2))
    summary = {"rows": rows, "fit": {"fixed_s": float(icept), "per_image_s": float(slope), "r2": r2,
                                     "max_rel_residual": float(np.max(np.abs(t - pred) / t))},
               "models": [str(a) for a in arts], "reference": str(args.model), "threads": args.threads}
    ip = np.array([r["image_pass_s"] for r in rows], float)
    per_img = ip / n
    summary["image_pass"] = {"ms_per_image": [float(v) * 1000 for v in per_img],
                             "spread_pct": float(100 * (per_img.max() - per_img.min()) / per_img.mean())}
    (args.work / "scaling.json").write_text(json.dumps(summary, indent=2))
    print("| images | bench wall s | line fit s | residual | per-image pass s (3 models) | ms per image | load average |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for r, p, q in zip(rows, pred, per_img):
        print(f"| {r['n']} | {r['wall_s']:.1f} | {p:.1f} | {100 * (r['wall_s'] - p) / p:+.1f}% | "
              f"{r['image_pass_s']:.1f} | {1000 * q:.1f} | {r['load_average']} |")
    print(f"\nfit: {icept:.1f} s fixed + {1000 * slope:.1f} ms per image "
          f"(3 models x decode + preprocess + infer), R^2 = {r2:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
