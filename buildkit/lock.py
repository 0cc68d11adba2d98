"""Locked Python dependencies: what `lmi lock` resolved for each image, and how a context installs it.

An image installs its Python packages in layers: torch (with the matrix's `pip:` pins), then the layers
of its engine profile (buildkit/profiles: e.g. build tools, the libraries, an engine built from its sdist,
resolved alone). Each layer installs from a lock file with
`pip install --require-hashes --no-deps`: exactly the versions and files that were resolved, nothing a
later release of some transitive package could change.

The locks of a matrix live in one file beside it (matrix.yaml -> matrix.lock). It holds one *set* per
distinct dependency set (all GPU images of a line share one), keyed `<line>-<torch variant>`; each set
records the fingerprint of the inputs it was resolved from, so changing a version in the matrix, the
facts or the toolkit makes it stale (`lmi lock --check`, a CI gate). `lmi render` copies a current set
into every context that uses it, so the content hash covers the lock.

Core module: reads its inputs only. Resolving (uv, the network) is buildkit/locker.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from .errors import UserError

SCHEMA = 1
CORE_LAYERS = ("torch",)  # every image's first layer; its profile's follow (profile.LAYERS)


def file_of(layer: str) -> str:
    """A layer's lock file in a context: requirements.lock for `runtime`, <layer>.lock otherwise."""
    return "requirements.lock" if layer == "runtime" else f"{layer}.lock"


def files_of(spec) -> dict[str, str]:
    """layer -> lock file, in install order, for one image spec (the templates' `lock_files`)."""
    return {layer: file_of(layer) for layer in (*CORE_LAYERS, *spec.profile.LAYERS)}
MAX_BYTES = 32 << 20  # a lock file is text; refuse anything that is plainly not one
_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!_-]*")
_PYTHON = re.compile(r"\d+\.\d+")
_PLATFORM = re.compile(r"[a-z0-9_]+-[a-z0-9_]+")
_RESOLVER = re.compile(r"[A-Za-z0-9 ._+-]{0,60}")
_URL = re.compile(r"https?://[^\s\x00-\x1f\x7f]+")
_LAYER = re.compile(r"[a-z][a-z0-9_]{0,30}")



def lock_path(matrix_path: Path) -> Path:
    """Where a matrix's locks live: beside it, same stem (matrix.yaml -> matrix.lock)."""
    return matrix_path.with_suffix(".lock")


@dataclass(frozen=True)
class Inputs:
    """What one dependency set is resolved from. Equal inputs, equal fingerprint."""

    key: str
    python: str
    platform: str  # e.g. x86_64-manylinux_2_39: the wheels that run on the image's OS and arch
    indexes: tuple[str, ...]  # extra indexes (the torch variant's); the default index is the user's
    roots: tuple[tuple[str, tuple[str, ...]], ...]  # (layer, requirements), in install order
    alone: tuple[str, ...] = ()  # layers resolved by themselves (--no-deps: an sdist built in the image)

    def roots_of(self, layer: str) -> tuple[str, ...]:
        return dict(self.roots)[layer]

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(layer for layer, _ in self.roots)

    @property
    def fingerprint(self) -> str:
        doc = {"schema": SCHEMA, "python": self.python, "platform": self.platform, "indexes": list(self.indexes),
               "roots": {layer: sorted(reqs) for layer, reqs in self.roots}}
        return "sha256:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def inputs_of(spec, build_args: Mapping[str, str] | None = None) -> Inputs:
    """The dependency set of one image spec. `build_args` are the matrix's: a TORCH_INDEX_URL there
    replaces the variant's index (the local matrix takes torch from a wheelhouse instead)."""
    profile = spec.profile
    problem = profile.lock_problem(spec)
    if problem:
        raise UserError(problem)
    index = (build_args or {}).get("TORCH_INDEX_URL", spec.torch_index or "")
    torch = (spec.torch_requirement, *spec.pip)
    return Inputs(
        key=f"{spec.line}-{spec.wheel_variant}", python=spec.python, platform=spec.wheel_platform,
        indexes=(index,) if index else (),
        roots=(("torch", torch), *profile.lock_layers(spec)), alone=tuple(profile.ALONE),
    )


def plan(specs: Iterable, build_args: Mapping[str, str] | None = None) -> dict[str, tuple[Inputs, list[str]]]:
    """The sets these images need: key -> (inputs, image ids). Images that share a key share inputs."""
    wanted: dict[str, tuple[Inputs, list[str]]] = {}
    for spec in specs:
        inputs = inputs_of(spec, build_args)
        known = wanted.setdefault(inputs.key, (inputs, []))
        if known[0].fingerprint != inputs.fingerprint:
            raise UserError(f"images {known[1][0]} and {spec.id} share lock set {inputs.key} but not its inputs; "
                            "give one of their lines another name")
        known[1].append(spec.id)
    return wanted


@dataclass(frozen=True)
class Pin:
    """One locked distribution: name==version and the sha256 of every file pip may pick."""

    name: str
    version: str
    hashes: tuple[str, ...]

    def line(self) -> str:
        return " \\\n    ".join([f"{self.name}=={self.version}", *(f"--hash={h}" for h in self.hashes)])


@dataclass(frozen=True)
class LockSet:
    key: str
    inputs: str  # the fingerprint of the inputs it was resolved from
    python: str
    platform: str
    indexes: tuple[str, ...]
    resolver: str = ""  # e.g. "uv 0.13.9"
    layers: dict[str, tuple[Pin, ...]] = field(default_factory=dict)
    unresolved: str | None = None  # why these inputs could not be resolved where `lmi lock` ran

    def to_json(self) -> dict:
        doc = {"inputs": self.inputs, "python": self.python, "platform": self.platform,
               "indexes": list(self.indexes), "resolver": self.resolver}
        if self.unresolved:
            doc["unresolved"] = self.unresolved
        else:
            doc["layers"] = {layer: [[p.name, p.version, list(p.hashes)] for p in pins]
                             for layer, pins in self.layers.items()}
        return doc


@dataclass(frozen=True)
class LockFile:
    path: Path
    sets: dict[str, LockSet]

    def status(self, spec, build_args: Mapping[str, str] | None = None) -> tuple[str, LockSet | None, str]:
        """The one verdict on `spec`'s set: ("current" | "missing" | "stale" | "unresolved", the set, its key)."""
        wanted = inputs_of(spec, build_args)
        found = self.sets.get(wanted.key)
        if found is None:
            return "missing", None, wanted.key
        if found.inputs != wanted.fingerprint:
            return "stale", found, wanted.key
        return ("unresolved" if found.unresolved else "current"), found, wanted.key

    def current(self, spec, build_args: Mapping[str, str] | None = None) -> LockSet | None:
        """The set `spec` installs from, when it was resolved from exactly the spec's inputs."""
        state, found, _ = self.status(spec, build_args)
        return found if state == "current" else None

    def dumps(self) -> str:
        body = {"lmi-lock": SCHEMA,
                "note": "Written by `lmi lock`; do not edit. Each set: the pins and sha256 of every Python "
                        "distribution an image installs, by layer.",
                "sets": {key: self.sets[key].to_json() for key in sorted(self.sets)}}
        return json.dumps(body, indent=1, sort_keys=True) + "\n"


def load(path: Path) -> LockFile:
    """Read a lock file; a missing one is an empty lock (nothing is locked yet)."""
    if not path.exists():
        return LockFile(path, {})
    if not path.is_file():
        raise UserError(f"{path}: not a regular file; remove it and run `lmi lock`")
    if path.stat().st_size > MAX_BYTES:
        raise UserError(f"{path}: larger than {MAX_BYTES >> 20} MiB, not a lock file `lmi lock` wrote; "
                        "remove it and run `lmi lock`")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("lmi-lock") != SCHEMA:
            raise ValueError(f"schema {doc.get('lmi-lock')!r}, expected {SCHEMA}")
        return LockFile(path, {key: _set(key, raw) for key, raw in doc["sets"].items()})
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise UserError(f"{path}: not a lock file this toolkit can read ({str(exc)[:200]}); "
                        "remove it and run `lmi lock`") from exc


def _set(key: str, raw: dict) -> LockSet:
    if not isinstance(key, str) or not _NAME.fullmatch(key):
        raise ValueError(f"set name {str(key)[:60]!r}")
    if not _HASH.fullmatch(raw["inputs"]):
        raise ValueError(f"set {key}: inputs {str(raw['inputs'])[:80]!r} is not a sha256")
    common = dict(key=key, inputs=raw["inputs"], python=str(raw["python"]), platform=str(raw["platform"]),
                  indexes=tuple(str(i) for i in raw["indexes"]), resolver=str(raw.get("resolver", "")))
    # Every text that reaches a rendered lock file is one plain token: nothing can add a line to it.
    for field_, pattern in (("python", _PYTHON), ("platform", _PLATFORM), ("resolver", _RESOLVER)):
        if not pattern.fullmatch(common[field_]):
            raise ValueError(f"set {key}: {field_} {common[field_][:60]!r}")
    if not all(_URL.fullmatch(i) for i in common["indexes"]):
        raise ValueError(f"set {key}: an index that is not a plain URL")
    if raw.get("unresolved"):
        return LockSet(**common, unresolved=str(raw["unresolved"])[:500])
    layers = {}
    if not isinstance(raw["layers"], dict) or not all(isinstance(n, str) and _LAYER.fullmatch(n)
                                                      for n in raw["layers"]):
        raise ValueError(f"set {key}: layer names")
    for layer in raw["layers"]:
        pins = []
        for name, version, hashes in raw["layers"][layer]:
            if not _NAME.fullmatch(name) or not _VERSION.fullmatch(version):
                raise ValueError(f"set {key}: {str(name)[:60]!r}=={str(version)[:60]!r} is not a pin")
            if not hashes or not all(isinstance(h, str) and _HASH.fullmatch(h) for h in hashes):
                raise ValueError(f"set {key}: {name} has no valid sha256")
            pins.append(Pin(name, version, tuple(hashes)))
        layers[layer] = tuple(pins)
    return LockSet(**common, layers=layers)


def is_locked(files: Mapping[str, bytes]) -> bool:
    """Whether a rendered context carries its lock files (only a current set is ever copied in): every
    profile's contexts have the torch and runtime layers."""
    return {file_of("torch"), file_of("runtime")} <= set(files)


def context_files(found: LockSet) -> dict[str, bytes]:
    """The lock files of one context, in pip's requirements format (--require-hashes). Byte-identical in
    every image of the set: each is bind-mounted into its layer's step, so the families of a line share
    those layers only if nothing image-specific is written here."""
    files = {}
    for layer, pins in found.layers.items():
        head = (f"# The {layer} layer of lock set {found.key}, locked by `lmi lock` from the matrix's lock file\n"
                f"# (Python {found.python}, {found.platform}, {found.resolver}). Installed with\n"
                "# pip install --require-hashes --no-deps: change the matrix, then run `lmi lock`.\n")
        body = "".join(p.line() + "\n" for p in pins)
        files[file_of(layer)] = (head + body).encode()
    return files


# --- reading a resolver's output -------------------------------------------------------------------


def parse_graph(text: str) -> tuple[dict[str, str], dict[str, set[str]]]:
    """Pins and edges (parent -> children) from a pip-compile style requirements file whose `# via`
    annotations name each package's dependents (uv pip compile --annotation-style split)."""
    pins: dict[str, str] = {}
    edges: dict[str, set[str]] = {}
    current: str | None = None
    in_via = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("--hash") or line.startswith("--"):
            continue
        if not raw.startswith((" ", "#")):
            spec = line.rstrip("\\").strip()
            if ";" in spec:
                raise UserError(f"the resolver left a marker on '{spec[:80]}': resolve for one platform only")
            name, sep, version = spec.partition("==")
            if not sep:
                raise UserError(f"the resolver wrote '{spec[:80]}', not a pin")
            current, in_via = canonicalize_name(name), False
            pins[current] = version.strip()
            continue
        if current is None or not line.startswith("#"):
            continue
        comment = line.lstrip("#").strip()
        if comment.startswith("via"):
            in_via = True
            comment = comment[3:].strip()
            if not comment:
                continue
        elif not in_via:
            continue
        if comment and not comment.startswith(("-r ", "-c ", "(")):
            edges.setdefault(canonicalize_name(comment.split()[0]), set()).add(current)
    return pins, edges


def parse_pylock(doc: dict) -> dict[str, Pin]:
    """Pins with the sha256 of every file a PEP 751 lock lists for them (the files for the target)."""
    out = {}
    for pkg in doc.get("packages", []):
        files = [*pkg.get("wheels", []), *([pkg["sdist"]] if pkg.get("sdist") else [])]
        hashes = sorted({f"sha256:{f['hashes']['sha256']}" for f in files if f.get("hashes", {}).get("sha256")})
        name = canonicalize_name(pkg["name"])
        out[name] = Pin(name, str(pkg["version"]), tuple(hashes))
    return out


def names(requirements: Iterable[str]) -> set[str]:
    found = set()
    for text in requirements:
        try:
            found.add(canonicalize_name(Requirement(text).name))
        except InvalidRequirement as exc:
            raise UserError(f"'{text[:80]}' is not a requirement ({exc})") from exc
    return found


def closure(roots: set[str], edges: Mapping[str, set[str]]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(edges.get(name, ()))
    return seen


def partition(inputs: Inputs, pins: Mapping[str, Pin], edges: Mapping[str, set[str]],
              alone: Mapping[str, Pin]) -> dict[str, tuple[Pin, ...]]:
    """Split one resolution into the image's layers: each layer is the closure of its roots, less what
    the torch layer below it already installed (and less the layers resolved alone: `alone` maps each to
    its one pin, its sdist)."""
    torch = closure(names(inputs.roots_of("torch")), edges)
    apart = {canonicalize_name(p.name) for p in alone.values()}
    wanted_by_layer = [("torch", torch)]
    for layer in inputs.layers:
        if layer != "torch" and layer not in inputs.alone:
            wanted_by_layer.append((layer, closure(names(inputs.roots_of(layer)), edges) - torch - apart))
    layers = {}
    for layer, wanted in wanted_by_layer:
        missing = sorted(wanted - set(pins))
        if missing:
            raise UserError(f"set {inputs.key}: the resolver listed no files for {', '.join(missing[:5])}; "
                            "run `lmi lock` again")
        unhashed = sorted(n for n in wanted if not pins[n].hashes)
        if unhashed:
            raise UserError(f"set {inputs.key}: no sha256 for {', '.join(unhashed[:5])} (a wheelhouse or index "
                            "that publishes no hashes); `lmi lock` needs every file hashed")
        layers[layer] = tuple(pins[n] for n in sorted(wanted))
    for layer in inputs.alone:
        layers[layer] = (alone[layer],)
    return {layer: layers[layer] for layer in inputs.layers}


def problems(specs: Iterable, lockfile: LockFile, build_args: Mapping[str, str] | None = None
             ) -> tuple[list[str], list[str]]:
    """(stale or missing sets, sets recorded as unresolvable here) for these specs, one line each."""
    stale, unresolved, seen = [], [], set()
    for spec in specs:
        state, found, key = lockfile.status(spec, build_args)
        if key in seen:
            continue
        seen.add(key)
        if state == "missing":
            stale.append(f"{lockfile.path}: set {key} ({spec.id} and its line) is missing")
        elif state == "stale":
            stale.append(f"{lockfile.path}: set {key} is stale (its inputs changed: versions, pins, Python, "
                         "OS or index)")
        elif state == "unresolved":
            unresolved.append(f"{lockfile.path}: set {key} is not locked: {found.unresolved}")
    return stale, unresolved


def refuse_unlocked(locks: LockFile, build_args: Mapping[str, str], planned) -> None:
    """Every build installs from its context's locks: one without them cannot be built (a UserError naming each)."""
    why = {"missing": "it has no lock set", "stale": "its lock set is stale"}
    lines = []
    for p, ctx in planned:
        if is_locked(ctx.files):
            continue
        state, found, _ = locks.status(p.spec, build_args)
        reason = f"not locked: {found.unresolved[:200]}" if state == "unresolved" else why[state]
        lines.append(f"{locks.path}: image {p.spec.id}: {reason}; run `lmi lock` (make lock) where its package "
                     "indexes are reachable, then build")
    if lines:
        raise UserError(*lines)
