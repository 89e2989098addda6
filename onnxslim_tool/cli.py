"""The `onnxslim-tool` command line: flags in, API calls, tables out. Thin on purpose."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from onnxslim_tool import __version__, api, io, report
from onnxslim_tool.allocation import Target
from onnxslim_tool.cost import analyze_cost
from onnxslim_tool.data import ImageOptions, load_data
from onnxslim_tool.errors import BudgetError, OnnxSlimError
from onnxslim_tool.pruning.importance import CRITERIA
from onnxslim_tool.recipe import BUILTIN, DEFAULT_WITH_DATA, Recipe, recipe_from_flags, resolve
from onnxslim_tool.task_metrics import load_task_metric

app = typer.Typer(
    name="onnxslim-tool",
    help=(
        "Make a trained ONNX model smaller and faster, and measure with onnxruntime what it cost.\n\n"
        "Start with `inspect MODEL` to see where the parameters and MACs are, `compress MODEL -o OUT "
        "--data calib.npz` to rewrite it, and `evaluate ORIGINAL OUT --data eval.npz` to compare."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

InputShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        help="Fix a dynamic input shape, NAME=1x3x224x224 (repeatable). Unset dynamic dims count as 1.",
    ),
]
DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data", help=".npz keyed by input names (optional 'labels'), .npy (one input) or an image folder."
    ),
]
SyntheticOpt = Annotated[
    bool,
    typer.Option(
        "--synthetic", help="Use seeded random inputs (reports say so). Only when you have no data."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]
TaskMetricOpt = Annotated[
    str | None,
    typer.Option(
        "--task-metric",
        help="The score --max-drop (and analyze's drop) is measured in: detection-f1 "
        "(YOLOv8-style head [N, 4 + classes, anchors]: detections after score 0.25 / NMS 0.45, "
        "matched to the original's at IoU 0.5) "
        "or package.module:function taking (outputs, reference_outputs) and returning a score, "
        "higher is better. Without it, labelled data is judged by accuracy and unlabelled data by "
        "top-1 agreement or cosine over the whole output, which can stay near 1 while a detector "
        "loses most of its detections (its class scores slide under the threshold).",
        rich_help_panel="Accuracy budget and scope",
    ),
]

_IMAGES = "Image folder preprocessing (when --data is a folder of images)"
ImageSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--image-size",
        help="Resize to HxW, e.g. 224x224 (default: the model's input).",
        rich_help_panel=_IMAGES,
    ),
]
MeanOpt = Annotated[
    str | None,
    typer.Option(
        "--mean", help="Per-channel mean after --scale, e.g. 0.485,0.456,0.406.", rich_help_panel=_IMAGES
    ),
]
StdOpt = Annotated[
    str | None,
    typer.Option(
        "--std", help="Per-channel std after --scale, e.g. 0.229,0.224,0.225.", rich_help_panel=_IMAGES
    ),
]
ScaleOpt = Annotated[
    float | None,
    typer.Option(
        "--scale",
        help="Pixel multiplier before mean/std (default 1/255 for float inputs).",
        rich_help_panel=_IMAGES,
    ),
]
LayoutOpt = Annotated[
    str | None,
    typer.Option(
        "--layout", help="NCHW or NHWC (default: from the model's input shape).", rich_help_panel=_IMAGES
    ),
]
ColorOpt = Annotated[
    str | None,
    typer.Option(
        "--color", help="RGB, BGR or L (grey) (default: from the channel count).", rich_help_panel=_IMAGES
    ),
]


def image_options(
    size: str | None,
    mean: str | None,
    std: str | None,
    scale: float | None,
    layout: str | None,
    color: str | None,
) -> ImageOptions | None:
    if all(v is None for v in (size, mean, std, scale, layout, color)):
        return None
    if layout is not None and layout.upper() not in ("NCHW", "NHWC"):
        raise OnnxSlimError(f"--layout must be NCHW or NHWC, got '{layout}'")
    if color is not None and color.upper() not in ("RGB", "BGR", "L"):
        raise OnnxSlimError(f"--color must be RGB, BGR or L, got '{color}'")
    return ImageOptions(
        size=_ints(size, "--image-size", "x", 2) if size else None,
        mean=_floats(mean, "--mean") if mean else None,
        std=_floats(std, "--std") if std else None,
        scale=scale,
        layout=layout.upper() if layout else None,  # type: ignore[arg-type]
        color=color.upper() if color else None,  # type: ignore[arg-type]
    )


def _ints(text: str, flag: str, sep: str, count: int) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.lower().split(sep))
    except ValueError:
        raise OnnxSlimError(f"{flag} '{text}': expected integers like 224{sep}224") from None
    if len(values) != count:
        raise OnnxSlimError(f"{flag} '{text}': expected {count} values")
    return values


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise OnnxSlimError(f"{flag} '{text}': expected numbers separated by commas") from None


_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2}


def parse_size(text: str) -> int:
    """'2MB', '500kB', '1.5MiB' or a plain byte count into bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise OnnxSlimError(f"--target-size '{text}': expected bytes like 2000000, 500kB or 2MB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _target(size: str | None, latency: float | None, macs: float | None = None) -> Target | None:
    given = [name for name, v in (("size", size), ("latency", latency), ("macs", macs)) if v is not None]
    if len(given) > 1:
        raise OnnxSlimError(f"give one target, not {' and '.join('--target-' + g for g in given)}")
    if size is not None:
        return Target("size", parse_size(size))
    if macs is not None:
        return Target("macs", macs)
    return Target("latency", latency) if latency is not None else None


def _allocation_line(target: Target, allocation: dict[str, Any]) -> str:
    """One line: the target, where the allocation across layers and methods got, met or not."""
    reached = allocation["reached"]
    if reached is None:
        shown = "?"
    else:
        shown = f"{int(reached):,} bytes" if target.kind == "size" else f"{reached:.1%}"
    methods = sorted({option["method"] for option in allocation["chosen"]})
    return (
        f"{target.describe()} {'met' if allocation['met'] else 'NOT met'}: reached {shown}, "
        f"allocation over {len(allocation['chosen'])} layer(s) ({', '.join(methods) or 'none'})"
    )


def parse_layer_ratios(specs: list[str] | None) -> dict[str, float] | None:
    """PATTERN=R (repeatable) into {PATTERN: R}; the pass checks the range."""
    if not specs:
        return None
    ratios: dict[str, float] = {}
    for spec in specs:
        pattern, sep, value = spec.rpartition("=")
        try:
            if not sep or not pattern:
                raise ValueError
            ratios[pattern] = float(value)
        except ValueError:
            example = "e.g. 'conv5*=0.5'"
            raise OnnxSlimError(f"--layer-ratio '{spec}': expected PATTERN=RATIO, {example}") from None
    return ratios


def parse_input_shapes(specs: list[str] | None) -> dict[str, list[int]] | None:
    """NAME=1x3x224x224 (or NAME=1,3,224,224) into {NAME: [1, 3, 224, 224]}."""
    if not specs:
        return None
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition("=")
        if not sep or not name:
            raise OnnxSlimError(f"--input-shape '{spec}': expected NAME=1x3x224x224")
        try:
            shapes[name] = [int(d) for d in dims.replace(",", "x").split("x")]
        except ValueError:
            raise OnnxSlimError(
                f"--input-shape '{spec}': dimensions must be integers like 1x3x224x224"
            ) from None
    return shapes


def _emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _json_safe(value: Any) -> Any:
    """JSON has no inf/nan: write them as strings so any parser reads the report."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="The .onnx file to describe.")],
    input_shape: InputShapeOpt = None,
    top: Annotated[int | None, typer.Option(help="Show only the N layers with the most MACs.")] = None,
    groups: Annotated[
        bool,
        typer.Option("--groups", help="List the channel dependency groups structured pruning would use."),
    ] = False,
    json_output: JsonOpt = False,
) -> None:
    """Inputs/outputs, operator histogram, and per-layer params and MACs with totals."""
    loaded = io.load(model, lift_constants=False)
    if groups:
        _inspect_groups(model, json_output)
        return
    cost = analyze_cost(loaded, parse_input_shapes(input_shape))
    summary = cost.to_dict()
    summary = {
        "model": str(model),
        "total_macs": summary.pop("total_macs"),
        "total_params": summary.pop("total_params"),
        "file_bytes": io.file_size(model),
        **summary,
    }
    if json_output:
        _emit_json(_json_safe(summary))
    else:
        report.print_inspection(out, summary, top)


class _Silent:
    def update(self, _message: str) -> None:
        pass


@contextlib.contextmanager
def _status(message: str, quiet: bool) -> Iterator[Any]:
    """A spinner with the current step on stderr, or nothing with --quiet."""
    if quiet:
        yield _Silent()
        return
    with err.status(message, spinner="dots") as status:
        yield status


def _write_report(path: Path, payload: dict[str, Any], result: Any) -> None:
    """--report: JSON, Markdown or HTML by the file's extension."""
    from onnxslim_tool.report_files import result_markdown, write_text

    suffix = path.suffix.lower()
    if suffix == ".md":
        write_text(path, result_markdown(result))
    elif suffix in (".html", ".htm"):
        import html as _html

        body = _html.escape(result_markdown(result))
        write_text(
            path, f"<!doctype html><meta charset='utf-8'><title>onnxslim report</title><pre>{body}</pre>"
        )
    else:
        write_text(path, json.dumps(_json_safe(payload), indent=2, default=_json_default))


def _inspect_groups(model: Path, json_output: bool) -> None:
    from onnxslim_tool.pruning.depgraph import describe_groups, find_groups

    rows = describe_groups(find_groups(io.load(model)))
    if json_output:
        _emit_json(_json_safe({"model": str(model), "groups": rows}))
    else:
        report.print_groups(out, rows)


@app.command()
def evaluate(
    reference: Annotated[Path, typer.Argument(help="The original model.")],
    candidate: Annotated[Path, typer.Argument(help="The model to judge against it.")],
    data: DataOpt = None,
    synthetic: SyntheticOpt = False,
    threads: Annotated[
        int, typer.Option(help="onnxruntime intra-op threads for the latency measurement.")
    ] = 1,
    runs: Annotated[
        int, typer.Option(help="Timed runs per model (interleaved); the median is reported.")
    ] = 20,
    input_shape: InputShapeOpt = None,
    seed: Annotated[int, typer.Option(help="Seed for --synthetic inputs.")] = 0,
    json_output: JsonOpt = False,
    image_size: ImageSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    scale: ScaleOpt = None,
    layout: LayoutOpt = None,
    color: ColorOpt = None,
) -> None:
    """Compare CANDIDATE with REFERENCE on the same inputs: fidelity, accuracy, size and latency."""
    ref_model = io.load(reference)
    dataset = load_data(
        data,
        ref_model,
        synthetic=synthetic,
        seed=seed,
        input_shapes=parse_input_shapes(input_shape),
        image_options=image_options(image_size, mean, std, scale, layout, color),
    )
    result = api.evaluate(reference, candidate, dataset, threads=threads, runs=runs)
    if json_output:
        _emit_json(_json_safe(result))
    else:
        report.print_evaluation(out, result)


_PRUNE = "Structured pruning (whole channels/filters/neurons)"
_BLOCKS = "Block dropping and exact layer merging"
_LOWRANK = "Low-rank factorization"
_SHARE = "Weight sharing and magnitude pruning"
_QUANT = "Quantization"
_BUDGET = "Accuracy budget and scope"


@app.command()
def compress(
    model: Annotated[Path, typer.Argument(help="The .onnx model to compress (never modified).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the compressed model.")],
    data: DataOpt = None,
    eval_data: Annotated[
        Path | None,
        typer.Option("--eval-data", help="Held-out data to judge accuracy (else --data is split)."),
    ] = None,
    synthetic: SyntheticOpt = False,
    recipe_name: Annotated[
        str | None,
        typer.Option("--recipe", help="A built-in recipe (see `onnxslim-tool recipes`) or a YAML/JSON file."),
    ] = None,
    prune_channels: Annotated[
        float | None,
        typer.Option(
            "--prune-channels",
            help="Fraction of channels to remove per prunable group, e.g. 0.3.",
            rich_help_panel=_PRUNE,
        ),
    ] = None,
    target_macs: Annotated[
        float | None,
        typer.Option(
            "--target-macs",
            help="Alone (no other method or pruning flag): search per-layer methods and settings "
            "(channel pruning, low rank; measured sensitivity) until MACs are at most this fraction "
            "of the original, e.g. 0.7, like --target-size. With --prune-channels, --criterion, "
            "--round-to, --layer-ratio, --prune-ends, --no-reconstruct or another method flag: "
            "channel pruning alone removes channels until MACs are at most this fraction.",
            rich_help_panel=_PRUNE,
        ),
    ] = None,
    criterion: Annotated[
        str | None,
        typer.Option(
            help=f"Channel importance: {', '.join(CRITERIA)} (default l1).",
            rich_help_panel=_PRUNE,
        ),
    ] = None,
    no_reconstruct: Annotated[
        bool,
        typer.Option(
            "--no-reconstruct",
            help="Skip the least-squares refit of the next layers.",
            rich_help_panel=_PRUNE,
        ),
    ] = False,
    round_to: Annotated[
        int | None,
        typer.Option(
            "--round-to", help="Keep channel counts a multiple of N (8 runs fastest).", rich_help_panel=_PRUNE
        ),
    ] = None,
    target_size: Annotated[
        str | None,
        typer.Option(
            "--target-size",
            help="Search per-layer methods and settings (weight sharing, channel pruning, low rank; "
            "measured sensitivity) until the model is at most this size: bytes, or with kB/MB/GB, "
            "e.g. 2MB. Exit code 2 when the target is out of reach.",
            rich_help_panel=_BUDGET,
        ),
    ] = None,
    target_latency: Annotated[
        float | None,
        typer.Option(
            "--target-latency",
            help="Same search until onnxruntime CPU latency (batch 1) is at most this "
            "fraction of the original's, e.g. 0.7.",
            rich_help_panel=_BUDGET,
        ),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option("--jobs", help="Parallel evaluations (joblib) for target searches; -1 = all cores."),
    ] = 1,
    target_layers: Annotated[
        int,
        typer.Option(
            "--target-layers",
            help="Target searches measure this many layers, those with the most MACs (fewer: faster).",
            rich_help_panel=_BUDGET,
        ),
    ] = 24,
    layer_ratio: Annotated[
        list[str] | None,
        typer.Option(
            "--layer-ratio",
            help="Per-layer override PATTERN=R (glob on a group's producer names), e.g. "
            "'*/head/*=0' or 'conv5*=0.5' (repeatable).",
            rich_help_panel=_PRUNE,
        ),
    ] = None,
    prune_ends: Annotated[
        bool,
        typer.Option(
            "--prune-ends",
            help="Also prune the first layer's outputs and the final layer's inputs "
            "(protected by default: they cost the most accuracy per MAC).",
            rich_help_panel=_PRUNE,
        ),
    ] = False,
    drop_blocks: Annotated[
        int | None,
        typer.Option(
            "--drop-blocks",
            help="Remove the N residual blocks (ResNet, transformer sub-blocks) whose removal "
            "costs least on the calibration data; the report lists every candidate's cost.",
            rich_help_panel=_BLOCKS,
        ),
    ] = None,
    drop_blocks_macs: Annotated[
        float | None,
        typer.Option(
            "--drop-blocks-macs",
            help="Drop the cheapest residual blocks until MACs are at most this fraction of "
            "the original, e.g. 0.8 (with --drop-blocks: whichever comes first).",
            rich_help_panel=_BLOCKS,
        ),
    ] = None,
    merge_layers: Annotated[
        bool,
        typer.Option(
            "--merge-layers",
            help="Fold constant Mul/Add/Sub/Div into the adjacent Conv/Gemm/MatMul and merge "
            "back-to-back linear layers when that lowers MACs and params (exact).",
            rich_help_panel=_BLOCKS,
        ),
    ] = False,
    lowrank: Annotated[
        float | None,
        typer.Option(
            "--lowrank", help="Fraction of each layer's params to keep, e.g. 0.5.", rich_help_panel=_LOWRANK
        ),
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option(
            "--energy",
            help="Keep this fraction of squared singular values instead.",
            rich_help_panel=_LOWRANK,
        ),
    ] = None,
    lowrank_method: Annotated[
        str | None,
        typer.Option(
            "--lowrank-method", help="svd, spatial-svd, cp or tucker (for convs).", rich_help_panel=_LOWRANK
        ),
    ] = None,
    lowrank_rank: Annotated[
        str | None,
        typer.Option(
            "--lowrank-rank",
            help="How ranks are chosen: ratio (--lowrank), energy (--energy) or vbmf (variational "
            "Bayesian estimate of each layer's rank, no setting needed; not for cp).",
            rich_help_panel=_LOWRANK,
        ),
    ] = None,
    prune_weights: Annotated[
        float | None,
        typer.Option(
            "--prune-weights", help="Target sparsity of individual weights, e.g. 0.8.", rich_help_panel=_SHARE
        ),
    ] = None,
    share_bits: Annotated[
        int | None,
        typer.Option(
            "--share-bits", help="Codebook of 2^B shared values per layer (1-8).", rich_help_panel=_SHARE
        ),
    ] = None,
    share_method: Annotated[
        str | None,
        typer.Option(
            "--share-method",
            help="kmeans (default), hash, ternary ({-a,0,+a}, 2-bit) or pow2 (0 and +-2^e).",
            rich_help_panel=_SHARE,
        ),
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="int8 (static QDQ), int8-dynamic, int8-weights or int4-weights.", rich_help_panel=_QUANT
        ),
    ] = None,
    calibrator: Annotated[
        str | None,
        typer.Option(help="Static int8 ranges: minmax, entropy or percentile.", rich_help_panel=_QUANT),
    ] = None,
    speed_guard: Annotated[
        bool,
        typer.Option(
            "--speed-guard",
            help="If the latency probe measures the quantized model slower than fp32 on this CPU, "
            "keep int8-weights instead (float speed, 4x smaller weights), or leave the model as it was.",
            rich_help_panel=_QUANT,
        ),
    ] = False,
    max_drop: Annotated[
        float | None,
        typer.Option(
            "--max-drop",
            help="Largest allowed metric drop, as a fraction (0.01 = 1 point); passes "
            "that break it are backed off or rolled back. The metric: see --task-metric.",
            rich_help_panel=_BUDGET,
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude",
            help="Node name or op type glob to leave untouched (repeatable).",
            rich_help_panel=_BUDGET,
        ),
    ] = None,
    keep_best: Annotated[
        bool,
        typer.Option(
            "--keep-best",
            help="Write the best model found even when the budget is missed.",
            rich_help_panel=_BUDGET,
        ),
    ] = False,
    input_shape: InputShapeOpt = None,
    report_path: Annotated[
        Path | None, typer.Option("--report", help="Also write the JSON report here.")
    ] = None,
    seed_option: Annotated[
        int | None,
        typer.Option(
            "--seed",
            help="Seed for every random choice; same seed, same output bytes. "
            "Default: the recipe file's seed, else 0.",
        ),
    ] = None,
    task_metric: TaskMetricOpt = None,
    json_output: JsonOpt = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print nothing but errors (for pipelines).")
    ] = False,
    image_size: ImageSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    scale: ScaleOpt = None,
    layout: LayoutOpt = None,
    color: ColorOpt = None,
) -> None:
    """Rewrite MODEL into a smaller/faster model at OUT, validated pass by pass.

    With no method flag it runs the lossless cleanup: constant folding, BatchNorm folding,
    Identity/Dropout removal, dead code and duplicate weights removal. Method flags combine
    (e.g. --prune-channels 0.3 --quantize int8); lossy methods need --data (or --synthetic).

    Exit codes: 0 written; 1 bad input or refusal (one line on stderr); 2 the accuracy budget
    could not be met (nothing written unless --keep-best).
    """
    if io.same_file(model, output) or model.resolve() == output.resolve():
        raise OnnxSlimError(f"output path is the input path: {output} (the input is never overwritten)")
    io.check_writable(output)  # fail before the work, not after it
    if task_metric is not None:
        load_task_metric(task_metric)  # a bad spec: one line naming it, before anything else
    other_methods = (prune_channels, layer_ratio, lowrank, energy, lowrank_rank)
    other_methods += (
        prune_weights,
        share_bits,
        share_method,
        quantize,
        drop_blocks,
        drop_blocks_macs,
        merge_layers or None,
    )
    method_flags = (target_macs, *other_methods)
    # --target-macs alone is a target for the cross-method search; beside any pruning or
    # method flag it stays channel pruning's own MACs goal (recipes and scripts rely on that).
    pruning_options = (criterion, round_to, no_reconstruct or None, prune_ends or None)
    macs_alone = (
        target_macs is not None
        and recipe_name is None
        and all(f is None for f in (*other_methods, *pruning_options))
    )
    target = _target(target_size, target_latency, target_macs if macs_alone else None)
    if recipe_name is not None and any(f is not None for f in method_flags):
        raise OnnxSlimError("give either --recipe or method flags (put the methods in the recipe)")
    if (
        target is not None
        and not macs_alone
        and (recipe_name is not None or any(f is not None for f in method_flags))
    ):
        raise OnnxSlimError(
            "--target-size/--target-latency choose the methods themselves: drop the method flags"
        )
    if macs_alone and not quiet:
        err.print(
            "--target-macs alone: searching channel pruning and low rank per layer for the target "
            "(with --criterion or another pruning flag it is channel pruning's own goal)"
        )
    if target is None and recipe_name is None and data is not None and all(f is None for f in method_flags):
        recipe_name = DEFAULT_WITH_DATA
        if not quiet:
            err.print(
                f"no method flag given: using the '{recipe_name}' recipe "
                f"({BUILTIN[recipe_name]['description']})"
            )
    if target is not None:
        chosen = Recipe([], max_drop=max_drop, seed=seed_option or 0, name=f"target-{target.kind}")
    elif recipe_name is not None:
        chosen = resolve(recipe_name)
        if seed_option is not None:
            chosen.seed = seed_option
        if max_drop is not None:
            chosen.max_drop = max_drop
    else:
        chosen = recipe_from_flags(
            prune_channels=prune_channels,
            target_macs=target_macs,
            criterion=criterion,
            reconstruct=not no_reconstruct,
            round_to=round_to,
            layer_ratios=parse_layer_ratios(layer_ratio),
            prune_ends=prune_ends,
            drop_blocks=drop_blocks,
            drop_blocks_macs=drop_blocks_macs,
            merge_layers=merge_layers,
            prune_weights=prune_weights,
            lowrank=lowrank,
            energy=energy,
            lowrank_method=lowrank_method,
            lowrank_rank=lowrank_rank,
            share_bits=share_bits,
            share_method=share_method,
            quantize=quantize,
            calibrator=calibrator,
            speed_guard=speed_guard,
            max_drop=max_drop,
            exclude=exclude,
            seed=seed_option or 0,
        )
    if task_metric is not None:
        chosen.task_metric = task_metric  # the flag overrides a recipe file's
    seed = chosen.seed
    chosen.validate()  # a bad metric or parameter fails here, before any data is read
    chosen.build()
    loaded = io.load(model)
    shapes = parse_input_shapes(input_shape)
    images = image_options(image_size, mean, std, scale, layout, color)
    calibration = (
        load_data(data, loaded, synthetic=synthetic, seed=seed, input_shapes=shapes, image_options=images)
        if (data is not None or synthetic)
        else None
    )
    held_out = (
        load_data(eval_data, loaded, input_shapes=shapes, image_options=images)
        if eval_data is not None
        else None
    )
    with _status("compressing", quiet) as status:
        result = api.compress(
            model,
            calibration,
            recipe=None if target is not None else chosen,
            eval_data=held_out,
            input_shapes=shapes,
            progress=lambda msg: status.update(msg),
            target=target,
            max_drop=max_drop if target is not None else None,
            seed=seed,
            n_jobs=jobs,
            target_layers=target_layers,
            task_metric=chosen.task_metric,
        )
    target_missed = result.allocation is not None and not result.allocation["met"]
    missed = bool(result.over_budget) or target_missed
    written = result.save(output) if (not missed or keep_best) else None
    payload = {
        "output": str(written) if written else None,
        "written_bytes": result.after.bytes if written else None,
        "recipe": chosen.to_dict(),
        **result.to_dict(),
    }
    if report_path is not None:
        _write_report(report_path, payload, result)
    if json_output:
        _emit_json(_json_safe(payload))
    elif not quiet:
        report.print_result(out, result)
        if result.allocation is not None:
            for note in result.allocation["notes"]:
                out.print(f"target search: {note}")
            out.print(f"target search: {_allocation_line(target, result.allocation)}")  # type: ignore[arg-type]
        if written:
            out.print(f"wrote {written}")
    if target_missed:
        raise BudgetError(
            f"target {target.describe()} not met: reached {result.allocation['reached']:.4g}"
            + ("" if written else " (nothing written; --keep-best writes the best model found)")
        )
    if missed:
        names = ", ".join(s.name for s in result.over_budget)
        raise BudgetError(
            f"accuracy budget {chosen.max_drop} not met by: {names}"
            + ("" if written else " (nothing written; --keep-best writes the best model found)")
        )


@app.command()
def analyze(
    model: Annotated[Path, typer.Argument(help="The .onnx model to analyse.")],
    data: DataOpt = None,
    eval_data: Annotated[
        Path | None, typer.Option("--eval-data", help="Held-out data to measure on (else --data is split).")
    ] = None,
    synthetic: SyntheticOpt = False,
    method: Annotated[str, typer.Option(help="prune, lowrank, share or quantize.")] = "prune",
    settings: Annotated[
        str | None, typer.Option(help="Comma-separated values to sweep (default depends on the method).")
    ] = None,
    max_layers: Annotated[
        int | None, typer.Option("--max-layers", help="Only the N layers with the most MACs.")
    ] = None,
    jobs: Annotated[int, typer.Option(help="Parallel jobs (joblib); -1 = all cores.")] = 1,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for the JSON, Markdown and HTML reports.")
    ] = Path("onnxslim-analysis"),
    input_shape: InputShapeOpt = None,
    seed: Annotated[int, typer.Option(help="Seed for the data split and the passes.")] = 0,
    task_metric: TaskMetricOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Per layer, how much the metric drops when that layer alone is compressed, at several settings."""
    from onnxslim_tool.report_files import sensitivity_html, sensitivity_markdown, write_text
    from onnxslim_tool.sensitivity import METHODS, scan

    if method not in METHODS:
        raise OnnxSlimError(f"--method must be one of: {', '.join(METHODS)}")
    metric = load_task_metric(task_metric) if task_metric is not None else None
    loaded = io.load(model)
    shapes = parse_input_shapes(input_shape)
    dataset = load_data(data, loaded, synthetic=synthetic, seed=seed, input_shapes=shapes)
    if eval_data is not None:
        calibration, evaluation = dataset, load_data(eval_data, loaded, input_shapes=shapes)
    elif len(dataset) >= 2:
        calibration, evaluation = dataset.split(0.5, seed=seed)
    else:
        raise OnnxSlimError("analyze needs at least 2 samples (half calibrates, half measures)")
    values = [_setting(v) for v in settings.split(",")] if settings else None
    with err.status(f"scanning {method} sensitivity", spinner="dots"):
        result = scan(
            loaded,
            method,
            calibration,
            evaluation,
            settings=values,
            max_layers=max_layers,
            n_jobs=jobs,
            seed=seed,
            task_metric=metric,
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"sensitivity_{method}"
    payload = _json_safe(result.to_dict())
    write_text(stem.with_suffix(".json"), json.dumps(payload, indent=2, default=_json_default))
    write_text(stem.with_suffix(".md"), sensitivity_markdown(result))
    write_text(stem.with_suffix(".html"), sensitivity_html(result))
    if json_output:
        _emit_json(payload)
    else:
        report.print_sensitivity(out, result)
        out.print(f"wrote {stem}.json, .md and .html")


def _setting(text: str) -> Any:
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@app.command()
def recipes(json_output: JsonOpt = False) -> None:
    """List the built-in recipes (use one with `compress --recipe NAME`)."""
    if json_output:
        _emit_json(BUILTIN)
        return
    report.print_recipes(out, BUILTIN)


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        out.print(f"onnxslim-tool {__version__}")
        raise typer.Exit()


def main() -> None:
    """Entry point: one clear line and exit 1 on a refusal, 2 on a missed budget, 130 on Ctrl-C."""
    try:
        code = app(standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C into a returned exit code
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except OnnxSlimError as exc:
        err.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2 if isinstance(exc, BudgetError) else 1)
    except KeyboardInterrupt:
        err.print("interrupted: no output was written", markup=False)
        sys.exit(130)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code or 0)
    except Exception as exc:  # usage errors and real bugs: still one line, never a traceback
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # usage errors (typer's click)
            err.print(f"error: {_usage_message(exc)}", markup=False, highlight=False, soft_wrap=True)
            sys.exit(1)
        if os.environ.get("ONNXSLIM_DEBUG"):
            traceback.print_exc()
        err.print(
            f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
            "(set ONNXSLIM_DEBUG=1 for the traceback)",
            markup=False,
            soft_wrap=True,
        )
        sys.exit(1)


def _usage_message(exc: Any) -> str:
    """'Missing option '-o'' rather than the parameter's Python name; one line, with where."""
    message = " ".join(str(exc.format_message()).split())
    param = getattr(exc, "param", None)
    if param is not None and getattr(param, "opts", None) and type(exc).__name__ == "MissingParameter":
        kind = "argument" if type(param).__name__.endswith("Argument") else "option"
        name = param.opts[0].upper() if kind == "argument" else " / ".join(param.opts)
        message = f"missing {kind} {name}"
    elif param is not None and getattr(param, "opts", None) and param.opts[0] not in message:
        message = f"{' / '.join(param.opts)}: {message}"
    return message + " (see --help)"


if __name__ == "__main__":
    main()
