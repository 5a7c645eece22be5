"""The conformance zoo through the CLI: every zoo model (benchmarks/zoo_models.py) goes through
``edgebrain convert --to tflite,onnx,openvino --precision fp32,int8`` -> ``edgebrain bench``
(against the source model, on a stratified subset of the real Testing split) -> ``edgebrain
predict``, as a user would run them. Results per model are kept in OUT/results/<id>.json (a run
can be resumed); the markdown table (``--md``) is assembled from them.

Example (the command behind the BENCHMARKS.md zoo table)::

    .venv/bin/python benchmarks/zoo.py --data ../shared/data/brain-tumor-mri-224 \\
        --out artifacts/zoo --md benchmarks/results/zoo.md

``--table-only`` rebuilds the table from the results already in OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import zoo_models as Z  # noqa: E402

SIZES = {"xception": 71, "resnet50": 32, "mobilenetv2": 32, "mobilenetv3small": 32, "efficientnetb0": 32,
         "densenet121": 32, "vgg16": 32}
TARGETS, PRECISIONS = ("tflite", "onnx", "openvino"), ("fp32", "int8")


def _edgebrain() -> str:
    exe = Path(sys.executable).with_name("edgebrain")
    return str(exe) if exe.is_file() else "edgebrain"


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.time() - t0


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines()]
    keys = ("error", "failed", "rejected", "skipped", "refused", "Error")
    hits = [ln for ln in lines if any(k in ln for k in keys) and "cuInit" not in ln and "absl" not in ln]
    return " | ".join(hits[-3:])[:400]


def convert_cmd(e: Z.ZooEntry, out: Path, data: str, a: argparse.Namespace) -> list[str]:
    cmd = [_edgebrain(), "convert", str(e.path), "--to", ",".join(TARGETS), "--precision", ",".join(PRECISIONS),
           "--data", data, "--calib-size", str(a.calib_size), "--verify-n", str(a.verify_n),
           "--preprocess", e.preprocess, "--classes", ",".join(Z.CLASSES), "--out", str(out), "--overwrite"]
    return cmd + (["--no-int8-search"] if not a.int8_search else [])


def _artifacts(out: Path) -> dict[str, dict[str, Any]]:
    arts: dict[str, dict[str, Any]] = {}
    for man in sorted(out.glob("*/manifest.json")):
        m = json.loads(man.read_text())
        arts[man.parent.name] = m
    return arts


def _row(name: str, m: dict[str, Any], fp32: dict[str, Any] | None) -> dict[str, Any]:
    v = m.get("verification") or {}
    ops = m.get("ops") or {}
    n_int8, n_float = ops.get("int8_ops"), ops.get("float_ops")
    share = (n_int8 / (n_int8 + n_float)) if isinstance(n_int8, int) and isinstance(n_float, int) \
        and (n_int8 + n_float) else None
    size = (m.get("size") or {}).get("size_bytes")
    ref = ((fp32 or {}).get("size") or {}).get("size_bytes")
    return {"artifact": name, "target": m["target"], "precision": m["precision"],
            "passed": bool(v.get("passed")) and not name.endswith(".rejected"),
            "source_accuracy": v.get("source_accuracy"), "agreement": v.get("top1_agreement"), "verify_n": v.get("n"), "verify_split": v.get("split"),
            "int8_ops_share": share, "size_bytes": size, "size_ratio": (size / ref) if size and ref else None,
            "weight_scales": (m.get("quantization") or {}).get("weight_scales")}


def run_entry(e: Z.ZooEntry, out_root: Path, data: str, a: argparse.Namespace) -> dict[str, Any]:
    out = out_root / "artifacts" / e.id
    log = out_root / "logs" / f"{e.id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    res: dict[str, Any] = {"id": e.id, "arch": e.arch, "kind": e.kind, "size": e.size, "note": e.note,
                           "source": str(e.path), "preprocess": e.preprocess}
    cmd = convert_cmd(e, out, data, a)
    rc, dt = _run(cmd, log, a.timeout)
    res["convert"] = {"rc": rc, "seconds": round(dt, 1), "command": shlex.join(cmd)}
    arts = _artifacts(out)
    res["rows"] = [_row(n, m, arts.get(f"{m['target']}-fp32")) for n, m in arts.items()]
    built = {(r["target"], r["precision"]) for r in res["rows"]}
    res["missing"] = [f"{t}-{p}" for t in TARGETS for p in PRECISIONS if (t, p) not in built]
    if res["missing"] or rc:
        res["convert"]["error"] = _last_error(log)
    arts = {n: m for n, m in arts.items() if not n.endswith(".rejected")}  # bench/predict refuse those
    if arts:
        bcmd = [_edgebrain(), "bench", *[str(out / n) for n in arts], "--reference", str(e.path), "--data", data,
                "--per-class", str(a.per_class), "--out", str(out_root / "bench" / e.id), "--overwrite",
                "--warmup", "2", "--min-runs", "5", "--min-seconds", "0.2"]
        rc, dt = _run(bcmd, log, a.timeout)
        res["bench"] = {"rc": rc, "seconds": round(dt, 1), "command": shlex.join(bcmd)}
        rj = out_root / "bench" / e.id / "results.json"
        if rj.is_file():
            res["bench"]["agreement"] = _bench_agreement(json.loads(rj.read_text()))
        images = sorted((Path(data) / "Testing" / "glioma").glob("*.jpg"))[:2]
        res["predict"] = {}
        for n in arts:
            pcmd = [_edgebrain(), "predict", str(out / n), *map(str, images), "--json"]
            rc, _ = _run(pcmd, log, a.timeout)
            res["predict"][n] = rc
    return res


def _bench_agreement(doc: dict[str, Any]) -> dict[str, Any]:
    """<target>-<precision> -> top-1 agreement with the reference, from bench's results.json."""
    return {f"{r.get('target')}-{r.get('precision')}": r.get("agreement") for r in doc.get("results", [])
            if r.get("kind") != "keras"}


def family(a: argparse.Namespace, name: str, out: Path) -> list[Z.ZooEntry]:
    """The zoo files of one architecture (one set of weights, fitted on real images with --fit)."""
    onnx: tuple[dict[str, Any], ...] = ()
    if name in a.onnx.split(","):
        onnx = ({"nchw": False, "dynamic_batch": True, "input_name": "pixel_values"},
                {"nchw": True, "dynamic_batch": False, "input_name": "input.1"})
    return Z.build_family(name, SIZES[name], out / "models", a.data if a.fit else None,
                          fit_per_class=a.fit_per_class, epochs=a.fit_epochs,
                          formats=tuple(f for f in a.formats.split(",") if f),
                          layouts=tuple(a.layouts.split(",")), onnx=onnx)


def _pct(v: Any) -> str:
    return f"{100 * v:.1f} %" if isinstance(v, (int, float)) else "-"


HEADER = """Every zoo model (benchmarks/zoo_models.py: keras.applications built offline with `weights=None`,
a 4-class softmax head, the base model nested as in fine-tuning, fitted for 3 epochs on 60 real
Training images per class so that classes separate; ONNX files exported from the same weights with
tf2onnx, NHWC with a dynamic batch and input `pixel_values`, NCHW with a batch of 1 and input
`input.1`) went through `edgebrain convert --to tflite,onnx,openvino --precision fp32,int8`, then
`edgebrain bench` of every artifact against the source file on a stratified Testing subset, then
`edgebrain predict` of every artifact on two Testing images, as a user would run them.

Columns: *converted* (or the stated reason it was not); *verified agreement*: top-1 agreement with
the source on the validation split at conversion (n images), the figure the 99 % gate checks;
*bench agreement*: top-1 agreement with the source on the Testing subset in `edgebrain bench`;
*int8 ops share*: int8 ops / (int8 + float ops) as the manifest counts them (TFLite and ONNX: the
ops of the written model; OpenVINO: the ops the compiled model runs in i8/u8 vs f32); *size ratio*: the model file against the same
target's fp32 file; *predict*: exit status of `edgebrain predict`. 2-core shared host (heavily
loaded while this ran: no timings here).

"rejected" is the outcome `convert` gives when an int8 artifact cannot meet the 99 % agreement bar:
the command names the artifact and its agreement, exits 1 and moves it to `<name>.rejected`. The
briefly fitted nets have small class margins (see the source accuracy), so int8 rounding flips more
of their predictions than it does on trained models; these rows say the pipeline handles the
layout, not what int8 costs a trained network of that architecture. A row "no: ..." quotes the
reason `convert` printed.
"""


def _results(out: Path) -> list[dict[str, Any]]:
    """Finished entries (OUT/results), then entries still converting when the table is written
    (their artifacts so far; bench and predict not run yet)."""
    done = [json.loads(rj.read_text()) for rj in sorted((out / "results").glob("*.json"))]
    ids = {r["id"] for r in done}
    for folder in sorted((out / "artifacts").glob("*")):
        if folder.name in ids or not folder.is_dir():
            continue
        arts = _artifacts(folder)
        rows = [_row(n, m, arts.get(f"{m['target']}-fp32")) for n, m in arts.items()]
        kind = "onnx" if "-onnx-" in folder.name else folder.name.split("-")[1]
        size = next((m["input_shape"][0] for m in arts.values()), "?")
        done.append({"id": folder.name, "kind": kind, "size": size, "rows": rows, "predict": {},
                     "convert": {"error": "still converting when this table was written"}})
    return done


def table(out: Path) -> str:
    lines = ["| zoo model | source | target | precision | converted | source accuracy (val) | "
             "verified agreement (val, n) | bench agreement (Testing subset) | int8 ops share | size ratio vs fp32 | "
             "predict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in _results(out):
        rows = {(x["target"], x["precision"]): x for x in r.get("rows", [])}
        bench = (r.get("bench") or {}).get("agreement") or {}
        for t in TARGETS:
            for p in PRECISIONS:
                x = rows.get((t, p))
                name = f"{t}-{p}"
                if x is None:
                    why = (r.get("convert") or {}).get("error") or "not built"
                    lines.append(f"| {r['id']} | {r['kind']} {r['size']} px | {t} | {p} | no: {why} | | | | | | |")
                    continue
                pr = (r.get("predict") or {}).get(name, "-")
                done = "yes" if x.get("passed", True) else "rejected: agreement below the 99 % bar"
                lines.append(f"| {r['id']} | {r['kind']} {r['size']} px | {t} | {p} | {done} | "
                             f"{_pct(x.get('source_accuracy'))} | {_pct(x['agreement'])} "
                             f"({x['verify_n']}) | {_pct(bench.get(name))} | {_pct(x['int8_ops_share'])} | "
                             + (f"{x['size_ratio']:.3f}" if x["size_ratio"] else "-")
                             + f" | {'ok' if pr == 0 else pr} |")
    log = out / "commands.txt"  # every run's command line, appended at its start
    cmds = sorted({r.get("zoo_command", "") for r in _results(out)}
                  | set(log.read_text().splitlines() if log.is_file() else []))
    run = ["Commands (each run resumes into the same OUT; the table is assembled from OUT/results):", "",
           *[f"    {c}" for c in cmds if c], ""]
    seen = {r["id"].split("-")[0] for r in _results(out)}
    todo = [n for n in Z.ZOO if n not in seen]
    if todo:
        lines += ["", f"Not run yet in OUT (no row above): {', '.join(todo)}."]
    return "\n".join([HEADER, *run, *lines, ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="artifacts/zoo")
    ap.add_argument("--md", default=None)
    ap.add_argument("--models", default=",".join(Z.ZOO))
    ap.add_argument("--formats", default="keras3", help="keras3,tf-keras,savedmodel")
    ap.add_argument("--layouts", default="nested", help="nested,flat")
    ap.add_argument("--onnx", default="resnet50,mobilenetv2,densenet121",
                    help="architectures also exported to ONNX (NHWC dynamic batch, NCHW batch 1)")
    ap.add_argument("--fit", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--fit-per-class", type=int, default=80)
    ap.add_argument("--fit-epochs", type=int, default=3)
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--verify-n", type=int, default=200)
    ap.add_argument("--per-class", type=int, default=25, help="bench: Testing images per class")
    ap.add_argument("--int8-search", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out)
    command = ".venv/bin/python benchmarks/zoo.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if not a.table_only:
        (out / "results").mkdir(parents=True, exist_ok=True)
        with open(out / "commands.txt", "a") as fh:
            fh.write(command + "\n")
        for name in a.models.split(","):
            for e in family(a, name, out):
                rp = out / "results" / f"{e.id}.json"
                print(f"[zoo] {e.id}: convert -> bench -> predict", flush=True)
                res = run_entry(e, out, a.data, a)
                res["zoo_command"] = command
                tmp = rp.with_suffix(".tmp")
                tmp.write_text(json.dumps(res, indent=1))
                tmp.replace(rp)
                print(f"[zoo] {e.id}: convert rc {res['convert']['rc']}, missing {res['missing']}", flush=True)
    md = table(out)
    if a.md:
        Path(a.md).write_text("# Conformance zoo\n\n" + md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
