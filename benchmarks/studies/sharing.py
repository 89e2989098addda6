"""The sharing study (on request: `python -m benchmarks.run --variants sharing`).

Deep Compression's post-training stages, each alone and chained, with no accuracy budget
so that every setting is measured as it is (the accuracy column shows what it cost):

- k-means weight sharing at 8/6/4/3/2 bits (per-layer codebooks, centroids refit by least
  squares on the calibration data);
- magnitude pruning at 50/70/90% sparsity (Wanda-style scores with data, refit);
- the chain: pruning 50% then 4-bit sharing, and that chain followed by int8 weights;
- the fixed-form codebooks: ternary per output channel (refit) and 4-bit powers of two.

Bytes are the written file's: codes, masks and tables as stored, graph included.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from benchmarks.variants import Job, Variant

NAME = "sharing"
BITS = (8, 6, 4, 3, 2)
SPARSITIES = (0.5, 0.7, 0.9)


def variants() -> list[Variant]:
    out = [
        Variant(
            f"ours-share-{bits}bit",
            "onnxslim_tool",
            f"k-means sharing, {bits}-bit codes, codebook per layer refit on the calibration data",
            partial(convert, [("share", {"bits": bits, "refit": True})]),
            on_request=True,
        )
        for bits in BITS
    ]
    out += [
        Variant(
            f"ours-sparse-{round(s * 100)}",
            "onnxslim_tool",
            f"magnitude pruning to {round(s * 100)}% sparsity (scores |w| x input rms, refit), stored sparse",
            partial(convert, [("prune", {"sparsity": s})]),
            on_request=True,
        )
        for s in SPARSITIES
    ]
    chain = [("prune", {"sparsity": 0.5}), ("share", {"bits": 4, "refit": True})]
    out += [
        Variant(
            "ours-sparse-50-share-4bit",
            "onnxslim_tool",
            "magnitude pruning 50%, then 4-bit k-means sharing with zero reserved (refit)",
            partial(convert, chain),
            on_request=True,
        ),
        Variant(
            "ours-sparse-50-share-4bit-int8",
            "onnxslim_tool",
            "the same chain, then int8 weight-only quantization of what sharing left in float",
            partial(convert, [*chain, ("quantize", {"mode": "int8-weights"})]),
            on_request=True,
        ),
        Variant(
            "ours-share-ternary",
            "onnxslim_tool",
            "ternary {-a, 0, +a} per output channel (TWN threshold), refit; 2-bit codes",
            partial(convert, [("share", {"method": "ternary", "per_channel": True, "refit": True})]),
            on_request=True,
        ),
        Variant(
            "ours-share-pow2-4bit",
            "onnxslim_tool",
            "4-bit powers of two (0 and +-2^e) per layer, ShiftCNN-style; no refit",
            partial(convert, [("share", {"method": "pow2", "bits": 4})]),
            on_request=True,
        ),
    ]
    return out


def convert(steps: list[tuple[str, dict[str, Any]]], job: Job) -> dict[str, Any]:
    from onnxslim_tool import api
    from onnxslim_tool.data import CalibrationData
    from onnxslim_tool.passes import Cleanup, Quantize, WeightPruning, WeightSharing

    kinds = {"share": WeightSharing, "prune": WeightPruning, "quantize": Quantize}
    data = CalibrationData.from_npz(job.calibration) if job.calibration else None
    passes = [Cleanup()] + [kinds[kind](**params, seed=job.seed) for kind, params in steps]
    # No budget: the whole calibration set fits (eval_data=data); the benchmark judges on
    # its own evaluation data.
    result = api.compress(str(job.source), data, passes=passes, eval_data=data, seed=job.seed)
    result.save(job.target)
    return {
        "steps": [
            {"pass": s.name, "status": s.status, "reason": s.reason, "seconds": round(s.seconds, 3)}
            for s in result.steps
        ],
        "notes": [n for s in result.steps if s.record for n in s.record.notes if "written" in n],
    }
