"""Facts read from a release's wheel file itself, no GPU and no import of what it ships.

What is read, and from where in the wheel:
- METADATA (packaging's metadata parser): Requires-Python, and Requires-Dist (the pins: `==`, `~=`, `===`)
  whose markers hold on Linux x86_64;
- the file name's tags (packaging.utils.parse_wheel_filename) and the glibc floor of a manylinux tag;
- each ELF shared library (pyelftools): DT_NEEDED, and the `.nv_fatbin` section's fat binaries, whose entry
  headers say, per kernel image, PTX or cubin, its SM and whether it is arch-specific (sm_90a).

The `.nv_fatbin` layout (no NVIDIA header describes it; it is what `cuobjdump --list-elf --list-ptx` lists,
checked against cuobjdump 13.5.37 from the nvidia-cuda-cuobjdump wheel on nvcc-built libraries and on one
real library per `make facts-upstream`): a section holds fat binaries back to back, each a 16-byte header
(u32 magic 0xBA55ED50, u16 version, u16 header size, u64 size of the entries) then entries, each a header
(u16 kind: 1 PTX, 2 or 0x10 ELF; u16 version; u32 header size; u64 payload size, 8-aligned) then its
payload. In the entry header, u32 at offset 28 is the SM (90 for sm_90) and the u64 at offset 40 holds
flags: 0x8000 a compressed payload, 0x100000 an arch-specific image ("a": sm_90a runs on sm_90 only),
0x200000 a family image ("f": sm_100f, which cuobjdump lists as sm_100 and which runs like a plain sm_100
cubin on later minors of its major).
"""

from __future__ import annotations

import ast
import mmap
import re
import shutil
import struct
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from packaging.metadata import Metadata
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import parse_wheel_filename

from . import versions

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX = 1
KINDS_ELF = (2, 0x10)
FLAG_ARCH_SPECIFIC = 0x100000
FLAG_FAMILY = 0x200000
LINUX_X86_64 = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                "os_name": "posix", "extra": ""}
PIN_OPERATORS = ("==", "===", "~=")


class Unreadable(ValueError):
    """A fact the files do not state (or state twice, differently): said, never guessed."""


def sm_text(code: int, flags: int = 0) -> str:
    """90 -> '9.0'; with the arch-specific flag '9.0a'. A family image (f) is listed as its plain SM."""
    text = f"{code // 10}.{code % 10}"
    return text + "a" if flags & FLAG_ARCH_SPECIFIC else text


def sm_key(sm: str) -> tuple:
    """Order SMs as the data lists them: 9.0 before 9.0a before 10.0."""
    base = sm.rstrip("af")
    return (versions.key(base), sm[len(base):])


def cuobjdump_counts(listing: str) -> Counter:
    """`cuobjdump --list-elf --list-ptx` output -> Counter of (kind, SM), to cross-check fatbin_entries."""
    found: Counter = Counter()
    for kind, code in re.findall(r"^(ELF|PTX) file\s+\d+: .*\.sm_(\d+[af]?)\.(?:cubin|ptx)$", listing, re.M):
        suffix = code[-1] if code[-1] in "af" else ""
        digits = code.rstrip("af")
        found[("cubin" if kind == "ELF" else "ptx", f"{digits[:-1]}.{digits[-1]}{suffix}")] += 1
    return found


def fatbin_entries(data) -> list[tuple[str, str]]:
    """(kind 'cubin'|'ptx', SM) for every image in a `.nv_fatbin` section's bytes."""
    out: list[tuple[str, str]] = []
    pos, end = 0, len(data)
    while pos + 16 <= end:
        magic, _version, header, size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            # fat binaries are 8-aligned in the section; zero padding may separate them
            pos += 8
            continue
        entry, stop = pos + header, pos + header + size
        if stop > end:
            raise Unreadable(f"a fat binary at offset {pos} runs past its section ({stop} > {end})")
        while entry + 48 <= stop:
            kind, _v, ehead, payload = struct.unpack_from("<HHIQ", data, entry)
            if ehead < 48:
                raise Unreadable(f"a fat binary entry at offset {entry} has a {ehead}-byte header")
            (code,) = struct.unpack_from("<I", data, entry + 28)
            (flags,) = struct.unpack_from("<Q", data, entry + 40)
            if kind == KIND_PTX:
                out.append(("ptx", sm_text(code, flags)))
            elif kind in KINDS_ELF:
                out.append(("cubin", sm_text(code, flags)))
            entry += ehead + payload
        pos = stop
    return out


@dataclass
class Library:
    path: str  # inside the wheel
    needed: tuple[str, ...]
    cubins: Counter = field(default_factory=Counter)
    ptx: Counter = field(default_factory=Counter)
    rodata_matches: tuple[str, ...] = ()  # matches of a caller's pattern in the library's bytes

    @property
    def has_device_code(self) -> bool:
        return bool(self.cubins or self.ptx)

    def summary(self) -> str:
        """'7.5;8.0;9.0a +PTX 8.0', as the data files write a library's kernels."""
        cubins = ";".join(sorted(self.cubins, key=sm_key))
        ptx = ";".join(sorted(self.ptx, key=sm_key))
        if not ptx:
            return cubins
        return f"{cubins} +PTX {ptx}" if cubins else f"+PTX {ptx}"


def read_library(path: Path, name: str, pattern: bytes | None = None) -> Library:
    from elftools.common.exceptions import ELFError  # pyelftools loads when a wheel is read, not with the CLI

    with path.open("rb") as fh:
        try:
            elf = ElfView(fh)
        except ELFError as exc:
            raise Unreadable(f"{name}: not an ELF file ({exc})") from exc
        lib = Library(path=name, needed=elf.needed)
        size = path.stat().st_size
        if size == 0:
            return lib
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mem:
            if elf.fatbin is not None:
                offset, length = elf.fatbin
                for kind, sm in fatbin_entries(memoryview(mem)[offset:offset + length]):
                    (lib.cubins if kind == "cubin" else lib.ptx)[sm] += 1
            if pattern is not None:
                lib.rodata_matches = tuple(sorted({m.group(0).decode() for m in re.finditer(pattern, mem)}))
    return lib


class ElfView:
    """DT_NEEDED and where the `.nv_fatbin` section lies, from pyelftools."""

    def __init__(self, fh) -> None:
        from elftools.elf.dynamic import DynamicSection
        from elftools.elf.elffile import ELFFile

        elf = ELFFile(fh)
        self.needed: tuple[str, ...] = ()
        self.fatbin: tuple[int, int] | None = None
        for section in elf.iter_sections():
            if isinstance(section, DynamicSection):
                self.needed = tuple(tag.needed for tag in section.iter_tags("DT_NEEDED"))
            elif section.name == ".nv_fatbin":
                self.fatbin = (section["sh_offset"], section["sh_size"])


def python_range(requires_python: str | None) -> list[str | None]:
    """'<3.15,>=3.11' -> ['3.11', '3.14']; no upper bound -> [low, None]."""
    if not requires_python:
        raise Unreadable("the wheel's METADATA has no Requires-Python")
    spec = SpecifierSet(requires_python)
    ok = [f"3.{m}" for m in range(0, 30) if spec.contains(f"3.{m}.0") or spec.contains(f"3.{m}.99")]
    if not ok:
        raise Unreadable(f"Requires-Python {requires_python} admits no Python 3")
    upper = [s for s in spec if s.operator in ("<", "<=", "==", "~=")]
    return [ok[0], ok[-1] if upper else None]


def glibc_floor(tag_platform: str) -> str | None:
    match = re.fullmatch(r"manylinux_(\d+)_(\d+)_\w+", tag_platform)
    if match:
        return f"{match.group(1)}.{match.group(2)}"
    legacy = {"manylinux1": "2.5", "manylinux2010": "2.12", "manylinux2014": "2.17"}
    return legacy.get(tag_platform.rsplit("_", 1)[0].removesuffix("_x86"))


@dataclass
class Wheel:
    filename: str
    name: str
    version: str
    requires_python: str | None
    requires_dist: tuple[str, ...]
    tags: tuple[str, ...]
    libraries: dict[str, Library]
    texts: dict[str, str]  # small text files the caller asked for (path -> content)

    @property
    def pins(self) -> dict[str, str]:
        """name -> 'X' for each `name==X` that holds on Linux x86_64 (extras dropped)."""
        out = {}
        for text in self.requires_dist:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(LINUX_X86_64):
                continue
            specs = list(req.specifier)
            if len(specs) == 1 and specs[0].operator in ("==", "==="):
                out[req.name] = specs[0].version
        return out

    def pinned_requirements(self) -> list[str]:
        """The Requires-Dist that hold on Linux x86_64 and pin a version (==, ~=), as written, markers dropped."""
        out = []
        for text in self.requires_dist:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(LINUX_X86_64):
                continue
            if any(s.operator in PIN_OPERATORS for s in req.specifier):
                req.marker = None
                out.append(str(req))
        return out

    @property
    def glibc(self) -> str | None:
        floors = {glibc_floor(t.split("-")[-1]) for t in self.tags}
        floors.discard(None)
        return min(floors, key=versions.key) if floors else None

    def cuda_majors(self) -> set[str]:
        """The CUDA runtime majors the libraries link (libcudart.so.N in DT_NEEDED)."""
        found = set()
        for lib in self.libraries.values():
            for needed in lib.needed:
                match = re.fullmatch(r"libcudart\.so\.(\d+)", needed)
                if match:
                    found.add(match.group(1))
        return found


def read_wheel(path: Path, *, texts: tuple[str, ...] = (), libraries: str = r".*\.so(\.\d+)*$",
               pattern: dict[str, bytes] | None = None) -> Wheel:
    """Read a wheel: METADATA, tags, and every shared library matching `libraries` (a regex on the member
    path). `texts` are members returned as text; `pattern` maps a member path to a bytes regex whose
    matches in that library are returned (e.g. torch's arch-flags string)."""
    name, version, _build, tags = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as zf:
        members = zf.namelist()
        meta_name = next((m for m in members if re.fullmatch(r"[^/]+\.dist-info/METADATA", m)), None)
        if meta_name is None:
            raise Unreadable(f"{path.name}: no .dist-info/METADATA")
        meta = Metadata.from_email(zf.read(meta_name), validate=False)
        libs: dict[str, Library] = {}
        with tempfile.TemporaryDirectory(prefix="lmi-wheel-") as tmp:
            for member in members:
                if not re.search(libraries, member):
                    continue
                target = Path(tmp) / "lib.so"
                with zf.open(member) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
                libs[member] = read_library(target, member, (pattern or {}).get(member))
                target.unlink()
        got_texts = {m: zf.read(m).decode("utf-8", "replace") for m in texts if m in members}
    return Wheel(filename=path.name, name=str(name), version=str(version),
                 requires_python=str(meta.requires_python) if meta.requires_python else None,
                 requires_dist=tuple(str(r) for r in (meta.requires_dist or [])),
                 tags=tuple(sorted(str(t) for t in tags)), libraries=libs, texts=got_texts)


def module_constants(source: str) -> dict[str, str]:
    """Top-level `NAME = 'literal'` assignments of a Python file (torch/version.py), without running it."""
    out = {}
    for node in ast.parse(source).body:
        value = getattr(node, "value", None)
        targets = getattr(node, "targets", None) or ([node.target] if isinstance(node, ast.AnnAssign) else [])
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            for target in targets:
                if isinstance(target, ast.Name):
                    out[target.id] = value.value
    return out


def bf16_floors(source: str) -> set[str]:
    """The SMs a Python file requires for bfloat16: `has_device_capability(N)` under an `if` that tests bfloat16
    (an engine's platform module: `if dtype == torch.bfloat16: if not cls.has_device_capability(80): raise`)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If) and "bfloat16" in ast.unparse(node.test):
            for sub in ast.walk(node):
                if (isinstance(sub, ast.Call) and getattr(sub.func, "attr", "") == "has_device_capability"
                        and sub.args and isinstance(sub.args[0], ast.Constant) and type(sub.args[0].value) is int):
                    found.add(f"{sub.args[0].value // 10}.{sub.args[0].value % 10}")
    return found


def arch_list_text(flags: str) -> str:
    """torch.cuda.get_arch_list()'s words ('sm_75 sm_80 compute_120') in the data's form ('7.5;8.0;12.0+PTX')."""
    cubins, ptx = [], []
    for word in flags.split():
        kind, _, code = word.partition("_")
        sm = f"{code[:-1]}.{code[-1]}"
        (cubins if kind == "sm" else ptx).append(sm)
    entries = sorted(set(cubins) | set(ptx), key=sm_key)
    return ";".join(sm + ("+PTX" if sm in ptx else "") for sm in entries)


def library_key(member: str, package: str) -> str:
    """'pkg/attn/_fa2_C.abi3.so' -> 'attn/_fa2_C' (as the data names them), for package 'pkg'."""
    path = PurePosixPath(member)
    rel = path.relative_to(package) if path.parts[0] == package else path
    stem = rel.name.split(".")[0]
    return str(rel.with_name(stem))
