"""Thin wrappers around onnxruntime.quantization: files in, `ir.Model` out, logs silenced.

onnxruntime's quantizers read and write files and log warnings on the root logger; passes
must not print, so every call runs inside `quiet()`. Calibration happens once (see
calibration.py) and reaches `quantize_static` through its JSON range cache, so the many
quantizations a search needs (activation types, repairs, mixed precision) never
re-calibrate.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.calibrate import save_tensors_data

from onnxslim_tool import io
from onnxslim_tool.quantization.calibration import METHODS, Calibration

ACTIVATION_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence onnxruntime's Python log records and native log lines for the duration.

    Its quantization tools log recoverable failures as errors (with tracebacks); the pass
    turns those into notes of its own.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        logging.disable(previous)
        ort.set_default_logger_severity(2)


@dataclass(frozen=True)
class StaticSettings:
    """Everything that shapes one static QDQ quantization besides the ranges."""

    activation_type: str = "uint8"
    per_channel: bool = True
    reduce_range: bool = False
    op_types: tuple[str, ...] = ()
    float_output_ops: tuple[str, ...] = ()
    per_tensor_weights: tuple[str, ...] = ()
    nodes_to_exclude: tuple[str, ...] = ()
    nodes_to_quantize: tuple[str, ...] = ()


def write_ranges(calibration: Calibration, path: Path) -> Path:
    save_tensors_data(calibration.ranges, path)
    return path


def quantize_static_qdq(
    float_path: Path, ranges_path: Path, method: str, settings: StaticSettings, out: Path
) -> ir.Model:
    """Static QDQ quantization of the model file `float_path` with cached activation ranges."""
    overrides = {name: [{"symmetric": True}] for name in settings.per_tensor_weights}
    extra = {
        # Activation x activation MatMuls (attention scores) stay float: no weights to shrink.
        "MatMulConstBOnly": True,
        "OpTypesToExcludeOutputQuantization": list(settings.float_output_ops),
        "TensorQuantOverrides": overrides,
    }
    with quiet():
        quantize_static(
            str(float_path),
            str(out),
            calibration_data_reader=None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(settings.op_types) or None,
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            activation_type=ACTIVATION_TYPES[settings.activation_type],
            weight_type=QuantType.QInt8,
            nodes_to_quantize=list(settings.nodes_to_quantize) or None,
            nodes_to_exclude=list(settings.nodes_to_exclude) or None,
            use_external_data_format=_needs_external_data(float_path),
            calibrate_method=METHODS[method],
            extra_options=extra,
            calibration_cache_path=str(ranges_path),
        )
    return io.load(out, lift_constants=False)


def quantize_dynamic_int8(
    float_path: Path,
    out: Path,
    *,
    per_channel: bool,
    op_types: Sequence[str],
    nodes_to_exclude: Sequence[str],
) -> ir.Model:
    """onnxruntime's dynamic quantization: int8 weights, activations quantized at run time."""
    with quiet():
        quantize_dynamic(
            str(float_path),
            str(out),
            op_types_to_quantize=list(op_types),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(nodes_to_exclude) or None,
            use_external_data_format=_needs_external_data(float_path),
        )
    return io.load(out, lift_constants=False)


def quantize_matmul_4bits(model: ir.Model, *, block_size: int, nodes_to_exclude: Sequence[str]) -> ir.Model:
    """MatMul weights as 4-bit blocks executed by onnxruntime's MatMulNBits kernel."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with quiet():
        quantizer = MatMulNBitsQuantizer(
            ir.to_proto(model),
            bits=4,
            block_size=block_size,
            is_symmetric=True,
            nodes_to_exclude=list(nodes_to_exclude),
            op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
    return ir.from_proto(quantizer.model.model)


def _needs_external_data(path: Path) -> bool:
    return path.stat().st_size > io.EXTERNAL_DATA_THRESHOLD or Path(f"{path}.data").exists()
