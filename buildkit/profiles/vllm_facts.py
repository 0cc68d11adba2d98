"""What `lmi facts add vllm X` reads from a vLLM wheel, and the `releases:` entry buildkit/profiles/vllm.py loads.

The core (buildkit/upstream.py, buildkit/verify.py) finds this module by the profile's name (<profile>_facts)
and calls COMPONENT, derive(), release_entry(), hand_pairs() and torch_pairs(); the reading itself is
buildkit/wheelfacts.py's.
"""

from __future__ import annotations

import re
from pathlib import Path

from .. import wheelfacts

COMPONENT = "vllm"  # the package on the index, the data file's stem and the matrix key
ENGINE = "vllm"  # the profile whose lines a new release is modelled on
PLATFORM = "vllm/platforms/cuda.py"
# vLLM's general kernels (what any model runs): the release's sm/ptx are theirs; the rest are per feature
# (FlashAttention 2/3, FlashMLA, ...), recorded under `kernels`.
GENERAL = re.compile(r"_(moe_)?C(_stable_libtorch)?")


def derive(path: Path, source: dict) -> tuple[dict, list[str]]:
    """A vLLM wheel's record, and what could not be read."""
    wheel = wheelfacts.read_wheel(path, texts=(PLATFORM,), libraries=r"^vllm/.*\.so$")
    unread: list[str] = []
    record: dict = {"source": source, "requires_python": wheel.requires_python}
    try:
        record["python"] = wheelfacts.python_range(wheel.requires_python)
    except wheelfacts.Unreadable as exc:
        unread.append(f"python: {exc}")
    record["wheel_tag"] = wheel.tags[0] if len(wheel.tags) == 1 else list(wheel.tags)
    record["glibc"] = wheel.glibc
    record["pins"] = wheel.pins
    if "torch" not in wheel.pins:
        unread.append("torch: METADATA pins no torch==X")
    majors = wheel.cuda_majors()
    if len(majors) == 1:
        record["cuda_major"] = majors.pop()
    else:
        unread.append(f"cuda_major: the libraries link {sorted(majors) or 'no'} libcudart.so.N")
    kernels = {wheelfacts.library_key(m, "vllm"): lib for m, lib in sorted(wheel.libraries.items())}
    record["kernels"] = {key: lib.summary() for key, lib in kernels.items() if lib.has_device_code}
    general = [lib for key, lib in kernels.items() if GENERAL.fullmatch(key)]
    if any(lib.has_device_code for lib in general):
        key = wheelfacts.sm_key  # arch-specific images (9.0a) run on their own SM only: not the release's SMs
        record["sm"] = sorted({sm for lib in general for sm in lib.cubins if not sm.endswith("a")}, key=key)
        record["ptx"] = sorted({sm for lib in general for sm in lib.ptx if not sm.endswith("a")}, key=key)
    else:
        unread.append("sm/ptx: no general kernel library (vllm/_C*.so, vllm/_moe_C*.so) with device code")
    found = wheelfacts.bf16_floors(wheel.texts.get(PLATFORM, ""))
    if len(found) == 1:
        record["bf16_min_sm"] = found.pop()
    else:
        unread.append(f"bf16_min_sm: {PLATFORM} states no single bfloat16 capability floor "
                      f"({', '.join(sorted(found)) or 'none'})")
    if unread:
        record["unread"] = unread
    return record, unread


def release_entry(version: str, record: dict, torch_records: dict) -> tuple[dict | None, list[str]]:
    """The `releases:` entry the vLLM profile reads, from the derived record; None and why when a field is
    not read (or the pinned torch has no derived record: `lmi facts add torch X` first)."""
    missing = [k for k in ("python", "cuda_major", "sm", "ptx", "bf16_min_sm") if k not in record]
    torch = record.get("pins", {}).get("torch")
    variant = (torch_records.get(torch) or {}).get("variant")
    if not torch:
        missing.append("torch (no torch==X in METADATA)")
    elif not variant:
        missing.append(f"torch_variant (no derived record of torch {torch}: `lmi facts add torch {torch}` first)")
    if missing:
        return None, missing
    return {
        "python": record["python"], "wheel_tag": record["wheel_tag"], "torch": torch, "torch_variant": variant,
        "cuda_major": record["cuda_major"], "sm": record["sm"], "ptx": record["ptx"], "kernels": record["kernels"],
        "bf16_min_sm": record["bf16_min_sm"],
        # the vllm wheel's own glibc floor: a lower bound of its lock's (measured by `make lock`, not read here)
        "lock": {"min_glibc_for_wheels": record["glibc"]},
    }, []


def line_versions(version: str, entry: dict) -> dict:
    """The matrix keys a line of this release sets (on a copy of the last line of the engine)."""
    return {"vllm": version, "torch": entry["torch"], "cuda": f"{entry['cuda_major']}.0"}


def hand_pairs(doc: dict, version: str, record: dict) -> list[tuple[str, object, object]]:
    """(fact, the data's value, the derived value) for one release's hand-read (or written) entry."""
    entry = doc.get("releases", {}).get(version)
    if entry is None:
        return []
    pairs = [("python", entry.get("python"), record.get("python")),
             ("wheel_tag", entry.get("wheel_tag"), record.get("wheel_tag")),
             ("torch", entry.get("torch"), record.get("pins", {}).get("torch")),
             ("cuda_major", str(entry.get("cuda_major")), record.get("cuda_major")),
             ("sm", entry.get("sm"), record.get("sm")), ("ptx", entry.get("ptx"), record.get("ptx")),
             ("bf16_min_sm", entry.get("bf16_min_sm"), record.get("bf16_min_sm"))]
    if "kernels" in entry:
        pairs.append(("kernels", entry["kernels"], record.get("kernels")))
    return pairs


def torch_pairs(doc: dict, record: dict) -> list[tuple[str, object, object]]:
    """vllm.yaml's hand-read `torch_wheels` entry of the torch build a derived torch record is of."""
    seen = (doc.get("torch_wheels") or {}).get(record.get("local_version"))
    if not seen:
        return []
    pairs = []
    for key in ("python", "cuda_major", "requires", "arch_list", "extra_cubins"):
        hand, derived = seen.get(key), record.get(key)
        if key == "requires":  # METADATA's order aside
            hand, derived = sorted(hand or ()), sorted(derived or ())
        pairs.append((f"vllm.yaml torch_wheels.{record.get('local_version')}.{key}", hand, derived))
    return pairs
