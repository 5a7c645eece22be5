"""A full ``edgebrain bench`` of a trained model on the whole Testing split (1311 images).

    python benchmarks/bench_testing.py [--model artifacts/models/resnet50-lite-128/model.keras]

Converts the model to TFLite / ONNX / OpenVINO x fp32 / int8 with ``edgebrain.convert``
(verified against the source, cached), then benchmarks every artifact on the host, 2 threads,
against the TensorFlow fp32 reference, on the whole Testing split with its deduplicated figure.
Writes results.json / results.md / report.html under ``--work``/bench and prints results.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("EDGEBRAIN_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "artifacts" / "models" / "resnet50-lite-128" / "model.keras")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "brain-tumor-mri-224")
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench-testing")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not args.model.is_file():
        print(f"{args.model} not found (make models builds it)", file=sys.stderr)
        return 2

    from edgebrain.artifact import is_artifact_dir
    from edgebrain.bench import BenchOptions, bench
    from edgebrain.convert import convert

    adir = args.work / "artifacts"
    want = [f"{t}-{p}" for t in ("tflite", "onnx", "openvino") for p in ("fp32", "int8")]
    arts = [d for d in sorted(adir.glob("*")) if is_artifact_dir(d)] if adir.is_dir() else []
    if len(arts) < len(want):
        arts = [a.path for a in convert(args.model, ["tflite", "onnx", "openvino"], ["fp32", "int8"], adir,
                                        overwrite=True, threads=args.threads)]
    out = args.work / "bench"
    bench(arts, args.data, device="host", reference=args.model, out=out, overwrite=True,
          options=BenchOptions(threads=args.threads), command=" ".join(["python", *sys.argv]))
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
