"""``make demo``: train -> convert -> bench -> gate on the real data, ending with the gate's verdict.

    python -m edgebrain.demo --data DATA --out artifacts/demo

The model is the documented resnet50-lite at 128 px from ``make models`` when it exists with the
documented settings; otherwise a quicker resnet50-lite (64 px, width 0.5, a stratified
400-per-class subset of Training, 10 epochs) is trained into ``OUT/model-quick`` (and reused on
the next run). The output says which. Then every target (TFLite, ONNX, OpenVINO) is converted at
fp32 and int8, benchmarked on Testing with the ``host`` profile, and gated with the default
thresholds. Exit code 0 when the gate reached a verdict (pass or a caught regression), 2 when it
could not trust the data; ``--strict`` exits with the gate's own code (1 on a regression).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from .errors import EdgebrainError

DOCUMENTED_DIR = "resnet50-lite-128"
# The settings of the Makefile's $(LITE) target: a model with other settings is not "the documented one".
DOCUMENTED = {"variant": "resnet50-lite", "input_size": 128, "width": 1.0, "epochs": 30, "batch_size": 32,
              "lr": 2e-3, "lr_schedule": "cosine", "patience": 30, "seed": 42, "per_class": None}
QUICK = {"variant": "resnet50-lite", "input_size": 64, "width": 0.5, "epochs": 10, "batch_size": 32,
         "lr": 2e-3, "lr_schedule": "cosine", "patience": 10, "seed": 42, "per_class": 400}
TARGETS = ["tflite", "onnx", "openvino"]
PRECISIONS = ["fp32", "int8"]


def say(msg: str) -> None:
    click.echo(msg)
    sys.stdout.flush()


def _card_settings(model_dir: Path) -> dict[str, Any] | None:
    card = model_dir / "model_card.json"
    if not (model_dir / "model.keras").is_file() or not card.is_file():
        return None
    try:
        d = json.loads(card.read_text())
    except (OSError, ValueError):
        return None
    tr = d.get("training") or {}
    return {"variant": d.get("variant"), **{k: tr.get(k) for k in DOCUMENTED if k != "variant"}}


def _matches(found: dict[str, Any] | None, want: dict[str, Any]) -> tuple[bool, list[str]]:
    if found is None:
        return False, ["no model.keras + model_card.json"]
    diff = [f"{k}={found.get(k)!r} (documented {v!r})" for k, v in want.items()
            if not (found.get(k) == v or (isinstance(v, float) and isinstance(found.get(k), (int, float))
                                          and abs(found[k] - v) < 1e-12))]
    return not diff, diff


def choose_model(models_dir: Path, out: Path, data: Path, retrain: bool = False) -> tuple[Path, str]:
    """The documented model if present with the documented settings, else a quick one (trained once)."""
    doc = models_dir / DOCUMENTED_DIR
    ok, why = _matches(_card_settings(doc), DOCUMENTED)
    if ok:
        say(f"[1/4] model: the documented resnet50-lite at 128 px from {doc} (built by `make models`)")
        return doc / "model.keras", "documented"
    say(f"[1/4] model: {doc} is not the documented model ({'; '.join(why)}); "
        "using a QUICKER model instead: resnet50-lite 64 px, width 0.5, 400 images per class, 10 epochs")
    quick = out / "model-quick"
    qok, _ = _matches(_card_settings(quick), QUICK)
    if qok and not retrain:
        say(f"      reusing the quick model already trained in {quick}")
        return quick / "model.keras", "quick"
    from .train import TrainConfig, train

    say(f"      training it into {quick} (a few minutes on a laptop CPU)")
    t0 = time.time()
    cfg = TrainConfig(variant=QUICK["variant"], data_dir=str(data), out=str(quick), input_size=QUICK["input_size"],
                      width=QUICK["width"], epochs=QUICK["epochs"], batch_size=QUICK["batch_size"], lr=QUICK["lr"],
                      lr_schedule=QUICK["lr_schedule"], patience=QUICK["patience"], seed=QUICK["seed"],
                      per_class=QUICK["per_class"], overwrite=True)
    train(cfg)
    say(f"      trained in {time.time() - t0:.0f} s")
    return quick / "model.keras", "quick"


def run_pipeline(model: Path, data: Path, out: Path, threads: int | None) -> int:
    from .bench import bench
    from .convert import ConvertFailed, convert
    from .gate import gate, write_junit, write_summary

    say(f"[2/4] convert: {', '.join(TARGETS)} x {', '.join(PRECISIONS)} -> {out / 'artifacts'}")
    t0 = time.time()
    rejected: list[str] = []
    try:
        arts = convert(model, TARGETS, PRECISIONS, out / "artifacts", overwrite=True)
    except ConvertFailed as exc:  # verification refused some: they never reach bench, and cannot pass
        arts = exc.artifacts
        rejected = [f"{r['target']} {r['precision']}: {r['reason']}" for r in exc.summary.get("rejected", [])]
        rejected += [f"{f['target']} {f['precision']}: {f['error']}" for f in exc.summary.get("failed", [])]
        for r in rejected:
            say(f"      REJECTED at conversion: {r}")
        if not arts:
            raise
    say(f"      {len(arts)} artifacts in {time.time() - t0:.0f} s: " + ", ".join(a.name for a in arts))
    say(f"[3/4] bench: Testing, host profile -> {out / 'bench'}")
    t0 = time.time()
    bench([a.path for a in arts], data, device="host", reference=model, out=out / "bench", threads=threads,
          overwrite=True)
    say(f"      done in {time.time() - t0:.0f} s")
    results = out / "bench" / "results.json"
    say(f"[4/4] gate: {results}")
    rep = gate(results)
    gdir = out / "gate"
    write_junit(gdir / "junit.xml", rep)
    write_summary(gdir / "summary.md", rep)
    from .io import atomic_write_json

    atomic_write_json(gdir / "gate.json", rep.to_dict())
    for s in rep.subjects:
        bad = [c.name for c in s.checks if c.status in ("fail", "error")]
        acc = s.metrics.get("accuracy")
        say(f"      {s.key:40s} accuracy {100 * acc:6.2f}%  {s.status}" + (f" ({', '.join(bad)})" if bad else "")
            if isinstance(acc, (int, float)) else f"      {s.key}: {s.status}")
    for _, c in rep.failures():
        say(f"      - {c.message}")
    say(f"bench report: {out / 'bench' / 'report.html'} (and results.md)")
    say(f"gate report:  {gdir / 'summary.md'}, {gdir / 'junit.xml'}")
    code = rep.exit_code
    verdict = rep.verdict
    if rejected:
        verdict += f"; and {len(rejected)} artifact(s) rejected at conversion"
        code = max(code, 1)
    say(f"GATE VERDICT: {verdict} (exit code {code}" + ("; in CI this fails the job)" if code else ")"))
    return code


@click.command()
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True, help="Dataset folder.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("artifacts/demo"), show_default=True)
@click.option("--models", "models_dir", type=click.Path(path_type=Path), default=Path("artifacts/models"),
              show_default=True, help="Where `make models` put the documented models.")
@click.option("--retrain", is_flag=True, help="Retrain the quick model even if one exists.")
@click.option("--threads", type=int, default=None, help="Inference threads for bench (default: all cores).")
@click.option("--strict", is_flag=True, help="Exit with the gate's code (1 on a regression) instead of 0.")
def main(data_dir: Path, out: Path, models_dir: Path, retrain: bool, threads: int | None, strict: bool) -> None:
    """train -> convert -> bench -> gate on the real data, ending with the gate's verdict.

    Exits 0 when the pipeline ran and the gate reached a verdict (PASS, or FAIL on a regression: the
    gate doing its job), 2 when the gate could not trust the data; --strict exits with the gate's code.
    """
    try:
        if not (data_dir / "Testing").is_dir():
            raise EdgebrainError(f"dataset not found at {data_dir} (expected Training/ and Testing/)")
        out.mkdir(parents=True, exist_ok=True)
        model, _kind = choose_model(models_dir, out, data_dir, retrain)
        code = run_pipeline(model, data_dir, out, threads)
        raise SystemExit(code if strict or code == 2 else 0)
    except EdgebrainError as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":
    main()
