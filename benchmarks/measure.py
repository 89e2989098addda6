"""Everything measured about one variant, each number from the project's own sources.

Bytes: `io.file_size` of the written file. MACs: `cost.analyze_cost`. Latency:
`runtime.measure_latency`, the variant interleaved run by run with the fp32 original, at 1
and 2 threads. Metric: the subject's own score function on its evaluation set. Conversions
run as child processes that report their own conversion time and peak resident memory
(VmHWM).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.subject import Score, Subject
from onnxslim_tool import io, runtime
from onnxslim_tool.cost import analyze_cost

REPO = Path(__file__).resolve().parents[1]
THREADS = (1, 2)


@dataclass
class Reference:
    """The fp32 original's numbers every variant is compared with."""

    bytes: int
    macs: int | None
    predictions: Any
    score: Score


@dataclass
class ChildRun:
    returncode: int
    wall_seconds: float
    timed_out: bool


def run_child(args: list[str], log: Path, timeout: float) -> ChildRun:
    """Run `python -m ARGS` from the repository root, killed after `timeout` seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        fired = threading.Event()

        def stop() -> None:
            fired.set()
            proc.kill()

        timer = threading.Timer(timeout, stop)
        timer.start()
        try:
            status = proc.wait()
        finally:
            timer.cancel()
    wall = time.perf_counter() - start
    return ChildRun(status, wall, fired.is_set())


def convert(subject: Subject, variant: str, target: Path, seed: int, timeout: float) -> dict[str, Any]:
    """Run one conversion in a child process; the record says ok or why not."""
    folder = target.parent
    job, result = folder / f"{variant}.job.json", folder / f"{variant}.result.json"
    result.unlink(missing_ok=True)
    job.write_text(
        json.dumps(
            {
                "variant": variant,
                "source": str(subject.model_path),
                "target": str(target),
                "feeds": str(subject.feeds),
                "calibration": str(subject.calibration) if subject.calibration else None,
                "seed": seed,
                "task_metric": subject.task_metric,
            }
        )
    )
    child = run_child(["benchmarks.convert", str(job), str(result)], folder / f"{variant}.log", timeout)
    record: dict[str, Any] = {"process_seconds": round(child.wall_seconds, 3)}
    if result.is_file():
        report = json.loads(result.read_text())
        record.update(
            convert_seconds=round(report["convert_seconds"], 3),
            startup_rss_mb=_rounded(report.get("startup_rss_mb")),
            peak_rss_mb=_rounded(report.get("peak_rss_mb")),
            notes=report.get("notes") or {},
        )
        if not report["ok"]:
            record["error"] = report.get("error", "conversion failed")
    elif child.timed_out:
        record["error"] = f"conversion timed out after {timeout:.0f} s"
    else:
        record["error"] = f"converter process died (exit {child.returncode}); see {folder.name}/{variant}.log"
    return record


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def reference(subject: Subject) -> Reference:
    predictions = subject.predict(runtime.make_session(subject.model_path))
    return Reference(
        bytes=io.file_size(subject.model_path),
        macs=macs_of(subject.model_path, subject),
        predictions=predictions,
        score=subject.score(predictions, predictions),
    )


def macs_of(path: Path, subject: Subject) -> int | None:
    """Total MACs from cost.py; None when shape inference cannot size the model."""
    try:
        return analyze_cost(io.load(path, lift_constants=False), subject.input_shapes).total_macs
    except Exception:
        return None


def measure(subject: Subject, ref: Reference, path: Path, *, latency: bool, warmup: int) -> dict[str, Any]:
    """Size, cost, metric and latency of a written variant, relative to the fp32 original."""
    size = io.file_size(path)
    macs = macs_of(path, subject)
    score = subject.score(ref.predictions, subject.predict(runtime.make_session(path)))
    record: dict[str, Any] = {
        "bytes": size,
        "bytes_ratio": size / ref.bytes,
        "macs": macs,
        "macs_ratio": macs / ref.macs if macs is not None and ref.macs else None,
        "metric": score.value,
        "metric_drop": ref.score.value - score.value,
        "secondary": score.secondary,
    }
    if latency:
        record["latency"] = latency_against_fp32(subject, path, warmup)
    return record


def latency_against_fp32(subject: Subject, path: Path, warmup: int) -> dict[str, dict[str, float]]:
    """Median latency of fp32 and the variant, interleaved in one run, per thread count."""
    out = {}
    for threads in THREADS:
        sessions = {
            "fp32": runtime.make_session(subject.model_path, threads),
            "variant": runtime.make_session(path, threads),
        }
        timed = runtime.measure_latency(
            sessions, subject.latency_feed, runs=subject.latency_runs, warmup=warmup
        )
        out[str(threads)] = {
            "fp32_ms": timed["fp32"].median_ms,
            "variant_ms": timed["variant"].median_ms,
            "ratio": timed["variant"].median_ms / timed["fp32"].median_ms,
            "runs": subject.latency_runs,
        }
    return out
