from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from buildkit import facts as facts_mod

ROOT = Path(__file__).resolve().parent.parent
LMI = Path(sys.executable).parent / "lmi"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden from a fresh render")


@pytest.fixture(scope="session")
def facts():
    return facts_mod.load()


@pytest.fixture
def write_matrix(tmp_path: Path):
    """Write a matrix file (dedented) next to a copy of the templates; return its path."""
    shutil.copytree(ROOT / "templates", tmp_path / "templates", dirs_exist_ok=True)

    def write(text: str, name: str = "matrix.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write


# A bound for one `lmi` run, sized for the heaviest work a test asks of it (a cold build of the local image,
# a 2 GB push) on a busy 2-core machine: it stops a hang, not slow work.
LMI_TIMEOUT_S = 1200


def lmi(*args: str, cwd: Path | None = None, env: dict | None = None,
        timeout: float = LMI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run the installed `lmi` console script for real."""
    return subprocess.run([str(LMI), *args], cwd=cwd or ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout)


LINE_027 = """
  djl0.27:
    djl: "0.27.0"
    deepspeed: "0.12.6"
    torch: "2.1.2"
    cuda: "12.1"
    python: "3.10"
    os: ubuntu22.04
    transformers: "4.39.0"
    diffusers: "0.26.3"
    accelerate: "0.27.2"
"""
