"""The sharing study (on request: `python -m benchmarks.run --variants sharing`)."""

from __future__ import annotations

from benchmarks.variants import Variant

NAME = "sharing"


def variants() -> list[Variant]:
    return []
