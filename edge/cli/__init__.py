"""The ``edgebrain`` command: a Click group whose commands load lazily (``--help`` stays fast
and never imports TensorFlow). One module per command, each thin over the library API."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path as _Path
from typing import Any

import click

from .. import __version__
from ..errors import EdgebrainError

COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("edgebrain.cli.doctor", "Versions, interpreters, CPU features and GPU presence."),
    "data": ("edgebrain.cli.data", "Inspect a dataset: counts, corrupt files, duplicates."),
    "train": ("edgebrain.cli.train", "Train a model variant on the Training split."),
    "convert": ("edgebrain.cli.convert", "Prune, quantise and convert a model to TFLite, ONNX and OpenVINO."),
    "bench": ("edgebrain.cli.bench", "Accuracy and latency of artifacts on a device vs the FP32 reference."),
    "predict": ("edgebrain.cli.predict", "Classify images with an artifact (TensorFlow-free)."),
    "gate": ("edgebrain.cli.gate", "Fail when an artifact's accuracy regressed (CI gate)."),
    "keygen": ("edgebrain.cli.keygen", "Make an Ed25519 key pair for convert --sign / --verify-with."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        mod = importlib.import_module(COMMANDS[name][0])
        return mod.command  # type: ignore[no-any-return]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, COMMANDS[n][1]) for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgebrain")
def cli() -> None:
    """edgebrain: brain-MRI tumour classifiers from the lab to clinic hardware.

    \b
    Typical flow:
      edgebrain train resnet50-lite --data DATA --out runs/lite
      edgebrain convert runs/lite/model.keras --to tflite,onnx,openvino --precision fp32,int8 --out artifacts
      edgebrain bench artifacts/* --data DATA --device host --out bench
      edgebrain gate bench/results.json
    """


def main(argv: list[str] | None = None) -> Any:
    """The console entry point: TensorFlow's native start-up noise is filtered from stderr."""
    from ..tfenv import quiet_native_logs

    quiet_native_logs()
    try:
        return cli.main(args=argv, prog_name="edgebrain", standalone_mode=True)
    except EdgebrainError as exc:  # pragma: no cover - standalone_mode handles most
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


def ct_options(mri_layout: str, mri_root: str, extra: str = "") -> Any:
    """``--ct-dir/--ct`` and ``--ct-csv/--pairs`` for models trained on fused MRI+CT (``--fuse``).
    ``mri_layout``: what the CT folder mirrors; ``mri_root``: what CSV 'mri' paths are relative to."""

    def deco(f: Any) -> Any:
        f = click.option("--ct-csv", "--pairs", "ct_csv", type=click.Path(path_type=_Path), default=None,
                         help=f"Models trained on fused MRI+CT: CSV with 'mri' and 'ct' columns ('mri' relative "
                              f"to {mri_root} or absolute; 'ct' relative to --ct-dir, else to the CSV's folder).")(f)
        return click.option("--ct-dir", "--ct", "ct_dir", type=click.Path(path_type=_Path), default=None,
                            help=f"Models trained on fused MRI+CT (--fuse): CT images mirroring {mri_layout} "
                                 f"(paired by relative path, or by file stem).{extra}")(f)
    return deco


def fail(exc: Exception, code: int = 2) -> None:
    """Print a user-facing error without a traceback and exit."""
    click.echo(f"error: {exc}", err=True)
    sys.exit(code)
