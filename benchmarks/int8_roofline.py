"""How close is the best int8 artifact to this CPU's int8 convolution throughput?

    python benchmarks/int8_roofline.py [--threads 2] [--out benchmarks/results/int8-roofline.md]

Builds stacks of plain convolutions shaped like ResNet50's (3x3 and 1x1, the channel counts of
its stages, batch 1), quantises them with NNCF exactly as ``edgebrain convert`` does (int8
weights and activations) and times them with OpenVINO (model-only, batch 1, the same
``--threads``, f32 inference precision hint). The best sustained multiply-accumulate rate over
those stacks bounds what any int8 ResNet50 can reach on this machine:

    lower bound (ms) = ResNet50 MACs / best GMAC/s

and therefore the largest possible speed-up over the TensorFlow fp32 reference. The MAC count of
ResNet50@224 is computed from the Keras model's layers (convolutions and dense layers), not quoted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# (name, spatial size, in channels, out channels, kernel, depth of the stack)
STACKS = [
    ("3x3 64->64 @56", 56, 64, 64, 3, 8),
    ("3x3 128->128 @28", 28, 128, 128, 3, 8),
    ("3x3 256->256 @14", 14, 256, 256, 3, 12),
    ("3x3 512->512 @7", 7, 512, 512, 3, 12),
    ("1x1 256->1024 / 1024->256 @14", 14, 256, 1024, 1, 12),
    ("1x1 64->256 / 256->64 @56", 56, 64, 256, 1, 8),
]


def conv_macs_by_kind(model: Any) -> dict[str, int]:
    """Multiply-accumulates of a Keras model's layers at batch 1: {"1x1": .., "kxk": .., "dense": ..,
    "depthwise": ..} (1x1 convolutions, larger kernels, fully-connected, depthwise)."""
    by: dict[str, int] = {"1x1": 0, "kxk": 0, "dense": 0, "depthwise": 0}
    for layer in model.layers:
        if getattr(layer, "layers", None):
            for k, v in conv_macs_by_kind(layer).items():
                by[k] += v
            continue
        kind = type(layer).__name__
        if kind in ("Conv2D", "DepthwiseConv2D", "Dense"):
            out = layer.output.shape
            w = layer.get_weights()[0]
            if kind == "Dense":
                by["dense"] += int(np.prod(w.shape))
            elif kind == "Conv2D":
                by["1x1" if w.shape[:2] == (1, 1) else "kxk"] += int(out[1] * out[2] * np.prod(w.shape))
            else:
                by["depthwise"] += int(out[1] * out[2] * np.prod(w.shape))
    return by


def conv_macs(model: Any) -> int:
    return sum(conv_macs_by_kind(model).values())


def _stack(tf: Any, size: int, cin: int, cout: int, k: int, depth: int) -> Any:
    x = inp = tf.keras.Input((size, size, cin))
    for i in range(depth):
        # 1x1 stacks alternate expand / reduce, as in ResNet bottlenecks
        c = cout if (k == 1 and i % 2 == 0) or k != 1 else cin
        x = tf.keras.layers.Conv2D(c, k, padding="same", use_bias=True, activation="relu")(x)
    return tf.keras.Model(inp, x)


def _int8_ov(tf: Any, model: Any, workdir: Path, shape: tuple[int, ...]) -> Any:
    import logging

    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    nncf.set_log_level(logging.ERROR)
    sm = workdir / "sm"
    tf.saved_model.save(model, str(sm))
    ovm = ov.convert_model(str(sm), input=[list(shape)])
    rng = np.random.default_rng(0)
    data = [rng.random(shape, dtype=np.float32) for _ in range(8)]
    return nncf.quantize(ovm, nncf.Dataset(data), subset_size=len(data), fast_bias_correction=True,
                         advanced_parameters=AdvancedQuantizationParameters(
                             activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX))


def _time(ovm: Any, shape: tuple[int, ...], threads: int, min_s: float, min_n: int) -> float:
    import openvino as ov

    core = ov.Core()
    c = core.compile_model(ovm, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
                                        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
    req = c.create_infer_request()
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    for _ in range(10):
        req.infer({0: x}, share_inputs=True)
    ts: list[float] = []
    t0 = time.perf_counter()
    while len(ts) < min_n or time.perf_counter() - t0 < min_s:
        t = time.perf_counter()
        req.infer({0: x}, share_inputs=True)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000.0


def main(argv: list[str] | None = None) -> int:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-seconds", type=float, default=5.0)
    ap.add_argument("--min-runs", type=int, default=50)
    ap.add_argument("--summary", default=None, help="summary.json of benchmarks/bench_speed.py --model resnet50 (same host) to compare with")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    a = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from edgebrain.tfenv import import_tf

    tf = import_tf()
    rows = []
    best = 0.0
    best_k = {"1x1": 0.0, "kxk": 0.0}
    with tempfile.TemporaryDirectory() as td:
        for i, (name, size, cin, cout, k, depth) in enumerate(STACKS):
            m = _stack(tf, size, cin, cout, k, depth)
            macs = conv_macs(m)
            shape = (1, size, size, cin)
            ms = _time(_int8_ov(tf, m, Path(td) / str(i), shape), shape, a.threads, a.min_seconds, a.min_runs)
            rate = macs / (ms / 1000.0) / 1e9
            best = max(best, rate)
            kk = "1x1" if k == 1 else "kxk"
            best_k[kk] = max(best_k[kk], rate)
            rows.append(f"| {name} x{depth} | {macs / 1e9:.3f} | {ms:.2f} | {rate:.0f} |")
            print(rows[-1], flush=True)
        from edgebrain.models import build_model

        r50 = build_model("resnet50", 224)
        r50_by = conv_macs_by_kind(r50)
        r50_macs = sum(r50_by.values())
    # each kind of layer at the best rate measured for its kind (dense layers at the 1x1 rate)
    kind_ms = (r50_by["kxk"] / best_k["kxk"] + (r50_by["1x1"] + r50_by["dense"]) / best_k["1x1"]) / 1e6
    cmd = "python benchmarks/int8_roofline.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# How fast can int8 ResNet50 be on this CPU?",
        "",
        "```",
        cmd,
        "```",
        "",
        "Stacks of plain convolutions with ResNet50's shapes, quantised by NNCF as `edgebrain convert` does, "
        "timed with OpenVINO (the fastest int8 runtime here). Their best multiply-accumulate rate bounds any "
        "int8 ResNet50@224 on this machine.",
        "",
        f"Host: {a.threads} threads, OpenVINO int8 (NNCF), batch 1, median of >= {a.min_runs} runs and "
        f">= {a.min_seconds:.0f} s each.",
        "",
        "| conv stack (ResNet50 shapes) | GMAC | p50 ms | GMAC/s |",
        "|---|---|---|---|",
        *rows,
        "",
        f"ResNet50@224 (edgebrain `resnet50` variant): {r50_macs / 1e9:.3f} GMAC in its convolution and dense "
        f"layers. At the best rate measured above ({best:.0f} GMAC/s) it cannot run faster than "
        f"**{r50_macs / best / 1e6:.2f} ms** in int8 on this machine. Counting each kind of layer at the best "
        f"rate measured for that kind ({r50_by['kxk'] / 1e9:.3f} GMAC in 3x3/7x7 convolutions at "
        f"{best_k['kxk']:.0f} GMAC/s, {(r50_by['1x1'] + r50_by['dense']) / 1e9:.3f} GMAC in 1x1 convolutions and "
        f"dense layers at {best_k['1x1']:.0f} GMAC/s): **{kind_ms:.2f} ms**.",
    ]
    if a.summary:
        s = json.loads(Path(a.summary).read_text())
        tf_ms = float(s["reference"]["p50_ms"])
        int8_ms = float(s["p50_ms"][s["best_int8"]["artifact"]])
        bound = r50_macs / best / 1e6
        lines += [
            "",
            f"Measured (`{a.summary}`): TensorFlow fp32 reference {tf_ms:.1f} ms, best int8 artifact "
            f"{int8_ms:.2f} ms = {tf_ms / int8_ms:.2f}x, running at {r50_macs / int8_ms / 1e6:.0f} GMAC/s "
            f"({100 * bound / int8_ms:.0f} % of the best rate). The largest speed-up any dense int8 ResNet50@224 can "
            f"reach here is {tf_ms:.1f} / {bound:.2f} = {tf_ms / bound:.2f}x if every layer ran at the single "
            f"best rate, and {tf_ms:.1f} / {kind_ms:.2f} = **{tf_ms / kind_ms:.2f}x** with each kind of layer at "
            f"its best rate (no pooling, additions or memory traffic between layers counted).",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
