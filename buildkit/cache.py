"""A small on-disk memo for facts that are expensive to find and keyed by the identity of what they
describe (a binary, a folder of wheels): path, size and modification time, as make does."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmi"


def signature(paths: Iterable[Path]) -> list:
    out = []
    for path in paths:
        st = path.stat()
        out.append([str(path), st.st_size, st.st_mtime_ns])
    return out


def memo(name: str, key: str, sig: list, compute: Callable[[], object],
         keep: Callable[[object], bool] = lambda value: True) -> object:
    """compute() once per (key, signature); a changed file changes the signature and recomputes.
    Values that `keep` rejects (e.g. a failure that may be passing) are returned but not remembered."""
    path = CACHE_DIR / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    entry = data.get(key)
    if entry and entry.get("sig") == sig:
        return entry["value"]
    value = compute()
    if not keep(value):
        return value
    data[key] = {"sig": sig, "value": value}
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except OSError:
        pass  # a cache that cannot be written only costs time
    return value
