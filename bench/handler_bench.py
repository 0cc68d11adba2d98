"""The DeepSpeed handler on CPU, side by side in one run:

- model load time and generation throughput of the tiny model with tp=1 (one process) and tp=2 (two
  ranks under mpirun, gloo + DeepSpeed's shm all-reduce), i.e. what partitioning costs on one machine;
- what the handler's runtime adds to an image: Open MPI (openmpi-bin), mpi4py, and on CPU images g++ and
  the Python headers (DeepSpeed JIT-compiles its CPU ops), measured as the size difference of small
  images built FROM the local debian:12 base.
Writes its section of bench/results.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
IMAGE_CODE = ROOT / "buildkit" / "resources" / "image"  # the in-image modules, imported flat as the image does
sys.path[1:1] = [str(IMAGE_CODE), str(ROOT / "buildkit" / "resources" / "check")]

import lmi_check  # noqa: E402

from bench.results_md import write_section  # noqa: E402
from buildkit import engine  # noqa: E402
from tests.local import prepare  # noqa: E402

MARKER = "## DeepSpeed handler"
PROMPTS = ["hello world", "the cat sat on the mat", "deepspeed partitions", "a tiny model"]
NEW_TOKENS = 48
ROUNDS = 3
CA = "/etc/ssl/certs/ca-certificates.crt"  # a BuildKit secret, as in every build

RANK = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {buildkit!r})
    t0 = time.monotonic()
    import lmi_deepspeed
    service = lmi_deepspeed.start({{"model_id": {model!r}, "tensor_parallel_degree": "{tp}",
                                   "max_new_tokens": "256"}})
    load = time.monotonic() - t0
    body = {{"inputs": {prompts!r}, "parameters": {{"max_new_tokens": {tokens}}}}}
    service.answer([body])  # warm-up
    times = []
    for _ in range({rounds}):
        t = time.monotonic()
        service.answer([body])
        times.append(time.monotonic() - t)
    if os.environ.get("RANK", "0") == "0":
        print("RESULT " + json.dumps({{"load": load, "times": times}}), flush=True)
""")


def run_tp(model: str, tp: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(RANK.format(buildkit=str(IMAGE_CODE), model=model, tp=tp, prompts=PROMPTS, tokens=NEW_TOKENS,
                             rounds=ROUNDS))
    cmd = [sys.executable, fh.name]
    if tp > 1:
        cmd = ["mpirun", "-np", str(tp), "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.unlink(fh.name)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode or not line:
        raise SystemExit(f"tp={tp} failed: {out.stdout[-1500:]}{out.stderr[-1500:]}")
    return json.loads(line[7:])


def image_size(ref: str) -> int:
    docker = engine.detect_client().path
    return int(subprocess.run([docker, "image", "inspect", "-f", "{{.Size}}", ref], capture_output=True, text=True,
                              check=True).stdout)


def added_by(packages: str, pip: str = "") -> int:
    """Bytes an apt install (and a pip install in a venv) adds on top of the same base and Java."""
    docker = engine.detect_client().path
    base = engine.mirrored("debian:12", "lmi-local")
    prepare.ensure_base("debian:12", "lmi-local")
    sizes = []
    for extra, extra_pip in (("", ""), (packages, pip)):
        with tempfile.TemporaryDirectory() as ctx:
            Path(ctx, "Dockerfile").write_text(
                f"FROM {base}\nRUN --mount=type=secret,id=ca,required=false apt-get update && apt-get install -y "
                f"--no-install-recommends python3-venv openjdk-17-jre-headless {extra} && rm -rf /var/lib/apt/lists/* "
                "&& python3 -m venv /opt/venv"
                + (f" && PIP_CERT=/run/secrets/ca /opt/venv/bin/pip install --no-cache-dir {extra_pip}" if extra_pip
                   else "") + "\n")
            tag = f"lmi-bench-size:{abs(hash(extra + extra_pip))}"
            subprocess.run([docker, "build", "--network=host", "--secret", f"id=ca,src={CA}", "-q", "-t", tag, ctx],
                           check=True, capture_output=True, env={**os.environ, "DOCKER_BUILDKIT": "1"})
            sizes.append(image_size(tag))
            subprocess.run([docker, "rmi", "-f", tag], capture_output=True)
    return sizes[1] - sizes[0]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = lmi_check.make_tiny_model(str(Path(tmp) / "model"))
        results = {tp: run_tp(model, tp) for tp in (1, 2)}
    tokens = NEW_TOKENS * len(PROMPTS)
    rows = []
    for tp, r in results.items():
        best = min(r["times"])
        rows.append((f"tp={tp}" + (" (2 ranks, mpirun, gloo + shm all-reduce)" if tp > 1 else " (1 process)"),
                     f"{r['load']:.1f} s", f"{statistics.median(r['times']):.2f} s", f"{tokens / best:.0f}"))
    ratio = min(results[1]["times"]) / min(results[2]["times"])
    mpi = added_by("openmpi-bin", "mpi4py==4.1.2")
    jit = added_by("python3-dev g++")
    lines = [MARKER + " (CPU)", "",
             f"Measured {datetime.now(timezone.utc):%Y-%m-%d} by `python bench/handler_bench.py` on this machine "
             f"(2 cores), DeepSpeed 0.18.9, torch 2.13 CPU; the tiny Llama of the tests (2 layers, hidden 64, "
             f"8 heads), {len(PROMPTS)} prompts x {NEW_TOKENS} new tokens, greedy, best of {ROUNDS} after a warm-up; "
             f"1-minute load average at the end: {os.getloadavg()[0]:.1f} on 2 cores.",
             "", "| ranks | model load (import, init, partition) | batch time (median) | tokens/s (best) |",
             "|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    lines += ["", f"tp=2 / tp=1 throughput: {ratio:.2f}x. On a model this small the two all-reduces per layer "
                  "and token cost more than the halved matmuls save: tensor parallelism pays on models that do not "
                  "fit one device, which is what it is for; this measures its overhead, not a speed-up.", "",
              "| what the handler adds to an image | bytes |", "|---|---|",
              f"| Open MPI (openmpi-bin and its libraries) + mpi4py 4.1.2 | {mpi / 1e6:.0f} MB |",
              f"| CPU images only: g++ and the Python headers (DeepSpeed JIT-compiles its CPU ops) | "
              f"{jit / 1e6:.0f} MB |",
              f"| lmi_deepspeed.py | {(IMAGE_CODE / 'lmi_deepspeed.py').stat().st_size / 1e3:.0f} kB |"]
    section = "\n".join(lines) + "\n"
    write_section(MARKER, section)
    print(section)


if __name__ == "__main__":
    main()
