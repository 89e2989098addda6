"""onnxslim_tool: compress trained ONNX models and measure, with onnxruntime, what it cost."""

from __future__ import annotations

__version__ = "0.1.0"

from onnxslim_tool.api import compress, evaluate  # noqa: E402
from onnxslim_tool.data import CalibrationData  # noqa: E402
from onnxslim_tool.io import load, save  # noqa: E402
from onnxslim_tool.pipeline import Result  # noqa: E402

__all__ = ["CalibrationData", "Result", "__version__", "compress", "evaluate", "load", "save"]
