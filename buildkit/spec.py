"""Validated image specs: everything a build needs to know about one image, derived from the matrix
and the facts. Nothing here is written by hand; change matrix.yaml or buildkit/data instead."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from . import versions
from .errors import UserError, where
from .facts import Facts, Family, OperatingSystem, sm_name
from .interface import Profile
from .matrix import Image, Matrix
from .rules import evaluate

LABEL_PREFIX = "io.lmi"
# Two kinds of immutable tags: the content-hash tag (hash-<16 hex>, the dedup key) and the revision tags
# (<tuple>-r<N>: every publish of new content for a component tuple gets the next N). Every other tag is an
# alias that moves: the bare tuple tag (to the newest revision) and each profile's aliases. ECR enforces
# exactly this with MUTABLE_WITH_EXCLUSION on these filters (its wildcard has `*` only, so no filter could
# single out the bare tuple against its own revisions: the immutable ones are named instead).
IMMUTABLE_FILTERS = ("hash-*", "*-r*")
REVISION = re.compile(r"-r([1-9][0-9]{0,8})")


def is_alias(tag: str) -> bool:
    return not any(fnmatch.fnmatchcase(tag, pattern) for pattern in IMMUTABLE_FILTERS)


def hash_tag(content_hash: str) -> str:
    return f"hash-{content_hash[:16]}"


def revision_tag(tag: str, revision: int) -> str:
    """The immutable tag of revision N of the tuple `tag`: <tag>-r<N>."""
    return f"{tag}-r{revision}"


def revisions(tags: Iterable[str], tag: str) -> list[int]:
    """The revisions of the tuple `tag` among `tags` (a registry's tag list), newest first."""
    found = (REVISION.fullmatch(t[len(tag):]) for t in tags if t.startswith(tag + "-r"))
    return sorted((int(m.group(1)) for m in found if m), reverse=True)

SAGEMAKER_CUDA_LABEL = "com.amazonaws.sagemaker.inference.cuda.verified_versions"
SAGEMAKER_BIND_LABEL = "com.amazonaws.sagemaker.capabilities.accept-bind-to-port"


@dataclass(frozen=True)
class ImageSpec:
    id: str
    line: str
    family: Family
    repository: str
    stack: object  # its serving stack: the profile's spec (buildkit/profiles/<name>.py Spec), its versions and builds
    torch: str
    cuda: str | None  # toolkit major.minor; None for CPU images
    cuda_patch: str | None
    python: str
    os: OperatingSystem
    libraries: dict[str, str]
    pip: tuple[str, ...]
    wheel_variant: str  # cu121 / cu128 / cpu
    torch_requirement: str  # the pip requirement that selects the right wheel
    torch_index: str | None  # extra index for variants that PyPI does not carry; None: PyPI's default
    runtime_image: str
    arch_list: str | None  # TORCH_CUDA_ARCH_LIST where the engine compiles CUDA code: the family's SM only
    needs_compat: bool
    driver: str | None
    inference_ami: str | None
    host_cuda: str | None  # the CUDA version of the pinned InferenceAmiVersion's driver (SageMaker's label)
    notes: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    checks: tuple[dict, ...] = ()  # user smoke checks from the matrix
    size_budget_gb: float = 20.0
    tag_suffix: str = ""
    toolkit_compat_pin: str | None = None
    wheel_platform: str = "x86_64-manylinux_2_17"  # the wheels that run on the image's OS and arch
    # its profile (buildkit/interface.py Profile), from the registry the facts were loaded with
    profile: Profile = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    @property
    def versions(self) -> dict[str, str]:
        """The engine's versioned components, by matrix key (e.g. what `lmi uri` filters on)."""
        return dict(self.stack.versions)

    @property
    def tag(self) -> str:
        """The immutable full tag: the engine's part, then torch, its variant, Python, OS and family."""
        py = self.python.replace(".", "")
        return (f"{self.profile.tag(self)}-torch{self.torch}-{self.wheel_variant}-py{py}-"
                f"{self.os.name}-{self.family.name}" + (f"-{self.tag_suffix}" if self.tag_suffix else ""))

    @property
    def compat_pin(self) -> str | None:
        return self.toolkit_compat_pin if self.needs_compat else None

    @property
    def compat_package(self) -> str | None:
        return f"cuda-compat-{self.cuda.replace('.', '-')}" if self.cuda else None

    @property
    def bases(self) -> tuple[str, ...]:
        return (*self.stack.bases, self.runtime_image)

    @property
    def labels(self) -> dict[str, str]:
        fam = self.family
        what = f"{fam.name} ({fam.gpu}, {sm_name(fam.sm)})" if fam.is_gpu else "CPU instances"
        components = {
            "id": self.id, "line": self.line, "family": fam.name, "arch": fam.arch,
            "sm": fam.sm or "none", "cuda": self.cuda_patch or "none", "cuda-compat": str(self.needs_compat).lower(),
            "torch": self.torch, "torch-variant": self.wheel_variant, "python": self.python, "os": self.os.name,
            **self.profile.labels(self),
            # the SageMaker host driver the rules checked this image against (the family's default, or the
            # matrix's driver / inference_ami), which it runs on natively or through cuda-compat (above)
            "host-driver": self.driver or "none",
            "inference-ami": self.inference_ami or ("default" if fam.is_gpu else "none"),
            **self.libraries,
        }
        labels = {
            "org.opencontainers.image.title": self.repository,
            "org.opencontainers.image.description": (
                f"{self.profile.description(self)} and PyTorch {self.torch} ({self.wheel_variant}) for {what}"),
            "org.opencontainers.image.version": self.tag,
            "org.opencontainers.image.licenses": "Apache-2.0",
            "org.opencontainers.image.base.name": self.runtime_image,
            SAGEMAKER_BIND_LABEL: "true",
            **{f"{LABEL_PREFIX}.{k}": v for k, v in components.items()},
        }
        if self.host_cuda:  # LMI's label for the driver it was verified on (instances.yaml, sm-cuda-label)
            labels[SAGEMAKER_CUDA_LABEL] = self.host_cuda
        return dict(sorted(labels.items()))

    def claims(self) -> dict:
        """What the image says it is, as written into its build context (image.json) for smoke tests."""
        engine_versions, engine_claims = self.profile.claims(self)
        return {
            "id": self.id, "repository": self.repository, "tag": self.tag, "family": self.family.name,
            "sm": self.family.sm, "arch": self.family.arch, "gpu": self.family.gpu,
            "versions": {**engine_versions, "torch": self.torch, "cuda": self.cuda, "python": self.python,
                         **self.libraries},
            "torch_variant": self.wheel_variant, "cuda_compat": self.needs_compat,
            "host_driver": self.driver, "inference_ami": self.inference_ami,
            **engine_claims,
            "labels": self.labels,
        }


def resolve(matrix: Matrix, facts: Facts) -> list[ImageSpec]:
    """Validate every image of the matrix and turn it into a spec. Raises UserError with one line per
    problem, `matrix.yaml:LINE: image <id>: <what> (<rule>, <source>); try <fix>`."""
    problems, specs = [], []
    first: dict[str, ImageSpec] = {}
    for image in matrix.images:
        verdict = evaluate(image.combo, facts)
        if verdict.errors:
            problems.extend(f"{where(matrix.path, image.line_of(e.field))}: image {image.id}: {e.text()}"
                            for e in verdict.errors)
            continue
        spec = _spec(image, matrix.repository, facts, verdict)
        specs.append(spec)
        if not is_alias(spec.tag):
            problems.append(f"{where(matrix.path, image.line_of('tag_suffix'))}: image {spec.id}: its tag {spec.tag} "
                            f"matches an immutable-tag pattern ({', '.join(IMMUTABLE_FILTERS)}: a part starting "
                            "with r reads as a revision), so it could not move to a new revision; choose another "
                            "tag_suffix")
        if spec.tag in first:
            problems.append(f"{where(matrix.path, image.lines['family'])}: image {spec.id}: its immutable tag "
                            f"{spec.tag} is also {first[spec.tag].id}'s; tell the lines apart with tag_suffix")
        first.setdefault(spec.tag, spec)
    if problems:
        raise UserError(*problems)
    return with_aliases(specs)


def _spec(image: Image, repository: str, facts: Facts, verdict) -> ImageSpec:
    combo, family = image.combo, facts.families[image.family]
    profile = facts.profiles.get(combo.profile)
    system = facts.systems[combo.os]
    toolkit = facts.toolkits.get(combo.cuda) if family.is_gpu else None
    release = facts.torch_release(combo.torch)
    variant = verdict.wheel_variant
    on_pypi = release.pypi_variant == variant
    # `base`, not `runtime`: torch's wheels bring their own CUDA libraries (bench/results.md).
    runtime = system.image if not toolkit else (
        image.bases["runtime"] if image.bases else toolkit.base_image("base", system.ubuntu))
    return ImageSpec(
        id=image.id, line=image.line, family=family, repository=repository,
        stack=profile.stack_spec(image, facts, facts.stacks[combo.profile], verdict, toolkit, system),
        torch=combo.torch,
        cuda=toolkit.version if toolkit else None, cuda_patch=toolkit.patch if toolkit else None,
        python=combo.python, os=system, libraries=dict(image.libraries), pip=image.pip,
        wheel_variant=variant,
        torch_requirement=f"torch=={combo.torch}" if on_pypi else f"torch=={combo.torch}+{variant}",
        torch_index=None if on_pypi else f"{facts.torch_wheel_index}/{variant}",
        runtime_image=runtime,
        arch_list=verdict.arch_list, needs_compat=verdict.needs_compat, driver=verdict.driver,
        inference_ami=image.inference_ami, host_cuda=facts.ami_cuda.get(image.inference_ami or ""),
        notes=tuple(verdict.notes),
        checks=image.checks, size_budget_gb=image.size_budget_gb, tag_suffix=image.tag_suffix,
        toolkit_compat_pin=toolkit.compat_pin if toolkit else None,
        wheel_platform=system.wheel_platform(family.arch), profile=profile,
    )


def select(specs: list[ImageSpec], families: Sequence[str], patterns: Sequence[str]) -> list[ImageSpec]:
    """Images whose family is one of `families` (if any) and whose id matches a glob (if any)."""
    known = {s.family.name for s in specs}
    for name in families:
        if name not in known:
            raise UserError(f"--instance {name}: no image of the matrix is for that family; "
                            f"{versions.did_you_mean(name, sorted(known))}")
    chosen = [s for s in specs if (not families or s.family.name in families)
              and (not patterns or any(fnmatch.fnmatchcase(s.id, p) for p in patterns))]
    if not chosen:
        wanted = " ".join([*(f"--instance {i}" for i in families), *patterns])
        raise UserError(f"no image matches {wanted}; `lmi matrix` lists the image ids")
    return chosen


def _newness(spec: ImageSpec) -> tuple:
    return (spec.stack.name, spec.profile.newness(spec), versions.key(spec.torch), versions.key(spec.cuda or "0"),
            spec.id)


def with_aliases(specs: Iterable[ImageSpec]) -> list[ImageSpec]:
    """Floating aliases, docker-library style: each alias belongs to the newest image that claims it."""
    specs = list(specs)
    owner: dict[str, ImageSpec] = {}
    for spec in sorted(specs, key=_newness):
        fam = spec.family.name + (f"-{spec.tag_suffix}" if spec.tag_suffix else "")
        for alias in spec.profile.aliases(spec, fam):
            owner[alias] = spec  # later (newer) specs overwrite older claims
    return [replace(s, aliases=tuple(sorted(a for a, o in owner.items() if o.id == s.id))) for s in specs]


def content_hash(files: dict[str, bytes], build_args: dict[str, str], bases: Iterable[str],
                 modes: dict[str, int] | None = None) -> str:
    """sha256 over what an image is made of: the rendered context (paths, bytes and modes), the build
    arguments written out and the base image references (render.plan says which). Same input, same hash;
    any change, a new one."""
    doc = {
        "files": {p: hashlib.sha256(b).hexdigest() for p, b in sorted(files.items())},
        "modes": {p: m for p, m in sorted((modes or {}).items())},
        "args": dict(sorted(build_args.items())),
        "bases": list(bases),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class PlannedImage:
    spec: ImageSpec
    content_hash: str
    build_args: dict[str, str] = field(default_factory=dict)  # everything the build is given
    content_args: dict[str, str] = field(default_factory=dict)  # the build args the hash covers
    content_bases: tuple[str, ...] = ()  # the base images the hash covers (by digest where pinned)

    @property
    def hash_tag(self) -> str:
        return hash_tag(self.content_hash)

    @property
    def tags(self) -> tuple[str, ...]:
        """The local tags of a build: the bare tuple tag, the content-hash tag, then the floating aliases.
        The revision tag is given at push time (the next free N in the target registry)."""
        return (self.spec.tag, self.hash_tag, *self.spec.aliases)

    def to_json(self) -> dict:
        s = self.spec
        return {"id": s.id, "family": s.family.name, "repository": s.repository, "tag": s.tag,
                "hash_tag": self.hash_tag, "aliases": list(s.aliases), "content_hash": self.content_hash,
                "bases": list(s.bases), "torch_cuda_arch_list": s.arch_list, "cuda_compat": s.needs_compat,
                "build_args": self.build_args, "labels": s.labels, "notes": list(s.notes)}
