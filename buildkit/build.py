"""Build rendered contexts with BuildKit: parallel, keep-going, incremental by content hash.

An image whose content-hash tag already exists is skipped, so a no-change re-run builds nothing. A
build is tagged only after it succeeded, and the content-hash tag goes last: an interrupted run never
leaves an image that a later run would mistake for complete.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import cache, engine, matrix, render
from .engine import Client
from .errors import UserError
from .matrix import Matrix
from .progress import Progress
from .provenance import base_roles
from .render import Context
from .spec import ImageSpec, PlannedImage

DEFAULT_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
STEP = re.compile(r"^#\d+ \[([^\]]+)\] (.*)$")
PULL_FAILURE = re.compile(r"failed to resolve source metadata|pull access denied|manifest unknown|not found|"
                          r"failed to do request|no such host|connection refused|unauthorized", re.I)
TAIL_LINES = 12


@dataclass(frozen=True)
class BuildOptions:
    jobs: int = 1
    force: bool = False
    base_mirror: str | None = None
    pip_index_url: str | None = None
    wheelhouse: Path | None = None
    ca_bundle: Path | None = None  # passed as the BuildKit secret `ca`; never a build arg
    build_args: dict[str, str] = field(default_factory=dict)
    registry: str | None = None  # image name prefix, e.g. 127.0.0.1:5000/team
    log_dir: Path = Path(".lmi/logs")
    pin_bases: bool = False  # build from the digest each base tag points at now (it enters the hash)


def prefix(option: str, value: str | None) -> str | None:
    """A registry prefix option (--registry, --base-mirror), refused in one line when outside its grammar."""
    problem = value and matrix.prefix_problem(value)
    if problem:
        raise UserError(f"{option} {value!r}: {problem}")
    return value


def options(m: Matrix, *, build_args: list[str], pip_index_url: str | None, base_mirror: str | None,
            registry: str | None, wheelhouse: str | None, ca_bundle: str | None, jobs: int = 1, force: bool = False,
            pin_bases: bool = False) -> BuildOptions:
    """The options of `lmi build`/`plan`/`bake`/`ci-matrix`, each checked: KEY=VALUE build arguments within the
    matrix's grammar, an index URL without control characters, registry prefixes within theirs."""
    extra = {}
    for pair in build_args:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--build-arg {pair!r}: expected KEY=VALUE")
        problem = matrix.build_arg_problem(key, value)
        if problem:
            raise UserError(f"--build-arg: {problem}")
        extra[key] = value
    if pip_index_url and any(ord(c) < 32 or ord(c) == 127 for c in pip_index_url):
        raise UserError("--pip-index-url (or $LMI_PIP_INDEX_URL) holds a control character (a line break?); "
                        "remove it")
    return BuildOptions(
        jobs=jobs, force=force, base_mirror=prefix("--base-mirror", base_mirror) or m.base_mirror,
        pip_index_url=pip_index_url, wheelhouse=Path(wheelhouse) if wheelhouse else None,
        ca_bundle=Path(ca_bundle) if ca_bundle else None, build_args=extra,
        registry=prefix("--registry", registry), pin_bases=pin_bases,
    )


@dataclass
class Result:
    id: str
    state: str  # built | skipped | failed | interrupted
    seconds: float = 0.0
    log: Path | None = None
    image_id: str | None = None
    tags: tuple[str, ...] = ()
    reason: str = ""
    tail: list[str] = field(default_factory=list)


def repository(spec: ImageSpec, registry: str | None) -> str:
    return f"{registry.rstrip('/')}/{spec.repository}" if registry else spec.repository


def plan(m: Matrix, specs: list[ImageSpec], options: BuildOptions, client: Client | None = None
         ) -> list[tuple[PlannedImage, Context]]:
    """render.plan with what this host adds: base digests asked of their registry (--pin-bases) and the
    wheelhouse packaged as an image (when a client will build). Used by lmi plan, build, bake and ci-matrix,
    so all of them print the hash a build labels its image with."""
    renderer = render.for_matrix(m)
    pinned = pin_bases(specs, options.base_mirror) if options.pin_bases else {}
    wheels = wheelhouse_ref(options.wheelhouse) if options.wheelhouse else None
    if wheels and client:
        ensure_wheelhouse_image(client, options.wheelhouse, wheels)
    return render.plan(specs, renderer, m.build_args, extra_args=options.build_args, pinned=pinned,
                       host_args=lambda spec: host_args(spec, options, pinned, wheels))


def pin_bases(specs: list[ImageSpec], mirror: str | None) -> dict[str, str]:
    """Each base image -> the digest its tag points at now, asked of the registry it is pulled from."""
    from .ci import digest_of

    return {base: digest_of(engine.mirrored(base, mirror)) for base in sorted({b for s in specs for b in s.bases})}


def host_args(spec: ImageSpec, options: BuildOptions, pinned: dict[str, str], wheelhouse: str | None
              ) -> dict[str, str]:
    """The build args that say where this host fetches things from: a base mirror (and the pinned digest),
    the package index, the wheelhouse image. They are not in the content hash (render.plan)."""
    args = {}
    for role, base in base_roles(spec).items():
        key = f"{role.upper()}_IMAGE"
        if base and (options.base_mirror or base in pinned):
            ref = engine.mirrored(base, options.base_mirror)
            args[key] = f"{_untagged(ref)}@{pinned[base]}" if base in pinned and "@" not in ref else ref
    if options.pip_index_url:
        # Without its credentials: those travel as the BuildKit secret pip_index_url, never as an argument.
        args["PIP_INDEX_URL"] = redact_credentials(options.pip_index_url)
    if wheelhouse:
        args["WHEELHOUSE"] = wheelhouse
        args["PIP_FIND_LINKS"] = "/wheelhouse"
    return args


def _untagged(ref: str) -> str:
    """`ref` without its tag (a port's colon stays): the name to pin a digest to."""
    name, colon, tag = ref.rpartition(":")
    return name if colon and "/" not in tag else ref


def bake_file(planned: list[tuple[PlannedImage, Context]], options: BuildOptions, output: Path) -> dict:
    """A docker buildx bake file: one target per image (context, tags, args, labels, secrets, cache), for
    remote or Kubernetes BuildKit builders. The index's credentials are never in it."""
    targets = {}
    for p, _ in planned:
        repo = repository(p.spec, options.registry)
        target = {
            "context": os.path.relpath(output / p.spec.id),
            "dockerfile": "Dockerfile",
            "tags": [f"{repo}:{t}" for t in p.tags],
            "args": p.build_args,
            "labels": {"io.lmi.content-hash": p.content_hash},
            "network": "host",
            "secret": [f"id=ca,src={options.ca_bundle or DEFAULT_CA_BUNDLE}"]
            + (["id=pip_index_url,env=LMI_PIP_INDEX_URL"] if has_credentials(options.pip_index_url) else []),
        }
        if options.wheelhouse:  # buildx: the folder itself replaces the `wheelhouse` stage
            target["contexts"] = {"wheelhouse": str(options.wheelhouse.resolve())}
        if options.registry:
            cache_ref = f"{repo}:buildcache-{p.spec.id}"
            target["cache-from"] = [f"type=registry,ref={cache_ref}"]
            target["cache-to"] = [f"type=registry,ref={cache_ref},mode=max"]
        targets[bake_target(p.spec.id)] = target
    return {"group": {"default": {"targets": list(targets)}}, "target": targets}


def bake_target(image_id: str) -> str:
    return image_id.replace(".", "_")  # bake target names allow [A-Za-z0-9_-] only


def redact_credentials(url: str) -> str:
    """The URL without user:password@ (the content hash and logs see this one)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def has_credentials(url: str | None) -> bool:
    return bool(url) and "@" in urllib.parse.urlsplit(url).netloc


def wheelhouse_ref(directory: Path) -> str:
    """The wheelhouse's identity: a tag made of the hash of its wheels, so a changed wheelhouse changes the
    content hash of every image that uses it (lmi build and bake compute the same one)."""
    if not directory.is_dir():
        raise UserError(f"{directory}: wheelhouse directory not found; pass an existing folder to --wheelhouse")
    files = sorted(p for p in directory.rglob("*") if p.is_file())

    def digest() -> str:
        h = hashlib.sha256()
        for path in files:
            h.update(str(path.relative_to(directory)).encode())
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()[:16]

    return "lmi-wheelhouse:" + cache.memo("wheelhouse", str(directory.resolve()), cache.signature(files), digest)


def ensure_wheelhouse_image(client: Client, directory: Path, ref: str) -> None:
    """Package the wheel folder as a scratch image that the Dockerfiles mount at /wheelhouse (classic
    BuildKit clients have no named build contexts)."""
    if engine.image_exists(engine.sdk(), ref):
        return
    result = subprocess.run([*client.build_command(), "-q", "-t", ref, "-f", "-", str(directory)],
                            input=b"FROM scratch\nCOPY . /\n", capture_output=True, env=client.env)
    if result.returncode:
        raise UserError(f"{directory}: could not package the wheelhouse: "
                        f"{result.stderr.decode(errors='replace').strip()[-300:]}")


def _command(client: Client, planned: PlannedImage, context: Path, options: BuildOptions, iidfile: Path,
             ca: Path | None, index_secret: Path | None = None) -> list[str]:
    spec = planned.spec
    cmd = [*client.build_command(), "--network=host", "--progress=plain", "--iidfile", str(iidfile),
           "--label", f"io.lmi.content-hash={planned.content_hash}",
           "--label", f"org.opencontainers.image.created={datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}"]
    if ca:
        cmd += ["--secret", f"id=ca,src={ca}"]
    if index_secret:
        cmd += ["--secret", f"id=pip_index_url,src={index_secret}"]
    for key, value in sorted(planned.build_args.items()):
        cmd += ["--build-arg", f"{key}={value}"]
    if options.registry:
        repo = repository(spec, options.registry)
        if client.supports_cache_export:
            cache = f"{repo}:buildcache-{spec.id}"
            cmd += ["--cache-from", f"type=registry,ref={cache}", "--cache-to", f"type=registry,ref={cache},mode=max"]
        else:  # classic BuildKit: cache metadata inline in the pushed image, reused from the floating alias
            cmd += ["--build-arg", "BUILDKIT_INLINE_CACHE=1"] + [
                arg for alias in spec.aliases[:1] for arg in ("--cache-from", f"{repo}:{alias}")]
    return [*cmd, str(context)]


class Builder:
    """Runs the builds of one `lmi build` invocation."""

    def __init__(self, client: Client, options: BuildOptions, progress: Progress) -> None:
        self.client = client
        self.options = options
        self.progress = progress
        self.sdk = engine.sdk()
        self.stopping = threading.Event()
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        ca = options.ca_bundle if options.ca_bundle is not None else DEFAULT_CA_BUNDLE
        self.ca = ca if ca and ca.is_file() else None
        if options.ca_bundle is not None and self.ca is None:
            raise UserError(f"{options.ca_bundle}: CA bundle not found; pass an existing file to --ca-bundle")
        self.present: set[str] = set()  # content-hash tags the engine holds (asked once, in build_all)
        self.index_secret: Path | None = None
        if has_credentials(options.pip_index_url):
            # The URL with its credentials, readable by this user only, for the builds' secret mount.
            fd, name = tempfile.mkstemp(prefix="lmi-pip-index-")
            with os.fdopen(fd, "w") as fh:
                fh.write(options.pip_index_url)
            self.index_secret = Path(name)
            atexit.register(self.index_secret.unlink, missing_ok=True)

    def build_all(self, work: list[tuple[PlannedImage, Path]]) -> list[Result]:
        results: dict[str, Result] = {}
        if not self.options.force:  # one engine query for every image, not one per image
            self.present = engine.present(self.sdk, [self._hash_ref(p) for p, _ in work])
        pool = ThreadPoolExecutor(max_workers=max(1, self.options.jobs), thread_name_prefix="lmi-build")
        futures: dict[Future, str] = {pool.submit(self._one, p, ctx): p.spec.id for p, ctx in work}
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in done:
                    results[futures[fut]] = fut.result()
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM turned into one by the CLI
            self.interrupt()
            for fut in futures:
                fut.cancel()
            for fut, image_id in futures.items():
                if not fut.cancelled():
                    results[image_id] = fut.result()
            for image_id in futures.values():
                results.setdefault(image_id, Result(image_id, "interrupted", reason="not started"))
            raise BuildInterrupted([results[p.spec.id] for p, _ in work]) from stop
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return [results[p.spec.id] for p, _ in work]

    def interrupt(self) -> None:
        """Stop every running build (its whole process group) and tag nothing more."""
        with self._lock:  # the same lock _run registers under: no build can slip between the two
            self.stopping.set()
            procs = list(self._procs.values())
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)

    def _one(self, planned: PlannedImage, context: Path) -> Result:
        spec = planned.spec
        repo = repository(spec, self.options.registry)
        if self.stopping.is_set():
            return Result(spec.id, "interrupted", reason="not started")
        if not self.options.force and self._hash_ref(planned) in self.present:
            self.progress.finish(spec.id, "skipped", f"{repo}:{planned.hash_tag} exists")
            return Result(spec.id, "skipped", tags=tuple(f"{repo}:{t}" for t in planned.tags),
                          reason="content hash unchanged")
        self.options.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.options.log_dir / f"{spec.id}.log"
        self.progress.start(spec.id)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="lmi-") as tmp:
            iidfile = Path(tmp) / "iid"
            cmd = _command(self.client, planned, context, self.options, iidfile, self.ca, self.index_secret)
            code = self._run(spec.id, cmd, log)
            image_id = iidfile.read_text().strip() if code == 0 and iidfile.exists() else None
        seconds = time.monotonic() - started
        if self.stopping.is_set():
            self.progress.finish(spec.id, "interrupted")
            return Result(spec.id, "interrupted", seconds, log, reason="interrupted")
        if image_id is None:
            tail = _tail(log)
            reason = _explain(tail, planned) or f"build failed (exit {code})"
            self.progress.finish(spec.id, "failed", reason)
            return Result(spec.id, "failed", seconds, log, reason=reason, tail=tail)
        tags = self._tag(image_id, repo, planned)
        self.progress.finish(spec.id, "built", f"{repo}:{spec.tag}")
        return Result(spec.id, "built", seconds, log, image_id, tags)

    def _hash_ref(self, planned: PlannedImage) -> str:
        return f"{repository(planned.spec, self.options.registry)}:{planned.hash_tag}"

    def _run(self, image_id: str, cmd: list[str], log: Path) -> int:
        with log.open("w", encoding="utf-8") as out:
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            # A session of its own: Ctrl-C reaches us, and we stop the whole build tree ourselves.
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.client.env,
                                    start_new_session=True, text=True, errors="replace")
            with self._lock:
                self._procs[image_id] = proc
                late = self.stopping.is_set()  # Ctrl-C came while this build was starting
            if late:
                _signal_group(proc, signal.SIGKILL)
            try:
                for line in proc.stdout:
                    out.write(line)
                    match = STEP.match(line.strip())
                    if match:
                        self.progress.step(image_id, f"{match.group(1)} {match.group(2)}"[:100])
                return proc.wait()
            finally:
                with self._lock:
                    self._procs.pop(image_id, None)

    def _tag(self, image_id: str, repo: str, planned: PlannedImage) -> tuple[str, ...]:
        image = self.sdk.images.get(image_id)
        ordered = [planned.spec.tag, *planned.spec.aliases, planned.hash_tag]  # content hash last: "complete"
        for tag in ordered:
            image.tag(repo, tag)
        return tuple(f"{repo}:{t}" for t in ordered)


class BuildInterrupted(Exception):
    def __init__(self, results: list[Result]) -> None:
        super().__init__("interrupted")
        self.results = results


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _tail(log: Path) -> list[str]:
    lines = log.read_text(errors="replace").splitlines()
    return lines[-TAIL_LINES:]


def _explain(tail: list[str], planned: PlannedImage) -> str:
    """Turn BuildKit's failure into what the user can do about it, where we recognise it."""
    text = "\n".join(tail)
    spec, args = planned.spec, planned.build_args
    bases = [args.get(f"{role.upper()}_IMAGE", base) for role, base in base_roles(spec).items()]
    for base in filter(None, bases):
        name = base.rsplit(":", 1)[0] if "@" not in base else base.split("@")[0]
        if PULL_FAILURE.search(text) and (name in text or name.split("/", 1)[-1] in text):
            return (f"base image {base} cannot be pulled: set a mirror with --base-mirror PREFIX (e.g. an ECR "
                    "pull-through cache), or `docker load` the image and build again")
    for line in reversed(tail):
        if "ERROR" in line or "error:" in line.lower():
            return line.strip()[:300]
    return ""


def select_shard(items: list, shard: str | None) -> list:
    """`I/N`: the I-th of N deterministic slices (1-based), for CI fan-out."""
    if not shard:
        return items
    match = re.fullmatch(r"(\d+)/(\d+)", shard)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise UserError(f"--shard {shard}: expected I/N with 1 <= I <= N, e.g. --shard 2/4")
    index, count = int(match.group(1)), int(match.group(2))
    return [item for i, item in enumerate(items) if i % count == index - 1]


def planned(m: Matrix, specs: list[ImageSpec], options: BuildOptions, client: Client | None, shard: str | None,
            require_locks: bool = False) -> list[tuple[PlannedImage, Context]]:
    """The shard's specs planned as they will be built (`plan`). With require_locks, an image whose context has no
    current lock is refused before anything is built."""
    from . import lock

    specs = select_shard(specs, shard)
    if not specs:
        raise UserError(f"shard {shard} has no images; use fewer shards")
    out = plan(m, specs, options, client)
    if require_locks:
        lock.refuse_unlocked(lock.load(lock.lock_path(m.path)), m.build_args, out)
    return out
