from __future__ import annotations

import contextlib
import os
import shutil
import socket
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


# --- a tier of tests cannot vanish ----------------------------------------------------------------------
# Engine tests (marker `engine`, and any test marked `required_in_ci`) skip where a prerequisite is missing
# (Docker, the local torch wheel in $PIP_FIND_LINKS, mpirun). In CI ($CI set, as .ci/run does) such a skip
# fails the test instead, unless the tier is skipped on purpose: LMI_SKIP_ENGINE=<why>. Every run says how
# many engine tests ran.
OPT_OUT = "LMI_SKIP_ENGINE"
TIER_MARKERS = ("engine", "required_in_ci")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _in_tier(item_or_report) -> bool:
    return any(name in item_or_report.keywords for name in TIER_MARKERS)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "required_in_ci: its skip fails a CI run (its prerequisites must be there)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    why = os.environ.get(OPT_OUT, "").strip()
    if why:
        skip = pytest.mark.skip(reason=f"{OPT_OUT}={why}: the engine tier is skipped on request")
        for item in items:
            if _in_tier(item):
                item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _in_tier(item) and in_ci() and not os.environ.get(OPT_OUT, "").strip():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"{reason.removeprefix('Skipped: ')}\nIn CI the engine tier must run: provide what it "
                           f"needs, or skip the tier on purpose with {OPT_OUT}=<why>")


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    outcomes: dict[str, str] = {}
    for state in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(state, []):
            # A test's outcome: its call's, or a failure or skip in its setup.
            if getattr(report, "nodeid", None) and _in_tier(report) and (state != "passed" or report.when == "call"):
                outcomes.setdefault(report.nodeid, state)
    if not outcomes:
        return
    counts = {state: sum(v == state for v in outcomes.values()) for state in ("passed", "failed", "error", "skipped")}
    ran = counts["passed"] + counts["failed"]
    opt_out = os.environ.get(OPT_OUT, "").strip()
    terminalreporter.write_line(
        f"engine tier (engine, required_in_ci): {ran} of {len(outcomes)} ran "
        f"({counts['passed']} passed, {counts['failed']} failed), "
        f"{counts['error']} errors, {counts['skipped']} skipped" + (f" ({OPT_OUT}={opt_out})" if opt_out else ""))


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


def production_images() -> tuple:
    """The images of the production matrix.yaml: tests derive the fleet and its counts from it, so adding
    a family or a line the way the README says breaks no test that did not mean to pin it."""
    from buildkit import matrix

    return matrix.load(ROOT / "matrix.yaml", facts_mod.load()).images


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_registry(root: Path, htpasswd: Path | None = None):
    """Debian's docker-registry on a free loopback port, storing under root; yields HOST:PORT, stops it after."""
    from buildkit import registry

    host = f"127.0.0.1:{free_port()}"
    registry.ensure_local_registry(host, root=root, htpasswd=htpasswd)
    try:
        yield host
    finally:
        pid = root / f"registry-{host.split(':')[1]}.pid"
        if pid.exists():
            subprocess.run(["kill", pid.read_text()], check=False)


@pytest.fixture(scope="module")
def plain_registry(tmp_path_factory):
    """A registry without authentication for one test module."""
    with local_registry(tmp_path_factory.mktemp("registry")) as host:
        yield host
