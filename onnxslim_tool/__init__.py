"""onnxslim_tool: compress trained ONNX models and measure, with onnxruntime, what it cost."""

from __future__ import annotations

__version__ = "0.1.0"
