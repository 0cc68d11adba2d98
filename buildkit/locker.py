"""`lmi lock`: resolve each image's whole Python dependency set with uv, for the image's own Python and
platform (not this host's), into the sets of buildkit/lock.py.

Per set, uv resolves once and writes twice from its cache: pip-compile style (its `# via` annotations
are the dependency graph that splits the set into layers) and PEP 751 (the files for the target platform
with their sha256; a wheelhouse's files too). A profile's layer marked `alone` (an engine built in the image
from its sdist) is locked by itself with --no-deps: its requirements come from the profile's facts and are
resolved with the rest.

The package index: uv's default (PyPI), or the user's (--pip-index-url / LMI_PIP_INDEX_URL), handed to
uv in its environment so credentials never reach argv; nothing of an index URL is written to the lock.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

from . import build, fsutil, lock, render
from .errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

TIMEOUT_S = 900  # one resolution: metadata of a few hundred files on a slow index


class Unresolvable(Exception):
    """uv could not resolve a set here (an index it cannot reach, a pin that does not exist)."""


def uv_path() -> str:
    for candidate in (Path(sys.executable).with_name("uv"), shutil.which("uv")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise UserError("uv is not installed: `pip install uv` (`make venv` installs it with the dev tools)")


@functools.cache  # one `uv --version` per run, not one per set
def uv_version(uv: str) -> str:
    out = subprocess.run([uv, "--version"], capture_output=True, text=True, timeout=60, check=False)
    return " ".join(out.stdout.split()[:2]) or "uv"


def _env(index_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
    env.update(UV_NO_PROGRESS="1", UV_PYTHON_DOWNLOADS="never")
    if index_url:
        env["UV_DEFAULT_INDEX"] = index_url  # the environment, not argv: it may carry credentials
    ca = os.environ.get("SSL_CERT_FILE") or os.environ.get("PIP_CERT") or str(build.DEFAULT_CA_BUNDLE)
    if Path(ca).is_file():
        env["SSL_CERT_FILE"] = ca  # the host's CA bundle (a TLS-intercepting proxy), as pip uses it
    return env


def _redact(text: str, index_url: str | None) -> str:
    """uv hides an index's password itself; whatever it prints, the secret parts never pass on."""
    parts = urllib.parse.urlsplit(index_url or "")
    for secret in (parts.password, parts.username):
        if secret:
            text = text.replace(secret, "****")
    return text


def _compile(uv: str, reqs: Sequence[str], inputs: lock.Inputs, out_name: str, extra: Sequence[str],
             find_links: Sequence[Path], index_url: str | None, work: Path) -> str:
    src = work / f"{out_name}.in"
    src.write_text("".join(f"{r}\n" for r in reqs), encoding="utf-8")
    out = work / out_name
    cmd = [uv, "pip", "compile", str(src), "-o", str(out), "--quiet", "--no-header",
           "--python-version", inputs.python, "--python-platform", inputs.platform, *extra]
    for url in inputs.indexes:  # pip, in the image, takes the best match across its indexes: so does uv here
        cmd += ["--extra-index-url", url, "--index-strategy", "unsafe-best-match"]
    for folder in find_links:
        cmd += ["--find-links", str(folder)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=_env(index_url),
                              cwd=work, check=False)
    except subprocess.TimeoutExpired as exc:
        raise Unresolvable(f"uv did not finish in {TIMEOUT_S}s") from exc
    if done.returncode != 0:
        lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
        detail = " ".join(lines) if lines else f"uv exited {done.returncode}"
        detail = re.sub(r" in \d+(\.\d+)?m?s\b", "", detail)[:400]  # no timings: the lock file stays stable
        raise Unresolvable(_redact(detail, index_url))
    return out.read_text(encoding="utf-8")


def resolve(inputs: lock.Inputs, *, index_url: str | None = None, find_links: Sequence[Path] = (),
            uv: str | None = None) -> lock.LockSet:
    """Resolve one set. Raises Unresolvable with uv's reason when it cannot be resolved here."""
    uv = uv or uv_path()
    reqs = [r for layer in inputs.layers if layer not in inputs.alone for r in inputs.roots_of(layer)]
    with tempfile.TemporaryDirectory(prefix="lmi-lock-") as tmp:
        work = Path(tmp)
        graph_text = _compile(uv, reqs, inputs, "graph.txt", ["--annotation-style", "split"], find_links,
                              index_url, work)
        files_doc = tomllib.loads(_compile(uv, reqs, inputs, "pylock.toml", [], find_links, index_url, work))
        alone_docs = {layer: tomllib.loads(_compile(uv, inputs.roots_of(layer), inputs, f"pylock.{layer}.toml",
                                                    ["--no-deps"], find_links, index_url, work))
                      for layer in inputs.alone}
    versions_, edges = lock.parse_graph(graph_text)
    pins = lock.parse_pylock(files_doc)
    moved = sorted(n for n, v in versions_.items() if n in pins and pins[n].version != v)
    if moved or set(versions_) != set(pins):
        raise Unresolvable("the index changed between two reads of the same resolution "
                           f"({', '.join(moved[:3]) or 'different packages'}); run `lmi lock` again")
    alone = {}
    for layer, doc in alone_docs.items():
        (pin,) = lock.parse_pylock(doc).values()
        if not pin.hashes:
            raise Unresolvable(f"no sha256 for {pin.name}=={pin.version}")
        alone[layer] = pin
    return lock.LockSet(key=inputs.key, inputs=inputs.fingerprint, python=inputs.python, platform=inputs.platform,
                        indexes=inputs.indexes, resolver=uv_version(uv),
                        layers=lock.partition(inputs, pins, edges, alone))


def unresolved(inputs: lock.Inputs, why: str, uv: str | None = None) -> lock.LockSet:
    """A set recorded as not resolvable where `lmi lock` ran, for exactly these inputs."""
    return lock.LockSet(key=inputs.key, inputs=inputs.fingerprint, python=inputs.python, platform=inputs.platform,
                        indexes=inputs.indexes, resolver=uv_version(uv) if uv else "", unresolved=why)


def update(current: lock.LockFile, wanted: dict[str, tuple[lock.Inputs, list[str]]], *, upgrade: bool = False,
           index_url: str | None = None, find_links: Sequence[Path] = (),
           say: Callable[[str], None] = lambda _: None) -> tuple[dict[str, lock.LockSet], list[str]]:
    """Resolve the wanted sets that are missing or stale (all with upgrade); keep the others. Returns the
    sets and one line per set that could not be resolved here (recorded as not locked)."""
    uv = uv_path()
    sets, failed = dict(current.sets), []
    for key, (inputs, ids) in sorted(wanted.items()):
        old = sets.get(key)
        if old and old.inputs == inputs.fingerprint and not old.unresolved and not upgrade:
            say(f"  {key}: current ({len(ids)} images)")
            continue
        say(f"  {key}: resolving for Python {inputs.python}, {inputs.platform} ({len(ids)} images) ...")
        try:
            sets[key] = resolve(inputs, index_url=index_url, find_links=find_links, uv=uv)
        except Unresolvable as exc:
            sets[key] = unresolved(inputs, str(exc), uv)
            failed.append(f"set {key} ({', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''}) could not be "
                          f"resolved here: {exc}")
            continue
        say(f"  {key}: {sum(len(pins) for pins in sets[key].layers.values())} distributions locked")
    return sets, failed


def write(lockfile: lock.LockFile) -> None:
    """Replace the lock file atomically, keeping its mode."""
    fsutil.replace_text(lockfile.path, lockfile.dumps())


def relock(m, specs: list, *, whole: bool, upgrade: bool, index_url: str | None, find_links: Sequence[Path],
           say: Callable[[str], None]) -> tuple[Path, list[str], list[str]]:
    """`lmi lock`: resolve the dependency sets of `specs` into the matrix's lock file (with `whole`, the sets no
    image of the matrix uses any more are dropped), then re-render their contexts. (lock file, changed contexts,
    sets that could not be locked)."""
    path = lock.lock_path(m.path)
    wanted = lock.plan(specs, m.build_args)
    sets, failed = update(lock.load(path), wanted, upgrade=upgrade, index_url=index_url, find_links=find_links,
                          say=say)
    if whole:
        sets = {k: v for k, v in sets.items() if k in wanted}
    write(lock.LockFile(path, sets))
    renderer = render.for_matrix(m)
    changed = render.write([renderer.render(s) for s in specs], m.output, prune=False)
    return path, changed, failed
