"""Reliability: a fast slice of the corpus sweep, determinism across processes, Ctrl-C."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from onnxslim_tool import cli, reliability

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def test_fast_corpus_slice_never_fails():
    models = [m for m in reliability.corpus_models(("pytorch-converted", "pytorch-operator", "simple"))][::6]
    outcomes = reliability.sweep(models, ["cleanup"])
    assert len(outcomes) == len(models) >= 20
    failed = [o for o in outcomes if o.status == "FAILED"]
    assert not failed, failed
    assert sum(o.status in ("ok", "unchanged") for o in outcomes) >= len(outcomes) // 2
    for o in outcomes:
        if o.status in ("refused", "rolled back"):
            assert o.detail and "\n" not in o.detail  # a refusal always says why, in one line
    table = reliability.table_markdown(outcomes)
    assert "| cleanup |" in table


def test_fast_node_slice_never_fails():
    # Recent onnx wheels ship no node tests: the sweep writes them once from onnx's own cases.
    models = reliability.corpus_models(("node",))
    assert len(models) > 1000
    regressions = {"test_and2d", "test_strnormalizer_nostopwords_nochangecase", "test_string_concat"}
    # Inputs with no shared batch axis run as one whole feed; a ragged sequence output compares.
    regressions |= {"test_split_to_sequence_2", "test_ai_onnx_ml_binarizer"}
    picked = models[::400] + [m for m in models if m.parent.name in regressions]
    outcomes = reliability.sweep(picked, ["cleanup", "quantize"])
    assert not [o for o in outcomes if o.status == "FAILED"], outcomes
    assert all(o.model.startswith("node/test_") for o in outcomes)
    quantized = {o.model.split("/")[1]: o for o in outcomes if o.family == "quantize"}
    for name in regressions:  # string, bool, int graphs: a stated skip, not "pass failed"
        assert quantized[name].status == "unchanged" and "nothing to quantize" in quantized[name].detail
    cleaned = {o.model.split("/")[1]: o for o in outcomes if o.family == "cleanup"}
    assert cleaned["test_split_to_sequence_2"].status in ("ok", "unchanged")


def test_a_pass_that_raised_counts_as_failed_even_though_the_pipeline_rolled_it_back():
    step = SimpleNamespace(status="rolled back", reason="pass failed: ValueError: boom")
    result = SimpleNamespace(steps=[step])
    assert reliability._judge(Path("x"), Path("y"), None, result, 0.0) == ("FAILED", step.reason)
    step.reason = "pass refused: model is already quantized"
    assert reliability._judge(Path("x"), Path("y"), None, result, 0.0) == ("rolled back", step.reason)


def _compress_in_subprocess(out: Path) -> str:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxslim_tool",
            "compress",
            str(SAMPLES / "digits_cnn.onnx"),
            "-o",
            str(out),
            "--data",
            str(SAMPLES / "digits_cnn_calib.npz"),
            "--recipe",
            "lossless",
            "--seed",
            "7",
            "--quiet",
        ],
        check=True,
        timeout=300,
    )
    return hashlib.sha256(out.read_bytes()).hexdigest()


def test_same_input_and_seed_give_byte_identical_output_across_processes(tmp_path):
    assert _compress_in_subprocess(tmp_path / "a.onnx") == _compress_in_subprocess(tmp_path / "b.onnx")


def test_ctrl_c_exits_cleanly_without_output(monkeypatch, capsys, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.api, "compress", interrupted)
    out = tmp_path / "never.onnx"
    monkeypatch.setattr(
        sys,
        "argv",
        ["onnxslim-tool", "compress", str(SAMPLES / "digits_mlp.onnx"), "-o", str(out), "--synthetic"],
    )
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_saved_outcomes_merge_into_one_table(tmp_path):
    first_two = reliability.corpus_models(("simple",))[:2]
    saved = tmp_path / "part.jsonl"
    outcomes = reliability.sweep(first_two, ["cleanup"], save=saved)
    assert reliability.load_outcomes(saved) == outcomes
    table = tmp_path / "table.md"
    args = ["--sections", "pytorch-operator", "--limit", "1", "--families", "cleanup"]
    assert reliability.main([*args, "--merge", str(saved), "--out", str(table)]) == 0
    assert "(3 models: 1 pytorch-operator, 2 simple)" in table.read_text()
