"""Target-driven allocation: which layers to compress, by which method, how hard.

A target (`macs`, `size` or `latency`, each relative to the original) is met with the
least metric loss by a greedy search on *measured* sensitivity, in the spirit of AIMET's
greedy compression-ratio selection:

1. every candidate layer is compressed alone at several settings of each method
   (`sensitivity.scan`: independent jobs through joblib, so local cores or a Dask/Ray
   cluster run them with no code of ours), giving per (layer, method, setting) the metric
   drop and the MACs/bytes it saves;
2. starting from the original, the step with the least extra drop per unit saved is taken
   (a layer moves to a stronger setting, possibly of another method) until the estimated
   cost meets the target; one method per layer;
3. the chosen settings run as ordinary passes (validated, gated by the accuracy budget),
   the reached cost is measured, and when the estimate was optimistic the aim is tightened
   and the search goes on.

Latency is aimed at through MACs (the only cost the scan can measure cheaply) and then
checked with interleaved onnxruntime timings of the result against the original.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from onnxslim_tool import io, runtime, sensitivity, storage
from onnxslim_tool.cost import analyze_cost
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.errors import OnnxSlimError
from onnxslim_tool.passes import pass_class
from onnxslim_tool.passes.base import CompressionPass
from onnxslim_tool.task_metrics import TaskMetricSpec

KINDS = ("macs", "size", "latency")
# Methods searched per target: what reduces that cost. Pruning first on ties: it makes the
# model faster everywhere, low rank only for large layers.
METHODS_FOR = {
    "macs": ("prune", "lowrank"),
    "latency": ("prune", "lowrank"),
    "size": ("share", "prune", "lowrank"),
}
# Re-aims after a result misses the target (the per-layer savings do not add up exactly).
ATTEMPTS = 4
# Ties in drop per unit saved go to the bigger saving (fewer, larger steps).
_DROP_FLOOR = 1e-4
LATENCY_RUNS = 30
_MAX_REAIMS = 40  # 0.9**40: the aim has dropped to 1.5% of where it was


@dataclass(frozen=True)
class Target:
    """`kind` in KINDS; `value`: fraction of the original MACs/latency, or bytes for size."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise OnnxSlimError(f"unknown target '{self.kind}'; choose from: {', '.join(KINDS)}")
        if self.kind == "size" and not self.value >= 1:
            raise OnnxSlimError(f"--target-size must be a positive number of bytes, got {self.value!r}")
        if self.kind != "size" and not 0 < self.value < 1:
            raise OnnxSlimError(f"--target-{self.kind} must be a fraction in (0, 1), got {self.value!r}")

    def describe(self) -> str:
        return (
            f"size <= {int(self.value):,} bytes"
            if self.kind == "size"
            else f"{self.kind} <= {self.value:.0%}"
        )


@dataclass(frozen=True)
class Option:
    """One measured way to compress one layer."""

    layer: str
    method: str
    setting: Any
    saving: float  # MACs or bytes saved when applied alone
    drop: float  # measured metric drop when applied alone


@dataclass
class Allocation:
    """The search's decisions and what it measured."""

    target: Target
    chosen: dict[str, Option] = field(default_factory=dict)
    estimate: float = 0.0  # estimated cost of `chosen`, in the target's unit (fraction or bytes)
    reached: float | None = None  # measured
    met: bool = False
    scan_seconds: float = 0.0
    evaluations: int = 0
    notes: list[str] = field(default_factory=list)

    def passes(self, seed: int = 0) -> list[CompressionPass]:
        return build_passes(self.chosen.values(), seed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": {"kind": self.target.kind, "value": self.target.value},
            "chosen": [vars(o) for o in self.chosen.values()],
            "estimate": self.estimate,
            "reached": self.reached,
            "met": self.met,
            "scan_seconds": round(self.scan_seconds, 3),
            "evaluations": self.evaluations,
            "notes": self.notes,
        }


def measure_options(
    model: ir.Model,
    target: Target,
    calibration: CalibrationData | None,
    evaluation: CalibrationData,
    *,
    max_layers: int | None = 24,
    n_jobs: int = 1,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    task_metric: TaskMetricSpec | None = None,
) -> tuple[list[Option], float, int]:
    """Every (layer, method, setting) the scan could apply, with its saving and drop."""
    cost = analyze_cost(model)
    # Candidates' sizes are measured after the same size-only compaction (sensitivity.Point),
    # so a saving is what the layer's compression saves, not the names every pass shortens.
    base_bytes = storage.compacted_size(model)
    options: list[Option] = []
    seconds, evaluations = 0.0, 0
    for method in METHODS_FOR[target.kind]:
        if progress:
            progress(f"measuring sensitivity ({method})")
        report = sensitivity.scan(
            model,
            method,
            calibration,
            evaluation,
            max_layers=max_layers,
            n_jobs=n_jobs,
            seed=seed,
            task_metric=task_metric,
        )
        seconds += report.seconds
        for layer in report.layers:
            for point in layer.points:
                evaluations += 1
                after = point.bytes_after if target.kind == "size" else point.macs_after
                before = base_bytes if target.kind == "size" else cost.total_macs
                if point.error or point.metric_drop is None or after is None or after >= before:
                    continue
                options.append(Option(layer.layer, method, point.setting, before - after, point.metric_drop))
    return options, seconds, evaluations


def greedy(options: Sequence[Option], goal_saving: float) -> tuple[dict[str, Option], float]:
    """Least extra drop per unit saved, step by step, until `goal_saving` is reached.

    Returns the chosen option per layer and the estimated total saving (savings of layers
    add up; the caller measures the real figure).
    """
    by_layer: dict[str, list[Option]] = {}
    for option in options:
        by_layer.setdefault(option.layer, []).append(option)
    chosen: dict[str, Option] = {}
    saved = 0.0
    while saved < goal_saving:
        best: tuple[float, float, str, Option] | None = None
        for layer, layer_options in by_layer.items():
            current = chosen.get(layer)
            cur_saving = current.saving if current else 0.0
            cur_drop = max(current.drop, 0.0) if current else 0.0
            for option in layer_options:
                gain = option.saving - cur_saving
                if gain <= 0:
                    continue
                cost_per_unit = (max(max(option.drop, 0.0) - cur_drop, 0.0) + _DROP_FLOOR) / gain
                key = (cost_per_unit, -gain, layer, option)
                if best is None or key[:3] < best[:3]:
                    best = key
        if best is None:
            break  # nothing left to take: the target is out of reach with these methods
        option = best[3]
        saved += option.saving - (chosen[option.layer].saving if option.layer in chosen else 0.0)
        chosen[option.layer] = option
    return chosen, saved


def build_passes(options: Iterable[Option], seed: int = 0) -> list[CompressionPass]:
    """One pass per (method, setting), restricted to the layers that chose it; pruning
    first, then low rank, then sharing (the order that composes best)."""
    order = {"prune": 0, "lowrank": 1, "share": 2}
    grouped: dict[tuple[str, Any], list[str]] = {}
    for option in sorted(options, key=lambda o: (order.get(o.method, 9), str(o.setting), o.layer)):
        grouped.setdefault((option.method, option.setting), []).append(option.layer)
    passes: list[CompressionPass] = []
    for (method, setting), layers in grouped.items():
        spec = sensitivity.METHODS[method]
        cls = pass_class(spec.pass_name)
        params = spec.params_for(layers, setting)
        if "seed" in sensitivity.init_params(cls):
            params["seed"] = seed
        passes.append(cls(**params))
    pruned = [i for i, p in enumerate(passes) if p.name == "channel-pruning"]
    if pruned:
        # Fold what pruning left unfolded, before sharing packs weights that folding would
        # otherwise expand back.
        passes.insert(pruned[-1] + 1, pass_class("cleanup")())
    return passes


def search(
    model: ir.Model,
    target: Target,
    calibration: CalibrationData | None,
    evaluation: CalibrationData,
    run: Callable[[list[CompressionPass]], Any],
    *,
    max_layers: int | None = 24,
    n_jobs: int = 1,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    task_metric: TaskMetricSpec | None = None,
) -> tuple[Allocation, Any]:
    """Allocate, run the allocation through `run(passes) -> Result`, measure, re-aim.

    Returns the allocation and the last result (the one that met the target, else the
    closest attempt).
    """
    allocation = Allocation(target)
    options, allocation.scan_seconds, allocation.evaluations = measure_options(
        model,
        target,
        calibration,
        evaluation,
        max_layers=max_layers,
        n_jobs=n_jobs,
        seed=seed,
        progress=progress,
        task_metric=task_metric,
    )
    if not options:
        raise OnnxSlimError(f"no layer can be compressed toward {target.describe()}")
    base = _base_cost(model, target)
    aim = target.value * (1 if target.kind == "size" else base)  # the cost to reach, in units
    best: tuple[float, Any, dict[str, Option], float] | None = None
    tried: list[dict[str, Option]] = []
    for attempt in range(ATTEMPTS):
        chosen, saved = greedy(options, base - aim)
        for _ in range(_MAX_REAIMS):
            if chosen not in tried or not saved >= base - aim > 0:
                break
            # Re-aiming by the miss did not change the plan: aim lower until it does. Bounded:
            # estimated savings can exceed the whole model, and then no aim changes the plan.
            aim *= 0.9
            chosen, saved = greedy(options, base - aim)
        if chosen in tried:
            allocation.notes.append("every measured option is taken: the target is out of reach")
            break
        tried.append(chosen)
        allocation.chosen = chosen
        allocation.estimate = _as_target_unit(target, base - saved, base)
        if progress:
            progress(f"compressing {len(chosen)} layer(s) toward {target.describe()}")
        result = run(build_passes(list(chosen.values()), seed))
        reached = _reached(model, result, target, base, evaluation)
        allocation.notes.append(
            f"attempt {attempt + 1}: {len(chosen)} layer(s), estimated {_fmt(target, allocation.estimate)}, "
            f"reached {_fmt(target, reached)}"
        )
        if reached <= target.value:
            allocation.met, allocation.reached = True, reached
            return allocation, result
        if best is None or reached < best[0]:
            best = (reached, result, chosen, allocation.estimate)
        if saved < base - aim:
            allocation.notes.append("every measured option is taken: the target is out of reach")
            break
        # The estimate was optimistic: aim lower by the miss and continue the greedy.
        aim = aim * target.value / reached
    allocation.reached, result, allocation.chosen, allocation.estimate = best
    allocation.notes.append(f"kept the closest attempt: {_fmt(target, allocation.reached)}")
    return allocation, result


def _base_cost(model: ir.Model, target: Target) -> float:
    return float(io.serialized_size(model) if target.kind == "size" else analyze_cost(model).total_macs)


def _as_target_unit(target: Target, cost: float, base: float) -> float:
    return cost if target.kind == "size" else cost / base


def _reached(model: ir.Model, result: Any, target: Target, base: float, data: CalibrationData) -> float:
    if target.kind == "size":
        return float(io.serialized_size(result.model))
    if target.kind == "macs":
        return analyze_cost(result.model).total_macs / base
    return latency_ratio(model, result.model, next(iter(data.batches(1))))


def latency_ratio(
    reference: ir.Model, candidate: ir.Model, feed: runtime.Feed, runs: int = LATENCY_RUNS
) -> float:
    """Median onnxruntime CPU latency of `candidate` over `reference`, interleaved, batch 1."""
    sessions = {
        "reference": runtime.make_session(reference, 1),
        "candidate": runtime.make_session(candidate, 1),
    }
    timed = runtime.measure_latency(sessions, feed, runs=runs)
    return timed["candidate"].median_ms / timed["reference"].median_ms


def _fmt(target: Target, value: float) -> str:
    return f"{int(value):,} bytes" if target.kind == "size" else f"{value:.1%}"
