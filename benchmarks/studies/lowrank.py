"""The lowrank study (on request: `python -m benchmarks.run --variants lowrank`).

Two questions, each a set of variants:

- accuracy vs params kept: SVD with refit at ratio 0.75, 0.5 and 0.25 (`--lowrank R`: each
  factorized layer keeps at most that fraction of its weights; the whole model keeps more,
  as its size column shows: embeddings, norms and small layers stay), and once without
  refit at 0.5, which is the refit's gain;
- each conv method at matched cost: every method to 50% of the whole model's MACs, the
  per-layer ratio searched per method (the pass itself takes a params ratio, not a MACs
  target, and the methods turn a ratio into different MACs), with refit.

The search reads the pass's plans (`LowRank.planned_savings`) on the cleaned-up model, so
it factorizes nothing; the chosen ratio and the planned fraction are in each variant's notes.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from benchmarks.variants import Job, Variant

NAME = "lowrank"
PARAMS_KEPT = (0.75, 0.5, 0.25)
MACS_KEPT = 0.5
CONV_METHODS = ("svd", "spatial-svd", "cp", "tucker")
# The ratio search: a grid of this step, then this many bisection steps.
GRID_STEP = 0.05
SEARCH_STEPS = 8
REACH_TOLERANCE = 0.02


def variants() -> list[Variant]:
    out = []
    for kept in PARAMS_KEPT:
        pct = round(kept * 100)
        out.append(
            Variant(
                f"ours-lowrank-params-{pct}",
                "onnxslim_tool",
                f"low-rank at ratio {kept} (`--lowrank {kept}`: each factorized layer keeps <= {pct}% of its "
                "weights; svd for convs), refit on the calibration data, after cleanup; no accuracy budget",
                partial(convert, "ratio", kept, "svd", True),
                on_request=True,
            )
        )
    out.append(
        Variant(
            "ours-lowrank-params-50-norefit",
            "onnxslim_tool",
            "as ours-lowrank-params-50 without the data-aware refit (weight-only SVD): the refit's gain",
            partial(convert, "ratio", 0.5, "svd", False),
            on_request=True,
        )
    )
    for method in CONV_METHODS:
        pct = round(MACS_KEPT * 100)
        out.append(
            Variant(
                f"ours-lowrank-{method}-macs-{pct}",
                "onnxslim_tool",
                f"low-rank, convs by {method} (Gemm/MatMul by SVD), with refit; per-layer ratio searched "
                f"so the model keeps about {pct}% of its MACs (the pass takes a params ratio)",
                partial(convert, "macs", MACS_KEPT, method, True),
                on_request=True,
            )
        )
    return out


def convert(kind: str, kept: float, method: str, refit: bool, job: Job) -> dict[str, Any]:
    """Clean up, take `kept` as the per-layer ratio (kind "ratio") or search the ratio that
    keeps `kept` of the model's params or MACs, then compress with it on the whole
    calibration set (no budget to gate: the benchmark judges on its own evaluation set)."""
    from onnxslim_tool import api, io
    from onnxslim_tool.data import CalibrationData
    from onnxslim_tool.passes import Cleanup, LowRank

    data = CalibrationData.from_npz(job.calibration) if job.calibration else None
    cleaned = io.load(str(job.source))
    Cleanup()(cleaned)
    ratio, planned = (kept, None) if kind == "ratio" else search_ratio(cleaned, kind, kept, method)
    passes = [Cleanup(), LowRank(ratio=ratio, method=method, refit=refit, seed=job.seed)]
    result = api.compress(str(job.source), data, passes=passes, eval_data=data, seed=job.seed)
    result.save(job.target)
    record = result.steps[1].record
    notes = [n for n in record.notes if "weight-only ->" in n] if record else []
    return {
        "steps": [{"pass": s.name, "status": s.status, "seconds": round(s.seconds, 3)} for s in result.steps],
        "ratio": round(ratio, 4),
        **({} if planned is None else {f"planned {kind} fraction": round(planned, 4)}),
        "layers factorized": len(record.changes) if record else 0,
        "refit notes": notes[:3] + ([f"... {len(notes) - 3} more"] if len(notes) > 3 else []),
    }


def search_ratio(model, kind: str, kept: float, method: str) -> tuple[float, float]:
    """The largest per-layer ratio whose planned whole-model `kind` fraction is <= `kept`,
    and that fraction (when no ratio gets that low, the mildest one that comes close to the
    lowest reachable fraction).

    The fraction is not monotone in the ratio at the low end (a layer whose rank 1 is over
    its budget is skipped, so it saves nothing): a coarse grid first, then bisection
    between the grid point found and the next one.
    """
    from onnxslim_tool.cost import analyze_cost
    from onnxslim_tool.passes import LowRank

    cost = analyze_cost(model)
    total = cost.total_params if kind == "params" else cost.total_macs

    def fraction(ratio: float) -> float:
        saved = LowRank(ratio=ratio, method=method, refit=False).planned_savings(model)
        return (total - saved[0 if kind == "params" else 1]) / total

    grid = {round(GRID_STEP * i, 4): 0.0 for i in range(1, round(1 / GRID_STEP) + 1)}
    for ratio in grid:
        grid[ratio] = fraction(ratio)
    below = [r for r, f in grid.items() if f <= kept]
    if not below:
        # Out of reach (e.g. spatial SVD and CP leave ResNet's 1x1 convs alone): the mildest
        # ratio that comes within REACH_TOLERANCE of the lowest fraction any ratio gives.
        floor = min(grid.values())
        mildest = max(r for r, f in grid.items() if f <= floor + REACH_TOLERANCE)
        return mildest, grid[mildest]
    low, high = max(below), min(1.0, max(below) + GRID_STEP)
    for _ in range(SEARCH_STEPS):
        middle = (low + high) / 2
        if fraction(middle) <= kept:
            low = middle
        else:
            high = middle
    return low, fraction(low)
