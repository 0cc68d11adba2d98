"""What a fleet of GPU families costs beside one image (`make bench-fleet`), from the engine's layer store.

Reads the layers (diff ids and sizes) of the DeepSpeed images of tests/matrix.gpu-local.yaml that
`make test-gpu-stack` built (two families of different SM: g5, sm_86, and p3, sm_70), and reports:
- what the measured families store together (distinct layers) against one image;
- what a second family's pull downloads when the first is present (its layers the first lacks);
- every GPU family of the production line (matrix.yaml) computed from those measured layers: the shared
  stack once, plus each family's own layers, taken as large as the largest measured family's (families of
  one SM could share even those; not counted).
Before and after side by side: the "before" layers are the GPU stack layer table of bench/results.md at
BEFORE_REV (every op prebuilt, DeepSpeed installed from a per-family wheel), the "after" ones are measured
here now. Sizes are the engine's uncompressed layer sizes (a registry stores and sends them compressed).
Appends (replaces) its section of bench/results.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu_stack import layers  # noqa: E402
from bench.results_md import RESULTS, write_section  # noqa: E402
from buildkit import facts, matrix  # noqa: E402
from buildkit.profiles import REGISTRY  # noqa: E402
from buildkit.spec import resolve  # noqa: E402

MATRIX = ROOT / "tests" / "matrix.gpu-local.yaml"
PRODUCTION = ROOT / "matrix.yaml"
BEFORE_REV = "87c4fed"  # bench/results.md there: the GPU stack measured with every op prebuilt (2026-11-27)
MARKER = "## Fleet bytes"
GOAL = 1.15
GB = 1e9


def fleet(per_image: dict[str, list[tuple[str, int]]], families: int) -> dict[str, float]:
    """The fleet's numbers from {image: [(diff id, bytes), ...]} of measured families of one line."""
    images = list(per_image.values())
    sizes = {diff: b for ls in images for diff, b in ls}
    shared = set.intersection(*({diff for diff, _ in ls} for ls in images))
    one = sum(b for _, b in images[0])
    own = [sum(b for diff, b in ls if diff not in shared) for ls in images]
    first = {diff for diff, _ in images[0]}
    second_pull = sum(b for diff, b in images[1] if diff not in first)
    shared_bytes = sum(sizes[d] for d in shared)
    fleet_bytes = shared_bytes + sum(own) + max(own) * (families - len(images))
    return {"one": one, "shared": shared_bytes, "own_max": max(own), "own_min": min(own),
            "measured": sum(sizes.values()), "measured_n": len(images), "second_pull": second_pull,
            "fleet": fleet_bytes, "families": families, "ratio": fleet_bytes / one}


def gpu_stack_section(rev: str | None) -> str:
    """The GPU stack section of bench/results.md at `rev` (None: the working copy)."""
    text = (RESULTS.read_text() if rev is None else
            subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:bench/results.md"], capture_output=True,
                           text=True, check=True).stdout)
    section = text[text.index("## GPU stack"):]
    return section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section


def build_times(section: str) -> str:
    """'image: whole build, op compile' from a GPU stack section's first table."""
    rows = re.findall(r"^\| (ds\S+) \| [\d.]+ \| ([^|]+) \| ([^|]+) \|", section, re.M)
    return "; ".join(f"{image} {whole.strip()} (op compile {ops.strip()})" for image, whole, ops in rows)


def before_layers(rev: str = BEFORE_REV) -> dict[str, list[tuple[str, int]]]:
    """The layer table of the GPU stack section of bench/results.md at `rev` (sizes to the MB there)."""
    section = gpu_stack_section(rev)
    per_image: dict[str, list[tuple[str, int]]] = {}
    for image, _, size, diff in re.findall(r"^\| (\S+) \| ([^|]+) \| ([\d.]+) GB \| ([0-9a-f]{12}) \|$", section, re.M):
        per_image.setdefault(image, []).append((diff, round(float(size) * GB)))
    return per_image


def production_gpu_families(f) -> tuple[str, int, list[str]]:
    """The production DeepSpeed line with the most GPU families: (line, count, their SMs)."""
    specs = [s for s in resolve(matrix.load(PRODUCTION, f), f) if s.stack.name == "deepspeed" and s.family.is_gpu]
    lines: dict[str, list[str]] = {}
    for s in specs:
        lines.setdefault(s.line, []).append(s.family.sm)
    line = max(lines, key=lambda k: len(lines[k]))
    return line, len(lines[line]), lines[line]


def row(label: str, n: dict[str, float]) -> str:
    return (f"| {label} | {n['one'] / GB:.3f} GB | {n['shared'] / GB:.3f} GB | {n['own_min'] / GB:.3f}-"
            f"{n['own_max'] / GB:.3f} GB | {n['measured'] / GB:.3f} GB ({n['measured'] / n['one']:.3f} x) | "
            f"{n['second_pull'] / GB:.3f} GB | {n['fleet'] / GB:.2f} GB | **{n['ratio']:.3f} x** |")


def main() -> None:
    f = facts.load(REGISTRY)
    specs = [s for s in resolve(matrix.load(MATRIX, f), f) if s.stack.name == "deepspeed" and s.family.is_gpu]
    after_layers = {s.id: [(diff, b) for diff, b, _ in layers(f"{s.repository}:{s.tag}")] for s in specs}
    line, families, sms = production_gpu_families(f)
    before, after = fleet(before_layers(), families), fleet(after_layers, families)
    per_family_goal = (GOAL - 1) * after["shared"] / (families - GOAL)
    lines = [MARKER + " (GPU families of one line, tests/matrix.gpu-local.yaml)", "",
             f"Measured {datetime.now(timezone.utc):%Y-%m-%d} by `make bench-fleet` (bench/fleet_bench.py) from the "
             f"engine's layers of {', '.join(after_layers)} as `make test-gpu-stack` built them (one BuildKit "
             f"cache, this 2-core machine); before: the layer table of bench/results.md at {BEFORE_REV} (every "
             "DeepSpeed op prebuilt, same machine and matrix). Uncompressed layer sizes. The production line "
             f"{line} has {families} GPU families (SMs {', '.join(sorted(set(sms)))}): beyond the "
             f"{after['measured_n']} measured, each is counted with its own layers as large as the largest "
             "measured family's (computed, not built; families of one SM could share even those).", "",
             "| | one image | shared by the families | own layers per family | measured families store | "
             f"a second family's pull | {families} families store | {families} families / one image |",
             "|---|---|---|---|---|---|---|---|",
             row("before: every op, DeepSpeed per family", before),
             row("after: serving ops in one late layer", after), "",
             f"Goal {GOAL} x: with {after['shared'] / GB:.3f} GB shared, {families} families stay within it while "
             f"a family's own layers are <= (({GOAL} - 1) x shared) / ({families} - {GOAL}) = "
             f"{per_family_goal / 1e6:.0f} MB; measured {after['own_max'] / 1e6:.0f} MB "
             f"({'met' if after['ratio'] <= GOAL else 'NOT met'}). A second family's pull: "
             f"{before['second_pull'] / 1e6:.0f} MB before, {after['second_pull'] / 1e6:.0f} MB after.", "",
             f"Build times (the GPU stack sections' tables): before {build_times(gpu_stack_section(BEFORE_REV))}; "
             f"after {build_times(gpu_stack_section(None))}."]
    section = "\n".join(lines) + "\n"
    write_section(MARKER, section)
    print(section)


if __name__ == "__main__":
    main()
