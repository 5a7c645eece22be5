"""``edgebrain data check DIR``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import EdgebrainError


@click.group(name="data")
def command() -> None:
    """Inspect a dataset in the Kaggle layout (Training|Testing/<class>/*)."""


@command.command("check")
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--write-dedup", type=click.Path(path_type=Path), default=None,
              help="Write the deduplicated Testing list (sha256  relative/path) here.")
@click.option("--no-decode", is_flag=True, help="Skip decoding every image (faster; finds fewer problems).")
@click.option("--no-verify", is_flag=True, help="Trust MANIFEST.sha256 instead of re-hashing every file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check_cmd(data_dir: Path, write_dedup: Path | None, no_decode: bool, no_verify: bool, as_json: bool) -> None:
    """Per-class/per-split counts, unreadable files and exact duplicates.

    A bad file is reported by name; the check still covers every other file.
    Exit code 1 when problems were found, 0 otherwise.
    """
    from .. import data as D
    from ..progress import track

    try:
        rep = D.check(data_dir, verify_hashes=not no_verify, decode=not no_decode,
                      progress=lambda it, n: track(it, "decoding", n))
    except EdgebrainError as exc:
        raise click.ClickException(str(exc)) from exc
    dedup = rep.pop("_dedup")
    rep.pop("_dataset")
    if write_dedup:
        D.write_list(write_dedup, dedup)
        rep["dedup_testing"]["written_to"] = str(write_dedup)
    if as_json:
        click.echo(json.dumps(rep, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        con = Console()
        t = Table(title=f"{rep['root']}")
        t.add_column("split")
        for c in rep["classes"]:
            t.add_column(c, justify="right")
        t.add_column("total", justify="right")
        for sp, row in rep["counts"].items():
            t.add_row(sp, *[str(row[c]) for c in rep["classes"]], str(row["total"]))
        con.print(t)
        d = rep["duplicates"]
        con.print(f"images: {rep['images']}  unique contents: {rep['unique_images']}")
        con.print(f"duplicate groups: {d['groups']} ({d['files_in_groups']} files); "
                  f"across splits: {d['groups_across_splits']}; across classes: {d['groups_across_classes']}; "
                  f"within split: {d['groups_within_split']}")
        con.print(f"deduplicated Testing: {rep['dedup_testing']['images']} images "
                  f"({rep['dedup_testing']['removed']} removed)"
                  + (f" -> {write_dedup}" if write_dedup else ""))
        if rep["problems"]:
            con.print(f"[bold red]{len(rep['problems'])} problem file(s):[/]")
            for p in rep["problems"]:
                con.print(f"  {p['path']}: {p['problem']}", markup=False)
        else:
            con.print("no unreadable files")
    raise SystemExit(1 if rep["problems"] else 0)
