"""``edgebrain bench ARTIFACT... --data DIR --device DEVICE [--reference MODEL] --out DIR``."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from ..errors import EdgebrainError
from . import ct_options


def _cpus(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        cpus = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise click.BadParameter("expected CPU numbers like 0,1") from None
    if not cpus or min(cpus) < 0:
        raise click.BadParameter("expected CPU numbers like 0,1")
    return cpus


@click.command(name="bench")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True,
              help="Dataset folder (Training/ and Testing/ with one folder per class).")
@click.option("--device", "devices", multiple=True, default=("host",), show_default=True,
              help="Profile name (host, rpi4, rpi5, intel-nuc, old-pc, jetson-orin-nano), a profile .json, "
                   "ssh://user@host[:port], or PROFILE=ssh://user@host[:port]. Repeat for several devices.")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="The FP32 model to compare with (default: the manifests' source model).")
@click.option("--no-reference", is_flag=True, help="Skip the FP32 reference (no agreement, McNemar or speed-up).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output folder: results.json, results.md, report.html.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--eval-list", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Evaluate on this list (from `edgebrain data check --write-dedup`) instead of the split.")
@click.option("--split", type=click.Choice(["Testing", "Training"]), default="Testing", show_default=True,
              help="Dataset split to evaluate on.")
@click.option("--per-class", type=int, default=None, help="A fixed stratified subset: N images per class.")
@click.option("--seed", type=int, default=0, show_default=True, help="Subset and bootstrap seed.")
@click.option("--preprocess", default=None,
              help="For raw model files without a manifest: rescale | xception | caffe | imagenet | "
                   "meanstd:M,M,M/S,S,S.")
@click.option("--classes", default=None, help="For raw model files: class names in output order, comma-separated.")
@click.option("--input-size", type=int, default=None, help="For raw model files whose input size is dynamic.")
@click.option("--precision", "raw_precision", default=None,
              type=click.Choice(["fp32", "fp16", "bf16", "int8", "dynamic", "int16x8"]),
              help="For raw model files: the precision to label them with.")
@click.option("--threads", type=int, default=None,
              help="Inference threads (default: the profile's, else every CPU the worker may use).")
@click.option("--cpus", callback=_cpus, default=None, help="Pin workers to these CPUs (e.g. 0,1).")
@click.option("--batch", type=int, default=8, show_default=True, help="Batch size for the throughput figure.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed batch-1 runs first.")
@click.option("--min-runs", type=int, default=50, show_default=True, help="Timed batch-1 runs: at least this many ...")
@click.option("--min-seconds", type=float, default=3.0, show_default=True, help="... and for at least this long.")
@click.option("--reference-device", type=click.Choice(["auto", "cpu"]), default="auto", show_default=True,
              help="auto: the reference runs on a GPU when TensorFlow sees one.")
@click.option("--timeout", "job_timeout", type=float, default=None, help="Give up on one model after N seconds.")
@click.option("--ssh-identity", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Private key for ssh:// devices (key authentication only).")
@click.option("--ssh-known-hosts", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="known_hosts file for ssh:// devices (host key checking is always strict).")
@click.option("--ssh-option", "ssh_options", multiple=True,
              help="Extra ssh -o option (e.g. ProxyJump=gw); cannot weaken host key checking.")
@click.option("--remote-python", default="python3", show_default=True,
              help="Python on the device (needs numpy, pillow and a runtime).")
@click.option("--keep-remote", is_flag=True, help="Leave the working folder on the device.")
@click.option("--unsafe", is_flag=True, help="Allow Keras Lambda layers in the reference (trusted files only).")
@click.option("--json", "as_json", is_flag=True, help="Print results.json to stdout.")
@click.option("--verify-with", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Ed25519 public key (PEM or ssh-ed25519): refuse every artifact whose manifest is not signed "
                   "by this key (convert --sign).")
@ct_options("the --data layout", "--data")
def command(artifacts: tuple[Path, ...], data_dir: Path, devices: tuple[str, ...], reference: Path | None,
            no_reference: bool, out: Path, overwrite: bool, eval_list: Path | None, split: str,
            per_class: int | None, seed: int, preprocess: str | None, classes: str | None, input_size: int | None,
            raw_precision: str | None, threads: int | None, cpus: list[int] | None, batch: int, warmup: int,
            min_runs: int, min_seconds: float, reference_device: str, job_timeout: float | None,
            ssh_identity: Path | None, ssh_known_hosts: Path | None, ssh_options: tuple[str, ...],
            remote_python: str, keep_remote: bool, unsafe: bool, as_json: bool, verify_with: Path | None,
            ct_dir: Path | None, ct_csv: Path | None) -> None:
    """Accuracy and speed of ARTIFACT(s) on DEVICE(s) against the FP32 reference.

    ARTIFACT is a `convert` output folder (its manifest's sha256 is checked first: a modified
    artifact is refused) or a raw .tflite / .onnx / OpenVINO .xml / Keras file (then give
    --preprocess and --classes).

    \b
    Per artifact x device, in a fresh process (here, or on the device over SSH with the
    TensorFlow-free runtime):
      accuracy with a 95% bootstrap CI, macro-F1, per-class P/R/F1, confusion matrix,
      top-1 agreement and McNemar's exact test vs the reference, calibration error (ECE),
      the flipped images; a deduplicated figure on Testing;
      batch-1 latency p50/p90/p99/mean/std (warm-up, min runs AND min seconds),
      throughput, cold start, end-to-end per image, peak RSS, file and gzip size.

    \b
    \b
    Models trained on fused MRI+CT input (edgebrain train --fuse) need --ct-dir / --ct-csv:
    each MRI is fused with its CT partner on the host exactly as in training, and the fused
    images (lossless PNG) are what every worker and the reference decode. An MRI without a CT
    partner is reported by name and left out (results.json data.failed, data.fusion).

    Writes OUT/results.json (schema: edgebrain/schemas/results.schema.json), OUT/results.md
    and OUT/report.html (self-contained, offline). Exit 1 when some artifact failed to run, or
    when some MRI image had no CT partner (or could not be fused).
    """
    from ..bench import BenchOptions, SSHOptions, bench

    opts = BenchOptions(threads=threads, cpus=cpus, warmup=warmup, min_runs=min_runs, min_seconds=min_seconds,
                        batch=batch, seed=seed, job_timeout=job_timeout, reference_device=reference_device)
    ssh = SSHOptions(identity=str(ssh_identity) if ssh_identity else None,
                     known_hosts=str(ssh_known_hosts) if ssh_known_hosts else None, options=list(ssh_options),
                     remote_python=remote_python, keep_remote=keep_remote)
    cmd = "edgebrain bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else None
    try:
        doc = bench(list(artifacts), data_dir, device=list(devices), reference=reference, out=out, options=opts,
                    ssh=ssh, split=split, eval_list=eval_list, per_class=per_class, preprocess=preprocess,
                    classes=[c.strip() for c in classes.split(",")] if classes else None, input_size=input_size,
                    precision=raw_precision, no_reference=no_reference, overwrite=overwrite, unsafe=unsafe,
                    command=cmd, ct_dir=ct_dir, ct_csv=ct_csv, verify_with=verify_with)
    except EdgebrainError as exc:
        raise click.ClickException(str(exc)) from exc
    clean = {k: v for k, v in doc.items() if not k.startswith("_")}
    if as_json:
        click.echo(json.dumps(clean, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        from ..report import ordered

        con = Console()
        t = Table(title=f"bench: {clean['data']['split']}, n={clean['data']['n']}")
        for c in ("model", "device", "p50 ms", "speed-up", "accuracy", "Δ pp", "agreement"):
            t.add_column(c, justify="left" if c in ("model", "device") else "right")
        ref = clean.get("reference")
        for r in ordered(clean):
            vs = r.get("vs_reference") or {}
            t.add_row("reference" if r is ref else r["name"], str(r["device"].get("label")),
                      f"{r['latency_ms']['p50']:.2f}",
                      "1.00x" if r is ref else (f"{vs['speedup_p50']:.2f}x" if vs else "-"),
                      f"{100 * r['accuracy']:.2f}%", "" if r is ref or not vs else f"{vs['delta_accuracy_pp']:+.2f}",
                      "" if r.get("agreement") is None else f"{100 * r['agreement']:.1f}%")
        con.print(t)
        con.print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'report.html'}")
    fusion = clean["data"].get("fusion") or {}
    if fusion.get("n_failed"):
        click.echo(f"error: {fusion['n_failed']} MRI image(s) could not be paired with a CT image or fused; "
                   "they are listed in results.json data.failed", err=True)
    if clean.get("errors"):
        for e in clean["errors"]:
            click.echo(f"error: {e['name']} on {e['device']}: {e['error']}", err=True)
    if clean.get("errors") or fusion.get("n_failed"):
        raise SystemExit(1)
