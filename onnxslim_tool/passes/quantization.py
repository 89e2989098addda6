"""int8 quantization that keeps accuracy: static QDQ, dynamic, weight-only int8 and int4.

onnxruntime.quantization does the quantizing; this pass adds what it lacks (see
onnxslim_tool/quantization/): refusal of already-quantized models, preparation (constant
lifting, BatchNorm folding, opset upgrade, pre-processing with a fallback), measured repairs
(cross-layer equalization, SmoothQuant, bias correction), mixed precision under a budget,
float tails for outputs that mix ranges, a latency probe for the activation type, weight-only
formats, and a compact file. Every decision is measured on held-out calibration samples and
written to the record.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxslim_tool import io, storage
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.errors import PassError
from onnxslim_tool.graph_utils import const_array
from onnxslim_tool.passes.base import CompressionPass, PassRecord
from onnxslim_tool.quantization.compact import compact, restore_layer_names
from onnxslim_tool.quantization.detect import is_quantized
from onnxslim_tool.quantization.formats import SLOWER_TOLERANCE, Context, Formats
from onnxslim_tool.quantization.ort_backend import quiet
from onnxslim_tool.quantization.prepare import prepare
from onnxslim_tool.quantization.static import MIN_INT8_LAYER_MACS, WEIGHTED_OPS, StaticOptions
from onnxslim_tool.quantization.weight_only import RECURRENT_OPS, WEIGHT_INPUT

MODES = ("int8", "int8-dynamic", "int8-weights", "int4-weights")
CALIBRATORS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("auto", "uint8", "int8")
HOLDOUT_FRACTION = 0.5
MIN_SAMPLES_TO_HOLD_OUT = 4

__all__ = ["Quantize", "is_quantized"]


class Quantize(CompressionPass):
    """Quantize weights (and for `int8`, activations) to 8 or 4 bits; see the module docstring."""

    name = "quantize"
    lossless = False
    uses_data = True

    def __init__(
        self,
        mode: str = "int8",
        calibrator: str = "minmax",
        per_channel: bool = True,
        bias_correction: bool = True,
        equalize: bool = True,
        smoothquant: bool | None = None,
        max_drop: float | None = None,
        activation_type: str = "auto",
        exclude_ops: Sequence[str] = (),
        seed: int = 0,
        speed_guard: bool = False,
        min_layer_macs: int = MIN_INT8_LAYER_MACS,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> None:
        super().__init__(include=include, exclude=exclude)
        _check_choice("mode", mode, MODES)
        _check_choice("calibrator", calibrator, CALIBRATORS)
        _check_choice("activation_type", activation_type, ACTIVATION_TYPES)
        if max_drop is not None and not 0 <= max_drop < 1:
            raise PassError(f"max_drop must be in [0, 1), got {max_drop}")
        self.mode = mode
        self.calibrator = calibrator
        self.per_channel = per_channel
        self.bias_correction = bias_correction
        self.equalize = equalize
        self.smoothquant = smoothquant
        self.max_drop = max_drop
        self.activation_type = activation_type
        self.exclude_ops = tuple(exclude_ops)
        self.seed = seed
        self.speed_guard = speed_guard
        if min_layer_macs < 0:
            raise PassError(f"min_layer_macs must be >= 0, got {min_layer_macs}")
        self.min_layer_macs = min_layer_macs

    def milder(self) -> Quantize | None:
        """Static with a tighter own budget, then weight-only int8; nothing gentler after that."""
        if self.mode == "int8-weights":
            return None
        if self.mode == "int8" and (self.max_drop is None or self.max_drop > 0.001):
            tighter = 0.005 if self.max_drop is None else self.max_drop / 2
            return self._with(max_drop=tighter)
        return self._with(mode="int8-weights")

    def _with(self, **changes) -> Quantize:
        params = {k: getattr(self, k) for k in ("mode", "calibrator", "per_channel", "bias_correction")}
        params |= {k: getattr(self, k) for k in ("equalize", "smoothquant", "max_drop", "activation_type")}
        params |= {"exclude_ops": self.exclude_ops, "seed": self.seed, "speed_guard": self.speed_guard}
        params |= {"min_layer_macs": self.min_layer_macs}
        milder = Quantize(**(params | changes), include=self.include, exclude=self.exclude)
        milder.calibration = self.calibration
        return milder

    # ----- the pass ----------------------------------------------------------------------------

    def preflight(self, model: ir.Model) -> None:
        refusal = is_quantized(model)
        if refusal:
            raise PassError(refusal)

    def rewrite(self, model: ir.Model, record: PassRecord) -> None:
        refusal = is_quantized(model)
        if refusal:
            raise PassError(refusal)
        if not _has_float_constants(model):
            # Checked first as well: preparing (opset upgrades) can fail on graphs with nothing to do.
            record.skip(model.graph.name or "model", NOTHING_TO_QUANTIZE)
            return
        coded = _coded_weights(model)
        with tempfile.TemporaryDirectory(prefix="onnxslim-quant-") as tmp, quiet():
            workdir = Path(tmp)
            prepared = prepare(model, workdir, per_channel=self.per_channel, notes=record.notes)
            if not _has_float_constants(prepared.model):
                # Every format shrinks float weights or constants; without any, onnxruntime's
                # quantizers have nothing to do and fail on some such graphs (bool, string).
                record.skip(model.graph.name or "model", NOTHING_TO_QUANTIZE)
                return
            mode = self.mode
            if mode == "int8" and self.calibration is None:
                record.notes.append("no calibration data: static int8 needs it, so int8-dynamic was used")
                mode = "int8-dynamic"
            data, calibration, holdout = self._split_data(prepared.model, record)
            formats = Formats(
                Context(
                    float_model=prepared.model,
                    per_channel=prepared.per_channel,
                    excluded=self._excluded(prepared.model) | coded.exclusions(prepared.model),
                    calibration=calibration,
                    holdout=holdout,
                    all_data=data,
                    workdir=workdir,
                    static_options=self._static_options(),
                )
            )
            result = formats.build(mode, record.notes)
            if mode != "int8" and holdout is not None:
                record.notes.append(f"{mode}: held-out {formats.score(result)}")
            record.notes.extend(formats.latency_report(mode, result))
            if self.speed_guard:
                result = _guard_speed(formats, mode, result, record)
            original_names = {node.name for node in prepared.model.graph if node.name}
            restore_layer_names(result, original_names)
            _record_layers(result, formats.context.excluded, record)
            compact(result, original_names)
            record.notes.append(
                "internal tensor names shortened, duplicate scales stored once (node names kept)"
            )
            if coded.layers:
                coded.store_again(result)
                record.notes.append(f"{len(coded.layers)} layer(s) kept the codes an earlier pass stored")
            halved = storage.pack_exact_half(result)
            if halved:
                record.notes.append(
                    f"{len(halved)} float32 vector(s) that hold float16 values exactly (biases an earlier "
                    "pass rounded) stored as float16 again"
                )
        _install(model, result)

    def _static_options(self) -> StaticOptions:
        return StaticOptions(
            calibrator=self.calibrator,
            per_channel=self.per_channel,
            bias_correction=self.bias_correction,
            equalize=self.equalize,
            smoothquant=self.smoothquant,
            max_drop=self.max_drop,
            activation_type=self.activation_type,
            min_layer_macs=self.min_layer_macs,
            task_metric=self.task_metric,
        )

    # ----- data and exclusions -----------------------------------------------------------------

    def _split_data(
        self, model: ir.Model, record: PassRecord
    ) -> tuple[CalibrationData | None, CalibrationData | None, CalibrationData | None]:
        """(all the data, validated; the part to calibrate on; the part that judges)."""
        data = self.calibration
        if data is not None:
            data = data.validate(model)  # learns the model's fixed batch size, if any
        if data is None:
            record.notes.append("no calibration data: nothing measured on held-out samples")
            return None, None, None
        if len(data) < MIN_SAMPLES_TO_HOLD_OUT:
            record.notes.append(
                f"only {len(data)} calibration samples: decisions measured on the same samples"
            )
            return data, data, data
        calibration, holdout = data.split(HOLDOUT_FRACTION, seed=self.seed)
        record.notes.append(
            f"calibration data split (seed {self.seed}): {len(calibration)} to calibrate, "
            f"{len(holdout)} held out to measure every decision"
        )
        return data, calibration, holdout

    def _excluded(self, model: ir.Model) -> dict[str, str]:
        """Nodes the user keeps float: by --exclude/--include patterns or by op type."""
        excluded = {}
        for node in model.graph:
            ok, why = self.selects(node)
            if not ok:
                excluded[node.name] = why
            elif node.op_type in self.exclude_ops:
                excluded[node.name] = f"op type {node.op_type} kept float (exclude_ops)"
        return excluded


NOTHING_TO_QUANTIZE = "no float weights or constants: nothing to quantize"
CODED = "weights already stored as codes or sparse by an earlier pass (int8 would store them larger)"


class _CodedWeights:
    """Layer weights an earlier pass (sharing, weight pruning) stored as codes or masks.

    Quantizing them would expand a 2-4 bit codebook into 8 bits: they stay float here and
    are stored as codes again afterwards (`storage.pack` is a pure function of the values,
    so the same codes come back).
    """

    def __init__(self, layers: set[str], digests: set[tuple[tuple[int, ...], bytes]]) -> None:
        self.layers = layers
        self.digests = digests

    def exclusions(self, model: ir.Model) -> dict[str, str]:
        """Nodes of `model` reading a coded weight, by value: pre-processing renames fused layers."""
        found = {}
        for node in model.graph:
            for value in node.inputs:
                array = const_array(value) if value is not None else None
                if array is not None and array.size > 1 and _digest(array) in self.digests and node.name:
                    found[node.name] = CODED
        return found

    def store_again(self, model: ir.Model) -> None:
        again = [
            value
            for value in model.graph.initializers.values()
            if value.const_value is not None and _digest(value.const_value.numpy()) in self.digests
        ]
        storage.pack(model, again)


def _guard_speed(formats: Formats, mode: str, result: ir.Model, record: PassRecord) -> ir.Model:
    """With speed_guard, a format measured slower than fp32 gives way to int8-weights (float
    speed by construction: onnxruntime folds the weights back at load), or the pass is refused."""
    ratios = formats.first_batch_ratios
    ratio = ratios.get(mode)
    if mode == "int8-weights" or ratio is None or ratio <= SLOWER_TOLERANCE:
        return result
    fallback = ratios.get("int8-weights")
    if fallback is not None and fallback <= SLOWER_TOLERANCE:
        record.notes.append(
            f"speed guard: {mode} ran {ratio:.2f}x of fp32 in the probe, int8-weights {fallback:.2f}x; "
            "kept int8-weights (4x smaller weights, float speed)"
        )
        return formats.weights_only(record.notes)
    # Refused rather than a silent no-op, so the report says why the model is unchanged.
    raise PassError(f"speed guard: {mode} ran {ratio:.2f}x of fp32 and no int8 format was as fast")


def _coded_weights(model: ir.Model) -> _CodedWeights:
    probe = io.load(model, lift_constants=False)  # a copy: unpacking edits the graph
    restored = storage.unpack(probe)
    layers = {use.node.name for value in restored for use in value.uses() if use.node.name}
    return _CodedWeights(layers, {_digest(value.const_value.numpy()) for value in restored})


def _digest(array: np.ndarray) -> tuple[tuple[int, ...], bytes]:
    import hashlib

    return tuple(array.shape), hashlib.sha256(np.ascontiguousarray(array).tobytes()).digest()


def _has_float_constants(model: ir.Model) -> bool:
    """Any float initializer or Constant node (subgraphs keep theirs as nodes) anywhere."""
    for graph in model.graphs():
        values = [*graph.initializers.values(), *(n.outputs[0] for n in graph if n.op_type == "Constant")]
        if any(v.dtype is None or v.dtype.is_floating_point() for v in values):
            return True
    return False


def _record_layers(model: ir.Model, excluded: dict[str, str], record: PassRecord) -> None:
    """One change per layer now holding quantized weights; one skip per weighted layer left float."""
    others: Counter[str] = Counter()
    for node in (n for graph in model.graphs() for n in graph):
        kind = _quantized_kind(node)
        if kind:
            record.changed(node.name or node.op_type, node.op_type, kind)
        elif node.op_type in WEIGHTED_OPS and node.name:
            record.skip(node.name, excluded.get(node.name, "left float by onnxruntime's quantizer"))
        elif _reads_quantized_activation(node):
            others[node.op_type] += 1
    if others:
        listed = ", ".join(f"{op} x{n}" for op, n in sorted(others.items()))
        record.notes.append(f"other ops reading int8 activations: {listed}")


def _quantized_kind(node: ir.Node) -> str | None:
    if node.op_type == "MatMulNBits":
        return "4-bit weights (MatMulNBits, block 32)"
    if node.op_type in ("MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul"):
        return "int8 weights, activations quantized at run time"
    # A recurrent layer's W (input 1) stands for its R, stored the same way.
    index = 1 if node.op_type in RECURRENT_OPS else WEIGHT_INPUT.get(node.op_type)
    if index is None or len(node.inputs) <= index or node.inputs[index] is None:
        return None
    stored = _int8_storage(node.inputs[index])
    if stored is None:
        return None
    form, scale = stored
    granularity = "per-channel" if scale is not None and scale.size > 1 else "per-tensor"
    if _reads_quantized_activation(node):
        zero_point = (
            node.inputs[0].producer().inputs[2] if len(node.inputs[0].producer().inputs) > 2 else None
        )
        activation = "uint8" if zero_point is not None and zero_point.dtype == ir.DataType.UINT8 else "int8"
        return f"int8 weights ({granularity}), {activation} activations"
    if form == "folded":
        return f"int8 weights ({granularity}) in the file, restored to float when onnxruntime loads it"
    return f"int8 weights ({granularity}) + DequantizeLinear, float compute"


def _int8_storage(weight: ir.Value) -> tuple[str, np.ndarray | None] | None:
    """('dequantize' | 'folded', scale) when `weight` is rebuilt from an int8 initializer."""
    producer = weight.producer()
    if producer is None:
        return None
    if producer.op_type == "DequantizeLinear" and producer.inputs[0].is_initializer():
        return "dequantize", const_array(producer.inputs[1])
    if producer.op_type == "Mul" and producer.inputs[0] is not None:
        cast = producer.inputs[0].producer()
        if cast is not None and cast.op_type == "Cast" and cast.inputs[0].is_initializer():
            return "folded", const_array(producer.inputs[1])
    return None


def _reads_quantized_activation(node: ir.Node) -> bool:
    value = node.inputs[0] if node.inputs else None
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear":
        return False
    source = producer.inputs[0]
    return source is not None and not source.is_initializer()


def _install(target: ir.Model, source: ir.Model) -> None:
    """Make `target` (the object the pipeline holds) the quantized model, in place."""
    target.graph = source.graph
    target.ir_version = max(target.ir_version or 0, source.ir_version or 0)
    target.functions.clear()
    target.functions.update(source.functions)


def _check_choice(what: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise PassError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
