"""Engine profiles: everything the toolkit knows about one serving engine, registered by name.

Modelled on cibuildwheel's platform modules (pypa/cibuildwheel `cibuildwheel/platforms/__init__.py`): a
`Profile` is a *module* that satisfies the protocol below, and `PROFILES` is the one place the rest of
the toolkit meets an engine's name. A matrix line chooses its profile with `engine:`; everything that
varies by engine (its matrix keys, facts, rules, image spec, tag, aliases, lock layers, template, checks,
serving contract) is asked of the profile. A new engine is one module here, one data file in
buildkit/data/, a template under templates/profiles/<name>/ and a matrix line (docs/engines.md).

"engine" is also what the Docker Engine is called (buildkit/engine.py, `lmi engine`): in code, a serving
engine is a *profile*; in the matrix and on the command line it is `engine:` / `--engine`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from . import deepspeed, vllm


class Profile(Protocol):
    NAME: str  # the matrix's `engine:` value
    COMPONENTS: tuple[str, ...]  # its versioned matrix keys, in tag order (each also a label and a `lmi uri` flag)
    TITLES: Mapping[str, str]  # component -> the name people know it by ("DJL Serving")
    LIBRARIES: tuple[str, ...]  # library keys a line must pin (each `name: version`, into the runtime layer)
    OPTIONS: Mapping[str, tuple[str, ...]]  # other line keys and their allowed values
    BASES: tuple[str, ...]  # the base images a line's `bases:` names, the runtime last
    COMPILES: bool  # builds CUDA code from source (nvcc must target the family's SM)
    CPU: bool  # has CPU images
    DOCKERFILE: str  # its template (extends the core templates/Dockerfile.j2)
    TEMPLATES: Mapping[str, str]  # further context files -> template
    EXECUTABLE: frozenset[str]  # context files written with mode 0755
    VERBATIM: Mapping[str, Path]  # context files copied as they are (handlers, entry points)
    CHECKER: Path  # its in-image checks, mounted beside buildkit/incheck.py
    DATA: tuple[str, ...]  # its facts files in buildkit/data (stems)
    CPU_SOURCE: str  # why it has no CPU images (the source), when CPU is False

    def load_facts(self, doc: dict) -> Any: ...
    def rules(self) -> tuple[Callable[[Any], None], ...]: ...
    def engine_spec(self, image: Any, facts: Any, verdict: Any) -> Any: ...
    def tag(self, spec: Any) -> str: ...
    def aliases(self, spec: Any, family: str) -> tuple[str, ...]: ...
    def newness(self, spec: Any) -> tuple: ...
    def lock_layers(self, spec: Any) -> tuple[tuple[str, tuple[str, ...]], ...]: ...
    # smoke tests (asked by buildkit/smoke.py)
    CHECKS: Mapping[str, tuple[str, ...]]  # builtins per tier (the core's and its checker's)
    SERVING_FILES: tuple[tuple[str, dict], ...]  # files a serving image must hold
    SERVING_ENV: Mapping[str, str]  # environment the image sets
    SERVING_WAYS: tuple  # smoke.ServingWay: how it serves, and what the serving tier asks
    def checks(self, spec: Any) -> Mapping[str, tuple[str, ...]]: ...
    # publishing (asked by cli, index, sbom and verify)
    INDEX_LEGACY: Mapping[str, str]  # component keys an older index wrote -> today's
    DEB_ROLES: Mapping[str, str]  # Debian packages the SBOM marks with a role
    SBOM_FILES: tuple[str, ...]  # paths the in-image inventory lists
    def warnings(self, specs: list) -> list[str]: ...
    def sbom_properties(self, name: str, files: list[str], claims: dict) -> list[tuple[str, str]]: ...
    def index_versions(self, engine: Any) -> dict[str, tuple[list[str], str]]: ...


PROFILES: dict[str, ModuleType] = {p.NAME: p for p in (deepspeed, vllm)}
# A line without `engine:` is a line of the first profile, as every line was before profiles existed.
DEFAULT = deepspeed.NAME


def get(name: str) -> ModuleType:
    return PROFILES[name]


def of(spec: Any) -> ModuleType:
    """The profile of an image spec."""
    return PROFILES[spec.engine.name]


def component_keys() -> tuple[str, ...]:
    """Every profile's versioned components, each once (the `lmi uri`/`lmi check` flags)."""
    return tuple(dict.fromkeys(c for p in PROFILES.values() for c in p.COMPONENTS))
