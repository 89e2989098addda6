"""Sampled inputs of the layers that read a group's channels, read for many groups per run.

ThiNet scores and the random-search criterion read, for every group, what its consumers see
on the calibration data. One model run per consumer cost DenseNet121 ~500 onnxruntime
sessions and full runs per pruning attempt (350 of its 580 seconds); here the groups still to
come ride along in the same runs while two memory budgets hold: the named tensors of one
calibration batch, and the sampled rows kept for groups not yet asked for. Each consumer's
rows are sampled with its own generator, seeded as a run of its own would be, so the result
does not depend on which groups shared a run.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxslim_tool import runtime
from onnxslim_tool.pruning.reconstruct import LinearLayer

# The tensors one calibration batch computes for a shared run, all held at once.
FEED_BYTES = 512 * 2**20
# Sampled rows read ahead for groups not asked for yet (float64, as the criteria use them).
KEPT_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Request:
    """One consumer of one group: `columns` index its input channels ([channels, span])."""

    layer: LinearLayer
    columns: np.ndarray
    rows: int  # rows wanted over all batches

    def per_batch(self, batches: int) -> int:
        return max(1, -(-self.rows // max(1, batches)))

    def patch_bytes(self, batches: int) -> int:
        return self.per_batch(batches) * max(1, batches) * self.columns.size * self.layer.weight_shape[2] * 8


Entry = tuple[Hashable, Sequence[Request]]
Patches = list[tuple[np.ndarray, np.ndarray]]


class ConsumerInputs:
    """Per request: sampled inputs [rows, channels, span * taps] (float64) and the weight slice
    [outputs, channels, span * taps] that reads them."""

    def __init__(self, model: ir.Model, feeds: Sequence[runtime.Feed], seed: int) -> None:
        self.model = model
        self.feeds = list(feeds)
        self.seed = seed
        self._ready: dict[Hashable, Patches] = {}
        self._tensor_bytes: dict[str, int] = {}  # measured per calibration batch
        self.runs = 0  # shared runs over the calibration data, for tests and notes

    def read(self, first: Entry, upcoming: Iterable[Entry] = ()) -> Patches:
        """`first`'s patches. Entries from `upcoming` (in the order they will be asked for)
        are read in the same run while the budgets hold, and kept until asked for."""
        key = first[0]
        if key not in self._ready:
            self._fill(self._batch(first, iter(upcoming)))
        return self._ready.pop(key)

    def _batch(self, first: Entry, upcoming: Iterator[Entry]) -> list[Entry]:
        entries = [first]
        names = {r.layer.input.name for r in first[1]}
        kept = 0
        for key, requests in upcoming:
            if key in self._ready or not requests:
                continue
            new = {r.layer.input.name for r in requests} - names
            # A tensor no run has measured yet counts as the largest measured one: the first
            # run reads one group's tensors only, so the estimate is never blind.
            unknown = max(self._tensor_bytes.values(), default=FEED_BYTES)
            feed = sum(self._tensor_bytes.get(n, unknown) for n in names | new)
            extra = sum(r.patch_bytes(len(self.feeds)) for r in requests)
            if feed > FEED_BYTES or kept + extra > KEPT_BYTES:
                break
            entries.append((key, requests))
            names |= new
            kept += extra
        return entries

    def _fill(self, entries: list[Entry]) -> None:
        jobs = [(key, request, np.random.default_rng(self.seed)) for key, reqs in entries for request in reqs]
        chunks: list[list[np.ndarray]] = [[] for _ in jobs]
        names = list(dict.fromkeys(request.layer.input.name for _, request, _ in jobs))
        self.runs += 1
        for batch in runtime.stream_tensors(self.model, names, self.feeds, prune=True):
            for name in names:
                self._tensor_bytes[name] = max(self._tensor_bytes.get(name, 0), int(batch[name].nbytes))
            for chunk, (_key, request, rng) in zip(chunks, jobs, strict=True):
                per_batch = request.per_batch(len(self.feeds))
                sampled = request.layer.rows(batch[request.layer.input.name], None, rng, per_batch)[0]
                chunk.append(sampled[:, request.columns.ravel()])
        for key, _requests in entries:
            self._ready[key] = []
        for chunk, (key, request, _rng) in zip(chunks, jobs, strict=True):
            size = request.columns.shape[0]
            weight = request.layer.weight()
            span = request.columns.shape[1] * weight.shape[2]
            patches = np.concatenate(chunk).astype(np.float64).reshape(-1, size, span)
            self._ready[key].append(
                (patches, weight[:, request.columns.ravel()].reshape(weight.shape[0], size, -1))
            )
