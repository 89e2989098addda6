"""Get a float model ready for onnxruntime's quantizer, and say what could not be done.

Steps: lift Constant-node weights (the quantizer only sees initializers), the lossless cleanup
(BatchNorm folded into convs, constants folded), an opset recent enough for per-channel
DequantizeLinear, onnxruntime's `quant_pre_process` (shape inference + basic graph
optimisation) with its fragile symbolic shape inference tried first and dropped when it
fails, and a name on every node (the quantizer selects and excludes nodes by name).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxslim_tool import io
from onnxslim_tool.errors import PassError
from onnxslim_tool.passes.normalize import Cleanup

# DequantizeLinear takes a per-channel `axis` from opset 13; onnxruntime quantizes from 10.
PER_CHANNEL_OPSET = 13
MIN_QUANT_OPSET = 10


@dataclass
class Prepared:
    model: ir.Model
    per_channel: bool


def prepare(model: ir.Model, workdir: Path, *, per_channel: bool, notes: list[str]) -> Prepared:
    """A cleaned, pre-processed float copy of `model`; `model` itself is not touched."""
    work = io.load(model, lift_constants=True)
    Cleanup()(work)
    work, per_channel = ensure_opset(work, per_channel, notes)
    work = pre_process(work, workdir, notes)
    name_nodes(work)
    return Prepared(work, per_channel)


def onnx_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def ensure_opset(model: ir.Model, per_channel: bool, notes: list[str]) -> tuple[ir.Model, bool]:
    """Upgrade old opsets; per-channel scales on opset < 13 write models onnxruntime refuses."""
    opset = onnx_opset(model)
    wanted = PER_CHANNEL_OPSET if per_channel else MIN_QUANT_OPSET
    if opset >= wanted:
        return model, per_channel
    try:
        upgraded = onnx.version_converter.convert_version(ir.to_proto(model), PER_CHANNEL_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:
        if opset >= MIN_QUANT_OPSET:
            notes.append(
                f"opset {opset} could not be upgraded to {PER_CHANNEL_OPSET} ({_one_line(exc)}): "
                "weights use per-tensor scales (per-channel DequantizeLinear needs opset 13)"
            )
            return model, False
        raise PassError(
            f"opset {opset} is too old to quantize and could not be upgraded: {_one_line(exc)}"
        ) from exc
    notes.append(f"opset upgraded {opset} -> {PER_CHANNEL_OPSET} (per-channel DequantizeLinear needs 13)")
    return ir.from_proto(upgraded), per_channel


def pre_process(model: ir.Model, workdir: Path, notes: list[str]) -> ir.Model:
    """onnxruntime's quant_pre_process; without symbolic shape inference when that fails."""
    from onnxruntime.quantization import quant_pre_process

    out = workdir / "preprocessed.onnx"
    # A file, not a ModelProto: given a proto, quant_pre_process moves the weights out of it and
    # onnxruntime's optimizer then cannot read constant inputs such as Split sizes.
    source = workdir / "cleaned.onnx"
    io.save(model, source)
    try:
        with working_directory(workdir):  # on failure it drops a debug model into the cwd
            quant_pre_process(source, out)
        return io.load(out, lift_constants=False)
    except Exception as exc:
        symbolic_error = _one_line(exc)
    try:
        quant_pre_process(source, out, skip_symbolic_shape=True)
        notes.append(
            f"quant_pre_process: symbolic shape inference failed ({symbolic_error}); "
            "ran with skip_symbolic_shape=True (ONNX shape inference only)"
        )
        return io.load(out, lift_constants=False)
    except Exception as exc:
        notes.append(f"quant_pre_process failed ({_one_line(exc)}); quantizing the cleaned model without it")
        return model


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def name_nodes(model: ir.Model) -> None:
    """Give every node a unique name; onnxruntime's include/exclude lists match node names."""
    taken: set[str] = set()
    for index, node in enumerate(model.graph):
        if node.name and node.name not in taken:
            taken.add(node.name)
            continue
        name = node.name or f"{node.op_type}_{index}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
