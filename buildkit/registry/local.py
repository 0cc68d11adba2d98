"""The embedded local registry: Debian's docker-registry on a loopback address, started when absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import UserError
from .address import is_loopback


def registry_answers(host: str) -> bool:
    try:
        urllib.request.urlopen(f"http://{host}/v2/", timeout=2)
        return True
    except urllib.error.HTTPError as exc:
        return exc.code == 401  # up, wants credentials
    except (urllib.error.URLError, OSError):
        return False


def ensure_local_registry(host: str = "127.0.0.1:5000", root: Path = Path(".lmi/registry"),
                          htpasswd: Path | None = None, wait_s: float = 30) -> str:
    """Start Debian's docker-registry on a loopback address when nothing answers there."""
    if registry_answers(host):
        return f"registry already answers on {host}"
    address, _, port = host.rpartition(":")
    if not is_loopback(host):
        raise UserError(f"{host}: the embedded registry only ever listens on loopback")
    binary = shutil.which("docker-registry")
    if not binary:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise UserError("no registry answers on 127.0.0.1:5000 and docker-registry is not installed; "
                            "install Debian's docker-registry, or give --registry")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker-registry"], check=True,
                       env=env, capture_output=True)
        binary = shutil.which("docker-registry")
    root = root.resolve()
    (root / "data").mkdir(parents=True, exist_ok=True)
    auth = (f"auth:\n  htpasswd:\n    realm: lmi\n    path: {htpasswd.resolve()}\n" if htpasswd else "")
    config = root / f"config-{port}.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                      f"    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
                      f"http:\n  addr: {host}\n{auth}")
    log = (root / f"registry-{port}.log").open("ab")
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if registry_answers(host):
            (root / f"registry-{port}.pid").write_text(str(proc.pid))
            return f"started docker-registry on {host} (data in {root / 'data'})"
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise UserError(f"docker-registry did not start on {host}; see {root / f'registry-{port}.log'}")
