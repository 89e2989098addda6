"""The command line as a user meets it: exit codes, one-line errors, JSON, tables."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxslim_tool import cli
from onnxslim_tool.testing import light_models, random_feed, run_proto, with_random_weights

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
CNN = SAMPLES / "digits_cnn.onnx"
CNN_EVAL = SAMPLES / "digits_cnn_eval.npz"


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["onnxslim-tool", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        cli.main()
        sys.exit(0)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out, captured.err


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_help_teaches_the_commands(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "--help")
    assert code == 0
    for command in ("inspect", "evaluate", "compress"):
        assert command in out


def test_inspect_json_totals(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "inspect", CNN, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["total_macs"] == sum(layer["macs"] for layer in report["layers"])
    assert report["file_bytes"] == CNN.stat().st_size
    assert report["op_histogram"]["Conv"] == 7
    assert report["inputs"][0]["name"] == "input"


def test_inspect_resolves_dynamic_dims_from_input_shape(monkeypatch, capsys):
    _, out1, _ = run_cli(monkeypatch, capsys, "inspect", CNN, "--json")
    _, out4, _ = run_cli(monkeypatch, capsys, "inspect", CNN, "--json", "--input-shape", "input=4x1x8x8")
    one, four = json.loads(out1), json.loads(out4)
    assert four["total_macs"] == 4 * one["total_macs"]
    assert one["assumed_dims"] and not four["assumed_dims"]


def test_inspect_table_on_light_resnet(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "inspect", light_models()["resnet50"], "--top", "3")
    assert code == 0
    assert "Totals" in out and "MACs" in out and "4.09G" in out


def test_evaluate_model_against_itself(monkeypatch, capsys):
    code, out, _ = run_cli(
        monkeypatch, capsys, "evaluate", CNN, CNN, "--data", CNN_EVAL, "--runs", "3", "--json"
    )
    assert code == 0
    report = json.loads(out)
    assert report["min_cosine"] == pytest.approx(1.0)
    assert report["top1_agreement"] == 1.0
    assert report["accuracy_reference"] == report["accuracy_candidate"] >= 0.95
    assert report["size_ratio"] == 1.0
    assert report["latency"]["runs"] == 3 and report["latency_ratio"] > 0


def test_compress_cleanup_writes_validated_model(monkeypatch, capsys, tmp_path):
    out_path = tmp_path / "clean.onnx"
    before = _sha(CNN)
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "compress",
        CNN,
        "-o",
        out_path,
        "--data",
        CNN_EVAL,
        "--recipe",
        "lossless",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert _sha(CNN) == before
    assert report["before"]["bytes"] == CNN.stat().st_size
    assert report["written_bytes"] == out_path.stat().st_size < CNN.stat().st_size
    assert report["after"]["nodes"] < report["before"]["nodes"]  # BatchNorms folded
    assert report["accuracy_after"] == report["accuracy_before"]
    assert report["steps"][0]["status"] == "applied"
    written = onnx.load(str(out_path))
    assert "BatchNormalization" not in {n.op_type for n in written.graph.node}
    provenance = {p.key: p.value for p in written.metadata_props}
    assert json.loads(provenance["onnxslim_tool.recipe"])["name"] == "lossless"
    assert provenance["onnxslim_tool.input_sha256"] == before
    assert provenance["onnxslim_tool.seed"] == "0"


def test_recipes_command_lists_builtins(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "recipes", "--json")
    assert code == 0
    assert {"lossless", "safe", "fast", "small"} <= set(json.loads(out))


def test_compress_light_model_with_synthetic_data_matches(monkeypatch, capsys, tmp_path):
    src = tmp_path / "squeezenet.onnx"
    onnx.save(with_random_weights(light_models()["squeezenet"]), str(src))
    dst = tmp_path / "out.onnx"
    code, out, _ = run_cli(monkeypatch, capsys, "compress", src, "-o", dst, "--synthetic")
    assert code == 0
    assert "SYNTHETIC" in out
    proto = onnx.load(str(src))
    feed = random_feed(proto, seed=3)
    np.testing.assert_allclose(
        run_proto(onnx.load(str(dst)), feed)[0], run_proto(proto, feed)[0], rtol=1e-4, atol=1e-6
    )


def test_refusals_are_one_line_with_exit_1(monkeypatch, capsys, tmp_path):
    copy = tmp_path / "same.onnx"
    copy.write_bytes(CNN.read_bytes())
    digest = _sha(copy)
    cases = [
        (("compress", copy, "-o", copy), "output path is the input path"),
        (("inspect", tmp_path / "nope.onnx"), "model file not found"),
        (("compress", CNN, "-o", tmp_path / "missing_dir" / "x.onnx", "--data", CNN_EVAL), "does not exist"),
        (("inspect", CNN, "--input-shape", "bogus=1x2"), "bogus"),
        (
            ("compress", CNN, "-o", tmp_path / "o.onnx", "--layer-ratio", "res_a", "--synthetic"),
            "PATTERN=RATIO",
        ),
        (("compress", CNN, "-o", tmp_path / "o.onnx", "--layer-ratio", "*=1.5", "--synthetic"), "[0, 1)"),
        (
            ("compress", CNN, "-o", tmp_path / "o.onnx", "--target-size", "20kB", "--quantize", "int8"),
            "drop the method flags",
        ),
        (("compress", CNN, "-o", tmp_path / "o.onnx", "--target-latency", "1.5", "--synthetic"), "(0, 1)"),
        (
            ("compress", CNN, "-o", tmp_path / "o.onnx", "--recipe", "safe", "--quantize", "int8"),
            "either --recipe or method flags",
        ),
        (
            (
                "compress",
                CNN,
                "-o",
                tmp_path / "o.onnx",
                "--data",
                SAMPLES / "digits_mlp_eval.npz",
                "--recipe",
                "lossless",
            ),
            "input 'input'",
        ),
    ]
    for args, fragment in cases:
        code, out, err = run_cli(monkeypatch, capsys, *args)
        assert code == 1, args
        lines = err.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, (args, err)
    assert _sha(copy) == digest
    assert not (tmp_path / "o.onnx").exists()


def test_layer_ratio_prunes_only_the_named_layers_and_prune_ends_lifts_the_protection(
    monkeypatch, capsys, tmp_path
):
    def changed(*flags: str) -> dict[str, str]:
        out_path = tmp_path / "pruned.onnx"
        args = ("compress", CNN, "-o", out_path, "--data", CNN_EVAL, "--json", *flags)
        code, out, err = run_cli(monkeypatch, capsys, *args)
        assert code == 0, err
        (step,) = [s for s in json.loads(out)["steps"] if s["name"] == "channel-pruning"]
        return {c["layer"]: c["detail"] for c in step["record"]["changes"]}

    assert changed("--layer-ratio", "/res_a/*=0.5") == {"/res_a/res_a.0/Conv": "kept 8/16 channels"}
    protected = changed("--prune-channels", "0.25")
    assert "/stem/stem.0/Conv" not in protected and "/pointwise/pointwise.0/Conv" not in protected
    everything = changed("--prune-channels", "0.25", "--prune-ends")
    assert everything["/stem/stem.0/Conv"].startswith("kept 12/16")
    assert everything["/pointwise/pointwise.0/Conv"] == "kept 24/32 channels"


def test_a_recipe_files_seed_holds_unless_seed_is_given(monkeypatch, capsys, tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"passes": ["cleanup"], "seed": 7}))

    def seed_written(*flags: str) -> str:
        out_path = tmp_path / "out.onnx"
        code, _, err = run_cli(
            monkeypatch, capsys, "compress", CNN, "-o", out_path, "--recipe", recipe, *flags
        )
        assert code == 0, err
        return {p.key: p.value for p in onnx.load(str(out_path)).metadata_props}["onnxslim_tool.seed"]

    assert seed_written() == "7"
    assert seed_written("--seed", "3") == "3"


def test_console_script_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "onnxslim_tool", "inspect", str(SAMPLES / "nothing.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: model file not found")
    assert "Traceback" not in result.stderr


def test_cli_reference_doc_matches_the_app():
    from onnxslim_tool.cli_docs import cli_reference

    committed = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    assert committed == cli_reference(), (
        "docs/cli.md is stale: python -m onnxslim_tool.cli_docs > docs/cli.md"
    )
