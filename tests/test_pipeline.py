"""The pass runner: validation after every pass, rollback, back-off under a budget."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool import api
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.errors import DataError
from onnxslim_tool.graph_utils import const_array
from onnxslim_tool.passes.base import CompressionPass, PassRecord
from onnxslim_tool.passes.normalize import Cleanup
from onnxslim_tool.pipeline import Pipeline


def _classifier() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Identity", ["r"], ["r2"]),
            helper.make_node("MatMul", ["r2", "w2"], ["y"], name="fc2"),
        ],
        "clf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [w1, w2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _data(n: int = 64, seed: int = 0) -> CalibrationData:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    model = ir.from_proto(_classifier())
    # labels = the model's own predictions, so the original scores 100%
    from onnxslim_tool.runtime import run_model

    y = run_model(model, [{"x": x}])["y"].argmax(1)
    return CalibrationData.from_arrays({"x": x}, labels=y).validate(model)


class ScaleWeights(CompressionPass):
    """Lossy test pass: adds noise of a given size to fc2's weight; milder halves it."""

    name = "noise"

    def __init__(self, noise: float, lossless: bool = False) -> None:
        super().__init__()
        self.noise = noise
        self.lossless = lossless

    def rewrite(self, model: ir.Model, record: PassRecord) -> None:
        value = model.graph.initializers["w2"]
        w = const_array(value)
        rng = np.random.default_rng(1)
        value.const_value = ir.tensor(
            (w + self.noise * rng.standard_normal(w.shape)).astype(np.float32), name="w2"
        )
        record.changed("fc2", "MatMul", f"noise {self.noise}")

    def milder(self) -> CompressionPass | None:
        return ScaleWeights(self.noise / 4) if self.noise > 1e-3 else None


class BreaksModel(CompressionPass):
    name = "breaks"

    def rewrite(self, model: ir.Model, record: PassRecord) -> None:
        node = next(n for n in model.graph if n.op_type == "Relu")
        node.op_type = "NoSuchOp"
        record.changed(node.name or "relu", "Relu", "renamed to an unknown op")


class Raises(CompressionPass):
    name = "raises"

    def rewrite(self, model: ir.Model, record: PassRecord) -> None:
        raise RuntimeError("bug in pass")


class MakesNaN(CompressionPass):
    name = "nan"

    def rewrite(self, model: ir.Model, record: PassRecord) -> None:
        value = model.graph.initializers["w2"]
        w = const_array(value).copy()
        w[0, 0] = np.nan
        value.const_value = ir.tensor(w, name="w2")
        record.changed("fc2", "MatMul", "nan")


def _run(passes, max_drop=None):
    model = ir.from_proto(_classifier())
    return model, Pipeline(passes, _data(), max_drop=max_drop).run(model)


def test_lossless_cleanup_applied_and_input_untouched():
    model, result = _run([Cleanup()])
    assert result.steps[0].status == "applied"
    assert "Identity" in [n.op_type for n in model.graph]  # the caller's model is never mutated
    assert "Identity" not in [n.op_type for n in result.model.graph]
    assert result.max_output_difference == 0.0
    assert result.accuracy_before == result.accuracy_after == 1.0


@pytest.mark.parametrize(
    ("bad_pass", "fragment"),
    [
        (BreaksModel(), "onnx checker"),
        (Raises(), "pass failed: RuntimeError"),
        (MakesNaN(), "NaN/Inf"),
        (ScaleWeights(0.5, lossless=True), "lossless pass changed output"),
    ],
)
def test_failing_pass_is_rolled_back_with_reason(bad_pass, fragment):
    _, result = _run([bad_pass, Cleanup()])
    first, second = result.steps
    assert first.status == "rolled back"
    assert fragment in first.reason
    assert second.status == "applied"
    np.testing.assert_array_equal(
        const_array(result.model.graph.initializers["w2"]),
        numpy_helper.to_array(_classifier().graph.initializer[1]),
    )


def test_budget_backs_off_to_milder_pass():
    _, result = _run([ScaleWeights(4.0)], max_drop=0.02)
    step = result.steps[0]
    assert step.status == "backed off"
    assert step.attempts and "accuracy dropped" in step.attempts[0]
    assert result.accuracy_before - result.accuracy_after <= 0.02


def test_budget_rolls_back_when_no_milder_pass_fits():
    class NoMilder(ScaleWeights):
        def milder(self):
            return None

    _, result = _run([NoMilder(4.0)], max_drop=0.0)
    assert result.steps[0].status == "rolled back"
    assert "budget" in result.steps[0].reason
    assert result.over_budget == [result.steps[0]]
    assert result.accuracy_after == result.accuracy_before


def test_noop_pass_recorded():
    class Nothing(CompressionPass):
        name = "nothing"

        def rewrite(self, model, record):
            record.skip("fc1", "nothing to do here")

    _, result = _run([Nothing()])
    assert result.steps[0].status == "no-op"
    assert result.steps[0].record.skipped[0].reason == "nothing to do here"


def test_api_lossless_without_data_uses_labelled_synthetic_inputs():
    result = api.compress(_classifier())
    assert result.synthetic_data and "synthetic" in result.data_source
    assert result.model.metadata_props["onnxslim_tool.version"]


def test_api_lossy_without_data_refused():
    with pytest.raises(DataError, match="needs data"):
        api.compress(_classifier(), passes=[ScaleWeights(0.1)])


def test_api_splits_data_so_evaluation_never_sees_calibration():
    seen = {}

    class NeedsData(ScaleWeights):
        uses_data = True

        def rewrite(self, model, record):
            seen["calibration"] = self.calibration
            super().rewrite(model, record)

    data = _data(40)
    result = api.compress(_classifier(), data, passes=[NeedsData(0.01)])
    calib = seen["calibration"]
    assert len(calib) + result.eval_samples == 40
    calib_rows = {row.tobytes() for row in calib.inputs["x"]}
    assert calib_rows and len(calib_rows) == len(calib)
    assert result.steps[0].status == "applied"


def test_drop_far_over_budget_skips_milder_settings_that_cannot_fit():
    tried = []

    class Counted(ScaleWeights):
        def rewrite(self, model, record):
            tried.append(self.noise)
            super().rewrite(model, record)

        def milder(self):
            return Counted(self.noise / 2) if self.noise > 0.01 else None

    _, result = _run([Counted(8.0)], max_drop=0.01)
    step = result.steps[0]
    halvings = len([n for n in tried if n < 8.0])
    every = 0
    noise = 8.0
    while noise > 0.01:
        noise, every = noise / 2, every + 1
    assert halvings < every  # settings were skipped, not all tried
    assert any("skipped untried" in a for a in step.attempts)
    assert result.accuracy_before - result.accuracy_after <= 0.01 or step.status == "rolled back"


@pytest.mark.parametrize(("drop", "budget", "skips"), [(0.02, 0.01, 0), (0.03, 0.01, 1), (0.25, 0.01, 3)])
def test_backoff_skips_grow_with_the_overrun(drop, budget, skips):
    from onnxslim_tool.pipeline import _backoff_skips

    assert _backoff_skips(drop, budget) == skips
    assert _backoff_skips(drop, 0.0) == 0


def test_macs_are_counted_at_the_data_shape_where_the_model_leaves_dims_symbolic():
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    data = CalibrationData({"x": np.ones((6, 7, 4), np.float32)})
    result = api.compress(model, data)
    assert result.before.macs == 7 * 4 * 3  # one sample of 7 steps, not a sequence of 1
    assert result.to_dict()["macs_input_shapes"] == {"x": [1, 7, 4]}


def test_backoff_stops_when_the_measured_shrink_cannot_reach_the_budget():
    tried = []

    class Creeping(ScaleWeights):
        """Each milder setting removes only 3% of the noise: the drop hardly moves."""

        def rewrite(self, model, record):
            tried.append(self.noise)
            super().rewrite(model, record)

        def milder(self):
            return Creeping(self.noise * 0.97) if self.noise > 1.0 else None

    _, result = _run([Creeping(8.0)], max_drop=0.01)
    step = result.steps[0]
    assert step.status == "rolled back" and step.over_budget
    assert len(tried) == 2  # the second drop showed the chain's mildest setting would still miss
    assert any(a.startswith("not retried: the drop shrank") for a in step.attempts), step.attempts
