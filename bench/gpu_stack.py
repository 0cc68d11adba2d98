"""GPU-stack measurements, from the images `make test-gpu-stack` built and their build logs:

- build time per image: the whole build, the DeepSpeed op compile, the torch downloads;
- image size by layer, for each family;
- what a CUDA `runtime` base would ship twice: the NVIDIA libraries torch's wheels install themselves;
- fleet sharing: unique layer bytes across the families / the sum of their image sizes, with the layer
  order of the templates (DeepSpeed, the only family-specific layer, last) and, from the same measured
  layer sizes, with the earlier order (DeepSpeed before the libraries, Java and DJL Serving).
Writes its section of bench/results.md.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results_md import write_section  # noqa: E402
from buildkit import engine, facts, interface, matrix, smoke  # noqa: E402
from buildkit.profiles import REGISTRY  # noqa: E402
from buildkit.spec import resolve  # noqa: E402

MATRIX = ROOT / "tests" / "matrix.gpu-local.yaml"
LOGS = ROOT / ".lmi" / "logs"
BUILD_OUTPUT = ROOT / ".lmi" / "gpu-stack-build.txt"  # what `lmi build` printed (make test-gpu-stack)
MARKER = "## GPU stack"
# What NVIDIA's `runtime` flavor adds to `base` (cuda-libraries: cuBLAS, cuFFT, cuRAND, cuSOLVER, cuSPARSE,
# NPP, nvJPEG, NCCL) that torch's wheels also bring, as their wheel folders under site-packages/nvidia.
RUNTIME_FLAVOR_LIBS = ("cublas", "cufft", "curand", "cusolver", "cusparse", "nccl", "npp", "nvjpeg")
GB = 1e9


def docker(*args: str) -> str:
    return subprocess.run([engine.detect_client().path, *args], capture_output=True, text=True, check=True).stdout


def step_times(log: str) -> dict[str, float]:
    """BuildKit step name -> seconds, from a --progress=plain log."""
    names, times = {}, {}
    for match in re.finditer(r"^#(\d+) \[([^\]]+)\] (.*)$", log, re.M):
        names.setdefault(match.group(1), f"[{match.group(2)}] {match.group(3)}")
    for match in re.finditer(r"^#(\d+) DONE ([\d.]+)s$", log, re.M):
        if match.group(1) in names:
            times[names[match.group(1)]] = float(match.group(2))
    return times


LAYER_STEPS = ("RUN", "COPY", "ADD", "WORKDIR", "/bin/sh -c")  # history rows that make a filesystem layer


def layers(ref: str) -> list[tuple[str, int, str]]:
    """(diff id, bytes, instruction) per filesystem layer, bottom first: the history rows that make a
    layer (an imported base has an empty instruction) map one to one onto RootFS.Layers."""
    info = json.loads(docker("image", "inspect", ref))[0]
    diff_ids = info["RootFS"]["Layers"]
    rows = [json.loads(line) for line in docker("history", "--no-trunc", "--human=false", "--format",
                                                "{{json .}}", ref).splitlines()]
    rows.reverse()  # bottom first
    made = [r for r in rows if not r["CreatedBy"] or r["CreatedBy"].startswith(LAYER_STEPS)]
    if len(made) != len(diff_ids):
        raise SystemExit(f"{ref}: {len(made)} layer-making history rows for {len(diff_ids)} layers")
    return [(diff, int(r["Size"]), r["CreatedBy"]) for diff, r in zip(diff_ids, made, strict=True)]


def wrong_op_claim(ref: str, spec) -> str:
    """The op check run in the image against a deliberately wrong claim: it must fail, naming the ops. The
    checkers are mounted read-only as `lmi test` mounts them (they are not in the image)."""
    claims = spec.claims()
    ops = claims["deepspeed_ops"]
    wrong = {"prebuilt": [op for op in ops["prebuilt"] if op != "transformer_inference"] + ["cutlass_ops"],
             "absent": {**ops["absent"], "transformer_inference": "claimed absent on purpose"}}
    record = [{"name": "deepspeed-prebuilt-ops", "tier": "cpu", "kind": "builtin"}]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp).chmod(0o755)
        for source, name in ((smoke.CHECKER, "lmi_check.py"), (spec.profile.CHECKER, spec.profile.CHECKER.name)):
            (Path(tmp) / name).write_bytes(source.read_bytes())
            (Path(tmp) / name).chmod(0o644)
        out = subprocess.run([engine.detect_client().path, "run", "--rm", "--network=none", "-v",
                              f"{tmp}:{interface.CHECK_DIR}:ro", ref, "python", interface.CHECK_MODULE, "--profile",
                              f"{interface.CHECK_DIR}/{spec.profile.CHECKER.name}", "--claims-json",
                              json.dumps({**claims, "deepspeed_ops": wrong}), "--checks-json", json.dumps(record)],
                             capture_output=True, text=True)
    event = json.loads(out.stdout.strip().splitlines()[-1])
    return f"exit {out.returncode}, passed={event['passed']}: {event['message']}"


# Runs in the image: DeepSpeed's own op_builder load() of each op the image claims prebuilt. load() imports a
# prebuilt op only when git_version_info lists it installed for the running accelerator (DS_ACCELERATOR=cuda:
# no GPU here), else it JIT-builds it, which fails without nvcc; the toolkit's libcuda stub stands in for the
# driver the op libraries link.
_LOAD = """
import json, sys
import deepspeed.ops.op_builder as builders
from deepspeed.git_version_info import installed_ops, accelerator_name
by_name = {"transformer_inference": "InferenceBuilder", "spatial_inference": "SpatialInferenceBuilder"}
for name in json.loads(sys.argv[1]):
    module = getattr(builders, by_name[name])().load(verbose=False)
    print(json.dumps({"op": name, "file": module.__file__, "installed": installed_ops.get(name),
                      "accelerator": accelerator_name}))
"""


def op_load(ref: str, spec, devel: str) -> list[dict]:
    """Load each prebuilt op with DeepSpeed's op_builder in the image (no GPU: the driver's stub from the
    toolkit image); every one must come from site-packages, not a JIT build."""
    docker = engine.detect_client().path
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp).chmod(0o755)
        subprocess.run([docker, "run", "--rm", "--network=none", "-v", f"{tmp}:/out", "--entrypoint", "bash", devel,
                        "-c", 'cp "$(find / -path "*stubs/libcuda.so" -print -quit 2>/dev/null)" /out/libcuda.so.1 '
                              '&& chmod 644 /out/libcuda.so.1'], capture_output=True, text=True, check=True)
        out = subprocess.run([docker, "run", "--rm", "--network=none", "-v", f"{tmp}:/stub:ro", "-e",
                              "LD_LIBRARY_PATH=/stub", "-e", "DS_ACCELERATOR=cuda", "--entrypoint", "python", ref,
                              "-c", _LOAD, json.dumps(list(spec.stack.ds_ops_built))],
                             capture_output=True, text=True)
    loaded = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or len(loaded) != len(spec.stack.ds_ops_built) or not all(
            "site-packages/deepspeed/ops/" in d["file"] and d["installed"] for d in loaded):
        raise SystemExit(f"{ref}: the prebuilt ops did not load from the image: {loaded} {out.stderr[-2000:]}")
    return loaded


def cubin_archs(ref: str, devel: str) -> dict[str, str]:
    """op library -> the SMs of the cubins in it, read with the toolkit's cuobjdump: the prebuild is for
    the family's SM only."""
    docker = engine.detect_client().path
    with tempfile.TemporaryDirectory() as tmp:
        box = subprocess.run([docker, "create", ref], capture_output=True, text=True, check=True).stdout.strip()
        try:
            site = "/opt/venv/lib/python3.11/site-packages/deepspeed"
            subprocess.run([docker, "cp", f"{box}:{site}", tmp], capture_output=True, check=True)
        finally:
            subprocess.run([docker, "rm", box], capture_output=True)
        script = ('for f in $(find /ds -name "*_op*.so" -o -name "*ops*.so" | sort); do '
                  'echo "$(basename $f | cut -d. -f1) $(cuobjdump --list-elf $f 2>/dev/null | '
                  'grep -o "sm_[0-9]*" | sort -u | tr "\\n" " ")"; done')
        out = subprocess.run([docker, "run", "--rm", "--network=none", "-v", f"{tmp}/deepspeed:/ds:ro", devel,
                              "bash", "-c", script], capture_output=True, text=True, check=True).stdout
    return {line.split(" ", 1)[0]: (line.split(" ", 1)[1].strip() if " " in line else "") or "host code only"
            for line in out.splitlines() if line.strip()}


def kind(instruction: str) -> str:
    for marker, name in (("/tmp/ops/deepspeed", "DeepSpeed ops (per SM)"),
                         ("wheels/deepspeed-", "DeepSpeed (Python package)"), ("/opt/lmi/lock/", "locks"),
                         ("deepspeed.lock", "DeepSpeed"),
                         ("deepspeed==", "DeepSpeed"), ("torch.lock", "torch + NVIDIA libraries"),
                         ("torch==", "torch + NVIDIA libraries"), ("requirements.lock", "libraries + mpi4py"),
                         ("requirements.txt", "libraries + mpi4py"),
                         ("djl-serving.deb", "Java + DJL Serving + MPI runtime"), ("python3", "OS + Python"),
                         ("lmi_deepspeed", "handler"), ("cuda-12.4", "base image")):
        if marker in instruction:
            return name
    return "base image" if not instruction else "config"


def main() -> None:
    f = facts.load(REGISTRY)
    specs = resolve(matrix.load(MATRIX, f), f)
    rows, layer_rows, per_image, wrong_claims, cubins, loads = [], [], {}, [], [], []
    for spec in specs:
        ref = f"{spec.repository}:{spec.tag}"
        log = (LOGS / f"{spec.id}.log").read_text()
        times = step_times(log)
        compile_s = next((t for name, t in times.items() if "pip wheel" in name and "[deepspeed-ops" in name), None)
        torch_s = sum(t for name, t in times.items() if "torch.lock" in name or "torch==" in name)
        total = re.search(rf"{re.escape(spec.id)}: built (\d+)s", BUILD_OUTPUT.read_text()
                          if BUILD_OUTPUT.exists() else "")
        ls = layers(ref)
        per_image[spec.id] = ls
        size = sum(b for _, b, _ in ls)
        nvidia = docker("run", "--rm", "--network=none", "--entrypoint", "bash", ref, "-c",
                        "du -sb /opt/venv/lib/python3*/site-packages/nvidia/* | sort -rn")
        libs = [(int(n), Path(p).name) for n, p in (line.split("\t") for line in nvidia.splitlines())]
        twice = {name: n for n, name in libs if name in RUNTIME_FLAVOR_LIBS}
        biggest = ", ".join(f"{name} {n / GB:.2f}" for n, name in libs[:6])
        wrong_claims.append((spec.id, wrong_op_claim(ref, spec)))
        devel = engine.mirrored(spec.stack.builder_image, "lmi-local")
        loads.append((spec.id, op_load(ref, spec, devel)))
        archs = cubin_archs(ref, devel)
        cubins.append((spec.id, ", ".join(f"{op}: {a}" for op, a in sorted(archs.items()))))
        rows.append((spec.id, spec.family.sm, total.group(1) + " s" if total else "see log",
                     f"{compile_s / 60:.1f} min" if compile_s else "cached", f"{torch_s:.0f} s", f"{size / GB:.2f} GB",
                     f"{sum(n for n, _ in libs) / GB:.2f} GB ({biggest})"))
        for diff, b, instruction in ls:
            layer_rows.append((spec.id, kind(instruction), f"{b / GB:.3f} GB", diff[7:19]))
    # Fleet sharing, measured: distinct layers (diff ids) across the families.
    sizes = {diff: b for ls in per_image.values() for diff, b, _ in ls}
    total = sum(b for ls in per_image.values() for _, b, _ in ls)
    unique = sum(sizes.values())
    # By construction: with one BuildKit cache, families share every layer below the first family-specific
    # one (the DeepSpeed wheel, compiled for the family's SM); same measured sizes.
    stacks = list(per_image.values())

    def prefix_unique(shared) -> int:
        first, common = stacks[0], 0
        for _, _, instruction in first:
            if not shared(kind(instruction)):
                break
            common += 1
        return sum(b for _, b, _ in first[:common]) + sum(b for ls in stacks for _, b, _ in ls[common:])

    unique_now = prefix_unique(lambda k: k != "DeepSpeed ops (per SM)")
    # The earlier order put DeepSpeed before the libraries, Java and DJL Serving: only base, OS and torch
    # could be shared.
    unique_before = prefix_unique(lambda k: k in ("base image", "OS + Python", "torch + NVIDIA libraries"))
    n = len(per_image)
    lines = [MARKER + " (tests/matrix.gpu-local.yaml)", "",
             f"Measured {datetime.now(timezone.utc):%Y-%m-%d} by `make test-gpu-stack` (bench/gpu_stack.py) on this "
             "machine (2 cores, no GPU), Docker 20.10 with BuildKit; CUDA 12.4 toolchain base made from Debian "
             "packages, torch 2.9.1 cu128 and its NVIDIA wheels from the package index, DeepSpeed 0.18.9 ops "
             "compiled for the family's SM only.", "",
             "| image | SM | whole build | DeepSpeed op compile | torch installs (both stages) | image size | "
             "torch's NVIDIA libraries in it |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    lines += ["", f"Fleet of {n} families: sum of image sizes {total / GB:.2f} GB. Unique layer bytes, "
                  f"DeepSpeed's ops last (this template), when the families are built from one cache: "
                  f"{unique_now / GB:.2f} GB = **{unique_now / total:.0%}** of the sum; with DeepSpeed before the "
                  f"libraries, Java and DJL Serving (the earlier order): {unique_before / GB:.2f} GB = "
                  f"{unique_before / total:.0%} (both from the measured layer sizes). Distinct layers found in the "
                  f"engine: {unique / GB:.2f} GB = {unique / total:.0%} (as low only where these images were built "
                  "from one cache).", "",
              "A deliberately wrong op claim (transformer_inference claimed absent, cutlass_ops claimed prebuilt), "
              "checked in each image:", ""]
    lines += [f"- {image}: {result}" for image, result in wrong_claims]
    lines += ["", "DeepSpeed's op_builder load() of each prebuilt op in the image (DS_ACCELERATOR=cuda, no GPU: the "
                  "toolkit's libcuda stub); each imported from the image's site-packages, no JIT build:", ""]
    lines += [f"- {image}: " + ", ".join(f"{d['op']} <- {d['file'].split('site-packages/')[-1]}" for d in loaded)
              for image, loaded in loads]
    lines += ["", f"Runtime base: torch's wheels install {', '.join(f'{k} {v / GB:.2f}' for k, v in twice.items())} "
                  f"GB = {sum(twice.values()) / GB:.2f} GB of the libraries NVIDIA's `runtime` flavor adds to "
                  "`base`; torch loads its own (RPATH into site-packages/nvidia), so a `runtime` base would store "
                  "them a second time, unused. The images use the `base` flavor (libcudart and, where needed, "
                  "cuda-compat)."]
    lines += ["", "The SMs of the cubins in each prebuilt op library (cuobjdump of the toolkit):", ""]
    lines += [f"- {image}: {archs}" for image, archs in cubins]
    lines += ["", "| image | layer | size | diff id |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in layer_rows]
    section = "\n".join(lines) + "\n"
    write_section(MARKER, section)
    print(section)


if __name__ == "__main__":
    main()
