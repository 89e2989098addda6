"""Build each quantized format from one prepared float model, and time them against each other.

One `Formats` object serves one pass run: it holds the prepared float model, the calibration
and held-out samples, the layers kept float, and a scratch folder. `build(mode)` returns a new
quantized model; `latency_report()` times the result beside fp32 and the other formats.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import onnx_ir as ir

from onnxslim_tool import io
from onnxslim_tool.cost import analyze_cost, data_shapes
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.quantization.evaluation import Judge
from onnxslim_tool.quantization.gemm import gemm_to_matmul
from onnxslim_tool.quantization.ort_backend import quantize_dynamic_int8, quantize_matmul_4bits
from onnxslim_tool.quantization.probe import latencies
from onnxslim_tool.quantization.static import WEIGHTED_OPS, StaticFlow, StaticOptions, StaticOutcome
from onnxslim_tool.quantization.weight_only import (
    FOLDED,
    WEIGHT_INPUT,
    quantize_layer_weights,
    quantize_recurrent_weights,
    store_all_remaining_constants,
)

INT4_BLOCK = 32
# onnxruntime runs dynamic int8 convolutions (ConvInteger) several times slower than float
# (4.9x at batch 1, 16x at batch 64 on the sample CNN), so int8-dynamic gives convs int8 weights only.
DYNAMIC_OPS = ("MatMul", "Gemm", "Attention", "LSTM", "Gather")
# Layers computed in float store int8 weights as Cast * scale, which onnxruntime folds back to
# float when the session starts. Its constant folding deliberately skips DequantizeLinear, so
# a DequantizeLinear weight is re-expanded on every run and blocks pre-packed kernels: measured
# 5.7x slower at batch 64 on the sample CNN (NCHWc convs need constant weights), 1.2x on the
# MLP and the transformer; the folded form ran at fp32 speed on all three.
WEIGHT_FORM = FOLDED
LARGE_PROBE_BATCH = 64
# Slower than fp32 means slower beyond timing noise.
SLOWER_TOLERANCE = 1.05
# Below this fp32 latency at batch 1 a model is dominated by per-run overhead, and a large
# batch is timed as well to show the throughput picture.
SMALL_MODEL_MS = 10.0


@dataclass
class Context:
    float_model: ir.Model
    per_channel: bool
    excluded: dict[str, str]  # node name -> why it stays float
    calibration: CalibrationData | None
    holdout: CalibrationData | None
    workdir: Path
    static_options: StaticOptions
    # Every sample the pass was given; static int8 takes its final ranges from them all.
    all_data: CalibrationData | None = None


class Formats:
    def __init__(self, context: Context) -> None:
        self.context = context
        self._count = 0
        # Latency over fp32's per format, at the first probe batch; set by latency_report.
        self.first_batch_ratios: dict[str, float] = {}
        self._small: dict[str, int] | None | bool = False  # False: not decided yet

    # ----- the formats -------------------------------------------------------------------------

    def build(self, mode: str, notes: list[str]) -> ir.Model:
        builders = {
            "int8": self.static,
            "int8-dynamic": self.dynamic,
            "int8-weights": self.weights_only,
            "int4-weights": self.int4,
        }
        return builders[mode](notes)

    def static(self, notes: list[str]) -> ir.Model:
        small = self._too_small_for_int8(notes)
        if small is not None and self._every_weighted_layer_in(small):
            notes.append(
                f"every weighted layer is under {self._threshold:,} MACs per inference, where "
                "onnxruntime's int8 kernels run slower than float: int8 weights, float compute "
                "(min_layer_macs=0 quantizes activations anyway)"
            )
            return self._all_weights_only(small, notes)
        outcome = self._static_flow(self.context.static_options)
        self.context.excluded.update(outcome.excluded)
        notes.extend(outcome.notes)
        model = outcome.model
        self._int8_weights_for(model, small or {}, notes)
        before = len(notes)
        self._weights_for_the_rest(
            model, notes, "inside If/Loop bodies, which onnxruntime's quantizer skips", subgraphs_only=True
        )
        # Transformers' static int8 quantizes only the matmuls: the embedding tables (half of
        # MiniLM's bytes) would stay float. Their rows get int8 storage, folded at load.
        self._weights_for_the_rest(
            model, notes, "embedding tables the static quantizer left float", ops=("Gather",)
        )
        if outcome.fitted_score is not None:
            changed = len(notes) > before and self.context.holdout is not None
            fitted = self.score(model) if changed else outcome.fitted_score.describe()
            notes.append(f"final int8 static model, on held-out samples its ranges now include: {fitted}")
        elif len(notes) > before and self.context.holdout is not None:
            notes.append(f"final int8 static model: held-out {self.score(model)}")
        elif outcome.score is not None:
            notes.append(f"final int8 static model: held-out {outcome.score.describe()}")
        return model

    def _static_flow(self, options: StaticOptions) -> StaticOutcome:
        ctx = self.context
        options = replace(options, per_channel=ctx.per_channel, excluded=ctx.excluded)
        return StaticFlow(
            ctx.float_model,
            ctx.calibration,
            ctx.holdout,
            options,
            self._scratch("static"),
            final_data=ctx.all_data,
        ).run()

    def dynamic(self, notes: list[str]) -> ir.Model:
        ctx = self.context
        small = self._too_small_for_int8(notes) or {}
        if small and self._every_weighted_layer_in(small):
            notes.append(
                f"every weighted layer is under {self._threshold:,} MACs per inference, where "
                "quantizing activations at run time costs more than it saves: int8 weights, float compute"
            )
            return self._all_weights_only(small, notes)
        workdir = self._scratch("dynamic")
        path = workdir / "float.onnx"
        io.save(ctx.float_model, path)
        quantized = quantize_dynamic_int8(
            path,
            workdir / "dynamic.onnx",
            per_channel=ctx.per_channel,
            op_types=DYNAMIC_OPS,
            nodes_to_exclude=list(ctx.excluded),
        )
        self._int8_weights_for(quantized, small, notes)
        self._weights_for_the_rest(
            quantized, notes, "onnxruntime's dynamic int8 convolution runs several times slower"
        )
        store_all_remaining_constants(quantized)
        return quantized

    # ----- layers too small for int8 kernels ---------------------------------------------------

    def _too_small_for_int8(self, notes: list[str]) -> dict[str, int] | None:
        """Weighted layers under the MACs threshold (name -> MACs per inference), now excluded
        from activation quantization; None when the rule is off or the cost is unknown."""
        if self._small is not False:  # decided once per run: the first call excludes them
            return self._small
        ctx = self.context
        threshold = self._threshold
        self._small = None
        if not threshold:
            return None
        try:
            cost = analyze_cost(ctx.float_model, data_shapes(ctx.float_model, ctx.calibration))
        except Exception as exc:  # the rule is an optimisation: without a cost, quantize everything
            notes.append(f"layer sizes unknown ({type(exc).__name__}): every layer considered for int8")
            return None
        small = {
            layer.name: layer.macs
            for layer in cost.layers
            if layer.kind == "weight"
            and layer.op_type in WEIGHTED_OPS
            and layer.macs < threshold
            and layer.name not in ctx.excluded
        }
        for name, macs in small.items():
            ctx.excluded[name] = (
                f"{macs:,} MACs per inference: too small for int8 kernels to pay (under "
                f"{threshold:,}), int8 weights with float compute"
            )
        self._small = small
        return small

    def _all_weights_only(self, small: dict[str, int], notes: list[str]) -> ir.Model:
        for name in small:  # not kept float after all: weight-only int8 is the format now
            self.context.excluded.pop(name, None)
        return self.weights_only(notes)

    @property
    def _threshold(self) -> int:
        return self.context.static_options.min_layer_macs

    def _every_weighted_layer_in(self, small: dict[str, int]) -> bool:
        graph = self.context.float_model.graph
        weighted = [n.name for n in graph if n.op_type in WEIGHTED_OPS and _has_float_weight(n)]
        return bool(weighted) and all(name in small for name in weighted)

    def _int8_weights_for(self, model: ir.Model, small: dict[str, int], notes: list[str]) -> None:
        """The small layers' weights stored int8 (folded at load: float compute, smaller file)."""
        layers = [n for n in model.graph if n.name in small and _has_float_weight(n)]
        if not layers:
            return
        done, _ = quantize_layer_weights(
            model.graph, layers, per_channel=self.context.per_channel, form=WEIGHT_FORM
        )
        if done:
            notes.append(
                f"{len(done)} layer(s) under {self._threshold:,} MACs per inference kept float "
                "compute with int8 weights: onnxruntime's int8 kernels run slower than float at that size"
            )

    def weights_only(self, notes: list[str]) -> ir.Model:
        ctx = self.context
        model = io.load(ctx.float_model, lift_constants=False)
        stored, skipped = self._store_int8_weights(model, tuple(WEIGHT_INPUT))
        ctx.excluded.update(dict(skipped))
        kept = store_all_remaining_constants(model)
        if stored:
            notes.append(
                f"{len(stored)} weight(s) and {len(kept)} other float constant(s) (biases, norms) stored as "
                "int8 * scale; onnxruntime folds them back to float at session start, so the model runs at "
                "float speed (a DequantizeLinear would be re-run on every inference)"
            )
        return model

    def int4(self, notes: list[str]) -> ir.Model:
        ctx = self.context
        model = io.load(ctx.float_model, lift_constants=False)
        converted = gemm_to_matmul(model.graph, skip=set(ctx.excluded))
        if converted:
            notes.append(f"{converted} Gemm(s) rewritten as MatMul + Add for MatMulNBits")
        quantized = quantize_matmul_4bits(model, block_size=INT4_BLOCK, nodes_to_exclude=list(ctx.excluded))
        self._weights_for_the_rest(quantized, notes, "onnxruntime has no 4-bit kernel for them")
        store_all_remaining_constants(quantized)
        return quantized

    def _weights_for_the_rest(
        self,
        model: ir.Model,
        notes: list[str],
        why: str,
        *,
        subgraphs_only: bool = False,
        ops: tuple[str, ...] = WEIGHTED_OPS,
    ) -> None:
        """Layers of `ops` the main format left float get int8 weights (float compute).

        onnxruntime's quantizers never enter If/Loop bodies, so layers there are always "the rest".
        """
        stored, _ = self._store_int8_weights(model, ops, rest_only=True, subgraphs_only=subgraphs_only)
        if stored:
            ops = ", ".join(f"{op} x{n}" for op, n in Counter(s.op_type for s in stored).items())
            notes.append(f"{ops}: int8 weights only, float compute ({why})")

    def _store_int8_weights(
        self, model: ir.Model, ops: tuple[str, ...], *, rest_only: bool = False, subgraphs_only: bool = False
    ) -> tuple[list, list[tuple[str, str]]]:
        """Int8 weight storage (folded at load) for the float layers of `ops` not excluded, and
        for recurrent W/R, in every graph: exporters put whole networks inside If branches
        (silero VAD), where onnxruntime's quantizers never look. With `rest_only`, only layers a
        main format left with float weights are considered. Returns (stored, skipped)."""
        ctx = self.context
        stored, skipped = [], []
        for graph in model.graphs():
            if subgraphs_only and graph is model.graph:
                continue
            layers = [n for n in graph if n.op_type in ops and n.name not in ctx.excluded]
            if rest_only:
                layers = [n for n in layers if _has_float_weight(n)]
            done, left = quantize_layer_weights(graph, layers, per_channel=ctx.per_channel, form=WEIGHT_FORM)
            stored += done
            skipped += left
            stored += quantize_recurrent_weights(graph, per_channel=ctx.per_channel, excluded=ctx.excluded)
        return stored, skipped

    # ----- measurements ------------------------------------------------------------------------

    def score(self, model: ir.Model) -> str | None:
        ctx = self.context
        if ctx.holdout is None:
            return None
        return Judge(ctx.float_model, ctx.holdout, ctx.static_options.task_metric).score(model).describe()

    def latency_report(self, mode: str, result: ir.Model) -> list[str]:
        """Ratios to fp32 of the result and of the other formats; SLOWER lines when it is."""
        feeds = self.probe_feeds()
        if not feeds:
            return ["latency not measured: no held-out samples"]
        alternatives, unbuilt = self._alternatives(mode)
        candidates = {"fp32": self.context.float_model, mode: result, **alternatives}
        lines = []
        for batch, feed in feeds:
            timed = latencies(candidates, feed)
            ratios = {name: ms / timed["fp32"] for name, ms in timed.items()}
            self.first_batch_ratios = self.first_batch_ratios or ratios
            listed = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items())
            lines.append(
                f"latency vs fp32 at batch {batch} (onnxruntime CPU, 1 thread, fp32 {timed['fp32']:.3g} ms): "
                + listed
            )
            if ratios[mode] > SLOWER_TOLERANCE:
                faster = sorted(
                    (r, n) for n, r in ratios.items() if n not in (mode, "fp32") and r < ratios[mode]
                )
                hint = f"; {faster[0][1]} measured {faster[0][0]:.2f}x here" if faster else ""
                lines.append(f"SLOWER than fp32 at batch {batch}: {mode} runs {ratios[mode]:.2f}x{hint}")
            if timed["fp32"] >= SMALL_MODEL_MS:
                break  # compute-bound already at batch 1: a large batch says nothing new
        return lines + unbuilt

    def _alternatives(self, mode: str) -> tuple[dict[str, ir.Model], list[str]]:
        """The other int8 formats, built quickly (no repairs, no search) for the comparison,
        and a note for each one that could not be built (left out of the comparison)."""
        quick = StaticOptions(
            calibrator="minmax",
            equalize=False,
            bias_correction=False,
            smoothquant=False,
            activation_type="uint8",
        )
        builders: dict[str, Callable[[], ir.Model]] = {}
        if mode != "int8" and self.context.calibration is not None:
            builders["int8 (static)"] = lambda: self._static_flow(quick).model
        if mode != "int8-dynamic":
            builders["int8-dynamic"] = lambda: self.dynamic([])
        if mode != "int8-weights":
            builders["int8-weights"] = lambda: self.weights_only([])
        others: dict[str, ir.Model] = {}
        notes = []
        for name, build in builders.items():
            try:
                others[name] = build()
            except Exception as exc:  # only a comparison: onnxruntime's quantizers fail on some graphs
                reason = " ".join(str(exc).split())[:120]
                notes.append(
                    f"latency of {name} not compared: it could not be built ({type(exc).__name__}: {reason})"
                )
        return others, notes

    def probe_feeds(self) -> list[tuple[int, dict]]:
        """A batch of 1 and, when the model takes any batch size, a batch of up to 64."""
        holdout = self.context.holdout
        if holdout is None or len(holdout) == 0:
            return []
        first = next(iter(holdout.batches(1)), None)
        if first is None:  # a fixed batch larger than the held-out samples: nothing to time
            return []
        feeds = [(1 if holdout.fixed_batch is None else holdout.fixed_batch, first)]
        large = min(LARGE_PROBE_BATCH, len(holdout))
        if holdout.fixed_batch is None and not holdout.unbatched_inputs and large > 1:
            feeds.append((large, next(iter(holdout.batches(large)))))
        return feeds

    def _scratch(self, label: str) -> Path:
        self._count += 1
        path = self.context.workdir / f"{label}{self._count}"
        path.mkdir()
        return path


def _has_float_weight(node: ir.Node) -> bool:
    from onnxslim_tool.graph_utils import const_array

    index = WEIGHT_INPUT.get(node.op_type)
    weight = node.inputs[index] if index is not None and len(node.inputs) > index else None
    array = const_array(weight) if weight is not None and weight.is_initializer() else None
    return array is not None and array.dtype.kind == "f"
