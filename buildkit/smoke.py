"""Smoke tests: checks generated from the matrix, run against built images, and the record that
publishing obeys.

Each check is a small typed record (container-structure-test style). In-image checks (claims, files,
user commands, the GPU tier) run through lmi_check.py inside a container with --network=none; the
checker is not part of the image: it is mounted read-only into each test container (as docker-library's
official-images runs its tests) together with the checks of the image's profile (its CHECKER), and the
record names both by sha256; metadata and size are read from the engine; the serving tier starts the image
with its real entrypoint and talks to it over the container's own loopback. Every container is removed
afterwards, on failure and on Ctrl-C too.

What varies by profile is asked of it (buildkit/profiles/<name>.py): `checks(spec)` (its builtins per
tier, core ones included), `SERVING_FILES` (file checks of its serving configuration), `SERVING_ENV` (the
environment its image sets) and `SERVING_WAYS` (how its image serves: the tiny model, the configuration,
the request bodies and answer checks).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, engine
from .errors import UserError
from .interface import CHECK_DIR, CHECK_MODULE, MODEL_DIR, Client, ServingWay  # the profiles' serving ways

if TYPE_CHECKING:
    from .spec import ImageSpec

TIERS = ("cpu", "gpu", "serving")
RECORD_SCHEMA = 1
RECORD_DIR = Path(".lmi/smoke")
CHECKER = Path(__file__).parent / "resources" / "check" / "lmi_check.py"  # the in-image checks, kept out of the image
RUN_LABEL = "io.lmi.smoke-run"
ENTRYPOINT = "/usr/local/bin/dockerd-entrypoint.sh"


@dataclass(frozen=True)
class Check:
    """One check: where it runs (in the image or on the host), its tier and what it verifies."""

    name: str
    tier: str
    kind: str  # builtin | command | file (in the image); metadata | size | serving (host side)
    params: dict = field(default_factory=dict)

    @property
    def in_image(self) -> bool:
        return self.kind in ("builtin", "command", "file")

    def record(self) -> dict:
        return {"name": self.name, "tier": self.tier, "kind": self.kind, **self.params}


@dataclass
class Outcome:
    name: str
    tier: str
    passed: bool | None  # None: skipped
    message: str
    seconds: float = 0.0


def generate(spec: ImageSpec, tiers: tuple[str, ...]) -> list[Check]:
    """Every check of one image, derived from its spec, its profile and the user checks of its matrix line."""
    profile = spec.profile
    builtins = profile.checks(spec)
    checks: list[Check] = []
    if "cpu" in tiers:
        checks += [Check(name, "cpu", "builtin") for name in builtins.get("cpu", ())]
        checks.append(Check("entrypoint-file", "cpu", "file", {"path": ENTRYPOINT, "executable": True}))
        checks += [Check(name, "cpu", "file", dict(params)) for name, params in profile.SERVING_FILES]
        checks.append(Check("model-dir", "cpu", "file", {"path": MODEL_DIR}))
        checks += [Check(c["name"], "cpu", c["kind"], {k: v for k, v in c.items() if k not in ("name", "tier",
                                                                                                "kind")})
                   for c in spec.checks]
        checks += [Check(f"metadata-{what}", "cpu", "metadata", {"what": what})
                   for what in ("labels", "user", "port", "healthcheck", "entrypoint", "env")]
        checks.append(Check("size-budget", "cpu", "size", {"budget_gb": spec.size_budget_gb}))
    if "gpu" in tiers and spec.family.is_gpu:
        checks += [Check(name, "gpu", "builtin") for name in builtins.get("gpu", ())]
    if "serving" in tiers:
        checks += [Check(name, "serving", "serving") for way in profile.SERVING_WAYS for name in way.checks]
    return checks


def tiers_of(text: str) -> tuple[str, ...]:
    """--tier as a tuple of known tiers (comma-separated), else a UserError naming the unknown ones."""
    tiers = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in tiers if t not in TIERS]
    if unknown or not tiers:
        raise UserError(f"--tier {text}: unknown tier {', '.join(unknown) or '(none)'}; choose from {', '.join(TIERS)}")
    return tiers


def gpu_for(mode: str, tiers: tuple[str, ...]) -> tuple[bool, str]:
    """--gpu auto|required|off: whether the gpu and serving tiers use GPUs here, and why not."""
    if mode == "off" or not {"gpu", "serving"} & set(tiers):  # serving uses the GPUs where usable too
        return False, "--gpu off"
    gpu, reason = gpu_runtime()
    if mode == "required" and not gpu:
        raise UserError(f"--gpu required, but no GPU runtime is usable here: {reason}")
    return gpu, reason


# --- GPU runtime detection -----------------------------------------------------------------------------


def gpu_runtime() -> tuple[bool, str]:
    """Is there a GPU containers can use? (nvidia-smi on the host and the NVIDIA container runtime.)"""
    gpus, why_none = _list_gpus()
    if not gpus:
        return False, why_none
    info = engine.sdk().info()
    if "nvidia" not in (info.get("Runtimes") or {}) and not shutil.which("nvidia-container-runtime-hook"):
        return False, "the NVIDIA Container Toolkit is not installed for this engine"
    return True, gpus[0]


def _list_gpus() -> tuple[list[str], str]:
    """The `nvidia-smi -L` lines of the host's GPUs, and, when there are none, why."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return [], "nvidia-smi is not on this host"
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    gpus = [line for line in listed.stdout.splitlines() if line.startswith("GPU ")] if not listed.returncode else []
    return gpus, "" if gpus else f"nvidia-smi lists no GPU ({listed.stderr.strip()[:200]})"


# --- running --------------------------------------------------------------------------------------------


class Runner:
    def __init__(self, check_timeout: float = 300.0, serving_timeout: float = 600.0,
                 log_dir: Path = Path(".lmi/logs")) -> None:
        self.sdk = engine.sdk()
        self.check_timeout = check_timeout
        self.serving_timeout = serving_timeout
        self.log_dir = log_dir
        self.run_id = uuid.uuid4().hex[:12]
        # The checkers as this run mounts them: copies in a world-readable folder of its own (the images run as
        # uid 1001, and a checkout may not be readable to it), and their sha256, which every record names.
        self._checker_dir = Path(tempfile.mkdtemp(prefix="lmi-check-",
                                                  dir=os.path.realpath(os.environ.get("TMPDIR", "/tmp"))))
        self._checker_dir.chmod(0o755)
        self.checker = self._copy(CHECKER, "lmi_check.py")
        self._profiles: dict[str, tuple[str, str]] = {}  # profile name -> (path in the container, sha256)

    def _copy(self, source: Path, name: str) -> str:
        data = source.read_bytes()
        (self._checker_dir / name).write_bytes(data)
        (self._checker_dir / name).chmod(0o644)
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def profile_checker(self, spec: ImageSpec) -> tuple[str, str]:
        """The spec's profile checks, mounted beside the checker: (their path in a container, their sha256)."""
        profile = spec.profile
        if profile.NAME not in self._profiles:
            name = profile.CHECKER.name
            self._profiles[profile.NAME] = (f"{CHECK_DIR}/{name}", self._copy(profile.CHECKER, name))
        return self._profiles[profile.NAME]

    def cleanup(self) -> None:
        """Remove every container this run started (also after Ctrl-C), and the checkers' copies."""
        for container in self.sdk.containers.list(all=True, filters={"label": f"{RUN_LABEL}={self.run_id}"}):
            container.remove(force=True)
        shutil.rmtree(self._checker_dir, ignore_errors=True)

    def _container(self, image: str, command: list[str], gpu: bool, volumes: dict | None = None, **kw):
        """A test container of this run: no network, the checkers mounted read-only at CHECK_DIR."""
        import docker.types

        return self.sdk.containers.run(
            image, command, detach=True, network_mode="none", labels={RUN_LABEL: self.run_id},
            name=f"lmi-smoke-{self.run_id}-{uuid.uuid4().hex[:6]}",
            volumes={str(self._checker_dir): {"bind": CHECK_DIR, "mode": "ro"}, **(volumes or {})},
            device_requests=[docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])] if gpu else None, **kw)

    def in_image(self, image: str, spec: ImageSpec, checks: list[Check], gpu: bool) -> list[Outcome]:
        records = [c.record() for c in checks]
        cmd = [CHECK_MODULE, "--profile", self.profile_checker(spec)[0], "--claims-json", json.dumps(spec.claims()),
               "--checks-json", json.dumps(records), "--timeout", str(self.check_timeout)]
        # Through the real entrypoint, so the GPU tier sees what serving would (e.g. cuda-compat).
        try:
            container = self._container(image, ["python", *cmd], gpu)
        except Exception as exc:  # the engine refused to start it: every check fails, with the reason
            return [Outcome(c.name, c.tier, False, f"the container did not start: {_short(exc)}") for c in checks]
        outcomes: dict[str, Outcome] = {}
        try:
            deadline = time.monotonic() + self.check_timeout * (len(checks) + 1)
            buffer = b""
            for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=False):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if "name" in event and "passed" in event:
                        outcomes[event["name"]] = Outcome(event["name"], event["tier"], event["passed"],
                                                          event["message"], event["seconds"])
                if time.monotonic() > deadline:
                    break
            if not outcomes:  # the checker itself failed (e.g. a profile's checks that do not load): say why
                container.reload()
                why = container.logs(stdout=False, stderr=True).decode(errors="replace").strip()[-300:]
                if why:
                    return [Outcome(c.name, c.tier, False, f"the checker did not run: {why}") for c in checks]
        finally:
            container.remove(force=True)
        return [outcomes.get(c.name) or Outcome(c.name, c.tier, False, "no result (the check run was cut short)")
                for c in checks]

    def metadata(self, attrs: dict, spec: ImageSpec, check: Check) -> Outcome:
        """A metadata or size check, read from the image's attributes (one engine query per image)."""
        config = attrs["Config"]
        what = check.params.get("what")
        if check.kind == "size":
            size_gb = attrs["Size"] / 1e9
            budget = check.params["budget_gb"]
            return Outcome(check.name, check.tier, size_gb <= budget,
                           f"{size_gb:.2f} GB of a {budget:g} GB budget")
        if what == "labels":
            labels = config.get("Labels") or {}
            wrong = {k: (v, labels.get(k)) for k, v in spec.labels.items() if labels.get(k) != v}
            return Outcome(check.name, check.tier, not wrong,
                           "every rendered label present" if not wrong else
                           "; ".join(f"{k}: expected {v!r}, found {f!r}" for k, (v, f) in sorted(wrong.items())))
        if what == "user":
            user = config.get("User") or "root"
            return Outcome(check.name, check.tier, user not in ("", "root", "0", "0:0"), f"runs as {user}")
        if what == "port":
            ports = list(config.get("ExposedPorts") or {})
            return Outcome(check.name, check.tier, "8080/tcp" in ports, f"exposes {ports}")
        if what == "healthcheck":
            test = (config.get("Healthcheck") or {}).get("Test") or []
            return Outcome(check.name, check.tier, any("/ping" in part for part in test), f"healthcheck {test}")
        if what == "entrypoint":
            ok = config.get("Entrypoint") == [ENTRYPOINT] and config.get("Cmd") == ["serve"]
            return Outcome(check.name, check.tier, ok, f"entrypoint {config.get('Entrypoint')} {config.get('Cmd')}")
        if what == "env":
            env = dict(item.split("=", 1) for item in config.get("Env") or [])
            want = {"LMI_IMAGE_ID": spec.id, **spec.profile.SERVING_ENV}
            if spec.arch_list:
                want["TORCH_CUDA_ARCH_LIST"] = spec.arch_list
            wrong = {k: env.get(k) for k, v in want.items() if env.get(k) != v}
            return Outcome(check.name, check.tier, not wrong, f"env {want}" if not wrong else f"env differs: {wrong}")
        raise ValueError(f"unknown metadata check {what}")

    def serving(self, image: str, spec: ImageSpec, checks: list[Check], gpu: bool,
                gpu_reason: str = "no GPU") -> list[Outcome]:
        """Start the image as SageMaker does (`serve`) once per way its profile serves, each with a tiny real
        model at /opt/ml/model made by the image's own libraries, and ask it what the way asks (its profile's
        SERVING_WAYS say what the answers must be). A way that needs a GPU is skipped, with the reason, where
        none is usable."""
        wanted = {c.name for c in checks}
        ways = [way for way in spec.profile.SERVING_WAYS if wanted & set(way.checks)]
        runnable = [i for i, way in enumerate(ways) if gpu or not way.needs_gpu]
        # Without a GPU the ways start together: each is a container of its own and much of a start is waiting
        # (imports, a model load, the port), so the tier takes about its longest way instead of their sum. On a
        # GPU host they take turns: every way spreads its model over all the GPUs.
        with ThreadPoolExecutor(max_workers=1 if gpu else max(1, len(runnable))) as pool:
            served = dict(zip(runnable, pool.map(lambda i: self._serve(image, spec, ways[i], gpu), runnable),
                              strict=True))
        outcomes: list[Outcome] = []
        for i, way in enumerate(ways):
            outcomes += served.get(i) or [Outcome(name, "serving", None, f"skipped: the {way.name} way needs a GPU "
                                                  f"({gpu_reason})") for name in way.checks]
        return [o for o in outcomes if o.name in wanted]

    def _serve(self, image: str, spec: ImageSpec, way: ServingWay, gpu: bool) -> list[Outcome]:
        model_dir = Path(os.path.realpath(os.environ.get("TMPDIR", "/tmp"))) / f"lmi-model-{uuid.uuid4().hex[:8]}"
        model_dir.mkdir()
        try:
            reference, problem = self._tiny_model(image, model_dir, way)
            if problem:
                return [Outcome(name, "serving", False, problem) for name in way.checks]
            setup = way.setup(spec, gpu, visible_gpus() if gpu else 0)
            for name, text in setup.files.items():
                (model_dir / name).write_text(text)
            container = self._container(image, ["serve"], gpu, environment=dict(setup.env),
                                        volumes={str(model_dir): {"bind": MODEL_DIR, "mode": "ro"}})
        except Exception as exc:
            shutil.rmtree(model_dir, ignore_errors=True)
            return [Outcome(name, "serving", False, f"the container did not start: {_short(exc)}")
                    for name in way.checks]
        outcomes: list[Outcome] = []
        start = time.monotonic()
        try:
            ping = self._wait_for_ping(container)
            if way.ping:
                outcomes.append(Outcome(way.ping, "serving", ping is None, ping or
                                        f"GET /ping answered 200 ({way.name}: model loaded on {setup.ranks} rank(s))",
                                        time.monotonic() - start))
            for ask in way.asks:
                if ping is None:
                    t0 = time.monotonic()
                    ok, msg = ask.ask(Client(container), reference, setup.ranks)
                    outcomes.append(Outcome(ask.check, "serving", ok, msg, time.monotonic() - t0))
                else:
                    outcomes.append(Outcome(ask.check, "serving", False,
                                            "not tried: /ping never answered" if way.ping else ping))
            if not all(o.passed for o in outcomes):
                self.log_dir.mkdir(parents=True, exist_ok=True)
                log = self.log_dir / f"{spec.id}.serving-{way.name}.log"
                log.write_bytes(container.logs(stdout=True, stderr=True))
                outcomes[-1].message += f" (container log: {log})"
        finally:
            container.remove(force=True)
            shutil.rmtree(model_dir, ignore_errors=True)
        return outcomes

    def _tiny_model(self, image: str, model_dir: Path, way: ServingWay) -> tuple[object, str | None]:
        """Make the way's tiny model with the image's own libraries (no hub) and its reference answer."""
        model_dir.chmod(0o777)  # the image runs as uid 1001
        container = self._container(image, list(way.model), False,
                                    volumes={str(model_dir): {"bind": MODEL_DIR, "mode": "rw"}})
        try:
            result = container.wait(timeout=self.serving_timeout)
            out = container.logs(stdout=True, stderr=False).decode(errors="replace").strip().splitlines()
            if result.get("StatusCode") != 0 or not out:
                err = container.logs(stdout=False, stderr=True).decode(errors="replace")
                return None, f"the tiny model could not be made in the image: {err.strip()[-300:]}"
            return json.loads(out[-1])["reference"], None
        finally:
            container.remove(force=True)
            model_dir.chmod(0o755)

    def _wait_for_ping(self, container) -> str | None:
        deadline = time.monotonic() + self.serving_timeout
        while time.monotonic() < deadline:
            container.reload()
            if container.status == "exited":
                return f"the container exited ({container.attrs['State']['ExitCode']}) before /ping answered"
            code, out = container.exec_run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                            "http://127.0.0.1:8080/ping"])
            if out.strip() == b"200":
                return None
            time.sleep(1)
        return f"GET /ping did not answer 200 within {self.serving_timeout:.0f} s"


def visible_gpus() -> int:
    return len(_list_gpus()[0])


def _short(exc: Exception) -> str:
    text = getattr(exc, "explanation", None) or str(exc)
    return (text.decode(errors="replace") if isinstance(text, bytes) else str(text))[:300]


# --- a whole image ----------------------------------------------------------------------------------------


@dataclass
class Record:
    """The smoke record of one image digest: what publishing checks before it pushes anything."""

    schema: int
    image: str
    image_id: str
    content_hash: str | None
    spec_id: str
    tiers: list[str]
    passed: bool
    outcomes: list[dict]
    started: str
    finished: str
    lmi_version: str = __version__
    checker: str | None = None  # sha256 of the checker that ran (resources/check/lmi_check.py, mounted, not shipped)
    profile_checker: str | None = None  # sha256 of the profile's checks it loaded (resources/check/<name>_check.py)

    def save(self, directory: Path = RECORD_DIR) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.image_id.split(':')[-1]}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
        return path


def load_record(image_id: str, directory: Path = RECORD_DIR) -> Record | None:
    path = directory / f"{image_id.split(':')[-1]}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return Record(**data) if data.get("schema") == RECORD_SCHEMA else None


def passing_record(image_id: str, directory: Path = RECORD_DIR) -> Record | None:
    """The gate: a record exists for exactly this image digest, and it passed."""
    record = load_record(image_id, directory)
    return record if record and record.passed and record.image_id == image_id else None


def smoke_image(runner: Runner, image: str, spec: ImageSpec, tiers: tuple[str, ...], gpu: bool,
               gpu_reason: str) -> Record:
    try:
        attrs = runner.sdk.images.get(image).attrs
    except Exception as exc:
        raise UserError(f"image {image} is not in the engine ({exc.__class__.__name__}); build it first "
                        f"(`lmi build {spec.id}`) or name one with --image") from exc
    started = datetime.now(timezone.utc)
    run_tiers = tuple(t for t in tiers if t != "gpu" or gpu)
    checks = generate(spec, run_tiers)
    outcomes: list[Outcome] = []
    if "gpu" in tiers and not gpu and spec.family.is_gpu:
        outcomes.append(Outcome("gpu-tier", "gpu", None, f"skipped: {gpu_reason}"))
    inside = [c for c in checks if c.in_image]
    if inside:
        outcomes += runner.in_image(image, spec, inside, gpu and spec.family.is_gpu)
    outcomes += [runner.metadata(attrs, spec, c) for c in checks if c.kind in ("metadata", "size")]
    serving = [c for c in checks if c.kind == "serving"]
    if serving:
        outcomes += runner.serving(image, spec, serving, gpu and spec.family.is_gpu,
                                   gpu_reason if spec.family.is_gpu else "a CPU image")
    record = Record(
        schema=RECORD_SCHEMA, image=image, image_id=attrs["Id"],
        content_hash=(attrs["Config"].get("Labels") or {}).get("io.lmi.content-hash"), spec_id=spec.id,
        tiers=list(run_tiers), passed=all(o.passed is not False for o in outcomes),
        outcomes=[asdict(o) for o in outcomes], started=started.isoformat(timespec="seconds"),
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"), checker=runner.checker,
        profile_checker=runner.profile_checker(spec)[1],
    )
    record.save()
    return record


def junit(records: list[Record], path: Path) -> None:
    suites = ET.Element("testsuites", name="lmi smoke tests")
    for record in records:
        outcomes = record.outcomes
        suite = ET.SubElement(suites, "testsuite", name=record.spec_id, tests=str(len(outcomes)),
                              failures=str(sum(o["passed"] is False for o in outcomes)),
                              skipped=str(sum(o["passed"] is None for o in outcomes)),
                              time=f"{sum(o['seconds'] for o in outcomes):.2f}")
        ET.SubElement(ET.SubElement(suite, "properties"), "property", name="image_id", value=record.image_id)
        for o in outcomes:
            case = ET.SubElement(suite, "testcase", classname=f"{record.spec_id}.{o['tier']}", name=o["name"],
                                 time=f"{o['seconds']:.2f}")
            if o["passed"] is False:
                ET.SubElement(case, "failure", message=o["message"][:500]).text = o["message"]
            elif o["passed"] is None:
                ET.SubElement(case, "skipped", message=o["message"])
            else:
                ET.SubElement(case, "system-out").text = o["message"]
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)


def run(images: list[tuple[ImageSpec, str]], tiers: tuple[str, ...], gpu: bool, reason: str, records: list[Record],
        *, check_timeout: float, serving_timeout: float, junit_path: Path | None, verbose: bool,
        say: Callable[[str], None]) -> None:
    """`lmi test`: smoke-test each (spec, image reference) in turn into `records`, saying each failed check (every
    check if verbose); the test containers are removed and the JUnit file written even when interrupted."""
    runner = Runner(check_timeout=check_timeout, serving_timeout=serving_timeout)
    try:
        for spec, image in images:
            say(f"testing {spec.id} ({image}): tiers {', '.join(tiers)}")
            record = smoke_image(runner, image, spec, tiers, gpu, reason)
            records.append(record)
            for o in record.outcomes:
                if o["passed"] is False or verbose:
                    state = {True: "pass", False: "FAIL", None: "skip"}[o["passed"]]
                    say(f"  {state} {o['tier']}/{o['name']}: {o['message']}")
    finally:
        runner.cleanup()
        if junit_path and records:
            junit(records, junit_path)


def summary_rows(records: list[Record]) -> list[list[str]]:
    """One row per record: image, result, passed, failed and skipped checks, image id."""
    return [[r.spec_id, "passed" if r.passed else "FAILED", str(sum(o["passed"] is True for o in r.outcomes)),
             str(sum(o["passed"] is False for o in r.outcomes)), str(sum(o["passed"] is None for o in r.outcomes)),
             r.image_id.split(":")[-1][:12]] for r in records]
