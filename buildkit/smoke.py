"""Smoke tests: checks generated from the matrix, run against built images, and the record that
publishing obeys.

Each check is a small typed record (container-structure-test style). In-image checks (claims, files,
user commands, the GPU tier) run through buildkit/incheck.py inside a container with --network=none;
metadata and size are read from the engine; the serving tier starts the image with its real
entrypoint and talks to it over the container's own loopback. Every container is removed afterwards,
on failure and on Ctrl-C too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import __version__, engine
from .errors import UserError
from .spec import ImageSpec

TIERS = ("cpu", "gpu", "serving")
RECORD_SCHEMA = 1
RECORD_DIR = Path(".lmi/smoke")
CHECK_MODULE = "/opt/lmi/lmi_check.py"
RUN_LABEL = "io.lmi.smoke-run"
ENTRYPOINT = "/usr/local/bin/dockerd-entrypoint.sh"
CPU_BUILTINS = ("python-version", "torch-version", "torch-cuda", "deepspeed-version", "transformers-version",
                "diffusers-version", "accelerate-version", "djl-serving-version", "java-version", "pip-check",
                "imports", "tiny-forward", "deepspeed-prebuilt-ops", "cuda-compat-files")
GPU_BUILTINS = ("nvidia-smi", "cuda-available", "compute-capability", "arch-list", "bf16", "deepspeed-ops",
                "deepspeed-inference", "nccl-allreduce", "cuda-compat-active")
SERVING_PROMPT = "the lmi smoke test"
SERVING_TOKENS = 8


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
    """Every check of one image, derived from its spec (and the user checks of its matrix line)."""
    checks: list[Check] = []
    if "cpu" in tiers:
        checks += [Check(name, "cpu", "builtin") for name in CPU_BUILTINS]
        checks += [
            Check("entrypoint-file", "cpu", "file", {"path": ENTRYPOINT, "executable": True}),
            Check("serving-config", "cpu", "file", {"path": "/opt/djl/conf/config.properties",
                                                    "contains": r"(?m)^model_store=/opt/ml/model$"}),
            Check("model-dir", "cpu", "file", {"path": "/opt/ml/model"}),
        ]
        checks += [Check(c["name"], "cpu", c["kind"], {k: v for k, v in c.items() if k not in ("name", "tier",
                                                                                                "kind")})
                   for c in spec.checks]
        checks += [Check(f"metadata-{what}", "cpu", "metadata", {"what": what})
                   for what in ("labels", "user", "port", "healthcheck", "entrypoint", "env")]
        checks.append(Check("size-budget", "cpu", "size", {"budget_gb": spec.size_budget_gb}))
    if "gpu" in tiers and spec.family.is_gpu:
        checks += [Check(name, "gpu", "builtin") for name in GPU_BUILTINS]
    if "serving" in tiers:
        checks += [Check("serving-ping", "serving", "serving"), Check("serving-invocations", "serving", "serving")]
    return checks


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

    def cleanup(self) -> None:
        """Remove every container this run started (also after Ctrl-C)."""
        for container in self.sdk.containers.list(all=True, filters={"label": f"{RUN_LABEL}={self.run_id}"}):
            container.remove(force=True)

    def _container(self, image: str, command: list[str], gpu: bool, **kw):
        import docker.types

        return self.sdk.containers.run(
            image, command, detach=True, network_mode="none", labels={RUN_LABEL: self.run_id},
            name=f"lmi-smoke-{self.run_id}-{uuid.uuid4().hex[:6]}",
            device_requests=[docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])] if gpu else None, **kw)

    def in_image(self, image: str, spec: ImageSpec, checks: list[Check], gpu: bool) -> list[Outcome]:
        records = [c.record() for c in checks]
        cmd = [CHECK_MODULE, "--claims-json", json.dumps(spec.claims()), "--checks-json", json.dumps(records),
               "--timeout", str(self.check_timeout)]
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
            want = {"LMI_IMAGE_ID": spec.id, "MODEL_SERVER_HOME": "/opt/djl"}
            if spec.arch_list:
                want["TORCH_CUDA_ARCH_LIST"] = spec.arch_list
            wrong = {k: env.get(k) for k, v in want.items() if env.get(k) != v}
            return Outcome(check.name, check.tier, not wrong, f"env {want}" if not wrong else f"env differs: {wrong}")
        raise ValueError(f"unknown metadata check {what}")

    def serving(self, image: str, spec: ImageSpec, checks: list[Check], gpu: bool) -> list[Outcome]:
        """Start the image as SageMaker does (`serve`) with a tiny real model at /opt/ml/model, served by the
        image's DeepSpeed handler over `tensor_parallel_degree` ranks; its answer must be the continuation
        plain Transformers gives on the same weights."""
        model_dir = Path(os.path.realpath(os.environ.get("TMPDIR", "/tmp"))) / f"lmi-model-{uuid.uuid4().hex[:8]}"
        model_dir.mkdir()
        try:
            reference, problem = self._tiny_model(image, model_dir)
            if problem:
                return [Outcome(c.name, c.tier, False, problem) for c in checks]
            tp = serving_ranks(spec, gpu, visible_gpus() if gpu else 0)
            (model_dir / "serving.properties").write_text(serving_properties(spec, tp, gpu))
            container = self._container(image, ["serve"], gpu,
                                        volumes={str(model_dir): {"bind": "/opt/ml/model", "mode": "ro"}})
        except Exception as exc:
            shutil.rmtree(model_dir, ignore_errors=True)
            return [Outcome(c.name, c.tier, False, f"the container did not start: {_short(exc)}") for c in checks]
        outcomes: list[Outcome] = []
        start = time.monotonic()
        try:
            ping = self._wait_for_ping(container)
            outcomes.append(Outcome("serving-ping", "serving", ping is None,
                                    ping or f"GET /ping answered 200 (model loaded on {tp} rank(s))",
                                    time.monotonic() - start))
            if ping is None:
                t0 = time.monotonic()
                payload = {"inputs": SERVING_PROMPT, "parameters": {"max_new_tokens": SERVING_TOKENS}}
                code, out = container.exec_run(["curl", "-sS", "-X", "POST", "-H", "Content-Type: application/json",
                                                "-d", json.dumps(payload), "-w", "\n%{http_code}",
                                                "http://127.0.0.1:8080/invocations"])
                text = out.decode(errors="replace")
                body, _, status = text.rpartition("\n")
                try:
                    answer = json.loads(body)
                    ok = status == "200" and answer == {"generated_text": reference}
                    msg = (f"POST /invocations: {tp} rank(s) generated {reference!r}, as plain Transformers does"
                           if ok else f"HTTP {status}: {answer!r}; plain Transformers gives {reference!r}")
                except ValueError:
                    ok, msg = False, f"POST /invocations: exit {code}: {text[-300:]!r}"
                outcomes.append(Outcome("serving-invocations", "serving", ok, msg, time.monotonic() - t0))
            else:
                outcomes.append(Outcome("serving-invocations", "serving", False, "not tried: /ping never answered"))
            if not all(o.passed for o in outcomes):
                self.log_dir.mkdir(parents=True, exist_ok=True)
                log = self.log_dir / f"{spec.id}.serving.log"
                log.write_bytes(container.logs(stdout=True, stderr=True))
                outcomes[-1].message += f" (container log: {log})"
        finally:
            container.remove(force=True)
            shutil.rmtree(model_dir, ignore_errors=True)
        return [o for o in outcomes if o.name in {c.name for c in checks}]

    def _tiny_model(self, image: str, model_dir: Path) -> tuple[str | None, str | None]:
        """Make the tiny model with the image's own Transformers (no hub) and its reference continuation."""
        model_dir.chmod(0o777)  # the image runs as uid 1001
        container = self._container(image, ["python", CHECK_MODULE, "--make-tiny-model", "/opt/ml/model",
                                            "--prompt", SERVING_PROMPT, "--max-new-tokens", str(SERVING_TOKENS)],
                                    False, volumes={str(model_dir): {"bind": "/opt/ml/model", "mode": "rw"}})
        try:
            result = container.wait(timeout=self.serving_timeout)
            out = container.logs(stdout=True, stderr=False).decode(errors="replace").strip().splitlines()
            if result.get("StatusCode") != 0 or not out:
                err = container.logs(stdout=False, stderr=True).decode(errors="replace")
                return None, f"the tiny model could not be made in the image: {err.strip()[-300:]}"
            return json.loads(out[-1])["reference"][0], None
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


def serving_ranks(spec: ImageSpec, gpu: bool, gpus: int = 0) -> int:
    """Ranks for the serving tier. On a GPU: one per visible GPU (NCCL from two on), the largest power of
    two up to 8 (the tiny model has 8 heads). A CPU image: two (gloo; DeepSpeed's CPU all-reduce is
    JIT-compiled by the image's g++). A GPU image without a GPU: one (it carries no compiler for CPU ops)."""
    if gpu and gpus:
        return 1 << (min(gpus, 8).bit_length() - 1)
    return 2 if not spec.builder_image else 1


def serving_properties(spec: ImageSpec, tp: int, gpu: bool = False) -> str:
    """The tiny model's serving.properties, as an LMI user writes them for the image's DeepSpeed handler.
    fp32 and AutoTP everywhere, so the answer must equal plain Transformers' token for token (kernel
    injection's numerics are the GPU tier's deepspeed-inference check, with a tolerance)."""
    return ("engine=Python\noption.mpi_mode=true\noption.entryPoint=lmi_deepspeed\n"
            f"option.tensor_parallel_degree={tp}\noption.dtype=fp32\noption.max_new_tokens=64\n"
            + ("option.kernel_injection=false\n" if gpu else ""))


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
        outcomes += runner.serving(image, spec, serving, gpu and spec.family.is_gpu)
    record = Record(
        schema=RECORD_SCHEMA, image=image, image_id=attrs["Id"],
        content_hash=(attrs["Config"].get("Labels") or {}).get("io.lmi.content-hash"), spec_id=spec.id,
        tiers=list(run_tiers), passed=all(o.passed is not False for o in outcomes),
        outcomes=[asdict(o) for o in outcomes], started=started.isoformat(timespec="seconds"),
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
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


