"""Calibration and evaluation data: load it, check it against a model, and cut it into onnxruntime feeds.

Data layout
-----------
Every array holds N samples along axis 0, and axis 0 stands in for the model input's first (batch)
dimension: for a model input ``[batch, 3, 224, 224]`` the data array is ``[N, 3, 224, 224]``. When the
model's first dim is a static 1 the data may also be given as ``[N, 1, 3, 224, 224]``; ``validate``
drops the extra axis. Rank-0 (scalar) model inputs take data of shape ``[N]`` and are fed one value
per run.

Whole feeds
-----------
Some models have no batch axis shared by all inputs: a recurrent state ``[2, batch, 128]`` beside an
audio chunk ``[batch, 576]``, or node-level graphs with inputs ``[3, 4]`` and ``[4]``. Their data is
given as N complete feeds stacked on a new axis 0: every array is ``[N, *model shape]`` (``[N, 1,
576]``, ``[N, 2, 1, 128]``), and feed ``i`` is exactly ``{name: arr[i]}``. ``validate`` reads data
this way when the arrays have one more axis than the model inputs and the per-sample reading above
does not fit; such data is never re-batched.

Batching
--------
``validate`` learns ``fixed_batch`` from the model: the static first dim of its inputs (1 for a model
exported with batch size 1), or ``None`` when that dim is symbolic. ``batches(batch_size)`` then yields
feeds of exactly ``fixed_batch`` samples when it is set (``batch_size`` is ignored, the trailing
partial batch is dropped) and of up to ``batch_size`` samples otherwise. ``batch_slices`` gives the
sample range of each batch, e.g. to pick the matching ``labels``.

Sources
-------
``load_data`` accepts ``.npz`` (keys = input names, plus an optional ``labels`` array), ``.npy``
(single-input models only), or a folder of images (see ``ImageOptions``). Random data is produced
only when asked for with ``synthetic=True`` and is marked ``synthetic`` so reports can say so.
"""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxslim_tool.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
LABELS_KEY = "labels"
# Synthetic integer inputs are often token ids or indices: keep them small so they stay in range.
_SYNTHETIC_INT_HIGH = 10

Dim = int | str
InputShapes = Mapping[str, Sequence[int] | int]


@dataclass(frozen=True)
class InputSpec:
    """One graph input the caller must feed.

    ``shape`` is ``None`` when the rank is unknown; symbolic dims are their name, unnamed ones ``"?"``.
    ``dtype`` is ``None`` when the model does not declare the element type.
    """

    name: str
    shape: tuple[Dim, ...] | None
    dtype: np.dtype | None

    @property
    def sample_shape(self) -> tuple[Dim, ...] | None:
        """The shape of one sample: the model shape without its batch dim."""
        if self.shape is None:
            return None
        return self.shape[1:]


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The graph inputs that are not initializers, in graph order."""
    specs = []
    for value in model.graph.inputs:
        # An input backed by an initializer has a default and need not be fed.
        if value.const_value is not None or value.name in model.graph.initializers:
            continue
        specs.append(InputSpec(str(value.name), _spec_shape(value.shape), _spec_dtype(value.dtype)))
    return specs


def _spec_shape(shape: ir.Shape | None) -> tuple[Dim, ...] | None:
    if shape is None:
        return None
    dims: list[Dim] = []
    for dim in shape:
        if isinstance(dim, int):
            dims.append(dim)
        else:
            dims.append(str(dim.value) if dim.value is not None else "?")
    return tuple(dims)


def _spec_dtype(dtype: ir.DataType | None) -> np.dtype | None:
    if dtype is None or dtype == ir.DataType.UNDEFINED:
        return None
    try:
        return np.dtype(dtype.numpy())
    except (TypeError, ValueError):
        return None


def _as_specs(model_or_specs: ir.Model | Sequence[InputSpec]) -> list[InputSpec]:
    if isinstance(model_or_specs, ir.Model):
        return input_specs(model_or_specs)
    return list(model_or_specs)


@dataclass(frozen=True)
class ImageOptions:
    """How a folder of images becomes one float (or integer) input tensor.

    Each pixel goes ``value * scale``, then ``(value - mean) / std`` per channel. ``mean`` and ``std``
    are in the scaled units (e.g. ``0.485`` with ``scale=1/255``) and in the output channel order, so
    with ``color="BGR"`` they are given as (B, G, R). A single value applies to all channels.

    Fields left as ``None`` come from the model input where it is static: ``size`` (H, W) from the
    spatial dims, ``layout`` from which of dims 1 or 3 has size 1 or 3 (``NCHW`` if neither),
    ``color`` ``"L"`` for one channel else ``"RGB"``, ``dtype`` from the input's element type.
    ``scale`` defaults to 1/255 for float outputs and 1 for integer ones. Without a size from either
    source all images must share one size. Images are resized with bilinear filtering.

    Labels: when the folder holds class subfolders (``cat/``, ``dog/``...) the sorted subfolder names
    become int labels 0, 1, ... (hidden folders skipped; an empty folder still takes its index, as in
    torchvision's ImageFolder). Images directly in the folder have no labels. Files are read in sorted
    name order; other extensions are ignored.
    """

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float | None = None
    layout: Literal["NCHW", "NHWC"] | None = None
    color: Literal["RGB", "BGR", "L"] | None = None
    dtype: str | None = None


@dataclass(frozen=True)
class _ImagePlan:
    """ImageOptions with every default resolved."""

    size: tuple[int, int] | None
    mean: np.ndarray
    std: np.ndarray
    scale: float
    layout: str
    color: str
    dtype: np.dtype


@dataclass
class CalibrationData:
    """Samples for calibration or evaluation; see the module docstring for layout and batching.

    ``fixed_batch`` and ``unbatched_inputs`` are set by ``validate``; call it (``load_data`` does)
    before ``batches``/``feeds``.
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    synthetic: bool = False
    source: str = ""
    fixed_batch: int | None = None
    unbatched_inputs: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        self.inputs = {str(name): np.asarray(arr) for name, arr in self.inputs.items()}
        for name, arr in self.inputs.items():
            if arr.ndim == 0:
                raise DataError(f"input '{name}' is a single scalar; stack samples along axis 0")
        counts = {name: arr.shape[0] for name, arr in self.inputs.items()}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{name}={n}" for name, n in counts.items())
            raise DataError(f"inputs have different sample counts ({listed}); all need the same N")
        if self.labels is not None:
            self.labels = np.asarray(self.labels)
            if self.labels.ndim == 0 or self.labels.shape[0] != len(self):
                got = self.labels.shape[0] if self.labels.ndim else "a scalar"
                raise DataError(f"labels have {got} entries but the data has {len(self)} samples")

    def __len__(self) -> int:
        return next(iter(self.inputs.values())).shape[0] if self.inputs else 0

    # ----- construction -------------------------------------------------------------------------

    @classmethod
    def from_arrays(
        cls, inputs: Mapping[str, np.ndarray], labels: np.ndarray | None = None, source: str = "arrays"
    ) -> CalibrationData:
        return cls(inputs=dict(inputs), labels=labels, source=source)

    @classmethod
    def from_npz(cls, path: str | Path, input_names: Sequence[str] = ()) -> CalibrationData:
        """Arrays keyed by input name; a ``labels`` key holds labels unless it names a model input."""
        path = _existing(path)
        arrays = _read_npz(path)
        labels = None
        if LABELS_KEY in arrays and LABELS_KEY not in input_names:
            labels = arrays.pop(LABELS_KEY)
        if not arrays:
            raise DataError(f"data file {path} holds no input arrays")
        return cls(inputs=arrays, labels=labels, source=str(path))

    @classmethod
    def from_npy(cls, path: str | Path, input_name: str) -> CalibrationData:
        path = _existing(path)
        try:
            with open(path, "rb") as handle:
                array = np.load(handle, allow_pickle=False)
                if isinstance(array, np.lib.npyio.NpzFile):
                    array.close()
                    raise DataError(f"data file {path} is an .npz archive, not a .npy array; rename it .npz")
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"cannot read data file {path}: {_one_line(exc)}") from None
        return cls(inputs={input_name: array}, source=str(path))

    @classmethod
    def from_image_folder(
        cls,
        path: str | Path,
        input_name: str,
        options: ImageOptions | None = None,
        *,
        spec: InputSpec | None = None,
    ) -> CalibrationData:
        """Read a folder of images into one input; ``spec`` supplies defaults (see ``ImageOptions``)."""
        path = _existing(path)
        if not path.is_dir():
            raise DataError(f"image data must be a folder, got file {path}")
        files, labels = _image_files(path)
        plan = _image_plan(options or ImageOptions(), spec)
        size = plan.size or _common_size(files, path)
        batch = np.stack([_load_image(f, size, plan) for f in files])
        return cls(inputs={input_name: batch}, labels=labels, source=str(path))

    @classmethod
    def synthetic_for(
        cls,
        model_or_specs: ir.Model | Sequence[InputSpec],
        n: int = 32,
        seed: int = 0,
        input_shapes: InputShapes | None = None,
    ) -> CalibrationData:
        """Seeded random data: standard normal floats, ints in [0, 10), random bools.

        ``input_shapes`` maps an input name to its full model shape (batch dim included, it becomes
        the sample axis) or a symbolic dim name to a size; other symbolic dims are 1.
        Returned already validated, so ``fixed_batch`` is set.
        """
        if n < 1:
            raise DataError(f"synthetic sample count must be at least 1, got {n}")
        rng = np.random.default_rng(seed)
        shapes = input_shapes or {}
        specs = _as_specs(model_or_specs)
        inputs = {spec.name: _random_array(spec, _synthetic_shape(spec, n, shapes), rng) for spec in specs}
        return cls(inputs=inputs, synthetic=True, source=f"synthetic (seed {seed})").validate(specs)

    # ----- checking -----------------------------------------------------------------------------

    def validate(
        self, model_or_specs: ir.Model | Sequence[InputSpec], min_samples: int = 1
    ) -> CalibrationData:
        """Check names, shapes, dtypes, values and count against the model; return a (cast) copy.

        float64 data is cast to float32 when the model wants float32; other casts happen only when
        lossless (float widening, integers whose values fit). Also learns ``fixed_batch``.
        """
        specs = _as_specs(model_or_specs)
        self._check_names(specs)
        if _reads_as_whole_feeds(specs, self.inputs):
            inputs = {spec.name: _check_input(spec, self.inputs[spec.name], whole=True) for spec in specs}
            if len(self) < min_samples:
                raise DataError(f"data has {len(self)} feeds; at least {min_samples} are needed")
            # Every array is fed one index at a time, exactly as stored.
            every = frozenset(spec.name for spec in specs)
            return dataclasses.replace(self, inputs=inputs, fixed_batch=None, unbatched_inputs=every)
        inputs = {spec.name: _check_input(spec, self.inputs[spec.name]) for spec in specs}
        fixed_batch = _fixed_batch(specs)
        needed = max(min_samples, fixed_batch or 0)
        if len(self) < needed:
            why = f" (the model's fixed batch size is {fixed_batch})" if needed == fixed_batch else ""
            raise DataError(f"data has {len(self)} samples; at least {needed} are needed{why}")
        unbatched = frozenset(s.name for s in specs if s.shape is not None and len(s.shape) == 0)
        if unbatched and fixed_batch not in (None, 1):
            raise DataError(f"scalar inputs need batch size 1, but the model's fixed batch is {fixed_batch}")
        return dataclasses.replace(self, inputs=inputs, fixed_batch=fixed_batch, unbatched_inputs=unbatched)

    def _check_names(self, specs: Sequence[InputSpec]) -> None:
        wanted = [spec.name for spec in specs]
        for name in wanted:
            if name not in self.inputs:
                have = ", ".join(self.inputs) or "nothing"
                raise DataError(f"input '{name}' missing from data; data has: {have}")
        for name in self.inputs:
            if name not in wanted:
                raise DataError(f"data has unknown key '{name}'; model inputs are: {', '.join(wanted)}")

    # ----- slicing ------------------------------------------------------------------------------

    def split(self, fraction: float, seed: int = 0) -> tuple[CalibrationData, CalibrationData]:
        """Seeded shuffle into two disjoint parts, the first with ``round(fraction * N)`` samples.

        Each part keeps the original sample order. Both parts are non-empty.
        """
        if not 0.0 < fraction < 1.0:
            raise DataError(f"split fraction must be between 0 and 1, got {fraction}")
        if len(self) < 2:
            raise DataError(f"cannot split {len(self)} sample(s) into two parts; give more data")
        k = min(max(round(fraction * len(self)), 1), len(self) - 1)
        order = np.random.default_rng(seed).permutation(len(self))
        return self._take(np.sort(order[:k])), self._take(np.sort(order[k:]))

    def subset(self, n: int) -> CalibrationData:
        """The first ``n`` samples (all of them if there are fewer)."""
        if n < 1:
            raise DataError(f"subset size must be at least 1, got {n}")
        return self._take(np.arange(min(n, len(self))))

    def spread(self, n: int) -> CalibrationData:
        """``n`` samples evenly spaced over the set (all of them if there are fewer).

        Calibration files are often ordered by source or class; a scan that can afford only
        a few samples should see all of them, not the first one's crops."""
        if n < 1:
            raise DataError(f"subset size must be at least 1, got {n}")
        if n >= len(self):
            return self
        return self._take(np.unique(np.linspace(0, len(self) - 1, n).round().astype(np.int64)))

    def _take(self, index: np.ndarray) -> CalibrationData:
        inputs = {name: arr[index] for name, arr in self.inputs.items()}
        labels = None if self.labels is None else self.labels[index]
        return dataclasses.replace(self, inputs=inputs, labels=labels)

    def batch_slices(self, batch_size: int = 1) -> list[slice]:
        """Sample ranges of the batches ``batches(batch_size)`` yields, in the same order."""
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        # A scalar input carries one sample per run; a fixed-batch model cannot take a short batch.
        size = 1 if self.unbatched_inputs else self.fixed_batch or batch_size
        stop = len(self) - len(self) % size if self.fixed_batch else len(self)
        return [slice(start, min(start + size, stop)) for start in range(0, stop, size)]

    def batches(self, batch_size: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """onnxruntime feeds; ``fixed_batch`` (when set) overrides ``batch_size``."""
        for part in self.batch_slices(batch_size):
            yield {name: self._feed_array(name, arr, part) for name, arr in self.inputs.items()}

    def _feed_array(self, name: str, arr: np.ndarray, part: slice) -> np.ndarray:
        if name in self.unbatched_inputs:
            return np.asarray(arr[part.start])  # 0-d; ascontiguousarray would make it 1-d
        return np.ascontiguousarray(arr[part])

    def feeds(self, batch_size: int = 1) -> list[dict[str, np.ndarray]]:
        """All batches as a list: one feed per sample by default."""
        return list(self.batches(batch_size))


# ----- loading ------------------------------------------------------------------------------------


def load_data(
    path: str | Path | None,
    model: ir.Model,
    *,
    synthetic: bool = False,
    n_synthetic: int = 32,
    seed: int = 0,
    image_options: ImageOptions | None = None,
    input_shapes: InputShapes | None = None,
    min_samples: int = 1,
) -> CalibrationData:
    """Load data from ``path`` (.npz, .npy or image folder) or make synthetic data; return it validated."""
    specs = input_specs(model)
    if path is None:
        if not synthetic:
            raise DataError("no data given: pass --data PATH (.npz, .npy or image folder) or --synthetic")
        data = CalibrationData.synthetic_for(specs, n=n_synthetic, seed=seed, input_shapes=input_shapes)
        return data.validate(specs, min_samples)
    if synthetic:
        raise DataError("pass either --data or --synthetic, not both")
    return _load_path(_existing(path), specs, image_options).validate(specs, min_samples)


def _load_path(path: Path, specs: list[InputSpec], image_options: ImageOptions | None) -> CalibrationData:
    names = [spec.name for spec in specs]
    if path.is_dir():
        spec = _single_input(specs, "an image folder")
        return CalibrationData.from_image_folder(path, spec.name, image_options, spec=spec)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return CalibrationData.from_npz(path, input_names=names)
    if suffix == ".npy":
        return CalibrationData.from_npy(path, _single_input(specs, "a .npy file").name)
    raise DataError(f"unsupported data file {path}: use .npz, .npy or a folder of images")


def _single_input(specs: list[InputSpec], what: str) -> InputSpec:
    if len(specs) != 1:
        names = ", ".join(spec.name for spec in specs) or "none"
        raise DataError(f"{what} can feed only a single-input model; model inputs: {names}; use a .npz file")
    return specs[0]


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    return path


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        # Open the file ourselves: np.load leaks its handle when the zip is corrupt.
        with open(path, "rb") as handle:
            archive = np.load(handle, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise DataError(f"data file {path} is a .npy array, not an .npz archive; rename it .npy")
            with archive:
                return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read data file {path}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ----- validation helpers -------------------------------------------------------------------------


def _reads_as_whole_feeds(specs: Sequence[InputSpec], inputs: Mapping[str, np.ndarray]) -> bool:
    """Every array is ``[N, *model shape]`` and the per-sample reading does not fit them all."""
    ranked = [(spec, inputs[spec.name]) for spec in specs if spec.shape]
    if not ranked:
        return False  # scalars only (or unknown ranks): both readings are the same
    fits = [a.ndim == len(spec.shape) + 1 and _dims_match(spec.shape, a.shape[1:]) for spec, a in ranked]
    if not all(fits):
        return False
    return not all(_reads_as_samples(spec, arr) for spec, arr in ranked)


def _reads_as_samples(spec: InputSpec, arr: np.ndarray) -> bool:
    try:
        _check_shape(spec, arr)
    except DataError:
        return False
    return True


def _check_input(spec: InputSpec, arr: np.ndarray, whole: bool = False) -> np.ndarray:
    arr = _check_whole_shape(spec, arr) if whole else _check_shape(spec, arr)
    arr = _coerce_dtype(spec, arr)
    if _is_float(arr.dtype) and arr.size:
        bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
        if bad.any():
            first = int(np.argmax(bad))
            raise DataError(f"input '{spec.name}' contains NaN or Inf (first in sample {first})")
    return arr


def _check_shape(spec: InputSpec, arr: np.ndarray) -> np.ndarray:
    want = spec.sample_shape
    if want is None or _dims_match(want, arr.shape[1:]):
        return arr
    # Samples saved with their own batch-of-1 axis, for a model with static batch 1.
    batch_one = bool(spec.shape) and spec.shape[0] == 1
    if batch_one and arr.ndim >= 2 and arr.shape[1] == 1 and _dims_match(want, arr.shape[2:]):
        return arr[:, 0]
    raise DataError(
        f"input '{spec.name}': expected shape {_fmt_shape(want)} ({_dtype_name(spec.dtype)}), "
        f"got {_fmt_shape(arr.shape[1:])} ({_dtype_name(arr.dtype)})"
    )


def _check_whole_shape(spec: InputSpec, arr: np.ndarray) -> np.ndarray:
    if spec.shape is None or _dims_match(spec.shape, arr.shape[1:]):
        return arr
    raise DataError(
        f"input '{spec.name}': expected whole feeds of shape {_fmt_shape(spec.shape)} "
        f"({_dtype_name(spec.dtype)}), got {_fmt_shape(arr.shape[1:])} ({_dtype_name(arr.dtype)})"
    )


def _dims_match(want: Sequence[Dim], got: Sequence[int]) -> bool:
    if len(want) != len(got):
        return False
    return all(not isinstance(w, int) or w == g for w, g in zip(want, got, strict=True))


def _fmt_shape(sample_dims: Sequence[Dim]) -> str:
    return "[" + ", ".join(str(d) for d in ("N", *sample_dims)) + "]"


def _dtype_name(dtype: np.dtype | None) -> str:
    return "any dtype" if dtype is None else str(dtype)


def _coerce_dtype(spec: InputSpec, arr: np.ndarray) -> np.ndarray:
    want = spec.dtype
    if want is None or arr.dtype == want:
        return arr
    if _is_float(arr.dtype) and _is_float(want):
        if (arr.dtype == np.float64 and want == np.float32) or _safe_cast(arr.dtype, want):
            with np.errstate(over="ignore"):  # overflow to inf is reported by the finiteness check
                return arr.astype(want)
    elif arr.dtype.kind in "iu" and want.kind in "iu":
        if _ints_fit(arr, want):
            return arr.astype(want)
        raise DataError(
            f"input '{spec.name}': expected {want} data, got {arr.dtype} values outside the {want} range"
        )
    raise DataError(f"input '{spec.name}': expected {want} data, got {arr.dtype}; convert the arrays")


def _is_float(dtype: np.dtype) -> bool:
    if dtype.kind == "f":
        return True
    try:  # ml_dtypes floats (bfloat16, float8) have kind "V"
        return ir.DataType.from_numpy(dtype).is_floating_point()
    except (TypeError, ValueError):
        return False


def _safe_cast(src: np.dtype, dst: np.dtype) -> bool:
    try:
        return bool(np.can_cast(src, dst, casting="safe"))
    except TypeError:
        return False


def _ints_fit(arr: np.ndarray, want: np.dtype) -> bool:
    if arr.size == 0:
        return True
    info = np.iinfo(want)
    return int(arr.min()) >= info.min and int(arr.max()) <= info.max


def _fixed_batch(specs: Sequence[InputSpec]) -> int | None:
    fixed = {spec.name: spec.shape[0] for spec in specs if spec.shape and isinstance(spec.shape[0], int)}
    if len(set(fixed.values())) > 1:
        listed = ", ".join(f"{name}={size}" for name, size in fixed.items())
        raise DataError(f"model inputs disagree on a fixed batch size ({listed}); cannot batch the data")
    return next(iter(fixed.values()), None)


# ----- synthetic helpers --------------------------------------------------------------------------


def _synthetic_shape(spec: InputSpec, n: int, input_shapes: InputShapes) -> tuple[int, ...]:
    given = input_shapes.get(spec.name)
    if given is not None and not isinstance(given, int):
        full = tuple(int(d) for d in given)
        if spec.shape is not None and not _dims_match(spec.shape, full):
            raise DataError(
                f"input '{spec.name}': given shape {list(full)} does not fit the model's {list(spec.shape)}"
            )
        return (n, *full[1:]) if full else (n,)
    if spec.shape is None:
        raise DataError(f"input '{spec.name}' has unknown rank; give its shape with --input-shape")
    rest = [d if isinstance(d, int) else _named_dim(input_shapes, d, spec) for d in spec.shape[1:]]
    return (n, *rest)


def _named_dim(input_shapes: InputShapes, name: str, spec: InputSpec) -> int:
    """A dynamic non-batch dim must be given: guessing 1 would feed convs 1-pixel images."""
    size = input_shapes.get(name)
    if isinstance(size, int):
        return size
    example = "x".join(str(d) if isinstance(d, int) else "N" for d in spec.shape or ())
    raise DataError(
        f"input '{spec.name}' has dynamic dimension '{name}': "
        f"give its shape, e.g. --input-shape {spec.name}={example}"
    )


def _random_array(spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dtype = spec.dtype if spec.dtype is not None else np.dtype(np.float32)
    if _is_float(dtype):
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, _SYNTHETIC_INT_HIGH, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    raise DataError(f"cannot make synthetic data for input '{spec.name}' of type {dtype}; pass --data")


# ----- image helpers ------------------------------------------------------------------------------


def _image_files(folder: Path) -> tuple[list[Path], np.ndarray | None]:
    top = _images_in(folder)
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        if not top:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}")
        return top, None
    if top:
        raise DataError(f"{folder} mixes images and class subfolders; put every image in a class folder")
    files: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(classes):
        found = _images_in(class_dir)
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in the class folders of {folder}")
    return files, np.asarray(labels, dtype=np.int64)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _image_plan(options: ImageOptions, spec: InputSpec | None) -> _ImagePlan:
    dims = spec.shape if spec is not None and spec.shape is not None and len(spec.shape) == 4 else None
    layout = options.layout or _layout_from(dims)
    if layout not in ("NCHW", "NHWC"):
        raise DataError(f"image layout must be NCHW or NHWC, got {layout}")
    channel_dim = None if dims is None else dims[1 if layout == "NCHW" else 3]
    color = options.color or ("L" if channel_dim == 1 else "RGB")
    if color not in ("RGB", "BGR", "L"):
        raise DataError(f"image color must be RGB, BGR or L, got {color}")
    dtype = _image_dtype(options, spec)
    scale = options.scale if options.scale is not None else (1 / 255 if _is_float(dtype) else 1.0)
    channels = 1 if color == "L" else 3
    return _ImagePlan(
        size=options.size or _size_from(dims, layout),
        mean=_per_channel(options.mean, 0.0, channels, "mean"),
        std=_per_channel(options.std, 1.0, channels, "std"),
        scale=float(scale),
        layout=layout,
        color=color,
        dtype=dtype,
    )


def _layout_from(dims: tuple[Dim, ...] | None) -> str:
    if dims is not None and dims[1] not in (1, 3) and dims[3] in (1, 3):
        return "NHWC"
    return "NCHW"


def _size_from(dims: tuple[Dim, ...] | None, layout: str) -> tuple[int, int] | None:
    if dims is None:
        return None
    height, width = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])
    if isinstance(height, int) and isinstance(width, int):
        return height, width
    return None


def _image_dtype(options: ImageOptions, spec: InputSpec | None) -> np.dtype:
    if options.dtype is not None:
        return np.dtype(options.dtype)
    if spec is not None and spec.dtype is not None and (_is_float(spec.dtype) or spec.dtype.kind in "iu"):
        return spec.dtype
    return np.dtype(np.float32)


def _per_channel(values: Sequence[float] | None, default: float, channels: int, what: str) -> np.ndarray:
    if values is None:
        return np.full(channels, default, dtype=np.float32)
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    if arr.size == 1:
        return np.full(channels, arr[0], dtype=np.float32)
    if arr.size != channels:
        raise DataError(f"image {what} has {arr.size} values; give 1 or {channels} (one per channel)")
    if what == "std" and (arr == 0).any():
        raise DataError("image std must not contain 0")
    return arr


def _common_size(files: list[Path], folder: Path) -> tuple[int, int]:
    sizes = {f: _open_image(f).size for f in files}
    first = files[0]
    for f, size in sizes.items():
        if size != sizes[first]:
            pair = f"{first.name} {_wh(sizes[first])}, {f.name} {_wh(size)}"
            raise DataError(f"images in {folder} differ in size ({pair}); pass an image size")
    width, height = sizes[first]
    return height, width


def _wh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _open_image(path: Path):  # -> PIL.Image.Image; Pillow is imported lazily, only for image data
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image {path}: {_one_line(exc)}") from None
    return image


def _load_image(path: Path, size: tuple[int, int], plan: _ImagePlan) -> np.ndarray:
    from PIL import Image

    image = _open_image(path).convert("L" if plan.color == "L" else "RGB")
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32).reshape(height, width, -1)
    if plan.color == "BGR":
        pixels = pixels[..., ::-1]
    values = (pixels * plan.scale - plan.mean) / plan.std
    if plan.layout == "NCHW":
        values = values.transpose(2, 0, 1)
    return _to_dtype(values, plan.dtype, path)


def _to_dtype(values: np.ndarray, dtype: np.dtype, path: Path) -> np.ndarray:
    if _is_float(dtype):
        return np.ascontiguousarray(values.astype(dtype))
    rounded = np.rint(values)
    info = np.iinfo(dtype)
    if rounded.min() < info.min or rounded.max() > info.max:
        raise DataError(f"image {path} values leave the {dtype} range after scale/mean/std; adjust them")
    return np.ascontiguousarray(rounded.astype(dtype))
