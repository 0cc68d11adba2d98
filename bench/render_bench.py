"""Measure `lmi validate` + `lmi render` of the whole production matrix and a no-op `lmi build` of every GPU
family of one line, and write their section of bench/results.md.

Figures, each the median of several runs on this machine:
- in-process: load facts and matrix, validate, render every context to a new directory;
- the CLI end to end (`lmi validate` then `lmi render --out DIR`, interpreter start-up included), with
  Python's bytecode cache (the default, as an installed toolkit runs), and without one for buildkit/
  (PYTHONDONTWRITEBYTECODE=1 in a source checkout, as on the machine of the issue's figure: every module
  of buildkit/ is compiled again at each start);
- a no-op `lmi build` of every GPU family of the production matrix's newest DeepSpeed line: each image's
  content-hash tag is made to exist first (a tiny scratch image tagged under a repository prefix of the
  bench's own, removed at the end), so every image is skipped: the cost is start-up, planning, the
  staleness check of the rendered contexts and the engine queries (needs a Docker engine; skipped with the
  reason without one).

With `--baseline REV`, the CLI figures are also measured for the toolkit as it was at git revision REV
(its `buildkit/`, extracted to a temporary directory), runs interleaved with this tree's, so the two are
compared under the same load. Goals: validate + render under 1 s, the no-op build under 2 s.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results_md import write_section  # noqa: E402
from buildkit import facts, matrix, render  # noqa: E402
from buildkit.profiles import REGISTRY  # noqa: E402
from buildkit.spec import resolve  # noqa: E402

MARKER = "## CLI speed"
RUNS_IN_PROCESS = 20
RUNS_CLI = 10
RUNS_BUILD = 7
LINE = "djl0.36"  # the line whose GPU families the no-op build selects
# Runs `lmi` from the buildkit/ of the directory given first: the editable install's finder, which would
# import this checkout's buildkit whatever sys.path says, is taken out first (the same for every tree).
BOOT = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith('__editable')]; "
        "sys.path.insert(0, sys.argv.pop(1)); from buildkit.cli import main; sys.exit(main(sys.argv[1:]))")


def in_process(out: Path) -> tuple[float, int]:
    facts.load.cache_clear()  # cold: read and parse the data files every time
    start = time.perf_counter()
    f = facts.load(REGISTRY)
    m = matrix.load(ROOT / "matrix.yaml", f)
    specs = resolve(m, f)
    renderer = render.for_matrix(m)
    contexts = [renderer.render(s) for s in specs]
    render.write(contexts, out, prune=False)
    return time.perf_counter() - start, len(contexts)


def lmi(tree: Path, *args: str, bytecode: bool = True, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if not bytecode:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run([sys.executable, "-c", BOOT, str(tree), *args], cwd=ROOT, check=check,
                          capture_output=True, text=True, env=env)


def validate_render(tree: Path, out: Path, bytecode: bool) -> float:
    if not bytecode:  # as where PYTHONDONTWRITEBYTECODE=1 meets a source checkout: buildkit/ compiled each start
        for cached in (tree / "buildkit").rglob("__pycache__"):
            shutil.rmtree(cached)
    start = time.perf_counter()
    lmi(tree, "validate", bytecode=bytecode)
    lmi(tree, "render", "--out", str(out), bytecode=bytecode)
    return time.perf_counter() - start


def extract(rev: str, into: Path) -> Path:
    """buildkit/ as it was at git revision rev, under into/."""
    data = subprocess.run(["git", "archive", rev, "buildkit"], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def gpu_ids() -> list[str]:
    f = facts.load(REGISTRY)
    return [s.id for s in resolve(matrix.load(ROOT / "matrix.yaml", f), f) if s.line == LINE and s.family.is_gpu]


def noop_builds(trees: dict[str, Path]) -> tuple[dict[str, list[float]], int] | str:
    """Median inputs for a no-op build of the line's GPU families, per tree; or why it was not measured."""
    import docker.errors

    from buildkit import engine

    try:
        sdk = engine.sdk()
    except engine.EngineError as exc:
        return f"not measured: {exc}"
    ids = gpu_ids()
    prefix = f"lmi-bench-{uuid.uuid4().hex[:8]}"
    plan = json.loads(lmi(ROOT, "plan", "--json", *ids).stdout)
    marker = sdk.images.build(fileobj=io.BytesIO(b"FROM scratch\nLABEL io.lmi.bench=noop-build\n"), rm=True)[0]
    refs = [(f"{prefix}/{p['repository']}", p["hash_tag"]) for p in plan]
    runs: dict[str, list[float]] = {name: [] for name in trees}
    try:
        for repo, tag in refs:
            marker.tag(repo, tag)
        for tree in trees.values():  # a warm-up each (bytecode, the client probe's memo)
            lmi(tree, "build", "--registry", prefix, *ids)
        for _ in range(RUNS_BUILD):
            for name, tree in trees.items():
                start = time.perf_counter()
                done = lmi(tree, "build", "--plain", "--registry", prefix, *ids)
                runs[name].append(time.perf_counter() - start)
                if f"{len(ids)} skipped" not in done.stdout:
                    raise SystemExit(f"{name}: the no-op build did not skip every image:\n{done.stdout[-2000:]}")
    finally:
        for repo, tag in refs:
            sdk.images.remove(f"{repo}:{tag}", noprune=False)
        with contextlib.suppress(docker.errors.ImageNotFound):  # gone with its last tag, unless kept
            sdk.images.remove(marker.id, force=True)
    return runs, len(ids)


def row(label: str, values: list[float]) -> str:
    return (f"| {label} | {len(values)} | {statistics.median(values) * 1000:.0f} ms | {min(values) * 1000:.0f} ms | "
            f"{max(values) * 1000:.0f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="REV", help="also measure the CLI as it was at this git revision")
    parser.add_argument("--no-build", action="store_true", help="skip the no-op build (no engine needed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this tree": ROOT}
        if args.baseline:
            rev = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout.strip()
            trees[f"at {rev}"] = extract(rev, Path(tmp) / "baseline")
        runs = []
        for i in range(RUNS_IN_PROCESS):  # a fresh directory each run, so every file is written
            seconds, count = in_process(Path(tmp) / f"in-{i}")
            runs.append(seconds)
        cli: dict[tuple[str, bool], list[float]] = {}
        for bytecode in (True, False):
            for name, tree in trees.items():  # warm-up: writes the bytecode cache where it may
                validate_render(tree, Path(tmp) / f"warm-{name}-{bytecode}", bytecode)
            for i in range(RUNS_CLI):  # interleaved: the trees share whatever load the machine has
                for name, tree in trees.items():
                    cli.setdefault((name, bytecode), []).append(
                        validate_render(tree, Path(tmp) / f"cli-{name}-{bytecode}-{i}", bytecode))
        build = None if args.no_build else noop_builds(trees)
    lines = [
        MARKER + ": validate + render of the production matrix (goal: under 1 s), a no-op build of a line's "
        "families (goal: under 2 s)", "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} by `make bench` (bench/render_bench.py"
        f"{' --baseline ' + args.baseline if args.baseline else ''}) on {platform.machine()}, {os.cpu_count()} "
        f"cores, Python {platform.python_version()}; {count} images. Median (min-max) of the runs; the trees' "
        f"runs interleaved. 1-minute load average at the end: {os.getloadavg()[0]:.1f}.", "",
        "| what | runs | median | min | max |",
        "|---|---|---|---|---|",
        row("in-process (this tree): load + validate + render to a new dir", runs),
    ]
    for (name, bytecode), values in cli.items():
        how = "bytecode cached" if bytecode else "buildkit/ compiled at each start"
        lines.append(row(f"CLI, {name}: `lmi validate` then `lmi render --out DIR` ({how})", values))
    if isinstance(build, str):
        lines += ["", f"No-op build: {build}"]
    elif build is not None:
        values, n = build
        for name, times in values.items():
            lines.append(row(f"CLI, {name}: no-op `lmi build` of {LINE}'s {n} GPU families (all skipped)", times))
    lines += ["", "What keeps these short: the data files parsed by libyaml's safe loader (PyYAML's C parser; the "
              "pure-Python one where PyYAML lacks it); the docker SDK imported only by commands that talk to the "
              "engine or a registry's stored credentials, Jinja2 only by commands that render; the handler files read "
              "once per run; a no-op build asks the engine once for every image's content-hash tag. What remains is "
              "mostly the interpreter's start and imports, twice (two commands)."]
    section = "\n".join(lines) + "\n"
    write_section(MARKER, section)
    print(section)


if __name__ == "__main__":
    main()
