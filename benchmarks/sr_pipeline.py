"""Measurements behind benchmarks/results/sr-fusion.md: SR quality, the sr-resnet50 pipeline,
int8 and per-stage latency, and MRI + (synthetic) CT fusion.

    EDGEBRAIN_QUIET=1 nice -n 10 .venv/bin/python benchmarks/sr_pipeline.py \\
        --data ../shared/data/brain-tumor-mri-224 --out artifacts/sr-bench --stages sr,cls,int8,latency,fusion

Each stage writes ``<out>/<stage>.json`` and skips work whose output folder already exists
(``--force`` retrains). Testing is used only for evaluation; calibration images come from the
calib split; SR training pairs from the train split.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("EDGEBRAIN_QUIET", "1")

from edgebrain import data as D  # noqa: E402
from edgebrain import sr as SR  # noqa: E402
from edgebrain.io import atomic_write_json  # noqa: E402


def _save(out: Path, stage: str, res: dict[str, Any]) -> None:
    res = {"stage": stage, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.machine(),
           "cpus": os.cpu_count(), "command": " ".join(sys.argv), **res}
    atomic_write_json(out / f"{stage}.json", res)
    print(json.dumps({k: v for k, v in res.items() if k not in ("three_way", "details")}, indent=1, default=str)[:6000])


# ----------------------------------------------------------------------------- SR quality


def stage_sr(a: argparse.Namespace, out: Path) -> None:
    res: dict[str, Any] = {}
    for scale in (2, 4):
        folder = out / f"sr-x{scale}"
        if a.force or not (folder / "model_card.json").is_file():
            SR.train_sr(a.data, folder, scale=scale, hr_size=a.hr, epochs=a.sr_epochs, seed=42, width=a.sr_width,
                        overwrite=True)
        card = json.loads((folder / "model_card.json").read_text())
        m = json.loads((folder / "metrics.json").read_text())
        res[f"x{scale}"] = {
            "folder": str(folder), "hr_size": a.hr, "lr_size": a.hr // scale, "n": m["n"],
            "params": card["training"]["params"]["total"], "train_seconds": card["training"]["seconds"],
            "epochs": card["training"]["epochs"],
            **{k: {"psnr_db": m[k]["psnr_db"]["mean"], "ssim": m[k]["ssim"]["mean"]} for k in ("sr", "bicubic", "bilinear")},
            "sr_minus_bicubic": m["sr_minus_bicubic"],
            "per_class": m.get("per_class"),
        }
        # a low-resolution input the net was not trained on: the plain bilinear downsizing that
        # every downstream command applies (no extra blur, no noise)
        model, _ = SR.load_sr(folder)
        _, hr, lr = _test_arrays(a, a.hr, a.hr // scale)
        r = SR.compare_upscalers(model, hr.x, scale, lr=lr.x)
        res[f"x{scale}"]["resized_input"] = {
            **{k: {"psnr_db": r[k]["psnr_db"]["mean"], "ssim": r[k]["ssim"]["mean"]} for k in ("sr", "bicubic", "bilinear")},
            "sr_minus_bicubic": r["sr_minus_bicubic"], "n": r["n"]}
    _save(out, "sr", res)


# ----------------------------------------------------------------------------- sr-resnet50


def stage_cls(a: argparse.Namespace, out: Path) -> None:
    from edgebrain.train import TrainConfig, train

    folder = out / f"sr-resnet50-{a.hr}"
    if a.force or not (folder / "model_card.json").is_file():
        train(TrainConfig(variant="sr-resnet50", data_dir=a.data, out=str(folder), input_size=a.hr,
                          width=a.cls_width, epochs=a.cls_epochs, batch_size=32, lr=2e-3, per_class=a.cls_per_class,
                          seed=42, patience=a.cls_epochs, sr_model=str(out / "sr-x2"), overwrite=True))
    m = json.loads((folder / "metrics.json").read_text())
    card = json.loads((folder / "model_card.json").read_text())
    tw = SR.evaluate_pipeline(folder, a.data)  # from the saved stages; adds McNemar SR vs bicubic

    def short(rec: dict[str, Any]) -> dict[str, Any]:
        return {"accuracy": rec["accuracy"], "macro_f1": rec["macro_f1"], "recall": rec["recall"]}

    res = {
        "folder": str(folder), "hr_size": a.hr, "lr_size": a.hr // 2, "width": a.cls_width,
        "per_class_train_subset": a.cls_per_class, "epochs_run": card["training"]["epochs_run"],
        "train_seconds": card["training"]["seconds"], "params": card["training"]["params"],
        "n_test": tw["n"], "native": short(tw["native"]),
        **{src: {**{way: short(tw[src][way]) for way in ("bicubic", "sr")},
                 "mcnemar_sr_vs_bicubic": tw[src]["mcnemar_sr_vs_bicubic"]} for src in ("degraded", "resized")},
        "composite_testing_accuracy": m["testing"]["accuracy"],
        "composite_testing_dedup_accuracy": (m["testing_dedup"] or {}).get("accuracy"),
        "sr_int8_policy": m["sr_pipeline"]["int8"],
        "three_way": tw,
    }
    _save(out, "cls", res)


# ----------------------------------------------------------------------------- int8


def _test_arrays(a: argparse.Namespace, hr: int, lr: int) -> tuple[D.Dataset, D.Arrays, D.Arrays]:
    ds = D.scan(a.data)
    test = ds.split("Testing")
    return ds, D.load_arrays(test, (hr, hr), desc="Testing HR"), D.load_arrays(test, (lr, lr), desc="Testing LR")


def stage_int8(a: argparse.Namespace, out: Path) -> None:
    from edgebrain.metrics import classification_metrics
    from edgebrain.models.variants import load_keras_model

    folder = out / f"sr-resnet50-{a.hr}"
    lr_size = a.hr // 2
    full = load_keras_model(folder / "model.keras")
    sr_stage = load_keras_model(folder / "sr.keras")
    ds, hr, lr = _test_arrays(a, a.hr, lr_size)
    splits = D.splits_for(ds, 42)
    cal_samples = D.subset(splits["calib"], 25, 0)  # 100 calibration images from the calib split
    cal_hr = D.load_arrays(cal_samples, (a.hr, a.hr), desc="calib").x
    cal_lr = D.load_arrays(cal_samples, (lr_size, lr_size), desc="calib LR").x

    res: dict[str, Any] = {"n_test": int(len(hr.x)), "calibration": {"split": "calib", "n": int(len(cal_lr))}}
    # 1. the SR stage alone: PSNR float vs int8 on all of Testing (degradation model inputs)
    res["sr_stage"] = SR.int8_psnr_check(sr_stage, SR.degrade(cal_hr, 2, 7), hr.x, 2, SR.DEFAULT_PSNR_BUDGET_DB)

    # 2. the whole pipeline: fp32 vs full int8 vs SR-float + classifier-int8, on both LR inputs
    inputs = {"resized": lr.x, "degraded": SR.degrade(hr.x, 2, SR.EVAL_SEED)}
    t0 = time.time()
    builders = {
        "fp32": lambda: _tflite_fp32(full),
        "int8": lambda: SR.tflite_int8(full, cal_lr.astype(np.float32) / 255.0),
        "int8_sr_float": lambda: SR.tflite_int8(full, cal_lr.astype(np.float32) / 255.0, denylist_prefixes=["/sr/"]),
    }
    models: dict[str, bytes] = {}
    for name, build in builders.items():
        f = out / f"pipeline-{name}.tflite"
        if a.force or not f.is_file():
            f.write_bytes(build())
        models[name] = f.read_bytes()
    res["convert_seconds"] = round(time.time() - t0, 1)
    res["pipeline"] = {}
    ref_pred: dict[str, np.ndarray] = {}
    for name, blob in models.items():
        rec: dict[str, Any] = {"size_bytes": len(blob), "ops": _op_counts(blob)}
        for src, x in inputs.items():
            probs = SR.run_tflite(blob, x.astype(np.float32) / 255.0, batch=32)
            mt = classification_metrics(hr.y, probs, ds.class_names)
            rec[src] = {"accuracy": mt["accuracy"], "macro_f1": mt["macro_f1"],
                        "recall": {c: v["recall"] for c, v in mt["per_class"].items()}}
            if name == "fp32":
                ref_pred[src] = probs.argmax(1)
            else:
                rec[src]["top1_agreement_with_fp32"] = float(np.mean(probs.argmax(1) == ref_pred[src]))
        res["pipeline"][name] = rec
    keras_probs = np.concatenate([full(lr.x[i : i + 64].astype(np.float32) / 255.0, training=False).numpy()
                                  for i in range(0, len(lr.x), 64)])
    res["keras_fp32_resized_accuracy"] = classification_metrics(hr.y, keras_probs, ds.class_names)["accuracy"]
    summ = out / "convert" / "convert_summary.json"
    res["convert_api"] = _try_convert(folder, out) if (a.force or not summ.is_file()) else _read_convert(summ)
    _save(out, "int8", res)


def _tflite_fp32(model: Any) -> bytes:
    from edgebrain.tfenv import import_tf

    tf = import_tf()
    return bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())


def _op_counts(blob: bytes) -> dict[str, Any]:
    from edgebrain.runtime import tflite_interpreter_class

    Interpreter, _ = tflite_interpreter_class()
    it = Interpreter(model_content=blob)
    it.allocate_tensors()
    details = {t["index"]: t for t in it.get_tensor_details()}
    int8 = flt = 0
    float_types: set[str] = set()
    for op in it._get_ops_details():
        ins = [details[i]["dtype"] for i in op["inputs"] if i in details]
        if any(d in (np.int8, np.uint8) for d in ins) and op["op_name"] not in ("QUANTIZE", "DEQUANTIZE"):
            int8 += 1
        elif op["op_name"] not in ("QUANTIZE", "DEQUANTIZE"):
            flt += 1
            float_types.add(op["op_name"])
    return {"int8_ops": int8, "float_ops": flt, "float_op_types": sorted(float_types)}


def _try_convert(folder: Path, out: Path) -> dict[str, Any]:
    """Run the composite through ``edgebrain.convert`` when it exists: does every target take
    the DepthToSpace layer, in fp32 and int8, and pass convert's own verification?"""
    try:
        from edgebrain.convert import convert
    except ImportError as exc:
        return {"available": False, "reason": f"edgebrain.convert not importable ({exc})"}
    dst = out / "convert"
    rec: dict[str, Any] = {"available": True, "error": None}
    t0 = time.time()
    try:
        convert(str(folder / "model.keras"), ["tflite", "onnx", "openvino"], ["fp32", "int8"], str(dst),
                overwrite=True)
    except Exception as exc:  # reported, not hidden: the summary says which target failed and why
        rec["error"] = f"{type(exc).__name__}: {str(exc)[:1500]}"
    rec["seconds"] = round(time.time() - t0, 1)
    summ = dst / "convert_summary.json"
    if summ.is_file():
        rec.update(_read_convert(summ))
    return rec


def _read_convert(summ: Path) -> dict[str, Any]:
    s = json.loads(summ.read_text())
    return {"available": True, "summary": str(summ), "command": s.get("command"),
            "artifacts": [{k: r.get(k) for k in ("name", "target", "precision", "status", "verification", "ops")}
                          for r in s.get("artifacts", [])],
            **{k: s.get(k) for k in ("skipped", "rejected", "failed", "warnings")}}


# ----------------------------------------------------------------------------- latency


def _median_ms(fn: Any, warmup: int, runs: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"p50": float(np.median(ts)), "p90": float(np.percentile(ts, 90)), "n": runs}


def _interp(blob: bytes, threads: int) -> tuple[Any, Any]:
    from edgebrain.runtime import tflite_interpreter_class

    Interpreter, _ = tflite_interpreter_class()
    it = Interpreter(model_content=blob, num_threads=threads)
    it.allocate_tensors()
    return it, it.get_input_details()[0]


def stage_latency(a: argparse.Namespace, out: Path) -> None:
    """Per-stage TFLite latency (ai-edge-litert, batch 1, median of ``--runs`` after warm-up),
    interleaved so that background load affects every variant alike."""
    from edgebrain.models.variants import load_keras_model

    folder = out / f"sr-resnet50-{a.hr}"
    lr_size = a.hr // 2
    full = load_keras_model(folder / "model.keras")
    sr_stage = load_keras_model(folder / "sr.keras")
    cls = load_keras_model(folder / "classifier.keras")
    ds = D.scan(a.data)
    cal = D.subset(D.splits_for(ds, 42)["calib"], 25, 0)
    cal_lr = D.load_arrays(cal, (lr_size, lr_size)).x.astype(np.float32) / 255.0
    cal_hr = D.load_arrays(cal, (a.hr, a.hr)).x.astype(np.float32) / 255.0
    blobs = {
        "sr/fp32": _tflite_fp32(sr_stage), "sr/int8": SR.tflite_int8(sr_stage, cal_lr),
        "classifier/fp32": _tflite_fp32(cls), "classifier/int8": SR.tflite_int8(cls, cal_hr),
        "pipeline/fp32": _tflite_fp32(full), "pipeline/int8": SR.tflite_int8(full, cal_lr),
    }
    mixed = out / "pipeline-int8_sr_float.tflite"
    if mixed.is_file():
        blobs["pipeline/int8_sr_float"] = mixed.read_bytes()
    x_lr = cal_lr[:1]
    x_hr = cal_hr[:1]
    runners = {}
    for k, b in blobs.items():
        it, inp = _interp(b, a.threads)
        x = x_lr if k.startswith(("sr/", "pipeline/")) else x_hr
        runners[k] = (it, inp, x)
    res: dict[str, Any] = {"threads": a.threads, "runtime": "ai-edge-litert", "batch": 1,
                           "sizes_bytes": {k: len(b) for k, b in blobs.items()}, "latency_ms": {}}
    rounds = 5
    per: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):  # interleave the variants
        for k, (it, inp, x) in runners.items():
            def run(it: Any = it, inp: Any = inp, x: Any = x) -> None:
                it.set_tensor(inp["index"], x)
                it.invoke()
            per[k].append(_median_ms(run, 3 if per[k] else 10, a.runs // rounds)["p50"])
    for k, v in per.items():
        res["latency_ms"][k] = {"p50_of_round_medians": float(np.median(v)), "rounds": v}
    for prec in ("fp32", "int8"):
        res[f"stage_sum_{prec}_ms"] = (res["latency_ms"][f"sr/{prec}"]["p50_of_round_medians"]
                                       + res["latency_ms"][f"classifier/{prec}"]["p50_of_round_medians"])
    _save(out, "latency", res)


# ----------------------------------------------------------------------------- fusion


def stage_fusion(a: argparse.Namespace, out: Path) -> None:
    from edgebrain import fusion as F
    from edgebrain.imageio import load_rgb
    from edgebrain.train import TrainConfig, train

    ds = D.scan(a.data)
    seed, per_class, size = 42, a.fuse_per_class, a.fuse_size
    splits = D.splits_for(ds, seed, {"val": 0.10, "calib": 0.05})
    needed = (D.subset(splits["train"], per_class, seed) + D.subset(splits["val"], max(4, per_class // 4), seed)
              + ds.split("Testing"))
    ct = out / "synthetic-ct"
    if a.force or not (ct / "SYNTHETIC.txt").is_file():
        t0 = time.time()
        F.make_synthetic_ct_dir(needed, a.data, ct, seed=0, overwrite=True)
        print(f"synthetic CT for {len(needed)} images: {time.time() - t0:.0f} s")
    # speed of each method at 224 px (one real pair, median of 30)
    mri = load_rgb(needed[0].path)
    ctimg = F.synthetic_ct(mri, 0)
    speed = {m: _median_ms(lambda m=m: F.fuse(mri, ctimg, F.FusionSpec(method=m)), 3, 30)["p50"] for m in F.METHODS}
    res: dict[str, Any] = {"fuse_ms_224px": speed, "train": {}, "size": size, "per_class": per_class,
                           "width": 0.5, "epochs": a.fuse_epochs, "ct": "synthetic (edgebrain.fusion.synthetic_ct)"}
    for name, fuse in (("mri-only", None), ("wavelet-rgb", "wavelet")):
        folder = out / f"fusion-{name}"
        if a.force or not (folder / "model_card.json").is_file():
            train(TrainConfig(variant="resnet50-lite", data_dir=a.data, out=str(folder), input_size=size, width=0.5,
                              epochs=a.fuse_epochs, batch_size=32, lr=2e-3, per_class=per_class, seed=seed,
                              patience=a.fuse_epochs, fuse=fuse, ct_dir=str(ct) if fuse else None, overwrite=True))
        m = json.loads((folder / "metrics.json").read_text())
        card = json.loads((folder / "model_card.json").read_text())
        res["train"][name] = {"testing_accuracy": m["testing"]["accuracy"], "macro_f1": m["testing"]["macro_f1"],
                              "n": m["testing"]["n"], "recall": {c: v["recall"] for c, v in m["testing"]["per_class"].items()},
                              "seconds": card["training"]["seconds"],
                              "fusion": card["preprocess"].get("extra", {}).get("fusion")}
    _save(out, "fusion", res)


STAGES = {"sr": stage_sr, "cls": stage_cls, "int8": stage_int8, "latency": stage_latency, "fusion": stage_fusion}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(D.default_data_dir()))
    ap.add_argument("--out", default="artifacts/sr-bench")
    ap.add_argument("--stages", default="sr,cls,int8,latency,fusion")
    ap.add_argument("--hr", type=int, default=96, help="high-resolution size (LR = half)")
    ap.add_argument("--sr-epochs", type=int, default=10)
    ap.add_argument("--sr-width", type=float, default=0.5)
    ap.add_argument("--cls-width", type=float, default=0.25)
    ap.add_argument("--cls-epochs", type=int, default=6)
    ap.add_argument("--cls-per-class", type=int, default=400)
    ap.add_argument("--fuse-size", type=int, default=64)
    ap.add_argument("--fuse-per-class", type=int, default=200)
    ap.add_argument("--fuse-epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for st in a.stages.split(","):
        if st not in STAGES:
            raise SystemExit(f"unknown stage {st!r}; choose from {', '.join(STAGES)}")
        t0 = time.time()
        STAGES[st](a, out)
        print(f"[{st}] {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
