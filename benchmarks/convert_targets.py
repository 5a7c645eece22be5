"""Measure ``edgebrain convert`` against its targets on a trained model and the real Testing split.

Targets checked (each printed as PASS/FAIL with the measured number):

* every int8 artifact (TFLite, ONNX, OpenVINO): accuracy within 0.5 pp of the FP32 source,
  >= 99.5 % top-1 agreement with it, no class's recall down by more than 1 pp;
* int8 model file <= 0.26x the fp32 file of the same target;
* the 50 %-sparsity pruned model within 1 pp of the dense model, and pruned + int8 + gzip
  <= 0.15x the (dense) fp32 file.

Also: the ONNX int8 forms (QOperator/QDQ x U8S8/S8S8) timed against fp32 on this host, to
choose the default (interleaved rounds, batch 1, medians after warm-up).

Example::

    nice -n 10 .venv/bin/python benchmarks/convert_targets.py \\
        --model artifacts/models/resnet50-lite-128 --data ../shared/data/brain-tumor-mri-224 \\
        --out artifacts/convert-bench --md benchmarks/results/convert-run.md
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

import numpy as np

os.environ.setdefault("EDGEBRAIN_QUIET", "1")


def _eval(probs: np.ndarray, y: np.ndarray, ref: np.ndarray, classes: list[str], mask: np.ndarray) -> dict[str, Any]:
    from edgebrain.metrics import classification_metrics

    m = classification_metrics(y, probs, classes)
    d = classification_metrics(y[mask], probs[mask], classes)
    return {
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "recall": {c: m["per_class"][c]["recall"] for c in classes},
        "agreement": float(np.mean(probs.argmax(1) == ref.argmax(1))),
        "max_abs_dp": float(np.abs(probs - ref).max()),
        "dedup_accuracy": d["accuracy"],
        "dedup_agreement": float(np.mean(probs[mask].argmax(1) == ref[mask].argmax(1))),
        "n": int(len(y)),
        "dedup_n": int(mask.sum()),
    }


def _run(runner: Any, x: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([runner.run(x[i : i + batch]) for i in range(0, len(x), batch)])


def _latency(runners: dict[str, Any], x1: np.ndarray, rounds: int, per_round: int, warmup: int) -> dict[str, float]:
    """Interleaved rounds so that load changes on a shared host hit every model alike."""
    for r in runners.values():
        for _ in range(warmup):
            r.run(x1)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for k, r in runners.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                r.run(x1)
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder from edgebrain train")
    ap.add_argument("--data", required=True, help="dataset root (Kaggle layout)")
    ap.add_argument("--out", required=True, help="where the artifacts go")
    ap.add_argument("--targets", default="tflite,onnx,openvino")
    ap.add_argument("--precisions", default="fp32,fp16,int8")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--prune", type=float, default=0.5)
    ap.add_argument("--prune-epochs", type=int, default=2)
    ap.add_argument("--prune-cluster", type=int, default=None,
                    help="also sparsity-preserving clustering to N values per layer (edgebrain convert --prune-cluster)")
    ap.add_argument("--prune-targets", default="tflite,onnx,openvino")
    ap.add_argument("--skip-prune", action="store_true")
    ap.add_argument("--skip-dense", action="store_true", help="reuse the dense artifacts already in --out")
    ap.add_argument("--skip-convert", action="store_true", help="reuse artifacts already in --out")
    ap.add_argument("--onnx-forms", action="store_true", help="time the ONNX int8 forms against fp32")
    ap.add_argument("--variants", action="store_true",
                    help="also measure non-default int8 settings (per-tensor, float head, calibration methods, "
                         "NNCF preset, accuracy control)")
    ap.add_argument("--only-variants", default=None,
                    help="comma-separated substrings: measure only the --variants whose name contains one")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--md", default=None, help="write a markdown report here")
    ap.add_argument("--size-breakdown", action="store_true",
                    help="only: where the bytes of the int8 files in --out go (no conversion, no evaluation)")
    args = ap.parse_args(argv)
    if args.size_breakdown:
        md = _size_breakdown(Path(args.out))
        if args.md:
            Path(args.md).write_text(md)
        print(md)
        return 0
    cmdline = "python " + shlex.join(sys.argv)

    from edgebrain import data as D
    from edgebrain.artifact import load_manifest, read_manifest_unchecked
    from edgebrain.convert import ConvertFailed, convert
    from edgebrain.modelcard import ModelCard
    from edgebrain.models.variants import load_keras_model
    from edgebrain.runtime import load_runner
    from edgebrain.train import predict_probs

    model_dir = Path(args.model)
    if model_dir.is_file():  # a model file inside its folder (the model card sits beside it)
        model_dir = model_dir.parent
    card = ModelCard.find(model_dir)
    assert card is not None, f"{model_dir}: no model card"
    spec = card.preprocess
    classes = card.class_names
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"command": cmdline, "model": str(model_dir), "conversions": {}}

    # ---- convert (dense, then pruned)
    ptag = f"sparse{round(args.prune * 100)}" + (f"-c{args.prune_cluster}" if args.prune_cluster else "")
    dense_dir, pruned_dir = out / "dense", out / ("pruned" + (f"-c{args.prune_cluster}" if args.prune_cluster else ""))
    if not args.skip_convert:
        for name, kw, tg, folder in (
            ("dense", {}, args.targets, dense_dir),
            ("pruned", {"prune": args.prune, "prune_epochs": args.prune_epochs, "prune_cluster": args.prune_cluster},
             args.prune_targets, pruned_dir),
        ):
            if (name == "pruned" and args.skip_prune) or (name == "dense" and args.skip_dense):
                continue
            precs = args.precisions if name == "dense" else "fp32,int8"
            t0 = time.time()
            try:
                convert(model_dir, tg, precs, folder, calib_size=args.calib_size, overwrite=True, data=args.data,
                        **kw)
                status = "ok"
            except ConvertFailed as exc:
                status = str(exc)
            report["conversions"][name] = {"seconds": round(time.time() - t0, 1), "status": status,
                                           "targets": tg, "precisions": precs}
            print(f"{name}: {status} ({time.time() - t0:.0f} s)", flush=True)

    # ---- evaluation data: Testing + the deduplicated list
    ds = D.scan(args.data)
    test = ds.split("Testing")
    dd = {s.rel for s in D.dedup_eval(ds)}
    arr = D.load_arrays(test, spec.size, desc="Testing", resize=spec.resize)
    x = spec.apply(arr.x).astype(np.float32)
    y = arr.y
    mask = np.array([s.rel in dd for s in arr.samples], bool)
    src = load_keras_model(model_dir / "model.keras")
    ref = predict_probs(src, arr.x, spec)
    results: dict[str, Any] = {"source-fp32 (TensorFlow)": _eval(ref, y, ref, classes, mask)}
    pruned_ref = None
    pm = pruned_dir / f"pruned-{ptag}" / "model.keras"
    if pm.is_file():
        pmodel = load_keras_model(pm)
        pruned_ref = predict_probs(pmodel, arr.x, spec)
        results["pruned-source (TensorFlow)"] = _eval(pruned_ref, y, ref, classes, mask)

    arts: dict[str, Any] = {}
    for folder in (dense_dir, pruned_dir):
        if not folder.is_dir():
            continue
        for d in sorted(folder.iterdir()):
            if (d / "manifest.json").is_file() and not d.name.endswith(".rejected"):
                arts[f"{folder.name}/{d.name}"] = load_manifest(d)
    runners: dict[str, Any] = {}
    for key, art in arts.items():
        r = load_runner(art, threads=args.threads)
        runners[key] = r
        probs = _run(r, x)
        res = _eval(probs, y, ref, classes, mask)
        m = art.manifest
        res.update({"size_bytes": m["size"]["size_bytes"], "gzip_bytes": m["size"]["gzip_bytes"],
                    "model_file_bytes": art.model_file.stat().st_size,
                    "int8_ops": (m.get("ops") or {}).get("int8_ops"),
                    "float_ops": (m.get("ops") or {}).get("float_ops"),
                    "float_op_types": (m.get("ops") or {}).get("float_op_types"),
                    "verification": {k: m["verification"].get(k) for k in ("n", "top1_agreement", "max_abs_dp")}})
        if art.target == "openvino":
            res["weights_bytes"] = (art.path / "model.bin").stat().st_size
        results[key] = res
        print(f"{key}: acc {res['accuracy']:.4f} agree {res['agreement']:.4f} size {res['size_bytes']}", flush=True)
    report["results"] = results

    # ---- latency on this host (batch 1, interleaved)
    x1 = x[:1]
    lat = _latency(runners, x1, args.rounds, 10, 10)
    report["latency_ms_p50"] = lat

    # ---- ONNX int8 forms
    if args.onnx_forms:
        report["onnx_forms"] = _onnx_forms(model_dir, args, out, x, y, ref, classes, mask)

    if args.variants:
        report["variants"] = _variants(model_dir, args, out, x, y, ref, classes, mask, results)

    # ---- targets
    checks: list[dict[str, Any]] = []
    src_res = results["source-fp32 (TensorFlow)"]

    def check(name: str, ok: bool, value: str) -> None:
        checks.append({"check": name, "pass": bool(ok), "value": value})

    for key, res in results.items():
        if not key.startswith("dense/") or not key.endswith("-int8"):
            continue
        drop = (src_res["accuracy"] - res["accuracy"]) * 100
        check(f"{key}: accuracy within 0.5 pp of FP32", drop <= 0.5, f"{res['accuracy']:.4f} vs "
              f"{src_res['accuracy']:.4f} ({-drop:+.2f} pp)")
        check(f"{key}: top-1 agreement >= 99.5 %", res["agreement"] >= 0.995, f"{res['agreement'] * 100:.2f} %")
        worst = max((src_res["recall"][c] - res["recall"][c]) * 100 for c in classes)
        check(f"{key}: no class recall down > 1 pp", worst <= 1.0 + 1e-9,  # 3 of 300 is exactly 1 pp
              f"largest drop {worst:.2f} pp")
        fp32 = results.get(key.replace("-int8", "-fp32"))
        if fp32:
            f_int8 = res.get("weights_bytes", res["model_file_bytes"])
            f_fp32 = fp32.get("weights_bytes", fp32["model_file_bytes"])
            ratio = f_int8 / f_fp32
            check(f"{key}: int8 file <= 0.26x fp32", ratio <= 0.26, f"{ratio:.3f}x ({f_int8} / {f_fp32} bytes)")
    if pruned_ref is not None:
        pr = results["pruned-source (TensorFlow)"]
        drop = (src_res["accuracy"] - pr["accuracy"]) * 100
        check(f"pruned {args.prune:.0%} model within 1 pp of dense", drop <= 1.0,
              f"{pr['accuracy']:.4f} vs {src_res['accuracy']:.4f} ({-drop:+.2f} pp)")
        for t in ("tflite", "onnx", "openvino"):
            k8 = f"{pruned_dir.name}/{t}-int8-{ptag}"
            k32 = f"dense/{t}-fp32"
            if k8 in results and k32 in results:
                a, b = results[k8], results[k32]
                g = a["gzip_bytes"]
                base = b["size_bytes"]
                check(f"{k8}: pruned + int8 + gzip <= 0.15x fp32", g / base <= 0.15,
                      f"{g / base:.3f}x ({g} / {base} bytes)")
    for folder in (dense_dir, pruned_dir):
        for d in sorted(folder.glob("*.rejected")) if folder.is_dir() else []:
            v = read_manifest_unchecked(d).get("verification", {})
            check(f"{folder.name}/{d.name}: passed verification at conversion", False,
                  f"rejected: top-1 agreement {v.get('top1_agreement')} on {v.get('n')} {v.get('split')} images "
                  f"< {v.get('threshold')}")
    report["checks"] = checks
    (out / "convert_targets.json").write_text(json.dumps(report, indent=2))
    md = _markdown(report, classes)
    if args.md:
        Path(args.md).write_text(md)
    print(md)
    return 0 if all(c["pass"] for c in checks) else 1


def _onnx_forms(model_dir: Path, args: Any, out: Path, x: np.ndarray, y: np.ndarray, ref: np.ndarray,
                classes: list[str], mask: np.ndarray) -> dict[str, Any]:
    from edgebrain.artifact import load_manifest
    from edgebrain.convert import ConvertFailed, convert
    from edgebrain.runtime import load_runner

    forms = {"qoperator-u8s8": {"onnx_format": "qoperator", "onnx_activations": "u8"},
             "qdq-s8s8": {"onnx_format": "qdq", "onnx_activations": "s8"},
             "qdq-u8s8": {"onnx_format": "qdq", "onnx_activations": "u8"},
             "qoperator-s8s8": {"onnx_format": "qoperator", "onnx_activations": "s8"}}
    runners: dict[str, Any] = {}
    acc: dict[str, Any] = {}
    fp32 = out / "dense" / "onnx-fp32"
    if fp32.is_dir():
        runners["fp32"] = load_runner(load_manifest(fp32), threads=args.threads)
    for name, kw in forms.items():
        folder = out / "onnx-forms" / name
        try:
            convert(model_dir, "onnx", "int8", folder, calib_size=args.calib_size, overwrite=True, data=args.data,
                    min_agreement=0.9, **kw)
        except ConvertFailed as exc:
            acc[name] = {"error": str(exc)}
            continue
        art = load_manifest(folder / "onnx-int8")
        r = load_runner(art, threads=args.threads)
        runners[name] = r
        probs = _run(r, x)
        res = _eval(probs, y, ref, classes, mask)
        acc[name] = {k: res[k] for k in ("accuracy", "agreement")}
    lat = _latency(runners, x[:1], args.rounds, 10, 10)
    return {"latency_ms_p50": lat, "accuracy": acc,
            "speedup_vs_fp32": {k: lat["fp32"] / v for k, v in lat.items() if "fp32" in lat}}


def _size_breakdown(out: Path) -> str:
    """Bytes of each int8 model file by content: weights, biases, quantisation parameters, names."""
    import onnx
    from onnx import numpy_helper
    from tensorflow.lite.python import schema_py_generated as S

    rows = ["| file | total | int8 weights | int32 biases | scales (f32) | zero points | names / graph | "
            "int8 weight entropy (bits) | weights zeros |", "|---|---|---|---|---|---|---|---|---|"]
    for f in sorted(out.glob("*/tflite-int8*/model.tflite")):
        buf = f.read_bytes()
        m = S.ModelT.InitFromObj(S.Model.GetRootAsModel(buf, 0))
        by: dict[str, int] = {"w": 0, "b": 0, "s": 0, "z": 0}
        w8: list[np.ndarray] = []
        for sg in m.subgraphs:
            for t in sg.tensors:
                data = m.buffers[t.buffer].data
                n = len(data) if data is not None else 0
                if t.type == S.TensorType.INT8 and n:
                    by["w"] += n
                    w8.append(np.frombuffer(bytes(data), np.int8))
                elif t.type == S.TensorType.INT32:
                    by["b"] += n
                q = t.quantization
                if q is not None:
                    by["s"] += 4 * len(q.scale if q.scale is not None else [])
                    by["z"] += 8 * len(q.zeroPoint if q.zeroPoint is not None else [])  # int64 in the schema
        rows.append(_row(f, len(buf), by, np.concatenate(w8)))
    for f in sorted(out.glob("*/onnx-int8*/model.onnx")):
        g = onnx.load(str(f)).graph
        by = {"w": 0, "b": 0, "s": 0, "z": 0}
        w8 = []
        for t in g.initializer:
            a = numpy_helper.to_array(t)
            if t.name.endswith("zero_point"):
                by["z"] += a.nbytes
            elif t.name.endswith("scale") or a.dtype == np.float32:
                by["s"] += a.nbytes
            elif a.dtype == np.int8:
                by["w"] += a.nbytes
                w8.append(a.ravel())
            elif a.dtype == np.int32:
                by["b"] += a.nbytes
        rows.append(_row(f, f.stat().st_size, by, np.concatenate(w8)))
    return "\n".join(rows) + "\n"


def _row(f: Path, total: int, by: dict[str, int], w: np.ndarray) -> str:
    _, cnt = np.unique(w, return_counts=True)
    p = cnt / cnt.sum()
    ent = float(-(p * np.log2(p)).sum())
    rest = total - sum(by.values())
    return (f"| {f.parent.parent.name}/{f.parent.name}/{f.name} | {total} | {by['w']} | {by['b']} | {by['s']} | "
            f"{by['z']} | {rest} | {ent:.2f} | {float(np.mean(w == 0)) * 100:.1f} % |")


VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "tflite per-tensor weights": ("tflite", {"tflite_per_channel": False}),
    "tflite per-channel weights": ("tflite", {"tflite_per_channel": True}),
    "tflite float head": ("tflite", {"float_head": True}),
    "onnx per-tensor weights": ("onnx", {"onnx_per_channel": False}),
    "onnx calib percentile": ("onnx", {"calib_method": "percentile"}),
    "onnx calib entropy": ("onnx", {"calib_method": "entropy"}),
    "onnx float head": ("onnx", {"float_head": True}),
    "openvino preset mixed": ("openvino", {"nncf_preset": "mixed"}),
    "openvino f32 IR (f32 biases)": ("openvino", {"openvino_int8_ir": "fp32"}),
    "openvino float head": ("openvino", {"float_head": True}),
    "openvino NNCF mean-min/max ranges, fast bias correction (NNCF's own defaults)": (
        "openvino", {"nncf_activation_range": "mean_minmax", "nncf_fast_bias_correction": True}),
    "openvino accuracy control (agreement, max-drop 0.003)": ("openvino", {"max_drop": 0.003,
                                                                           "max_drop_metric": "agreement"}),
}


def _variants(model_dir: Path, args: Any, out: Path, x: np.ndarray, y: np.ndarray, ref: np.ndarray,
              classes: list[str], mask: np.ndarray, results: dict[str, Any]) -> dict[str, Any]:
    from edgebrain.artifact import load_manifest
    from edgebrain.convert import ConvertFailed, convert
    from edgebrain.runtime import load_runner

    src = results["source-fp32 (TensorFlow)"]
    rows: dict[str, Any] = {}
    wanted = [w.strip() for w in (args.only_variants or "").split(",") if w.strip()]
    for name, (target, kw) in VARIANTS.items():
        if wanted and not any(w in name for w in wanted):
            continue
        folder = out / "variants" / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        try:
            convert(model_dir, target, "int8", folder, calib_size=args.calib_size, overwrite=True, data=args.data,
                    min_agreement=0.9, **kw)
        except ConvertFailed as exc:
            rows[name] = {"error": str(exc)}
            continue
        art = load_manifest(folder / f"{target}-int8")
        probs = _run(load_runner(art, threads=args.threads), x)
        res = _eval(probs, y, ref, classes, mask)
        fp32 = results.get(f"dense/{target}-fp32")
        f8 = (art.path / "model.bin").stat().st_size if target == "openvino" else art.model_file.stat().st_size
        f32 = fp32.get("weights_bytes", fp32["model_file_bytes"]) if fp32 else None
        rows[name] = {"accuracy": res["accuracy"], "agreement": res["agreement"],
                      "val_agreement": art.manifest["verification"]["top1_agreement"],
                      "worst_recall_drop_pp": max((src["recall"][c] - res["recall"][c]) * 100 for c in classes),
                      "file_ratio": (f8 / f32) if f32 else None,
                      "int8_ops": art.manifest["ops"]["int8_ops"], "float_ops": art.manifest["ops"]["float_ops"]}
        print(f"variant {name}: {rows[name]}", flush=True)
    return rows


def _markdown(rep: dict[str, Any], classes: list[str]) -> str:
    lines = [f"Command: `{rep['command']}`", ""]
    if rep.get("conversions"):
        lines += ["| conversion | seconds | status |", "|---|---|---|"]
        for k, v in rep["conversions"].items():
            lines.append(f"| {k} ({v['targets']} x {v['precisions']}) | {v['seconds']} | {v['status'][:80]} |")
        lines.append("")
    lines += ["| model | accuracy | dedup acc | agreement | min recall | size (bytes) | gzip | int8 ops | "
              "float ops | p50 ms (b=1) |", "|---|---|---|---|---|---|---|---|---|---|"]
    lat = rep.get("latency_ms_p50", {})
    for k, r in rep["results"].items():
        lines.append(
            f"| {k} | {r['accuracy'] * 100:.2f} | {r['dedup_accuracy'] * 100:.2f} | {r['agreement'] * 100:.2f} | "
            f"{min(r['recall'].values()) * 100:.2f} | {r.get('size_bytes', '-')} | {r.get('gzip_bytes', '-')} | "
            f"{r.get('int8_ops', '-')} | {r.get('float_ops', '-')} | "
            f"{lat[k]:.2f} |" if k in lat else
            f"| {k} | {r['accuracy'] * 100:.2f} | {r['dedup_accuracy'] * 100:.2f} | {r['agreement'] * 100:.2f} | "
            f"{min(r['recall'].values()) * 100:.2f} | - | - | - | - | - |")
    if "onnx_forms" in rep:
        f = rep["onnx_forms"]
        lines += ["", "| ONNX form | p50 ms (b=1) | speed-up vs fp32 | accuracy | agreement |", "|---|---|---|---|---|"]
        for k, v in f["latency_ms_p50"].items():
            a = f["accuracy"].get(k, {})
            lines.append(f"| {k} | {v:.2f} | {f['speedup_vs_fp32'].get(k, float('nan')):.2f}x | "
                         f"{a.get('accuracy', float('nan')) * 100:.2f} | {a.get('agreement', float('nan')) * 100:.2f} |")
    if "variants" in rep:
        lines += ["", "| int8 variant (not the default) | accuracy | agreement | val agreement | largest recall drop "
                  "(pp) | file / fp32 | int8 ops | float ops |", "|---|---|---|---|---|---|---|---|"]
        for k, v in rep["variants"].items():
            if "error" in v:
                lines.append(f"| {k} | {v['error'][:100]} | | | | | | |")
                continue
            lines.append(f"| {k} | {v['accuracy'] * 100:.2f} | {v['agreement'] * 100:.2f} | "
                         f"{v['val_agreement'] * 100:.2f} | {v['worst_recall_drop_pp']:.2f} | "
                         f"{v['file_ratio']:.3f}x | {v['int8_ops']} | {v['float_ops']} |")
    lines += ["", "| check | result | measured |", "|---|---|---|"]
    for c in rep["checks"]:
        lines.append(f"| {c['check']} | {'PASS' if c['pass'] else 'FAIL'} | {c['value']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
