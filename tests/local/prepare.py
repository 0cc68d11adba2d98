"""Prepare what the local test matrix needs on a machine without internet access:

- base images made from Debian packages with mmdebstrap (it reads the host's apt sources) and
  `docker import`, tagged under the matrix's base_mirror, and made only once;
- a real .deb of the DJL Serving stand-in (DJL's own package cannot be fetched here), built
  reproducibly so its sha256 is stable, and served on loopback for the builds (--network=host).

Run as `python -m tests.local.prepare [--matrix tests/matrix.local.yaml]`; the Makefile does it for
`make build MATRIX=tests/matrix.local.yaml`.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from buildkit import engine, facts, matrix  # noqa: E402
from buildkit.profiles import REGISTRY  # noqa: E402

LOCAL_MATRIX = ROOT / "tests" / "matrix.local.yaml"
STANDIN = Path(__file__).with_name("djl_serving_standin.py")
STANDIN_LIB = Path(__file__).with_name("standin")  # the worker and the djl_python API it offers handlers
PACKAGES = ROOT / ".lmi" / "local-packages"
EPOCH = "1700000000"  # fixed timestamps: the same .deb bytes on every machine
SUITES = {"debian:12": "bookworm"}
CUDA_CONTEXT = Path(__file__).with_name("cuda")
# Bases made from Debian packages by tests/local/cuda/Dockerfile: ref -> (its target, the OS it is made on).
CUDA_BASES = {"lmi/cuda:12.4.1-devel-debian12": ("devel", "debian:12"),
              "lmi/cuda:12.4.1-base-debian12": ("base", "debian:12")}


def ensure_tool(name: str, package: str) -> None:
    if shutil.which(name):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit(f"error: {name} is missing; install Debian's {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package], check=True, env=env)


def ensure_base(image: str, mirror: str) -> str:
    """Make `image` (e.g. debian:12) available as <mirror>/library/<image> without pulling anything."""
    ref = engine.mirrored(image, mirror)
    if engine.image_exists(engine.sdk(), ref):
        return f"{ref} (cached)"
    if image in CUDA_BASES:
        target, system = CUDA_BASES[image]
        ensure_base(system, mirror)
        client = engine.detect_client()
        subprocess.run([client.path, "build", "--network=host", "--target", target, "--build-arg",
                        f"DEBIAN_IMAGE={engine.mirrored(system, mirror)}", "-t", ref, str(CUDA_CONTEXT)],
                       check=True, stdout=subprocess.DEVNULL, env={**os.environ, "DOCKER_BUILDKIT": "1"})
        return f"{ref} (CUDA 12.4 from Debian packages)"
    suite = SUITES.get(image)
    if not has_recipe(image):
        sys.exit(f"error: no recipe for a local {image}; known: {', '.join([*SUITES, *CUDA_BASES])}")
    ensure_tool("mmdebstrap", "mmdebstrap")
    with tempfile.TemporaryDirectory(prefix="lmi-base-") as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        subprocess.run(["mmdebstrap", "--quiet", "--variant=apt", suite, str(tarball)], check=True)
        subprocess.run([engine.detect_client().path, "import", str(tarball), ref], check=True,
                       stdout=subprocess.DEVNULL)
    return f"{ref} (made with mmdebstrap)"


def standin_facts(version: str) -> dict:
    """What the stand-in reads to behave as DJL Serving <version> does (buildkit/data/djl.yaml, behaviour)."""
    return {"version": version, "behaviour": facts.load(REGISTRY).stacks["deepspeed"].djl_behaviour_at(version)}


def standin_deb(version: str, out_dir: Path = PACKAGES) -> Path:
    """Build djl-serving_<version>-1_all.deb holding the stand-in and the DJL facts of <version> it follows,
    byte-for-byte reproducibly."""
    out_dir.mkdir(parents=True, exist_ok=True)
    deb = out_dir / f"djl-serving_{version}-1_all.deb"
    with tempfile.TemporaryDirectory(prefix="lmi-deb-") as tmp:
        root = Path(tmp) / "pkg"
        (root / "DEBIAN").mkdir(parents=True)
        (root / "usr" / "bin").mkdir(parents=True)
        (root / "DEBIAN" / "control").write_text(
            f"Package: djl-serving\nVersion: {version}-1\nArchitecture: all\nMaintainer: lmi-buildkit tests\n"
            "Description: DJL Serving stand-in for offline tests (not DJL Serving)\n")
        target = root / "usr" / "bin" / "djl-serving"
        shutil.copy(STANDIN, target)
        target.chmod(0o755)
        lib = root / "usr" / "lib" / "djl-serving-standin"
        shutil.copytree(STANDIN_LIB, lib, ignore=shutil.ignore_patterns("__pycache__"))
        (lib / "djl-facts.json").write_text(json.dumps(standin_facts(version), indent=1, sort_keys=True) + "\n")
        for path in lib.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        for path in sorted([root, *root.rglob("*")], reverse=True):
            os.utime(path, (int(EPOCH), int(EPOCH)))
        built = Path(tmp) / "out.deb"
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(built)], check=True,
                       stdout=subprocess.DEVNULL, env={**os.environ, "SOURCE_DATE_EPOCH": EPOCH})
        if not deb.exists() or deb.read_bytes() != built.read_bytes():
            shutil.move(built, deb)
    return deb


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class PackageServer:
    """Serves a folder on a loopback port, for a bounded time, in a daemon thread."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    def __init__(self, directory: Path, port: int, lifetime_s: float) -> None:
        """port 0: an ephemeral port of its own (see .port), so nothing else can answer in its place."""
        handler = lambda *a, **kw: self.Quiet(*a, directory=str(directory), **kw)  # noqa: E731
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.port = self.httpd.server_address[1]
        self.deadline = time.monotonic() + lifetime_s
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self.httpd.timeout = 1
        while time.monotonic() < self.deadline:
            self.httpd.handle_request()
        self.httpd.server_close()

    def __enter__(self) -> PackageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.deadline = 0
        self.thread.join(5)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def bases_wanted(m, f) -> list[str]:
    """The base images a local matrix's images are built on, each once: a line's `bases` maps a profile's base
    name (runtime, builder, ...) to the image to make; without it the OS's own image."""
    return list(dict.fromkeys(ref for image in m.images
                              for ref in (tuple((image.bases or {}).values()) or (f.systems[image.combo.os].image,))))


def has_recipe(ref: str) -> bool:
    return ref in SUITES or ref in CUDA_BASES


def prepare(matrix_path: Path) -> dict:
    """Everything the given local matrix needs; returns where the stand-in is served from."""
    f = facts.load(REGISTRY)
    m = matrix.load(matrix_path, f)
    engine.ensure_engine()
    made = [ensure_base(ref, m.base_mirror or "lmi-local") for ref in bases_wanted(m, f)]
    url = urlparse(m.build_args.get("DJL_SERVING_URL", ""))
    versions = sorted({image.combo.part("djl") for image in m.images} - {None})
    debs = [standin_deb(v) for v in versions]
    return {"bases": sorted(set(made)), "debs": debs, "port": url.port, "host": url.hostname}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", type=Path, default=LOCAL_MATRIX)
    parser.add_argument("--serve", type=float, default=0, metavar="SECONDS",
                        help="then serve the packages on the matrix's loopback port for this long (detached)")
    args = parser.parse_args()
    info = prepare(args.matrix)
    for line in info["bases"]:
        print(f"base: {line}")
    for deb in info["debs"]:
        print(f"stand-in package: {deb} sha256 {sha256(deb)}")
    if args.serve and info["port"]:
        if info["host"] not in ("127.0.0.1", "localhost"):
            sys.exit("error: the stand-in is only ever served on loopback")
        if not port_free(info["port"]):
            print(f"port {info['port']} already serves (a previous prepare); leaving it")
            return
        # A detached child that serves for --serve seconds, then exits by itself.
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
                f"from tests.local.prepare import PackageServer; "
                f"s = PackageServer(Path({str(PACKAGES)!r}), {info['port']}, {args.serve}); s._serve()")
        subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(50):
            if not port_free(info["port"]):
                break
            time.sleep(0.1)
        print(f"serving {PACKAGES} on 127.0.0.1:{info['port']} for {args.serve:.0f} s")


if __name__ == "__main__":
    main()
