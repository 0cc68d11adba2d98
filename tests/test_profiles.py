"""Engine profiles (buildkit/profiles): the core names no engine, every registered profile is complete, and each
profile's lines validate, lock and render as its facts say. The tests of one profile's own behaviour live with
the module that tests that behaviour (test_rules, test_render, test_handler...); these run for every profile."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

from buildkit import lock, matrix, profiles
from buildkit.errors import UserError

# The core: every module of the package but the profiles and the files they ship into images.
SHIPPED = {"lmi_deepspeed.py", "lmi_accelerate.py", "lmi_diffusion.py", "sm_vllm.py"}
ENGINE_WORDS = re.compile("|".join(sorted({*profiles.PROFILES, *profiles.component_keys()})), re.IGNORECASE)


def _core_files() -> list[Path]:
    package = ROOT / "buildkit"
    return [p for p in sorted(package.rglob("*.py"))
            if "profiles" not in p.relative_to(package).parts and p.name not in SHIPPED]


def test_the_core_names_no_engine() -> None:
    """The done-when of issue #19: `grep -il deepspeed` (or any engine or component name) over the core finds
    nothing; the core meets engines only through buildkit/profiles."""
    assert len(_core_files()) > 20
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()[:100]}" for p in _core_files()
             for n, line in enumerate(p.read_text().splitlines(), 1) if ENGINE_WORDS.search(line)]
    assert not found, "\n".join(found)
    for name in ("Dockerfile.j2", "entrypoint.sh.j2"):  # the core templates too
        assert not ENGINE_WORDS.search((ROOT / "templates" / name).read_text()), name


def test_grep_agrees() -> None:
    """The same as the issue asks it, with grep itself."""
    result = subprocess.run(["grep", "-il", "deepspeed", *map(str, _core_files())], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == "", result.stdout


@pytest.mark.parametrize("name", sorted(profiles.PROFILES))
def test_every_profile_is_complete(name) -> None:
    p = profiles.get(name)
    assert name == p.NAME and p.COMPONENTS and set(p.TITLES) == set(p.COMPONENTS)
    assert p.BASES[-1] == "runtime" and "runtime" in p.LAYERS
    for template in (p.DOCKERFILE, *p.TEMPLATES.values()):
        text = (ROOT / "templates" / template).read_text()
        assert template.startswith(f"profiles/{name}/"), template
    assert (ROOT / "templates" / p.DOCKERFILE).read_text().startswith('{% extends "Dockerfile.j2" %}')
    assert all(source.is_file() for source in p.VERBATIM.values())
    assert set(p.ALONE) <= set(p.LAYERS) and set(p.EXECUTABLE) <= {*p.TEMPLATES, *p.VERBATIM}
    for stem in p.DATA:
        assert (ROOT / "buildkit" / "data" / f"{stem}.yaml").is_file()
    assert text is not None


def test_a_line_names_a_registered_engine(write_matrix, facts) -> None:
    path = write_matrix("""
        schema: 1
        families: {g5: {}}
        lines:
          x:
            engine: tensorrt
            torch: "2.9.1"
            cuda: "12.8"
            python: "3.12"
            os: ubuntu24.04
    """)
    with pytest.raises(UserError) as err:
        matrix.load(path, facts)
    (line,) = err.value.lines
    assert f"{path}:5:" in line and "engine 'tensorrt' is not one of" in line
    assert all(name in line for name in profiles.PROFILES)


# --- the vLLM line -------------------------------------------------------------------------------------------


def test_a_profile_layer_resolved_alone_keeps_its_own_file() -> None:
    """lock.file_of: requirements.lock for runtime, <layer>.lock otherwise (what every context installs)."""
    assert lock.file_of("runtime") == "requirements.lock" and lock.file_of("torch") == "torch.lock"
    for p in profiles.PROFILES.values():
        assert len({lock.file_of(layer) for layer in ("torch", *p.LAYERS)}) == len(p.LAYERS) + 1
