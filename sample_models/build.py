"""Build the bundled sample models: train on scikit-learn's digits, export ONNX, measure with onnxruntime.

Run:  python sample_models/build.py        (needs the optional extra ``train``, i.e. torch)

Writes next to this file, for NAME in digits_mlp, digits_cnn, digits_transformer:
  NAME.onnx         opset 17, input ``input`` (dynamic batch), output ``logits`` [batch, 10]
  NAME_calib.npz    256 stratified TRAIN samples: ``input`` (float32), ``labels`` (int64)
  NAME_eval.npz     the whole held-out TEST split: ``input`` (float32), ``labels`` (int64)
and README.md with the accuracies measured by onnxruntime on NAME_eval.npz.

Everything is seeded and single-threaded so a rebuild reproduces the same files.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

OUT_DIR = Path(__file__).resolve().parent
SEED = 0
OPSET = 17
MAX_IR_VERSION = 10  # onnxruntime 1.18 reads IR <= 10
MIN_ACCURACY = 0.95
MAX_FILE_BYTES = 2 * 1024 * 1024
N_CALIB = 256
BATCH_SIZE = 64
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# Fixed zip timestamp so the .npz files are byte-identical between builds (np.savez stamps "now").
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


# --------------------------------------------------------------------------------------------- models


class DigitsMLP(nn.Module):
    """64 -> 128 -> ReLU -> 64 -> ReLU -> 10 on flattened 8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def conv_bn(c_in: int, c_out: int, kernel: int, groups: int = 1) -> nn.Sequential:
    """Conv without bias followed by BatchNorm (the bias would be redundant before BN)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    )


class DigitsCNN(nn.Module):
    """Stem, residual block, concat branch, depthwise-separable conv, MaxPool, Flatten, Gemm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 16, 3)
        self.res_a = conv_bn(16, 16, 3)
        self.res_b = conv_bn(16, 16, 3)
        self.branch_1x1 = nn.Conv2d(16, 16, 1)
        self.branch_3x3 = nn.Conv2d(16, 16, 3, padding=1)
        self.depthwise = conv_bn(32, 32, 3, groups=32)
        self.pointwise = conv_bn(32, 32, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.res_b(torch.relu(self.res_a(x))))
        x = torch.relu(torch.cat([self.branch_1x1(x), self.branch_3x3(x)], dim=1))
        x = torch.relu(self.depthwise(x))
        x = torch.relu(self.pointwise(x))
        x = self.pool(x)
        return self.fc(torch.flatten(x, 1))


class SelfAttention(nn.Module):
    """Multi-head self-attention spelled out so it exports as MatMul(Q, K^T) -> scale -> Softmax -> MatMul."""

    def __init__(self, dim: int, heads: int, tokens: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.tokens = tokens
        self.dim = dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        # -1 for the batch keeps the Reshape target a constant, so the batch dim stays dynamic.
        return x.reshape(-1, self.tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        y = torch.matmul(attn, v).transpose(1, 2).reshape(-1, self.tokens, self.dim)
        return self.out(y)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer encoder block."""

    def __init__(self, dim: int, heads: int, tokens: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, tokens)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class DigitsTransformer(nn.Module):
    """8 tokens (image rows) x 8 features -> embed 32 + learned positions -> 2 blocks -> mean -> 10."""

    def __init__(self, tokens: int = 8, features: int = 8, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.pos = nn.Parameter(torch.zeros(tokens, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, tokens, 2 * dim) for _ in range(2)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.embed(x) + self.pos)
        return self.head(self.ln(x).mean(dim=1))


# --------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ModelSpec:
    name: str
    make: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]  # per-sample input shape (without the batch dim)
    epochs: int
    lr: float
    weight_decay: float
    export_mode: torch.onnx.TrainingMode
    constant_folding: bool
    required_ops: frozenset[str]
    forbidden_ops: frozenset[str]
    description: str


SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="digits_mlp",
        make=DigitsMLP,
        sample_shape=(64,),
        epochs=100,
        lr=3e-3,
        weight_decay=0.0,
        export_mode=torch.onnx.TrainingMode.EVAL,
        constant_folding=True,
        required_ops=frozenset({"Gemm", "Relu"}),
        forbidden_ops=frozenset({"MatMul", "Add"}),  # nn.Linear on 2-D input must stay one Gemm
        description="MLP on the flattened image: 64 -> 128 -> ReLU -> 64 -> ReLU -> 10, three Gemm layers.",
    ),
    ModelSpec(
        name="digits_cnn",
        make=DigitsCNN,
        sample_shape=(1, 8, 8),
        epochs=30,
        lr=2e-3,
        weight_decay=0.0,
        # PRESERVE (with the model in eval mode) skips the exporter's Conv+BN fusion; BN still runs
        # in inference mode on the running stats. Constant folding is off because it is pointless here
        # and the exporter warns about it in PRESERVE mode.
        export_mode=torch.onnx.TrainingMode.PRESERVE,
        constant_folding=False,
        required_ops=frozenset(
            {"Conv", "BatchNormalization", "Relu", "Add", "Concat", "MaxPool", "Flatten", "Gemm"}
        ),
        forbidden_ops=frozenset(),
        description=(
            "CNN: Conv3x3(1->16)+BN+ReLU; residual block x + BN(Conv(ReLU(BN(Conv(x))))) (16 ch); "
            "Concat of parallel Conv1x1 and Conv3x3 branches (16+16 ch); "
            "depthwise Conv3x3 (group=32)+BN+ReLU; pointwise Conv1x1 (32->32)+BN+ReLU; "
            "MaxPool 2x2; Flatten; Gemm(512->10). "
            "BatchNormalization is kept as separate nodes (not fused into Conv)."
        ),
    ),
    ModelSpec(
        name="digits_transformer",
        make=DigitsTransformer,
        sample_shape=(8, 8),
        epochs=150,
        lr=2e-3,
        weight_decay=1e-4,
        export_mode=torch.onnx.TrainingMode.EVAL,
        constant_folding=True,  # folds the weight transposes so Q/K/V/out are MatMul on constant 2-D weights
        required_ops=frozenset(
            {"MatMul", "Add", "Softmax", "LayerNormalization", "Erf", "ReduceMean", "Gemm", "Transpose"}
        ),
        forbidden_ops=frozenset(),
        description=(
            "Transformer encoder over 8 tokens (image rows) of 8 features: Linear embed to d=32 + learned "
            "position embedding; 2 pre-LN blocks, each with 4-head self-attention written out as "
            "MatMul(Q, K^T) -> Mul(scale) -> Softmax -> MatMul(attn, V), Q/K/V/out projections as MatMul "
            "with constant 2-D weights + Add bias, and an MLP 32 -> 64 -> GELU (erf) -> 32; "
            "final LayerNormalization, ReduceMean over tokens, Gemm(32->10)."
        ),
    ),
)


# --------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray  # [N, 64] float32 in [0, 1]
    y_train: np.ndarray  # [N] int64
    x_test: np.ndarray
    y_test: np.ndarray
    calib_idx: np.ndarray  # indices into the train split


def load_split() -> Split:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)
    # A stratified subset of the train split, so every class is in the calibration set.
    calib_idx, _ = train_test_split(
        np.arange(len(y_train)), train_size=N_CALIB, random_state=SEED, stratify=y_train
    )
    return Split(x_train, y_train, x_test, y_test, np.sort(calib_idx))


def shaped(x: np.ndarray, sample_shape: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(x.reshape((len(x), *sample_shape)), dtype=np.float32)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but with a fixed timestamp so rebuilds are byte-identical."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


# --------------------------------------------------------------------------------------------- train


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(spec: ModelSpec, split: Split) -> nn.Module:
    seed_everything(SEED)  # per model, so each model is independent of build order
    model = spec.make()
    x = torch.from_numpy(shaped(split.x_train, spec.sample_shape))
    y = torch.from_numpy(split.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.epochs)
    gen = torch.Generator().manual_seed(SEED)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(spec.epochs):
        for idx in torch.randperm(len(y), generator=gen).split(BATCH_SIZE):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


# --------------------------------------------------------------------------------------------- export


def inline_identity_initializers(model: onnx.ModelProto) -> None:
    """The exporter dedups equal parameters into Identity(initializer); give each its own initializer."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def export(spec: ModelSpec, model: nn.Module, example: np.ndarray, path: Path) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but gives the compact Gemm/BatchNormalization graphs we want.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.from_numpy(example),),
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            training=spec.export_mode,
            do_constant_folding=spec.constant_folding,
        )
    proto = onnx.load_from_string(buf.getvalue())
    inline_identity_initializers(proto)
    proto.doc_string = spec.description
    onnx.save_model(proto, path, save_as_external_data=False)
    return proto


# --------------------------------------------------------------------------------------------- verify


def require(condition: bool, message: str) -> None:
    """Like assert, but survives ``python -O``: a build that misses a requirement must fail."""
    if not condition:
        raise RuntimeError(message)


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def initializer_elements(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def check_structure(spec: ModelSpec, model: onnx.ModelProto, path: Path) -> None:
    onnx.checker.check_model(model, full_check=True)
    require(model.ir_version <= MAX_IR_VERSION, f"{spec.name}: ir_version {model.ir_version}")
    opsets = {o.domain: o.version for o in model.opset_import}
    require(opsets.get("", opsets.get("ai.onnx")) == OPSET, f"{spec.name}: opsets {opsets}")
    require(path.stat().st_size < MAX_FILE_BYTES, f"{spec.name}: {path.stat().st_size} bytes")
    for t in model.graph.initializer:
        require(t.data_location != onnx.TensorProto.EXTERNAL, f"{spec.name}: external data in {t.name}")

    (inp,), (out,) = model.graph.input, model.graph.output
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    require(inp.name == INPUT_NAME and in_dims == ["batch", *spec.sample_shape], f"{spec.name}: {in_dims}")
    require(out.name == OUTPUT_NAME and out_dims == ["batch", 10], f"{spec.name}: {out_dims}")

    ops = set(op_histogram(model))
    require(spec.required_ops <= ops, f"{spec.name}: missing ops {spec.required_ops - ops}")
    require(not spec.forbidden_ops & ops, f"{spec.name}: unexpected ops {spec.forbidden_ops & ops}")
    require("Identity" not in ops, f"{spec.name}: leftover Identity nodes")
    if spec.name == "digits_cnn":
        check_cnn_graph(model)
    if spec.name == "digits_transformer":
        check_transformer_graph(model)


def check_cnn_graph(model: onnx.ModelProto) -> None:
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    for bn in bns:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in bn.attribute}
        require(attrs.get("training_mode", 0) == 0 and len(bn.output) == 1, "BN must be in inference mode")
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs]
    require(32 in groups, "expected a depthwise conv (group == channels == 32)")


def check_transformer_graph(model: onnx.ModelProto) -> None:
    inits = {t.name: t for t in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    act_act = [n for n in matmuls if not any(i in inits for i in n.input)]
    weight = [n for n in matmuls if n.input[1] in inits and len(inits[n.input[1]].dims) == 2]
    # Per block: Q.K^T and attn.V (two activations) and Q/K/V/out + 2 MLP layers (constant 2-D weights),
    # plus the embedding.
    require(len(act_act) == 4, f"expected 4 activation x activation MatMuls, got {len(act_act)}")
    require(len(weight) == 1 + 2 * 6, f"expected 13 MatMuls with 2-D weights, got {len(weight)}")
    require(len(matmuls) == len(act_act) + len(weight), "unexpected MatMul kinds")


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (logits,) = sess.run([OUTPUT_NAME], {INPUT_NAME: x})
    return logits


# --------------------------------------------------------------------------------------------- main


@dataclass(frozen=True)
class Result:
    spec: ModelSpec
    ops: dict[str, int]
    trainable_params: int
    initializer_elements: int
    file_bytes: int
    accuracy: float
    n_eval: int
    sha256: str


def build_one(spec: ModelSpec, split: Split) -> Result:
    model = train(spec, split)
    x_eval = shaped(split.x_test, spec.sample_shape)
    x_calib = shaped(split.x_train[split.calib_idx], spec.sample_shape)
    y_calib = split.y_train[split.calib_idx]
    save_npz(OUT_DIR / f"{spec.name}_calib.npz", {INPUT_NAME: x_calib, "labels": y_calib})
    save_npz(OUT_DIR / f"{spec.name}_eval.npz", {INPUT_NAME: x_eval, "labels": split.y_test})

    path = OUT_DIR / f"{spec.name}.onnx"
    export(spec, model, x_calib[:2], path)
    proto = onnx.load(path)  # verify what is on disk, not what is in memory
    check_structure(spec, proto, path)

    # Accuracy is measured with onnxruntime on the files as shipped, not with torch.
    data = np.load(OUT_DIR / f"{spec.name}_eval.npz")
    logits = run_onnx(path, data[INPUT_NAME])
    accuracy = float((logits.argmax(axis=1) == data["labels"]).mean())
    require(accuracy >= MIN_ACCURACY, f"{spec.name}: accuracy {accuracy:.4f} < {MIN_ACCURACY}")
    with torch.no_grad():
        ref = model(torch.from_numpy(data[INPUT_NAME])).numpy()
    max_diff = float(np.abs(ref - logits).max())
    require(max_diff < 1e-4, f"{spec.name}: onnxruntime vs torch eval max |diff| {max_diff}")

    return Result(
        spec=spec,
        ops=op_histogram(proto),
        trainable_params=sum(p.numel() for p in model.parameters()),
        initializer_elements=initializer_elements(proto),
        file_bytes=path.stat().st_size,
        accuracy=accuracy,
        n_eval=len(data["labels"]),
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
    )


def write_readme(results: list[Result]) -> None:
    lines = [
        "# Sample models",
        "",
        "Small classifiers for scikit-learn's `load_digits()` (8x8 grey images, 10 classes, 1797 samples), "
        "generated by `build.py`. Split: `train_test_split(test_size=0.25, random_state=0, stratify=y)`; "
        "pixels are divided by 16 (float32 in [0, 1]). Trained with Adam, fixed seeds, single thread.",
        "",
        "Every model: opset 17, input `input` with a symbolic batch dimension `batch`, output `logits` "
        "`[batch, 10]`, weights stored as initializers inside the `.onnx` file.",
        "",
        "- `NAME_calib.npz`: 256 stratified samples from the TRAIN split, keys `input` (float32) and "
        "`labels` (int64).",
        "- `NAME_eval.npz`: the whole held-out TEST split, keys `input` (float32) and `labels` (int64).",
        "",
        "## Models",
        "",
    ]
    for r in results:
        shape = ", ".join(["batch", *map(str, r.spec.sample_shape)])
        ops = ", ".join(f"{op} x{n}" for op, n in r.ops.items())
        extra = r.initializer_elements != r.trainable_params
        lines += [
            f"### `{r.spec.name}.onnx`",
            "",
            r.spec.description,
            "",
            f"- input shape: `[{shape}]`",
            f"- parameters: {r.trainable_params:,} trainable; {r.initializer_elements:,} initializer elements"
            + (" (BatchNorm running stats add the difference)" if extra else ""),
            f"- file size: {r.file_bytes:,} bytes",
            f"- ops: {ops}",
            "",
        ]
    lines += [
        "## Accuracy",
        "",
        "Top-1 accuracy of the fp32 `.onnx` files on `NAME_eval.npz`, measured with onnxruntime "
        "(CPUExecutionProvider).",
        "",
        "| model | test samples | fp32 accuracy |",
        "|---|---:|---:|",
    ]
    lines += [f"| `{r.spec.name}` | {r.n_eval} | {r.accuracy:.4f} |" for r in results]
    lines += [
        "",
        "## Rebuild",
        "",
        "```sh",
        "pip install -e '.[train]'",
        "python sample_models/build.py",
        "```",
        "",
    ]
    (OUT_DIR / "README.md").write_text("\n".join(lines))


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    split = load_split()
    results = [build_one(spec, split) for spec in SPECS]
    write_readme(results)
    for r in results:
        print(
            f"{r.spec.name}: acc={r.accuracy:.4f} params={r.trainable_params} bytes={r.file_bytes} "
            f"sha256={r.sha256[:16]} ops={r.ops}"
        )


if __name__ == "__main__":
    main()
