"""Activation ranges for static quantization, collected batch by batch in bounded memory.

onnxruntime's calibrators keep every intermediate output of one `collect_data` call before
reducing it (min/max merge or histogram update). Feeding them one batch per call keeps one
batch of activations alive, whatever the size of the data set; min/max ranges merge and the
histograms of the entropy and percentile methods accumulate across calls.
"""

from __future__ import annotations

import contextlib
import io
import resource
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, TensorsData, create_calibrator

from onnxslim_tool import runtime
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.io import load

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
# Every float tensor of the model is a calibrator output: batches are sized so that one
# batch of them stays under this many bytes (YOLOv8n at 320x320: 55 MB per image; the
# calibrator holds about twice that).
ACTIVATION_BUDGET = 64 * 2**20
MAX_BATCH = 32


class FeedReader(CalibrationDataReader):
    """onnxruntime's reader protocol over any iterable of feeds (read once)."""

    def __init__(self, feeds: Iterable[dict]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


@dataclass
class Calibration:
    """Tensor ranges plus what it took to get them."""

    ranges: TensorsData
    method: str
    samples: int
    batches: int
    batch_size: int
    sample_mb: float  # activation bytes of one sample, all float tensors
    peak_rss_mb: float

    def describe(self) -> str:
        return (
            f"calibration ({self.method}): {self.samples} samples in {self.batches} batches of up to "
            f"{self.batch_size}, reduced batch by batch ({self.sample_mb:.2f} MB of activations per "
            f"sample); process peak RSS {self.peak_rss_mb:.0f} MB"
        )


def calibrate(model_path: Path, data: CalibrationData, method: str, workdir: Path) -> Calibration:
    """Ranges of every float tensor of the model file at `model_path` over `data`."""
    calibrator = create_calibrator(
        model_path,
        None,  # every float tensor: later steps may quantize any of them
        augmented_model_path=str(workdir / f"augmented_{model_path.stem}.onnx"),
        calibrate_method=METHODS[method],
        extra_options={"symmetric": False} if method == "percentile" else {},
    )
    sample_bytes = activation_bytes_per_sample(model_path, data)
    batch_size = int(max(1, min(MAX_BATCH, ACTIVATION_BUDGET // max(sample_bytes, 1))))
    batches = 0
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress
        for batch in data.batches(batch_size):
            calibrator.collect_data(FeedReader([batch]))
            batches += 1
        ranges = calibrator.compute_data()
    return Calibration(ranges, method, len(data), batches, batch_size, sample_bytes / 2**20, peak_rss_mb())


def activation_bytes_per_sample(model_path: Path, data: CalibrationData) -> int:
    """Bytes of all float intermediate tensors for one sample, measured on the first one."""
    model = load(model_path, lift_constants=False)
    names = [value.name for node in model.graph for value in node.outputs if value.name]
    first = next(iter(data.batches(1)))
    batch = next(iter(data.batch_slices(1))).stop - next(iter(data.batch_slices(1))).start
    tensors = next(runtime.stream_tensors(model, names, [first]))
    total = sum(t.nbytes for t in tensors.values() if t.dtype.kind == "f")
    return total // max(batch, 1)


def peak_rss_mb() -> float:
    """High-water mark of this process's resident memory."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024
