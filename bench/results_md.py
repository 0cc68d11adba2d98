"""One place that writes a benchmark's section of bench/results.md, replacing its previous one."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.md"


def write_section(marker: str, section: str) -> None:
    """Replace the section that starts with `marker` (a `## ` heading), or append it."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    if marker in old:
        before, _, rest = old.partition(marker)
        after = rest[rest.find("\n## "):] if "\n## " in rest else ""
        old = before.rstrip("\n") + "\n" + after
    RESULTS.write_text(old.rstrip("\n") + "\n\n" + section)
