"""The bottom of the toolkit: what a serving-stack profile is, the registry of them, and the serving-test
vocabulary a profile describes its serving ways with.

Dependency direction as in cibuildwheel (pypa/cibuildwheel `cibuildwheel/platforms/__init__.py`: the platform
modules satisfy one interface and the registry of them is assembled by the top-level code): `buildkit.profiles`
assembles the registry, the CLI passes it down (facts.load takes it, every ImageSpec carries its profile), and no
core module (versions, yamlio, facts, rules, matrix, spec, render) imports a profile. This module imports nothing
of the toolkit; the import-linter contracts in pyproject.toml keep it so, and `make lint` type-checks each profile
module against `Profile` with mypy (buildkit/profiles/__init__.py assigns each to it).

Words: "engine" is the container engine (Docker, buildkit/engine.py); a serving stack (a model server with its
libraries) is a *profile*. Users still name one with the matrix's `engine:` key and `--engine` (docs/engines.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import UserError

# --- the serving-test vocabulary (buildkit/smoke.py runs it; a profile's SERVING_WAYS are made of it) ---------

CHECK_DIR = "/opt/lmi-check"  # where test containers see the checker, read-only, with the profiles' checks beside it
CHECK_MODULE = f"{CHECK_DIR}/lmi_check.py"
MODEL_DIR = "/opt/ml/model"  # where the serving tier mounts its tiny model (SageMaker's model directory)


def tiny_model_command(prompt: str, max_new_tokens: int, heads: int = 8) -> list[str]:
    """Run in the image: save lmi_check's tiny Llama at MODEL_DIR and print plain Transformers' greedy continuation
    of `prompt` ({"reference": [text]})."""
    return ["python", CHECK_MODULE, "--make-tiny-model", MODEL_DIR, "--prompt", prompt,
            "--max-new-tokens", str(max_new_tokens), "--heads", str(heads)]


class Client:
    """A running serving container, asked from inside (it has no network but its own loopback)."""

    def __init__(self, container) -> None:
        self.container = container

    def post(self, payload: dict, *curl: str) -> tuple[str, str]:
        """POST JSON to /invocations on port 8080 (extra curl arguments after it): (HTTP status, body)."""
        _, out = self.container.exec_run(["curl", "-sS", "-X", "POST", "-H", "Content-Type: application/json",
                                          "-d", json.dumps(payload), "-w", "\n%{http_code}", *curl,
                                          "http://127.0.0.1:8080/invocations"])
        body, _, status = out.decode(errors="replace").rpartition("\n")
        return status, body

    def run(self, argv: list[str]) -> tuple[int, str]:
        """Run a command in the container: (exit code, stdout and stderr)."""
        code, out = self.container.exec_run(argv)
        return code, out.decode(errors="replace")


@dataclass(frozen=True)
class Ask:
    """One serving check: a request to the running server and the check of its answer,
    `ask(client, reference, ranks) -> (passed, message)` (`reference`: what the tiny model's command printed)."""

    check: str
    ask: Callable[[Client, Any, int], tuple[bool, str]]


@dataclass(frozen=True)
class Setup:
    """How one way starts: its ranks, the files written beside the tiny model, the serving container's env."""

    ranks: int = 1
    files: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServingWay:
    """One way a profile's image serves, and the serving checks that report it."""

    name: str
    model: tuple[str, ...]  # run in the image with MODEL_DIR mounted writable: make the model, print its reference
    setup: Callable[..., Setup]  # setup(spec, gpu, gpus) -> Setup
    asks: tuple[Ask, ...]
    ping: str | None = None  # a check of its own for GET /ping (else a /ping that never answers fails the asks)
    needs_gpu: bool = False  # skipped, with the reason, where no GPU is usable

    @property
    def checks(self) -> tuple[str, ...]:
        return ((self.ping,) if self.ping else ()) + tuple(a.check for a in self.asks)


# --- the profile interface ----------------------------------------------------------------------------------
# Everything the host code asks of a profile, read from its uses (docs/engines.md describes each member).
# Members are read-only properties so that a module's tuple or dict satisfies a Sequence or Mapping here.
# `spec` below is a buildkit.spec.ImageSpec, `image` a buildkit.matrix.Image, `ctx` a buildkit.rules.Ctx; they
# are typed Any because this module sits below them.


class Profile(Protocol):
    # what a line is made of
    @property
    def NAME(self) -> str: ...  # noqa: N802 -- the matrix's `engine:` value
    @property
    def COMPONENTS(self) -> tuple[str, ...]: ...  # noqa: N802 -- versioned matrix keys, in tag order (labels, flags)
    @property
    def TITLES(self) -> Mapping[str, str]: ...  # noqa: N802 -- component -> the name people know it by
    @property
    def LIBRARIES(self) -> tuple[str, ...]: ...  # noqa: N802 -- library keys a line must pin
    @property
    def OPTIONS(self) -> Mapping[str, tuple[str, ...]]: ...  # noqa: N802 -- other line keys, their allowed values
    @property
    def OPTION_HELP(self) -> Mapping[str, str]: ...  # noqa: N802 -- option -> what it means (errors, --help)
    @property
    def BASES(self) -> tuple[str, ...]: ...  # noqa: N802 -- base images a line's `bases:` names, the runtime last
    @property
    def COMPILES(self) -> bool: ...  # noqa: N802 -- builds CUDA code from source (nvcc must target the SM)
    @property
    def CPU(self) -> bool: ...  # noqa: N802 -- has CPU images
    @property
    def CPU_SOURCE(self) -> str: ...  # noqa: N802 -- why it has no CPU images (the source), when CPU is False
    @property
    def DATA(self) -> tuple[str, ...]: ...  # noqa: N802 -- its facts files in buildkit/data (stems)

    # facts, rules and the image spec
    def load_facts(self, docs: dict[str, dict]) -> Any: ...
    @property
    def RULES(self) -> tuple[Callable[[Any], None], ...]: ...  # noqa: N802 -- run after the core's, on one ctx
    def stack_spec(self, image: Any, facts: Any, stack: Any, verdict: Any, toolkit: Any, system: Any) -> Any: ...
    def tag(self, spec: Any) -> str: ...
    def aliases(self, spec: Any, family: str) -> tuple[str, ...]: ...
    def newness(self, spec: Any) -> tuple: ...
    def labels(self, spec: Any) -> dict[str, str]: ...
    def description(self, spec: Any) -> str: ...
    def claims(self, spec: Any) -> tuple[dict[str, str], dict]: ...

    # rendering and locking
    @property
    def DOCKERFILE(self) -> str: ...  # noqa: N802 -- its template (extends the core templates/Dockerfile.j2)
    @property
    def TEMPLATES(self) -> Mapping[str, str]: ...  # noqa: N802 -- further context files -> template
    @property
    def EXECUTABLE(self) -> frozenset[str]: ...  # noqa: N802 -- context files written with mode 0755
    @property
    def VERBATIM(self) -> Mapping[str, Path]: ...  # noqa: N802 -- context files copied as they are (handlers)
    @property
    def LAYERS(self) -> tuple[str, ...]: ...  # noqa: N802 -- lock layers after the core's torch layer
    @property
    def ALONE(self) -> tuple[str, ...]: ...  # noqa: N802 -- layers locked by themselves with --no-deps
    def lock_layers(self, spec: Any) -> tuple[tuple[str, tuple[str, ...]], ...]: ...
    def lock_problem(self, spec: Any) -> str | None: ...

    # smoke tests (asked by buildkit/smoke.py)
    @property
    def CHECKER(self) -> Path: ...  # noqa: N802 -- its in-image checks, mounted beside the core checker
    @property
    def CHECKS(self) -> Mapping[str, tuple[str, ...]]: ...  # noqa: N802 -- builtins per tier
    def checks(self, spec: Any) -> Mapping[str, tuple[str, ...]]: ...
    @property
    def SERVING_FILES(self) -> tuple[tuple[str, dict], ...]: ...  # noqa: N802 -- files a serving image holds
    @property
    def SERVING_ENV(self) -> Mapping[str, str]: ...  # noqa: N802 -- environment the image sets
    @property
    def SERVING_WAYS(self) -> tuple[ServingWay, ...]: ...  # noqa: N802 -- how it serves, what the tier asks

    # publishing (asked by cli, index, sbom and verify)
    @property
    def INDEX_LEGACY(self) -> Mapping[str, str]: ...  # noqa: N802 -- component keys an older index wrote -> today's
    @property
    def DEB_ROLES(self) -> Mapping[str, str]: ...  # noqa: N802 -- Debian packages the SBOM marks with a role
    @property
    def SBOM_FILES(self) -> tuple[str, ...]: ...  # noqa: N802 -- path prefixes the in-image inventory lists
    def warnings(self, specs: list) -> list[str]: ...
    def sbom_properties(self, name: str, files: list[str], claims: dict) -> list[tuple[str, str]]: ...
    def index_versions(self, stack: Any) -> dict[str, tuple[list[str], str]]: ...


class Registry:
    """The profiles by name, assembled once at the top (buildkit.profiles.REGISTRY) and passed down. A line
    without `engine:` is a line of `default` (the first profile), as every line was before profiles existed."""

    def __init__(self, profiles: Iterable[Profile], readers: Iterable[Any] = ()) -> None:
        self.by_name: dict[str, Profile] = {p.NAME: p for p in profiles}
        self.default: str = next(iter(self.by_name), "")
        # component -> the module that reads its releases' wheels for `lmi facts add` (a profile's <name>_facts:
        # COMPONENT, ENGINE, derive, release_entry, line_versions, hand_pairs, torch_pairs); torch is the core's
        self.readers: dict[str, Any] = {r.COMPONENT: r for r in readers}

    def get(self, name: str) -> Profile:
        return self.by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    def __iter__(self) -> Iterator[str]:
        return iter(self.by_name)

    def __len__(self) -> int:
        return len(self.by_name)

    def items(self):
        return self.by_name.items()

    def values(self):
        return self.by_name.values()

    def component_keys(self) -> tuple[str, ...]:
        """Every profile's versioned components, each once (the `lmi uri`/`lmi check` flags)."""
        return tuple(dict.fromkeys(c for p in self.by_name.values() for c in p.COMPONENTS))

    def option_keys(self) -> tuple[str, ...]:
        """Every profile's components, then its options: one flag each on `lmi check`."""
        return tuple(dict.fromkeys((*self.component_keys(), *(o for p in self.by_name.values() for o in p.OPTIONS))))

    def owners(self, key: str) -> list[str]:
        """The profiles that have `key` as a component or an option."""
        return [n for n, p in self.by_name.items() if key in p.COMPONENTS or key in p.OPTIONS]

    def option_flag(self, key: str) -> tuple[str, str]:
        """(metavar, help) of `lmi check --<key>`: an option's values and meaning, or the profiles of a component."""
        choices = sorted({v for p in self.by_name.values() for v in p.OPTIONS.get(key, ())})
        helps = sorted(h for h in (p.OPTION_HELP.get(key) for p in self.by_name.values()) if h is not None)
        return ("|".join(choices) or "VERSION",
                "; ".join(dict.fromkeys(helps)) or f"a component of engine {' and '.join(self.owners(key))}")

    def parts(self, name: str, given: Mapping[str, str]) -> dict[str, str]:
        """The component and option values given for profile `name` (`lmi check --<key>`): all its components,
        none of another's, each option one of its values; else a UserError naming the flags."""
        profile = self.get(name)
        foreign = [k for k in given if k not in profile.COMPONENTS and k not in profile.OPTIONS]
        if foreign:
            raise UserError(*(f"--{k.replace('_', '-')} belongs to engine {' or '.join(self.owners(k))}, not to "
                              f"{profile.NAME}; add --engine {self.owners(k)[0]} or drop it" for k in foreign))
        missing = [k for k in profile.COMPONENTS if k not in given]
        if missing:
            raise UserError(f"engine {profile.NAME} needs {', '.join('--' + k for k in missing)} (its components: "
                            f"{', '.join('--' + k for k in profile.COMPONENTS)})")
        for k, allowed in profile.OPTIONS.items():
            if k in given and given[k] not in allowed:
                raise UserError(f"--{k.replace('_', '-')} {given[k]!r}: not one of {', '.join(allowed)}")
        return dict(given)

    def warnings(self, specs: Iterable[Any]) -> list[str]:
        """What each profile warns about for its images (e.g. a download without a recorded checksum)."""
        specs = list(specs)
        return [line for name, p in self.by_name.items() for line in p.warnings([s for s in specs
                                                                                 if s.stack.name == name])]
