"""Sensitivity scans: one layer at a time, measured, failures recorded instead of raised."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxslim_tool import passes, sensitivity
from onnxslim_tool.data import CalibrationData
from onnxslim_tool.graph_utils import const_array
from onnxslim_tool.io import load
from onnxslim_tool.passes.base import CompressionPass, PassRecord
from onnxslim_tool.report_files import sensitivity_html, sensitivity_markdown

MLP = "sample_models/digits_mlp.onnx"


class ZeroFraction(CompressionPass):
    """Toy lossy pass: zeroes the first `fraction` of the rows of each selected Gemm weight."""

    name = "toy"

    def __init__(self, fraction: float = 0.5, include=(), exclude=()) -> None:
        super().__init__(include=include, exclude=exclude)
        self.fraction = fraction

    def rewrite(self, model: ir.Model, record: PassRecord) -> None:
        for node in model.graph:
            ok, why = self.selects(node)
            if node.op_type != "Gemm":
                continue
            if not ok:
                record.skip(node.name, why)
                continue
            w = const_array(node.inputs[1]).copy()
            w[: int(self.fraction * w.shape[0])] = 0
            node.inputs[1].const_value = ir.tensor(w, name=node.inputs[1].name)
            record.changed(node.name, "Gemm", f"zeroed {self.fraction:.0%}")


@pytest.fixture
def toy_method(monkeypatch):
    monkeypatch.setitem(passes._REGISTRY, "toy", f"{__name__}:ZeroFraction")
    monkeypatch.setitem(
        sensitivity.METHODS, "toy", sensitivity.Method("toy", "toy", "fraction", (0.0, 0.5, 1.0), ("Gemm",))
    )


def _data():
    data = CalibrationData.from_npz("sample_models/digits_mlp_eval.npz")
    return data.split(0.5, seed=0)


def test_scan_measures_each_layer_and_setting(toy_method):
    calib, held_out = _data()
    report = sensitivity.scan(load(MLP), "toy", calib, held_out)
    assert len(report.layers) == 3
    for layer in report.layers:
        drops = [p.metric_drop for p in layer.points]
        assert drops[0] == pytest.approx(0.0)  # zeroing nothing changes nothing
        assert drops[2] > 0.3  # zeroing a whole layer ruins a digits classifier
        assert all(p.metric == "accuracy" for p in layer.points)
    markdown = sensitivity_markdown(report)
    assert "| layer | op |" in markdown and report.layers[0].layer in markdown
    assert "<table>" in sensitivity_html(report)


def test_scan_records_failures_instead_of_raising(toy_method, monkeypatch):
    def boom(self, model, record):
        raise RuntimeError("cannot do this layer")

    monkeypatch.setattr(ZeroFraction, "rewrite", boom)
    calib, held_out = _data()
    report = sensitivity.scan(load(MLP), "toy", calib, held_out, max_layers=1)
    point = report.layers[0].points[0]
    assert point.metric_drop is None and "cannot do this layer" in point.error


def test_unknown_method_refused():
    calib, held_out = _data()
    with pytest.raises(Exception, match="unknown analysis method"):
        sensitivity.scan(load(MLP), "nope", calib, held_out)


def test_candidate_layers_heaviest_first():
    rows = sensitivity.candidate_layers(load(MLP), ("Gemm",))
    macs = [r[3] for r in rows]
    assert macs == sorted(macs, reverse=True) and len(rows) == 3
    assert np.all(np.array(macs) > 0)
