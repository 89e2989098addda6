"""Consumer inputs read for many groups per run give what one run per group gives."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxslim_tool import io
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.passes.channel_pruning import _Evidence
from onnxslim_tool.pruning import consumer_inputs
from onnxslim_tool.pruning.depgraph import find_groups
from tests.pruning.test_apply import Net


def three_blocks() -> onnx.ModelProto:
    net = Net()
    a = net.relu(net.conv("x", 3, 8))
    b = net.relu(net.conv(a, 8, 6))
    c = net.relu(net.conv(b, 6, 5))
    return net.model(net.conv(c, 5, 2))


MODEL = three_blocks()  # built once: Net draws its weights from a shared generator


def evidence(queued: bool) -> tuple[_Evidence, list]:
    model = io.load(MODEL)
    groups = [g for g in find_groups(model) if g.prunable]
    rng = np.random.default_rng(0)
    data = CalibrationData.from_arrays({"x": rng.standard_normal((6, 3, 6, 6)).astype(np.float32)})
    feeds = list(data.batches(2))
    return _Evidence(model, feeds, max_rows=60, seed=3, queue=list(groups) if queued else []), groups


@pytest.mark.parametrize("kind", ["contributions", "search"])
def test_reading_ahead_gives_the_same_rows_in_fewer_runs(kind):
    ahead, groups = evidence(queued=True)
    alone, _ = evidence(queued=False)
    assert len(groups) == 3
    for g in groups:
        got, want = ahead._consumer_inputs(g, kind), alone._consumer_inputs(g, kind)
        assert len(got) == len(want) == 1
        for (patches, weight), (patches_alone, weight_alone) in zip(got, want, strict=True):
            np.testing.assert_array_equal(patches, patches_alone)
            np.testing.assert_array_equal(weight, weight_alone)
    assert alone.inputs.runs == 3
    # The first run reads one group (no tensor size known yet); the next one the other two.
    assert ahead.inputs.runs == 2


def test_reading_ahead_stops_at_the_memory_budget(monkeypatch):
    monkeypatch.setattr(consumer_inputs, "KEPT_BYTES", 1)  # nothing may wait for its turn
    ahead, groups = evidence(queued=True)
    for g in groups:
        ahead._consumer_inputs(g, "contributions")
    assert ahead.inputs.runs == 3
