"""The pass contract every compression pass follows.

A pass is an onnx_ir in-place pass whose parameters (calibration data included) are set at
construction. `call` rewrites the model and returns a `CompressionResult`, whose `record`
says, per layer, what changed and what was skipped and why. Passes never write files,
never print and never read flags; the pipeline validates and gates what they produce.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx_ir as ir


@dataclass
class LayerChange:
    """One layer a pass rewrote."""

    layer: str
    op_type: str
    detail: str = ""
    params_before: int | None = None
    params_after: int | None = None


@dataclass
class Skip:
    """A layer a pass chose not to touch, and why: skip reasons are data, not log lines."""

    layer: str
    reason: str


@dataclass
class PassRecord:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    changes: list[LayerChange] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return bool(self.changes)

    def changed(
        self, layer: str, op_type: str, detail: str = "", before: int | None = None, after: int | None = None
    ) -> None:
        self.changes.append(LayerChange(layer, op_type, detail, before, after))

    def skip(self, layer: str, reason: str) -> None:
        self.skipped.append(Skip(layer, reason))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CompressionResult(ir.passes.PassResult):
    record: PassRecord = field(default_factory=lambda: PassRecord("unknown"))


class CompressionPass(ir.passes.InPlacePass):
    """Base class: include/exclude by node name or op type, and a record of decisions.

    Subclasses implement `rewrite(model, record)`. `lossless` passes promise outputs equal to
    the model before them (up to float rounding); the pipeline checks that promise.
    """

    name: str = "pass"
    lossless: bool = False
    # Passes that fit anything to activations say so; the API hands them calibration data.
    uses_data: bool = False
    calibration = None
    # The gate's task metric (`--task-metric`), for passes that measure candidates themselves:
    # ranking by fidelity while the gate judges by the task metric would pick the wrong ones.
    task_metric = None

    def __init__(self, *, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
        self.include = tuple(include)
        self.exclude = tuple(exclude)

    def params(self) -> dict[str, Any]:
        """Constructor parameters, for the report and for replaying a run."""
        # The bound data is state, not a parameter (None would pass the plain-value test).
        out = {
            k: v
            for k, v in vars(self).items()
            if not k.startswith("_") and k not in ("calibration", "task_metric") and _plain(v)
        }
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}

    def selects(self, node: ir.Node) -> tuple[bool, str]:
        """Whether this pass may touch `node`; when not, the reason."""
        names = (node.name or "", node.op_type)
        if self.exclude and any(fnmatch.fnmatchcase(n, pat) for pat in self.exclude for n in names):
            return False, "excluded by --exclude"
        if self.include and not any(fnmatch.fnmatchcase(n, pat) for pat in self.include for n in names):
            return False, "not matched by --include"
        return True, ""

    def bind_data(self, calibration) -> None:
        """Give the pass its calibration data (never the held-out evaluation data)."""
        if self.uses_data and self.calibration is None:
            self.calibration = calibration

    def bind_task_metric(self, metric) -> None:
        """Give the pass the task metric the gate judges by (a loaded `TaskMetric`)."""
        if self.task_metric is None:
            self.task_metric = metric

    def preflight(self, model: ir.Model) -> None:
        """Refuse the whole run up front (raise OnnxSlimError) when this pass cannot apply.

        For refusals the user must act on (e.g. quantizing an already-quantized model), as
        opposed to per-layer skips, which are recorded and never stop a run.
        """

    def milder(self) -> CompressionPass | None:
        """A gentler version of this pass to try when the accuracy budget breaks, or None."""
        return None

    def rewrite(self, model: ir.Model, record: PassRecord) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def call(self, model: ir.Model) -> CompressionResult:
        record = PassRecord(self.name, self.params())
        self.rewrite(model, record)
        return CompressionResult(model, record.modified, record)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def _plain(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool, type(None), tuple, list, dict))
