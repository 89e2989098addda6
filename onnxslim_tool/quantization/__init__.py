"""int8/int4 quantization built on onnxruntime.quantization, plus what it lacks.

The `Quantize` pass (onnxslim_tool/passes/quantization.py) drives these modules:

- detect: refuse models that are already quantized (`is_quantized`).
- prepare: constant lifting, BatchNorm folding, opset upgrade, quant_pre_process with fallback.
- calibration: activation ranges, batch by batch in bounded memory (onnxruntime calibrators).
- ort_backend: quantize_static / quantize_dynamic / MatMulNBits, files in, IR out, silenced.
- static: the measured static flow (activation type probe, repairs, mixed precision).
- equalize, smoothquant, bias_correction: the repairs, each applied to the float model.
- mixed_precision: sensitivity ranking and greedy float fallback under a budget.
- tails: outputs that concatenate very different ranges stay float.
- weight_only, gemm: int8 weight storage (DequantizeLinear or load-time folded), Gemm -> MatMul.
- formats: builds each mode from one prepared model and times them against fp32.
- compact: the bytes a quantized graph spends on names and duplicate scales.
"""

from onnxslim_tool.quantization.detect import is_quantized

__all__ = ["is_quantized"]
