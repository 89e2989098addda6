"""The pass runner: apply, validate, measure, gate, back off; every decision recorded.

After each pass the model must pass the full onnx checker, load in onnxruntime, produce
finite outputs, and (for a lossless pass) match the model before the pass. A pass that
fails any of that is rolled back. With an accuracy budget, a pass that breaks it is
replaced by its milder version until the budget holds, or rolled back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxslim_tool import io, metrics, runtime
from onnxslim_tool.cost import analyze_cost, data_shapes
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.errors import OnnxSlimError
from onnxslim_tool.passes.base import CompressionPass, PassRecord
from onnxslim_tool.task_metrics import TaskMetricSpec, load_task_metric, score

# A lossless pass may move outputs by float reassociation only.
LOSSLESS_REL_TOL = 1e-3
LOSSLESS_MIN_COSINE = 0.9999
EVAL_BATCH = 64
# How far one back-off step is assumed to shrink a budget overrun, at least: a quarter less
# pruning shrinks a squared error to 0.56, one more bit of sharing to about 0.25.
BACKOFF_SHRINK = 0.4
# Measured shrink that leaves the mildest setting over this many budgets: no more attempts.
HOPELESS_OVERRUN = 2.0
MAX_BACKOFF_CHAIN = 64


@dataclass
class ModelStats:
    """Size and cost of one model, each number from its one source."""

    params: int
    bytes: int
    macs: int
    nodes: int

    @classmethod
    def of(cls, model: ir.Model, input_shapes: dict[str, Sequence[int]] | None = None) -> ModelStats:
        cost = analyze_cost(model, input_shapes)
        return cls(cost.total_params, io.serialized_size(model), cost.total_macs, cost.node_count)

    def to_dict(self) -> dict[str, int]:
        return {"params": self.params, "bytes": self.bytes, "macs": self.macs, "nodes": self.nodes}


@dataclass
class Evaluation:
    """Outputs of a model on the evaluation data, plus its score when there is one to compute.

    `accuracy` is the labelled accuracy, or the task metric against the original's outputs
    when one is given; `metric` names which.
    """

    outputs: dict[str, np.ndarray]
    accuracy: float | None
    metric: str = "accuracy"

    def fidelity_to(self, reference: Evaluation) -> list[metrics.OutputFidelity]:
        return metrics.compare_outputs(reference.outputs, self.outputs)


@dataclass
class StepOutcome:
    """What happened to one pass: applied, no-op, backed off or rolled back, and why."""

    name: str
    status: str
    record: PassRecord
    reason: str = ""
    fidelity: list[metrics.OutputFidelity] = field(default_factory=list)
    accuracy: float | None = None
    stats: ModelStats | None = None
    seconds: float = 0.0
    attempts: list[str] = field(default_factory=list)
    # Rolled back because no version of the pass fit the accuracy budget.
    over_budget: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "record": self.record.to_dict(),
            "fidelity": [f.to_dict() for f in self.fidelity],
            "accuracy": self.accuracy,
            "stats": self.stats.to_dict() if self.stats else None,
            "seconds": round(self.seconds, 3),
            "attempts": self.attempts,
            "over_budget": self.over_budget,
        }


@dataclass
class Result:
    """The compressed model, the original's and the result's numbers, and every step."""

    model: ir.Model
    before: ModelStats
    after: ModelStats
    steps: list[StepOutcome]
    fidelity: list[metrics.OutputFidelity]
    accuracy_before: float | None
    accuracy_after: float | None
    data_source: str
    synthetic_data: bool
    eval_samples: int
    # Set when a target (size/MACs/latency) chose the passes: the search's decisions.
    allocation: dict[str, Any] | None = None
    # What accuracy_before/after measure: labelled "accuracy" or "task metric '<name>'".
    metric: str = "accuracy"
    # The input shapes MACs were counted at, where the model leaves dims symbolic.
    cost_shapes: dict[str, Sequence[int]] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write the model atomically; `after.bytes` becomes the bytes really written."""
        written = io.save(self.model, path)
        self.after.bytes = io.file_size(written)
        return written

    @property
    def max_output_difference(self) -> float:
        return max((f.max_abs_error for f in self.fidelity), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "ratios": {
                "bytes": _ratio(self.after.bytes, self.before.bytes),
                "params": _ratio(self.after.params, self.before.params),
                "macs": _ratio(self.after.macs, self.before.macs),
            },
            "macs_input_shapes": {name: list(dims) for name, dims in self.cost_shapes.items()},
            "metric": self.metric if self.accuracy_before is not None else None,
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "fidelity": [f.to_dict() for f in self.fidelity],
            "max_output_difference": self.max_output_difference,
            "data": {
                "source": self.data_source,
                "synthetic": self.synthetic_data,
                "eval_samples": self.eval_samples,
            },
            "steps": [s.to_dict() for s in self.steps],
            **({"allocation": self.allocation} if self.allocation is not None else {}),
        }

    @property
    def over_budget(self) -> list[StepOutcome]:
        """Steps the accuracy budget forced back: the requested compression was not reached."""
        return [s for s in self.steps if s.over_budget]

    def summary(self) -> str:
        lines = [
            f"params {self.before.params:,} -> {self.after.params:,}",
            f"bytes  {self.before.bytes:,} -> {self.after.bytes:,}",
            f"MACs   {self.before.macs:,} -> {self.after.macs:,}",
            f"nodes  {self.before.nodes:,} -> {self.after.nodes:,}",
            f"max output difference {self.max_output_difference:.3g}",
        ]
        if self.accuracy_before is not None:
            lines.append(f"{self.metric} {self.accuracy_before:.4f} -> {self.accuracy_after:.4f}")
        if self.synthetic_data:
            lines.append("measured on SYNTHETIC random data, not on real inputs")
        for step in self.steps:
            lines.append(f"[{step.status}] {step.name}" + (f": {step.reason}" if step.reason else ""))
        return "\n".join(lines)


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


ProgressFn = Callable[[str], None]


class Pipeline:
    """Runs passes one at a time on a model, keeping only what validates and fits the budget."""

    def __init__(
        self,
        passes: Sequence[CompressionPass],
        eval_data: CalibrationData,
        *,
        max_drop: float | None = None,
        input_shapes: dict[str, Sequence[int]] | None = None,
        progress: ProgressFn | None = None,
        task_metric: TaskMetricSpec | None = None,
    ) -> None:
        self.passes = list(passes)
        self.eval_data = eval_data
        self.max_drop = max_drop
        # Judges candidates against the original's outputs, in place of labels or fidelity.
        self.task_metric = load_task_metric(task_metric) if task_metric is not None else None
        self.input_shapes = input_shapes
        self._cost_shapes = input_shapes  # set per run: given, else the data's
        self.progress = progress or (lambda _msg: None)

    def run(self, model: ir.Model) -> Result:
        if self.task_metric is not None:
            for compression_pass in self.passes:
                compression_pass.bind_task_metric(self.task_metric)
        # Copies: the caller's model is never mutated. "Before" numbers describe the model as
        # given; passes work on a copy whose Constant-node weights are initializers.
        original = io.load(model, lift_constants=False)
        working = io.load(model, lift_constants=True)
        self.progress("measuring the original model")
        # MACs of a model with symbolic dims are counted at the data's shapes (a sequence
        # model's cost grows with its length), unless the caller fixed them.
        self._cost_shapes = self.input_shapes or data_shapes(original, self.eval_data)
        before_stats = ModelStats.of(original, self._cost_shapes)
        reference = self.evaluate(original)
        current = reference
        steps: list[StepOutcome] = []
        for compression_pass in self.passes:
            self.progress(f"pass {compression_pass.name}")
            working, current, outcome = self._run_step(working, compression_pass, reference, current)
            steps.append(outcome)
        after_stats = ModelStats.of(working, self._cost_shapes)
        return Result(
            model=working,
            before=before_stats,
            after=after_stats,
            steps=steps,
            fidelity=current.fidelity_to(reference),
            accuracy_before=reference.accuracy,
            accuracy_after=current.accuracy,
            data_source=self.eval_data.source,
            synthetic_data=self.eval_data.synthetic,
            eval_samples=len(self.eval_data),
            cost_shapes=dict(self._cost_shapes or {}),
            metric=reference.metric,
        )

    def evaluate(self, model: ir.Model, reference: Evaluation | None = None) -> Evaluation:
        """Outputs and score of `model`; with no `reference`, `model` is the original.

        A task metric scores against the reference's outputs, so candidates must get it.
        """
        session = runtime.make_session(model)
        outputs = runtime.run_feeds(session, self.eval_data.batches(EVAL_BATCH))
        if self.task_metric is not None:
            against = reference.outputs if reference is not None else outputs
            return Evaluation(outputs, score(self.task_metric, outputs, against), self.task_metric.label)
        return Evaluation(outputs, metrics.task_accuracy(outputs, covered_labels(self.eval_data, EVAL_BATCH)))

    def _run_step(
        self, model: ir.Model, first: CompressionPass, reference: Evaluation, previous: Evaluation
    ) -> tuple[ir.Model, Evaluation, StepOutcome]:
        start = time.perf_counter()
        attempts: list[str] = []
        candidate_pass: CompressionPass | None = first
        last_reason = ""
        over_budget = False  # True while the latest failure is the budget, not a broken rewrite
        last_record = PassRecord(first.name, first.params())
        backoff = _Backoff(self.max_drop or 0.0)
        while candidate_pass is not None:
            candidate = io.load(model, lift_constants=False)
            try:
                result = candidate_pass(candidate)
                record = getattr(result, "record", None) or PassRecord(candidate_pass.name)
            except OnnxSlimError as exc:
                last_reason, over_budget = f"pass refused: {exc}", False
                break
            except Exception as exc:  # a bug in a pass must never reach the user's model
                last_reason, over_budget = f"pass failed: {type(exc).__name__}: {str(exc)[:200]}", False
                break
            last_record = record
            if not record.modified and candidate_pass is not first:
                # Backed off until nothing changes: the budget, not the model, stopped the
                # pass, so say so (rolled back, over budget) rather than "no-op".
                attempts.append(f"{candidate_pass!r}: changes nothing")
                break
            if not record.modified:
                return (
                    model,
                    previous,
                    StepOutcome(
                        candidate_pass.name,
                        "no-op",
                        record,
                        "nothing to change",
                        seconds=time.perf_counter() - start,
                    ),
                )
            problem, evaluation = self.validate(
                candidate, previous, lossless=candidate_pass.lossless, reference=reference
            )
            if evaluation is None:
                # A broken rewrite is a bug, not a matter of degree: no milder retry.
                last_reason, over_budget = problem or "validation failed", False
                break
            budget_problem = self._budget_problem(reference, evaluation)
            if budget_problem is None:
                status = "applied" if candidate_pass is first else "backed off"
                outcome = StepOutcome(
                    candidate_pass.name,
                    status,
                    record,
                    "; ".join(attempts),
                    fidelity=evaluation.fidelity_to(previous),
                    accuracy=evaluation.accuracy,
                    stats=ModelStats.of(candidate, self._cost_shapes),
                    seconds=time.perf_counter() - start,
                    attempts=attempts,
                )
                return candidate, evaluation, outcome
            attempts.append(f"{candidate_pass!r}: {budget_problem}")
            last_reason, over_budget = budget_problem, True
            backoff.failed(metric_drop(reference, evaluation)[0])
            gentler = self._gentler(candidate_pass, backoff, attempts)
            if gentler is not None:  # a backed-off pass calibrates on the same data as the first
                gentler.bind_data(candidate_pass.calibration)
                gentler.bind_task_metric(candidate_pass.task_metric)
            candidate_pass = gentler
        return (
            model,
            previous,
            StepOutcome(
                first.name,
                "rolled back",
                last_record,
                last_reason,
                seconds=time.perf_counter() - start,
                attempts=attempts,
                over_budget=over_budget,
            ),
        )

    def validate(
        self,
        candidate: ir.Model,
        previous: Evaluation,
        *,
        lossless: bool,
        reference: Evaluation | None = None,
    ) -> tuple[str | None, Evaluation | None]:
        """None when the candidate is a valid model that behaves as promised, else why not.

        `reference` is the original's evaluation (a task metric scores against it); without
        it `previous` stands in.
        """
        try:
            check_model(candidate)
        except Exception as exc:
            return f"onnx checker: {_one_line(exc)}", None
        try:
            evaluation = self.evaluate(candidate, reference or previous)
        except OnnxSlimError as exc:
            return str(exc), None
        try:
            fidelity = evaluation.fidelity_to(previous)
        except ValueError as exc:
            return str(exc), None
        for f in fidelity:
            if not f.finite:
                return f"output '{f.name}' has NaN/Inf values", None
            if lossless and (f.max_rel_error > LOSSLESS_REL_TOL or f.cosine < LOSSLESS_MIN_COSINE):
                return (
                    f"lossless pass changed output '{f.name}' (rel. error {f.max_rel_error:.2e}, "
                    f"cosine {f.cosine:.6f})"
                ), None
        return None, evaluation

    def _gentler(
        self, failed: CompressionPass, backoff: _Backoff, attempts: list[str]
    ) -> CompressionPass | None:
        """The next milder pass worth trying, or None when even the mildest would miss.

        Each attempt is a full rewrite and evaluation (minutes on a detector), so the overrun
        decides how far down the chain of milder settings to jump, and once two attempts show
        how fast the drop really shrinks per step, a chain whose mildest setting would still be
        well over budget is not tried at all.
        """
        chain: list[CompressionPass] = []
        milder = failed.milder()
        while milder is not None and len(chain) < MAX_BACKOFF_CHAIN:
            chain.append(milder)
            milder = milder.milder()
        if not chain:
            return None
        hopeless = backoff.hopeless(len(chain))
        if hopeless:
            attempts.append(hopeless)
            return None
        steps = min(backoff.steps_needed(), len(chain))
        if steps > 1:
            attempts.append(
                f"{steps - 1} milder setting(s) skipped untried: the drop was "
                f"{backoff.overrun:.0f}x the budget"
            )
        backoff.moved(steps)
        return chain[steps - 1]

    def _budget_problem(self, reference: Evaluation, evaluation: Evaluation) -> str | None:
        if self.max_drop is None:
            return None
        drop, metric_name = metric_drop(reference, evaluation)
        if drop > self.max_drop + 1e-12:
            return f"{metric_name} dropped by {drop:.4f} (budget {self.max_drop:.4f})"
        return None


def _backoff_skips(drop: float, budget: float, shrink: float = BACKOFF_SHRINK) -> int:
    """Milder settings to skip: with each back-off step shrinking the drop to `shrink` of
    itself, the steps that cannot bring `drop` under `budget` are not worth a try."""
    if budget <= 0 or drop <= budget:
        return 0
    needed = math.ceil(math.log(drop / budget) / math.log(1.0 / shrink))
    return max(needed - 1, 0)


class _Backoff:
    """The drops measured along one pass's chain of milder settings, and what they predict."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.position = 0  # steps down the chain from the pass as first given
        self.measured: list[tuple[int, float]] = []

    def failed(self, drop: float) -> None:
        self.measured.append((self.position, drop))

    def moved(self, steps: int) -> None:
        self.position += steps

    @property
    def overrun(self) -> float:
        return self.measured[-1][1] / self.budget if self.budget > 0 else float("inf")

    @property
    def shrink(self) -> float:
        """Per-step factor of the drop: measured over the last two attempts when there are
        two (never assumed faster than BACKOFF_SHRINK), else BACKOFF_SHRINK."""
        if len(self.measured) < 2:
            return BACKOFF_SHRINK
        (s0, d0), (s1, d1) = self.measured[-2:]
        if d0 <= 0 or d1 <= 0 or s1 <= s0:
            return BACKOFF_SHRINK
        return min(max((d1 / d0) ** (1.0 / (s1 - s0)), BACKOFF_SHRINK), 1.0)

    def steps_needed(self) -> int:
        return _backoff_skips(self.measured[-1][1], self.budget, min(self.shrink, 0.99)) + 1

    def hopeless(self, steps_left: int) -> str | None:
        """Why not to retry, when the measured shrink leaves the mildest setting far over budget."""
        if len(self.measured) < 2 or self.budget <= 0:
            return None
        predicted = self.measured[-1][1] * self.shrink**steps_left
        if predicted <= HOPELESS_OVERRUN * self.budget:
            return None
        return (
            f"not retried: the drop shrank {self.shrink:.2f}x per milder step over the last "
            f"attempts, so the mildest setting ({steps_left} step(s) on) would still be about "
            f"{predicted / self.budget:.1f}x the budget"
        )


def covered_labels(data: CalibrationData, batch_size: int) -> np.ndarray | None:
    """Labels of the samples the batches cover (a fixed batch size > 1 drops a short tail)."""
    if data.labels is None:
        return None
    slices = data.batch_slices(batch_size)
    return data.labels[: slices[-1].stop] if slices else data.labels[:0]


def metric_drop(reference: Evaluation, candidate: Evaluation) -> tuple[float, str]:
    """Drop of the score (task metric, else labelled accuracy), else of fidelity to the original."""
    if reference.accuracy is not None and candidate.accuracy is not None:
        return reference.accuracy - candidate.accuracy, reference.metric
    fidelity = candidate.fidelity_to(reference)
    agreements = [f.top1_agreement for f in fidelity if f.top1_agreement is not None]
    if agreements:
        return 1.0 - min(agreements), "top-1 agreement"
    return 1.0 - min(f.cosine for f in fidelity), "output cosine"


def check_model(model: ir.Model) -> None:
    """The full onnx checker (with shape inference), through a file for models over 2 GB."""
    if io.weight_bytes(model) > io.EXTERNAL_DATA_THRESHOLD or io.has_external_tensors(model):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="onnxslim-check-") as tmp:
            path = Path(tmp) / "model.onnx"
            io.save(model, path, external_data_threshold=0)
            onnx.checker.check_model(str(path), full_check=True)
        return
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
