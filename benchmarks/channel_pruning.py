"""Structured (channel) pruning on a trained model: accuracy and speed against the dense FP32 model.

    python benchmarks/channel_pruning.py --model artifacts/models/resnet50-w05-96 --ratio 0.25 \\
        --work artifacts/channel-w05 --md benchmarks/results/channel-pruning.md

Converts the model twice with ``edgebrain.convert`` to TFLite / ONNX / OpenVINO int8 (verified,
cached): dense, and with ``--prune-channels RATIO`` (prunable filters removed, fine-tuned on the
train split). Then one ``edgebrain bench`` run on the whole Testing split (with its deduplicated
figure), 2 threads, against the dense model's TensorFlow FP32 reference: the six int8 artifacts
and the pruned Keras model itself (FP32). Latency of the full-size ResNet50@224 with the same
ratio: ``benchmarks/bench_speed.py --prune-channels RATIO``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("EDGEBRAIN_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["tflite", "onnx", "openvino"]


def _arts(folder: Path) -> list[Path]:
    from edgebrain.artifact import is_artifact_dir

    return sorted(d for d in folder.iterdir() if d.is_dir() and is_artifact_dir(d)) if folder.is_dir() else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "artifacts" / "models" / "resnet50-w05-96")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=6, help="Fine-tuning epochs after pruning.")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "brain-tumor-mri-224")
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts" / "channel-w05")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--md", type=Path, default=None, help="Also write the table here.")
    ap.add_argument("--reuse", action="store_true", help="Tabulate WORK/bench/results.json again, no new run.")
    args = ap.parse_args()

    from edgebrain.bench import BenchOptions, bench
    from edgebrain.convert import convert

    model = args.model / "model.keras" if args.model.is_dir() else args.model
    if not model.is_file():
        print(f"{model} not found (make models builds it)", file=sys.stderr)
        return 2
    tag = f"ch{round(args.ratio * 100)}"
    t0 = time.time()
    dense_dir, pruned_dir = args.work / "dense", args.work / tag
    if len(_arts(dense_dir)) < 3:
        convert(model, TARGETS, ["int8"], dense_dir, overwrite=True, threads=args.threads)
    if len(_arts(pruned_dir)) < 3:
        convert(model, TARGETS, ["int8"], pruned_dir, overwrite=True, threads=args.threads,
                prune_channels=args.ratio, channel_epochs=args.epochs)
    t_conv = time.time() - t0
    pruned_keras = pruned_dir / f"pruned-{tag}" / "model.keras"
    arts = _arts(dense_dir) + _arts(pruned_dir)
    rep = json.loads((arts[-1] / "manifest.json").read_text())["channel_pruning"]
    out = args.work / "bench"
    if args.reuse and (out / "results.json").is_file():
        doc = json.loads((out / "results.json").read_text())
    else:
        doc = bench([*arts, pruned_keras], args.data, device="host", reference=model, out=out, overwrite=True,
                    options=BenchOptions(threads=args.threads), command=" ".join(["python", *sys.argv]))
    ref = doc["reference"]
    classes = list(ref["per_class"])

    def row(r: dict, name: str) -> str:
        drop = max(100 * (ref["per_class"][c]["recall"] - r["per_class"][c]["recall"]) for c in classes)
        return (f"| {name} | {100 * r['accuracy']:.2f} | {100 * r['dedup']['accuracy']:.2f} | "
                f"{100 * (r['accuracy'] - ref['accuracy']):+.2f} | "
                f"{100 * r['agreement']:.2f} | {drop:.2f} | {r['latency_ms']['p50']:.3f} | "
                f"{ref['latency_ms']['p50'] / r['latency_ms']['p50']:.2f}x | {r['size_bytes']} |")

    lines = [
        f"Model `{args.model}`; `--prune-channels {args.ratio}`: {rep['channels_before']} -> "
        f"{rep['channels_after']} channels in {len(rep['chains'])} convolution chains, MACs x{rep['macs_ratio']} "
        f"({rep['macs_before'] / 1e6:.1f} -> {rep['macs_after'] / 1e6:.1f} M), parameters x{rep['params_ratio']}; "
        f"fine-tuned {rep['fine_tuning']['epochs']} epochs (Adam, cosine from {rep['fine_tuning']['lr']} to 0) on "
        f"{rep['fine_tuning']['train_n']} training images. Validation accuracy: dense "
        f"{100 * rep['dense_val_accuracy']:.2f} %, pruned before fine-tuning "
        f"{100 * rep['pruned_val_accuracy_before_fine_tuning']:.2f} %, after {100 * rep['pruned_val_accuracy']:.2f} %.",
        "",
        f"Testing: {doc['data']['n']} images (deduplicated {doc['data']['dedup_n']}), host, {args.threads} threads, "
        f"batch 1. Reference: the dense FP32 model in TensorFlow ({ref['device']['ran_on']}): accuracy "
        f"{100 * ref['accuracy']:.2f} % (dedup {100 * ref['dedup']['accuracy']:.2f} %), p50 "
        f"{ref['latency_ms']['p50']:.2f} ms.",
        "",
        "| artifact | accuracy % | dedup % | Δ vs dense FP32 (pp) | agreement % | largest recall drop (pp) | "
        "p50 ms | vs TF fp32 | size bytes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(doc["results"], key=lambda r: (tag in r["artifact"], r["artifact"])):
        name = f"pruned-{tag} Keras (FP32, TensorFlow)" if r["artifact"].endswith("model.keras") else r["name"]
        lines.append(row(r, name))
    lines += ["", f"Conversion {t_conv:.0f} s (cached when rerun), bench {doc['host']['wall_s']:.0f} s. "
              f"Results: `{out / 'results.json'}`."]
    text = "\n".join(lines)
    print(text)
    if args.md:
        args.md.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
