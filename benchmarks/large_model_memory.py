"""Peak memory of ``edgebrain convert --precision int8`` on a VGG16-class ONNX model (240 px, NHWC).

The model is built here (``keras.applications.VGG16``, ``weights=None``, 240x240x3, global average
pooling and a 4-class softmax head: 14.7 M parameters; exported with tf2onnx), so nothing has to be
downloaded. Its weights are random: the figures are about memory and time, not accuracy.

Each target is converted in its own process; the script samples the resident set size of that
process and its children every 0.1 s (psutil) and also reads ``ru_maxrss`` of the finished
children (``resource.getrusage(RUSAGE_CHILDREN)``). A process that goes above ``--kill-above-gb``
is killed and recorded as such, so a regression cannot take the machine down.

Example::

    nice -n 10 .venv/bin/python benchmarks/large_model_memory.py build --out artifacts/vgg16-240
    nice -n 10 .venv/bin/python benchmarks/large_model_memory.py measure --model artifacts/vgg16-240/model.onnx \\
        --to onnx,openvino --out artifacts/vgg16-240/convert --json artifacts/vgg16-240/memory.json

``estimate`` prints how much memory onnxruntime's calibrators would hold when every calibration
image's activations are kept until the end (what ``quantize_static`` does): the bounded
reproduction of the run that was killed at 24.4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CLASSES = "glioma,meningioma,notumor,pituitary"


def build(out: Path, size: int = 240) -> Path:
    """VGG16 (random weights) at ``size`` px, NHWC, 4 classes, as ``out/model.onnx``."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf
    import tf2onnx
    import tf_keras as keras

    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(size, size, 3), pooling="avg")
    x = keras.layers.Dense(4, activation="softmax", name="head")(base.output)
    model = keras.Model(base.input, x, name="vgg16_240")
    out.mkdir(parents=True, exist_ok=True)
    spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name="input"),)
    dst = out / "model.onnx"
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=str(dst))
    print(f"{dst}: {model.count_params():,} parameters, {dst.stat().st_size / 1e6:.1f} MB")
    return dst


def _tree_rss(p: Any) -> int:
    import psutil

    total = 0
    for q in [p, *p.children(recursive=True)]:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(cmd: list[str], kill_above: float, log: Path) -> dict[str, Any]:
    """Run ``cmd``; peak RSS (sampled, whole process tree) and ``ru_maxrss`` of the children."""
    import psutil

    t0 = time.monotonic()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        p = psutil.Process(proc.pid)
        peak, main, killed = 0, 0, False
        while proc.poll() is None:
            try:
                main = max(main, p.memory_info().rss)
                peak = max(peak, _tree_rss(p))
            except psutil.Error:
                pass
            if peak > kill_above and not killed:
                proc.kill()
                killed = True
            time.sleep(0.1)
    maxrss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss (kernel): the largest peak RSS of any finished child process, i.e. of the convert
    # process itself. The tree sum counts pages a forked helper process shares with its parent
    # once per process, so it is an upper bound only; it is what the kill threshold watches.
    return {"command": shlex.join(cmd), "exit_code": proc.returncode, "killed_above_bytes": kill_above if killed else None,
            "peak_rss_sampled_gb": round(main / 2**30, 3), "tree_rss_sum_sampled_gb": round(peak / 2**30, 3),
            "children_ru_maxrss_gb": round(maxrss_kb / 2**20, 3),
            "wall_s": round(time.monotonic() - t0, 1), "log": str(log)}


def measure(model: Path, targets: list[str], out: Path, extra: list[str], kill_above_gb: float) -> list[dict[str, Any]]:
    exe = str(Path(sys.executable).with_name("edgebrain"))
    rows = []
    for t in targets:
        dst = out / t
        cmd = [exe, "convert", str(model), "--to", t, "--precision", "int8", "--preprocess", "imagenet",
               "--classes", CLASSES, "--out", str(dst), "--overwrite", *extra]
        print("$ " + shlex.join(cmd), flush=True)
        dst.mkdir(parents=True, exist_ok=True)
        row = {"target": t, **run_measured(cmd, kill_above_gb * 2**30, dst.with_suffix(".log"))}
        summ = dst / "convert_summary.json"
        if summ.is_file():
            s = json.loads(summ.read_text())
            row["summary_memory"] = s.get("memory")
            row["artifacts"] = [{k: a.get(k) for k in ("name", "status", "memory")} for a in s.get("artifacts", [])]
            for a in row["artifacts"]:
                man = Path(str(s["artifacts"][row["artifacts"].index(a)]["path"])) / "manifest.json"
                if man.is_file():
                    q = json.loads(man.read_text()).get("quantization") or {}
                    a["calibration_streaming"] = q.get("calibration_streaming")
                    a["selection"] = q.get("selection")
                    a["fallback"] = q.get("fallback")
            row["failed"] = s.get("failed")
        print(json.dumps(row, indent=1), flush=True)
        rows.append(row)
    return rows


def estimate(model: Path, calib_size: int) -> dict[str, Any]:
    from edgebrain.converters.onnx_target import activation_bytes_per_image

    per = activation_bytes_per_image(model)
    return {"model": str(model), "calibrated_activation_bytes_per_image": per,
            "all_images_kept_gb": round(per * calib_size / 2**30, 2), "calib_size": calib_size}


def markdown(rows: list[dict[str, Any]], est: dict[str, Any] | None) -> str:
    """A results section: peak memory per target, how it was measured, the command."""
    L = ["| target | exit | peak RSS of convert (ru_maxrss) | convert_summary `memory.peak_rss_mb` | "
         "process-tree RSS sum (sampled, upper bound) | wall | calibration passes |",
         "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        mem = (r.get("summary_memory") or {}).get("peak_rss_mb")
        cal = ""
        for a in r.get("artifacts") or []:
            st = (a.get("calibration_streaming") or {})
            if st:
                cal = (f"{st['images_per_pass']} image(s)/pass, {st['held_mb_per_pass']:.0f} MB held "
                       f"(all at once: {st.get('all_images_at_once_mb') or 0:.0f} MB)")
        killed = " (killed)" if r.get("killed_above_bytes") else ""
        tree = r.get("tree_rss_sum_sampled_gb", r["peak_rss_sampled_gb"])  # older files: the tree sum only
        L.append(f"| {r['target']} | {r['exit_code']}{killed} | {r['children_ru_maxrss_gb']:.2f} GB | "
                 f"{'-' if mem is None else f'{mem / 1024:.2f} GB'} | {tree:.2f} GB | "
                 f"{r['wall_s']:.0f} s | {cal or '-'} |")
    L += ["", "Commands:", "", "```"] + [r["command"] for r in rows] + ["```"]
    if est:
        L += ["", f"Without streaming (onnxruntime keeps every calibration image's activations for the histogram "
                  f"methods): {est['calibrated_activation_bytes_per_image'] / 2**20:.0f} MB per image x "
                  f"{est['calib_size']} images = **{est['all_images_kept_gb']} GB**."]
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--size", type=int, default=240)
    m = sub.add_parser("measure")
    m.add_argument("--model", type=Path, required=True)
    m.add_argument("--to", default="onnx,openvino")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--json", type=Path, default=None)
    m.add_argument("--kill-above-gb", type=float, default=10.0)
    r = sub.add_parser("report", help="a Markdown section from the JSON files of measure")
    r.add_argument("json", type=Path, nargs="+")
    r.add_argument("--model", type=Path, default=None, help="also print the no-streaming estimate")
    r.add_argument("--calib-size", type=int, default=256)
    m.add_argument("extra", nargs="*", help="more convert arguments (after --)")
    e = sub.add_parser("estimate")
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--calib-size", type=int, default=256)
    a = ap.parse_args()
    if a.cmd == "build":
        build(a.out, a.size)
    elif a.cmd == "report":
        rows = [row for f in a.json for row in json.loads(f.read_text())]
        print(markdown(rows, estimate(a.model, a.calib_size) if a.model else None))
    elif a.cmd == "estimate":
        print(json.dumps(estimate(a.model, a.calib_size), indent=1))
    else:
        rows = measure(a.model, [t for t in a.to.split(",") if t], a.out, a.extra, a.kill_above_gb)
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
