"""Per-layer sensitivity: how much the metric drops when one layer alone is compressed.

Every (layer, setting) pair is an independent job: apply one pass restricted to that layer
(`include=[layer]`) to a fresh copy of the model and measure it on held-out data. Jobs run
through joblib, so the same scan uses the local cores or, under
`joblib.parallel_backend("dask")` / `("ray")`, a cluster, with no distribution code here.
"""

from __future__ import annotations

import glob
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx_ir as ir
from joblib import Parallel, delayed
from threadpoolctl import threadpool_limits

from onnxslim_tool import io, storage
from onnxslim_tool.cost import analyze_cost
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.errors import OnnxSlimError
from onnxslim_tool.passes import pass_class
from onnxslim_tool.pipeline import Evaluation, Pipeline, metric_drop
from onnxslim_tool.pruning.depgraph import find_groups
from onnxslim_tool.task_metrics import TaskMetricSpec


@dataclass(frozen=True)
class Method:
    """A sensitivity axis: which pass, which parameter is swept, over which values."""

    name: str
    pass_name: str
    parameter: str
    settings: tuple[Any, ...]
    op_types: tuple[str, ...]
    fixed: tuple[tuple[str, Any], ...] = ()
    # Channel pruning acts on dependency groups, which span several layers (a producer and
    # its readers), so "this layer alone" is its group named by producer, not `include`.
    by_producer: bool = False

    def params_for(self, layers: Sequence[str], value: Any) -> dict[str, Any]:
        """Pass parameters that apply `value` to `layers` and nothing else."""
        if self.by_producer:
            per_layer = {glob.escape(layer): value for layer in layers}
            return {"ratio": 0.0, "per_layer": per_layer, "protect_ends": False}
        return {self.parameter: value, "include": list(layers), **dict(self.fixed)}


METHODS: dict[str, Method] = {
    "prune": Method(
        "prune",
        "channel-pruning",
        "ratio",
        (0.1, 0.3, 0.5, 0.7),
        ("Conv", "ConvTranspose", "Gemm", "MatMul"),
        by_producer=True,
    ),
    "lowrank": Method("lowrank", "lowrank", "ratio", (0.75, 0.5, 0.25), ("Conv", "Gemm", "MatMul")),
    "share": Method(
        "share", "weight-sharing", "bits", (8, 6, 4, 3, 2), ("Conv", "ConvTranspose", "Gemm", "MatMul")
    ),
    "quantize": Method(
        "quantize",
        "quantize",
        "mode",
        ("int8",),
        ("Conv", "Gemm", "MatMul"),
        # Each layer's own int8 cost, small layers too (compress would keep those float-compute).
        fixed=(("max_drop", None), ("min_layer_macs", 0)),
    ),
}


@dataclass
class Point:
    setting: Any
    metric_drop: float | None
    metric: str
    params_after: int | None = None
    macs_after: int | None = None
    error: str = ""
    bytes_after: int | None = None


@dataclass
class LayerSensitivity:
    layer: str
    op_type: str
    params: int
    macs: int
    points: list[Point] = field(default_factory=list)


@dataclass
class SensitivityReport:
    method: str
    parameter: str
    settings: list[Any]
    layers: list[LayerSensitivity]
    data_source: str
    synthetic_data: bool
    seconds: float
    jobs: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidate_layers(model: ir.Model, op_types: Sequence[str]) -> list[tuple[str, str, int, int]]:
    """(name, op_type, params, macs) of named weighted layers, heaviest first."""
    cost = analyze_cost(model)
    rows = [
        (layer.name, layer.op_type, layer.params, layer.macs)
        for layer in cost.layers
        if layer.op_type in op_types and layer.params > 0 and layer.name
    ]
    return sorted(rows, key=lambda r: (-r[3], -r[2], r[0]))


def scan(
    model: ir.Model,
    method: str,
    calibration: CalibrationData | None,
    evaluation: CalibrationData,
    *,
    settings: Sequence[Any] | None = None,
    layers: Sequence[str] | None = None,
    max_layers: int | None = None,
    n_jobs: int = 1,
    seed: int = 0,
    task_metric: TaskMetricSpec | None = None,
) -> SensitivityReport:
    """Metric drop of each candidate layer compressed alone, at each setting.

    With `task_metric`, the drop is that metric's, each candidate scored against the
    original model's outputs.
    """
    if method not in METHODS:
        raise OnnxSlimError(f"unknown analysis method '{method}'; choose from: {', '.join(METHODS)}")
    spec = METHODS[method]
    values = tuple(settings) if settings else spec.settings
    candidates = candidate_layers(model, spec.op_types)
    if spec.by_producer:
        # One candidate per prunable group (named by its first producer): the other
        # producers of a group (residual branches) would repeat the same measurement.
        firsts = {g.producers[0] for g in find_groups(model) if g.prunable and g.producers}
        candidates = [c for c in candidates if c[0] in firsts]
    if layers:
        candidates = [c for c in candidates if c[0] in set(layers)]
    if max_layers is not None:
        candidates = candidates[:max_layers]
    if not candidates:
        raise OnnxSlimError(f"no named {'/'.join(spec.op_types)} layers with weights to analyse")
    start = time.perf_counter()
    serialized = io.to_compact_proto(model).SerializeToString()
    judge = Pipeline([], evaluation, task_metric=task_metric)
    reference = judge.evaluate(model)
    jobs = [(name, value) for name, *_ in candidates for value in values]
    points = Parallel(n_jobs=n_jobs)(
        delayed(_measure_one)(serialized, spec, name, value, calibration, judge, reference, seed)
        for name, value in jobs
    )
    by_layer = {name: LayerSensitivity(name, op, params, macs) for name, op, params, macs in candidates}
    for (name, _), point in zip(jobs, points, strict=True):
        by_layer[name].points.append(point)
    return SensitivityReport(
        method=method,
        parameter=spec.parameter,
        settings=list(values),
        layers=list(by_layer.values()),
        data_source=evaluation.source,
        synthetic_data=evaluation.synthetic,
        seconds=time.perf_counter() - start,
        jobs=n_jobs,
    )


def _measure_one(
    serialized: bytes,
    spec: Method,
    layer: str,
    value: Any,
    calibration: CalibrationData | None,
    judge: Pipeline,
    reference: Evaluation,
    seed: int,
) -> Point:
    """One job: a fresh model, one pass on one layer, one measurement. Never raises."""
    # Parallelism is across jobs (n_jobs). BLAS threads inside the small solves of one job
    # only contend: on 2 busy cores a pruning scan took 70 s with them and 7 s without.
    with threadpool_limits(1):
        model = io.load(serialized)
        cls = pass_class(spec.pass_name)
        params = spec.params_for([layer], value)
        try:
            compression = cls(**params, seed=seed) if "seed" in init_params(cls) else cls(**params)
            compression.bind_data(calibration)
            # A pass that measures candidates itself (quantize's repairs) judges by the same metric.
            compression.bind_task_metric(judge.task_metric)
            result = compression(model)
            if not getattr(result, "modified", True):
                return Point(value, 0.0, "unchanged", error="pass changed nothing on this layer")
            candidate = judge.evaluate(model, reference)
        except Exception as exc:  # one failing layer must not stop the scan: record why
            return Point(value, None, "", error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}")
        drop, metric = metric_drop(reference, candidate)
        cost = analyze_cost(model)
        return Point(
            value, drop, metric, cost.total_params, cost.total_macs, bytes_after=storage.compacted_size(model)
        )


def init_params(cls: type) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)
