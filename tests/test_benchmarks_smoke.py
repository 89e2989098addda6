"""The benchmark harness end to end on one tiny subject, so it cannot rot.

Benchmarks themselves never run in the test command: this runs the sample MLP with three
cheap variants, quick latency settings and no network, into a temporary folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks/` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import run  # noqa: E402

VARIANTS = ("fp32", "ours-lossless", "ort-dynamic")


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    docs = out / "docs" / "benchmarks.md"
    argv = ["--subjects", "digits_mlp", "--variants", ",".join(VARIANTS[1:]), "--quick"]
    argv += ["--out", str(out), "--docs", str(docs), "--cache", str(out / "cache"), "--timeout", "120"]
    code = run.main(argv)
    return code, json.loads((out / "results.json").read_text()), docs.read_text(), out


def test_run_succeeds_and_records_every_variant(outcome):
    code, results, _, _ = outcome
    assert code == 0
    assert results["meta"]["quick"] is True
    (subject,) = results["subjects"]
    assert subject["name"] == "digits_mlp" and "error" not in subject
    assert [v["name"] for v in subject["variants"]] == list(VARIANTS)
    assert all(v["status"] == "ok" for v in subject["variants"]), subject["variants"]


def test_numbers_are_measured_not_assumed(outcome):
    _, results, _, _ = outcome
    subject = results["subjects"][0]
    fp32 = subject["fp32"]
    assert fp32["bytes"] == (REPO / "sample_models" / "digits_mlp.onnx").stat().st_size
    assert fp32["macs"] > 0 and 0.9 < fp32["metric"] <= 1.0  # the MLP's real test accuracy
    by_name = {v["name"]: v for v in subject["variants"]}
    lossless, dynamic = by_name["ours-lossless"], by_name["ort-dynamic"]
    assert lossless["metric_drop"] == pytest.approx(0.0, abs=1e-9)  # lossless keeps every prediction
    assert dynamic["bytes_ratio"] < 0.5  # int8 weights: the written file really shrank
    for record in (lossless, dynamic):
        assert record["convert_seconds"] >= 0 and record["peak_rss_mb"] >= record["startup_rss_mb"] - 1
        for threads in ("1", "2"):
            latency = record["latency"][threads]
            assert latency["fp32_ms"] > 0 and latency["variant_ms"] > 0
            assert latency["ratio"] == pytest.approx(latency["variant_ms"] / latency["fp32_ms"])


def test_markdown_has_a_row_per_variant(outcome):
    _, results, markdown, _ = outcome
    assert markdown.startswith("# Benchmarks")
    assert "Quick run" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    for name in VARIANTS:
        assert any(row.startswith(f"| {name} |") for row in rows), name
    size = results["subjects"][0]["variants"][2]["bytes"]
    assert f"{size:,}" in markdown  # the table quotes the JSON, not a re-measurement


def test_failures_are_recorded_not_raised(tmp_path):
    """A subject whose set-up fails is reported with its reason and the run still finishes."""
    from benchmarks import report

    results = {
        "meta": {
            "command": "x",
            "started": "t",
            "quick": True,
            "variants": ["fp32"],
            "machine": {"cpu": "c", "cores": 1, "python": "3"},
            "versions": {},
        },
        "subjects": [{"name": "broken", "variants": [], "error": "FetchError: no network"}],
    }
    (path,) = [p for p in report.write(results, tmp_path / "b.md") if p.suffix == ".md"]
    assert "Set-up failed: FetchError: no network" in path.read_text()


def test_unknown_names_are_refused_with_the_known_ones(capsys):
    assert run.main(["--subjects", "no_such_model", "--no-docs"]) == 1
    assert "digits_cnn" in capsys.readouterr().err


def test_zoo_metric_ignores_each_samples_offset_and_sees_a_reordered_class():
    from benchmarks.subjects.light_zoo import centred_cosine

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(1000, 50.0), size=4)  # near-uniform rows, as random weights give
    reference = {"prob": probs}
    assert centred_cosine({"prob": probs + rng.normal(size=(4, 1))}, reference) == pytest.approx(1.0)
    swapped = probs[:, ::-1]  # every class's score moved: a plain cosine still reads ~1
    plain = float((probs * swapped).sum() / np.linalg.norm(probs) / np.linalg.norm(swapped))
    assert plain > 0.97 and centred_cosine({"prob": swapped}, reference) < 0.2


def test_pruning_coverage_table_counts_groups_and_reasons():
    from benchmarks.pruning_groups import markdown, measure
    from onnxslim_tool.data import CalibrationData

    data = CalibrationData.from_npz("sample_models/digits_cnn_calib.npz").subset(4)
    row = measure("digits_cnn", "sample_models/", "sample_models/digits_cnn.onnx", data, None)
    assert row.error is None and row.groups == 6 and row.pruned >= 1
    assert row.pruned + sum(row.refused.values()) <= row.groups and row.macs < 1.0
    assert any("protected" in reason for reason in row.refused)
    page = markdown([row], "python -m benchmarks.pruning_groups")
    assert "| digits_cnn | sample_models/ | 6 |" in page and "## Why groups were refused" in page
