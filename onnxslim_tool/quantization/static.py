"""Static int8 (QDQ) quantization with measured repairs and mixed precision.

The flow, each step measured on held-out calibration samples against the float model:
calibrate once per float variant (ranges cached), pick the activation type by a latency
probe, decide whether the float constants nobody quantized (biases, norm parameters) are
stored int8 or left float, try cross-layer equalization, SmoothQuant and bias correction
(each kept only when it lowers the output error, or with a task metric bound, when it raises
that metric or ties it with a lower error), then keep the most sensitive layers float until
the budget holds. The decisions made, the final model's ranges come from every sample the flow was given
(`final_data`: the calibration and held-out halves together), as onnxruntime's own static
quantizer would use them: ranges fitted on twice the samples usually cover the data better.
Not always: min/max ranges widen with every sample, so when the recalibrated model scores
lower even on the held-out samples its ranges now include, the calibration half's ranges stay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import onnx_ir as ir

from onnxslim_tool import io
from onnxslim_tool.cost import analyze_cost
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.graph_utils import const_array
from onnxslim_tool.quantization import bias_correction, equalize, mixed_precision, smoothquant, tails
from onnxslim_tool.quantization.calibration import Calibration, calibrate
from onnxslim_tool.quantization.evaluation import COSINE, METRIC_TIE, Judge, Score
from onnxslim_tool.quantization.ort_backend import StaticSettings, quantize_static_qdq, write_ranges
from onnxslim_tool.quantization.probe import cpu_has_vnni, latencies
from onnxslim_tool.quantization.weight_only import store_all_remaining_constants
from onnxslim_tool.task_metrics import TaskMetric

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# MatMul-heavy models (transformers, MLPs): quantize the matmuls' inputs and weights and keep
# their outputs float (onnxruntime fuses that into MatMulIntegerToFloat); elsewhere onnxruntime
# keeps int8 flowing between ops (QLinearConv -> QLinearAdd -> ...), so every op it can is quantized.
MATMUL_PROFILE_OPS = ("MatMul", "Gemm", "Conv")
MATMUL_HEAVY_SHARE = 0.5
INT8_MARGIN = 0.9
# Below this many MACs per inference a layer runs slower in onnxruntime's int8 kernels than in
# float: the quantize and dequantize around it cost more than the integer product saves.
# Measured one layer at a time at batch 1 on a 2-core EPYC (1 thread, QDQ uint8/int8 vs fp32):
# Conv 37k MACs 1.21x, Conv 452k 0.83x, Conv 1.8M 0.50x; MatMul 4k 1.32x, 131k 1.03x, 524k
# 0.76x, 4.7M 0.39x. The sample models' layers are all under it (17k-147k MACs), and their
# static int8 ran 1.07-1.26x slower than fp32; MiniLM's (4.7M at 32 tokens) and the CNNs' are over it.
MIN_INT8_LAYER_MACS = 262_144
CLEAR_ERROR_GAIN = 0.9


@dataclass
class StaticOptions:
    calibrator: str = "minmax"
    per_channel: bool = True
    bias_correction: bool = True
    equalize: bool = True
    smoothquant: bool | None = None
    max_drop: float | None = None
    activation_type: str = "auto"
    # Weighted layers under this many MACs per inference keep float compute; 0: no such rule.
    min_layer_macs: int = MIN_INT8_LAYER_MACS
    excluded: dict[str, str] = field(default_factory=dict)  # node name -> reason kept float
    # The pipeline's task metric: every decision below is judged by it when set.
    task_metric: TaskMetric | None = None


@dataclass
class Variant:
    """A float model ready to quantize: its file and its cached activation ranges."""

    model: ir.Model
    path: Path
    ranges_path: Path
    calibration: Calibration
    label: str


@dataclass
class StaticOutcome:
    model: ir.Model
    settings: StaticSettings
    score: Score | None
    excluded: dict[str, str]
    notes: list[str]
    # Set when the final ranges include the held-out samples: its score there (biased upward).
    fitted_score: Score | None = None


class StaticFlow:
    def __init__(
        self,
        float_model: ir.Model,
        calibration: CalibrationData,
        holdout: CalibrationData,
        options: StaticOptions,
        workdir: Path,
        final_data: CalibrationData | None = None,
    ) -> None:
        self.float_model = float_model
        self.calibration = calibration
        self.holdout = holdout
        self.final_data = final_data
        self.options = options
        self.workdir = workdir
        self.notes: list[str] = []
        self.excluded = dict(options.excluded)
        self.judge = Judge(float_model, holdout, options.task_metric)
        self._count = 0
        # Float constants nobody quantized (biases, norm parameters) stored int8 too; measured
        # below, because their rounding feeds every activation of a deep net (DenseNet121).
        self.store_constants = True

    # ----- building blocks ---------------------------------------------------------------------

    def variant(
        self,
        model: ir.Model,
        label: str,
        ranges_from: Variant | None = None,
        data: CalibrationData | None = None,
    ) -> Variant:
        """Write `model`; calibrate it (on `data`, else the calibration half), or reuse the
        ranges of `ranges_from`."""
        path = self.workdir / f"{label}.onnx"
        io.save(model, path)
        if ranges_from is not None:
            return Variant(model, path, ranges_from.ranges_path, ranges_from.calibration, label)
        source = data if data is not None else self.calibration
        result = calibrate(path, source, self.options.calibrator, self.workdir)
        ranges = write_ranges(result, self.workdir / f"{label}_ranges.json")
        return Variant(model, path, ranges, result, label)

    def quantize(self, variant: Variant, settings: StaticSettings) -> ir.Model:
        self._count += 1
        out = self.workdir / f"q{self._count}.onnx"
        quantized = quantize_static_qdq(
            variant.path, variant.ranges_path, self.options.calibrator, settings, out
        )
        out.unlink(missing_ok=True)
        if self.store_constants:
            store_all_remaining_constants(quantized)
        return quantized

    # ----- the flow ----------------------------------------------------------------------------

    def run(self) -> StaticOutcome:
        best = self.variant(self.float_model, "float")
        self.notes.append(best.calibration.describe())
        if self.judge.task_metric is not None:
            self.notes.append(
                f"decisions judged by {self.judge.metric_name} against the float model "
                "(held-out output error breaks ties)"
            )
        settings = self.initial_settings(best)
        settings = self.choose_activation_type(best, settings)
        score = self.judge.score(self.quantize(best, settings))
        self.notes.append(f"int8 static: held-out {score.describe()}")
        # Decided first, so that every repair is judged in the storage the result will have.
        score = self.try_float_constants(best, settings, score)
        if self.options.equalize:
            best, score = self.try_equalization(best, settings, score)
        if self._smoothquant_wanted():
            best, score = self.try_smoothquant(best, settings, score)
        if self.options.bias_correction:
            best, score = self.try_bias_correction(best, settings, score)
        if self.options.max_drop is not None:
            settings, score = self.mixed_precision(best, settings, score)
        recalibrated = self.recalibrated(best)
        if recalibrated is None:
            return StaticOutcome(self.quantize(best, settings), settings, score, self.excluded, self.notes)
        candidate = self.quantize(recalibrated, settings)
        fitted = self.judge.score(candidate)
        # Scored on samples its ranges were fitted to, the recalibrated model has the edge; when
        # it loses even so, the wider min/max ranges of more samples cost more resolution than
        # their coverage gains (DenseNet121: held-out centred cosine 0.418 -> 0.387), and on
        # unseen data they would do no better: the calibration half's ranges stay.
        if not self.judge.better(fitted, score):
            self.notes.append(
                f"ranges from all samples score {fitted.describe()} even on the held-out samples they "
                f"include, against {score.describe()} with the calibration half's: those stay"
            )
            return StaticOutcome(self.quantize(best, settings), settings, score, self.excluded, self.notes)
        return StaticOutcome(candidate, settings, None, self.excluded, self.notes, fitted_score=fitted)

    def recalibrated(self, best: Variant) -> Variant | None:
        """`best` with ranges from every sample in `final_data`, when that is more than it had."""
        data = self.final_data
        if data is None or len(data) <= best.calibration.samples:
            return None
        variant = self.variant(best.model, "final", data=data)
        self.notes.append(
            f"ranges recalibrated on all {len(data)} samples (held-out ones included; every score "
            f"above used ranges from {best.calibration.samples})"
        )
        return variant

    def initial_settings(self, variant: Variant) -> StaticSettings:
        for node in variant.model.graph:
            if node.op_type == "MatMul" and const_array(node.inputs[1]) is None:
                self.excluded.setdefault(node.name, "MatMul of two activations kept float: it has no weight")
        found = tails.heterogeneous_tails(variant.model, variant.calibration.ranges)
        for tail in found + tails.probability_tails(variant.model):
            for name in tail.nodes:
                self.excluded.setdefault(name, f"kept float: {tail.reason}")
            self.notes.append(f"float tail: {tail.reason}")
        profile = (
            {"op_types": MATMUL_PROFILE_OPS, "float_output_ops": ("MatMul", "Gemm")}
            if self.matmul_heavy
            else {}
        )
        reduce_range = cpu_has_vnni() is False
        if reduce_range:
            self.notes.append(
                "CPU without VNNI: weights use 7 bits (reduce_range) to avoid u8 x s8 saturation"
            )
        return StaticSettings(
            activation_type="uint8"
            if self.options.activation_type == "auto"
            else self.options.activation_type,
            per_channel=self.options.per_channel,
            reduce_range=reduce_range,
            nodes_to_exclude=tuple(self.excluded),
            **profile,
        )

    @cached_property
    def matmul_heavy(self) -> bool:
        return matmul_share(self.float_model) >= MATMUL_HEAVY_SHARE

    def choose_activation_type(self, variant: Variant, settings: StaticSettings) -> StaticSettings:
        if self.options.activation_type != "auto":
            return settings
        candidates = {
            kind: self.quantize(variant, replace(settings, activation_type=kind))
            for kind in ("uint8", "int8")
        }
        timed = latencies({"fp32": variant.model, **candidates}, self.probe_feed())
        # uint8 unless int8 is clearly faster: asymmetric uint8 fits post-ReLU ranges better,
        # and a margin keeps the choice stable from run to run.
        chosen = "int8" if timed["int8"] < INT8_MARGIN * timed["uint8"] else "uint8"
        self.notes.append(
            "activation type by latency probe (batch 1): "
            + ", ".join(f"{name} {ms:.3f} ms" for name, ms in timed.items())
            + f" -> {chosen}"
        )
        if chosen == "int8" and self.judge.task_metric is not None:
            # Speed must not cost the task: int8 only when the task metric holds up as well.
            scores = {kind: self.judge.score(model) for kind, model in candidates.items()}
            if scores["int8"].metric < scores["uint8"].metric:
                chosen = "uint8"
                self.notes.append(
                    f"int8 activations score lower on {self.judge.metric_name} "
                    f"({scores['int8'].metric:.4f} vs uint8 {scores['uint8'].metric:.4f}): uint8 kept"
                )
        return replace(settings, activation_type=chosen)

    def try_equalization(
        self, best: Variant, settings: StaticSettings, score: Score
    ) -> tuple[Variant, Score]:
        candidate = io.load(best.model, lift_constants=False)
        done, _skipped = equalize.equalize(candidate.graph)
        if not done:
            self.notes.append("cross-layer equalization: no Conv/Gemm -> ReLU -> Conv/Gemm pairs found")
            return best, score
        variant = self.variant(candidate, "equalized")
        return self._keep_if_better(
            "cross-layer equalization", f"{len(done)} pair(s)", best, variant, settings, score
        )

    def try_smoothquant(self, best: Variant, settings: StaticSettings, score: Score) -> tuple[Variant, Score]:
        candidate = io.load(best.model, lift_constants=False)
        done = smoothquant.smooth(candidate.graph, best.model, self.calibration.batches(8))
        if not done:
            self.notes.append("SmoothQuant: no LayerNormalization feeding only MatMul/Gemm weights")
            return best, score
        variant = self.variant(candidate, "smoothed")
        spread = max(d.activation_spread_before for d in done), max(d.activation_spread_after for d in done)
        what = f"{len(done)} site(s), activation channel spread {spread[0]:.1f}x -> {spread[1]:.1f}x"
        return self._keep_if_better("SmoothQuant", what, best, variant, settings, score)

    def try_bias_correction(
        self, best: Variant, settings: StaticSettings, score: Score
    ) -> tuple[Variant, Score]:
        layers = [
            n.name for n in best.model.graph if n.op_type in WEIGHTED_OPS and n.name not in self.excluded
        ]
        quantized = self.quantize(best, settings)
        corrected, done, _skipped = bias_correction.correct_biases(
            best.model, quantized, layers, self.calibration
        )
        if not done:
            self.notes.append("bias correction: no quantized layer has a bias to correct")
            return best, score
        variant = self.variant(corrected, "bias_corrected", ranges_from=best)
        what = f"{len(done)} layer(s), mean |shift| up to {max(d.mean_abs_shift for d in done):.3g}"
        return self._keep_if_better("bias correction", what, best, variant, settings, score)

    def try_float_constants(self, best: Variant, settings: StaticSettings, score: Score) -> Score:
        """Keep the remaining float constants float when storing them int8 costs accuracy."""
        self.store_constants = False
        try:
            new = self.judge.score(self.quantize(best, settings))
        finally:
            self.store_constants = True
        if new.metric == score.metric and new.rel_error == score.rel_error:
            return score  # nothing was stored, or nothing it stored mattered
        # Int8 storage saves bytes, so float must earn its place: a metric gain beyond a tie,
        # or where the metric is output cosine, an output error at least 10% lower.
        if self.judge.metric_name == COSINE:
            keep_float = new.rel_error < CLEAR_ERROR_GAIN * score.rel_error
        else:
            keep_float = new.metric > score.metric + METRIC_TIE
        self.store_constants = not keep_float
        self.notes.append(
            "other float constants (biases, norm parameters) int8: held-out output error "
            f"{score.rel_error:.4f} with them int8, {new.rel_error:.4f} float; {score.metric_name} "
            f"{score.metric:.4f} vs {new.metric:.4f}: " + ("kept float" if keep_float else "stored int8")
        )
        return new if keep_float else score

    def _keep_if_better(
        self,
        repair: str,
        what: str,
        best: Variant,
        candidate: Variant,
        settings: StaticSettings,
        score: Score,
    ) -> tuple[Variant, Score]:
        new = self.judge.score(self.quantize(candidate, settings))
        kept = self.judge.better(new, score)
        self.notes.append(
            f"{repair} ({what}): held-out output error {score.rel_error:.4f} -> {new.rel_error:.4f}, "
            f"{score.metric_name} {score.metric:.4f} -> {new.metric:.4f}: "
            + ("kept" if kept else "not kept (no gain)")
        )
        return (candidate, new) if kept else (best, score)

    def mixed_precision(
        self, best: Variant, settings: StaticSettings, score: Score
    ) -> tuple[StaticSettings, Score]:
        layers = [
            n.name for n in best.model.graph if n.op_type in WEIGHTED_OPS and n.name not in self.excluded
        ]

        def quantize(only: Sequence[str], exclude: Sequence[str]) -> ir.Model:
            trial = replace(
                settings,
                nodes_to_quantize=tuple(only),
                nodes_to_exclude=settings.nodes_to_exclude + tuple(exclude),
            )
            return self.quantize(best, trial)

        result = mixed_precision.search(layers, quantize, self.judge, self.options.max_drop)
        for cost in result.kept_float:
            self.excluded[cost.layer] = f"kept float by mixed precision: {cost.describe()}"
        status = "met" if result.met else "NOT met even with every ranked layer float"
        self.notes.append(
            f"mixed precision (budget {self.options.max_drop:.4f} {self.judge.metric_name} drop, "
            "held-out): "
            f"drop {result.drop_before:.4f} -> {result.drop_after:.4f}, {len(result.kept_float)} layer(s) "
            f"kept float, budget {status}"
        )
        if not result.kept_float:
            return settings, score
        settings = replace(settings, nodes_to_exclude=tuple(self.excluded))
        return settings, self.judge.score(self.quantize(best, settings))

    def _smoothquant_wanted(self) -> bool:
        if self.options.smoothquant is None:
            return self.matmul_heavy
        return self.options.smoothquant

    def probe_feed(self) -> dict:
        return next(iter(self.holdout.batches(1)))


def matmul_share(model: ir.Model) -> float:
    """Fraction of the model's MACs spent in MatMul/Gemm with a constant weight."""
    try:
        cost = analyze_cost(model)
    except Exception:
        return 0.0
    total = sum(layer.macs for layer in cost.layers)
    dense = sum(
        layer.macs for layer in cost.layers if layer.op_type in ("MatMul", "Gemm") and layer.kind == "weight"
    )
    return dense / total if total else 0.0
