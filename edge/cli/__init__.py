"""The ``edgebrain`` command: a Click group whose commands load lazily (``--help`` stays fast
and never imports TensorFlow). One module per command, each thin over the library API."""

from __future__ import annotations

import importlib
import sys
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
    try:
        return cli.main(args=argv, prog_name="edgebrain", standalone_mode=True)
    except EdgebrainError as exc:  # pragma: no cover - standalone_mode handles most
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


def fail(exc: Exception, code: int = 2) -> None:
    """Print a user-facing error without a traceback and exit."""
    click.echo(f"error: {exc}", err=True)
    sys.exit(code)
