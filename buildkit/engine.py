"""A small wrapper over the container engine.

Builds go through the docker CLI (the Python SDK cannot drive BuildKit); everything else (inspect, tag,
containers) through the docker SDK for Python. Which CLI can build with BuildKit is detected, never
assumed: `docker buildx build` where buildx is installed, else a client whose built-in BuildKit works
with DOCKER_BUILDKIT=1 (Debian's docker.io 20.10 does; a newer client without buildx does not).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import cache
from .errors import UserError

# How the project starts its own engine where none answers: no bridge, no iptables or forwarding, so
# containers only get the networks a build or test asks for (--network=host for builds, none for tests).
DOCKERD_FLAGS = ("--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false")
DOCKERD_LOG = Path("/var/log/lmi-dockerd.log")
PROBE_DOCKERFILE = b"FROM scratch\nLABEL io.lmi.probe=1\n"


class EngineError(UserError):
    """The engine or its client is missing or broken: say what was found and how to fix it."""


@dataclass(frozen=True)
class Client:
    """A docker CLI that can build with BuildKit."""

    path: str
    kind: str  # "buildx" or "buildkit" (classic client with built-in BuildKit)
    version: str

    def build_command(self) -> list[str]:
        return [self.path, "buildx", "build", "--load"] if self.kind == "buildx" else [self.path, "build"]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_BUILDKIT": "1"}

    @property
    def supports_cache_export(self) -> bool:
        """Registry cache export (--cache-to type=registry) needs buildx; classic BuildKit only does inline."""
        return self.kind == "buildx"


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 60), **kw)


def candidates(override: str | None) -> list[str]:
    """CLI binaries to try: an explicit override alone (the user asked for it), else `docker` on PATH,
    then Debian's /usr/bin/docker."""
    if override:
        return [override]
    found: list[str] = []
    for name in ("docker", "/usr/bin/docker"):
        path = shutil.which(name)
        if path and os.path.realpath(path) not in {os.path.realpath(p) for p in found}:
            found.append(path)
    return found


def _examine(path: str) -> list:
    """[kind or None, version, why not] for one CLI binary: buildx, else a real BuildKit probe build."""
    version = _run([path, "version", "--format", "{{.Client.Version}}"]).stdout.strip() or "unknown"
    if _run([path, "buildx", "version"]).returncode == 0:
        return ["buildx", version, ""]
    probe = subprocess.run([path, "build", "-q", "-"], input=PROBE_DOCKERFILE, capture_output=True,
                           env={**os.environ, "DOCKER_BUILDKIT": "1"}, timeout=120)
    if probe.returncode == 0:
        return ["buildkit", version, ""]
    reason = (probe.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
    return [None, version, f"no buildx, and DOCKER_BUILDKIT=1 build failed: {reason}"]


@functools.cache
def detect_client(override: str | None = None) -> Client:
    tried = []
    for path in candidates(override):
        # Remembered per binary identity (and buildx plugin dirs), so a re-run does not probe again; a new
        # or upgraded client or plugin is examined afresh.
        watched = [Path(path).resolve()] + [p for p in _buildx_plugins() if p.exists()]
        kind, version, why = cache.memo("clients", path, cache.signature(watched), lambda p=path: _examine(p),
                                        keep=lambda found: found[0] is not None)
        if kind:
            return Client(path, kind, version)
        tried.append(f"{path} (client {version}): {why}")
    if not tried:
        raise EngineError("no docker client found; run `make engine` (installs Debian's docker.io) or put a "
                          "docker CLI with buildx on PATH")
    raise EngineError("no docker client here can build with BuildKit: " + "; ".join(tried) +
                      ". Install the buildx plugin, or use Debian's docker.io client (--docker /usr/bin/docker, "
                      "or the DOCKER environment variable)")


def _buildx_plugins() -> list[Path]:
    dirs = [Path.home() / ".docker/cli-plugins", Path("/usr/local/lib/docker/cli-plugins"),
            Path("/usr/libexec/docker/cli-plugins"), Path("/usr/lib/docker/cli-plugins")]
    return [d / "docker-buildx" for d in dirs]


def sdk():
    """A docker SDK client for the engine (DOCKER_HOST and friends respected)."""
    import docker  # imported here: `lmi validate` and friends need no engine

    try:
        client = docker.from_env(timeout=120)
        client.ping()
        return client
    except Exception as exc:  # the SDK raises several types for "not there"
        raise EngineError(f"the docker engine does not answer ({exc.__class__.__name__}: {exc}); "
                          "start it with `make engine` (or `lmi engine`)") from exc


def engine_answers() -> bool:
    try:
        sdk()
        return True
    except EngineError:
        return False


def ensure_engine(wait_s: float = 60.0) -> str:
    """Make sure an engine answers: install Debian's docker.io if dockerd is missing, start dockerd if it
    is not running. Returns what was done. Does nothing when an engine already answers."""
    if engine_answers():
        return "engine already running"
    done = []
    if not shutil.which("dockerd"):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise EngineError("no docker engine answers and dockerd is not installed; install Debian's docker.io "
                              "(apt-get install docker.io) as root, or point DOCKER_HOST at an engine")
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker.io"]):
            result = _run(cmd, timeout=900, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            if result.returncode:
                raise EngineError(f"`{' '.join(cmd)}` failed: {result.stderr.strip()[-300:]}")
        done.append("installed docker.io")
    if os.geteuid() != 0:
        raise EngineError("dockerd is installed but not running, and starting it needs root; run `make engine` "
                          "as root or start the docker service")
    log = DOCKERD_LOG.open("ab")
    # setsid: dockerd outlives this process and the make target that started it.
    subprocess.Popen(["dockerd", *DOCKERD_FLAGS], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                     start_new_session=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if engine_answers():
            done.append(f"started dockerd {' '.join(DOCKERD_FLAGS)} (log: {DOCKERD_LOG})")
            return "; ".join(done)
        time.sleep(0.5)
    tail = DOCKERD_LOG.read_text(errors="replace").strip().splitlines()[-3:]
    raise EngineError(f"dockerd did not answer within {wait_s:.0f} s; last log lines: {' | '.join(tail)}")


def image_exists(client, ref: str) -> bool:
    import docker.errors

    try:
        client.images.get(ref)
        return True
    except docker.errors.ImageNotFound:
        return False


def present(client, refs: list[str]) -> set[str]:
    """Which of `refs` (name:tag) the engine holds, asked in one query (`docker images` with one reference
    filter per ref) instead of one per ref. A ref the list does not name as written (e.g. spelled with
    docker.io/) is asked alone, so the answer is image_exists' for every ref."""
    wanted = sorted(set(refs))
    if not wanted:
        return set()
    listed = {tag for image in client.api.images(filters={"reference": wanted}) for tag in image.get("RepoTags") or ()}
    return {ref for ref in wanted if ref in listed or image_exists(client, ref)}


def normalize(ref: str) -> str:
    """'ubuntu:24.04' -> 'library/ubuntu:24.04' (how registries and pull-through caches name them)."""
    name = ref.split("@")[0].rsplit(":", 1)[0]
    first = name.split("/")[0]
    if "/" not in name:
        return "library/" + ref
    if "." in first or ":" in first or first == "localhost":
        return ref.split("/", 1)[1]  # drop a registry host; the mirror replaces it
    return ref


def mirrored(ref: str, mirror: str | None) -> str:
    """A base image reference through a mirror prefix (an ECR pull-through cache, an internal registry)."""
    return f"{mirror.rstrip('/')}/{normalize(ref)}" if mirror else ref
