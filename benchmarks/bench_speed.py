"""Speed-up targets of ``edgebrain bench`` on full-size models (random weights are fine for latency).

    python benchmarks/bench_speed.py --model resnet50      # ResNet50 @ 224
    python benchmarks/bench_speed.py --model xception      # Xception @ 299

Builds the variant with random weights, converts it with ``edgebrain.convert`` (TFLite, ONNX,
OpenVINO x fp32, int8; verification off: random weights give near-uniform probabilities, so
top-1 agreement means nothing here), then runs ``edgebrain.bench.bench`` once, batch 1,
``--threads`` threads, against the TensorFlow fp32 reference. All ratios come from that one
run. Prints a markdown table and writes ``OUT/summary.json``.

Targets (2-core AVX-512 VNNI host, 2 threads):
  best int8 artifact vs TF fp32: >= 5.5x (ResNet50@224), >= 4.2x (Xception@299)
  each runtime's int8 vs its own fp32 (ResNet50): LiteRT >= 3x, ONNX Runtime >= 2.5x, OpenVINO >= 3x
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
# --prune-channels: random weights, so no fine-tuning (latency does not depend on the weights); the
# accuracy of channel pruning is measured on a trained model by benchmarks/channel_pruning.py
MODELS = {"resnet50": 224, "xception": 299}
BEST_INT8_TARGET = {"resnet50": 5.5, "xception": 4.2}
OWN_FP32_TARGET = {"resnet50": {"tflite": 3.0, "onnx": 2.5, "openvino": 3.0}}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def build(variant: str, work: Path, data: Path) -> Path:
    from edgebrain import data as D
    from edgebrain.modelcard import ModelCard
    from edgebrain.models import build_model
    from edgebrain.preprocess import PreprocessSpec, default_for_variant
    from edgebrain.tfenv import set_seed

    model_file = work / "model.keras"
    if model_file.is_file():
        return model_file
    work.mkdir(parents=True, exist_ok=True)
    set_seed(0)
    size = MODELS[variant]
    m = build_model(variant, size, weights="none")
    m.save(model_file)
    ds = D.scan(data)
    ModelCard(variant, ds.class_names, PreprocessSpec.named(default_for_variant(variant), size), [size, size, 3],
              data={"root": str(data.resolve()), "manifest_hash": ds.manifest_hash, "split_seed": 42,
                    "fractions": dict(D.DEFAULT_FRACTIONS)},
              extra={"note": "random weights: for latency measurements only"}).save(work)
    return model_file


def convert_all(model: Path, out: Path, calib_size: int, threads: int) -> list[Path]:
    from edgebrain.artifact import is_artifact_dir
    from edgebrain.convert import convert

    want = [f"{t}-{p}" for t in ("tflite", "onnx", "openvino") for p in ("fp32", "int8")]
    have = [d for d in (out.glob("*-*")) if d.is_dir() and is_artifact_dir(d)]
    if len(have) < len(want):
        convert(model, ["tflite", "onnx", "openvino"], ["fp32", "int8"], out, calib_size=calib_size,
                no_verify=True, overwrite=True, threads=threads)
    return sorted(d for d in out.iterdir() if d.is_dir() and is_artifact_dir(d))


def convert_channel_pruned(model: Path, out: Path, ratio: float, calib_size: int, threads: int) -> list[Path]:
    """int8 artifacts of the model with ``ratio`` of its prunable channels removed (ResNet bottlenecks,
    Xception separable blocks; edgebrain convert --prune-channels, no fine-tuning: random weights)."""
    from edgebrain.artifact import is_artifact_dir
    from edgebrain.convert import convert

    have = [d for d in out.glob("*-int8-*") if d.is_dir() and is_artifact_dir(d)]
    if len(have) < 3:
        convert(model, ["tflite", "onnx", "openvino"], ["int8"], out, calib_size=calib_size, no_verify=True,
                overwrite=True, threads=threads, prune_channels=ratio, channel_epochs=0)
    return sorted(d for d in out.iterdir() if d.is_dir() and is_artifact_dir(d))


def _key(rec: dict) -> tuple[str, str]:
    tag = "-" + rec["name"].rsplit("-", 1)[1] if rec["name"].rsplit("-", 1)[-1].startswith("ch") else ""
    return rec["target"], rec["precision"] + tag


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "brain-tumor-mri-224")
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench-speed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=5, help="Testing images per class for the accuracy pass.")
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--min-seconds", type=float, default=5.0)
    ap.add_argument("--min-runs", type=int, default=50)
    ap.add_argument("--convert-only", action="store_true", help="Build and convert (cached), do not measure.")
    ap.add_argument("--prune-channels", type=float, default=None,
                    help="Also bench int8 artifacts with this fraction of the prunable channels removed "
                         "(no fine-tuning: random weights).")
    args = ap.parse_args()

    from edgebrain.bench import BenchOptions, bench

    t0 = time.time()
    work = args.work / args.model
    model = build(args.model, work, args.data)
    arts = convert_all(model, work / "artifacts", args.calib_size, args.threads)
    if args.prune_channels:
        arts += convert_channel_pruned(model, work / f"artifacts-ch{round(args.prune_channels * 100)}",
                                       args.prune_channels, args.calib_size, args.threads)
    t_conv = time.time() - t0
    if args.convert_only:
        print(f"{len(arts)} artifacts under {work / 'artifacts'} ({t_conv:.0f} s)")
        return 0
    load0 = os.getloadavg()
    opts = BenchOptions(threads=args.threads, min_runs=args.min_runs, min_seconds=args.min_seconds, warmup=10,
                        batch=8, throughput_min_seconds=3.0)
    out = work / "bench"
    doc = bench(arts, args.data, device="host", reference=model, out=out, per_class=args.per_class, options=opts,
                overwrite=True, command=" ".join(["python", *sys.argv]))
    ref = doc["reference"]
    recs = {_key(r): r for r in doc["results"]}
    p50 = {k: r["latency_ms"]["p50"] for k, r in recs.items()}
    tf_p50 = ref["latency_ms"]["p50"]
    int8 = {k: v for k, v in p50.items() if k[1] == "int8"}
    best_key = min(int8, key=int8.get)
    pruned = {k: v for k, v in p50.items() if k[1].startswith("int8-ch")}
    summary = {
        "model": args.model, "input": MODELS[args.model], "threads": args.threads,
        "reference": {"runtime": ref["device"]["runtime"], "ran_on": ref["device"]["ran_on"], "p50_ms": tf_p50,
                      "mean_ms": ref["latency_ms"]["mean"]},
        "p50_ms": {f"{t}-{p}": v for (t, p), v in sorted(p50.items())},
        "mean_ms": {f"{t}-{p}": recs[(t, p)]["latency_ms"]["mean"] for (t, p) in sorted(p50)},
        "execution_precision": {f"{t}-{p}": recs[(t, p)]["device"]["execution_precision"] for (t, p) in sorted(p50)},
        "background_cpu": {"reference": ref.get("background_cpu"),
                           **{f"{t}-{p}": recs[(t, p)].get("background_cpu") for (t, p) in sorted(p50)}},
        "best_int8": {"artifact": "-".join(best_key), "speedup_vs_tf": tf_p50 / int8[best_key],
                      "target": BEST_INT8_TARGET[args.model]},
        "best_int8_channel_pruned": ({"artifact": "-".join(min(pruned, key=pruned.get)),
                                      "speedup_vs_tf": tf_p50 / min(pruned.values()),
                                      "ratio": args.prune_channels} if pruned else None),
        "int8_vs_own_fp32": {t: p50[(t, "fp32")] / p50[(t, "int8")] for t in ("tflite", "onnx", "openvino")
                             if (t, "fp32") in p50 and (t, "int8") in p50},
        "own_fp32_targets": OWN_FP32_TARGET.get(args.model, {}),
        "load_average": {"before_bench": [round(v, 2) for v in load0], "after_bench": doc["host"]["load_average_end"]},
        "bench_wall_s": doc["host"]["wall_s"], "convert_wall_s": round(t_conv, 1),
        "fingerprint": {k: ref["device"]["fingerprint"][k] for k in ("cpu", "cores", "isa")},
        "results_json": str(out / "results.json"),
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2))

    ok = summary["best_int8"]["speedup_vs_tf"] >= summary["best_int8"]["target"]
    lines = [f"### {args.model} @ {MODELS[args.model]}, batch 1, {args.threads} threads", "",
             f"TF fp32 reference ({ref['device']['runtime']} on {ref['device']['ran_on']}): p50 {tf_p50:.1f} ms, "
             f"other processes' CPU share while timed {_pct(ref.get('background_cpu'))}", "",
             "| artifact | p50 ms | mean ms | vs TF fp32 | execution precision | other CPU load while timed |",
             "|---|---:|---:|---:|---|---:|"]
    for (t, p), v in sorted(p50.items(), key=lambda kv: kv[1]):
        lines.append(f"| {t} {p} | {v:.2f} | {recs[(t, p)]['latency_ms']['mean']:.2f} | {tf_p50 / v:.2f}x | "
                     f"{recs[(t, p)]['device']['execution_precision'] or '-'} | "
                     f"{_pct(recs[(t, p)].get('background_cpu'))} |")
    lines += ["", f"- best int8 ({'-'.join(best_key)}) vs TF fp32: **{summary['best_int8']['speedup_vs_tf']:.2f}x** "
              f"(target >= {BEST_INT8_TARGET[args.model]}x: {'met' if ok else 'NOT met'})"]
    if pruned:
        bp = summary["best_int8_channel_pruned"]
        lines.append(f"- best int8 with {args.prune_channels:.0%} of the prunable channels removed ({bp['artifact']}) "
                     f"vs TF fp32 (dense): **{bp['speedup_vs_tf']:.2f}x** (target >= {BEST_INT8_TARGET[args.model]}x: "
                     f"{'met' if bp['speedup_vs_tf'] >= BEST_INT8_TARGET[args.model] else 'NOT met'})")
    for t, r in summary["int8_vs_own_fp32"].items():
        tgt = OWN_FP32_TARGET.get(args.model, {}).get(t)
        met = "" if tgt is None else f" (target >= {tgt}x: {'met' if r >= tgt else 'NOT met'})"
        lines.append(f"- {t} int8 vs {t} fp32: **{r:.2f}x**{met}")
    lines.append(f"- load average before/after: {summary['load_average']['before_bench']} / "
                 f"{summary['load_average']['after_bench']}; bench {doc['host']['wall_s']:.0f} s, "
                 f"conversion {t_conv:.0f} s")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
