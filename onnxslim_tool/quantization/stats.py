"""Per-channel statistics of intermediate tensors, reduced batch by batch (bounded memory)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from onnxslim_tool import runtime


def channel_means(model: ir.Model, axes: dict[str, int], feeds: Iterable[dict]) -> dict[str, np.ndarray]:
    """Mean of each channel (`axes[name]` indexes channels) of the tensors `axes` names."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in runtime.stream_tensors(model, list(axes), feeds):
        for name, tensor in batch.items():
            rows = _rows(tensor, axes[name])
            sums[name] = sums.get(name, 0) + rows.sum(axis=0, dtype=np.float64)
            counts[name] = counts.get(name, 0) + rows.shape[0]
    return {name: sums[name] / max(counts[name], 1) for name in sums}


def channel_absmax(model: ir.Model, axes: dict[str, int], feeds: Iterable[dict]) -> dict[str, np.ndarray]:
    """Largest |value| of each channel of the tensors `axes` names."""
    peaks: dict[str, np.ndarray] = {}
    for batch in runtime.stream_tensors(model, list(axes), feeds):
        for name, tensor in batch.items():
            peak = np.abs(_rows(tensor, axes[name])).max(axis=0)
            peaks[name] = np.maximum(peaks[name], peak) if name in peaks else peak
    return peaks


def _rows(tensor: np.ndarray, axis: int) -> np.ndarray:
    """[positions, channels] view of a tensor whose channels sit on `axis`."""
    tensor = np.asarray(tensor, dtype=np.float32)
    return np.moveaxis(tensor, axis, -1).reshape(-1, tensor.shape[axis])
