"""``edgebrain doctor``."""

from __future__ import annotations

import json

import click


@click.command(name="doctor")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def command(as_json: bool) -> None:
    """Package and runtime versions, which interpreters import, CPU model and the ISA
    features that decide int8/bf16 speed, and GPU presence."""
    from ..doctor import report

    rep = report()
    if as_json:
        click.echo(json.dumps(rep, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    con = Console()
    cpu = rep["cpu"]
    con.print(f"[bold]CPU[/] {cpu['model']} ({cpu['arch']}, {cpu['logical_cores']} logical cores), "
              f"memory {rep['memory_mb']} MB")
    isa = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu["isa"].items()
                   if k in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16",
                            "asimd", "asimddp"))
    con.print(f"[bold]ISA[/] {isa}")
    con.print(f"int8 dot-product instructions: {'yes' if cpu['int8_dot_product'] else 'no'}; "
              f"bf16: {'yes' if cpu['bf16'] else 'no'}")
    gpu = rep["gpu"]
    con.print(f"[bold]GPU[/] {', '.join(gpu['devices']) if gpu['present'] else 'none visible'}")
    t = Table(title="packages")
    t.add_column("package")
    t.add_column("version")
    for k, v in rep["packages"].items():
        t.add_row(k, v or "-")
    con.print(t)
    t = Table(title="interpreters")
    t.add_column("runtime")
    t.add_column("import")
    for k, v in rep["interpreters"].items():
        t.add_row(k, v)
    con.print(t)
