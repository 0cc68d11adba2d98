"""`make facts-upstream`: the wheel-facts reader on real releases, and a release from the index to a locked line.

1. Cross-check: NVIDIA's cuobjdump (from the index's nvidia-cuda-cuobjdump wheel, fetched by sha256) against
   buildkit/wheelfacts.py's reading of the `.nv_fatbin` headers, on every library of the vLLM 0.33.0 wheel
   that has device code: the same (kind, SM) entries with the same counts.
2. Re-derivation: `lmi facts verify --wheels`' check of every derived record in buildkit/data against the
   record re-read from its wheel (cached by sha256 in .lmi/upstream/), and of the hand-read entries against them.
3. Release to line: in a scratch copy (.lmi/upstream-bench/: the data, the matrix with its lock, cold wheel
   caches), `lmi facts upstream --add-line`'s work for the vLLM releases newer than the data's (the index's
   newest), then `lmi lock` of the new line (which re-renders its contexts) and `lmi validate`; and an earlier
   release nobody has read (vLLM 0.32.0 and the torch 2.13.0 it pins, taken out of the scratch data first):
   `lmi facts add` of both, its line, `lmi lock`, `lmi validate`. Each step timed, wall clock.

4. `--newest-torch` (only this step; its own subsection, appended at the end of the section): the index's newest
   torch, taken out of the scratch data (its derived record and its release entry), `lmi facts add torch`, a
   DeepSpeed line on it (a copy of the last DeepSpeed line with that torch and the CUDA of its PyPI wheel: no vLLM
   pins it), the rules' refusals as its excludes, `lmi lock`, `lmi validate`, and each family's verdict beside
   its SM and the wheel's derived arch list and cubins.

Writes its section of bench/results.md. Needs the package index (PyPI or LMI_PIP_INDEX_URL) and ~2 GB of disk.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from bench.results_md import write_section  # noqa: E402
from buildkit import cli, facts, matrix, rules, upstream, verify, versions, wheelfacts  # noqa: E402
from buildkit.profiles import REGISTRY  # noqa: E402

SCRATCH = ROOT / ".lmi" / "upstream-bench"
MARKER = "## Upstream releases to locked lines"
READING = """Reading (of the 2026-12-07 runs): the reader and cuobjdump list the same images in every library; every
derived record (vLLM 0.32.0 and 0.33.0, torch 2.13.0, 2.14.0 and 2.15.0) re-reads to itself and agrees with
the hand-read entries it backs, after one correction the re-derivation found: torch 2.13's PyPI wheel is the
cu130 build, without PTX (the data said pypi_variant null and "12.0+PTX", from RELEASE.md). The index's newest
vLLM, 0.34.0, is read and gets its line, but cannot be locked from PyPI: it pins flashinfer-python==0.7.3, which
PyPI does not have (recorded as not locked, with uv's reason). The newest torch, 2.15.0, is in the data (its
PyPI wheel is cu132, Python 3.11-3.15); no vLLM pins it, and a line with it needs CUDA 13.2, which
buildkit/data/cuda.yaml does not have (`lmi check` on a DeepSpeed line: "torch 2.15.0 has no cu130 wheel
(published: cu132)", then "unknown cuda '13.2'"). Wall times were measured while other sessions' jobs shared the
2 cores."""


def cuobjdump() -> Path:
    files = upstream.listing("nvidia-cuda-cuobjdump")
    newest = max(upstream.released(files))
    wheel = upstream.fetch(upstream.pick_wheel(files, "nvidia-cuda-cuobjdump", str(newest)))
    target = SCRATCH / "cuobjdump" / wheel.name
    if not target.exists():
        with zipfile.ZipFile(wheel) as zf:
            member = next(m for m in zf.namelist() if m.endswith("/bin/cuobjdump"))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(member))
        target.chmod(target.stat().st_mode | stat.S_IXUSR)
    return target


def cross_check(tool: Path, version: str = "0.33.0") -> list[str]:
    wheel = upstream.fetch(upstream.pick_wheel(upstream.listing("vllm"), "vllm", version))
    rows = []
    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory() as tmp:
        for member in sorted(m for m in zf.namelist() if m.endswith(".so")):
            path = Path(tmp) / Path(member).name
            path.write_bytes(zf.read(member))
            lib = wheelfacts.read_library(path, member)
            mine = Counter({("cubin", k): n for k, n in lib.cubins.items()}) + \
                Counter({("ptx", k): n for k, n in lib.ptx.items()})
            out = subprocess.run([str(tool), "--list-elf", "--list-ptx", str(path)], capture_output=True, text=True,
                                 timeout=600, check=False)
            theirs = wheelfacts.cuobjdump_counts(out.stdout)
            path.unlink()
            if not mine and not theirs:
                continue
            same = "same" if mine == theirs else f"DIFFERENT (cuobjdump {dict(theirs)})"
            rows.append(f"| {member} | {sum(mine.values())} | {lib.summary()} | {same} |")
    return rows


def timed(what: str, steps: list, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    steps.append((what, time.perf_counter() - start))
    return result


def lmi(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main(list(argv))
    return code, out.getvalue().replace(str(ROOT) + "/", "")  # no paths of this machine in bench/results.md


def scratch() -> tuple[Path, Path]:
    shutil.rmtree(SCRATCH / "work", ignore_errors=True)
    work = SCRATCH / "work"
    shutil.copytree(facts.DATA_DIR, work / "data")
    text = (ROOT / "matrix.yaml").read_text()
    text = text.replace("\nrepository: lmi-inference\n",
                        "\nrepository: lmi-inference\ntemplates: ../../../templates\noutput: images\n", 1)
    (work / "matrix.yaml").write_text(text)
    shutil.copy(ROOT / "matrix.lock", work / "matrix.lock")
    facts.DATA_DIR = work / "data"  # every reader of the facts in this process reads the scratch copy
    facts.load.cache_clear()
    return work, work / "matrix.yaml"


def release_to_line(work: Path, matrix_path: Path) -> tuple[list, list[str], list[str]]:
    steps: list = []
    cache = work / "cache"  # cold: the wheels come from the index
    report = timed("find new releases, fetch and read their wheels, write facts and the line", steps,
                   upstream.run, profiles=REGISTRY, data_dir=work / "data", matrix_path=matrix_path, cache=cache)
    lines = re.findall(r"matrix: line (\S+) added", "\n".join(report))
    outputs = []
    for line in lines:
        code, out = timed(f"lmi lock {line}-* (uv, then render)", steps, lmi, "--matrix", str(matrix_path), "lock",
                          f"{line}-*")
        outputs.append(f"lock {line}: exit {code}: " + " ".join(out.split())[-600:])
    code, out = timed("lmi validate", steps, lmi, "--matrix", str(matrix_path), "validate")
    outputs.append(f"validate: exit {code}: " + " ".join(out.split())[-300:])
    return steps, report, outputs


def forget(work: Path, vllm_version: str, torch_version: str) -> None:
    """Take an earlier release (and the torch it pins) out of the scratch data, as if nobody had read it."""
    for component, version in (("vllm", vllm_version), ("torch", torch_version)):
        path = upstream.data_path(component, work / "data")
        text = path.read_text()
        records = upstream.derived_records(text)
        records.pop(version, None)
        if component == "vllm":  # the release entry `lmi facts add` wrote: its comment, its key, its body
            lines = text.splitlines(keepends=True)
            start = next(i for i, row in enumerate(lines) if re.match(rf"  # vllm {re.escape(version)}: written", row,
                                                                        re.IGNORECASE))
            end = start + 2
            while end < len(lines) and lines[end].startswith("    "):
                end += 1
            text = "".join(lines[:start] + lines[end:])
        path.write_text(upstream.with_derived(text, records))
    facts.load.cache_clear()


def earlier_line(work: Path, matrix_path: Path, version: str = "0.32.0", torch: str = "2.13.0") -> tuple:
    """An earlier vLLM release nobody has read, to a locked line: its torch's facts, its own, the line, the lock."""
    forget(work, version, torch)
    steps: list = []
    cache = work / "cache-earlier"  # cold
    said = [upstream.said(timed(f"lmi facts add torch {torch} (fetch + read)", steps, upstream.add, "torch", torch,
                                 profiles=REGISTRY, cache=cache, data_dir=work / "data")),
            upstream.said(timed(f"lmi facts add vllm {version} (fetch + read)", steps, upstream.add, "vllm",
                                 version, profiles=REGISTRY, cache=cache, data_dir=work / "data"))]
    release = yaml.safe_load(upstream.data_path("vllm", work / "data").read_text())["releases"][version]
    start = time.perf_counter()
    text, line = upstream.matrix_line(matrix_path.read_text(), "vllm", version, release, REGISTRY)
    matrix_path.write_text(text)
    refused = upstream.refused_families(matrix_path, line, REGISTRY)
    matrix_path.write_text(upstream.with_excludes(text, line, refused))
    steps.append(("the matrix line, the rules' refusals as its excludes", time.perf_counter() - start))
    outputs = []
    code, out = timed(f"lmi lock {line}-* (uv, then render)", steps, lmi, "--matrix", str(matrix_path), "lock",
                      f"{line}-*")
    outputs.append(f"lock {line}: exit {code}: " + " ".join(out.split())[-600:])
    code, out = timed("lmi validate", steps, lmi, "--matrix", str(matrix_path), "validate")
    outputs.append(f"validate: exit {code}: " + " ".join(out.split())[-300:])
    return steps, said + outputs, refused


def verdicts(matrix_path: Path, line: str) -> list[str]:
    f = facts.load(REGISTRY)
    rows = []
    for image in matrix.load(matrix_path, f).images:
        if image.line == line:
            v = rules.evaluate(image.combo, f)
            rows.append(f"{image.family}: ok" + (f" ({'; '.join(v.notes[:1])})" if v.notes else ""))
    return rows


NEWEST_MARKER = "### The newest torch on the index to a locked, rendered DeepSpeed line"
NEWEST_READING = """Reading: no vLLM release pins the newest torch, so its line is a DeepSpeed one (the newest
DeepSpeed whose requirements the data has read, 0.19.5, which requires torch>=2.0.0; the lock refuses 0.19.6 to
0.19.8 until their requirements are read). Its PyPI wheel is cu132, so the line is on CUDA 13.2, which needed
its entry in buildkit/data/cuda.yaml (nvcc 13.2's arch list run from the index's nvidia-cuda-nvcc wheel;
cuda-compat branches from NVIDIA's container Dockerfiles; the minimum driver a marked lead). The verdicts follow
the derived SMs: sm_70 (p3) has no cubin and no PTX in the wheel, and nvcc 13.2 cannot target it; sm_89 (g6,
g6e) runs the sm_86 cubin of the arch list (the wheel also carries sm_89 cubins outside it); every other GPU
family's SM is in the list. g6e is refused for its driver, not its SM: the matrix pins its AMI to R550, which
CUDA 13.2's cuda-compat does not accept. The CPU set resolves against download.pytorch.org, which this machine
cannot reach (as for djl0.36-cpu in the committed matrix.lock): recorded as not locked. Nothing here built or
ran the image: DeepSpeed's ops compiled against torch 2.15 and nvcc 13.2 are unproven."""
# The SageMaker inference AMI of the line: R580, which CUDA 13.2's cuda-compat accepts (buildkit/data/cuda.yaml); the
# families' default drivers (470, 535) and the vLLM line's AMI (550) are not all in its list.
NEWEST_AMI = "al2023-ami-sagemaker-inference-gpu-4-1"


def forget_torch(work: Path, version: str) -> None:
    """Take a torch release out of the scratch data: its derived record and the release entry `lmi facts add` wrote."""
    path = upstream.data_path("torch", work / "data")
    text = path.read_text()
    records = upstream.derived_records(text)
    records.pop(version, None)
    minor = ".".join(version.split(".")[:2])
    lines = text.splitlines(keepends=True)
    start = next(i for i, row in enumerate(lines) if re.match(rf"  # torch {re.escape(minor)}: written", row))
    end = start + 2
    while end < len(lines) and lines[end].startswith("    "):
        end += 1
    path.write_text(upstream.with_derived("".join(lines[:start] + lines[end:]), records))
    facts.load.cache_clear()


def newest_torch_line(work: Path, matrix_path: Path) -> tuple:
    """The index's newest torch, read by nobody, to a locked DeepSpeed line on the CUDA of its PyPI wheel."""
    steps: list = []
    newest = str(timed("list torch on the index", steps, lambda: max(upstream.released(upstream.listing("torch")))))
    forget_torch(work, newest)
    before = yaml.safe_load(upstream.data_path("torch", work / "data").read_text())
    assert newest not in before["derived"], newest
    said = [upstream.said(timed(f"lmi facts add torch {newest} (fetch + read)", steps, upstream.add, "torch",
                                 newest, profiles=REGISTRY, cache=work / "cache-newest", data_dir=work / "data"))]
    data = yaml.safe_load(upstream.data_path("torch", work / "data").read_text())
    minor = ".".join(newest.split(".")[:2])
    entry, record = data["releases"][minor], data["derived"][newest]
    variant = entry["pypi_variant"]  # cu132
    cuda = f"{variant[2:-1]}.{variant[-1]}"
    start = time.perf_counter()
    doc = yaml.safe_load(matrix_path.read_text())
    model = next(n for n in reversed(list(doc["lines"])) if doc["lines"][n].get("engine") == "deepspeed")
    line = dict(doc["lines"][model])
    line.pop("exclude", None)
    # the newest DeepSpeed whose requirements are read (the lock refuses a later one until they are): torch>=2.0.0
    ds = yaml.safe_load((work / "data" / "deepspeed.yaml").read_text())
    read = versions.key(ds["requires_read_through"])
    newest_ds = max((v for r in ds["releases"].values() for v in r["versions"] if versions.key(v) <= read),
                    key=versions.key)
    line.update(deepspeed=newest_ds, torch=newest, cuda=cuda, inference_ami=NEWEST_AMI)
    lo, hi = entry["python"]
    if not versions.in_range(line["python"], (lo, hi)):
        line["python"] = lo
    name = f"{model}-torch{minor}"
    text = matrix_path.read_text().rstrip("\n") + "\n\n" + \
        f"  # torch {newest} (the index's newest), added by upstream_bench.py: a copy of {model} with it\n" + \
        "".join("  " + row for row in upstream._dump({name: line}).splitlines(keepends=True))
    matrix_path.write_text(text)
    refused = upstream.refused_families(matrix_path, name, REGISTRY)
    matrix_path.write_text(upstream.with_excludes(text, name, refused))
    steps.append(("the matrix line, the rules' refusals as its excludes", time.perf_counter() - start))
    outputs = []
    code, out = timed(f"lmi lock {name}-* (uv, then render)", steps, lmi, "--matrix", str(matrix_path), "lock",
                      f"{name}-*")
    outputs.append(f"lock {name}: exit {code}: " + " ".join(out.split())[-600:])
    code, out = timed("lmi validate", steps, lmi, "--matrix", str(matrix_path), "validate")
    outputs.append(f"validate: exit {code}: " + " ".join(out.split())[-300:])
    rendered = sorted(p.name for p in (work / "images").glob(f"{name}-*"))
    outputs.append(f"rendered contexts: {', '.join(rendered) or 'none'}")
    lock = json.loads((work / "matrix.lock").read_text())
    lock = lock.get("sets", lock)
    for key in sorted(k for k in lock if k.startswith(f"{name}-")):
        entry_ = lock[key]
        if "layers" not in entry_:
            why = " ".join(str(entry_.get("unresolved", "")).split())[:90]
            outputs.append(f"set {key}: not locked here ({why}...)")
            continue
        pins = [f"{p[0]}=={p[1]}" for layer in entry_["layers"].values() for p in layer
                if p[0] in ("torch", "deepspeed", "cuda-toolkit", "nvidia-cuda-runtime", "triton")]
        outputs.append(f"set {key}: locked, {sum(len(v) for v in entry_['layers'].values())} packages "
                       f"({', '.join(pins)})")
    # each family of the line: its SM, how the derived arch list reaches it (facts.coverage, as the rules ask),
    # whether the wheel has that SM's own cubin outside the list, and the rules' verdict
    f = facts.load(REGISTRY)
    entries = tuple(facts.ArchEntry.parse(a) for a in record["arch_list"].split(";"))
    cubins = record.get("extra_cubins", "").split(";")
    rows = []
    for fam_name in doc["families"]:
        fam = f.families[fam_name]
        if not fam.is_gpu:
            where = f"CPU: the cpu variant from {data['wheel_index']}/cpu, not the PyPI wheel"
        else:
            cov = facts.coverage(entries, fam.sm)
            where = (cov.via if cov.covered else "no cubin of its major at or below it, no PTX") + \
                (f" (and an {facts.sm_name(fam.sm)} cubin outside the list)" if fam.sm in cubins else "")
        verdict = "refused: " + refused[fam_name] if fam_name in refused else "accepted"
        rows.append(f"| {fam_name} | {fam.sm if fam.is_gpu else '-'} | {where} | {verdict} |")
    return newest, name, line, record, steps, said + outputs, rows


def newest_main() -> int:
    SCRATCH.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    work, matrix_path = scratch()
    newest, name, line, record, steps, outputs, rows = newest_torch_line(work, matrix_path)
    text = [NEWEST_MARKER, "",
            f"{started}, {platform.node() or 'this machine'}, {os.cpu_count()} cores shared with other sessions; "
            f"`python bench/upstream_bench.py --newest-torch`. Index: {upstream._public(upstream.index_url())}. "
            f"torch {newest} taken out of the scratch data first (derived record and release entry); cold wheel "
            f"cache; wall clock {sum(s for _, s in steps):.1f} s:", "",
            "| step | s |", "|---|---|", *[f"| {what} | {s:.1f} |" for what, s in steps], "",
            f"- the line {name}: " + ", ".join(f"{k} {v}" for k, v in line.items() if k not in ("pip",)),
            f"- torch {newest}'s derived record: {record['local_version']}, arch list {record['arch_list']}, "
            f"extra cubins {record.get('extra_cubins', '')}, from {record['source']['file']}",
            *[f"- {o}" for o in outputs], "",
            f"| family | SM | torch {newest}'s arch list reaches it through | the rules |", "|---|---|---|---|",
            *rows, "", NEWEST_READING, ""]
    write_section(NEWEST_MARKER, "\n".join(text))
    print("\n".join(text))
    gpu_locked = any(o.startswith(f"set {name}-cu") and ": locked" in o for o in outputs)
    return 0 if gpu_locked and any(o.startswith("validate: exit 0") for o in outputs) else 1


def main() -> int:
    SCRATCH.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tool = cuobjdump()
    version = subprocess.run([str(tool), "--version"], capture_output=True, text=True, check=False).stdout
    tool_version = (re.findall(r"V(\d+\.\d+\.\d+)", version) or ["?"])[-1]
    t0 = time.perf_counter()
    rows = cross_check(tool)
    cross_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    drift, checked = verify.verify_derived(profiles=REGISTRY, wheels=True)
    verify_s = time.perf_counter() - t0
    work, matrix_path = scratch()
    steps, report, outputs = release_to_line(work, matrix_path)
    new_lines = re.findall(r"matrix: line (\S+) added", "\n".join(report))
    new_verdicts = {line: verdicts(matrix_path, line) for line in new_lines}
    steps2, outputs2, refused2 = earlier_line(work, matrix_path)
    early = verdicts(matrix_path, "vllm0.32")
    total = sum(s for _, s in steps)

    text = [MARKER, "",
            f"{started}, {platform.node() or 'this machine'}, {os.cpu_count()} cores shared with other sessions; "
            f"`make facts-upstream` (bench/upstream_bench.py). Index: {upstream._public(upstream.index_url())}.", "",
            f"**cuobjdump {tool_version} (nvidia-cuda-cuobjdump wheel) vs the `.nv_fatbin` reader**, every library "
            f"of vllm 0.33.0's wheel with device code ({cross_s:.1f} s):", "",
            "| library | images | reader's summary | cuobjdump --list-elf --list-ptx |", "|---|---|---|---|", *rows, "",
            f"**Re-derivation** (`lmi facts verify --wheels`' part, wheels cached): {checked} facts checked, "
            f"{len(drift)} differ, {verify_s:.1f} s" + ("" if not drift else ": " + "; ".join(drift)), "",
            f"**A new release on the index to a locked, rendered line** (cold wheel cache; wall clock "
            f"{total:.1f} s):", "",
            "| step | s |", "|---|---|", *[f"| {what} | {s:.1f} |" for what, s in steps], "",
            *[f"- {line}" for line in report], *[f"- {o}" for o in outputs], ""]
    for line, rows_ in new_verdicts.items():
        text += [f"Families of {line} the rules accept: " + "; ".join(rows_), ""]
    text += [f"**An earlier release (vLLM 0.32.0, pinning torch 2.13.0), read by nobody, to a locked, rendered "
             f"line** (both taken out of the scratch data first; cold wheel cache; wall clock "
             f"{sum(s for _, s in steps2):.1f} s):", "",
             "| step | s |", "|---|---|", *[f"| {what} | {s:.1f} |" for what, s in steps2], "",
             *[f"- {o}" for o in outputs2],
             "- refused by the rules (excluded with the reason): "
             + "; ".join(f"{k}: {v}" for k, v in refused2.items()),
             "- accepted: " + "; ".join(early), ""]
    text += [READING, ""]
    write_section(MARKER, "\n".join(text))
    print("\n".join(text))
    return 1 if drift or any("DIFFERENT" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(newest_main() if "--newest-torch" in sys.argv[1:] else main())
