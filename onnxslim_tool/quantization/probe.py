"""Quick latency probes: which of several candidate models runs fastest on this CPU."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxslim_tool import runtime

MIN_RUNS, MAX_RUNS = 20, 300
# Time each model gets: enough repetitions for sub-millisecond models to give stable medians.
PROBE_SECONDS = 0.15


def latencies(models: dict[str, ir.Model], feed: dict[str, np.ndarray]) -> dict[str, float]:
    """Median milliseconds per run of each model on `feed`, measured interleaved."""
    sessions = {name: runtime.make_session(model) for name, model in models.items()}
    first = next(iter(sessions.values()))
    first.run(None, feed)
    start = time.perf_counter()
    first.run(None, feed)
    once = max(time.perf_counter() - start, 1e-6)
    runs = int(min(MAX_RUNS, max(MIN_RUNS, PROBE_SECONDS / once)))
    timed = runtime.measure_latency(sessions, feed, runs=runs)
    return {name: timed[name].median_ms for name in models}


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has 8-bit dot-product instructions; None when not x86/unknown.

    Without VNNI, onnxruntime's u8 x s8 kernels can saturate 16-bit intermediates, which
    onnxruntime's documentation avoids with 7-bit weights (reduce_range).
    """
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    text = cpuinfo.read_text(errors="ignore")
    flags_line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    if not flags_line:
        return None  # not x86 (ARM lists "Features")
    flags = set(flags_line.split(":", 1)[-1].split())
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
