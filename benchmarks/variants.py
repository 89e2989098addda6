"""The variants measured per subject: ours (one per built-in recipe) and the peers users would pick.

Each conversion runs in its own child process (see convert.py), so its wall time and peak
memory are its own. Peers run with their default settings; where a peer takes a ratio,
it gets the ratios our built-in recipes use (matched ratios).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.subject import load_feeds

REFERENCE = "fp32"
ONNXSIM_KMEANS_BITS = 4  # the only width onnxsim 0.8.1's k-means accepts
# The pruning study (detection agreement at 10/20/30% fewer MACs): our channel pruning
# aimed at a MACs fraction, the peer at the same fraction of channels. Measured on request
# (`--variants pruning`): on the large zoo models the refits take long.
PRUNING_STUDY_CUTS = (0.1, 0.2, 0.3)
STUDY = "pruning"
# Other studies (on request, named by group in `--variants`) live in their own modules:
# each exposes `variants() -> list[Variant]` (all on_request) and `NAME`, the group name.
STUDY_MODULES = ("benchmarks.studies.sharing", "benchmarks.studies.lowrank", "benchmarks.studies.extras")


@dataclass(frozen=True)
class Job:
    """One conversion: read `source`, write `target`; `calibration` is in the project's data layout."""

    source: Path
    target: Path
    feeds: Path
    calibration: Path | None
    seed: int = 0
    task_metric: str | None = None  # what our gated variants judge by (the subject's)


Convert = Callable[[Job], dict[str, Any]]  # writes job.target, returns notes for the report


@dataclass(frozen=True)
class Variant:
    name: str
    tool: str  # "reference", "onnxslim_tool", "onnxruntime", "onnxslim", "onnxsim"
    description: str
    convert: Convert | None  # None for the fp32 reference itself
    on_request: bool = False  # measured only when named (or its group is), not by default


def catalogue() -> dict[str, Variant]:
    from onnxslim_tool.recipe import BUILTIN

    variants = [Variant(REFERENCE, "reference", "the original model", None)]
    for recipe, spec in BUILTIN.items():
        variants.append(
            Variant(
                f"ours-{recipe}",
                "onnxslim_tool",
                f"recipe '{recipe}': {spec.get('description', '')}",
                partial(_ours, recipe),
            )
        )
    for mode in ("int8", "int8-dynamic"):
        variants.append(
            Variant(
                f"ours-{mode}",
                "onnxslim_tool",
                f"--quantize {mode} alone under the 1-point budget (ours, the counterpart of ort-"
                f"{'static' if mode == 'int8' else 'dynamic'})",
                partial(_ours_quantize, mode),
            )
        )
    # At equal size: every layer int8 (traps aside), no budget to keep any float, as
    # onnxruntime's defaults do; the repairs and the size rule still apply.
    variants.append(
        Variant(
            "ours-int8-full",
            "onnxslim_tool",
            "--quantize int8 with no accuracy budget (no layer kept float for accuracy): "
            "ort-static's counterpart at equal size",
            partial(_ours_quantize, "int8", budget=None),
        )
    )
    variants += [
        Variant(
            "ort-static",
            "onnxruntime",
            "onnxruntime.quantization.quantize_static, default settings, calibrated on the calibration feeds",
            _ort_static,
        ),
        Variant(
            "ort-dynamic",
            "onnxruntime",
            "onnxruntime.quantization.quantize_dynamic, default settings",
            _ort_dynamic,
        ),
        Variant("onnxslim", "onnxslim", "onnxslim.slim (graph simplification)", _onnxslim),
    ]
    for ratio in recipe_pruning_ratios():
        variants.append(
            Variant(
                f"onnxsim-prune-{round(ratio * 100)}",
                "onnxsim",
                f"onnxsim.simplify then onnxsim.apply_structured_pruning(sparsity={ratio}) "
                "(L2 importance, no data)",
                partial(_onnxsim_prune, ratio),
            )
        )
    for cut in PRUNING_STUDY_CUTS:
        pct = round(cut * 100)
        variants.append(
            Variant(
                f"ours-prune-macs-{pct}",
                "onnxslim_tool",
                f"channel pruning to {100 - pct}% of the MACs (l1 scores, refit on the calibration "
                "data, no accuracy budget), then cleanup",
                partial(_ours_prune_macs, 1.0 - cut),
                on_request=True,
            )
        )
    variants.append(
        Variant(
            "ours-prune-macs-20-round8",
            "onnxslim_tool",
            "as ours-prune-macs-20, kept channel counts rounded to multiples of 8 (faster kernels)",
            partial(_ours_prune_macs, 0.8, round_to=8),
            on_request=True,
        )
    )
    existing = {round(r * 100) for r in recipe_pruning_ratios()}
    for cut in PRUNING_STUDY_CUTS:
        if round(cut * 100) not in existing:
            variants.append(
                Variant(
                    f"onnxsim-prune-{round(cut * 100)}",
                    "onnxsim",
                    f"onnxsim.simplify then onnxsim.apply_structured_pruning(sparsity={cut}) "
                    "(L2 importance, no data)",
                    partial(_onnxsim_prune, cut),
                    on_request=True,
                )
            )
    variants.append(
        Variant(
            f"onnxsim-kmeans-{ONNXSIM_KMEANS_BITS}bit",
            "onnxsim",
            "onnxsim.simplify then onnxsim.quantize_weight_only_kmeans (4-bit codebooks)",
            _onnxsim_kmeans,
        )
    )
    for module in _study_modules():
        variants += module.variants()
    return {v.name: v for v in variants}


def _study_modules() -> list[Any]:
    import importlib

    return [importlib.import_module(name) for name in STUDY_MODULES]


def study_groups() -> dict[str, list[str]]:
    """Group name -> the variants it stands for in `--variants`."""
    groups = {STUDY: study_variants()}
    for module in _study_modules():
        groups[module.NAME] = [v.name for v in module.variants()]
    return groups


def recipe_pruning_ratios() -> list[float]:
    """The channel-pruning ratios the built-in recipes ask for: onnxsim gets the same."""
    from onnxslim_tool.recipe import BUILTIN

    ratios = {
        float(step["ratio"])
        for spec in BUILTIN.values()
        for step in spec.get("passes", [])
        if isinstance(step, dict) and step.get("pass") == "channel-pruning" and "ratio" in step
    }
    return sorted(ratios)


def study_variants() -> list[str]:
    """The pruning study: ours at each MACs cut and onnxsim at the same channel fractions."""
    pcts = [round(c * 100) for c in PRUNING_STUDY_CUTS]
    ours = [f"ours-prune-macs-{p}" for p in pcts] + ["ours-prune-macs-20-round8"]
    return ours + [f"onnxsim-prune-{p}" for p in pcts]


def resolve(selection: str | None) -> list[str]:
    table = catalogue()
    names = list(table)
    if not selection:
        return [n for n in names if not table[n].on_request]
    groups = study_groups()
    wanted = []
    for item in (s.strip() for s in selection.split(",")):
        wanted += groups.get(item, [item] if item else [])
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise ValueError(f"unknown variant '{unknown[0]}'; variants: {', '.join(names)}")
    # The reference is always measured: every ratio is relative to it.
    return [n for n in names if n in set(wanted) or n == REFERENCE]


# ----- converters (run in the child process) --------------------------------------------------------


def _ours(recipe: str, job: Job) -> dict[str, Any]:
    from onnxslim_tool import api
    from onnxslim_tool.data import CalibrationData

    data = CalibrationData.from_npz(job.calibration) if job.calibration else None
    # No eval_data: the API holds out half of the calibration set for its accuracy gate, so
    # the benchmark's own evaluation set is never seen by the compressor.
    result = api.compress(str(job.source), data, recipe=recipe, seed=job.seed, task_metric=job.task_metric)
    result.save(job.target)
    return {
        "steps": [
            {"pass": s.name, "status": s.status, "reason": s.reason, "seconds": round(s.seconds, 3)}
            for s in result.steps
        ],
        "gate_metric_before": result.accuracy_before,
        "gate_metric_after": result.accuracy_after,
    }


def _ours_quantize(mode: str, job: Job, budget: float | None = 0.01) -> dict[str, Any]:
    from onnxslim_tool import api
    from onnxslim_tool.data import CalibrationData
    from onnxslim_tool.recipe import recipe_from_flags

    data = CalibrationData.from_npz(job.calibration) if job.calibration else None
    recipe = recipe_from_flags(quantize=mode, max_drop=budget, seed=job.seed)
    # With no budget there is nothing to gate: every calibration sample goes to the pass, as
    # onnxruntime's quantizers get them all (the benchmark judges on its own evaluation data).
    eval_data = data if budget is None else None
    result = api.compress(
        str(job.source), data, recipe=recipe, eval_data=eval_data, seed=job.seed, task_metric=job.task_metric
    )
    result.save(job.target)
    return {
        "steps": [{"pass": s.name, "status": s.status, "seconds": round(s.seconds, 3)} for s in result.steps],
        "gate_metric_before": result.accuracy_before,
        "gate_metric_after": result.accuracy_after,
    }


def _ours_prune_macs(target: float, job: Job, round_to: int = 1) -> dict[str, Any]:
    from onnxslim_tool import api
    from onnxslim_tool.data import CalibrationData
    from onnxslim_tool.passes import ChannelPruning, Cleanup

    data = CalibrationData.from_npz(job.calibration) if job.calibration else None
    passes = [Cleanup(fold_batchnorm=False), ChannelPruning(target_macs=target, round_to=round_to), Cleanup()]
    # No budget to gate, so the whole calibration set fits (eval_data=data stops the API from
    # holding half of it out); the benchmark judges on its own evaluation images.
    result = api.compress(str(job.source), data, passes=passes, eval_data=data, seed=job.seed)
    result.save(job.target)
    pruning = result.steps[1]
    return {
        "steps": [{"pass": s.name, "status": s.status, "seconds": round(s.seconds, 3)} for s in result.steps],
        "notes": [n for n in pruning.record.notes if n.startswith("MACs target")] if pruning.record else [],
    }


def _ort_static(job: Job) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, feeds):
            self._feeds = iter(feeds)

        def get_next(self):
            return next(self._feeds, None)

    feeds = load_feeds(job.feeds)
    quantize_static(str(job.source), str(job.target), Reader(feeds))
    return {"calibration_feeds": len(feeds)}


def _ort_dynamic(job: Job) -> dict[str, Any]:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(job.source), str(job.target))
    return {}


def _onnxslim(job: Job) -> dict[str, Any]:
    import onnx
    import onnxslim

    onnx.save(onnxslim.slim(str(job.source)), str(job.target))
    return {}


def _onnxsim_simplified(source: Path):
    """onnxsim's own simplifier first (it folds BatchNorm, which its pruning expects); the
    unsimplified model when the simplifier refuses."""
    import onnx
    import onnxsim

    model = onnx.load(str(source))
    try:
        simplified, ok = onnxsim.simplify(model)
    except Exception as exc:  # a refusal of the peer's simplifier is a note, not a failure
        return model, f"simplify failed: {' '.join(str(exc).split())[:160]}"
    return (simplified, "simplified") if ok else (model, "simplify check failed; pruned the original")


def _onnxsim_prune(ratio: float, job: Job) -> dict[str, Any]:
    import onnx
    import onnxsim

    model, note = _onnxsim_simplified(job.source)
    onnx.save(onnxsim.apply_structured_pruning(model, sparsity=ratio), str(job.target))
    return {"simplify": note}


def _onnxsim_kmeans(job: Job) -> dict[str, Any]:
    import onnx
    import onnxsim

    model, note = _onnxsim_simplified(job.source)
    onnx.save(onnxsim.quantize_weight_only_kmeans(model, bits=ONNXSIM_KMEANS_BITS), str(job.target))
    return {"simplify": note}
