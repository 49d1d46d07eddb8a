"""The installed packages against the hashed lock they were tested with (``site-agent doctor``'s ``lock`` check).

A release pins what it was tested with in ``requirements/site.lock`` and ``requirements/coordinator.lock``
(``scripts/lock.sh``; installing from them: docs/install.md). The package carries the very files:
``pixcell_fed/locks`` is a link to ``requirements/``, so an installed wheel holds a copy and an editable install
reads the repository's. This module reads a lock, keeps the pins whose environment markers hold on this
interpreter (one lock covers Python 3.11 to 3.13), and compares each pinned version with the installed one.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

#: The roles that have a lock (``requirements/<role>.lock``).
LOCK_ROLES = ("site", "coordinator")


@dataclass(frozen=True)
class LockedPackage:
    """One pin of a lock: a distribution name and its exact version."""

    name: str
    version: str


@dataclass(frozen=True)
class InstalledDifference:
    """A pinned package installed at another version, or not at all (``installed`` is None)."""

    locked: LockedPackage
    installed: str | None


@dataclass(frozen=True)
class LockComparison:
    """How this environment compares with a lock: the pins that hold and those that do not."""

    lock_name: str
    matching: tuple[LockedPackage, ...]
    differences: tuple[InstalledDifference, ...]

    @property
    def different(self) -> tuple[InstalledDifference, ...]:
        return tuple(d for d in self.differences if d.installed is not None)

    @property
    def missing(self) -> tuple[InstalledDifference, ...]:
        return tuple(d for d in self.differences if d.installed is None)

    @property
    def ok(self) -> bool:
        return not self.differences

    @property
    def n_pins(self) -> int:
        return len(self.matching) + len(self.differences)


def lock_file(role: str = "site") -> Path | None:
    """The lock shipped with the installed package for ``role`` (None when this installation carries none)."""
    if role not in LOCK_ROLES:
        raise ValueError(f"unknown lock role {role!r}; one of {', '.join(LOCK_ROLES)}")
    path = Path(str(resources.files("pixcell_fed") / "locks" / f"{role}.lock"))
    return path if path.is_file() else None


def parse_lock(text: str, *, environment: Mapping[str, str] | None = None) -> tuple[LockedPackage, ...]:
    """The pins of a ``pip-compile``/``uv pip compile`` lock that apply to ``environment`` (default: this one).

    Comments, ``--hash`` options and option lines are skipped. Raises ValueError for a line that is not one
    exactly pinned requirement (``name==version``, optionally with a marker), naming the line.
    """
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, LockedPackage] = {}
    for number, line in _logical_lines(text):
        if line.startswith("-"):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise ValueError(f"line {number} of the lock is not a requirement: {line!r} ({exc})") from exc
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator not in ("==", "===") or "*" in specs[0].version:
            raise ValueError(f"line {number} of the lock does not pin one exact version: {line!r}")
        if req.marker is not None and not req.marker.evaluate(dict(environment) if environment else None):
            continue
        name = canonicalize_name(req.name)
        if name in pins:
            raise ValueError(f"line {number} of the lock pins {req.name} a second time for this environment")
        pins[name] = LockedPackage(name, specs[0].version)
    return tuple(pins.values())


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each requirement: continuations joined, comments and hashes dropped."""
    out: list[tuple[int, str]] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not parts:
            start = number
        continued = line.endswith("\\")
        line = line.rstrip("\\").strip()
        if line and not line.startswith("--hash"):
            parts.append(line.split(" --hash", 1)[0].strip())
        if not continued and parts:
            out.append((start, " ".join(parts)))
            parts = []
    if parts:
        out.append((start, " ".join(parts)))
    return out


def installed_version(name: str, *, path: list[str] | None = None) -> str | None:
    """The version of distribution ``name`` that imports would find on ``path`` (default ``sys.path``)."""
    for dist in metadata.distributions(name=name, path=path if path is not None else sys.path):
        return dist.version
    return None


def compare_with_lock(
    pins: tuple[LockedPackage, ...], *, lock_name: str = "lock", path: list[str] | None = None
) -> LockComparison:
    """Each pin against the installed version: equal versions match (``2.14.1+cpu`` is not ``2.14.1``)."""
    from packaging.version import InvalidVersion, Version

    matching, differences = [], []
    for pin in pins:
        found = installed_version(pin.name, path=path)
        try:
            same = found is not None and Version(found) == Version(pin.version)
        except InvalidVersion:
            same = found == pin.version
        if same:
            matching.append(pin)
        else:
            differences.append(InstalledDifference(pin, found))
    return LockComparison(lock_name, tuple(matching), tuple(differences))


def check_installed_against_lock(role: str = "site", *, path: list[str] | None = None) -> LockComparison | None:
    """This environment against the lock shipped for ``role``; None when the installation carries no lock."""
    lock = lock_file(role)
    if lock is None:
        return None
    return compare_with_lock(
        parse_lock(lock.read_text(encoding="utf-8")), lock_name=f"requirements/{lock.name}", path=path
    )


def describe_differences(comparison: LockComparison, *, limit: int = 6) -> str:
    """One line for people: the packages that differ, then those missing, at most ``limit`` of each named."""

    def listing(items: tuple[InstalledDifference, ...], show) -> str:
        shown = ", ".join(show(d) for d in items[:limit])
        return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")

    parts = []
    if comparison.different:
        parts.append(
            "installed at other versions: "
            + listing(comparison.different, lambda d: f"{d.locked.name} {d.installed} (locked {d.locked.version})")
        )
    if comparison.missing:
        parts.append("not installed: " + listing(comparison.missing, lambda d: f"{d.locked.name} {d.locked.version}"))
    return "; ".join(parts)
