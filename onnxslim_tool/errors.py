"""Errors the tool raises on purpose. The CLI prints their message as one line and exits 1."""

from __future__ import annotations


class OnnxSlimError(Exception):
    """A refusal the user can act on: the message is one line naming the problem."""


class ModelLoadError(OnnxSlimError):
    """The model file is missing, empty, truncated, not ONNX, or its external data is gone."""


class DataError(OnnxSlimError):
    """Calibration/evaluation data does not match the model (names, shapes, dtypes, count)."""


class PassError(OnnxSlimError):
    """A pass could not be applied; the model is left as it was before the pass."""


class BudgetError(OnnxSlimError):
    """The accuracy budget or size/MACs target could not be met (CLI exit code 2)."""
