"""Run the property-based fuzz tests with the long budget and report how many inputs each tried.

    python benchmarks/fuzz_counts.py [--budget long|short] [--out benchmarks/results/fuzz.md]

Runs ``pytest -m fuzz tests/edge/test_fuzz.py --hypothesis-show-statistics`` with
``EDGEBRAIN_FUZZ=long`` (what ``make fuzz`` sets) and turns hypothesis' own statistics into a
table: generated inputs per test (passing / failing / invalid), what happened to them (the
tests' ``event()`` labels) and the time. A failing input is a traceback or a wrong result.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {
    "test_arbitrary_bytes": "image loader: arbitrary bytes as .jpg/.png/.bmp/.tif/.dcm/no suffix",
    "test_mutated_real_images": "image loader: a real scan as JPEG/PNG/16-bit PNG/BMP/TIFF/DICOM, bytes flipped, "
                                "inserted, truncated",
    "test_generated_dicom_headers": "DICOM: generated pixels, bit depths, windows (NaN/inf/0/negative), rescale, "
                                    "VOI LUT function and sequence, photometric, frames",
    "test_mutated_manifests": "manifest reader: 1-4 random edits of a valid manifest, with and without a "
                              "recomputed digest",
    "test_manifest_bytes": "manifest reader: arbitrary bytes",
    "test_mutated_results": "gate results reader: 1-4 random edits of a valid bench results.json",
    "test_results_bytes": "gate results reader: arbitrary bytes",
}
OUR_EVENTS = {"refused", "decoded", "exit", "edited", "resealed", "not"}  # the tests' own event() labels
HISTORY = "## Earlier runs"
STAT = re.compile(r"(\d+) passing, (\d+) failing, and (\d+) invalid")


def parse(text: str) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"^tests/edge/test_fuzz\.py::(\w+):", line.strip())
        if m:
            cur = m.group(1)
            out[cur] = {"passing": 0, "failing": 0, "invalid": 0, "seconds": 0.0, "events": []}
            continue
        if cur is None:
            continue
        if "during generate phase" in line or "during shrink phase" in line or "during reuse phase" in line:
            sec = re.search(r"\(([\d.]+) seconds\)", line)
            out[cur]["seconds"] = float(out[cur]["seconds"]) + (float(sec.group(1)) if sec else 0.0)  # type: ignore[arg-type]
        s = STAT.search(line)
        if s:
            for k, v in zip(("passing", "failing", "invalid"), s.groups()):
                out[cur][k] = int(out[cur][k]) + int(v)  # type: ignore[call-overload]
        e = re.match(r"^\s+\*\s+([\d.<>]+%), (.+)$", line)
        if e and e.group(2).split(":")[0].split()[0] in OUR_EVENTS:
            out[cur]["events"].append(f"{e.group(2)} {e.group(1)}")  # type: ignore[union-attr]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=["long", "short"], default="long")
    ap.add_argument("--examples", type=int, default=None, help="Inputs per test (EDGEBRAIN_FUZZ_EXAMPLES).")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz.md")
    a = ap.parse_args()
    env = dict(os.environ, EDGEBRAIN_FUZZ=a.budget if a.budget == "long" else "")
    if a.examples:
        env["EDGEBRAIN_FUZZ_EXAMPLES"] = str(a.examples)
    env.setdefault("EDGEBRAIN_DATA", str(ROOT.parent / "shared" / "data" / "brain-tumor-mri-224"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "fuzz", "tests/edge/test_fuzz.py", "-p", "no:warnings",
           "--hypothesis-show-statistics", "-p", "no:cacheprovider"]
    t0 = time.time()
    load0 = os.getloadavg()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    stats = parse(proc.stdout)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    total = sum(int(s["passing"]) + int(s["failing"]) + int(s["invalid"]) for s in stats.values())
    failing = sum(int(s["failing"]) for s in stats.values())
    lines = [
        "# Fuzzing the loaders: inputs tried and failures found",
        "",
        f"`EDGEBRAIN_FUZZ={a.budget}{f' EDGEBRAIN_FUZZ_EXAMPLES={a.examples}' if a.examples else ''} "
        f"{' '.join(['python', *cmd[1:]])}` (via `python benchmarks/fuzz_counts.py --budget {a.budget}"
        f"{f' --examples {a.examples}' if a.examples else ''}`; `make fuzz` runs the same tests with the long "
        "budget, `make test` with the short one).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; load average "
        f"{load0[0]:.1f} at the start (shared machine). Wall time {wall:.0f} s. pytest: `{tail}`.",
        "",
        "| test | what is generated | inputs | failing | invalid (not an input) | outcomes | time s |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for name, what in TARGETS.items():
        s = stats.get(name)
        if s is None:
            lines.append(f"| {name} | {what} | not run | | | | |")
            continue
        lines.append(f"| {name} | {what} | {s['passing']} | {s['failing']} | {s['invalid']} | "
                     f"{'; '.join(s['events']) or '-'} | {float(s['seconds']):.0f} |")  # type: ignore[arg-type]
    lines += ["", f"**{total} generated inputs, {failing} failing** (a failing input is a traceback or a "
              "wrong result; the property is: a decoded value or the project's error naming the file; the gate "
              "always returns exit 0/1/2 with its reasons; hypothesis counts every failing variant it tries "
              "while shrinking one failure, so one bug shows as many failing cases). \"invalid\" counts generated DICOM headers that "
              "pydicom itself refuses to write, so they never become an input."]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    old = a.out.read_text() if a.out.exists() else ""
    keep = old[old.index(HISTORY):] if HISTORY in old else ""  # hand-written record of earlier runs
    a.out.write_text("\n".join(lines) + "\n" + ("\n" + keep if keep else ""))
    print("\n".join(lines))
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
