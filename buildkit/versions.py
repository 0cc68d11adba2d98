"""Version strings: parsing, ordering, ranges and "did you mean" suggestions."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")

_NUMERIC = re.compile(r"^\d+(\.\d+)*$")


def is_numeric(version: str) -> bool:
    return bool(_NUMERIC.fullmatch(version))


def key(version: str) -> tuple[int, ...]:
    """Sort key for dotted numeric versions ("12.10" > "12.9"); non-numeric parts sort as 0."""
    return tuple(int(part) if part.isdigit() else 0 for part in re.split(r"[.+-]", version))


def at_least(have: str, need: str) -> bool:
    """have >= need, comparing dotted numbers with missing parts as 0 ("535" < "535.104.05")."""
    a, b = key(have), key(need)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) >= b + (0,) * (width - len(b))


def as_of(table: Mapping[str, T], version: str) -> T | None:
    """The entry of `table` (first release -> value) that applies to `version`: the newest key <= version."""
    found = None
    for since, value in sorted(table.items(), key=lambda kv: key(kv[0])):
        if at_least(version, since):
            found = value
    return found


def in_range(version: str, bounds: Iterable[str]) -> bool:
    """version lies within [low, high], comparing only as many parts as the bound has (3.12 <= 3.12)."""
    low, high = bounds
    v = key(version)
    return v[: len(key(low))] >= key(low) and v[: len(key(high))] <= key(high)


def minor(version: str) -> str:
    """'2.1.2' -> '2.1'."""
    return ".".join(version.split(".")[:2])


def nearest(value: str, known: Iterable[str], count: int = 3) -> list[str]:
    """The known versions closest to `value`: numerically when both are numbers, else by spelling."""
    known = list(dict.fromkeys(known))
    if not known:
        return []
    if is_numeric(value) and all(is_numeric(k) for k in known):
        target = _magnitude(value)

        def distance(candidate: str) -> tuple:
            # "3.1" is most likely "3.10" read as a float: a longer minor that extends it comes first.
            extends = candidate.count(".") == value.count(".") == 1 and candidate.startswith(value) \
                and candidate != value
            return (not extends, abs(_magnitude(candidate) - target), candidate)

        return sorted(known, key=distance)[:count]
    close = difflib.get_close_matches(value, known, n=count, cutoff=0.4)
    return close or sorted(known)[:count]


def _magnitude(version: str) -> int:
    parts = (key(version) + (0, 0, 0))[:3]
    return parts[0] * 1_000_000 + parts[1] * 1_000 + parts[2]


def did_you_mean(value: str, known: Iterable[str]) -> str:
    options = nearest(value, known)
    return "did you mean " + " or ".join(f"'{o}'" for o in options) if options else "no known values"
