"""Engine profiles: everything the toolkit knows about one serving engine, registered by name.

Modelled on cibuildwheel's platform modules (pypa/cibuildwheel `cibuildwheel/platforms/__init__.py`): a
`Profile` is a *module* that satisfies the protocol in buildkit/interface.py, and `REGISTRY` here is the one
place the toolkit meets a profile's module: the CLI passes it down (facts.load(REGISTRY)); no core module
imports this package. A matrix line chooses its profile with `engine:`; everything that
varies by engine (its matrix keys, facts, rules, image spec, tag, aliases, lock layers, template, checks,
serving contract) is asked of the profile. A new engine is one module here, one data file in
buildkit/data/, a template under templates/profiles/<name>/ and a matrix line (docs/engines.md).

"engine" is also what the Docker Engine is called (buildkit/engine.py, `lmi engine`): in code, a serving
engine is a *profile*; in the matrix and on the command line it is `engine:` / `--engine`.
"""

from __future__ import annotations

from typing import Any

from ..interface import Profile, Registry
from . import deepspeed, vllm, vllm_facts

# Each module is checked against the Profile protocol by mypy (`make lint`): these typed assignments fail the
# type check where a module lacks a member or has one of another type.
_DEEPSPEED: Profile = deepspeed
_VLLM: Profile = vllm

REGISTRY = Registry((_DEEPSPEED, _VLLM), readers=(vllm_facts,))  # the first is the default (no `engine:`)
PROFILES: dict[str, Profile] = REGISTRY.by_name
DEFAULT = REGISTRY.default


def get(name: str) -> Profile:
    return REGISTRY.get(name)


def of(spec: Any) -> Profile:
    """The profile of an image spec."""
    return spec.profile


def component_keys() -> tuple[str, ...]:
    """Every profile's versioned components, each once (the `lmi uri`/`lmi check` flags)."""
    return REGISTRY.component_keys()
