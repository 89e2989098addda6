"""Turning results into what people read: rich tables. Numbers come from their sources."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from onnxslim_tool.pipeline import Result


def human_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# Pass notes a user must see without asking for the full report: a result measured slower
# than the original, and what the speed guard did about it.
WARNING_NOTES = ("SLOWER than fp32", "speed guard:")


def ratio(after: float | None, before: float | None) -> str:
    if after is None or not before:
        return "-"
    return f"{after / before:.3f}x"


def print_inspection(console: Console, summary: dict[str, Any], top: int | None) -> None:
    """inspect: inputs/outputs, op histogram, per-layer costs and totals."""
    io_table = Table(title="Inputs and outputs")
    for col in ("kind", "name", "shape", "dtype"):
        io_table.add_column(col)
    for kind in ("inputs", "outputs"):
        for item in summary[kind]:
            io_table.add_row(kind[:-1], item["name"], str(item["shape"]), item["dtype"])
    console.print(io_table)
    if summary.get("assumed_dims"):
        dims = ", ".join(f"{k}={v}" for k, v in summary["assumed_dims"].items())
        console.print(f"[yellow]dynamic dimensions assumed as 1 (use --input-shape to set them): {dims}[/]")

    hist = Table(title="Operators")
    hist.add_column("op")
    hist.add_column("count", justify="right")
    for op, count in summary["op_histogram"].items():
        hist.add_row(op, str(count))
    console.print(hist)

    layers = sorted(summary["layers"], key=lambda r: -(r.get("macs") or 0))
    shown = layers if top is None else layers[:top]
    table = Table(
        title="Layers" + (f" (top {top} by MACs of {len(layers)})" if top and len(layers) > top else "")
    )
    for col, justify in (
        ("node", "left"),
        ("op", "left"),
        ("weight shape", "left"),
        ("params", "right"),
        ("MACs", "right"),
        ("share", "right"),
    ):
        table.add_column(col, justify=justify)
    for r in shown:
        share = r.get("share")
        table.add_row(
            r["name"],
            r["op_type"],
            str(r.get("weight_shape") or "-"),
            human_count(r.get("params")),
            human_count(r.get("macs")),
            f"{100 * share:.1f}%" if share is not None else "-",
        )
    console.print(table)
    totals = Table(title="Totals", show_header=False)
    totals.add_column("what")
    totals.add_column("value", justify="right")
    totals.add_row("parameters", f"{summary['total_params']:,}")
    totals.add_row("file bytes", f"{summary['file_bytes']:,} ({human_bytes(summary['file_bytes'])})")
    totals.add_row("MACs", f"{summary['total_macs']:,} ({human_count(summary['total_macs'])})")
    totals.add_row("nodes", f"{summary['node_count']:,}")
    console.print(totals)


def print_result(console: Console, result: Result) -> None:
    """compress: before/after table, then what each pass did."""
    table = Table(title="Before / after")
    for col, justify in (("", "left"), ("before", "right"), ("after", "right"), ("ratio", "right")):
        table.add_column(col, justify=justify)
    b, a = result.before, result.after
    table.add_row("params", f"{b.params:,}", f"{a.params:,}", ratio(a.params, b.params))
    table.add_row("bytes", f"{b.bytes:,}", f"{a.bytes:,}", ratio(a.bytes, b.bytes))
    table.add_row("MACs", f"{b.macs:,}", f"{a.macs:,}", ratio(a.macs, b.macs))
    table.add_row("nodes", f"{b.nodes:,}", f"{a.nodes:,}", ratio(a.nodes, b.nodes))
    if result.accuracy_before is not None and result.accuracy_after is not None:
        table.add_row(
            result.metric,  # labelled accuracy, or the task metric against the original
            f"{result.accuracy_before:.4f}",
            f"{result.accuracy_after:.4f}",
            f"{result.accuracy_after - result.accuracy_before:+.4f}",
        )
    table.add_row("max output difference", "", f"{result.max_output_difference:.3g}", "")
    for f in result.fidelity:
        if f.top1_agreement is not None:
            table.add_row(f"top-1 agreement ({f.name})", "", f"{f.top1_agreement:.4f}", "")
    console.print(table)
    if result.cost_shapes:
        dims = ", ".join(f"{name}={'x'.join(map(str, shape))}" for name, shape in result.cost_shapes.items())
        console.print(f"MACs counted at input shapes {dims}")
    source = f"{result.data_source} ({result.eval_samples} samples)"
    if result.synthetic_data:
        console.print(f"[yellow]outputs compared on SYNTHETIC random inputs: {source}[/]")
    else:
        console.print(f"outputs compared on {source}")
    for step in result.steps:
        colour = {"applied": "green", "no-op": "dim", "backed off": "yellow"}.get(step.status, "red")
        console.print(
            f"[{colour}]{step.status:>11}[/] {step.name}" + (f": {step.reason}" if step.reason else "")
        )
        for change in step.record.changes[:20]:
            console.print(f"             {change.layer} ({change.op_type}) {change.detail}")
        if len(step.record.changes) > 20:
            console.print(f"             ... {len(step.record.changes) - 20} more")
        for note in step.record.notes:
            if note.startswith(WARNING_NOTES):  # the rest of the notes live in --json / --report
                console.print(f"             [yellow]{note}[/]")


def print_evaluation(console: Console, report: dict[str, Any]) -> None:
    table = Table(title="Fidelity of the candidate to the reference")
    for col in ("output", "cosine", "SNR dB", "max abs err", "top-1 agreement"):
        table.add_column(col, justify="left" if col == "output" else "right")
    for f in report["outputs"]:
        agree = f["top1_agreement"]
        table.add_row(
            f["name"],
            f"{f['cosine']:.6f}",
            f"{f['snr_db']:.1f}",
            f"{f['max_abs_error']:.3g}",
            "-" if agree is None else f"{agree:.4f}",
        )
    console.print(table)
    summary = Table(title="Summary")
    summary.add_column("")
    summary.add_column("reference", justify="right")
    summary.add_column("candidate", justify="right")
    summary.add_column("ratio", justify="right")
    summary.add_row(
        "file bytes",
        f"{report['reference_bytes']:,}",
        f"{report['candidate_bytes']:,}",
        f"{report['size_ratio']:.3f}x",
    )
    lat = report["latency"]
    summary.add_row(
        f"latency ms (median of {lat['runs']}, {lat['threads']} thread(s))",
        f"{lat['reference_ms']:.3f}",
        f"{lat['candidate_ms']:.3f}",
        f"{report['latency_ratio']:.3f}x",
    )
    if report.get("accuracy_reference") is not None:
        summary.add_row(
            "accuracy",
            f"{report['accuracy_reference']:.4f}",
            f"{report['accuracy_candidate']:.4f}",
            f"{report['accuracy_candidate'] - report['accuracy_reference']:+.4f}",
        )
    console.print(summary)
    data = report["data"]
    note = "SYNTHETIC random inputs" if data["synthetic"] else data["source"]
    console.print(f"measured on {note}, {data['samples']} samples")


def print_groups(console: Console, rows: list[dict[str, Any]]) -> None:
    """inspect --groups: every channel dependency group, prunable or with its reason."""
    table = Table(title="Channel dependency groups")
    for col, justify in (
        ("id", "right"),
        ("channels", "right"),
        ("prunable", "left"),
        ("producers", "left"),
        ("consumers", "left"),
        ("reason", "left"),
    ):
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(
            str(r["id"]),
            str(r["size"]),
            "yes" if r["prunable"] else "no",
            _names(r.get("producers")),
            _names(r.get("consumers")),
            r.get("reason") or "",
        )
    console.print(table)
    prunable = sum(1 for r in rows if r["prunable"])
    console.print(f"{len(rows)} groups, {prunable} prunable, {len(rows) - prunable} refused")


def _names(names: list[str] | None, limit: int = 3) -> str:
    names = names or []
    shown = ", ".join(names[:limit])
    return shown + (f" +{len(names) - limit}" if len(names) > limit else "")


def print_recipes(console: Console, recipes: dict[str, dict[str, Any]]) -> None:
    table = Table(title="Built-in recipes (compress --recipe NAME)")
    for col in ("name", "what it does", "passes", "budget"):
        table.add_column(col)
    for name, recipe in recipes.items():
        steps = [p if isinstance(p, str) else p["pass"] for p in recipe["passes"]]
        budget = recipe.get("max_drop")
        table.add_row(
            name, recipe["description"], " -> ".join(steps), "-" if budget is None else f"{budget:g}"
        )
    console.print(table)


def print_sensitivity(console: Console, result: Any) -> None:
    table = Table(title=f"Sensitivity: {result.method} ({result.parameter}), metric drop per layer")
    table.add_column("layer")
    table.add_column("op")
    table.add_column("MACs", justify="right")
    for setting in result.settings:
        table.add_column(str(setting), justify="right")
    for layer in result.layers:
        cells = ["failed" if p.metric_drop is None else f"{p.metric_drop:+.4f}" for p in layer.points]
        table.add_row(layer.layer, layer.op_type, human_count(layer.macs), *cells)
    console.print(table)
    note = " on SYNTHETIC data" if result.synthetic_data else f" on {result.data_source}"
    console.print(
        f"{len(result.layers)} layers x {len(result.settings)} settings{note} in {result.seconds:.1f} s"
    )
