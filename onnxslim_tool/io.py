"""Loading and saving models: the only place that touches files.

`load` turns any ONNX file (embedded or external data, IR 3+, opsets 7+) into an
`onnx_ir.Model` with weights as initializers. `save` writes atomically and switches to
external data when the weights would not fit in one protobuf.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.external_data import load_to_model, set_base_dir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from onnxslim_tool.errors import ModelLoadError, OnnxSlimError

# Protobuf refuses messages of 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
# Below this many weight bytes a model is pulled fully into memory at load (simple, portable
# sessions); above it tensors stay memory-mapped from the external data file.
IN_MEMORY_LIMIT = EXTERNAL_DATA_THRESHOLD


def load(
    source: str | os.PathLike | bytes | onnx.ModelProto | ir.Model, *, lift_constants: bool = True
) -> ir.Model:
    """Load a model from a path, serialized bytes, a ModelProto or an ir.Model (copied).

    Raises ModelLoadError with a one-line message for every way a file can be unusable.
    """
    if isinstance(source, ir.Model):
        model = copy_model(source)
    elif isinstance(source, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(source)  # onnx_ir wraps protos without copying: keep the caller's intact
        model = ir.from_proto(copy)
    elif isinstance(source, bytes):
        model = _parse_bytes(source, "<bytes>")
    else:
        model = _load_path(Path(source))
    _check_structure(model)
    if lift_constants:
        lift_constant_weights(model)
    return model


def copy_model(model: ir.Model) -> ir.Model:
    """An independent copy; memory-mapped external tensors stay external and readable."""
    copy = ir.from_proto(ir.to_proto(model))
    base_dirs = {t.base_dir for t in _external_tensors(model)}
    if len(base_dirs) == 1:  # the proto round trip drops where the data file lives
        set_base_dir(copy.graph, base_dirs.pop())
    elif base_dirs:
        load_to_model(copy)
    return copy


def _external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value


def _load_path(path: Path) -> ir.Model:
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelLoadError(f"model path is a directory, not an .onnx file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"model file is empty: {path}")
    try:
        # onnx_ir memory-maps external data, so even multi-GB models load in ~no time.
        model = ir.load(path)
    except Exception as exc:  # protobuf raises several unrelated types on garbage
        raise ModelLoadError(
            f"not a readable ONNX model (truncated or not ONNX?): {path}: {_first_line(exc)}"
        ) from exc
    _check_external_data(model, path)
    if weight_bytes(model) <= IN_MEMORY_LIMIT:
        load_to_model(model)
    return model


def _parse_bytes(data: bytes, label: str) -> ir.Model:
    if not data:
        raise ModelLoadError(f"model is empty: {label}")
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as exc:
        raise ModelLoadError(f"not a readable ONNX model: {label}: {_first_line(exc)}") from exc
    return ir.from_proto(proto)


def _check_structure(model: ir.Model) -> None:
    """Protobuf parses many non-ONNX byte strings without error; insist on a real graph."""
    graph = model.graph
    if not model.opset_imports or len(graph.outputs) == 0:
        raise ModelLoadError("not an ONNX model: it has no opset imports or no graph outputs")
    if model.ir_version is None or model.ir_version < 3:
        raise ModelLoadError(f"unsupported IR version {model.ir_version}: need 3 or newer")


def _check_external_data(model: ir.Model, path: Path) -> None:
    """A missing or short external data file would otherwise fail deep inside a pass."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.ExternalTensor):
                continue
            data_path = Path(tensor.base_dir) / tensor.location
            if not data_path.is_file():
                raise ModelLoadError(f"external data file missing for tensor '{value.name}': {data_path}")
            needed = (tensor.offset or 0) + (tensor.length or 0)
            if data_path.stat().st_size < needed:
                raise ModelLoadError(
                    f"external data file {data_path} is truncated: '{value.name}' needs {needed} bytes"
                )


def check_finite_weights(model: ir.Model) -> None:
    """Refuse weights holding NaN/Inf: every measurement on such a model would be meaningless."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or not tensor.dtype.is_floating_point():
                continue
            array = tensor.numpy()
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if bad:
                raise ModelLoadError(
                    f"weight '{value.name}' holds {bad} NaN/Inf value(s): fix the model first"
                )


def lift_constant_weights(model: ir.Model) -> None:
    """Weights stored as Constant nodes (Paddle, some TF exports) become initializers.

    Every later pass (BN folding, pruning, quantization) looks for initializers.
    """
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)


def weight_bytes(model: ir.Model) -> int:
    """Bytes held by the initializers of the model (all graphs), stored or external."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def has_external_tensors(model: ir.Model) -> bool:
    return any(True for _ in _external_tensors(model))


def save(model: ir.Model, path: str | os.PathLike, *, external_data_threshold: int | None = None) -> Path:
    """Write `model` to `path` atomically; external data (`<name>.data`) above the threshold.

    Files are written into a temporary folder beside the target and renamed into place, so
    an interrupted run never leaves a half-written model under the final name.
    """
    path = Path(path)
    parent = check_writable(path)
    if external_data_threshold is None:  # read at call time so tests can lower it module-wide
        external_data_threshold = EXTERNAL_DATA_THRESHOLD
    external = weight_bytes(model) > external_data_threshold
    data_name = path.name + ".data"
    with _staging_dir(parent) as staging:
        staged = staging / path.name
        if external:
            # Small tensors stay inline; the lowered threshold of tests moves everything out.
            per_tensor = min(1024, external_data_threshold)
            ir.save(model, staged, external_data=data_name, size_threshold_bytes=per_tensor)
        else:
            if has_external_tensors(model):
                # Saving as-is would keep references to the *input's* data file.
                load_to_model(model)
            onnx.save(to_compact_proto(model), str(staged))
        if external:
            os.replace(staging / data_name, parent / data_name)
        os.replace(staged, path)
    if not external:
        stale = parent / data_name
        with contextlib.suppress(FileNotFoundError):
            # A data file left from an earlier, larger save would confuse the reader.
            if stale.is_file() and not _referenced_by(path, data_name):
                stale.unlink()
    return path


def check_writable(path: str | os.PathLike) -> Path:
    """The folder `path` would be written into, after checking it exists and is writable."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OnnxSlimError(f"output path is a directory: {path}")
    if not parent.is_dir():
        raise OnnxSlimError(f"output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise OnnxSlimError(f"output directory is not writable: {parent}")
    return parent


def _referenced_by(model_path: Path, data_name: str) -> bool:
    proto = onnx.load(str(model_path), load_external_data=False)
    return any(
        entry.key == "location" and entry.value == data_name
        for t in proto.graph.initializer
        for entry in t.external_data
    )


@contextlib.contextmanager
def _staging_dir(parent: Path) -> Iterator[Path]:
    staging = Path(tempfile.mkdtemp(prefix=".onnxslim-", dir=parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def to_compact_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto without value_info for initializers (the tensor has its type)."""
    proto = ir.to_proto(model)
    _drop_initializer_value_info(proto.graph)
    return proto


def _drop_initializer_value_info(graph: onnx.GraphProto) -> None:
    names = {t.name for t in graph.initializer}
    kept = [vi for vi in graph.value_info if vi.name not in names]
    if len(kept) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(kept)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                _drop_initializer_value_info(attribute.g)
            for sub in attribute.graphs:
                _drop_initializer_value_info(sub)


def serialized_size(model: ir.Model) -> int:
    """Bytes the model would take on disk (graph + weights), without writing it."""
    if weight_bytes(model) > EXTERNAL_DATA_THRESHOLD or has_external_tensors(model):
        proto_without_weights = ir.to_proto(model)
        for t in proto_without_weights.graph.initializer:
            t.ClearField("raw_data")
        return proto_without_weights.ByteSize() + weight_bytes(model)
    return to_compact_proto(model).ByteSize()


def file_size(path: str | os.PathLike) -> int:
    """Bytes of a model file plus the external data files it references."""
    path = Path(path)
    total = path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value for t in proto.graph.initializer for entry in t.external_data if entry.key == "location"
    }
    for loc in locations:
        data = path.parent / loc
        if data.is_file():
            total += data.stat().st_size
    return total


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths name one file (also through symlinks and hard links)."""
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
