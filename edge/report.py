"""``results.md`` and ``report.html`` from a bench results document.

The HTML is one self-contained file: inline CSS, plots as base64 PNG drawn with matplotlib's
Agg canvas (no pyplot, no global state), no scripts and no external URLs, so it opens offline
on a hospital PC and can be attached to a validation record.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

# ----------------------------------------------------------------------------- formatting


def _f(v: Any, nd: int = 2, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, int):
        return f"{v}{unit}"
    return f"{v:.{nd}f}{unit}"


def _pct(v: Any, nd: int = 2) -> str:
    return "-" if v is None else f"{100.0 * v:.{nd}f}%"


def _mb(n: Any) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _p(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.2g}" if v < 0.01 else f"{v:.3f}"


def ordered(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The reference first (it heads the comparison), then the results by p50 latency."""
    rows = sorted(doc.get("results") or [], key=lambda r: (r["latency_ms"]["p50"], r["name"]))
    ref = doc.get("reference")
    return ([ref] if ref else []) + rows


def _model_label(r: dict[str, Any], ref: dict[str, Any] | None) -> str:
    return f"reference: {r['name']}" if r is ref else r["name"]


def _threads(r: dict[str, Any]) -> str:
    d = r["device"]
    cpus = d.get("cpus") or []
    where = f" on CPU{'s' if len(cpus) > 1 else ''} {','.join(map(str, cpus))}" if cpus else ""
    return f"{d.get('threads')}{where}"


SPEED_COLUMNS = ["model", "target", "precision", "device", "runtime (ran on)", "threads", "p50 ms", "p90 ms",
                 "p99 ms", "mean ms", "speed-up", "size ratio", "Δ acc pp", "throughput img/s", "cold start ms",
                 "e2e ms", "peak RSS", "size", "gzip", "other CPU load"]
ACC_COLUMNS = ["model", "device", "n", "accuracy [95% CI]", "Δ acc pp", "macro-F1", "agreement", "flips",
               "McNemar b/c", "McNemar p", "ECE", "dedup n", "dedup accuracy", "dedup macro-F1"]
LEFT = {"model", "target", "precision", "device", "runtime (ran on)", "threads", "stage", "model file"}


def _short_runtime(s: str | None) -> str:
    """'openvino 2026.4.1-22982-e213a...' -> 'openvino 2026.4.1' (the full version is in the fingerprint)."""
    if not s:
        return "?"
    name, _, ver = s.partition(" ")
    return f"{name} {ver.split('-')[0]}" if ver else name


def _ran_on(r: dict[str, Any]) -> str:
    d = r["device"]
    s = f"{_short_runtime(d.get('runtime'))} on {d.get('ran_on') or '?'}"
    if d.get("execution_precision"):
        s += f" ({d['execution_precision']})"
    return s


def _delta(r: dict[str, Any], ref: dict[str, Any] | None) -> str:
    vs = r.get("vs_reference")
    return "0.00" if r is ref else (f"{vs['delta_accuracy_pp']:+.2f}" if vs else "-")


def speed_rows(doc: dict[str, Any]) -> list[list[str]]:
    ref = doc.get("reference")
    rows = []
    for r in ordered(doc):
        vs = r.get("vs_reference") or {}
        lat = r["latency_ms"]
        tp = r.get("throughput") or {}
        rows.append([
            _model_label(r, ref), r["target"], r["precision"], str(r["device"].get("label") or r["device"]["profile"]),
            _ran_on(r), _threads(r), _f(lat["p50"]), _f(lat["p90"]), _f(lat["p99"]), _f(lat["mean"]),
            "1.00x" if r is ref else (_f(vs.get("speedup_p50")) + "x" if vs else "-"),
            "1.000" if r is ref else (_f(vs.get("size_ratio"), 3) if vs else "-"), _delta(r, ref),
            _f(r["throughput_ips"], 1) + (f" (batch {tp.get('batch')})" if tp.get("batch") else ""),
            _f(r["cold_start_ms"], 0), _f(r["e2e_ms"]), _f(r["peak_rss_mb"], 0, " MB"), _mb(r["size_bytes"]),
            _mb(r.get("gzip_bytes")), _pct(r.get("background_cpu"), 0),
        ])
    return rows


def accuracy_rows(doc: dict[str, Any]) -> list[list[str]]:
    ref = doc.get("reference")
    rows = []
    for r in ordered(doc):
        mc = r.get("mcnemar")
        dd = r.get("dedup")
        rows.append([
            _model_label(r, ref), str(r["device"].get("label") or r["device"]["profile"]), str(r.get("n", "-")),
            f"{_pct(r['accuracy'])} [{_pct(r['accuracy_ci95'][0], 1)}, {_pct(r['accuracy_ci95'][1], 1)}]",
            _delta(r, ref), _f(r["macro_f1"], 4), _pct(r.get("agreement")),
            str(r.get("n_flips", len(r.get("flips") or []))) if r is not ref else "-",
            "-" if not mc else f"{mc['b']}/{mc['c']}", "-" if not mc else _p(mc["p_value"]), _f(r["ece"], 4),
            "-" if not dd else str(dd["n"]), "-" if not dd else _pct(dd["accuracy"]),
            "-" if not dd else _f(dd["macro_f1"], 4),
        ])
    return rows


STAGE_COLUMNS = ["model", "device", "stage", "model file", "precision", "p50 ms", "p90 ms", "p99 ms", "mean ms"]


def stage_rows(doc: dict[str, Any]) -> list[list[str]]:
    """Per-stage model-only latency of multi-stage artifacts (manifest ``pipeline.stages``)."""
    rows = []
    for r in ordered(doc):
        for st in r.get("stages") or []:
            lat = st.get("latency_ms") or {}
            if st.get("error"):
                timing = [f"error: {st['error']}", "-", "-", "-"]
            else:
                timing = [_f(lat.get("p50")), _f(lat.get("p90")), _f(lat.get("p99")), _f(lat.get("mean"))]
            rows.append([r["name"], str(r["device"].get("label")), str(st.get("name")), str(st.get("model_file")),
                         str(st.get("precision") or "-"), *timing])
    return rows


def _md_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |",
           "|" + "|".join(":---" if c in LEFT else "---:" for c in columns) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


# ----------------------------------------------------------------------------- markdown


def render_markdown(doc: dict[str, Any]) -> str:
    d = doc["data"]
    ref = doc.get("reference")
    lines = ["# edgebrain bench results", ""]
    lines.append(f"- data: `{d['root']}` split **{d['split']}**, n = {d['n']}"
                 + (f" (deduplicated: n = {d['dedup_n']})" if d.get("dedup_n") is not None else "")
                 + (f", {d['per_class']} per class" if d.get("per_class") else "")
                 + f", list sha256 `{d['list_hash'][:16]}`")
    lines.append(f"- classes: {', '.join(d['class_names'])}")
    fu = d.get("fusion")
    if fu:
        src = f"CSV `{fu['csv']}`" if fu.get("csv") else f"CT folder `{fu.get('ct_dir')}`"
        lines.append(f"- inputs: MRI + CT fused ({fu.get('method')}, mode {fu.get('mode')}, {fu.get('channels')}) "
                     f"with CT from {src}; {fu.get('n_fused')} pair(s) fused on the host (median "
                     f"{_f((fu.get('fuse_ms_host') or {}).get('p50'))} ms each, not in the e2e figures), "
                     f"{fu.get('n_failed')} MRI image(s) without a usable CT partner")
    if ref:
        lines.append(f"- reference: `{ref['artifact']}`, {_ran_on(ref)}, threads {_threads(ref)}: accuracy "
                     f"{_pct(ref['accuracy'])}, p50 {_f(ref['latency_ms']['p50'])} ms")
    else:
        lines.append("- reference: none (--no-reference): no agreement, McNemar or speed-up figures")
    lines.append(f"- created {doc['created']} by `{doc['command']}`")
    host = doc.get("host") or {}
    if host.get("load_average_start") is not None:
        lines.append(f"- host load average (1/5/15 min) at start {host['load_average_start']}, "
                     f"at end {host.get('load_average_end')}")
    lines += ["", "## Speed and size", "",
              "Sorted by model-only batch-1 p50 latency; the reference heads the table. Speed-up (reference p50 / "
              "p50) and size ratio are against the reference; Δ acc in percentage points. Other CPU load: share of "
              "the machine's CPU time used by other processes while the latency was timed (above a few percent, "
              "the latency includes contention).", ""]
    lines += _md_table(SPEED_COLUMNS, speed_rows(doc))
    lines += ["", "## Accuracy", "",
              "Same order. CI: 95% percentile bootstrap. Agreement: top-1 agreement with the reference. McNemar: "
              "b = reference right / model wrong, c = the reverse; exact two-sided binomial p. ECE: 15 bins.", ""]
    lines += _md_table(ACC_COLUMNS, accuracy_rows(doc))
    lines.append("")
    if stage_rows(doc):
        lines += ["## Pipeline stages", "", "Model-only batch-1 latency of each stage file, same runner.", ""]
        lines += _md_table(STAGE_COLUMNS, stage_rows(doc))
        lines.append("")
    for r in ordered(doc):
        extra = []
        if r.get("n_flips"):
            extra.append(f"{r['n_flips']} flipped image(s) vs the reference (see report.html / results.json)")
        for w in (r.get("warnings") or []) + (r["device"].get("warnings") or []):
            extra.append(f"warning: {w}")
        tp = r.get("throughput") or {}
        if tp.get("note"):
            extra.append(tp["note"])
        if extra:
            lines.append(f"**{r['name']} on {r['device'].get('label')}**: " + "; ".join(extra))
            lines.append("")
    if doc.get("errors"):
        lines += ["## Errors", ""]
        lines += [f"- {e.get('name', e['artifact'])} on {e['device']}: {e['error']}" for e in doc["errors"]]
        lines.append("")
    if doc.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in doc["warnings"]] + [""]
    if d.get("failed"):
        lines += ["## Images that could not be read", ""] + [f"- {f['file']}: {f['problem']}" for f in d["failed"]]
        lines.append("")
    lines += ["## Devices", ""]
    seen = set()
    for r in ordered(doc):
        dev = r["device"]
        key = dev.get("label")
        if key in seen:
            continue
        seen.add(key)
        fp = dev.get("fingerprint") or {}
        lines.append(f"- **{key}** ({dev.get('transport')}): {fp.get('cpu')} ({fp.get('arch')}, {fp.get('cores')} "
                     f"logical cores, {fp.get('memory_mb')} MB), {fp.get('os')}, Python {fp.get('python')}; ISA: "
                     f"{' '.join(fp.get('isa') or []) or '-'}")
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_latency_accuracy(doc: dict[str, Any]) -> str:
    """Accuracy (with 95% CI) against p50 latency, one panel per device; the reference in each."""
    from matplotlib.figure import Figure

    results = doc.get("results") or []
    ref = doc.get("reference")
    devices: list[str] = []
    for r in results:
        if r["device"]["label"] not in devices:
            devices.append(r["device"]["label"])
    devices = devices or ["host"]
    n = len(devices)
    fig = Figure(figsize=(6.4 * min(n, 2), 5.6 * math.ceil(n / 2)))
    colors = {"tflite": "#1f77b4", "onnx": "#d62728", "openvino": "#2ca02c", "tensorflow": "#7f7f7f"}
    markers = {"fp32": "o", "fp16": "s", "bf16": "P", "int8": "D", "dynamic": "v", "int16x8": "^", "unknown": "x"}
    for k, dev in enumerate(devices):
        ax = fig.add_subplot(math.ceil(n / 2), min(n, 2), k + 1)
        pts = [r for r in results if r["device"]["label"] == dev]
        if ref:
            pts = [ref, *pts]
        for r in pts:
            x = r["latency_ms"]["p50"]
            yv = 100 * r["accuracy"]
            lo, hi = (100 * v for v in r["accuracy_ci95"])
            is_ref = r is ref
            label = "reference (fp32)" if is_ref else f"{r['target']} {r['precision']}"
            ax.errorbar([x], [yv], yerr=[[yv - lo], [hi - yv]], fmt="*" if is_ref else markers.get(r["precision"], "o"),
                        color="black" if is_ref else colors.get(r["target"], "#9467bd"), ms=13 if is_ref else 8,
                        capsize=3, lw=1, label=f"{label}: {x:.3g} ms, {yv:.2f}%")
        ax.set_xscale("log")
        ax.set_xlabel("model-only batch-1 latency p50 (ms, log scale)")
        ax.set_ylabel("accuracy (%) with 95% CI")
        ref_note = f"; reference on host {ref['device'].get('ran_on')}" if ref else ""
        ax.set_title(f"{dev}{ref_note}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.suptitle(f"Latency vs accuracy ({doc['data']['split']}, n={doc['data']['n']})", fontsize=11)
    return _png(fig)


def plot_confusions(doc: dict[str, Any]) -> str:
    from matplotlib.figure import Figure

    recs = ordered(doc)
    names = doc["data"]["class_names"]
    n = len(recs)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.3 * cols, 4.1 * rows))
    for k, r in enumerate(recs):
        ax = fig.add_subplot(rows, cols, k + 1)
        cm = r["confusion_matrix"]
        tot = [max(1, sum(row)) for row in cm]
        frac = [[v / tot[i] for v in row] for i, row in enumerate(cm)]
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i, row in enumerate(cm):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=9,
                        color="white" if frac[i][j] > 0.55 else "black")
        ax.set_xticks(range(len(names)))
        ax.set_yticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_yticklabels(names, fontsize=8)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        title = f"reference: {r['name']}" if r is doc.get("reference") else f"{r['name']}"
        ax.set_title(f"{title}\n{r['device'].get('label')}, acc {_pct(r['accuracy'])}", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def plot_latency_bars(doc: dict[str, Any]) -> str:
    from matplotlib.figure import Figure

    recs = ordered(doc)
    fig = Figure(figsize=(8, 0.45 * len(recs) + 1.4))
    ax = fig.add_subplot(1, 1, 1)
    labels = [_model_label(r, doc.get("reference")) + f" @ {r['device'].get('label')}" for r in recs]
    ys = list(range(len(recs)))[::-1]
    p50 = [r["latency_ms"]["p50"] for r in recs]
    p99 = [r["latency_ms"]["p99"] for r in recs]
    e2e = [r.get("e2e_ms") or 0.0 for r in recs]
    ax.barh([y + 0.27 for y in ys], e2e, height=0.25, color="#c7c7c7", label="end-to-end per image (p50)")
    ax.barh(ys, p50, height=0.25, color="#1f77b4", label="model-only p50")
    ax.barh([y - 0.27 for y in ys], p99, height=0.25, color="#ff7f0e", label="model-only p99")
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("ms")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


# ----------------------------------------------------------------------------- html

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:24px;color:#1b1b1b;max-width:1600px}
h1{font-size:22px;margin:0 0 6px} h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
th,td{border:1px solid #d0d0d0;padding:3px 4px;text-align:right;white-space:nowrap}
th{background:#f1f3f5;position:sticky;top:0;white-space:normal} td.l,th.l{text-align:left}
td.l{white-space:normal} td.l:first-child{min-width:150px}
tr.ref td{background:#fff8e1;font-weight:600} .muted{color:#666} .warn{color:#8a4b00} .err{color:#b00020}
.wrap{overflow-x:auto} img{max-width:100%;height:auto;border:1px solid #eee}
ul{margin:4px 0 4px 18px;padding:0} code{background:#f4f4f4;padding:0 3px}
"""


def _img(b64: str, alt: str, cls: str) -> str:
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _html_table(tid: str, columns: list[str], rows: list[list[str]], recs: list[dict[str, Any]],
                ref: dict[str, Any] | None) -> str:
    esc = html.escape
    out = [f'<div class="wrap"><table id="{tid}"><thead><tr>'
           + "".join(f'<th class="{"l" if c in LEFT else ""}">{esc(c)}</th>' for c in columns) + "</tr></thead><tbody>"]
    for r, row in zip(recs, rows):
        cls = ' class="ref"' if r is ref else ""
        out.append(f'<tr{cls} data-model="{esc(r["name"])}">'
                   + "".join(f'<td class="{"l" if c in LEFT else ""}">{esc(v)}</td>' for c, v in zip(columns, row))
                   + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def render_html(doc: dict[str, Any]) -> str:
    esc = html.escape
    d = doc["data"]
    ref = doc.get("reference")
    parts: list[str] = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                        "<title>edgebrain bench report</title>", f"<style>{CSS}</style></head><body>"]
    parts.append("<h1>edgebrain bench report</h1>")
    meta = [f"data <code>{esc(d['root'])}</code>, split <b>{esc(d['split'])}</b>, n = {d['n']}"
            + (f" (deduplicated n = {d['dedup_n']})" if d.get("dedup_n") is not None else "")
            + (f", {d['per_class']} per class" if d.get("per_class") else ""),
            f"classes: {esc(', '.join(d['class_names']))}",
            f"created {esc(doc['created'])}; command <code>{esc(doc['command'])}</code>"]
    if ref:
        meta.insert(1, f"reference: <code>{esc(ref['artifact'])}</code> ran in {esc(_ran_on(ref))}, "
                       f"threads {esc(_threads(ref))}")
    host = doc.get("host") or {}
    if host.get("load_average_start") is not None:
        meta.append(f"host load average at start {host['load_average_start']}, at end {host.get('load_average_end')}")
    parts.append('<ul class="muted">' + "".join(f"<li>{m}</li>" for m in meta) + "</ul>")

    parts.append("<h2>Speed and size</h2><p class=\"muted\">Sorted by model-only batch-1 p50 latency; the "
                 "reference heads the table. Speed-up (reference p50 / p50) and size ratio against the reference; "
                 "Δ acc in percentage points. Other CPU load: share of the machine's CPU time used by other "
                 "processes while the latency was timed (above a few percent, the latency includes "
                 "contention).</p>")
    parts.append(_html_table("speed", SPEED_COLUMNS, speed_rows(doc), ordered(doc), ref))
    parts.append("<h2>Accuracy</h2><p class=\"muted\">Same order. CI: 95% percentile bootstrap. Agreement: top-1 "
                 "agreement with the reference. McNemar: b = reference right / model wrong, c = the reverse; exact "
                 "two-sided binomial p. ECE: expected calibration error, 15 bins. Dedup: Testing without images "
                 "that also appear in Training, one per duplicate group.</p>")
    parts.append(_html_table("accuracy", ACC_COLUMNS, accuracy_rows(doc), ordered(doc), ref))
    srows = stage_rows(doc)
    if srows:
        parts.append("<h2>Pipeline stages</h2><p class=\"muted\">Model-only batch-1 latency of each stage file, "
                     "same runner.</p>")
        parts.append('<div class="wrap"><table id="stages"><thead><tr>'
                     + "".join(f"<th>{html.escape(c)}</th>" for c in STAGE_COLUMNS) + "</tr></thead><tbody>"
                     + "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in srows)
                     + "</tbody></table></div>")

    if doc.get("errors"):
        parts.append('<h2>Errors</h2><ul class="err">' + "".join(
            f"<li>{esc(e.get('name', e['artifact']))} on {esc(e['device'])}: {esc(e['error'])}</li>"
            for e in doc["errors"]) + "</ul>")
    warns = list(doc.get("warnings") or [])
    for r in ordered(doc):
        warns += [f"{r['name']} on {r['device'].get('label')}: {w}"
                  for w in (r.get("warnings") or []) + (r["device"].get("warnings") or [])]
        note = (r.get("throughput") or {}).get("note")
        if note:
            warns.append(f"{r['name']}: {note}")
    if warns:
        parts.append('<h2>Warnings</h2><ul class="warn">' + "".join(f"<li>{esc(w)}</li>" for w in warns) + "</ul>")

    if doc.get("results") or ref:
        parts.append("<h2>Latency vs accuracy</h2>")
        parts.append(_img(plot_latency_accuracy(doc), "latency vs accuracy per device", "plot"))
        parts.append("<h2>Latency: model-only p50 / p99 and end-to-end per image</h2>")
        parts.append(_img(plot_latency_bars(doc), "latency bars", "plot"))
        parts.append("<h2>Confusion matrices</h2>")
        parts.append(_img(plot_confusions(doc), "confusion matrices", "plot"))

    parts.append("<h2>Per-class figures</h2>")
    names = d["class_names"]
    parts.append('<div class="wrap"><table id="per-class"><thead><tr><th class="l">model</th><th class="l">device</th>'
                 + "".join(f"<th>{esc(c)} P</th><th>{esc(c)} R</th><th>{esc(c)} F1</th>" for c in names)
                 + "</tr></thead><tbody>")
    for r in ordered(doc):
        pc = r["per_class"]
        parts.append(f"<tr><td class=\"l\">{esc(r['name'])}</td><td class=\"l\">{esc(str(r['device'].get('label')))}</td>"
                     + "".join(f"<td>{_f(pc[c]['precision'], 3)}</td><td>{_f(pc[c]['recall'], 3)}</td>"
                               f"<td>{_f(pc[c]['f1'], 3)}</td>" for c in names) + "</tr>")
    parts.append("</tbody></table></div>")

    parts.append("<h2>Flipped images (prediction differs from the reference)</h2>")
    any_flips = False
    for r in doc.get("results") or []:
        flips = r.get("flips") or []
        if not flips:
            continue
        any_flips = True
        more = r.get("n_flips", len(flips)) - min(len(flips), 50)
        parts.append(f"<p><b>{esc(r['name'])}</b> on {esc(str(r['device'].get('label')))}: {r.get('n_flips', len(flips))}"
                     " flipped</p>")
        parts.append('<div class="wrap"><table class="flips"><thead><tr><th class="l">file</th><th class="l">true</th>'
                     '<th class="l">reference</th><th>p</th><th class="l">this model</th><th>p</th></tr></thead><tbody>')
        for f in flips[:50]:
            parts.append(f"<tr><td class=\"l\">{esc(f['file'])}</td><td class=\"l\">{esc(str(f.get('true_label', '')))}</td>"
                         f"<td class=\"l\">{esc(f['ref_label'])}</td><td>{f['ref_prob']:.3f}</td>"
                         f"<td class=\"l\">{esc(f['label'])}</td><td>{f['prob']:.3f}</td></tr>")
        parts.append("</tbody></table></div>" + (f"<p class=\"muted\">… and {more} more in results.json</p>"
                                                 if more > 0 else ""))
    if not ref:
        parts.append("<p class=\"muted\">No reference (--no-reference): nothing to compare with.</p>")
    elif not any_flips:
        parts.append("<p class=\"muted\">None: every model agrees with the reference on every image.</p>")

    if d.get("failed"):
        parts.append('<h2>Images that could not be read</h2><ul class="err">'
                     + "".join(f"<li>{esc(f['file'])}: {esc(f['problem'])}</li>" for f in d["failed"]) + "</ul>")

    parts.append("<h2>Devices (fingerprints taken on the device)</h2>")
    seen: set[str] = set()
    for r in ordered(doc):
        dev = r["device"]
        key = str(dev.get("label"))
        if key in seen:
            continue
        seen.add(key)
        fp = dev.get("fingerprint") or {}
        pk = fp.get("packages") or {}
        parts.append(f"<p><b>{esc(key)}</b> <span class=\"muted\">({esc(str(dev.get('transport')))})</span>: "
                     f"{esc(str(fp.get('cpu')))}, {esc(str(fp.get('arch')))}, {fp.get('cores')} logical cores, "
                     f"{fp.get('memory_mb')} MB; {esc(str(fp.get('os')))}; Python {esc(str(fp.get('python')))}<br>"
                     f"<span class=\"muted\">ISA: {esc(' '.join(fp.get('isa') or []) or '-')}<br>packages: "
                     f"{esc(', '.join(f'{k} {v}' for k, v in sorted(pk.items())))}</span></p>")
    parts.append("</body></html>")
    return "\n".join(parts)
