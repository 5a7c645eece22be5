"""Harness honesty: does ``edgebrain bench`` add time to the model? Compare with the runtimes' own tools.

    python benchmarks/bench_harness.py            # after benchmarks/bench_speed.py --model resnet50

For the ResNet50@224 OpenVINO artifacts (int8 and fp32, from bench_speed.py), alternately runs
OpenVINO's ``benchmark_app -hint none -nstreams 1 -nthreads 2 -infer_precision f32 -api sync``
(benchmark_app refuses -nstreams/-nthreads with -hint latency) and
``edgebrain.bench.bench`` (batch 1, 2 threads, same inference precision) for ``--rounds``
rounds and compares the medians. For the LiteRT int8 artifact it does the same with
``litert-benchmark --num_threads 2``. Separate processes drift by several percent between runs,
so it also measures in one process: edgebrain's timed ``runner.run(x)`` against the bare runtime
call (input set once), in interleaved 0.5 s slices. Target: the harness adds < 2% to model time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("EDGEBRAIN_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def benchmark_app(xml: Path, seconds: int, threads: int, size: int) -> dict[str, float]:
    # benchmark_app only takes -nstreams/-nthreads with "-hint none"; 1 stream + sync API is what the
    # LATENCY hint gives edgebrain's runner (one infer request, all threads on it).
    cmd = [str(VENV_BIN / "benchmark_app"), "-m", str(xml), "-d", "CPU", "-hint", "none", "-nstreams", "1",
           "-nthreads", str(threads), "-infer_precision", "f32", "-api", "sync", "-t", str(seconds),
           "-shape", f"[1,{size},{size},3]"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    med = re.search(r"Median:\s+([\d.]+) ms", out)
    avg = re.search(r"Average:\s+([\d.]+) ms", out)
    cnt = re.search(r"Count:\s+(\d+) iterations", out)
    if not med:
        raise RuntimeError(f"could not parse benchmark_app output:\n{out[-2000:]}")
    return {"median_ms": float(med.group(1)), "mean_ms": float(avg.group(1)) if avg else float("nan"),
            "count": int(cnt.group(1)) if cnt else -1, "command": " ".join(cmd)}


def litert_benchmark(tflite: Path, runs: int, threads: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as td:
        js = Path(td) / "r.json"
        cmd = [str(VENV_BIN / "litert-benchmark"), "--model", str(tflite), "--num_threads", str(threads),
               "--num_runs", str(runs), "--warmup_runs", "10", "--result_json", str(js)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not js.is_file():
            raise RuntimeError(f"litert-benchmark failed: {proc.stderr[-1500:]}")
        res = json.loads(js.read_text())
    return {"raw": res, "command": " ".join(cmd)}


def ours(artifact: Path, data: Path, seconds: float, threads: int) -> dict[str, float]:
    from edgebrain.bench import BenchOptions, bench

    with tempfile.TemporaryDirectory() as td:
        doc = bench([artifact], data, device="host", out=Path(td) / "o", per_class=1, no_reference=True,
                    options=BenchOptions(threads=threads, min_runs=100, min_seconds=seconds, warmup=20,
                                         throughput_min_seconds=0.5, throughput_min_runs=2, n_boot=100))
    r = doc["results"][0]
    return {"median_ms": r["latency_ms"]["p50"], "mean_ms": r["latency_ms"]["mean"], "count": r["latency_ms"]["n"],
            "execution_precision": r["device"]["execution_precision"]}


def ab_in_process(art_path: Path, data: Path, threads: int, slices: int, slice_s: float) -> dict[str, float]:
    """Interleaved A/B in one process: edgebrain's model-only timing (the worker's ``time_loop`` over
    ``bound_call``) vs a bare loop over the runtime's own call with the input set once (what the
    runtimes' own tools time). Alternating short slices cancel drift (frequency, neighbours); the ratio
    of the medians is the harness cost."""
    import numpy as np

    from edgebrain.artifact import load_manifest
    from edgebrain.imageio import load_for_model
    from edgebrain.remote import time_loop
    from edgebrain.runtime import bound_call, load_runner

    art = load_manifest(art_path)
    spec = art.preprocess
    img = sorted((data / "Testing" / "glioma").iterdir())[0]
    x = np.asarray(spec.apply(load_for_model(img, spec.size)), np.float32)[None]
    runner = load_runner(art, threads=threads)
    if art.target == "openvino":
        import openvino as ov

        req = runner.request  # type: ignore[attr-defined]
        req.set_input_tensor(ov.Tensor(x))

        def bare() -> None:
            req.infer()
    elif art.target == "tflite":
        it = runner.interp  # type: ignore[attr-defined]
        idx = runner.inp["index"]  # type: ignore[attr-defined]
        it.set_tensor(idx, x)

        def bare() -> None:
            it.invoke()
    else:
        sess, name = runner.sess, runner.input_name  # type: ignore[attr-defined]

        def bare() -> None:
            sess.run(None, {name: x})
    call = bound_call(runner, x)
    for _ in range(20):
        call()
        bare()
    ours: list[float] = []
    raw: list[float] = []
    clock = time.perf_counter
    for k in range(slices):
        for which in ((0, 1) if k % 2 == 0 else (1, 0)):
            if which == 0:
                t, _ = time_loop(call, 1, slice_s)
                ours += t
            else:
                t0 = clock()
                while clock() - t0 < slice_s:
                    a = clock()
                    bare()
                    raw.append((clock() - a) * 1e3)
    o, r = float(np.median(ours)), float(np.median(raw))
    return {"edgebrain_p50_ms": o, "bare_p50_ms": r, "overhead_pct": 100.0 * (o / r - 1.0), "n": [len(ours), len(raw)]}


def _litert_ms(raw: dict) -> float | None:
    """The per-run latency (ms) from litert-benchmark's JSON, whatever its key names."""
    flat: dict[str, float] = {}

    def walk(d: object, prefix: str = "") -> None:
        if isinstance(d, dict):
            for k, v in d.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(d, (int, float)):
            flat[prefix.rstrip(".")] = float(d)

    walk(raw)
    for key in flat:
        if re.search(r"(median|p50).*(ms)", key, re.I):
            return flat[key]
    for key in flat:
        if re.search(r"(avg|mean|average).*(ms)", key, re.I) and "init" not in key.lower():
            return flat[key]
    for key in flat:
        if re.search(r"(avg|mean|average).*(us)", key, re.I) and "init" not in key.lower():
            return flat[key] / 1000.0
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench-speed" / "resnet50" / "artifacts")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "brain-tumor-mri-224")
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--ab-slices", type=int, default=20, help="A/B slice pairs per artifact (0.5 s each).")
    ap.add_argument("--ab-only", action="store_true", help="Only the in-process A/B comparison.")
    args = ap.parse_args()

    from edgebrain.artifact import load_manifest

    arts = {(a.target, a.precision): a for a in
            (load_manifest(d) for d in sorted(args.work.iterdir()) if (d / "manifest.json").is_file())}
    if ("openvino", "int8") not in arts:
        print(f"no OpenVINO artifacts under {args.work}: run benchmarks/bench_speed.py --model resnet50 first",
              file=sys.stderr)
        return 2
    rows = []
    load0 = [round(v, 2) for v in os.getloadavg()]
    for key in ((("openvino", "int8"), ("openvino", "fp32")) if not args.ab_only else ()):
        a = arts[key]
        ba, eb = [], []
        for r in range(args.rounds):
            order = [("ba", lambda a=a: benchmark_app(a.model_file, args.seconds, args.threads, args.size)),
                     ("eb", lambda a=a: ours(a.path, args.data, args.seconds, args.threads))]
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                res = fn()
                (ba if name == "ba" else eb).append(res)
                print(f"{key} round {r} {name}: median {res['median_ms']:.3f} ms", file=sys.stderr, flush=True)
        ba_med = statistics.median(x["median_ms"] for x in ba)
        eb_med = statistics.median(x["median_ms"] for x in eb)
        rows.append({"artifact": "-".join(key), "tool": "benchmark_app", "tool_median_ms": ba_med,
                     "edgebrain_p50_ms": eb_med, "overhead_pct": 100.0 * (eb_med / ba_med - 1.0),
                     "rounds": args.rounds, "tool_runs": [x["median_ms"] for x in ba],
                     "edgebrain_runs": [x["median_ms"] for x in eb], "command": ba[0]["command"],
                     "execution_precision": eb[0]["execution_precision"]})
    if ("tflite", "int8") in arts and not args.ab_only:
        a = arts[("tflite", "int8")]
        lt, eb = [], []
        for r in range(args.rounds):
            try:
                raw = litert_benchmark(a.model_file, 200, args.threads)
            except RuntimeError as exc:
                print(f"litert-benchmark: {exc}", file=sys.stderr)
                break
            ms = _litert_ms(raw["raw"])
            if ms is None:
                print(f"litert-benchmark: no latency in {json.dumps(raw['raw'])[:800]}", file=sys.stderr)
                break
            lt.append(ms)
            eb.append(ours(a.path, args.data, args.seconds, args.threads)["median_ms"])
            print(f"tflite-int8 round {r}: litert {ms:.3f} ms, edgebrain {eb[-1]:.3f} ms", file=sys.stderr, flush=True)
        if lt:
            rows.append({"artifact": "tflite-int8", "tool": "litert-benchmark", "tool_median_ms": statistics.median(lt),
                         "edgebrain_p50_ms": statistics.median(eb),
                         "overhead_pct": 100.0 * (statistics.median(eb) / statistics.median(lt) - 1.0),
                         "rounds": len(lt), "tool_runs": lt, "edgebrain_runs": eb, "command": raw["command"]})
    ab = {}
    for key in (("openvino", "int8"), ("openvino", "fp32"), ("tflite", "int8"), ("onnx", "int8")):
        if key in arts:
            ab["-".join(key)] = ab_in_process(arts[key].path, args.data, args.threads, args.ab_slices, 0.5)
            print(f"A/B {key}: {ab['-'.join(key)]}", file=sys.stderr, flush=True)
    summary = {"rows": rows, "in_process_ab": ab, "load_average": {"start": load0, "end": [round(v, 2) for v in os.getloadavg()]},
               "threads": args.threads, "seconds_per_run": args.seconds, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    (args.work.parent / "harness.json").write_text(json.dumps(summary, indent=2))
    print("| artifact | runtime's own tool | tool median ms | edgebrain p50 ms | harness overhead |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['artifact']} | {r['tool']} | {r['tool_median_ms']:.3f} | {r['edgebrain_p50_ms']:.3f} | "
              f"{r['overhead_pct']:+.2f}% |")
    print("\nIn one process, interleaved 0.5 s slices: edgebrain's model-only timing vs a bare loop over the runtime call")
    print("\n| artifact | bare call p50 ms | edgebrain p50 ms | harness overhead |\n|---|---:|---:|---:|")
    for k, v in ab.items():
        print(f"| {k} | {v['bare_p50_ms']:.3f} | {v['edgebrain_p50_ms']:.3f} | {v['overhead_pct']:+.2f}% |")
    print(f"\nload average start/end: {summary['load_average']['start']} / {summary['load_average']['end']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
