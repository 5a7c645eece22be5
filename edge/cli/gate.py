"""``edgebrain gate RESULTS.json``: exit 0 pass, 1 regression, 2 usage error or missing data."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import EdgebrainError

D_MAX_DROP = 0.5
D_MAX_CLASS_DROP = 1.0
D_MIN_AGREEMENT = 0.99
D_MAX_LATENCY_RATIO = 1.5
D_NI_MARGIN = 2.0
D_ALPHA = 0.05


class GateUsage(click.ClickException):
    exit_code = 2


def _print(report: object) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..gate import ERROR, FAIL, PASS, SKIP, GateReport, signed, worst_class

    assert isinstance(report, GateReport)
    con = Console(highlight=False, width=max(Console().width, 110))
    style = {PASS: "green", FAIL: "red", ERROR: "bold red", SKIP: "dim"}
    th = "; ".join(f"{k} {v}" for k, v in report.thresholds.describe())
    con.print(f"thresholds: {th}; artifact hash check {'on' if report.artifact_check else 'OFF'}", markup=False)
    if report.reference:
        acc = report.reference.get("accuracy")
        con.print(f"reference: {report.reference.get('name') or 'FP32 source'} on {report.reference.get('device')}, "
                  + (f"accuracy {100 * acc:.2f}%" if isinstance(acc, (int, float)) else "accuracy missing"),
                  markup=False)
    if report.subjects:
        t = Table(title=f"edgebrain gate: {report.results_path}")
        for col, just in (("artifact @ device", "left"), ("accuracy", "right"), ("Δ pp", "right"),
                          ("worst class Δ pp", "right"), ("agreement", "right"), ("p50 ms", "right"),
                          ("verdict", "left")):
            t.add_column(col, justify=just, no_wrap=col != "verdict")  # type: ignore[arg-type]
        for s in report.subjects:
            acc = s.metrics.get("accuracy")
            agr = s.metrics.get("agreement")
            p50 = s.metrics.get("latency_p50_ms")
            ac = s.check("accuracy")
            bad = [c.name for c in s.checks if c.status in (FAIL, ERROR)]
            verdict = s.status + (": " + ", ".join(bad) if bad else "")
            t.add_row(s.key, f"{100 * acc:.2f}%" if isinstance(acc, (int, float)) else "—",
                      signed(-ac.value) if ac and ac.value is not None else "—", worst_class(s) or "—",
                      f"{agr:.4f}" if isinstance(agr, (int, float)) else "—",
                      f"{p50:.3g}" if isinstance(p50, (int, float)) else "—",
                      f"[{style[s.status]}]{verdict}[/]")
        con.print(t)
    for s, c in report.failures():
        who = f"{s.key} {c.name}" if s else "results"
        con.print(f"[{style[c.status]}]{c.status.upper()}[/] {who}: ", end="")
        con.print(c.message, markup=False)
    for n in report.notes:
        con.print(f"note: {n}", markup=False)


@click.command(name="gate")
@click.argument("results", type=click.Path(path_type=Path))
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="A reviewed baseline JSON (from --update-baseline): adds accuracy-vs-baseline and latency checks.")
@click.option("--update-baseline", is_flag=True,
              help="Write --baseline from these results (atomic) when every other check passes.")
@click.option("--max-drop", type=float, default=None,
              help=f"Max overall accuracy drop vs the reference, percentage points [default: {D_MAX_DROP}].")
@click.option("--max-class-drop", type=float, default=None,
              help=f"Max recall drop of any class vs the reference, pp [default: {D_MAX_CLASS_DROP}].")
@click.option("--min-agreement", type=float, default=None,
              help=f"Min top-1 agreement with the reference, fraction [default: {D_MIN_AGREEMENT}].")
@click.option("--min-accuracy", type=float, default=None,
              help="Absolute accuracy floor for every artifact, fraction (e.g. 0.9) [default: off].")
@click.option("--max-latency-ratio", type=float, default=None,
              help=f"Max p50 latency / baseline p50 (needs --baseline) [default: {D_MAX_LATENCY_RATIO}].")
@click.option("--non-inferiority", type=click.Choice(["off", "ci", "mcnemar"]), default="off", show_default=True,
              help="Statistical check: ci = lower 95% bootstrap bound within --ni-margin of the reference; "
                   "mcnemar = not significantly worse than the reference at --alpha.")
@click.option("--ni-margin", type=float, default=D_NI_MARGIN, show_default=True,
              help="Non-inferiority margin for --non-inferiority ci, pp.")
@click.option("--alpha", type=float, default=D_ALPHA, show_default=True, help="Significance level for mcnemar.")
@click.option("--max-robustness-drop", type=float, default=None,
              help="Max worst accuracy drop under the bench --robustness suite, pp [default: off].")
@click.option("--max-robustness-extra-drop", type=float, default=None,
              help="Max extra drop vs the reference under any perturbation of the suite, pp [default: off].")
@click.option("--class-rule", type=click.Choice(["exact", "threshold"]), default="exact", show_default=True,
              help="Classes where one image is worth more than --max-class-drop: decide their recall with an exact "
                   "one-sided McNemar test on the paired predictions at --alpha (exact), or keep the pp limit, which "
                   "then fails on a single changed prediction (threshold).")
@click.option("--convert-summary", "convert_summaries", multiple=True, type=click.Path(path_type=Path),
              help="A convert_summary.json whose rejected or failed artifacts count as failures (repeatable). "
                   "Summaries beside the benchmarked artifact folders are read without this.")
@click.option("--no-artifact-check", is_flag=True,
              help="Do not re-hash the artifact folders named in the results (gate on the numbers alone).")
@click.option("--artifact-root", type=click.Path(path_type=Path), default=None,
              help="Where the artifact folders are, when not at the paths recorded in the results.")
@click.option("--max-unreadable", type=click.IntRange(min=0), default=0, show_default=True,
              help="How many evaluation images bench could not score (results.json data.failed) still pass; "
                   "more fails the gate (exit 1).")
@click.option("--junit", type=click.Path(path_type=Path), default=None, help="Write a JUnit XML report here.")
@click.option("--summary", type=click.Path(path_type=Path), default=None,
              help="Write a Markdown summary here (e.g. append it to $GITHUB_STEP_SUMMARY).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Write the full gate report as JSON here.")
def command(results: Path, baseline: Path | None, update_baseline: bool, max_drop: float | None,
            max_class_drop: float | None, min_agreement: float | None, min_accuracy: float | None,
            max_latency_ratio: float | None,
            non_inferiority: str, ni_margin: float, alpha: float, max_robustness_drop: float | None,
            max_robustness_extra_drop: float | None, class_rule: str, convert_summaries: tuple[Path, ...],
            no_artifact_check: bool, artifact_root: Path | None, max_unreadable: int, junit: Path | None,
            summary: Path | None, json_out: Path | None) -> None:
    """Fail when an artifact in a bench RESULTS.json is less accurate than the FP32 reference.

    For every artifact x device: overall accuracy drop, every class's recall drop, top-1
    agreement, optionally a non-inferiority test, and with --baseline the accuracy and p50
    latency against the numbers approved before. The artifact folder named in each result is
    re-hashed against its manifest. Fails closed: missing metrics, an empty results file, a
    missing reference, a tampered or missing artifact, or a baseline from another model, data
    list or device never pass.

    \b
    Exit codes: 0 pass, 1 regression, 2 usage error or missing/untrustworthy data.
    """
    from ..gate import GateError, check_robustness, gate, write_junit, write_summary
    from ..io import atomic_write_json

    if max_latency_ratio is not None and baseline is None:
        raise GateUsage("--max-latency-ratio compares p50 latency with a stored baseline: add --baseline FILE")
    try:
        report = gate(
            results, baseline=baseline,
            max_drop=D_MAX_DROP if max_drop is None else max_drop,
            max_class_drop=D_MAX_CLASS_DROP if max_class_drop is None else max_class_drop,
            min_agreement=D_MIN_AGREEMENT if min_agreement is None else min_agreement,
            max_latency_ratio=D_MAX_LATENCY_RATIO if max_latency_ratio is None else max_latency_ratio,
            non_inferiority=non_inferiority, ni_margin=ni_margin, alpha=alpha, min_accuracy=min_accuracy,
            artifact_check=not no_artifact_check, artifact_root=artifact_root, update_baseline=update_baseline,
            class_rule=class_rule, convert_summary=list(convert_summaries) or None,
            max_unreadable=max_unreadable,
        )
        check_robustness(report, max_robustness_drop, max_robustness_extra_drop)
    except GateError as exc:
        raise GateUsage(str(exc)) from exc
    except EdgebrainError as exc:
        raise GateUsage(str(exc)) from exc
    _print(report)
    try:
        if junit:
            write_junit(junit, report)
            click.echo(f"JUnit report: {junit}")
        if summary:
            write_summary(summary, report)
            click.echo(f"Markdown summary: {summary}")
        if json_out:
            atomic_write_json(json_out, report.to_dict())
            click.echo(f"JSON report: {json_out}")
    except OSError as exc:
        raise GateUsage(f"cannot write the report: {exc}") from exc
    if report.baseline_written:
        click.echo(f"baseline written: {report.baseline_written} (review and commit it)")
    click.echo(f"gate: {report.verdict} (exit {report.exit_code})")
    if report.exit_code:
        raise SystemExit(report.exit_code)
