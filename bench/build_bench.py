"""Build-engine benchmark on the local test matrix, everything measured side by side in one run.

- cold build (BuildKit cache pruned first, so every layer is made and every package downloaded);
- no-op re-run of `lmi build` (nothing changed) vs a naive loop of plain `docker build` over the same
  contexts with a warm cache (goal: the no-op re-run costs <= 5 % of the naive loop);
- a DJL-only bump: which steps ran again (goal: only the DJL step and what follows it);
- two images with -j 1 and with -j 2 (each time their DJL step is forced to run again);
- image size.
Writes its section of bench/results.md.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results_md import write_section  # noqa: E402
from buildkit import engine, lock  # noqa: E402
from tests.local import prepare  # noqa: E402

LMI = Path(sys.executable).parent / "lmi"
WHEELHOUSE = Path("/opt/wheels")
LOG = ROOT / ".lmi" / "logs"
MARKER = "## Build engine"


def matrix(tmp: Path, repo: str, lines: int = 1, djl: str = "0.32.0", nonce: bool = False) -> Path:
    text = prepare.LOCAL_MATRIX.read_text()
    text = text.replace("repository: lmi-local", f"repository: {repo}")
    text = text.replace("templates: ../templates", f"templates: {ROOT / 'templates'}")
    text = text.replace("output: .lmi/images-local", f"output: {tmp / 'images'}")
    text = text.replace('djl: "0.32.0"', f'djl: "{djl}"').replace("djl-serving_0.32.0", f"djl-serving_{djl}")
    if nonce:
        text = text.replace('_all.deb"', f'_all.deb?run={uuid.uuid4().hex}"')
    body = text.split("lines:\n")[1]
    for i in range(1, lines):
        text += body.replace("  local:", f"  local{i}:").replace(
            'accelerate: "1.11.0"', f'accelerate: "1.{10 - i}.0"\n    tag_suffix: a{i}')
    path = tmp / f"{repo}-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(text)
    # Its locks: the local line's as committed; the extra lines' resolved here (they differ in accelerate).
    shutil.copyfile(lock.lock_path(prepare.LOCAL_MATRIX), lock.lock_path(path))
    if lines > 1:
        subprocess.run([str(LMI), "--matrix", str(path), "lock", "--wheelhouse", str(WHEELHOUSE)], check=True,
                       capture_output=True)
    return path


def lmi_build(path: Path, *args: str) -> float:
    start = time.perf_counter()
    result = subprocess.run([str(LMI), "--matrix", str(path), "build", "--plain", "--wheelhouse", str(WHEELHOUSE),
                             *args], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"build failed:\n{result.stdout}\n{result.stderr}")
    return time.perf_counter() - start


def naive_loop(image_ids: list[str]) -> float:
    """What a plain script does: `docker build` every context, every time, relying on the layer cache.
    It replays the exact command `lmi build` ran (first line of each log), tagging instead of --iidfile."""
    commands = []
    for image_id in image_ids:
        cmd = shlex.split((LOG / f"{image_id}.log").read_text().splitlines()[0].removeprefix("$ "))
        i = cmd.index("--iidfile")
        commands.append([*cmd[:i], "-q", "-t", f"lmi-naive:{image_id}", *cmd[i + 2:]])
    start = time.perf_counter()
    for cmd in commands:
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "DOCKER_BUILDKIT": "1"})
    return time.perf_counter() - start


def steps(log: Path) -> tuple[int, int]:
    text = log.read_text()
    run = set(re.findall(r"^#(\d+) \[runtime\s+\d+/\d+\] RUN", text, re.M))
    cached = set(re.findall(r"^#(\d+) CACHED$", text, re.M))
    return len(run & cached), len(run - cached)


def main() -> None:
    engine.ensure_engine()
    docker = engine.detect_client().path
    prepare.prepare(prepare.LOCAL_MATRIX)
    prepare.standin_deb("0.31.0")
    server = prepare.PackageServer(prepare.PACKAGES, 38771, 3600).__enter__() if prepare.port_free(38771) else None
    repo = f"lmi-bench-{uuid.uuid4().hex[:6]}"
    rows: list[tuple[str, str]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            one = matrix(tmp, repo)
            subprocess.run([docker, "builder", "prune", "-af"], check=True, capture_output=True)
            cold = lmi_build(one)
            rows.append(("cold build, 1 image (cache pruned; downloads included)", f"{cold:.1f} s"))
            four = matrix(tmp, repo, lines=4)
            lmi_build(four, "-j", "2")
            ids = ["local-cpu", "local1-cpu", "local2-cpu", "local3-cpu"]
            for label, path, image_ids in (("1 image", one, ids[:1]), ("4 images", four, ids)):
                lmi_build(path)  # leaves each image's log holding the command that built it
                for image_id in image_ids:
                    assert (LOG / f"{image_id}.log").read_text().startswith("$ "), image_id
                noop = min(lmi_build(path) for _ in range(3))
                naive = min(naive_loop(image_ids) for _ in range(3))
                rows.append((f"{label}: no-op re-run of `lmi build` (best of 3)", f"{noop:.2f} s"))
                rows.append((f"{label}: naive loop of plain `docker build`, warm cache (best of 3)", f"{naive:.2f} s"))
                rows.append((f"{label}: no-op / naive (goal <= 5 %)", f"{100 * noop / naive:.0f} %"))
            bump = lmi_build(matrix(tmp, repo, djl="0.31.0", nonce=True))
            cached, ran = steps(LOG / "local-cpu.log")
            rows.append(("DJL-only bump, 1 image", f"{bump:.1f} s: {cached} RUN steps cached, {ran} ran "
                                                    "(the DJL step and the user step after it)"))
            two = [matrix(tmp, repo + "-two", lines=2, nonce=True) for _ in range(3)]
            lmi_build(two[0], "-j", "2")  # make both images once, so the comparison starts warm
            j1 = lmi_build(two[1], "-j", "1")
            j2 = lmi_build(two[2], "-j", "2")
            rows.append(("2 images, DJL step re-run in each: -j 1", f"{j1:.1f} s"))
            rows.append(("2 images, DJL step re-run in each: -j 2", f"{j2:.1f} s ({j1 / j2:.2f}x)"))
            size = json.loads(subprocess.run([docker, "image", "inspect", f"{repo}:djl0.32-cpu"],
                                             capture_output=True, text=True, check=True).stdout)[0]["Size"]
            rows.append(("image size, local-cpu (debian12, torch 2.13 CPU, DeepSpeed, Java, libraries)",
                         f"{size / 1e9:.2f} GB"))
    finally:
        if server:
            server.__exit__()
        images = subprocess.run([docker, "images", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True,
                                text=True).stdout.split()
        doomed = [i for i in images if i.startswith((repo, "lmi-naive:"))]
        if doomed:
            subprocess.run([docker, "rmi", "-f", *doomed], capture_output=True)

    lines = [MARKER + " (local test matrix)", "",
             f"Measured {datetime.now(timezone.utc):%Y-%m-%d} by `make bench` (bench/build_bench.py), in one run "
             "on this machine (2 cores), Docker 20.10 with BuildKit.", "",
             "| what | result |", "|---|---|"]
    lines += [f"| {what} | {value} |" for what, value in rows]
    section = "\n".join(lines) + "\n"
    write_section(MARKER, section)
    print(section)


if __name__ == "__main__":
    main()
