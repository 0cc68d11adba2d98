"""The version matrix (matrix.yaml): schema, parsing with file:line errors, and expansion of release
lines x instance families into images.

    schema: 1
    repository: lmi-inference          # image repository name (registry comes later)
    families:                          # the fleet; per-family host-driver overrides
      g5: {}
      g6e: {inference_ami: al2-ami-sagemaker-inference-gpu-3-1}
    lines:
      <name>:
        engine: <profile>               # the line's engine profile (buildkit/profiles); its keys follow
        torch: "2.9.1"
        ...
        exclude: {p6-b200: "why"}       # every family of the fleet not excluded is built
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from . import versions
from .errors import UserError, where
from .facts import Facts
from .interface import Profile, Registry
from .rules import Combo
from .yamlio import LocDict, LocList, load_file

SCHEMA_VERSION = 1
TOP_KEYS = ("schema", "repository", "templates", "output", "base_mirror", "build_args", "size_budget_gb", "families",
            "lines")
CHECK_KEYS = ("name", "command", "expect", "exit_code", "file", "exists", "contains", "executable")
# Size budgets when the matrix sets none: the LMI GPU images AWS ships are 10-20 GB; CPU images far less.
DEFAULT_BUDGET_GB = {"gpu": 20.0, "cpu": 6.0}
FAMILY_KEYS = ("driver", "inference_ami")
COMPONENTS = ("torch", "cuda", "python", "os")  # the core's; a line's profile adds its own and its libraries
OPTIONAL = ("torch_cuda", "pip")
LINE_KEYS = ("engine", *COMPONENTS, *OPTIONAL, "include", "exclude", "overrides", "checks", "size_budget_gb",
             "tag_suffix", "bases", "inference_ami")
# An image reference: [host[:port]/]path[:tag][@sha256:digest], matched whole.
IMAGE_REF = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]{1,5})?(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
                       r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?")


def _keys(profile: Profile) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(versioned keys, every line key, override keys) of a line of `profile`."""
    versioned = (*profile.COMPONENTS, *COMPONENTS, *profile.LIBRARIES)
    return (versioned, (*LINE_KEYS, *profile.COMPONENTS, *profile.LIBRARIES, *profile.OPTIONS),
            (*versioned, *OPTIONAL))
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")  # always fullmatch: `$` would also match before a trailing newline
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A registry prefix (a base mirror, the --registry images are named for): HOST[:PORT] then lowercase path
# components, as Docker's reference grammar has them; a trailing slash is allowed. Always fullmatch.
PREFIX = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                    r"(?::[0-9]{1,5})?(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*/?")


@dataclass(frozen=True)
class Image:
    """One expanded (line, family) pair, before validation."""

    id: str
    line: str
    family: str
    combo: Combo
    libraries: dict[str, str]
    pip: tuple[str, ...]
    inference_ami: str | None
    lines: dict[str, int] = field(compare=False)  # field -> matrix line it came from
    checks: tuple[dict, ...] = ()  # user smoke checks of the line
    size_budget_gb: float = 0.0
    tag_suffix: str = ""  # tells apart lines whose versioned components are all the same
    bases: dict[str, str] | None = None  # the profile's BASES given by the matrix instead of nvidia/cuda

    def line_of(self, fld: str) -> int:
        return self.lines.get(fld) or self.lines["family"]


@dataclass(frozen=True)
class Matrix:
    path: Path
    repository: str
    templates: Path
    output: Path
    images: tuple[Image, ...]
    base_mirror: str | None = None  # prefix for base images (a pull-through cache, a local mirror)
    build_args: dict[str, str] = field(default_factory=dict)  # extra build args for every image


class _Problems:
    """Collects every problem of a file so the user sees them all at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []

    def add(self, line: int | None, message: str) -> None:
        self.lines.append(f"{where(self.path, line)}: {message}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise UserError(*self.lines)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "empty" if value is None else "a string"


def _check_keys(node: LocDict, allowed: tuple[str, ...], what: str, p: _Problems) -> None:
    for key in node:
        if key not in allowed:
            p.add(node.line_of(key), f"unknown key '{key}' in {what}; {versions.did_you_mean(key, allowed)}")


def _string(node: LocDict, key: str, what: str, p: _Problems, version: bool = True) -> str | None:
    value = node.get(key)
    line = node.line_of(key)
    if isinstance(value, str) and _CONTROL.search(value):  # never stripped away: refused, as in argv or a label
        p.add(line, f"{what}: {key} {_shown(value)} holds a control character (a line break?); remove it")
        return None
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and version:
        raw = node.raw.get(key, str(value))
        p.add(line, f"{what}: {key} is the number {raw}, which YAML may change (12.10 becomes 12.1); "
                    f"write it as a string: {key}: \"{raw}\"")
    else:
        p.add(line, f"{what}: {key} must be a non-empty string, got {_kind(value)}")
    return None


def _setting(doc: LocDict, key: str, default: str, p: _Problems) -> str:
    if key not in doc:
        return default
    return _string(doc, key, "the matrix", p, version=False) or default


def _mapping(value: Any, line: int, what: str, p: _Problems, example: str) -> LocDict | None:
    if isinstance(value, LocDict):
        return value
    if value is None:
        return None
    p.add(getattr(value, "line", None) or line, f"{what} must be a mapping, got {_kind(value)}; e.g. {example}")
    return None


def load(path: Path, facts: Facts) -> Matrix:
    """Read, check and expand a matrix file. Raises UserError listing every problem as file:line."""
    doc = load_file(path)
    p = _Problems(path)
    if doc is None:
        raise UserError(f"{path}: the file is empty; start from the matrix reference in docs/matrix.md")
    if not isinstance(doc, LocDict):
        raise UserError(f"{where(path, getattr(doc, 'line', 1))}: the matrix must be a mapping with keys "
                        f"{', '.join(TOP_KEYS)}, got {_kind(doc)}")
    _check_keys(doc, TOP_KEYS, "the matrix", p)
    if doc.get("schema") != SCHEMA_VERSION:
        p.add(doc.line_of("schema") if "schema" in doc else 1,
              f"schema must be {SCHEMA_VERSION}, got {_scalar(doc.get('schema'))}; add 'schema: {SCHEMA_VERSION}' "
              "at the top")
    repository = "lmi-inference"
    if "repository" in doc:
        repository = _string(doc, "repository", "the matrix", p, version=False) or repository
        if not re.fullmatch(r"[a-z0-9]+([._/-][a-z0-9]+)*", repository):
            p.add(doc.line_of("repository"), f"repository '{repository}' is not a valid image repository name; "
                                             "use lowercase letters, digits and . _ - /")
    # Paths in the matrix are relative to the matrix file, so a test matrix can reuse ../templates.
    templates = path.parent / _setting(doc, "templates", "templates", p)
    output = path.parent / _setting(doc, "output", "images", p)
    problem = output_problem(output, path.parent, outside_ok=False)
    if problem:
        p.add(doc.line_of("output") if "output" in doc else 1, problem)

    base_mirror = _string(doc, "base_mirror", "the matrix", p, version=False) if "base_mirror" in doc else None
    if base_mirror and prefix_problem(base_mirror):
        p.add(doc.line_of("base_mirror"), f"base_mirror {_shown(base_mirror)} {prefix_problem(base_mirror)}")
    budget = _budget(doc, "the matrix", p)
    build_args = _build_args(doc, p)
    fleet = _families(doc, facts, p)
    lines = _mapping(doc.get("lines"), doc.line_of("lines"), "lines", p,
                     "lines: {<name>: {engine: <profile>, torch: \"2.9.1\", ...}} (docs/matrix.md)")
    if "lines" not in doc:
        p.add(1, "the matrix has no 'lines'; add at least one release line")
    elif lines is not None and not lines:
        p.add(doc.line_of("lines"), "lines is empty; add at least one release line")
    p.raise_if_any()

    images: list[Image] = []
    for name, body in (lines or {}).items():
        images.extend(_line(name, body, lines.line_of(name), fleet, p, budget, facts.amis, facts.profiles))
    seen: dict[str, Image] = {}
    for image in images:
        if image.id in seen:
            p.add(image.lines["family"], f"duplicate image id '{image.id}' (also at line "
                                         f"{seen[image.id].lines['family']}); list each family once per line")
        seen[image.id] = image
    p.raise_if_any()
    return Matrix(path=path, repository=repository, templates=templates, output=output, images=tuple(images),
                  base_mirror=base_mirror, build_args=build_args)


def output_problem(out: Path, matrix_dir: Path, outside_ok: bool) -> str | None:
    """Why `out` cannot be an output directory, or None. Rendering prunes what it owns there, so the
    matrix's own directory and its parents are never outputs; a matrix's `output` stays inside the
    matrix's directory (elsewhere only on purpose, with `lmi render --out DIR`)."""
    out_abs, base = out.resolve(), matrix_dir.resolve()
    if out_abs == base or out_abs in base.parents:
        return (f"output '{out}' is the matrix's own directory or a parent of it, where the toolkit does not "
                "own every file; use a directory of its own, e.g. 'output: images'")
    if not outside_ok and base not in out_abs.parents:
        return (f"output '{out}' lies outside the matrix's directory ({base}); keep it inside, e.g. "
                "'output: images', or render elsewhere on purpose with `lmi render --out DIR`")
    return None


def _build_args(doc: LocDict, p: _Problems) -> dict[str, str]:
    node = _mapping(doc.get("build_args"), doc.line_of("build_args"), "build_args", p,
                    "build_args: {PIP_INDEX_URL: \"https://...\"}") or {}
    args = {}
    for key, value in node.items():
        problem = build_arg_problem(str(key), value if isinstance(value, str) else "")
        if problem:
            p.add(node.line_of(key), f"build_args: {problem}")
        elif not isinstance(value, str):
            p.add(node.line_of(key), f"build_args: {key} must be a string, got {_kind(value)}; quote it")
        else:
            args[key] = value
    return args


def build_arg_problem(key: str, value: str) -> str | None:
    """Why KEY=VALUE cannot be a build argument (it reaches argv and the content hash), or None."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{_shown(key)} is not a build argument name; use letters, digits and _ (e.g. MAX_JOBS)"
    if _CONTROL.search(value):
        return f"{key} value {_shown(value)} holds a control character (a line break?); remove it"
    if len(value) > 4096:
        return f"{key} value is longer than 4096 characters"
    return None


def prefix_problem(value: str) -> str | None:
    """Why `value` is not a registry prefix (HOST[:PORT][/PATH], or a local name such as lmi-local), or None."""
    if _CONTROL.search(value):
        return "holds a control character (a line break?); remove it"
    if not PREFIX.fullmatch(value):
        return ("is not a registry prefix; write HOST[:PORT][/PATH] in lowercase, e.g. "
                "123456789012.dkr.ecr.us-west-2.amazonaws.com/hub or 127.0.0.1:5000/mirror")
    return None


@dataclass(frozen=True)
class _Fleet:
    names: tuple[str, ...]
    line: dict[str, int]
    driver: dict[str, tuple[str, int]]  # family -> (driver, line)
    ami: dict[str, str]


def _families(doc: LocDict, facts: Facts, p: _Problems) -> _Fleet:
    fleet = _Fleet((), {}, {}, {})
    node = _mapping(doc.get("families"), doc.line_of("families"), "families", p, "families: {g5: {}, p5: {}}")
    if "families" not in doc:
        p.add(1, "the matrix has no 'families'; list the instance families to build for")
    if node is None:
        return fleet
    names = []
    for name, settings in node.items():
        line = node.line_of(name)
        if name not in facts.families:
            p.add(line, f"unknown instance family '{name}'; {versions.did_you_mean(name, facts.families)}")
            continue
        names.append(name)
        fleet.line[name] = line
        settings = _mapping(settings, line, f"family '{name}'", p, "g6e: {inference_ami: ...}")
        if not settings:
            continue
        _check_keys(settings, FAMILY_KEYS, f"family '{name}'", p)
        if "driver" in settings and "inference_ami" in settings:
            p.add(line, f"family '{name}' sets both driver and inference_ami; keep one")
        elif "driver" in settings:
            drv = _string(settings, "driver", f"family '{name}'", p)
            if drv and not versions.is_numeric(drv):
                p.add(settings.line_of("driver"), f"family '{name}': driver '{drv}' is not a driver version "
                                                  "such as \"535.54.03\"")
            elif drv:
                fleet.driver[name] = (drv, settings.line_of("driver"))
        elif "inference_ami" in settings:
            ami = _ami(settings, f"family '{name}'", facts.amis, p)
            if ami:
                fleet.ami[name] = ami
                fleet.driver[name] = (facts.amis[ami], settings.line_of("inference_ami"))
    return _Fleet(tuple(names), fleet.line, fleet.driver, fleet.ami)


def _ami(node: LocDict, what: str, amis: dict[str, str], p: _Problems) -> str | None:
    """node's inference_ami when the facts know it (else a problem, and None)."""
    ami = _string(node, "inference_ami", what, p, version=False)
    if ami and ami not in amis:
        p.add(node.line_of("inference_ami"), f"{what}: unknown inference_ami '{ami}'; "
                                             f"{versions.did_you_mean(ami, amis)}")
        return None
    return ami


def _budget(node: LocDict, what: str, p: _Problems) -> float | None:
    if "size_budget_gb" not in node:
        return None
    value = node["size_budget_gb"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        p.add(node.line_of("size_budget_gb"), f"{what}: size_budget_gb must be a positive number of GB, "
                                              f"got {_kind(value)}")
        return None
    return float(value)


def _checks(node: LocDict, what: str, p: _Problems) -> tuple[dict, ...]:
    """User smoke checks: `command` (+ `expect` regex, `exit_code`) or `file` (+ `exists`, `contains`)."""
    if "checks" not in node:
        return ()
    items = node["checks"]
    if not isinstance(items, LocList):
        p.add(node.line_of("checks"), f"{what}: checks must be a list, got {_kind(items)}")
        return ()
    out = []
    for i, item in enumerate(items):
        line = items.line_of(i)
        if not isinstance(item, LocDict) or ("command" in item) == ("file" in item):
            p.add(line, f"{what}: each check is a mapping with either 'command' or 'file', e.g. "
                        "{command: \"java -version\", expect: \"17\"}")
            continue
        _check_keys(item, CHECK_KEYS, f"{what}: check", p)
        for key in ("expect", "contains"):
            if key in item:
                try:
                    re.compile(str(item[key]))
                except re.error as exc:
                    p.add(item.line_of(key), f"{what}: check {key} is not a valid regular expression: {exc}")
        kind = "command" if "command" in item else "file"
        types = {"name": str, "command": str, "expect": str, "file": str, "contains": str, "exists": bool,
                 "executable": bool, "exit_code": int}
        wrong = [k for k, t in types.items() if k in item and (not isinstance(item[k], t) or
                 (t is int and isinstance(item[k], bool)) or (t is str and ("\x00" in item[k] or len(item[k]) > 4096)))]
        if wrong:
            p.add(item.line_of(wrong[0]), f"{what}: check {wrong[0]} must be {types[wrong[0]].__name__}, "
                                          f"got {_kind(item[wrong[0]])}")
            continue
        if "name" in item and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", item["name"]):
            p.add(item.line_of("name"), f"{what}: check name {_shown(item['name'])} must be letters, digits, . _ -")
            continue
        record = {"name": item.get("name") or f"user-{i + 1}-{kind}", "tier": "cpu", "kind": kind}
        record.update({("path" if k == "file" else k): v for k, v in item.items() if k != "name"})
        out.append(record)
    return tuple(out)


def _line(name: str, body: Any, line: int, fleet: _Fleet, p: _Problems, budget: float | None,
          amis: dict[str, str], profiles: Registry) -> list[Image]:
    what = f"line '{name}'"
    if not _NAME.fullmatch(name):
        p.add(line, f"{what}: line names are lowercase letters, digits and . _ - (they become image ids)")
        return []
    body = _mapping(body, line, what, p, f"{name}: {{engine: <profile>, torch: \"2.9.1\", ...}} (docs/matrix.md)")
    if body is None:
        if not p.lines:
            p.add(line, f"{what} is empty; give its engine and components (see docs/matrix.md)")
        return []
    engine = _string(body, "engine", what, p, version=False) if "engine" in body else profiles.default
    if engine not in profiles:
        if engine:
            p.add(body.line_of("engine"), f"{what}: engine '{engine}' is not one of {', '.join(profiles)}; "
                                          f"{versions.did_you_mean(engine, list(profiles))}")
        return []
    profile = profiles.get(engine)
    versioned, line_keys, override_keys = _keys(profile)
    _check_keys(body, line_keys, what, p)
    for key in versioned:
        if key not in body and key != "cuda":
            p.add(line, f"{what} is missing '{key}'; add {key}: \"<version>\"")
    values = {k: _string(body, k, what, p) for k in (*versioned, "torch_cuda") if k in body}
    for key, value in values.items():
        problem = value and key != "os" and version_problem(value)
        if problem:
            p.add(body.line_of(key), f"{what}: {key} {_shown(value)} {problem}; write a version such as \"4.39.0\"")
        elif value and key == "os" and not _NAME.fullmatch(value):
            p.add(body.line_of(key), f"{what}: os {_shown(value)} is not an OS name such as ubuntu22.04")
    pip = _pins(body, what, p)
    checks = _checks(body, what, p)
    line_budget = _budget(body, what, p) or budget
    suffix = _string(body, "tag_suffix", what, p, version=False) if "tag_suffix" in body else ""
    if suffix and not re.fullmatch(r"[a-z0-9][a-z0-9.]{0,30}", suffix):
        p.add(body.line_of("tag_suffix"), f"{what}: tag_suffix {_shown(suffix)} must be lowercase letters, digits "
                                          "and dots")

    members = list(fleet.names)
    if "include" in body:
        include = body["include"]
        if not isinstance(include, LocList) or not all(isinstance(x, str) for x in include):
            p.add(body.line_of("include"), f"{what}: include must be a list of family names, got {_kind(include)}")
        else:
            members = []
            for i, fam in enumerate(include):
                if fam not in fleet.names:
                    p.add(include.line_of(i), f"{what}: include names '{fam}', which is not in families; "
                                              f"{versions.did_you_mean(fam, fleet.names)}")
                else:
                    members.append((fam, include.line_of(i)))
    members = [m if isinstance(m, tuple) else (m, fleet.line[m]) for m in members]
    exclude = _mapping(body.get("exclude"), body.line_of("exclude"), f"{what}: exclude", p,
                       "exclude: {p3: \"why p3 cannot take this line\"}") or {}
    for fam, reason in exclude.items():
        if fam not in fleet.names:
            p.add(exclude.line_of(fam), f"{what}: exclude names '{fam}', which is not in families; "
                                        f"{versions.did_you_mean(fam, fleet.names)}")
        if not isinstance(reason, str) or not reason.strip():
            p.add(exclude.line_of(fam), f"{what}: exclude.{fam} must say why, as a string")
    members = [(fam, ln) for fam, ln in members if fam not in exclude]

    overrides = _mapping(body.get("overrides"), body.line_of("overrides"), f"{what}: overrides", p,
                         "overrides: {p3: {torch: \"2.8.0\"}}") or {}
    member_names = [fam for fam, _ in members]
    for fam, ov in overrides.items():
        if fam not in member_names:
            p.add(overrides.line_of(fam), f"{what}: overrides names '{fam}', which this line does not build; "
                                          f"{versions.did_you_mean(fam, member_names)}")
        ov = _mapping(ov, overrides.line_of(fam), f"{what}: overrides.{fam}", p, "{torch: \"2.8.0\"}")
        if ov:
            _check_keys(ov, override_keys, f"{what}: overrides.{fam}", p)
    bases = _bases(body, profile.BASES, what, p)
    # The InferenceAmiVersion this line's endpoints use where the family pins none (a family's own pin, which
    # its hardware needs, wins): e.g. a line on a CUDA whose driver no family's default runs.
    line_ami = _ami(body, what, amis, p) if "inference_ami" in body else None
    options = {}
    for key, allowed in profile.OPTIONS.items():
        value = _string(body, key, what, p, version=False) if key in body else None
        if value and value not in allowed:
            p.add(body.line_of(key), f"{what}: {key} '{value}' is not one of {', '.join(allowed)}; "
                                     f"{profile.OPTION_HELP.get(key, '')}".rstrip("; "))
        elif value:
            options[key] = value
    if "cuda" not in body and any(fam != "cpu" for fam, _ in members):
        p.add(line, f"{what} builds GPU families but has no 'cuda'; add cuda: \"<version>\" (or build only cpu)")
    if p.lines:
        return []

    images = []
    for fam, fam_line in members:
        ov = overrides.get(fam) or LocDict()
        vals = dict(values)
        origin = {k: body.line_of(k) for k in values}
        for key in ov:
            vals[key] = _string(ov, key, f"{what}: overrides.{fam}", p) if key != "pip" else vals.get(key)
            origin[key] = ov.line_of(key)
            problem = key not in ("pip", "os") and vals[key] and version_problem(vals[key])
            if problem:
                p.add(ov.line_of(key), f"{what}: overrides.{fam}.{key} {_shown(vals[key])} {problem}")
        fam_pip = _pins(ov, f"{what}: overrides.{fam}", p) if "pip" in ov else pip
        gpu = fam != "cpu"
        driver = fleet.driver.get(fam)
        ami = fleet.ami.get(fam)
        if line_ami and fam not in fleet.driver and gpu:
            driver, ami = (amis[line_ami], body.line_of("inference_ami")), line_ami
        origin["family"] = fam_line
        if driver:
            origin["driver"] = driver[1]
        combo = Combo(
            family=fam, torch=vals.get("torch"), cuda=vals.get("cuda") if gpu else None, python=vals.get("python"),
            os=vals.get("os"), profile=engine,
            parts=tuple((k, vals[k]) for k in profile.COMPONENTS if vals.get(k)) + tuple(options.items()),
            torch_cuda=vals.get("torch_cuda") if gpu else None, driver=driver[0] if driver else None,
            custom_bases=bool(bases) and gpu,
        )
        for key in options:
            origin[key] = body.line_of(key)
        if "engine" in body:
            origin["engine"] = body.line_of("engine")
        if suffix:
            origin["tag_suffix"] = body.line_of("tag_suffix")
        if bases:
            origin["bases"] = body.line_of("bases")
        images.append(Image(
            id=f"{name}-{fam}", line=name, family=fam, combo=combo,
            libraries={k: vals.get(k) for k in profile.LIBRARIES}, pip=fam_pip, inference_ami=ami,
            lines=origin, checks=checks, tag_suffix=suffix or "", bases=bases if gpu else None,
            size_budget_gb=line_budget or DEFAULT_BUDGET_GB["gpu" if gpu else "cpu"],
        ))
    return images


def _bases(body: LocDict, keys: tuple[str, ...], what: str, p: _Problems) -> dict[str, str] | None:
    """Base images the matrix names instead of nvidia/cuda's (a hardened in-house CUDA image, or one made
    locally): the matrix then vouches that they carry the line's CUDA toolkit. `keys`: the profile's."""
    if "bases" not in body:
        return None
    example = ", ".join(f"{k}: \"registry/cuda:12.4.1-{'devel' if k == 'builder' else 'base'}\"" for k in keys)
    node = _mapping(body["bases"], body.line_of("bases"), f"{what}: bases", p, f"bases: {{{example}}}")
    if node is None:
        return None
    _check_keys(node, keys, f"{what}: bases", p)
    refs = []
    for key in keys:
        ref = node.get(key)
        if not isinstance(ref, str) or not IMAGE_REF.fullmatch(ref):
            shown = ref if isinstance(ref, str) and len(ref) <= 200 else _kind(ref)
            p.add(node.line_of(key), f"{what}: bases.{key} must be an image reference such as "
                                     f"registry/cuda:12.4.1-devel, got {shown!r}")
        refs.append(ref)
    return dict(zip(keys, refs, strict=True)) if not p.lines else None


def _pins(node: LocDict, what: str, p: _Problems) -> tuple[str, ...]:
    if "pip" not in node:
        return ()
    value = node["pip"]
    if not isinstance(value, LocList) or not all(isinstance(x, str) for x in value):
        p.add(node.line_of("pip"), f"{what}: pip must be a list of pinned requirements such as "
                                   f"\"numpy==1.26.4\", got {_kind(value)}")
        return ()
    pins = []
    for i, pin in enumerate(value):
        problem = _pin_problem(pin)
        if problem:
            p.add(value.line_of(i), f"{what}: pip entry {_shown(pin)} {problem}")
        else:
            pins.append(str(Requirement(pin)))
    return tuple(pins)


def _pin_problem(pin: str) -> str | None:
    """Why a pip entry is not a plain pinned PEP 508 requirement (name[extras]==version), or None."""
    if _CONTROL.search(pin):
        return "holds a control character (a newline?); write one requirement per entry"
    try:
        req = Requirement(pin)
    except InvalidRequirement as exc:
        return f"is not a PEP 508 requirement ({str(exc).splitlines()[0]}); write it as name==version"
    if req.url or req.marker:
        return "has a URL or an environment marker; write it as name==version"
    specs = list(req.specifier)
    if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
        return "is not pinned; write it as name==version"
    return None


def _scalar(value: Any) -> str:
    """A value for an error message: a scalar shown bounded, anything else by its kind only."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return _shown(str(value)) if isinstance(value, str) else repr(value)
    return _kind(value)


def _shown(value: str, limit: int = 80) -> str:
    """A value for an error message: quoted, control characters escaped, never unbounded."""
    text = repr(value[:limit])
    return text + ("..." if len(value) > limit else "")


def version_problem(value: str) -> str | None:
    """Why a version string is not a PEP 440 version written plainly, or None."""
    if _CONTROL.search(value) or value != value.strip():
        return "holds whitespace or a control character"
    if not re.fullmatch(r"[0-9A-Za-z.+!_-]+", value):
        return "holds characters no version has"
    try:
        Version(value)
    except InvalidVersion:
        return "is not a PEP 440 version"
    return None
