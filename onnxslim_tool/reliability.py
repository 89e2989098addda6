"""Corpus sweep: every model onnx ships, through every pass family; each either compresses
correctly or is refused with a reason. Nothing else is acceptable.

Run it all with `python -m onnxslim_tool.reliability --out docs/reliability.md`; the test
suite runs a fast subset. Each outcome is checked independently of the pipeline: the
written file is reloaded in onnxruntime and compared with the original on the same inputs.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxslim_tool import api, io, metrics, runtime
from onnxslim_tool.data import CalibrationData, input_specs
from onnxslim_tool.errors import DataError, OnnxSlimError
from onnxslim_tool.recipe import Recipe, RecipeError
from onnxslim_tool.testing import with_random_weights

CORPUS = Path(onnx.__file__).parent / "backend" / "test" / "data"

# Each pass family at a moderate setting; tolerance = what its output must keep.
FAMILIES: dict[str, tuple[dict, float]] = {
    "cleanup": ({"passes": ["cleanup"]}, 0.9999),
    "channel-pruning": ({"passes": [{"pass": "channel-pruning", "ratio": 0.3}]}, 0.0),
    "lowrank": ({"passes": [{"pass": "lowrank", "ratio": 0.5}]}, 0.0),
    "weight-pruning": ({"passes": [{"pass": "weight-pruning", "sparsity": 0.5}]}, 0.0),
    "weight-sharing": ({"passes": [{"pass": "weight-sharing", "bits": 6}]}, 0.0),
    "quantize": ({"passes": [{"pass": "quantize", "mode": "int8-dynamic"}]}, 0.0),
}


# The light zoo (5-140M parameters, random weights): channel pruning's refit solves one ridge
# system per pruned layer, minutes per model on 2 cores; the zoo prunes the same 30% unrefit.
LIGHT_FAMILIES: dict[str, tuple[dict, float]] = {
    "channel-pruning": ({"passes": [{"pass": "channel-pruning", "ratio": 0.3, "reconstruct": False}]}, 0.0),
}


@dataclass
class Outcome:
    model: str
    family: str
    status: str  # ok | unchanged | refused | rolled back | FAILED
    detail: str = ""
    seconds: float = 0.0


SECTIONS = ("node", "light", "pytorch-converted", "pytorch-operator", "simple")


def _section_dir(section: str) -> Path:
    """Where a corpus section's models are. Recent onnx wheels ship no `node` folder, only the
    code that writes it, so that section is generated once into a cache folder."""
    shipped = CORPUS / section
    if section != "node" or shipped.is_dir():
        return shipped
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    folder = cache / "onnxslim-tool" / f"onnx-{onnx.__version__}" / "node"
    if not (folder / ".complete").exists():
        write_node_tests(folder)
    return folder


def write_node_tests(folder: Path, op_type: str | None = None) -> list[Path]:
    """Write onnx's node test cases as `NAME/model.onnx` + `NAME/test_data_set_0/input_*.pb`,
    the layout onnx's own `data/node` folder has; returns the model paths."""
    from onnx.backend.test.case import node as node_cases

    with warnings.catch_warnings():  # some cases build their expected outputs from inf/nan
        warnings.simplefilter("ignore")
        cases = node_cases.collect_testcases(op_type)
    paths = []
    for case in cases:
        if case.model is None or not case.data_sets:
            continue
        case_dir = folder / case.name
        data_dir = case_dir / "test_data_set_0"
        data_dir.mkdir(parents=True, exist_ok=True)
        (case_dir / "model.onnx").write_bytes(case.model.SerializeToString())
        names = [i.name for i in case.model.graph.input]
        tensors = [_as_tensor(v, n) for v, n in zip(case.data_sets[0][0], names, strict=False)]
        if all(t is not None for t in tensors):  # sequence/map/optional inputs: synthetic data
            for j, tensor in enumerate(tensors):
                (data_dir / f"input_{j}.pb").write_bytes(tensor.SerializeToString())
        paths.append(case_dir / "model.onnx")
    if op_type is None:
        (folder / ".complete").touch()
    return paths


def _as_tensor(value: object, name: str) -> onnx.TensorProto | None:
    if isinstance(value, onnx.TensorProto):
        return value
    if isinstance(value, np.ndarray | np.generic):
        return numpy_helper.from_array(np.asarray(value), name)
    return None


def corpus_models(sections: Sequence[str] = SECTIONS) -> list[Path]:
    return sorted(p for s in sections for p in _section_dir(s).rglob("*.onnx"))


def _display_name(model_path: Path) -> str:
    """The model's path as it would be under onnx's data folder (`node/test_abs/model.onnx`)."""
    if model_path.is_relative_to(CORPUS):
        return str(model_path.relative_to(CORPUS))
    if model_path.parent.parent.name == "node":
        return str(Path("node", model_path.parent.name, model_path.name))
    return model_path.name


def _test_inputs(model_path: Path) -> dict[str, np.ndarray] | None:
    """The input tensors onnx ships beside a test model (valid indices, shapes), if any."""
    data_dir = model_path.parent / "test_data_set_0"
    files = sorted(data_dir.glob("input_*.pb"))
    if not files:
        return None
    proto = onnx.load(str(model_path), load_external_data=False)
    initializers = {t.name for t in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in initializers]
    arrays = []
    for f in files:
        tensor = onnx.TensorProto()
        tensor.ParseFromString(f.read_bytes())
        arrays.append(numpy_helper.to_array(tensor))
    if len(arrays) != len(names):
        return None
    return dict(zip(names, arrays, strict=True))


def _prepare(model_path: Path, workdir: Path) -> tuple[Path, CalibrationData]:
    """The model as it will be compressed (light zoo: random weights) and data to judge it."""
    if model_path.parent.name == "light" or model_path.name.startswith("light_"):
        src = workdir / model_path.name
        onnx.save(with_random_weights(model_path), str(src))
    else:
        src = model_path
    feeds = _test_inputs(model_path)
    model = io.load(src)
    if feeds is None:
        return src, CalibrationData.synthetic_for(model, n=2, seed=0)
    specs = input_specs(model)
    # The shipped tensors are one batch: their first axis is the sample axis, unless they
    # are scalars or the model's batch dim is fixed and absent from them (then add one).
    problems = []
    for inputs in ({k: v for k, v in feeds.items()}, {k: v[None] for k, v in feeds.items()}):
        try:
            return src, CalibrationData(inputs=inputs, source="onnx test data").validate(specs)
        except OnnxSlimError as exc:
            problems.append(str(exc))
    # Most often node tests whose inputs share no batch axis (x [3, 4], y [4]): the tool's data
    # layout puts samples on axis 0 of every input. The first reading's complaint says the most.
    raise DataError(f"onnx's test inputs are not usable as calibration data: {problems[0]}")


def check_one(model_path: Path, family: str, workdir: Path) -> Outcome:
    light = model_path.parent.name == "light"
    recipe_data, min_cosine = (LIGHT_FAMILIES if light else {}).get(family, FAMILIES[family])
    start = time.perf_counter()
    name = _display_name(model_path)
    try:
        src, data = _prepare(model_path, workdir)
        recipe = Recipe.from_dict(dict(recipe_data), name=family)
        result = api.compress(src, data, recipe=recipe, eval_data=data)
        out = workdir / f"{family}.onnx"
        result.save(out)
        status, detail = _judge(src, out, data, result, min_cosine)
    except RecipeError as exc:
        status, detail = "refused", f"pass unavailable: {exc}"
    except OnnxSlimError as exc:
        status, detail = "refused", str(exc)
    except Exception as exc:  # a traceback here is a bug the sweep exists to find
        status = "FAILED"
        detail = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]} @ {_where(exc)}"
    return Outcome(name, family, status, detail[:300], time.perf_counter() - start)


def _judge(src: Path, out: Path, data: CalibrationData, result, min_cosine: float) -> tuple[str, str]:
    step = result.steps[0]
    if step.status == "rolled back":
        # The pipeline kept the user's model safe, but a pass that raised is still a bug.
        return ("FAILED" if step.reason.startswith("pass failed") else "rolled back"), step.reason
    reference = runtime.run_model(io.load(src), data.batches(8))
    candidate = runtime.run_model(io.load(out), data.batches(8))
    for fid in metrics.compare_outputs(reference, candidate):
        if not fid.finite:
            return "FAILED", f"output '{fid.name}' not finite"
        if fid.cosine < min_cosine:
            return "FAILED", f"output '{fid.name}' cosine {fid.cosine:.6f} < {min_cosine}"
    if step.status == "no-op":
        # A pass that declined the whole model says why in a note (e.g. an opset too old).
        why = [s.reason for s in step.record.skipped[:2]] or step.record.notes[:1]
        return "unchanged", "; ".join(why) or "nothing to change"
    return "ok", f"{result.before.bytes:,} -> {result.after.bytes:,} bytes"


def _settings(recipe: dict) -> str:
    step = recipe["passes"][0]
    if not isinstance(step, dict):
        return "(defaults)"
    return "(" + ", ".join(f"{k}={v}" for k, v in step.items() if k != "pass") + ")"


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"


def sweep(models: Iterable[Path], families: Sequence[str], save: Path | None = None) -> list[Outcome]:
    """Each outcome is appended to `save` as it is known, so a stopped sweep keeps its work."""
    outcomes = []
    for model_path in models:
        for family in families:
            with tempfile.TemporaryDirectory(prefix="onnxslim-sweep-") as tmp:
                outcomes.append(check_one(model_path, family, Path(tmp)))
            if save is not None:
                with save.open("a") as f:
                    f.write(json.dumps(dataclasses.asdict(outcomes[-1])) + "\n")
    return outcomes


def load_outcomes(path: Path) -> list[Outcome]:
    return [Outcome(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def table_markdown(outcomes: Sequence[Outcome], command: str = "", note: str = "") -> str:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        counts[o.family][o.status] += 1
    statuses = ["ok", "unchanged", "refused", "rolled back", "FAILED"]
    sections = collections.Counter(o.model.split("/")[0] for o in outcomes if o.family == outcomes[0].family)
    listed = ", ".join(f"{n} {s}" for s, n in sorted(sections.items())) if outcomes else "none"
    lines = [
        "# Reliability sweep",
        "",
        f"Every model in onnx's backend test data ({len({o.model for o in outcomes})} models: {listed}) "
        "through each pass family. `ok`: compressed, reloaded in onnxruntime, outputs finite and (cleanup) "
        "equal to the original; `unchanged`: the pass found nothing to do; `refused`/`rolled back`: a "
        "one-line reason, model untouched; `FAILED`: a bug (a traceback, or a pass that raised and "
        "was rolled back).",
        "",
        f"This run: `{command or 'python -m onnxslim_tool.reliability --out docs/reliability.md'}` "
        "(generated; do not edit by hand).",
        "",
        "Settings: "
        + "; ".join(f"{f} {_settings(r)}" for f, (r, _t) in FAMILIES.items())
        + ". Light zoo: "
        + "; ".join(f"{f} {_settings(r)}" for f, (r, _t) in LIGHT_FAMILIES.items())
        + ". onnx's test inputs are the data where shipped, else 2 seeded synthetic samples.",
        *([""] + [note] if note else []),
        "",
        "| pass family | " + " | ".join(statuses) + " |",
        "|---|" + "---:|" * len(statuses),
    ]
    for family, counter in counts.items():
        lines.append(f"| {family} | " + " | ".join(str(counter.get(s, 0)) for s in statuses) + " |")
    reasons: collections.Counter = collections.Counter(
        (o.family, o.status, o.detail.split(":")[0][:80]) for o in outcomes if o.status not in ("ok",)
    )
    lines += ["", "## Most common reasons", "", "| family | status | reason | models |", "|---|---|---|---:|"]
    for (family, status, reason), n in reasons.most_common(25):
        lines.append(f"| {family} | {status} | {reason.replace('|', '/')} | {n} |")
    failed = [o for o in outcomes if o.status == "FAILED"]
    if failed:
        lines += ["", "## Failures", ""] + [f"- `{o.model}` {o.family}: {o.detail}" for o in failed]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated pass families")
    parser.add_argument("--limit", type=int, default=None, help="only the first N models")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="corpus folders, e.g. simple,light")
    parser.add_argument(
        "--skip", default="", help="comma-separated model file names left out (say why in --note)"
    )
    parser.add_argument(
        "--note", default="", help="a paragraph for the Markdown, e.g. why models were skipped"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    parser.add_argument(
        "--save", type=Path, default=None, help="also write every outcome as JSON lines (for --merge)"
    )
    parser.add_argument(
        "--merge",
        type=Path,
        action="append",
        default=[],
        help="outcomes saved by an earlier run (--save) to include in the table; repeatable",
    )
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    skip = {s for s in args.skip.split(",") if s}
    models = [m for m in corpus_models([s for s in args.sections.split(",") if s]) if m.name not in skip]
    if args.save:
        args.save.write_text("")
    outcomes = sweep(models[: args.limit], families, args.save)
    # A long corpus can be swept in parts (the big zoo models take an hour on 2 cores).
    outcomes = [o for path in args.merge for o in load_outcomes(path)] + outcomes
    command = shlex.join(
        ["python", "-m", "onnxslim_tool.reliability", *(sys.argv[1:] if argv is None else argv)]
    )
    text = table_markdown(outcomes, command, args.note)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 1 if any(o.status == "FAILED" for o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
