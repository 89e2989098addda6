"""The remaining methods of the literature (on request: `--variants extras`).

- the newer channel criteria (entropy, nisp, random-search) beside l1, each pruning to 80%
  of the MACs with refit, as the pruning study's 20% cut;
- block dropping: the 1 and 2 residual/transformer blocks whose removal costs least on the
  calibration data (measured per candidate by the pass), then cleanup.

The ternary and power-of-two codebooks are in the sharing study (`ours-share-ternary`,
`ours-share-pow2-4bit`). No accuracy budget: every variant is measured as it is.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from benchmarks.variants import Job, Variant

NAME = "extras"
CRITERIA = ("l1", "entropy", "nisp", "random-search")
MACS_KEPT = 0.8
BLOCKS = (1, 2)


def variants() -> list[Variant]:
    pct = round(MACS_KEPT * 100)
    out = [
        Variant(
            f"ours-prune-{criterion}-macs-{pct}",
            "onnxslim_tool",
            f"channel pruning to {pct}% of the MACs ranked by '{criterion}', refit, then cleanup",
            partial(convert, "prune", criterion),
            on_request=True,
        )
        for criterion in CRITERIA
    ]
    out += [
        Variant(
            f"ours-drop-blocks-{n}",
            "onnxslim_tool",
            f"drop the {n} cheapest residual/transformer block(s) by measured cost, then cleanup",
            partial(convert, "blocks", n),
            on_request=True,
        )
        for n in BLOCKS
    ]
    return out


def convert(kind: str, setting: Any, job: Job) -> dict[str, Any]:
    from onnxslim_tool import api
    from onnxslim_tool.data import CalibrationData
    from onnxslim_tool.passes import BlockDropping, ChannelPruning, Cleanup

    data = CalibrationData.from_npz(job.calibration) if job.calibration else None
    if kind == "prune":
        middle = ChannelPruning(target_macs=MACS_KEPT, criterion=setting, seed=job.seed)
        passes = [Cleanup(fold_batchnorm=False), middle, Cleanup()]
    else:
        passes = [Cleanup(), BlockDropping(drop_blocks=setting), Cleanup()]
    result = api.compress(str(job.source), data, passes=passes, eval_data=data, seed=job.seed)
    result.save(job.target)
    record = result.steps[1].record
    return {
        "steps": [
            {"pass": s.name, "status": s.status, "reason": s.reason, "seconds": round(s.seconds, 3)}
            for s in result.steps
        ],
        "notes": list(record.notes) if record else [],
    }
