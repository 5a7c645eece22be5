"""``edgebrain convert MODEL --to T1,T2 --precision P1,P2 --out DIR``."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from ..errors import EdgebrainError
from . import ct_options


def _command_line() -> str | None:
    argv0 = Path(sys.argv[0]) if sys.argv else Path("")
    if argv0.name == "edgebrain" or (argv0.name == "__main__.py" and argv0.parent.name == "edgebrain"):
        return "edgebrain " + shlex.join(sys.argv[1:])
    return None  # called in-process (tests, notebooks): the API writes the equivalent command


@click.command(name="convert")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--to", "targets", required=True, help="Targets, comma-separated: tflite,onnx,openvino.")
@click.option("--precision", "precisions", required=True,
              help="Precisions, comma-separated: fp32,fp16,int8,bf16,dynamic,int16x8. A precision a target "
                   "does not offer is skipped with its reason.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output folder: one sub-folder per (target, precision).")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration images: a dataset in the Kaggle layout, one folder per class, or a flat folder. "
                   "Default: the calibration split recomputed from the model card.")
@click.option("--calib-size", type=int, default=256, show_default=True, help="Calibration images (stratified).")
@click.option("--calib-seed", type=int, default=0, show_default=True, help="Seed of the calibration sample.")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile", "distribution"]),
              default=None, help="onnxruntime calibration method (default: minmax and percentile are both built and the "
                   "better one on the validation split is kept, see --int8-search; TFLite and NNCF use "
                   "min/max).")
@click.option("--allow-overlap", is_flag=True,
              help="Proceed (with a loud warning in the manifest) when calibration images are in Testing.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Dataset root (Kaggle layout) when the model card's data root is missing or moved.")
@ct_options("the dataset layout", "the dataset root", " Calibration and verification use the "
            "fused pairs. Default: the CT folder recorded in the model card.")
@click.option("--prune", type=float, default=None, help="Magnitude-prune to this sparsity first (e.g. 0.5).")
@click.option("--prune-epochs", type=int, default=2, show_default=True, help="Fine-tuning epochs while pruning.")
@click.option("--prune-2x4", is_flag=True, help="2:4 structured sparsity instead of unstructured.")
@click.option("--prune-lr", type=float, default=1e-4, show_default=True, help="Fine-tuning learning rate.")
@click.option("--prune-min-params", type=int, default=1024, show_default=True,
              help="Leave layers with fewer prunable weights dense.")
@click.option("--prune-per-class", type=int, default=None, help="Fine-tune on a stratified subset (quick runs).")
@click.option("--prune-cluster", type=int, default=None,
              help="After pruning, sparsity-preserving weight clustering (tfmot) to this many distinct values "
                   "per layer (e.g. 16): smaller gzip'd files.")
@click.option("--cluster-epochs", type=int, default=1, show_default=True, help="Fine-tuning epochs while clustering.")
@click.option("--prune-channels", type=float, default=None,
              help="Structured pruning: remove this fraction of the filters (e.g. 0.25) of every convolution whose "
                   "output feeds only the next convolution (ResNet bottlenecks, Xception separable blocks), least "
                   "important first, then "
                   "fine-tune. Fewer multiply-accumulates: faster on every runtime. Before --prune when both "
                   "are given.")
@click.option("--channel-epochs", type=int, default=6, show_default=True,
              help="Fine-tuning epochs after --prune-channels (cosine learning rate to 0).")
@click.option("--channel-lr", type=float, default=1e-3, show_default=True,
              help="Initial fine-tuning learning rate after --prune-channels.")
@click.option("--preprocess", default=None,
              help="For a model without a model card: rescale | xception | caffe | imagenet | meanstd:M,M,M/S,S,S, "
                   "optionally +resize=nearest|bilinear|bicubic|area and +normalize=NAME (e.g. caffe+resize=nearest).")
@click.option("--classes", default=None, help="For a model without a model card: class names, comma-separated.")
@click.option("--keep-float", default=None,
              help="int8: keep ops whose names contain these substrings in float (comma-separated), e.g. "
                   "/sr/. Pipeline stages whose model-card int8 policy says float are kept float anyway.")
@click.option("--verify-n", type=int, default=None,
              help="Verify on this many validation images (default: the whole validation split).")
@click.option("--min-agreement", type=float, default=0.99, show_default=True,
              help="Reject an artifact whose top-1 agreement with the source is below this.")
@click.option("--no-verify", is_flag=True, help="Skip verification (the manifest says so).")
@click.option("--int8-fallback-below", type=float, default=0.995, show_default=True,
              help="When an int8 artifact's top-1 agreement on the verification (validation) images is below "
                   "this, try the target's alternative int8 settings (OpenVINO: accuracy-controlled NNCF; "
                   "TFLite: per-channel scales, float head; ONNX: float head) and keep one only if it agrees "
                   "more. 0 turns it off.")
@click.option("--int8-search/--no-int8-search", default=True, show_default=True,
              help="int8: also build the calibration settings the backend offers besides its default "
                   "(ONNX: percentile ranges; OpenVINO: NNCF fast bias correction) and keep the one that "
                   "agrees best with the source on the validation split (top-1 agreement, then mean KL "
                   "divergence). Never the evaluation set.")
@click.option("--unsafe", is_flag=True, help="Allow Lambda layers / arbitrary code in the model file.")
@click.option("--overwrite", is_flag=True, help="Replace existing artifact folders.")
@click.option("--threads", type=int, default=None, help="Threads for the verification runners.")
@click.option("--time-budget", type=float, default=None, metavar="SECONDS",
              help="Wall-clock budget for the whole run. When it is spent, the int8 search, its fallbacks and "
                   "NNCF accuracy control stop and the best build verified so far is kept; targets not yet "
                   "started are reported as failed (default: no limit).")
# target options (defaults live with each target; see docs/convert.md)
@click.option("--tflite-io", type=click.Choice(["float", "int8"]), default=None,
              help="TFLite int8 input/output type (default float).")
@click.option("--tflite-float-fallback/--no-tflite-float-fallback", default=None,
              help="Keep ops without int8 kernels in float (listed in the manifest) instead of failing (default on).")
@click.option("--tflite-per-channel/--tflite-per-tensor", default=None,
              help="TFLite int8 weight scales (default auto: per-tensor when verified, after cross-layer "
                   "equalisation for models with depthwise convolutions, per-channel as its fallback; "
                   "per-channel when not verified).")
@click.option("--equalize/--no-equalize", "equalize", default=None,
              help="int8 (TFLite, ONNX, OpenVINO): cross-layer equalisation of depthwise -> pointwise convolution pairs "
                   "(an exact rescaling of the float weights that suits one scale per tensor). Default: "
                   "with per-tensor weight scales on models with depthwise convolutions.")
@click.option("--opset", type=int, default=None, help="ONNX opset (>= 13, default 17).")
@click.option("--onnx-format", type=click.Choice(["qoperator", "qdq"]), default=None,
              help="ONNX int8 form (default qoperator).")
@click.option("--onnx-activations", type=click.Choice(["u8", "s8"]), default=None,
              help="ONNX int8 activations (default u8).")
@click.option("--onnx-weights", type=click.Choice(["s8", "u8"]), default=None, help="ONNX int8 weights (default s8).")
@click.option("--onnx-per-channel/--onnx-per-tensor", default=None,
              help="ONNX int8 weight scales (default auto: per-channel; per-tensor after cross-layer "
                   "equalisation for models with depthwise convolutions when verified, per-channel as its "
                   "fallback).")
@click.option("--onnx-reduce-range", is_flag=True, default=None,
              help="7-bit ONNX weights (x86 CPUs without VNNI).")
@click.option("--openvino-from", type=click.Choice(["onnx", "saved_model"]), default=None,
              help="What openvino.convert_model reads (default onnx).")
@click.option("--nncf-preset", type=click.Choice(["performance", "mixed"]), default=None,
              help="NNCF quantisation preset (default performance).")
@click.option("--max-drop", type=float, default=None,
              help="OpenVINO int8 with accuracy control: max absolute top-1 drop on the validation split "
                   "(0.005 = 0.5 pp).")
@click.option("--max-drop-metric", type=click.Choice(["accuracy", "agreement"]), default=None,
              help="What --max-drop bounds: top-1 accuracy on the validation labels (default) or top-1 "
                   "agreement with the float model.")
@click.option("--openvino-per-channel/--openvino-per-tensor", default=None,
              help="OpenVINO int8 weight scales (default auto: per-channel; per-tensor after cross-layer "
                   "equalisation for models with depthwise convolutions when verified, per-channel as its "
                   "fallback).")
@click.option("--openvino-fp16-compute", type=click.Choice(["f32", "f16"]), default=None,
              help="Compute precision of OpenVINO fp16 (compressed-weight) IR (default f32).")
@click.option("--float-head", is_flag=True, default=None,
              help="int8: keep the classifier head (fully-connected layers, softmax) in float; convolutions "
                   "stay int8.")
@click.option("--float-logits/--int8-logits", "float_logits", default=None,
              help="TFLite/ONNX int8: keep the last classifier layer (logits, softmax) in float (default) "
                   "or quantise it too. OpenVINO (NNCF) never rounds the logits.")
@click.option("--nncf-fast-bias-correction/--nncf-bias-correction", default=None,
              help="NNCF bias correction: the exact one (default) or the fast approximation.")
@click.option("--nncf-activation-range", type=click.Choice(["minmax", "mean_minmax"]), default=None,
              help="NNCF activation ranges: minmax (default; extremes over the calibration set) or "
                   "mean_minmax (NNCF's own default: per-image extremes averaged).")
@click.option("--openvino-int8-ir", type=click.Choice(["fp16", "fp32"]), default=None,
              help="OpenVINO int8: the IR NNCF quantises. fp16: weights compressed to FP16 first, as "
                   "openvino's converter saves them, so the biases stay FP16 in the int8 IR (smaller file, "
                   "same int8 kernels); fp32: f32 biases. Default: fp16, but fp32 when layers stay float "
                   "(--max-drop, --float-head, float scopes), so they keep f32 weights.")
@click.option("--strip-names/--keep-names", "strip_names", default=None,
              help="Drop the names of intermediate tensors and nodes from the model file (default; every "
                   "target and precision; inputs, outputs and TFLite signatures keep theirs) or keep them "
                   "for debugging.")
@click.option("--sign", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Sign every manifest with this Ed25519 private key (PEM; `edgebrain keygen KEY` makes one). "
                   "predict/bench --verify-with PUBKEY then refuse artifacts it did not sign.")
@click.option("--resume", is_flag=True,
              help="Keep the artifacts an interrupted run into --out finished (when they still verify and come "
                   "from the same model) and convert only the rest.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def command(model: Path, targets: str, precisions: str, out: Path, as_json: bool, **kw: Any) -> None:
    """Convert MODEL (a model folder or .keras/.h5/SavedModel from `edgebrain train`, a Keras 3
    .keras file, or an .onnx file) to TFLite, ONNX and OpenVINO at the given precisions.

    \b
    Each artifact folder holds the model file and manifest.json: source and artifact sha256,
    quantisation settings, the calibration manifest, preprocessing and classes (from the model
    card), op counts, verification against the source, tool versions and this command line.
    bench, predict and gate read it: no flag is repeated downstream.

    \b
    Every artifact is verified right after it is written; one below --min-agreement is moved
    to <name>.rejected and the command exits 1. Calibration images that share content with the
    evaluation set (Testing) are refused unless --allow-overlap.

    \b
    A model trained on fused MRI+CT input (edgebrain train --fuse) is calibrated and verified
    on fused MRI+CT pairs built as in training: give --ct-dir or --ct-csv (default: the CT source
    in its model card); MRI images without a CT partner are skipped and counted.

    \b
    Examples:
      edgebrain convert runs/lite --to tflite,onnx,openvino --precision fp32,int8 --out artifacts/lite
      edgebrain convert runs/lite --to tflite --precision int8 --prune 0.5 --out artifacts/lite-sparse
      edgebrain convert runs/lite --to tflite --precision int8 --prune 0.5 --prune-cluster 16 --out artifacts/lite-pc
      edgebrain convert runs/w05 --to openvino --precision int8 --prune-channels 0.25 --out artifacts/w05-ch25
      edgebrain convert other.onnx --to onnx,openvino --precision int8 --calib calib_imgs/ \\
          --preprocess imagenet --classes glioma,meningioma,notumor,pituitary --out artifacts/other
    """
    from ..convert import ConvertFailed, convert

    try:
        arts = convert(model, targets, precisions, out, command=_command_line(), **kw)
        failed = None
    except ConvertFailed as exc:
        arts, failed = exc.artifacts, exc
    except EdgebrainError as exc:
        raise click.ClickException(str(exc)) from exc
    from ..io import read_json

    summary = read_json(out / "convert_summary.json")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print(summary)
    if failed is not None:
        click.echo(f"error: {failed}", err=True)
        raise SystemExit(1)
    if not arts:
        raise SystemExit(1)


def _fmt_mb(n: Any) -> str:
    return f"{n / 1e6:.2f} MB" if isinstance(n, (int, float)) else "-"


def _fmt_peak(mb: Any) -> str:
    return f"{mb / 1024:.2f} GB" if isinstance(mb, (int, float)) else "-"


def _print(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=f"edgebrain convert: {summary['source']['path']}")
    for col in ("artifact", "status", "size", "gzip", "agreement", "max |dp|", "int8 ops", "float ops",
                "peak RSS"):
        t.add_column(col, justify="left" if col in ("artifact", "status") else "right")
    for r in summary["artifacts"]:
        v = r.get("verification") or {}
        ops = r.get("ops") or {}
        ag = v.get("top1_agreement")
        dp = v.get("max_abs_dp")
        t.add_row(r["path"], {"ok": "[green]ok[/]", "kept": "[green]kept[/]"}.get(r["status"], "[red]REJECTED[/]"),
                  _fmt_mb(r.get("size_bytes")), _fmt_mb(r.get("gzip_bytes")),
                  "-" if ag is None else f"{ag:.4f}", "-" if dp is None else f"{dp:.2e}",
                  str(ops.get("int8_ops", "-")), str(ops.get("float_ops", "-")),
                  _fmt_peak((r.get("memory") or {}).get("peak_rss_mb")))
    con.print(t)
    mem = summary.get("memory") or {}
    if mem.get("peak_rss_mb") is not None:
        con.print(f"peak memory (RSS) of the run: {_fmt_peak(mem['peak_rss_mb'])}", markup=False)
    for s in summary["skipped"]:
        con.print(f"[yellow]skipped[/] {s['target']} {s['precision']}: {s['reason']}", markup=True)
    for f in summary["failed"]:
        con.print(f"[red]failed[/] {f['target']} {f['precision']}: ", end="")
        con.print(f["error"], markup=False)
    for w in summary.get("warnings", []):
        con.print("[yellow]warning[/] ", end="")
        con.print(w, markup=False)
