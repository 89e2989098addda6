"""Reports as files: Markdown and HTML for people, with plots when matplotlib is installed."""

from __future__ import annotations

import base64
import html
import io as _io
from pathlib import Path
from typing import Any

from onnxslim_tool.pipeline import Result
from onnxslim_tool.sensitivity import SensitivityReport


def result_markdown(result: Result, title: str = "Compression report") -> str:
    """Before/after, per-pass decisions and per-layer changes, as Markdown."""
    b, a = result.before, result.after
    lines = [f"# {title}", "", "| | before | after | ratio |", "|---|---:|---:|---:|"]
    for label, x, y in (
        ("params", b.params, a.params),
        ("bytes", b.bytes, a.bytes),
        ("MACs", b.macs, a.macs),
        ("nodes", b.nodes, a.nodes),
    ):
        lines.append(
            f"| {label} | {x:,} | {y:,} | {y / x:.3f}x |" if x else f"| {label} | {x:,} | {y:,} | - |"
        )
    if result.accuracy_before is not None and result.accuracy_after is not None:
        delta = result.accuracy_after - result.accuracy_before
        before, after = result.accuracy_before, result.accuracy_after
        lines.append(f"| {result.metric} | {before:.4f} | {after:.4f} | {delta:+.4f} |")
    lines.append(f"| max output difference | | {result.max_output_difference:.3g} | |")
    source = f"{result.data_source} ({result.eval_samples} samples)"
    lines += ["", f"Measured on {'SYNTHETIC random inputs: ' if result.synthetic_data else ''}{source}.", ""]
    lines += ["## Passes", "", "| pass | status | reason | seconds |", "|---|---|---|---:|"]
    for step in result.steps:
        lines.append(f"| {step.name} | {step.status} | {_md(step.reason)} | {step.seconds:.2f} |")
    for step in result.steps:
        rec = step.record
        if not (rec.changes or rec.skipped or rec.notes):
            continue
        lines += ["", f"### {step.name} ({step.status})", ""]
        if rec.changes:
            lines += ["| layer | op | change | params before | params after |", "|---|---|---|---:|---:|"]
            for c in rec.changes:
                before, after = _n(c.params_before), _n(c.params_after)
                lines.append(f"| {_md(c.layer)} | {c.op_type} | {_md(c.detail)} | {before} | {after} |")
        if rec.skipped:
            lines += ["", "| skipped layer | reason |", "|---|---|"]
            lines += [f"| {_md(s.layer)} | {_md(s.reason)} |" for s in rec.skipped]
        if rec.notes:
            lines += [""] + [f"- {_md(n)}" for n in rec.notes]
    return "\n".join(lines) + "\n"


def sensitivity_markdown(report: SensitivityReport) -> str:
    header = " | ".join(str(s) for s in report.settings)
    lines = [
        f"# Sensitivity: {report.method} ({report.parameter})",
        "",
        f"Metric drop when each layer alone is compressed; data: {report.data_source}"
        + (" (SYNTHETIC)" if report.synthetic_data else "")
        + f"; {report.seconds:.1f} s with {report.jobs} job(s).",
        "",
        f"| layer | op | params | MACs | {header} |",
        "|---|---|---:|---:|" + "---:|" * len(report.settings),
    ]
    for layer in report.layers:
        cells = " | ".join(_drop_cell(p.metric_drop, p.error) for p in layer.points)
        lines.append(
            f"| {_md(layer.layer)} | {layer.op_type} | {layer.params:,} | {layer.macs:,} | {cells} |"
        )
    return "\n".join(lines) + "\n"


def sensitivity_html(report: SensitivityReport) -> str:
    """A self-contained page: the table, and one plot of all layers' curves when possible."""
    plot = _sensitivity_plot(report)
    rows = "".join(
        f"<tr><td>{html.escape(layer.layer)}</td><td>{layer.op_type}</td><td>{layer.params:,}</td>"
        f"<td>{layer.macs:,}</td>"
        + "".join(f"<td>{html.escape(_drop_cell(p.metric_drop, p.error))}</td>" for p in layer.points)
        + "</tr>"
        for layer in report.layers
    )
    heads = "".join(f"<th>{html.escape(str(s))}</th>" for s in report.settings)
    image = (
        f'<img alt="sensitivity plot" src="data:image/png;base64,{plot}">'
        if plot
        else "<p>(install the <code>plots</code> extra, matplotlib, for a plot)</p>"
    )
    synthetic = " <b>SYNTHETIC data</b>" if report.synthetic_data else ""
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Sensitivity</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}</style>"
        f"</head><body><h1>Sensitivity: {html.escape(report.method)} ({html.escape(report.parameter)})</h1>"
        "<p>Metric drop when each layer alone is compressed. "
        f"Data: {html.escape(report.data_source)}{synthetic}; "
        f"{report.seconds:.1f} s with {report.jobs} job(s).</p>{image}"
        f"<table><tr><th>layer</th><th>op</th><th>params</th><th>MACs</th>{heads}</tr>{rows}</table>"
        "</body></html>"
    )


def _sensitivity_plot(report: SensitivityReport) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = list(range(len(report.settings)))
    for layer in report.layers:
        ys = [p.metric_drop if p.metric_drop is not None else float("nan") for p in layer.points]
        ax.plot(xs, ys, marker="o", label=layer.layer[:40])
    ax.set_xticks(xs, [str(s) for s in report.settings])
    ax.set_xlabel(report.parameter)
    ax.set_ylabel("metric drop")
    ax.set_title(f"{report.method}: each layer alone")
    if len(report.layers) <= 12:
        ax.legend(fontsize=7)
    buf = _io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_text(path: Path, text: str) -> None:
    """Reports are written like models: to a temporary name, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _drop_cell(drop: float | None, error: str) -> str:
    if drop is None:
        return "failed" if error else "-"
    return f"{drop:+.4f}"


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"
