"""Child process for one conversion: `python -m benchmarks.convert JOB.json RESULT.json`.

The child reports the time spent in the conversion itself, its memory right after imports
and its peak resident memory (VmHWM), so the tables can say how much of the peak is the
converter's own work.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

from benchmarks.variants import Job, catalogue

# Imported before the clock starts: a tool's import time is not conversion work.
TOOL_MODULES = {
    "onnxslim_tool": ("onnxslim_tool.api",),
    "onnxruntime": ("onnxruntime.quantization",),
    "onnxslim": ("onnx", "onnxslim"),
    "onnxsim": ("onnx", "onnxsim"),
}


def rss_mb(field: str = "VmRSS") -> float | None:
    """Resident memory of this process (Linux /proc) in MiB: now (VmRSS) or its peak (VmHWM).

    VmHWM belongs to this program's own address space; the parent's ru_maxrss of a child
    would include the parent's own size at fork time, which is not the converter's memory.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main(job_path: str, result_path: str) -> int:
    spec = json.loads(Path(job_path).read_text())
    variant = catalogue()[spec.pop("variant")]
    job = Job(
        source=Path(spec["source"]),
        target=Path(spec["target"]),
        feeds=Path(spec["feeds"]),
        calibration=Path(spec["calibration"]) if spec.get("calibration") else None,
        seed=int(spec.get("seed", 0)),
        task_metric=spec.get("task_metric"),
    )
    for module in TOOL_MODULES.get(variant.tool, ()):
        importlib.import_module(module)
    report: dict = {"startup_rss_mb": rss_mb()}
    start = time.perf_counter()
    try:
        report["notes"] = variant.convert(job)
        report["ok"] = job.target.is_file()
        if not report["ok"]:
            report["error"] = "the converter wrote no model"
    except Exception as exc:  # any converter failure becomes one line in the table
        report.update(ok=False, error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
    report["convert_seconds"] = time.perf_counter() - start
    report["peak_rss_mb"] = rss_mb("VmHWM")
    Path(result_path).write_text(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
