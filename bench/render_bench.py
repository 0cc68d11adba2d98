"""Measure `lmi validate` + `lmi render` of the whole production matrix and write bench/results.md.

Two figures, each the median of several runs on this machine: in-process (load facts and matrix,
validate, render every context to a temporary directory) and end to end (the two CLI commands as a
user runs them, interpreter start-up included). Goal from issue #2: under 1 s.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from buildkit import facts, matrix, render  # noqa: E402
from buildkit.spec import resolve  # noqa: E402

RUNS_IN_PROCESS = 20
RUNS_CLI = 10
LMI = Path(sys.executable).parent / "lmi"


def in_process(out: Path) -> tuple[float, int]:
    facts.load.cache_clear()  # cold: read and parse the data files every time
    start = time.perf_counter()
    f = facts.load()
    m = matrix.load(ROOT / "matrix.yaml", f)
    specs = resolve(m, f)
    renderer = render.Renderer(m.templates)
    contexts = [renderer.render(s) for s in specs]
    render.write(contexts, out, prune=False)
    return time.perf_counter() - start, len(contexts)


def cli(out: Path) -> float:
    start = time.perf_counter()
    for args in (["validate"], ["render", "--out", str(out)]):
        subprocess.run([str(LMI), *args], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for i in range(RUNS_IN_PROCESS):  # a fresh directory each run, so every file is written
            seconds, count = in_process(Path(tmp) / f"in-{i}")
            runs.append(seconds)
        cli_runs = [cli(Path(tmp) / f"cli-{i}") for i in range(RUNS_CLI)]
    rows = [
        ("in-process: load + validate + render to a new dir", runs),
        ("CLI: `lmi validate` then `lmi render --out DIR`", cli_runs),
    ]
    lines = [
        "# Benchmarks",
        "",
        "## Validate + render of the whole production matrix (issue #2; goal: under 1 s)",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} by `make bench` (bench/render_bench.py) on "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{count} images. Median (min-max) of the runs.",
        "",
        "| what | runs | median | min | max |",
        "|---|---|---|---|---|",
    ]
    for label, values in rows:
        lines.append(f"| {label} | {len(values)} | {statistics.median(values) * 1000:.0f} ms | "
                     f"{min(values) * 1000:.0f} ms | {max(values) * 1000:.0f} ms |")
    lines.append("")
    text = "\n".join(lines)
    results = ROOT / "bench" / "results.md"
    marker = "## Validate + render"
    if results.exists() and marker in (old := results.read_text()):
        # Keep other sections (written by other benchmarks); replace this one.
        before, _, rest = old.partition(marker)
        after = rest[rest.find("\n## "):] if "\n## " in rest else ""
        text = before + text[text.index(marker):].rstrip("\n") + "\n" + after
    results.write_text(text if text.endswith("\n") else text + "\n")
    print(text)


if __name__ == "__main__":
    main()
