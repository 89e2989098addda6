"""Block dropping: residual candidates found, costed on data, cheapest dropped whole."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_tool import api, io, runtime
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.errors import DataError
from onnxslim_tool.passes.block_dropping import BlockDropping, find_blocks, macs_by_node
from onnxslim_tool.passes.normalize import Cleanup
from onnxslim_tool.recipe import Recipe, recipe_from_flags
from onnxslim_tool.testing import light_models, with_random_weights
from tests.test_cli import run_cli

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
TRANSFORMER = SAMPLES / "digits_transformer.onnx"
RNG = np.random.default_rng(0)


def _proto(nodes, inits, outputs=(("y", [None, 4]),), x_shape=(None, 8)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _branch(prefix: str, src: str, scale: float, inits: dict) -> list:
    """src -> Gemm -> Relu -> Gemm (second weight times `scale`) -> {prefix}_out."""
    inits[f"{prefix}_w1"] = RNG.standard_normal((8, 16)) / 3
    inits[f"{prefix}_w2"] = RNG.standard_normal((16, 8)) / 4 * scale
    return [
        helper.make_node("Gemm", [src, f"{prefix}_w1"], [f"{prefix}_h"], name=f"{prefix}_fc1"),
        helper.make_node("Relu", [f"{prefix}_h"], [f"{prefix}_r"], name=f"{prefix}_relu"),
        helper.make_node("Gemm", [f"{prefix}_r", f"{prefix}_w2"], [f"{prefix}_out"], name=f"{prefix}_fc2"),
    ]


def _two_blocks(quiet_scale: float = 1e-4) -> onnx.ModelProto:
    """x -> A (branch weights ~0) -> B (normal) -> head; A must be the cheapest."""
    inits: dict = {"wh": RNG.standard_normal((8, 4))}
    nodes = _branch("a", "x", quiet_scale, inits)
    nodes.append(helper.make_node("Add", ["x", "a_out"], ["h1"], name="block_a"))
    nodes += _branch("b", "h1", 1.0, inits)
    nodes.append(helper.make_node("Add", ["b_out", "h1"], ["h2"], name="block_b"))
    nodes.append(helper.make_node("Gemm", ["h2", "wh"], ["y"], name="head"))
    return _proto(nodes, inits)


def _data(proto: onnx.ModelProto, n: int = 64, seed: int = 1) -> CalibrationData:
    x = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    return CalibrationData.from_arrays({"x": x}).validate(io.load(proto))


def _run(proto, passes, data=None, **kwargs):
    data = data or _data(proto)
    return api.compress(proto, data, passes=passes, eval_data=_data(proto, 32, seed=2), **kwargs)


def _blocks(model: ir.Model):
    return find_blocks(model, macs_by_node(model))


def test_near_zero_branch_is_cheapest_and_dropped_leaving_the_skip():
    proto = _two_blocks()
    dropping = BlockDropping(drop_blocks=1, joint=0)
    result = _run(proto, [dropping])
    step = result.steps[0]
    assert step.status == "applied"
    assert [c.layer for c in step.record.changes] == ["block_a"]
    assert [c.name for c in dropping.ranking] == ["block_a", "block_b"]
    assert dropping.ranking[0].cosine > 0.9999 and dropping.ranking[0].dropped
    assert any("block_b" in n and "MACs" in n for n in step.record.notes)
    graph = result.model.graph
    nodes = {n.name: n for n in graph}
    assert "a_fc1" not in nodes and "block_a" not in nodes
    # Block B now reads the graph input directly: the skip took the block's place.
    assert nodes["block_b"].inputs[1] is graph.inputs[0]
    assert result.fidelity[0].cosine > 0.9999
    assert result.after.macs < result.before.macs


def test_branch_tensor_read_outside_the_block_is_skipped_with_a_reason():
    inits: dict = {"wh": RNG.standard_normal((8, 4))}
    nodes = _branch("a", "x", 1.0, inits)
    nodes.append(helper.make_node("Add", ["x", "a_out"], ["h1"], name="block_a"))
    nodes.append(helper.make_node("Gemm", ["h1", "wh"], ["y"], name="head"))
    proto = _proto(nodes, inits, outputs=(("y", [None, 4]), ("a_r", [None, 16])))
    blocks, refused = _blocks(io.load(proto))
    assert not blocks
    assert refused == [("block_a", "branch tensor 'a_r' is a graph output")]
    nodes.append(helper.make_node("ReduceSum", ["a_h"], ["side"], name="tap", keepdims=1))
    nodes.append(helper.make_node("Add", ["y0", "side"], ["y"], name="mix"))
    nodes[-3] = helper.make_node("Gemm", ["h1", "wh"], ["y0"], name="head")
    result = _run(_proto(nodes, inits), [BlockDropping(drop_blocks=1)])
    assert result.steps[0].status == "no-op"
    reasons = {s.layer: s.reason for s in result.steps[0].record.skipped}
    assert reasons["block_a"] == "branch tensor 'a_h' also feeds 'tap' outside the block"


def test_skip_that_would_broadcast_is_refused():
    inits = {"w": RNG.standard_normal((8, 8))}
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], name="mean", axes=[1], keepdims=1),
        helper.make_node("Gemm", ["x", "w"], ["g"], name="fc"),
        helper.make_node("Add", ["m", "g"], ["y"], name="join"),
    ]
    proto = _proto(nodes, inits, outputs=(("y", [None, 8]),))
    result = _run(proto, [BlockDropping(drop_blocks=1)])
    reasons = {s.layer: s.reason for s in result.steps[0].record.skipped}
    assert reasons["join"] == "skip shape [16, 1] differs from the block's [16, 8]"


def test_nested_blocks_dropping_the_outer_removes_the_inner():
    inits: dict = {"wh": RNG.standard_normal((8, 4)), "wo1": RNG.standard_normal((8, 8)) / 3}
    inits["wo2"] = RNG.standard_normal((8, 8)) * 1e-5
    nodes = [helper.make_node("Gemm", ["x", "wo1"], ["o1"], name="outer_fc1")]
    nodes += _branch("in", "o1", 1.0, inits)
    nodes.append(helper.make_node("Add", ["o1", "in_out"], ["o2"], name="inner"))
    nodes.append(helper.make_node("Gemm", ["o2", "wo2"], ["o3"], name="outer_fc2"))
    nodes.append(helper.make_node("Add", ["x", "o3"], ["h"], name="outer"))
    nodes.append(helper.make_node("Gemm", ["h", "wh"], ["y"], name="head"))
    proto = _proto(nodes, inits)
    blocks, _ = _blocks(io.load(proto))
    by_name = {b.name: b for b in blocks}
    assert set(by_name) == {"inner", "outer"}
    assert by_name["inner"].node in by_name["outer"].nodes
    dropping = BlockDropping(drop_blocks=2, joint=0)
    result = _run(proto, [dropping])
    assert [c.layer for c in result.steps[0].record.changes] == ["outer"]
    assert {n.name for n in result.model.graph} == {"head"}


def test_transformer_sub_blocks_are_candidates_and_labels_rank_them():
    model = io.load(TRANSFORMER)
    calibration = CalibrationData.from_npz(SAMPLES / "digits_transformer_calib.npz").validate(model)
    evaluation = CalibrationData.from_npz(SAMPLES / "digits_transformer_eval.npz").validate(model)
    blocks, _ = _blocks(model)
    names = sorted(b.name for b in blocks)
    assert names == [f"/blocks/blocks.{i}/{a}" for i in (0, 1) for a in ("Add", "Add_2")]
    attention = next(b for b in blocks if b.name == "/blocks/blocks.0/Add")
    assert {"Softmax", "LayerNormalization"} <= {n.op_type for n in attention.nodes}
    dropping = BlockDropping(target_macs=0.8)
    result = api.compress(model, calibration, passes=[Cleanup(), dropping], eval_data=evaluation)
    assert result.steps[1].status == "applied"
    assert all(c.metric == "accuracy" for c in dropping.ranking)
    assert result.after.macs <= 0.8 * result.before.macs
    assert result.accuracy_after > 0.5  # one MLP sub-block gone, not the model


def test_milder_drops_one_fewer_and_reuses_measured_costs():
    proto = _two_blocks(quiet_scale=1.0)
    dropping = BlockDropping(drop_blocks=2)
    dropping.bind_data(_data(proto))
    dropping(io.load(proto))
    mild = dropping.milder()
    assert mild is not None and mild.drop_blocks == 1 and mild._costs is dropping._costs
    assert mild.milder() is None
    result = _run(proto, [BlockDropping(drop_blocks=2)], max_drop=0.0)
    assert result.steps[0].status in ("backed off", "rolled back")


def test_needs_data_and_validates_parameters(monkeypatch, capsys, tmp_path):
    with pytest.raises(ValueError, match="drop_blocks"):
        BlockDropping()
    with pytest.raises(ValueError, match="positive integer"):
        BlockDropping(drop_blocks=0)
    with pytest.raises(DataError, match="--data"):
        api.compress(_two_blocks(), passes=[BlockDropping(drop_blocks=1)])
    src = tmp_path / "m.onnx"
    onnx.save(_two_blocks(), str(src))
    code, _, err = run_cli(
        monkeypatch, capsys, "compress", src, "-o", tmp_path / "o.onnx", "--drop-blocks", 1
    )
    assert code == 1
    assert "--data" in err and len(err.strip().splitlines()) == 1


def test_cli_and_recipe_build_the_pass(monkeypatch, capsys, tmp_path):
    steps = recipe_from_flags(drop_blocks=1, merge_layers=True).steps
    assert [s.name for s in steps] == ["cleanup", "block-dropping", "layer-merging"]
    recipe = Recipe.from_dict({"passes": [{"pass": "block-dropping", "target_macs": 0.5, "joint": 0}]})
    assert isinstance(recipe.build()[0], BlockDropping)
    src, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(_two_blocks(), str(src))
    np.savez(data, x=RNG.standard_normal((48, 8)).astype(np.float32))
    args = ["compress", src, "-o", tmp_path / "o.onnx", "--data", data, "--drop-blocks", "1", "--json"]
    code, out, _ = run_cli(monkeypatch, capsys, *args)
    assert code == 0
    payload = json.loads(out)
    step = next(s for s in payload["steps"] if s["name"] == "block-dropping")
    assert [c["layer"] for c in step["record"]["changes"]] == ["block_a"]


def test_light_resnet50_blocks_found_dropped_and_valid():
    model = io.load(with_random_weights(light_models()["resnet50"]))
    cleaned = io.load(model)
    Cleanup()(cleaned)
    blocks, refused = _blocks(cleaned)
    assert len(blocks) == 16 and not refused
    # Projection blocks (first of each stage) keep their shortcut conv and drop the heavier side.
    projections = [b for b in blocks if b.node.inputs[b.skip_index].producer() is not None]
    projections = [b for b in projections if b.node.inputs[b.skip_index].producer().op_type == "Conv"]
    assert len(projections) == 4
    data = CalibrationData.synthetic_for(model, n=2, seed=1)
    held_out = CalibrationData.synthetic_for(model, n=2, seed=2)
    dropping = BlockDropping(drop_blocks=2, joint=0)
    result = api.compress(model, data, passes=[Cleanup(), dropping], eval_data=held_out)
    assert result.steps[1].status == "applied"
    assert len(result.steps[1].record.changes) == 2 and len(dropping.ranking) == 16
    assert result.after.macs < result.before.macs
    outputs = runtime.run_model(result.model, held_out.batches(1))
    assert np.all(np.isfinite(next(iter(outputs.values()))))


def test_blocks_are_ranked_by_the_gates_task_metric_when_one_is_given():
    """The pass measures candidates with the same metric the gate judges by: a metric that
    (perversely) rewards change makes the loud block look cheapest, so it is dropped."""

    def rewards_change(outputs, reference):
        return float(np.abs(outputs["y"] - reference["y"]).mean())

    proto = _two_blocks()
    dropping = BlockDropping(drop_blocks=1, joint=0)
    result = _run(proto, [dropping], task_metric=rewards_change)
    assert [c.layer for c in result.steps[0].record.changes] == ["block_b"]
    assert [c.name for c in dropping.ranking] == ["block_b", "block_a"]
    assert "task metric" in result.metric
