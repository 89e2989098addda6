"""Conv decompositions: what a Conv becomes, what that costs, and the nodes that do it.

(r, R, r1, r2: ranks; every stage but the one carrying the kernel is a 1 x 1 conv.)

- "svd" (channel SVD, Zhang et al. 2016): a k x k conv with r filters, then 1 x 1 back to C_out.
- "spatial-svd" (Jaderberg et al. 2014): a k_h x 1 conv with r filters, then 1 x k_w.
- "cp" (Lebedev et al. 2015): 1 x 1 (C_in -> R), depthwise k_h x 1, depthwise 1 x k_w,
  1 x 1 (R -> C_out), from a rank-R CP decomposition of the kernel.
- "tucker" (Kim et al. 2015): 1 x 1 (C_in -> r1), k x k core (r1 -> r2), 1 x 1 (r2 -> C_out).

Strides, padding (auto_pad included) and dilation go on the factors that carry the kernel,
so the output has exactly the original shape; the bias goes on the last factor.

A grouped conv is g independent convs (C_in/g -> C_out/g each): every group is factorized
on its own at the same ranks, and each stage is a conv with the same group count (the CP
depthwise stages get g x R groups), so a group never reads another group's channels.

CP and Tucker-2 use our own numpy code (`linalg.cp_als`, HOSVD), not tensorly: on trained
3x3 kernels of YOLOv8n (32x32, 64x64; CP at about a quarter of the params, Tucker-2 at half
of each channel mode, one thread, same sweeps) tensorly 0.10's `parafac` reached the same or
a slightly worse fit (relative error 0.519 vs our 0.514, 0.466 vs 0.454, 0.160 vs 0.160)
5-7x slower, and `partial_tucker`'s HOOI iterations lowered the error by at most 0.007
(0.550 vs 0.558) for 3-10x the time, a gap the data-aware refit, which re-chooses the core's
output subspace from activations, makes moot. Not a dependency worth adding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxslim_tool import linalg
from onnxslim_tool.conv_geometry import ConvGeometry, conv_patches, sample_positions
from onnxslim_tool.graph_utils import add_initializer, attr
from onnxslim_tool.lowrank.conv_rank import PLANNERS, cp_iterations
from onnxslim_tool.lowrank.graph import (
    Shapes,
    add_to_const,
    const,
    drop_if_unused,
    layer_name,
    new_node,
    replace,
    spatial,
    weight_array,
    weight_problem,
)
from onnxslim_tool.lowrank.plan import Factors, Plan, identity
from onnxslim_tool.lowrank.rank import no_gain

# Output grid assumed for MACs when shape inference cannot tell a conv's spatial size.
ASSUMED_SPATIAL = 32
SAME_PADS = ("SAME_UPPER", "SAME_LOWER")


@dataclass
class ConvLayer:
    """A Conv with a constant kernel [C_out, C_in / group, *k]."""

    node: ir.Node
    weight: ir.Value
    kernel: np.ndarray
    bias: ir.Value | None
    in_spatial: tuple[int, ...]
    out_spatial: tuple[int, ...]
    assumed_spatial: bool = False
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"
    groups: int = 1

    @property
    def name(self) -> str:
        return layer_name(self.node)

    @property
    def weight_params(self) -> int:
        return self.kernel.size

    @property
    def input_value(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def nd(self) -> int:
        return self.kernel.ndim - 2

    @property
    def group_shape(self) -> tuple[int, ...]:
        """One group's kernel shape: (C_out / g, C_in / g, *k)."""
        c_out, *rest = self.kernel.shape
        return (c_out // self.groups, *rest)

    @property
    def bias_adjustable(self) -> bool:
        return self.bias is None or weight_array(self.bias) is not None

    def part_kernel(self, part: int) -> np.ndarray:
        per = self.group_shape[0]
        return self.kernel[part * per : (part + 1) * per]

    def part_kernels(self) -> list[np.ndarray]:
        return [self.part_kernel(g) for g in range(self.groups)]

    def plan(
        self, method: str, ratio: float | None, energy: float | None, seed: int, rule: str = "ratio"
    ) -> Plan | str:
        c_out, c_in, *k = self.group_shape
        taps = math.prod(k)
        notes = []
        if method in ("spatial-svd", "cp") and (self.nd != 2 or 1 in k):
            # What the method would split spatially is not there: the channel SVD, as Tucker
            # does for 1x1 convs, so a bottleneck net's 1x1 convs still count toward a target.
            shape = "x".join(map(str, k))
            why = f"{self.nd}-D kernel" if self.nd != 2 else "1x1 conv" if taps == 1 else f"{shape} kernel"
            notes.append(f"{why}: channel SVD ({method} splits a 2-D k x k kernel)")
            method = "svd"
        if method == "tucker" and taps == 1:
            method = "svd"
            notes.append("1x1 conv: channel SVD (Tucker-2 of a 1x1 kernel adds a factor for nothing)")
        if self.groups > 1:
            notes.append(f"per group: {self.groups} groups of {c_in} -> {c_out} channels")
        if self.assumed_spatial:
            notes.append(f"spatial size unknown: MACs on an assumed {ASSUMED_SPATIAL} grid")
        before = (self.kernel.size, self.macs_full())
        budget = None if ratio is None else int(ratio * self.kernel.size)
        chosen = PLANNERS[method](self, budget, energy, seed, rule)
        if isinstance(chosen, str):
            return self._per_group(chosen)
        if chosen[0] != method:  # Tucker keeping every input channel is a channel SVD
            notes.append("input mode kept whole: Tucker-1 = channel SVD")
        method, ranks = chosen
        after = self.cost(method, ranks)
        problem = no_gain(after, before, f"rank {'x'.join(map(str, ranks))}")
        if problem:
            return self._per_group(problem)
        bias = 0 if self.bias is None or weight_array(self.bias) is None else weight_array(self.bias).size
        params = (before[0] + bias, after[0] + bias)
        return Plan(self, method, ranks, params, (before[1], after[1]), "; ".join(notes))

    def _per_group(self, reason: str) -> str:
        """A skip reason, saying for a grouped conv that its small groups are why."""
        if self.groups == 1:
            return reason
        c_out, c_in = self.group_shape[:2]
        return f"{reason}; factorized per group ({self.groups} groups of {c_in} -> {c_out} channels)"

    # ---- costs (MACs per sample, from the real spatial sizes)

    def _areas(self) -> tuple[int, int, int]:
        """Input area, output area, and the k_h x 1 stage's area (output rows x input columns)."""
        in_area, out_area = math.prod(self.in_spatial), math.prod(self.out_spatial)
        mid = self.out_spatial[0] * self.in_spatial[1] if self.nd == 2 else out_area
        return in_area, out_area, mid

    def macs_full(self) -> int:
        return self.kernel.size * self._areas()[1]

    def cost(self, method: str, ranks: tuple[int, ...]) -> tuple[int, int]:
        """(params, MACs) of the factorized layer: one group's, times the group count."""
        c_out, c_in, *k = self.group_shape
        taps = math.prod(k)
        in_area, out_area, mid = self._areas()
        if method == "svd":
            (r,) = ranks
            params, macs = r * (c_in * taps + c_out), out_area * r * (c_in * taps + c_out)
        elif method == "spatial-svd":
            (r,) = ranks
            kh, kw = k
            params = r * (c_in * kh + c_out * kw)
            macs = r * c_in * kh * mid + c_out * r * kw * out_area
        elif method == "cp":
            (r,) = ranks
            kh, kw = k
            params = r * (c_in + kh + kw + c_out)
            macs = r * c_in * in_area + r * kh * mid + r * kw * out_area + c_out * r * out_area
        else:
            r1, r2 = ranks
            params = c_in * r1 + r1 * r2 * taps + c_out * r2
            macs = c_in * r1 * in_area + r1 * r2 * taps * out_area + c_out * r2 * out_area
        return params * self.groups, macs * self.groups

    # ---- factorizations

    def factorize(self, method: str, ranks: tuple[int, ...], seed: int) -> list[Factors]:
        return [_factorize(kernel, method, ranks, seed) for kernel in self.part_kernels()]

    # ---- what the refit reads

    def input_rows(self, x: np.ndarray, positions) -> np.ndarray:
        """Im2col patches [rows, C_in, taps] of a batch at sampled output positions."""
        geometry = ConvGeometry.of(self.node, self.kernel.shape, x.shape[2:])
        return conv_patches(x, geometry, *positions)

    def sample(self, x: np.ndarray, count: int, rng: np.random.Generator):
        """`count` output positions of a batch: (sample indices, spatial coordinates)."""
        geometry = ConvGeometry.of(self.node, self.kernel.shape, x.shape[2:])
        return sample_positions((x.shape[0], *geometry.output_spatial(x.shape[2:])), count, rng)

    def part_matrix(self, part: int) -> np.ndarray:
        kernel = self.part_kernel(part)
        return kernel.reshape(kernel.shape[0], -1).T

    def part_inputs(self, rows: np.ndarray, part: int) -> np.ndarray:
        per = self.group_shape[1]
        return rows[:, part * per : (part + 1) * per]

    def part_outputs(self, part: int) -> slice:
        per = self.group_shape[0]
        return slice(part * per, (part + 1) * per)

    # ---- the graph

    def emit(self, graph: ir.Graph, plan: Plan, parts: list[Factors]) -> list[ir.Node]:
        """The factor convs; each stage stacks the groups' weights along its output channels."""
        per_group = [self._stages(plan.method, factors) for factors in parts]
        stages = []
        for index, (_, attrs) in enumerate(per_group[0]):
            weight = np.concatenate([group[index][0] for group in per_group], axis=0)
            stage_groups = attrs.pop("group", 1) * self.groups
            stages.append((weight, {**attrs, "group": stage_groups} if stage_groups != 1 else attrs))
        offsets = [f.offset for f in parts]
        offset = None
        if any(o is not None for o in offsets):
            per = self.group_shape[0]
            offset = np.concatenate([np.zeros(per) if o is None else o for o in offsets])
        return self._emit_stages(graph, stages, offset)

    def _stages(self, method: str, factors: Factors) -> list[tuple[np.ndarray, dict]]:
        """One group's factor weights and attributes (group = the count within one group)."""
        c_out = self.group_shape[0]
        k = tuple(self.kernel.shape[2:])
        ones = (1,) * self.nd
        if method == "svd":
            r = factors.left.shape[1]
            return [
                (factors.left.T.reshape(r, -1, *k), self._attrs(range(self.nd), k)),
                (factors.right.T.reshape(c_out, r, *ones), self._attrs((), ones)),
            ]
        if method == "tucker":
            (basis,) = factors.front
            r1, r2 = basis.shape[1], factors.left.shape[1]
            return [
                (basis.T.reshape(r1, -1, *ones), self._attrs((), ones)),
                (factors.left.T.reshape(r2, r1, *k), self._attrs(range(self.nd), k)),
                (factors.right.T.reshape(c_out, r2, *ones), self._attrs((), ones)),
            ]
        if method == "spatial-svd":
            (vertical,) = factors.front
            r, kh, kw = vertical.shape[0], k[0], k[1]
            horizontal = factors.left.reshape(r, kw, c_out).transpose(2, 0, 1)
            return [
                (vertical[..., None], self._attrs((0,), (kh, 1))),
                (horizontal[:, :, None, :], self._attrs((1,), (1, kw))),
            ]
        in_f, y_f, x_f = factors.front  # cp
        r = in_f.shape[1]
        return [
            (in_f.T[:, :, None, None], self._attrs((), ones)),
            (y_f.T[:, None, :, None], self._attrs((0,), (k[0], 1), group=r)),
            (x_f.T[:, None, None, :], self._attrs((1,), (1, k[1]), group=r)),
            (factors.left.T[:, :, None, None], self._attrs((), ones)),
        ]

    def _attrs(self, axes: Sequence[int], kernel: tuple[int, ...], group: int = 1) -> dict:
        """Attributes of a factor conv applying the original's geometry along `axes` only."""
        axes = set(axes)
        attrs: dict = {"kernel_shape": list(kernel)}
        strides = [s if i in axes else 1 for i, s in enumerate(self.strides)]
        dilations = [d if i in axes else 1 for i, d in enumerate(self.dilations)]
        if any(s != 1 for s in strides):
            attrs["strides"] = strides
        if any(d != 1 for d in dilations):
            attrs["dilations"] = dilations
        if axes and self.auto_pad in (*SAME_PADS, "VALID"):
            attrs["auto_pad"] = self.auto_pad
        elif axes:
            begin = [p if i in axes else 0 for i, p in enumerate(self.pads[: self.nd])]
            end = [p if i in axes else 0 for i, p in enumerate(self.pads[self.nd :])]
            if any(begin + end):
                attrs["pads"] = begin + end
        if group != 1:
            attrs["group"] = group
        return attrs

    def _emit_stages(self, graph: ir.Graph, stages: list[tuple[np.ndarray, dict]], offset) -> list[ir.Node]:
        dtype = self.weight.dtype.numpy()
        x = self.node.inputs[0]
        nodes = []
        for index, (weight, attrs) in enumerate(stages):
            value = const(graph, weight, dtype, f"{self.name}_lr{index}_w")
            inputs = [x, value]
            if index == len(stages) - 1 and self.bias is not None:
                inputs.append(self.bias)
            node = new_node(graph, "Conv", inputs, attrs, self.name, index)
            nodes.append(node)
            x = node.outputs[0]
        replace(graph, self.node, nodes)
        if offset is not None:
            last = nodes[-1]
            if self.bias is None:
                value = add_initializer(graph, offset.astype(dtype), f"{self.name}_lr_bias")
                last.resize_inputs(3)
                last.replace_input_with(2, value)
            else:
                add_to_const(self.bias, offset)
        drop_if_unused(graph, self.weight)
        return nodes


def _factorize(kernel: np.ndarray, method: str, ranks: tuple[int, ...], seed: int) -> Factors:
    """One group's factors; `kernel` is [C_out, C_in, *k] of that group."""
    c_out, c_in, *k = kernel.shape
    kernel = kernel.astype(np.float64)
    if method == "svd":
        matrix = kernel.reshape(c_out, -1).T
        left, right = linalg.low_rank(matrix, ranks[0])
        return Factors([], identity, matrix, ranks[0], left, right)
    if method == "tucker":
        r1, r2 = ranks
        basis = linalg.leading_subspace(linalg.unfold(kernel, 1), r1)  # [C_in, r1]
        projected = np.einsum("oi...,ir->or...", kernel, basis).reshape(c_out, -1).T
        left, right = linalg.low_rank(projected, r2)
        return Factors([basis], _tucker_features(basis), projected, r2, left, right)
    kh, kw = k
    if method == "spatial-svd":
        (r,) = ranks
        separable = kernel.transpose(1, 2, 0, 3).reshape(c_in * kh, c_out * kw)
        left, right = linalg.low_rank(separable, r)
        vertical = left.T.reshape(r, c_in, kh)
        last = right.reshape(r, c_out, kw).transpose(0, 2, 1).reshape(r * kw, c_out)
        return Factors([vertical], _spatial_features(vertical, k), last, None, last)
    (r,) = ranks
    out_f, in_f, y_f, x_f = linalg.cp_als(kernel, r, iterations=cp_iterations(kernel.shape, r), seed=seed)
    last = out_f.T  # [R, C_out]
    return Factors([in_f, y_f, x_f], _cp_features(in_f, y_f, x_f, k), last, None, last)


def conv_layer(node: ir.Node, shapes: Shapes) -> ConvLayer | str:
    """The Conv as a factorizable layer, or why it is not one."""
    inputs = list(node.inputs)
    if len(inputs) < 2 or inputs[0] is None or inputs[1] is None:
        return "missing operand"
    kernel = weight_array(inputs[1])
    if kernel is None:
        return "kernel is not a constant"
    problem = weight_problem(inputs[1], kernel)
    if problem:
        return problem
    if kernel.ndim < 3:
        return f"kernel is {kernel.ndim}-D"
    group = int(attr(node, "group", 1))
    if group < 1 or kernel.shape[0] % group:
        return f"group={group} does not divide the {kernel.shape[0]} output channels"
    if group > 1 and kernel.shape[1] == 1 and kernel.shape[0] == group:
        return (
            f"depthwise conv (group={group} = channels): one k x k filter per channel, "
            "no channel mode to factorize"
        )
    nd = kernel.ndim - 2
    auto_pad = attr(node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    bias = inputs[2] if len(inputs) > 2 else None
    strides = tuple(int(s) for s in attr(node, "strides", [1] * nd))
    dilations = tuple(int(d) for d in attr(node, "dilations", [1] * nd))
    pads = tuple(int(p) for p in attr(node, "pads", [0] * 2 * nd))
    in_sp, out_sp = spatial(shapes.get(inputs[0].name), nd), spatial(shapes.get(node.outputs[0].name), nd)
    assumed = in_sp is None or out_sp is None
    if assumed:
        out_sp = (ASSUMED_SPATIAL,) * nd
        in_sp = tuple(o * s for o, s in zip(out_sp, strides, strict=True))
    return ConvLayer(
        node, inputs[1], kernel, bias, in_sp, out_sp, assumed, strides, dilations, pads, auto_pad, group
    )


# ----- the features a refit of the last stage reads (conv patches through the fixed factors)


def _tucker_features(basis: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    def project(patches: np.ndarray) -> np.ndarray:
        projected = np.einsum("nit,ir->nrt", patches, basis.astype(patches.dtype), optimize=True)
        return projected.reshape(patches.shape[0], -1)

    return project


def _spatial_features(vertical: np.ndarray, kernel: Sequence[int]) -> Callable[[np.ndarray], np.ndarray]:
    def project(patches: np.ndarray) -> np.ndarray:
        grid = patches.reshape(patches.shape[0], patches.shape[1], *kernel)
        features = np.einsum("niyx,riy->nrx", grid, vertical.astype(patches.dtype), optimize=True)
        return features.reshape(patches.shape[0], -1)

    return project


def _cp_features(
    in_f: np.ndarray, y_f: np.ndarray, x_f: np.ndarray, kernel: Sequence[int]
) -> Callable[[np.ndarray], np.ndarray]:
    def project(patches: np.ndarray) -> np.ndarray:
        grid = patches.reshape(patches.shape[0], patches.shape[1], *kernel)
        dt = patches.dtype
        return np.einsum(
            "niyx,ir,yr,xr->nr", grid, in_f.astype(dt), y_f.astype(dt), x_f.astype(dt), optimize=True
        )

    return project
