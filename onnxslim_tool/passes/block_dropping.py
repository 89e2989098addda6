"""Block dropping: remove whole residual blocks whose loss costs least on calibration data.

A residual block is an `Add` (or two-input `Sum`) whose one input (the skip) shares a source
with the other (the branch), where the branch's nodes exist only for that `Add`. Dropping
the block wires the `Add`'s readers to the skip and lets the branch die. ResNet bottlenecks
and a transformer's attention and MLP sub-blocks all have this shape; a projection shortcut
(a conv on the skip side) keeps the lighter side and drops the heavier one.

Each candidate's cost is measured by dropping it alone and comparing the outputs with the
original on calibration data (task accuracy with labels, else top-1 agreement or cosine,
the pipeline's own metric); the cheapest go first, optionally re-measured together with
those already chosen, until `drop_blocks` are gone or MACs reach `target_macs`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir

from onnxslim_tool import metrics, runtime
from onnxslim_tool.cost import ModelCost, analyze_cost
from onnxslim_tool.errors import OnnxSlimError
from onnxslim_tool.graph_utils import add_initializer, bypass, const_array
from onnxslim_tool.passes.base import CompressionPass, PassRecord
from onnxslim_tool.passes.normalize import RemoveDeadCode

# Calibration samples per onnxruntime run while measuring costs.
BATCH = 16
_RESIDUAL_OPS = frozenset({"Add", "Sum"})
# Shape metadata is not data: a Shape() of the skip shared by later blocks must not make a
# branch look like it feeds the rest of the graph.
_METADATA_OPS = frozenset({"Shape", "Size"})


@dataclass
class Block:
    """One droppable residual block: the joining node and which of its inputs is the skip."""

    name: str
    node: ir.Node
    skip_index: int
    nodes: list[ir.Node]
    macs: int
    params: int

    @property
    def branch_index(self) -> int:
        return 1 - self.skip_index


@dataclass
class BlockCost:
    """What dropping one block (alone, or with those chosen before it) did on calibration data."""

    name: str
    nodes: int
    macs: int
    params: int
    metric: str
    drop: float
    cosine: float
    dropped: bool = False

    @property
    def key(self) -> tuple[float, float, str]:
        """Rank: the metric drop first, output cosine to break ties, then the name (stable)."""
        return (self.drop, -self.cosine, self.name)

    def to_dict(self) -> dict:
        return asdict(self)


# ----- finding candidates --------------------------------------------------------------------------


def find_blocks(
    model: ir.Model, macs_of: dict[int, int] | None = None
) -> tuple[list[Block], list[tuple[str, str]]]:
    """Residual blocks of the main graph, and (name, reason) for residual-looking joins refused.

    `macs_of` maps id(node) to its MACs (from `cost.analyze_cost`); without it MACs are 0.
    Blocks are either disjoint or nested (a private branch has one exit: its join).
    """
    graph = model.graph
    order = {id(node): i for i, node in enumerate(graph)}
    macs_of = macs_of or {}
    blocks, refused = [], []
    for node in graph:
        if node.op_type not in _RESIDUAL_OPS or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        if any(v is None or _is_const(v) for v in node.inputs):
            continue
        options = [_orientation(node, skip, order, macs_of) for skip in (0, 1)]
        valid = [o for o in options if isinstance(o, Block)]
        if valid:  # a projection shortcut is droppable both ways: drop the heavier side
            blocks.append(max(valid, key=lambda b: (b.macs, len(b.nodes))))
            continue
        reasons = [o for o in options if isinstance(o, str)]
        if reasons:
            refused.append((_label(node), reasons[0]))
    return blocks, refused


def _orientation(
    node: ir.Node, skip_index: int, order: dict[int, int], macs_of: dict[int, int]
) -> Block | str | None:
    """The block when input `skip_index` is the skip; a reason when it looks residual but is
    not droppable; None when the other input does not branch off the skip's sources."""
    skip, branch_out = node.inputs[skip_index], node.inputs[1 - skip_index]
    skip_nodes, skip_values = _ancestors(skip)
    branch_nodes, _ = _ancestors(branch_out)
    fork = {id(v) for v in skip_values if not _is_const(v)}
    region: list[ir.Node] = []
    members: set[int] = set()
    for n in sorted(branch_nodes - skip_nodes, key=lambda n: order.get(id(n), 0)):
        if n.op_type in _METADATA_OPS:
            continue
        reads = [v for v in n.inputs if v is not None]
        if any(id(v) in fork or (v.producer() is not None and id(v.producer()) in members) for v in reads):
            region.append(n)
            members.add(id(n))
    producer = branch_out.producer()
    if producer is None or id(producer) not in members:
        return None
    for n in region:
        for out in n.outputs:
            if out.is_graph_output():
                return f"branch tensor '{out.name}' is a graph output"
            for use in out.uses():
                inside = id(use.node) in members or (use.node is node and out is branch_out)
                if not inside:
                    return f"branch tensor '{out.name}' also feeds '{_label(use.node)}' outside the block"
    macs = sum(macs_of.get(id(n), 0) for n in region)
    if macs == 0:
        return "branch has no multiply-accumulate layer (nothing to save)"
    out = node.outputs[0]
    if out.is_graph_output() and (skip.is_graph_input() or skip.is_graph_output() or skip.is_initializer()):
        return "block output is a graph output and the skip tensor cannot take its name"
    return Block(_label(node), node, skip_index, region, macs, _private_params(region, members))


def _ancestors(value: ir.Value) -> tuple[set[ir.Node], list[ir.Value]]:
    """Every node `value` depends on, and every value on the way (itself included)."""
    nodes: set[ir.Node] = set()
    values: list[ir.Value] = []
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        values.append(v)
        producer = v.producer()
        if producer is not None and producer not in nodes:
            nodes.add(producer)
            stack.extend(i for i in producer.inputs if i is not None)
    return nodes, values


def _private_params(region: Sequence[ir.Node], members: set[int]) -> int:
    """Elements of the constant tensors only the branch reads (what dropping it frees)."""
    total, counted = 0, set()
    for n in region:
        for v in n.inputs:
            if v is None or id(v) in counted or not _is_const(v):
                continue
            counted.add(id(v))
            if all(id(u.node) in members for u in v.uses()):
                array = const_array(v)
                total += int(array.size) if array is not None and array.ndim > 0 else 0
    return total


def _is_const(value: ir.Value) -> bool:
    return value.is_initializer() or ir.convenience.get_const_tensor(value) is not None


def _label(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else None) or node.op_type


def _cost_at_data_shapes(model: ir.Model, calibration) -> ModelCost:
    """MACs at the calibration data's sample shapes: dynamic image sizes would count as 1x1."""
    shapes = {
        name: [1, *arr.shape[1:]]
        for name, arr in calibration.inputs.items()
        if name not in calibration.unbatched_inputs and arr.ndim >= 1
    }
    try:
        return analyze_cost(model, shapes)
    except OnnxSlimError:
        return analyze_cost(model)


def macs_by_node(model: ir.Model, cost: ModelCost | None = None) -> dict[int, int]:
    """id(node) -> MACs, from the project's one cost model."""
    cost = cost or analyze_cost(model)
    by_name: dict[str, int] = {}
    for layer in cost.layers:
        by_name[layer.name] = by_name.get(layer.name, 0) + layer.macs
    return {
        id(node): by_name.get(node.name or f"{node.op_type}_{index}", 0)
        for index, node in enumerate(model.graph)
    }


# ----- measuring ----------------------------------------------------------------------------------


class _Bench:
    """Runs the model with some blocks switched off (their branch input replaced by a zero),
    without copying the model, and scores the outputs against the original's."""

    def __init__(self, model: ir.Model, calibration, max_samples: int, task_metric=None) -> None:
        from onnxslim_tool.pipeline import covered_labels

        self.model = model
        self.task_metric = task_metric
        data = calibration.subset(max_samples) if len(calibration) > max_samples else calibration
        self.feeds = list(data.batches(BATCH))
        self.labels = covered_labels(data, BATCH)
        self.samples = int(self.labels.shape[0]) if self.labels is not None else len(data)
        outputs = runtime.run_feeds(runtime.make_session(model), self.feeds)
        self.reference = self._evaluate(outputs, outputs)
        self._zeros: dict[str, ir.Value] = {}

    def shapes(self, values: Sequence[ir.Value]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype of each named value on the first calibration batch."""
        names = list(dict.fromkeys(v.name for v in values if v.name))
        batch = next(runtime.stream_tensors(self.model, names, self.feeds[:1]))
        return {name: (tuple(a.shape), a.dtype) for name, a in batch.items()}

    def measure(self, blocks: Sequence[Block], dtype: np.dtype) -> tuple[str, float, float]:
        """(metric, drop, min output cosine) with `blocks` switched off; inf drop when broken."""
        from onnxslim_tool.pipeline import metric_drop

        zero = self._zero(dtype)
        saved = [(b.node, b.branch_index, b.node.inputs[b.branch_index]) for b in blocks]
        try:
            for node, index, _ in saved:
                node.replace_input_with(index, zero)
            session = runtime.make_session(self.model)
        except OnnxSlimError:
            return "failed", float("inf"), 0.0
        finally:
            for node, index, value in reversed(saved):
                node.replace_input_with(index, value)
        try:
            outputs = runtime.run_feeds(session, self.feeds)
            candidate = self._evaluate(outputs, self.reference.outputs)
            fidelity = candidate.fidelity_to(self.reference)
        except (OnnxSlimError, ValueError):
            return "failed", float("inf"), 0.0
        if not all(f.finite for f in fidelity):
            return "non-finite outputs", float("inf"), 0.0
        drop, metric = metric_drop(self.reference, candidate)
        return metric, float(drop), min(f.cosine for f in fidelity)

    def _evaluate(self, outputs, reference_outputs):
        """Score as the gate does: the task metric when given, else labels, else fidelity."""
        from onnxslim_tool.pipeline import Evaluation
        from onnxslim_tool.task_metrics import score

        if self.task_metric is not None:
            value = score(self.task_metric, outputs, reference_outputs)
            return Evaluation(outputs, value, self.task_metric.label)
        return Evaluation(outputs, metrics.task_accuracy(outputs, self.labels))

    def _zero(self, dtype: np.dtype) -> ir.Value:
        key = np.dtype(dtype).str
        if key not in self._zeros:
            self._zeros[key] = add_initializer(
                self.model.graph, np.zeros((), dtype=dtype), "block_dropping_zero"
            )
        return self._zeros[key]

    def close(self) -> None:
        for value in self._zeros.values():
            self.model.graph.initializers.pop(value.name, None)
        self._zeros.clear()


# ----- the pass -----------------------------------------------------------------------------------


class BlockDropping(CompressionPass):
    """Drop the residual blocks whose removal costs least on calibration data.

    `drop_blocks`: how many blocks to drop; `target_macs`: drop until MACs are at most this
    fraction of the model's (with both, whichever comes first); `joint`: after the first
    choice, the `joint` cheapest remaining candidates are re-measured together with the
    blocks already chosen (0 = rank by individual costs only); `max_samples`: calibration
    samples used to measure costs.
    """

    name = "block-dropping"
    lossless = False
    uses_data = True

    def __init__(
        self,
        drop_blocks: int | None = None,
        target_macs: float | None = None,
        joint: int = 3,
        max_samples: int = 256,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> None:
        super().__init__(include=include, exclude=exclude)
        if drop_blocks is None and target_macs is None:
            raise ValueError("give drop_blocks (a count) or target_macs (a fraction of the MACs)")
        if drop_blocks is not None and (
            isinstance(drop_blocks, bool) or int(drop_blocks) != drop_blocks or drop_blocks < 1
        ):
            raise ValueError(f"drop_blocks must be a positive integer, got {drop_blocks!r}")
        if target_macs is not None and not 0.0 < float(target_macs) < 1.0:
            raise ValueError(f"target_macs must be a fraction in (0, 1), got {target_macs!r}")
        if int(joint) < 0 or int(max_samples) < 1:
            raise ValueError("joint must be >= 0 and max_samples >= 1")
        self.drop_blocks = None if drop_blocks is None else int(drop_blocks)
        self.target_macs = None if target_macs is None else float(target_macs)
        self.joint = int(joint)
        self.max_samples = int(max_samples)
        # Individual costs by block name, kept so a milder retry does not re-measure them.
        self._costs: dict[str, BlockCost] = {}
        self._dropped: int | None = None
        self._ranking: list[BlockCost] = []

    @property
    def ranking(self) -> list[BlockCost]:
        """Every candidate of the last rewrite, cheapest first, with `dropped` set."""
        return self._ranking

    def milder(self) -> BlockDropping | None:
        """One block fewer than the last attempt dropped; None once that is zero."""
        count = self._dropped if self._dropped is not None else self.drop_blocks
        if not count or count <= 1:
            return None
        mild = BlockDropping(
            drop_blocks=count - 1,
            joint=self.joint,
            max_samples=self.max_samples,
            include=self.include,
            exclude=self.exclude,
        )
        mild._costs = self._costs
        mild.calibration = self.calibration
        return mild

    def rewrite(self, model: ir.Model, record: PassRecord) -> None:
        if self.calibration is None:
            raise OnnxSlimError("block dropping measures each block on calibration data: pass --data")
        graph = model.graph
        graph.sort()
        cost = _cost_at_data_shapes(model, self.calibration)
        blocks, refused = find_blocks(model, macs_by_node(model, cost))
        for name, reason in refused:
            record.skip(name, reason)
        blocks = self._selected(blocks, record)
        if not blocks:
            record.notes.append("no droppable residual block")
            self._dropped = 0
            return
        bench = _Bench(model, self.calibration, self.max_samples, self.task_metric)
        try:
            blocks, dtype = self._shape_checked(bench, blocks, record)
            if not blocks:
                self._dropped = 0
                return
            costs = self._individual_costs(bench, blocks, dtype)
            chosen, joint_cost = self._choose(bench, blocks, costs, dtype, cost.total_macs)
        finally:
            bench.close()
        self._record_costs(record, costs, chosen, cost.total_macs, bench.samples, joint_cost)
        self._apply(model, chosen, costs, record)

    def _selected(self, blocks: list[Block], record: PassRecord) -> list[Block]:
        kept = []
        for block in blocks:
            ok, why = self.selects(block.node)
            excluded = next((n for n in block.nodes if self._excluded(n)), None)
            if not ok:
                record.skip(block.name, why)
            elif excluded is not None:
                record.skip(block.name, f"branch holds '{_label(excluded)}', excluded by --exclude")
            else:
                kept.append(block)
        return kept

    def _excluded(self, node: ir.Node) -> bool:
        names = (node.name or "", node.op_type)
        return any(fnmatch.fnmatchcase(n, pat) for pat in self.exclude for n in names)

    def _shape_checked(
        self, bench: _Bench, blocks: list[Block], record: PassRecord
    ) -> tuple[list[Block], np.dtype]:
        """Blocks whose skip has exactly the join's shape and a float dtype (no broadcast)."""
        values = [v for b in blocks for v in (b.node.inputs[b.skip_index], b.node.outputs[0])]
        shapes = bench.shapes(values)
        kept, dtypes = [], []
        for block in blocks:
            skip, out = block.node.inputs[block.skip_index], block.node.outputs[0]
            skip_shape, skip_dtype = shapes.get(skip.name, ((), None))
            out_shape, out_dtype = shapes.get(out.name, ((), None))
            if out_dtype is None or not np.issubdtype(out_dtype, np.floating):
                record.skip(block.name, "not a floating-point tensor")
            elif skip_shape != out_shape:
                record.skip(
                    block.name, f"skip shape {list(skip_shape)} differs from the block's {list(out_shape)}"
                )
            else:
                kept.append(block)
                dtypes.append(out_dtype)
        if len(set(np.dtype(d).str for d in dtypes)) > 1:
            record.notes.append("blocks of several float types: zero switch uses the first")
        return kept, (dtypes[0] if dtypes else np.dtype(np.float32))

    def _individual_costs(self, bench: _Bench, blocks: list[Block], dtype: np.dtype) -> dict[str, BlockCost]:
        costs = {}
        for block in blocks:
            cached = self._costs.get(block.name)
            if cached is None:
                metric, drop, cosine = bench.measure([block], dtype)
                cached = BlockCost(
                    block.name, len(block.nodes), block.macs, block.params, metric, drop, cosine
                )
                self._costs[block.name] = cached
            costs[block.name] = BlockCost(**{**cached.to_dict(), "dropped": False})
        return costs

    def _choose(
        self,
        bench: _Bench,
        blocks: list[Block],
        costs: dict[str, BlockCost],
        dtype: np.dtype,
        total_macs: int,
    ) -> tuple[list[Block], tuple[str, float, float] | None]:
        """Greedy: cheapest first (re-measured jointly on a shortlist), nested blocks merged."""
        inside = {b.name: {id(n) for n in b.nodes} for b in blocks}
        order = sorted(blocks, key=lambda b: costs[b.name].key)
        chosen: list[Block] = []
        joint_cost = None
        budget = None if self.target_macs is None else self.target_macs * total_macs
        while True:
            count_done = self.drop_blocks is not None and len(chosen) >= self.drop_blocks
            macs_done = budget is not None and total_macs - sum(b.macs for b in chosen) <= budget
            if count_done or macs_done:
                break
            covered = {i for b in chosen for i in inside[b.name]}
            pool = [b for b in order if b not in chosen and id(b.node) not in covered]
            if not pool:
                break
            pick, joint_cost = pool[0], None
            if chosen and self.joint > 0:
                trials = [(bench.measure([*chosen, b], dtype), b) for b in pool[: self.joint]]
                joint_cost, pick = min(trials, key=lambda t: (t[0][1], -t[0][2], t[1].name))
            # An outer block swallows the chosen blocks nested in its branch.
            chosen = [b for b in chosen if id(b.node) not in inside[pick.name]] + [pick]
        return chosen, joint_cost

    def _record_costs(
        self,
        record: PassRecord,
        costs: dict[str, BlockCost],
        chosen: list[Block],
        total_macs: int,
        samples: int,
        joint_cost: tuple[str, float, float] | None,
    ) -> None:
        names = {b.name for b in chosen}
        self._ranking = sorted(costs.values(), key=lambda c: c.key)
        for c in self._ranking:
            c.dropped = c.name in names
        record.notes.append(
            f"{len(costs)} candidate block(s), cost measured alone on {samples} calibration sample(s):"
        )
        for c in self._ranking:
            share = c.macs / total_macs if total_macs else 0.0
            record.notes.append(
                f"{c.name}: {c.nodes} node(s), {c.macs:,} MACs ({share:.1%}), {c.metric} drop {c.drop:+.4f}, "
                f"output cosine {c.cosine:.5f}" + (" -> dropped" if c.dropped else "")
            )
        if joint_cost is not None:
            metric, drop, cosine = joint_cost
            record.notes.append(
                f"all dropped blocks together: {metric} drop {drop:+.4f}, output cosine {cosine:.5f}"
            )
        if self.target_macs is not None:
            left = total_macs - sum(b.macs for b in chosen)
            if left > self.target_macs * total_macs:
                record.notes.append(
                    f"MACs target {self.target_macs:.0%} not reached: {left / max(total_macs, 1):.1%} left "
                    "after dropping every candidate"
                )

    def _apply(
        self, model: ir.Model, chosen: list[Block], costs: dict[str, BlockCost], record: PassRecord
    ) -> None:
        graph = model.graph
        dropped = 0
        for block in chosen:
            node = block.node
            # Read the skip now: an earlier drop may have rewired it to its own skip.
            if not bypass(node.outputs[0], node.inputs[block.skip_index]):
                record.skip(
                    block.name, "block output is a graph output and the skip tensor cannot take its name"
                )
                continue
            graph.remove(node, safe=True)
            c = costs[block.name]
            record.changed(
                block.name,
                node.op_type,
                f"block dropped: {c.nodes} node(s), {c.macs:,} MACs; {c.metric} drop {c.drop:+.4f} alone",
                before=block.params,
                after=0,
            )
            dropped += 1
        self._dropped = dropped
        RemoveDeadCode().call(model)
