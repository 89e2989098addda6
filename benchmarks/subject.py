"""What a benchmark subject is: a model, its calibration feeds, and how to score a variant of it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

Feed = dict[str, np.ndarray]
# Runs a session over the subject's evaluation set; what it returns is only read by `score`.
Predict = Callable[[ort.InferenceSession], Any]


@dataclass
class Score:
    """A variant's task metric (higher is better) plus secondary numbers for the tables."""

    value: float
    secondary: dict[str, float] = field(default_factory=dict)


# (fp32 predictions, candidate predictions) -> Score. For agreement metrics fp32 scores 1.0.
ScoreFn = Callable[[Any, Any], Score]


@dataclass
class Subject:
    """One model under test.

    `calibration` is the calibration set in the project's data layout (sample axis first,
    what a user passes to `--data`); `feeds` holds the same set as exact onnxruntime feeds,
    stacked on a leading axis, for the peers' calibration readers.
    """

    name: str
    family: str  # "sample", "light-zoo" or "pretrained"
    model_path: Path
    feeds: Path
    predict: Predict
    score: ScoreFn
    metric: str  # what `Score.value` is, e.g. "accuracy", "detection F1 vs fp32"
    metric_kind: str  # "task" (labelled) or "fidelity" (agreement with the fp32 original)
    latency_feed: Feed
    calibration: Path | None = None
    input_shapes: dict[str, list[int]] | None = None
    latency_runs: int = 30
    setup: dict[str, Any] = field(default_factory=dict)  # what the set-up used, for the docs
    # The task metric our recipes' accuracy gate judges by (`--task-metric`), where the
    # subject has one the package knows: fidelity alone passed detectors that lost their boxes.
    task_metric: str | None = None


@dataclass(frozen=True)
class SetupContext:
    """Where a subject keeps its downloads and generated files, and how much work to do."""

    cache: Path  # survives runs: downloads, exported models, generated media
    work: Path  # this run's scratch folder for the subject
    quick: bool = False
    seed: int = 0


def stack_feeds(feeds: list[Feed]) -> dict[str, np.ndarray]:
    """Feeds as arrays with one leading entry per feed (scalars become shape [N])."""
    return {name: np.stack([np.asarray(f[name]) for f in feeds]) for name in feeds[0]}


def unstack_feeds(arrays: dict[str, np.ndarray]) -> list[Feed]:
    count = len(next(iter(arrays.values())))
    return [{name: np.asarray(arr[i]) for name, arr in arrays.items()} for i in range(count)]


def save_feeds(path: Path, feeds: list[Feed]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **stack_feeds(feeds))
    return path


def load_feeds(path: Path) -> list[Feed]:
    with np.load(path, allow_pickle=False) as archive:
        return unstack_feeds({key: archive[key] for key in archive.files})
