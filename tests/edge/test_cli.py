"""Every command's --help works, and the top-level CLI never imports TensorFlow for it."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from edgebrain.cli import COMMANDS, cli


def _all_commands() -> list[list[str]]:
    out: list[list[str]] = [[]]
    for name in sorted(COMMANDS):
        out.append([name])
        cmd = cli.get_command(click.Context(cli), name)
        if isinstance(cmd, click.Group):
            out.extend([name, sub] for sub in cmd.list_commands(click.Context(cmd)))
    return out


@pytest.mark.parametrize("path", _all_commands(), ids=lambda p: " ".join(p) or "edgebrain")
def test_help(path: list[str]) -> None:
    res = CliRunner().invoke(cli, [*path, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output
    if path:
        assert path[-1] in res.output


def test_every_registered_command_loads() -> None:
    for name in COMMANDS:
        assert isinstance(cli.get_command(click.Context(cli), name), click.Command)


def test_help_does_not_import_tensorflow() -> None:
    code = ("import sys; from click.testing import CliRunner; from edgebrain.cli import cli, COMMANDS\n"
            "for n in COMMANDS: CliRunner().invoke(cli, [n, '--help'])\n"
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("False"), out.stdout + out.stderr


def test_version_and_doctor_json() -> None:
    import json

    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0 and "edgebrain" in res.output
    res = CliRunner().invoke(cli, ["doctor", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert set(rep["cpu"]["isa"]) >= {"avx2", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "asimddp"}
    assert rep["interpreters"]["ai-edge-litert"] == "ok"
    assert rep["packages"]["tensorflow"].startswith("2.21")
    assert isinstance(rep["gpu"]["present"], bool)
