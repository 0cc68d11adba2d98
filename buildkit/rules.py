"""Compatibility rules. Each rule reads the facts (buildkit/data) and reports findings that name the
rule, the source of the fact it relied on, and the nearest choice that would pass.

Rules run over a `Combo` (one image's components). `evaluate` runs the core's rules (instance family,
torch wheel, nvcc, host driver, Python, base image) and then the rules of the line's engine profile
(buildkit/profiles), on the same context, and returns a `Verdict`: the errors, the notes worth telling a
user (cuda-compat needed, what the engine leaves out on this SM), and what the image needs (cuda-compat,
the torch wheel variant, the arch list for source-built code, and what the profile records for itself).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from . import versions
from .errors import UserError
from .facts import Facts, Family, Toolkit, TorchRelease, WheelVariant, coverage, sm_name, variant_name


@dataclass(frozen=True)
class Combo:
    """One image's components. `profile` names its profile (the matrix's `engine:`), and `parts` holds the
    profile's components and options (`part(name)`); `cuda` is None for CPU images; `torch_cuda` selects a torch
    wheel variant other than the toolkit's (e.g. cu128 on a 12.9 base); `driver` overrides the host driver."""

    family: str
    torch: str
    cuda: str | None
    python: str
    os: str
    profile: str  # the profile's name (the matrix's `engine:`)
    parts: tuple[tuple[str, str], ...] = ()  # the profile's matrix keys -> values
    torch_cuda: str | None = None
    driver: str | None = None
    custom_bases: bool = False  # the matrix names its own base images (it vouches for their CUDA)

    def part(self, name: str) -> str | None:
        return dict(self.parts).get(name)

    @classmethod
    def of(cls, profile: str, family: str, torch: str, cuda: str | None, python: str, os: str,
           **parts_and_options) -> Combo:
        """A combo from keywords: the core's fields and the profile's components/options by name."""
        core = {k: parts_and_options.pop(k) for k in ("torch_cuda", "driver", "custom_bases")
                if k in parts_and_options}
        parts = tuple((k, v) for k, v in parts_and_options.items() if v is not None)
        return cls(family=family, torch=torch, cuda=cuda, python=python, os=os, profile=profile, parts=parts, **core)


@dataclass(frozen=True)
class Finding:
    rule: str
    field: str  # the Combo field the finding is about, used to point at its matrix line
    message: str
    source: str
    fix: str

    def text(self) -> str:
        return f"{self.message} ({self.rule}, {self.source}); try {self.fix}"


@dataclass
class Verdict:
    errors: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)  # what AWS or NVIDIA shipped: shown by -v only
    needs_compat: bool = False
    driver: str | None = None
    wheel_variant: str = "cpu"
    arch_list: str | None = None  # TORCH_CUDA_ARCH_LIST for source-built code: the family's SM only
    ptx_only: bool = False  # the wheel reaches the SM only through PTX JIT
    stack: dict = field(default_factory=dict)  # what the profile's rules record for its stack's spec

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class Ctx:
    """What every rule sees: the combo, the facts, the verdict so far, and what earlier rules found."""

    combo: Combo
    facts: Facts
    verdict: Verdict
    stack: object = None  # the profile's facts (buildkit/profiles/<name>.py `Facts`)
    family: Family | None = None
    toolkit: Toolkit | None = None
    torch: TorchRelease | None = None
    variant: WheelVariant | None = None

    def error(self, rule: str, fld: str, message: str, source: str, fix: str) -> None:
        self.verdict.errors.append(Finding(rule, fld, message, source, fix))


# --- rule 6: every component is known --------------------------------------------------------------


def _known(ctx: Ctx) -> None:
    c, f = ctx.combo, ctx.facts
    checks: list[tuple[str, str | None, list[str], str]] = [
        ("family", c.family, list(f.families), f.source("instances", "ec2")),
        ("torch", c.torch, f.torch_versions, f.source("torch", "python")),
        ("python", c.python, f.python_versions, f.source("torch", "python")),
        ("os", c.os, list(f.systems), f.source("os", "ubuntu")),
    ]
    family = f.families.get(c.family)
    if family is not None and family.is_gpu:
        checks.append(("cuda", c.cuda, list(f.toolkits), f.source("cuda", "min-driver")))
    for fld, value, known, source in checks:
        if value is not None and value not in known:
            options = " or ".join(versions.nearest(value, known))
            ctx.error("known-version", fld, f"unknown {fld} '{value}'", source, options)
    if c.torch_cuda is not None and c.torch_cuda not in f.toolkits:
        options = " or ".join(versions.nearest(c.torch_cuda, f.toolkits))
        ctx.error("known-version", "torch_cuda", f"unknown torch_cuda '{c.torch_cuda}'",
                  f.source("torch", "variants"), options)
    ctx.family = family
    ctx.toolkit = f.toolkits.get(c.cuda) if c.cuda else None
    ctx.torch = f.torch_release(c.torch)


# --- the torch wheel variant must exist, and (rule 1) carry kernels for the family's SM ---------------


def _wheel(ctx: Ctx) -> None:
    c, f, fam, rel = ctx.combo, ctx.facts, ctx.family, ctx.torch
    if fam is None or rel is None:
        return
    wanted = "cpu" if not fam.is_gpu else variant_name(c.torch_cuda or c.cuda)
    ctx.verdict.wheel_variant = wanted
    variant = rel.variants.get(wanted)
    if variant is None:
        published = [v for v in rel.variants if v != "cpu"]
        fix = " or ".join(f"cuda {v_cuda}" for v_cuda in versions.nearest(
            c.torch_cuda or c.cuda or "", [name[2:-1] + "." + name[-1] for name in published]))
        ctx.error("wheel-variant", "torch_cuda" if c.torch_cuda else "cuda",
                  f"torch {c.torch} has no {wanted} wheel (published: {', '.join(published)})",
                  f.source("torch", "variants"), fix)
        return
    ctx.variant = variant
    if not fam.is_gpu:
        return
    entries = variant.archs.get(fam.arch)
    source = f.source("torch", variant.source)
    if entries is None:
        ctx.error("arch-in-wheel", "torch",
                  f"no {fam.arch} {wanted} wheel of torch {c.torch} is known to carry {sm_name(fam.sm)} kernels",
                  source, f"a source build of torch for {fam.arch}, or exclude {fam.name} from this line")
        return
    cov = coverage(entries, fam.sm)
    if not cov.covered:
        listed = ";".join(e.sm + ("+PTX" if e.ptx else "") for e in entries)
        ctx.error("arch-in-wheel", "torch",
                  f"torch {c.torch}+{wanted} ({fam.arch}) is built for {listed}, which has no kernels for "
                  f"{fam.name}'s {fam.gpu} ({sm_name(fam.sm)})", source, _wheel_fix(ctx))
        return
    if cov.ptx_only:
        ctx.verdict.ptx_only = True
        ctx.verdict.notes.append(f"torch runs on {sm_name(fam.sm)} only through {cov.via} JIT (slow first start)")
    if variant.source == "unverified":
        ctx.verdict.notes.append(f"the arch list of torch {c.torch}+{wanted} is unverified")


def _wheel_fix(ctx: Ctx) -> str:
    """Nearest torch/CUDA choice whose wheel covers the SM and whose nvcc can target it."""
    c, f, fam = ctx.combo, ctx.facts, ctx.family
    candidates: list[tuple[str, str]] = []
    for rel in f.torch.values():
        for var in rel.variants.values():
            cuda = var.cuda
            tk = f.toolkits.get(cuda) if cuda else None
            entries = var.archs.get(fam.arch)
            if tk and entries and coverage(entries, fam.sm).covered and fam.sm in tk.nvcc_archs:
                candidates.append((rel.versions[-1], cuda))
    same_torch = [cuda for t, cuda in candidates if versions.minor(t) == versions.minor(c.torch)]
    if same_torch:
        return " or ".join(f"cuda {cu}" for cu in versions.nearest(c.cuda or "", same_torch, 2))
    if candidates:
        best = versions.nearest(c.torch, [t for t, _ in candidates], 1)[0]
        cudas = [cu for t, cu in candidates if t == best]
        return f"torch {best} with cuda {cudas[-1]}, or exclude {fam.name} from this line"
    return f"excluding {fam.name} from this line"


# --- rule 2: the toolkit's nvcc can compile for the SM (when the engine builds CUDA code from source) ----


def _nvcc(ctx: Ctx) -> None:
    c, f, fam, tk = ctx.combo, ctx.facts, ctx.family, ctx.toolkit
    if fam is None or not fam.is_gpu or tk is None or not f.profiles.get(c.profile).COMPILES:
        return
    if fam.sm not in tk.nvcc_archs:
        able = [v for v, t in f.toolkits.items() if fam.sm in t.nvcc_archs]
        fix = " or ".join(f"cuda {v}" for v in versions.nearest(c.cuda, able, 2)) if able else \
            f"excluding {fam.name} from this line"
        ctx.error("arch-in-nvcc", "cuda", f"nvcc {tk.version} cannot compile for {fam.name}'s {sm_name(fam.sm)}",
                  f.source("cuda", "nvcc-archs"), fix)
        return
    ctx.verdict.arch_list = fam.sm


# --- rule 3: the host driver runs the toolkit, directly, through cuda-compat, or minor-version compat --


def _driver(ctx: Ctx) -> None:
    c, f, fam, tk = ctx.combo, ctx.facts, ctx.family, ctx.toolkit
    if fam is None or not fam.is_gpu or tk is None:
        return
    driver = c.driver or fam.default_driver
    ami_fix = _ami_fix(f, max(tk.min_driver, fam.min_driver or "0", key=versions.key))
    if driver is None:
        ctx.error("host-driver", "driver",
                  f"the default host driver of {fam.name} is not documented ({fam.unverified or 'unverified'})",
                  fam.sources.get("default_driver", ""), f"setting families.{fam.name}.inference_ami: {ami_fix}")
        return
    ctx.verdict.driver = driver
    if fam.min_driver and not versions.at_least(driver, fam.min_driver):
        ctx.error("host-driver", "driver",
                  f"{fam.gpu} needs driver >= {fam.min_driver}; host driver is {driver}",
                  fam.sources.get("min_driver", ""), f"setting families.{fam.name}.inference_ami: {ami_fix}")
        return
    if versions.at_least(driver, tk.min_driver):
        return
    branch = driver.split(".")[0]
    if branch in tk.compat_branches:
        ctx.verdict.needs_compat = True
        ctx.verdict.notes.append(f"needs cuda-compat on the default {driver} driver" if c.driver is None
                                 else f"needs cuda-compat on driver {driver}")
        return
    floor = f.minor_compat.get(tk.major)
    if floor and versions.at_least(driver, floor) and not ctx.verdict.ptx_only:
        ctx.verdict.notes.append(
            f"runs on driver {driver} through CUDA {tk.major}.x minor-version compatibility (no PTX JIT)")
        return
    runnable = [v for v, t in f.toolkits.items()
                if versions.at_least(driver, t.min_driver) or branch in t.compat_branches]
    cuda_fix = f"cuda {versions.nearest(tk.version, runnable, 1)[0]}, or " if runnable else ""
    ctx.error("host-driver", "cuda",
              f"CUDA {tk.patch} needs driver >= {tk.min_driver} and its cuda-compat accepts branches "
              f"{', '.join('R' + b for b in tk.compat_branches)}; {fam.name} runs driver {driver}",
              f"{f.source('cuda', 'min-driver')}; {f.source('cuda', 'compat-branches')}",
              f"{cuda_fix}setting families.{fam.name}.inference_ami: {ami_fix}")


def _ami_fix(facts: Facts, need: str) -> str:
    """The InferenceAmiVersion with the oldest driver that still meets `need`."""
    ok = sorted((versions.key(drv), name) for name, drv in facts.amis.items() if versions.at_least(drv, need))
    return ok[0][1] if ok else "an AMI whose driver is >= " + need


# --- rule 4: Python inside the OS and torch ranges (a profile adds its engine's) ---------------------


def _python(ctx: Ctx) -> None:
    """Requirements only: the OS must package the Python, and torch must publish a wheel for it."""
    c, f = ctx.combo, ctx.facts
    if c.python not in f.python_versions:
        return
    system = f.systems.get(c.os)
    if system and c.python not in system.pythons:
        others = [name for name, s in f.systems.items() if c.python in s.pythons]
        fix = f"python {system.python}" + (f", or os {others[0]}" if others else "")
        ctx.error("python-range", "python", f"{c.os} packages Python {', '.join(system.pythons)}, not {c.python}",
                  f.source("os", "ubuntu" if c.os.startswith("ubuntu") else "debian"), fix)
    if ctx.torch and not versions.in_range(c.python, ctx.torch.python):
        bounds = ctx.torch.python
        inside = [p for p in f.python_versions if versions.in_range(p, bounds)]
        ctx.error("python-range", "python", f"torch {c.torch} has wheels for Python {bounds[0]}-{bounds[1]}, "
                  f"not {c.python}", f.source("torch", "python"),
                  "python " + " or ".join(versions.nearest(c.python, inside, 2)))


# --- rule 5: an nvidia/cuda base image exists for (CUDA, Ubuntu) -------------------------------------


def _base(ctx: Ctx) -> None:
    c, f, tk = ctx.combo, ctx.facts, ctx.toolkit
    system = f.systems.get(c.os)
    if tk is None or system is None:
        return
    if c.custom_bases:
        carry = (f"they must carry CUDA {tk.version}'s nvcc and libraries" if f.profiles.get(c.profile).COMPILES else
                 f"the engine compiles nothing and torch's wheels bring CUDA {tk.version}'s libraries")
        ctx.verdict.notes.append(f"base images named by the matrix: not checked against nvidia/cuda tags; {carry}")
        return
    if system.ubuntu is None or system.ubuntu not in tk.ubuntu:
        oses = [name for name, s in f.systems.items() if s.ubuntu in tk.ubuntu]
        have = [v for v, t in f.toolkits.items() if system.ubuntu in t.ubuntu]
        fix = " or ".join([f"os {o}" for o in oses] + [f"cuda {v}" for v in versions.nearest(tk.version, have, 1)])
        ctx.error("base-image", "os", f"no nvidia/cuda:{tk.patch} image exists for {c.os} "
                  f"(only Ubuntu {', '.join(tk.ubuntu)})", f.source("cuda", "base-tags"), fix)


def _family_notes(ctx: Ctx) -> None:
    fam = ctx.family
    if fam and fam.legacy:
        ctx.verdict.notes.append(f"{fam.name} is legacy: {fam.legacy}")
    if fam and fam.default_driver_note and ctx.combo.driver is None:
        ctx.verdict.notes.append(f"{fam.name}'s default driver {fam.default_driver}: {fam.default_driver_note}")
    if fam and not fam.is_gpu and ctx.combo.cuda:
        ctx.verdict.notes.append("cpu images use the torch CPU build; cuda is ignored")


RULES: tuple[Callable[[Ctx], None], ...] = (_known, _wheel, _nvcc, _driver, _python, _base)
LAST: tuple[Callable[[Ctx], None], ...] = (_family_notes,)


def _engine_cpu(ctx: Ctx) -> None:
    profile, fam = ctx.facts.profiles.get(ctx.combo.profile), ctx.family
    if fam is not None and not fam.is_gpu and not profile.CPU:
        ctx.error("engine-cpu", "family", f"the {profile.NAME} engine has no CPU build",
                  profile.CPU_SOURCE, f"excluding {fam.name} from this line")


def evaluate(combo: Combo, facts: Facts) -> Verdict:
    """The core's rules, then the profile's (buildkit/profiles/<engine>.py RULES), on one context."""
    profile = facts.profiles.get(combo.profile)
    ctx = Ctx(combo=combo, facts=facts, verdict=Verdict(), stack=facts.stacks[combo.profile])
    for rule in (*RULES, _engine_cpu, *profile.RULES, *LAST):
        rule(ctx)
    return ctx.verdict


def host_driver(facts: Facts, driver: str | None, inference_ami: str | None) -> str | None:
    """The host driver `lmi check` checks against: --driver as given (digits and dots), or the driver of the
    SageMaker InferenceAmiVersion named; None: the family's default."""
    if driver is not None and not re.fullmatch(r"[0-9]+(\.[0-9]+)*", driver):
        raise UserError(f"--driver {driver!r}: not a driver version; write it as digits and dots, e.g. 535.54.03")
    if inference_ami:
        if inference_ami not in facts.amis:
            raise UserError(f"--inference-ami {inference_ami!r}: unknown; "
                            f"{versions.did_you_mean(inference_ami, facts.amis)}")
        return facts.amis[inference_ami]
    return driver


def verdict_json(combo: Combo, verdict: Verdict) -> dict:
    """`lmi check --json`: the combination as checked and what the rules said of it."""
    combination = {"family": combo.family, "engine": combo.profile, **dict(combo.parts), "torch": combo.torch,
                   "cuda": combo.cuda, "python": combo.python, "os": combo.os, "torch_cuda": combo.torch_cuda,
                   "driver": combo.driver}
    return {
        "valid": verdict.ok, "combination": {k: v for k, v in combination.items() if v is not None},
        "errors": [{"rule": e.rule, "message": e.message, "source": e.source, "try": e.fix} for e in verdict.errors],
        "notes": verdict.notes, "observations": verdict.observations,
        "cuda_compat": verdict.needs_compat, "host_driver": verdict.driver,
        "torch_variant": verdict.wheel_variant, "torch_cuda_arch_list": verdict.arch_list,
    }


def summary(combo: Combo, verdict: Verdict, facts: Facts) -> str:
    """`lmi check`'s one line for a valid combination (its notes in parentheses)."""
    profile = facts.profiles.get(combo.profile)
    cuda = f"CUDA {facts.toolkits[combo.cuda].patch}" if combo.cuda else "CPU"
    parts = ", ".join(f"{profile.TITLES[k]} {combo.part(k)}" for k in profile.COMPONENTS)
    line = (f"ok: {combo.family} can run {parts}, "
            f"torch {combo.torch}+{verdict.wheel_variant}, {cuda}, Python {combo.python}, {combo.os}")
    return line + (f" ({'; '.join(verdict.notes)})" if verdict.notes else "")
