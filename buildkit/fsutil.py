"""Writing the toolkit's own files: one way to replace a file so readers never see half of it."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def replace_text(target: Path, text: str) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one. An existing file keeps
    its mode; a new one gets the umask's."""
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, target)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
