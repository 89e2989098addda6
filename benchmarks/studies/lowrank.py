"""The lowrank study (on request: `python -m benchmarks.run --variants lowrank`)."""

from __future__ import annotations

from benchmarks.variants import Variant

NAME = "lowrank"


def variants() -> list[Variant]:
    return []
