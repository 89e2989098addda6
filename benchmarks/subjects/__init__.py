"""The benchmark's subjects by name, and the groups `--subjects` accepts.

Each module sets its subject up lazily (downloads, exports, media) so naming one subject
never touches the others.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from benchmarks.subject import SetupContext, Subject

Factory = Callable[[SetupContext], Subject]


def catalogue() -> dict[str, Factory]:
    from benchmarks.subjects import digits, light_zoo, minilm, vad, yolo

    factories: dict[str, Factory] = {name: partial(digits.build, name) for name in digits.NAMES}
    factories.update({name: partial(light_zoo.build, name) for name in light_zoo.names()})
    factories["yolov8n"] = partial(yolo.build, "yolov8n")
    factories["silero_vad"] = partial(vad.build, "silero_vad")
    factories["minilm"] = partial(minilm.build, "minilm")
    return factories


def groups(names: list[str]) -> dict[str, list[str]]:
    return {
        "samples": [n for n in names if n.startswith("digits_")],
        "zoo": [n for n in names if n.startswith("zoo_")],
        "pretrained": ["yolov8n", "silero_vad", "minilm"],
        "all": list(names),
    }


def resolve(selection: str | None) -> list[str]:
    """Subject names from a comma list of names and group names (default: all), in catalogue order."""
    names = list(catalogue())
    if not selection:
        return names
    known = groups(names)
    wanted: list[str] = []
    for item in (s.strip() for s in selection.split(",") if s.strip()):
        if item in known:
            wanted += known[item]
        elif item in names:
            wanted.append(item)
        else:
            raise ValueError(
                f"unknown subject '{item}'; subjects: {', '.join(names)}; groups: {', '.join(known)}"
            )
    return [n for n in names if n in set(wanted)]
