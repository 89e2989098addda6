"""Where a convolution reads its input: geometry (pads from auto_pad included), im2col at
chosen output positions, and seeded sampling of those positions.

Shared by the passes that fit layers on activations (pruning's refit, low-rank's refit).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxslim_tool.graph_utils import attr


@dataclass(frozen=True)
class ConvGeometry:
    """Where a Conv reads its input: kernel, strides, dilations, begin/end pads, groups."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    group: int = 1

    @classmethod
    def of(cls, node: ir.Node, weight_shape: Sequence[int], input_spatial: Sequence[int]) -> ConvGeometry:
        kernel = tuple(int(k) for k in attr(node, "kernel_shape", weight_shape[2:]))
        nd = len(kernel)
        strides = tuple(attr(node, "strides", [1] * nd))
        dilations = tuple(attr(node, "dilations", [1] * nd))
        auto_pad = attr(node, "auto_pad", "NOTSET")
        if isinstance(auto_pad, bytes):
            auto_pad = auto_pad.decode()
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = _same_pads(kernel, strides, dilations, input_spatial, upper=auto_pad == "SAME_UPPER")
        elif auto_pad == "VALID":
            begin = end = (0,) * nd
        else:
            pads = tuple(attr(node, "pads", [0] * (2 * nd)))
            begin, end = pads[:nd], pads[nd:]
        return cls(kernel, strides, dilations, begin, end, int(attr(node, "group", 1)))

    def output_spatial(self, input_spatial: Sequence[int]) -> tuple[int, ...]:
        return tuple(
            (size + b + e - d * (k - 1) - 1) // s + 1
            for size, b, e, d, k, s in zip(
                input_spatial,
                self.pads_begin,
                self.pads_end,
                self.dilations,
                self.kernel,
                self.strides,
                strict=True,
            )
        )


def _same_pads(
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    spatial: Sequence[int],
    upper: bool,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    begin, end = [], []
    for k, s, d, size in zip(kernel, strides, dilations, spatial, strict=True):
        total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if upper else large)
        end.append(large if upper else small)
    return tuple(begin), tuple(end)


def conv_patches(
    x: np.ndarray, geometry: ConvGeometry, samples: np.ndarray, coords: np.ndarray
) -> np.ndarray:
    """im2col at chosen output positions: [rows, channels, kernel elements].

    `samples[r]` is the batch index and `coords[r]` the output coordinates of row r. The
    kernel elements follow the weight's C-order (kh, kw, ...), so `patches[r] * W[o]` summed
    is output o at that position; taps falling in the padding read zeros.
    """
    rows, channels = len(samples), x.shape[1]
    spatial = np.asarray(x.shape[2:])
    offsets = list(itertools.product(*(range(k) for k in geometry.kernel)))
    patches = np.zeros((rows, channels, len(offsets)), dtype=x.dtype)
    base = coords * np.asarray(geometry.strides) - np.asarray(geometry.pads_begin)
    for j, offset in enumerate(offsets):
        taps = base + np.asarray(offset) * np.asarray(geometry.dilations)
        inside = np.all((taps >= 0) & (taps < spatial), axis=1)
        index = (samples[inside], slice(None), *taps[inside].T)
        patches[inside, :, j] = x[index]
    return patches


def sample_positions(
    shape: Sequence[int], count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`count` distinct (batch index, spatial coordinates) pairs of a [N, *spatial] grid, sorted."""
    total = int(np.prod(shape))
    flat = np.arange(total) if count >= total else np.sort(rng.choice(total, count, replace=False))
    unraveled = np.unravel_index(flat, tuple(shape))
    return unraveled[0], np.stack(unraveled[1:], axis=1) if len(shape) > 1 else np.zeros((len(flat), 0), int)
