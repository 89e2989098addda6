"""`--target-macs F`: alone, the cross-method allocator's target; beside pruning flags, pruning's goal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnxslim_tool import api
from onnxslim_tool.allocation import Target
from tests.test_cli import run_cli

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
CNN = SAMPLES / "digits_cnn.onnx"
CALIB = SAMPLES / "digits_cnn_calib.npz"


def test_target_macs_alone_runs_the_allocator_and_meets_the_target(monkeypatch, capsys, tmp_path):
    out = tmp_path / "out.onnx"
    code, stdout, _ = run_cli(
        monkeypatch, capsys, "compress", CNN, "-o", out, "--data", CALIB,
        "--target-macs", "0.7", "--target-layers", "2", "--json",
    )  # fmt: skip
    assert code == 0
    report = json.loads(stdout)
    allocation = report["allocation"]
    assert allocation["target"] == {"kind": "macs", "value": 0.7}
    assert allocation["met"] and allocation["reached"] <= 0.7
    assert allocation["chosen"] and {o["method"] for o in allocation["chosen"]} <= {"prune", "lowrank"}
    assert report["ratios"]["macs"] == pytest.approx(allocation["reached"])
    assert report["recipe"]["name"] == "target-macs"
    assert report["output"] == str(out) and out.exists()


def test_unreachable_macs_target_exits_2_and_writes_nothing_without_keep_best(monkeypatch, capsys, tmp_path):
    out = tmp_path / "out.onnx"
    args = ["compress", CNN, "-o", out, "--data", CALIB, "--target-macs", "0.05", "--target-layers", "1"]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    assert "target macs <= 5% not met" in err and "nothing written" in err
    assert not out.exists()


class _Called(Exception):
    """Raised by the fake compress: the dispatch is what is tested, not the compression."""


@pytest.fixture
def captured(monkeypatch):
    calls: list[dict] = []

    def fake_compress(model, data=None, **kwargs):
        calls.append(kwargs)
        raise _Called

    monkeypatch.setattr(api, "compress", fake_compress)
    return calls


@pytest.mark.parametrize(
    ("extra", "allocator"),
    [
        ([], True),
        (["--max-drop", "0.01"], True),
        (["--criterion", "l1"], False),
        (["--prune-channels", "0.2"], False),
        (["--round-to", "8"], False),
        (["--no-reconstruct"], False),
        (["--prune-ends"], False),
        (["--layer-ratio", "conv*=0.5"], False),
        (["--quantize", "int8-weights"], False),
    ],
)
def test_target_macs_means_the_allocator_only_when_alone(
    monkeypatch, capsys, tmp_path, captured, extra, allocator
):
    args = ["compress", CNN, "-o", tmp_path / "o.onnx", "--data", CALIB, "--target-macs", "0.6", *extra]
    code, _, _ = run_cli(monkeypatch, capsys, *args)
    assert code == 1  # the fake's exception, reported as an internal error
    (kwargs,) = captured
    if allocator:
        assert kwargs["target"] == Target("macs", 0.6) and kwargs["recipe"] is None
    else:
        assert kwargs["target"] is None
        pruning = [s for s in kwargs["recipe"].steps if s.name == "channel-pruning"]
        assert pruning and pruning[0].params["target_macs"] == 0.6


def test_two_targets_are_refused(monkeypatch, capsys, tmp_path):
    args = ["compress", CNN, "-o", tmp_path / "o.onnx", "--data", CALIB, "--target-macs", "0.6"]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--target-size", "30kB")
    assert code == 1 and "give one target" in err
