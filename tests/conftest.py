from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from buildkit import facts as facts_mod
from buildkit.profiles import REGISTRY

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


# DeepSpeed's CPU all-reduce (csrc/cpu/comm/shm.cpp at v0.18.9: shared_create) makes one 64 MiB buffer per
# rank in /dev/shm, named after the master address and port, and nothing ever unlinks it: in a container the
# buffers go with the container's /dev/shm, but ranks started on the host (the handler's tests) would leave
# 128 MiB a two-rank run until /dev/shm (half the RAM) is full and the machine swaps. What this session made and
# no live process maps any more is removed when it ends (a rank maps its buffer in the call that creates it, and
# every write to it moves its mtime: one untouched for 2 s and mapped by nobody is left over).
SHM = Path("/dev/shm")
SHM_BUFFERS = "deepspeed_allreduce_buffer_*"
_SESSION_START = time.time()


def _mapped_shm() -> set[str]:
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            mapped |= {line.rsplit("/", 1)[-1].split()[0] for line in maps.read_text().splitlines()
                       if "/dev/shm/deepspeed_allreduce_buffer_" in line}
    return mapped


def _buffers_since(since: float) -> list[tuple[Path, float]]:
    """DeepSpeed all-reduce buffers written since `since`, with their mtime (one that goes meanwhile is left out)."""
    found = []
    for path in SHM.glob(SHM_BUFFERS):
        with contextlib.suppress(OSError):
            mtime = path.stat().st_mtime
            if mtime >= since - 1:
                found.append((path, mtime))
    return found


def stale_shm_buffers(since: float, min_age: float = 2.0) -> list[Path]:
    """DeepSpeed all-reduce buffers made since `since`, at least `min_age` s old, that no live process maps."""
    now, mapped = time.time(), _mapped_shm()
    return [path for path, mtime in _buffers_since(since) if now - mtime >= min_age and path.name not in mapped]


# torch's JIT builds (DeepSpeed's CPU ops, built at the first two-rank load) take a `lock` file in the extension's
# build directory (torch/utils/file_baton.py) and every later load waits for it to go: a build killed midway (a
# stand-in stopped while its ranks compile) leaves it, and every run after that hangs at the load. A build here
# takes a few minutes; a lock older than 20 is such a leftover.
def _stale_extension_locks(max_age: float = 1200.0) -> list[Path]:
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    now, found = time.time(), []
    for lock in root.glob("**/lock"):
        with contextlib.suppress(OSError):  # a build beside this session may finish and take its lock away
            if now - lock.stat().st_mtime > max_age:
                found.append(lock)
    return found


def pytest_sessionstart(session) -> None:
    for lock in _stale_extension_locks():
        with contextlib.suppress(OSError):
            lock.unlink()
            print(f"removed a stale torch extension build lock: {lock}", file=sys.stderr)


@pytest.hookimpl(trylast=True)  # after pytest's own, which tears the session's fixtures (the stand-ins) down
def pytest_sessionfinish(session, exitstatus) -> None:
    # A stopped stand-in's ranks take a moment to exit (and unmap their buffers): wait for them, 3 s at most
    # (another session's live ranks keep theirs mapped, and those are left alone).
    deadline = time.time() + 3
    while True:
        for path in stale_shm_buffers(_SESSION_START):
            with contextlib.suppress(OSError):
                path.unlink()
        if not _buffers_since(_SESSION_START) or time.time() > deadline:
            return
        time.sleep(0.5)


@pytest.fixture(scope="session")
def facts():
    return facts_mod.load(REGISTRY)


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

    return matrix.load(ROOT / "matrix.yaml", facts_mod.load(REGISTRY)).images


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


# --- the engine tier's shared fixtures (tests marked `engine`) ------------------------------------------
# pytest keeps one definition of a fixture per module that holds it, so a session fixture imported into a
# test module (`from test_build import local`) is set up again for that module. The engine tier's session
# state is therefore kept here, made once by whichever module asks first: one package server on one port
# (so BuildKit's cache answers the DJL step run after run) and one built local image.
_SESSION: dict = {}
TORCH_WHEEL = "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
SERVED: dict[str, str] = {}  # where the `local` fixture serves the stand-in packages
TEST_PACKAGES_PORT = 38779  # not the local matrix's 38771, which `make build` serves


def _wheelhouse() -> Path | None:
    for folder in os.environ.get("PIP_FIND_LINKS", "").split():
        if (Path(folder) / TORCH_WHEEL).is_file():
            return Path(folder)
    return None


def _start_local(tmp_path_factory) -> dict:
    from buildkit import engine
    from tests.local import prepare

    wheelhouse = _wheelhouse()
    if wheelhouse is None:
        return {"skip": f"no {TORCH_WHEEL} in $PIP_FIND_LINKS: the local matrix takes torch from that wheel"}
    try:
        engine.ensure_engine()
    except engine.EngineError as exc:
        return {"skip": f"no docker engine can run here: {exc}"}
    prepare.prepare(prepare.LOCAL_MATRIX)
    # The tests' own packages on a port of their own: a walkthrough's server on the matrix's fixed port
    # (make build leaves one for an hour) never answers for them. A fixed one where it is free: the package
    # URL is a build arg of the DJL step, so a URL that stays the same from run to run lets BuildKit's cache
    # answer that step and the DeepSpeed step after it (~1 min per build on 2 cores); the server is a thread
    # of this test run, so no earlier run can hold the port.
    packages = tmp_path_factory.mktemp("packages")
    for version in ("0.32.0", "0.31.0"):  # 0.31.0: the DJL-bump test
        prepare.standin_deb(version, packages)
    port = TEST_PACKAGES_PORT if prepare.port_free(TEST_PACKAGES_PORT) else 0
    server = prepare.PackageServer(packages, port, lifetime_s=3600).__enter__()
    SERVED["base"] = f"http://127.0.0.1:{server.port}/"
    return {"server": server, "info": {"wheelhouse": wheelhouse, "port": server.port,
                                       "dir": tmp_path_factory.mktemp("local"),
                                       "djl_url": SERVED["base"] + "djl-serving_0.32.0-1_all.deb"}}


@pytest.fixture(scope="session")
def local(tmp_path_factory):
    """Engine up, Debian base made, stand-in DJL packages built and served on loopback (once a session)."""
    owner = "local" not in _SESSION
    if owner:
        _SESSION["local"] = _start_local(tmp_path_factory)
    state = _SESSION["local"]
    if "skip" in state:
        pytest.skip(state["skip"])
    yield state["info"]
    if owner:
        state["server"].__exit__()


def local_matrix(directory: Path, repo: str, extra_lines: str = "", rerun_djl_step: bool = False,
                 **changes: str) -> Path:
    """The local matrix under another repository name (so tests do not see each other's tags).
    rerun_djl_step adds a nonce to the DJL package URL, so BuildKit's cache cannot answer that step."""
    from buildkit import lock
    from tests.local import prepare

    text = prepare.LOCAL_MATRIX.read_text().replace("http://127.0.0.1:38771/", SERVED["base"])
    if rerun_djl_step:
        text = text.replace('_all.deb"', f'_all.deb?run={uuid.uuid4().hex}"')
    text = text.replace("repository: lmi-local", f"repository: {repo}")
    text = text.replace("templates: ../templates", f"templates: {ROOT / 'templates'}")
    text = text.replace("output: .lmi/images-local", f"output: {directory / 'images'}")
    for old, new in changes.items():
        assert old in text, old
        text = text.replace(old, new)
    path = directory / f"{repo}.yaml"
    path.write_text(text + extra_lines)
    shutil.copyfile(lock.lock_path(prepare.LOCAL_MATRIX), lock.lock_path(path))  # its locks, beside it
    return path


def build(matrix: Path, local, *args: str, **kw) -> subprocess.CompletedProcess:
    return lmi("--matrix", str(matrix), "build", "--plain", "--wheelhouse", str(local["wheelhouse"]), *args, **kw)


def docker(*args: str) -> subprocess.CompletedProcess:
    from buildkit import engine

    return subprocess.run([engine.detect_client().path, *args], capture_output=True, text=True, timeout=900)


def tags_of(repo: str) -> set[str]:
    return set(docker("images", repo, "--format", "{{.Tag}}").stdout.split())


def remove_repo(repo: str) -> None:
    for tag in tags_of(repo):
        docker("rmi", "-f", f"{repo}:{tag}")


@pytest.fixture
def repo():
    name = f"lmi-test-{uuid.uuid4().hex[:8]}"
    yield name
    remove_repo(name)


@pytest.fixture(scope="session")
def local_image(local, tmp_path_factory):
    """The local matrix's image, built once a session under a repository of its own and shared by every test
    that only reads or runs it (each build under another name costs an export of 2 GB, even from the cache).
    `result` is that first build's (test_build checks its tags and labels)."""
    owner = "image" not in _SESSION
    if owner:
        name = f"lmi-shared-{uuid.uuid4().hex[:8]}"
        matrix = local_matrix(tmp_path_factory.mktemp("shared"), name)
        result = build(matrix, local)
        plan = json.loads(lmi("--matrix", str(matrix), "plan", "--json").stdout)[0] if result.returncode == 0 else {}
        _SESSION["image"] = {"repo": name, "matrix": matrix, "result": result, "plan": plan,
                             "ref": f"{name}:{plan.get('tag')}", "alias": f"{name}:djl0.32-cpu"}
    image = _SESSION["image"]
    assert image["result"].returncode == 0, image["result"].stdout[-3000:] + image["result"].stderr[-3000:]
    yield image
    if owner:
        remove_repo(image["repo"])


# --- what test modules share (a model, a server) ----------------------------------------------------------
# A module's own fixtures are set up once per module; what several modules use alike (the tiny Llama, the DJL
# stand-in's two passive ranks: ~20-30 s of start-up on 2 cores, mostly imports and the ranks' rendezvous) is
# kept here, made by whichever module asks first and shared by the modules whose tests differ only in their
# requests. Servers are stopped when the session ends.
class Shared:
    def __init__(self) -> None:
        self.values: dict = {}
        self.servers: list = []

    def get(self, key: str, make):
        """The value under key, made by make() the first time it is asked for."""
        if key not in self.values:
            self.values[key] = make()
        return self.values[key]

    def server(self, key: str, start):
        """A server (anything with stop()) under key, started by start() the first time; stopped at the end."""
        if key not in self.values:
            self.servers.append(self.get(key, start))
        return self.values[key]

    def close(self) -> None:
        for server in reversed(self.servers):
            server.stop()


@pytest.fixture(scope="session")
def shared():
    registry = Shared()
    yield registry
    registry.close()
