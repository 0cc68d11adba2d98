"""Platform facts (buildkit/data/*.yaml) as typed, read-only records.

The data files are the single place where compatibility knowledge lives; every rule reads them and
cites the source recorded next to the fact.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import versions
from .interface import Registry

DATA_DIR = Path(__file__).parent / "data"
# libyaml's parser where PyYAML was built with it (the wheels are): the same safe constructor and resolver,
# so the same values, parsed ~10x faster; the pure-Python parser otherwise.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Family:
    name: str
    gpu: str | None
    sm: str | None
    arch: str
    max_gpus: int
    default_driver: str | None
    min_driver: str | None
    legacy: str | None
    unverified: str | None
    sources: dict[str, str]
    default_driver_note: str | None = None  # the default driver is weakly sourced: said in a note
    gpu_memory_mib: int | None = None  # memory of one GPU (the Accelerate way plans device maps from it)
    gpu_model: str | None = None  # "A10G": the GPU's name without its memory
    gpu_memory_gb: int | None = None  # one GPU's memory as AWS sells it (24 for the A10G's 22888 MiB)
    sizes: dict[str, int] = field(default_factory=dict)  # instance size -> GPUs ("12xlarge" -> 4)

    @property
    def is_gpu(self) -> bool:
        return self.sm is not None


@dataclass(frozen=True)
class InstanceType:
    """An instance as `lmi uri --instance` takes it: a family (g5) or one of its sizes (ml.g5.12xlarge)."""

    family: str  # "g5"
    size: str | None = None  # "12xlarge"; None for a bare family
    facts: Family | None = None  # the family's facts (always there for a size)

    @property
    def name(self) -> str:
        """ml.g5.12xlarge (SageMaker's spelling), or the bare family."""
        return f"ml.{self.family}.{self.size}" if self.size else self.family

    @property
    def gpus(self) -> int | None:
        return self.facts.sizes[self.size] if self.size and self.facts else None

    @property
    def tensor_parallel_degree(self) -> int | None:
        """Every GPU of the instance (LMI's `max`); the largest degree dividing a model's heads may be lower."""
        return self.gpus

    def summary(self) -> str:
        """'8 x A100 40 GB, tensor_parallel_degree=8' (a size only)."""
        fam = self.facts
        return (f"{self.gpus} x {fam.gpu_model or fam.gpu} {fam.gpu_memory_gb} GB, "
                f"tensor_parallel_degree={self.tensor_parallel_degree}")


_INSTANCE = re.compile(r"(?P<ml>ml\.)?(?P<family>[a-z][a-z0-9-]*)(?:\.(?P<size>[a-z0-9]+))?")


def instance_type(text: str, facts: Facts) -> InstanceType:
    """Parse `g5`, `g5.12xlarge` or `ml.g5.12xlarge` against the family facts: the one place instance types are
    read. A bare family passes as it is (a matrix may name its own); a size must be a known size of a family
    with sizes. Raises ValueError with a one-line message (what was wrong, what to give instead)."""
    raw = text.strip()
    match = _INSTANCE.fullmatch(raw.lower())
    if not match or (match["ml"] and not match["size"]):
        raise ValueError(f"{raw[:60]!r} is not an instance type or family; give one like ml.g5.12xlarge, "
                         "g5.12xlarge or g5")
    name, size = match["family"], match["size"]
    family = facts.families.get(name)
    if size is None:
        return InstanceType(name, None, family)
    with_sizes = sorted(n for n, f in facts.families.items() if f.sizes)
    if family is None or not family.sizes:
        if re.fullmatch(r"[cmrt]\d.*", name):
            hint = "; CPU instances take --instance cpu"
        else:
            near = versions.nearest(name, with_sizes)
            hint = f"; did you mean {' or '.join(near)}?" if near else ""
        raise ValueError(f"unknown instance family '{name}' in {raw[:60]!r}: the GPU families with known sizes are "
                         f"{', '.join(with_sizes)}{hint}")
    if size not in family.sizes:
        raise ValueError(f"unknown size '{size}' of {name} in {raw[:60]!r}: {name} comes as "
                         f"{', '.join(f'{name}.{s}' for s in family.sizes)}")
    return InstanceType(name, size, family)


@dataclass(frozen=True)
class Toolkit:
    version: str  # "12.1"
    patch: str  # "12.1.1": the nvidia/cuda tag that exists
    min_driver: str
    nvcc_archs: tuple[str, ...]
    compat_branches: tuple[str, ...]
    ubuntu: tuple[str, ...]
    cudnn: str

    @property
    def major(self) -> str:
        return self.version.split(".")[0]

    compat_pin: str | None = None  # a cuda-compat package version known to carry the libraries

    def base_image(self, flavor: str, ubuntu: str) -> str:
        return f"nvidia/cuda:{self.patch}-{flavor}-ubuntu{ubuntu}"


@dataclass(frozen=True)
class ArchEntry:
    sm: str
    ptx: bool

    @classmethod
    def parse(cls, text: str) -> ArchEntry:
        sm, _, suffix = text.partition("+")
        return cls(sm=sm, ptx=suffix.upper() == "PTX")


@dataclass(frozen=True)
class Coverage:
    covered: bool
    via: str  # "cubin sm_86", "PTX compute_120" or ""

    @property
    def ptx_only(self) -> bool:
        return self.via.startswith("PTX")


def sm_name(sm: str) -> str:
    """'8.6' -> 'sm_86', as nvcc and torch name an SM."""
    return "sm_" + sm.replace(".", "")


def coverage(entries: tuple[ArchEntry, ...], sm: str) -> Coverage:
    """Does a build for `entries` run on `sm`? A cubin X.y runs on X.z for z >= y; PTX of a lower CC JITs."""
    want = versions.key(sm)
    cubins = [e for e in entries if versions.key(e.sm)[0] == want[0] and versions.key(e.sm) <= want]
    if cubins:
        best = max(cubins, key=lambda e: versions.key(e.sm))
        return Coverage(True, f"cubin {sm_name(best.sm)}")
    ptx = [e for e in entries if e.ptx and versions.key(e.sm) <= want]
    if ptx:
        return Coverage(True, f"PTX compute_{ptx[-1].sm.replace('.', '')}")
    return Coverage(False, "")


@dataclass(frozen=True)
class WheelVariant:
    name: str  # "cu121" or "cpu"
    archs: dict[str, tuple[ArchEntry, ...]]  # cpu arch -> SM entries
    source: str

    @property
    def cuda(self) -> str | None:
        return variant_cuda(self.name)


def variant_cuda(name: str) -> str | None:
    """'cu121' -> '12.1', 'cu130' -> '13.0', 'cpu' -> None."""
    if not name.startswith("cu"):
        return None
    digits = name[2:]
    return f"{digits[:-1]}.{digits[-1]}"


def variant_name(cuda: str | None) -> str:
    return "cpu" if cuda is None else "cu" + cuda.replace(".", "")


@dataclass(frozen=True)
class TorchRelease:
    minor: str
    versions: tuple[str, ...]
    python: tuple[str, str]
    pypi_variant: str | None
    variants: dict[str, WheelVariant]


@dataclass(frozen=True)
class OperatingSystem:
    name: str
    image: str
    ubuntu: str | None  # None: no nvidia/cuda base exists for it (CPU images only)
    python: str
    java_package: str
    java: str
    aio_package: str  # libaio (asynchronous I/O)
    mpi_package: str  # an MPI runtime (mpirun)
    glibc: str  # the release's glibc: wheels up to manylinux_<glibc> run on it
    other_pythons: tuple[str, ...] = ()  # further interpreters the release packages (focal: python3.9)

    @property
    def pythons(self) -> tuple[str, ...]:
        return (self.python, *self.other_pythons)

    def wheel_platform(self, arch: str) -> str:
        """The newest manylinux platform whose wheels run here, e.g. x86_64-manylinux_2_39."""
        return f"{arch}-manylinux_{self.glibc.replace('.', '_')}"


@dataclass(frozen=True)
class Facts:
    families: dict[str, Family]
    amis: dict[str, str]  # InferenceAmiVersion -> driver
    ami_cuda: dict[str, str]  # InferenceAmiVersion -> the CUDA version of its driver
    toolkits: dict[str, Toolkit]
    minor_compat: dict[str, str]
    torch: dict[str, TorchRelease]
    torch_wheel_index: str
    systems: dict[str, OperatingSystem]
    sources: dict[str, dict[str, str]] = field(repr=False)
    stacks: dict[str, object] = field(default_factory=dict)  # profile name -> its stack's facts (buildkit/profiles)
    profiles: Registry = field(default_factory=lambda: Registry(()), repr=False, compare=False)  # load's registry

    def source(self, topic: str, key: str) -> str:
        """The recorded source of a fact: topic is the data file's stem, key its `sources` entry."""
        return self.sources[topic][key]

    def torch_release(self, version: str) -> TorchRelease | None:
        release = self.torch.get(versions.minor(version))
        return release if release and version in release.versions else None

    @property
    def torch_versions(self) -> list[str]:
        return [v for r in self.torch.values() for v in r.versions]

    @property
    def python_versions(self) -> list[str]:
        return [f"3.{m}" for m in range(6, 16)]


def _read(name: str) -> dict:
    with (DATA_DIR / f"{name}.yaml").open(encoding="utf-8") as fh:
        return yaml.load(fh, Loader=_SAFE_LOADER)


@functools.cache
def load(profiles: Registry) -> Facts:
    """The facts of buildkit/data, with each profile's own (read by the profile from its DATA files). The
    registry comes from the top (buildkit.profiles.REGISTRY, passed down by the CLI) and travels with the facts."""
    inst, cuda, torch, osd = (_read(n) for n in ("instances", "cuda", "torch", "os"))
    families = {
        name: Family(
            name=name,
            gpu=f.get("gpu"),
            sm=f.get("sm"),
            arch=f["arch"],
            max_gpus=f["max_gpus"],
            gpu_memory_mib=f.get("gpu_memory_mib"),
            gpu_model=f.get("gpu_model"),
            gpu_memory_gb=f.get("gpu_memory_gb"),
            sizes={str(k): int(v) for k, v in (f.get("sizes") or {}).items()},
            default_driver=f.get("default_driver"),
            min_driver=f.get("min_driver"),
            legacy=f.get("legacy"),
            unverified=f.get("unverified"),
            default_driver_note=" ".join(f["default_driver_note"].split()) if f.get("default_driver_note") else None,
            sources={k: inst["sources"][v] for k, v in f["sources"].items()},
        )
        for name, f in inst["families"].items()
    }
    toolkits = {
        ver: Toolkit(
            version=ver,
            patch=t["patch"],
            min_driver=t["min_driver"],
            nvcc_archs=tuple(t["nvcc_archs"]),
            compat_branches=tuple(t["compat_branches"]),
            ubuntu=tuple(t["ubuntu"]),
            cudnn=t["cudnn"],
            compat_pin=t.get("compat_pin"),
        )
        for ver, t in cuda["toolkits"].items()
    }
    torch_releases = {
        minor: TorchRelease(
            minor=minor,
            versions=tuple(r["versions"]),
            python=tuple(r["python"]),
            pypi_variant=r.get("pypi_variant"),
            variants={
                "cpu": WheelVariant("cpu", {}, "variants"),
                **{
                    name: WheelVariant(
                        name=name,
                        archs={
                            arch: tuple(ArchEntry.parse(e) for e in v[arch].split(";"))
                            for arch in ("x86_64", "aarch64")
                            if arch in v
                        },
                        source=v["source"],
                    )
                    for name, v in r["variants"].items()
                },
            },
        )
        for minor, r in torch["releases"].items()
    }
    return Facts(
        families=families,
        amis={name: a["driver"] for name, a in inst["inference_amis"]["amis"].items()},
        ami_cuda={name: str(a["cuda"]) for name, a in inst["inference_amis"]["amis"].items()},
        toolkits=toolkits,
        minor_compat=dict(cuda["minor_compat"]),
        torch=torch_releases,
        torch_wheel_index=torch["wheel_index"],
        systems={name: OperatingSystem(name=name, **{k: tuple(v) if k == "other_pythons" else v for k, v in s.items()})
                 for name, s in osd["systems"].items()},
        sources={
            "instances": {**inst["sources"], "ami": inst["inference_amis"]["source"]},
            "cuda": cuda["sources"],
            "torch": torch["sources"],
            "os": osd["sources"],
        },
        stacks={name: p.load_facts({stem: _read(stem) for stem in p.DATA}) for name, p in profiles.items()},
        profiles=profiles,
    )
