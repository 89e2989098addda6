"""One command for the whole benchmark: set up subjects, convert, measure, write JSON and docs.

    python -m benchmarks.run [--subjects a,b] [--variants x,y] [--quick] [--out benchmarks/results]

Subjects and variants are listed by `--list`. A subject whose set-up fails and a variant
whose conversion or measurement fails are recorded with their one-line reason; the run
goes on. Results are written after every subject, so an interrupted run keeps what it did.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import measure, report, subjects, variants
from benchmarks.subject import SetupContext, Subject

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results"
DEFAULT_DOCS = REPO / "docs" / "benchmarks.md"
CACHE = REPO / "benchmarks" / ".cache"
VERSIONED = ("onnxslim_tool", "onnx", "onnx-ir", "onnxruntime", "numpy", "onnxslim", "onnxsim", "torch")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        subject_names = subjects.resolve(args.subjects)
        variant_names = variants.resolve(args.variants)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.list:
        print("subjects:", ", ".join(subjects.catalogue()))
        print("variants:", ", ".join(variants.catalogue()))
        return 0
    out = Path(args.out)
    results = _new_results(args, argv, subject_names, variant_names)
    for name in subject_names:
        _log(f"[{name}] setting up")
        results["subjects"].append(
            run_subject(
                name,
                variant_names,
                out,
                args.cache,
                quick=args.quick,
                seed=args.seed,
                timeout=args.timeout,
                keep_models=args.keep_models,
            )
        )
        _write_json(out / "results.json", results)
    results["meta"]["finished"] = _now()
    _write_json(out / "results.json", results)
    if not args.no_docs:
        written = report.write(results, Path(args.docs))
        _log("wrote " + ", ".join(str(p) for p in written))
    _log(f"wrote {out / 'results.json'}")
    return 0


def run_subject(
    name: str,
    variant_names: list[str],
    out: Path,
    cache: Path,
    *,
    quick: bool,
    seed: int,
    timeout: float,
    keep_models: bool,
) -> dict[str, Any]:
    work = out / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    entry: dict[str, Any] = {"name": name, "variants": []}
    start = time.perf_counter()
    try:
        subject = subjects.catalogue()[name](SetupContext(cache=cache, work=work, quick=quick, seed=seed))
        ref = measure.reference(subject)
    except Exception as exc:  # a subject that cannot be set up is reported, never fatal
        entry["error"] = _one_line(exc)
        _log(f"[{name}] set-up failed: {entry['error']}")
        return entry
    entry.update(_describe(subject, ref, time.perf_counter() - start))
    catalogue = variants.catalogue()
    warmup = 1 if quick else 3
    for variant in variant_names:
        _log(f"[{name}] {variant}")
        record = run_variant(subject, ref, catalogue[variant], work, seed, timeout, warmup)
        entry["variants"].append(record)
        if record["status"] != "ok":
            _log(f"[{name}] {variant} failed: {record['reason']}")
    if not keep_models:
        for model in work.glob("*.onnx*"):
            model.unlink()
    return entry


def run_variant(
    subject: Subject,
    ref: measure.Reference,
    variant: variants.Variant,
    work: Path,
    seed: int,
    timeout: float,
    warmup: int,
) -> dict[str, Any]:
    record: dict[str, Any] = {"name": variant.name, "tool": variant.tool, "description": variant.description}
    if variant.convert is None:
        path = subject.model_path
    else:
        path = work / f"{variant.name}.onnx"
        record.update(measure.convert(subject, variant.name, path, seed, timeout))
        if "error" in record:
            record.update(status="failed", reason="conversion: " + record.pop("error"))
            return record
    try:
        record.update(measure.measure(subject, ref, path, latency=variant.convert is not None, warmup=warmup))
    except Exception as exc:  # e.g. onnxruntime refuses the converted model
        record.update(status="failed", reason="measurement: " + _one_line(exc))
        return record
    record["status"] = "ok"
    return record


def _describe(subject: Subject, ref: measure.Reference, setup_seconds: float) -> dict[str, Any]:
    return {
        "family": subject.family,
        "model": _display_path(subject.model_path),
        "metric": subject.metric,
        "metric_kind": subject.metric_kind,
        "setup": subject.setup,
        "setup_seconds": round(setup_seconds, 2),
        "latency_runs": subject.latency_runs,
        "latency_feed": {k: list(v.shape) for k, v in subject.latency_feed.items()},
        "fp32": {
            "bytes": ref.bytes,
            "macs": ref.macs,
            "metric": ref.score.value,
            "secondary": ref.score.secondary,
        },
    }


def _new_results(
    args: argparse.Namespace, argv: list[str], subject_names: list[str], variant_names: list[str]
) -> dict[str, Any]:
    return {
        "meta": {
            "command": " ".join(["python -m benchmarks.run", *argv]),
            "started": _now(),
            "quick": args.quick,
            "seed": args.seed,
            "subjects": subject_names,
            "variants": variant_names,
            "machine": _machine(),
            "versions": _versions(),
        },
        "subjects": [],
    }


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def _versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".json.partial")
    staging.write_text(json.dumps(data, indent=1, default=_jsonable))
    staging.replace(path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", help="comma list of subjects or groups (samples, zoo, pretrained, all)")
    parser.add_argument("--variants", help="comma list of variants (fp32 is always measured)")
    parser.add_argument("--quick", action="store_true", help="fewer samples and latency runs (smoke checks)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for results.json and scratch files")
    parser.add_argument("--docs", default=str(DEFAULT_DOCS), help="Markdown report to generate")
    parser.add_argument("--no-docs", action="store_true", help="write results.json only")
    parser.add_argument("--cache", type=Path, default=CACHE, help="downloads and exported models (reused)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per conversion")
    parser.add_argument("--keep-models", action="store_true", help="keep the converted models in OUT/work")
    parser.add_argument("--list", action="store_true", help="list subjects and variants, then exit")
    return parser


if __name__ == "__main__":
    sys.exit(main())
