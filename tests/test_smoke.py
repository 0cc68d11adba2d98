"""Smoke tests: check generation, the in-image module run on this host, the record gate, and `lmi test`
against real images of the local test matrix."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import metadata

import pytest
from conftest import LINE_027, ROOT, docker, lmi, local_matrix

from buildkit import matrix, smoke
from buildkit.spec import resolve

HOST_CHECKS = ["python-version", "torch-version", "torch-cuda", "deepspeed-version", "transformers-version",
               "diffusers-version", "accelerate-version", "imports", "tiny-forward"]


@pytest.fixture(scope="module")
def production(facts):
    return {s.id: s for s in resolve(matrix.load(ROOT / "matrix.yaml", facts), facts)}


def test_checks_generated_from_the_spec(production) -> None:
    gpu = smoke.generate(production["djl0.36-g5"], ("cpu", "gpu", "serving"))
    names = [c.name for c in gpu]
    builtins = production["djl0.36-g5"].profile.checks(production["djl0.36-g5"])
    assert set(builtins["cpu"]) <= set(names) and set(builtins["gpu"]) <= set(names)
    assert {"serving-ping", "serving-invocations", "size-budget", "metadata-labels"} <= set(names)
    assert len(names) == len(set(names))
    size = next(c for c in gpu if c.kind == "size")
    assert size.params["budget_gb"] == 20.0
    cpu = smoke.generate(production["djl0.36-cpu"], ("cpu", "gpu"))
    assert not [c for c in cpu if c.tier == "gpu"]  # no GPU tier for CPU images
    assert next(c for c in cpu if c.kind == "size").params["budget_gb"] == 6.0


def test_user_checks_and_budget_from_the_matrix(write_matrix, facts) -> None:
    text = ("size_budget_gb: 12\nschema: 1\nfamilies: {g5: {}}\nlines:" + LINE_027 +
            "    size_budget_gb: 15.5\n    checks:\n      - {command: \"java -version\", expect: \"17\"}\n"
            "      - {name: no-compat, file: /usr/local/cuda/compat, exists: false}\n")
    spec = resolve(matrix.load(write_matrix(text), facts), facts)[0]
    checks = {c.name: c for c in smoke.generate(spec, ("cpu",))}
    assert checks["user-1-command"].params == {"command": "java -version", "expect": "17"}
    assert checks["no-compat"].params == {"path": "/usr/local/cuda/compat", "exists": False}
    assert checks["size-budget"].params["budget_gb"] == 15.5


def test_bad_user_checks_are_bad_input(write_matrix) -> None:
    text = ("schema: 1\nfamilies: {g5: {}}\nlines:" + LINE_027 +
            "    checks:\n      - {command: x, expect: \"(\"}\n      - {nothing: here}\n")
    result = lmi("--matrix", str(write_matrix(text)), "validate")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "check expect is not a valid regular expression" in result.stderr
    assert "each check is a mapping with either 'command' or 'file'" in result.stderr


# --- the in-image module, run directly on this host (torch CPU + DeepSpeed) ------------------------------


def host_claims(**versions) -> dict:
    found = {d: metadata.version(d) for d in ("torch", "deepspeed", "transformers", "diffusers", "accelerate")}
    found["torch"] = found["torch"].split("+")[0]
    found["python"] = ".".join(platform.python_version().split(".")[:2])
    found.update(versions)
    return {"versions": found, "torch_variant": "cpu", "sm": None, "cuda_compat": False}


DEEPSPEED_CHECKS = ROOT / "buildkit" / "resources" / "check" / "deepspeed_check.py"  # the profile's (imports, ops)


def run_checker(claims: dict, records: list[dict], timeout: float = 300) -> tuple[int, list[dict]]:
    result = subprocess.run([sys.executable, str(smoke.CHECKER), "--profile", str(DEEPSPEED_CHECKS),
                             "--claims-json", json.dumps(claims),
                             "--checks-json", json.dumps(records), "--timeout", str(timeout)],
                            capture_output=True, text=True, timeout=900)
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def host_torch():
    try:
        import deepspeed  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"torch and DeepSpeed are not installed on this host ({exc}); `make venv` installs them")


def test_checker_on_the_host_passes(host_torch) -> None:
    code, events = run_checker(host_claims(), [{"name": n, "tier": "cpu", "kind": "builtin"} for n in HOST_CHECKS])
    assert code == 0, events
    assert [e["name"] for e in events] == HOST_CHECKS and all(e["passed"] for e in events)


def test_checker_wrong_claim_names_both_versions(host_torch) -> None:
    code, events = run_checker(host_claims(torch="2.12.0"),
                               [{"name": "torch-version", "tier": "cpu", "kind": "builtin"}])
    assert code == 1
    assert events[0]["message"] == "torch: the matrix says 2.12.0, the image has 2.13.0"


def test_checker_prebuilt_op_claims(host_torch) -> None:
    """DeepSpeed from the index prebuilds nothing: a claim of no ops passes, a claim of prebuilt ops fails
    naming them (the GPU images of `make test-gpu-stack` are checked the same way against their claims)."""
    record = [{"name": "deepspeed-prebuilt-ops", "tier": "cpu", "kind": "builtin"}]
    code, events = run_checker({**host_claims(), "deepspeed_ops": None}, record)
    assert code == 0 and "no op prebuilt" in events[0]["message"]
    wrong = {"prebuilt": ["transformer_inference", "cpu_adam"], "absent": {"cutlass_ops": "needs deepspeed-kernels"}}
    code, events = run_checker({**host_claims(), "deepspeed_ops": wrong}, record)
    assert code == 1
    assert events[0]["message"] == ("ops claimed prebuilt that the image lacks: "
                                    "['cpu_adam', 'transformer_inference']")


def test_checker_stops_a_hanging_check_and_goes_on(host_torch) -> None:
    records = [{"name": "hangs", "tier": "cpu", "kind": "command", "command": "sleep 600"},
               {"name": "after", "tier": "cpu", "kind": "command", "command": "echo fine", "expect": "^fine"}]
    code, events = run_checker(host_claims(), records, timeout=2)
    assert code == 1
    assert events[0] == {"name": "hangs", "tier": "cpu", "passed": False, "message": "timed out after 2 s",
                         "seconds": 2}
    assert events[1]["name"] == "after" and events[1]["passed"]


def test_checker_gpu_tier_reports_no_gpu_here(host_torch) -> None:
    code, events = run_checker({**host_claims(), "sm": "8.6"}, [{"name": "cuda-available", "tier": "gpu",
                                                            "kind": "builtin"}])
    import torch

    if torch.cuda.is_available():
        assert code == 0
    else:
        assert code == 1 and events[0]["message"] == "torch.cuda.is_available() is False"


# --- the record gate and JUnit ----------------------------------------------------------------------------


def _record(image_id: str, passed: bool) -> smoke.Record:
    return smoke.Record(schema=1, image="x:y", image_id=image_id, content_hash="c" * 64, spec_id="a-g5",
                        tiers=["cpu"], passed=passed, started="t0", finished="t1",
                        outcomes=[{"name": "torch-version", "tier": "cpu", "passed": passed, "message": "m",
                                   "seconds": 0.1},
                                  {"name": "gpu-tier", "tier": "gpu", "passed": None, "message": "skipped",
                                   "seconds": 0}])


def test_gate_needs_a_passing_record_for_that_digest(tmp_path) -> None:
    good, bad = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    _record(good, True).save(tmp_path)
    _record(bad, False).save(tmp_path)
    assert smoke.passing_record(good, tmp_path).image_id == good
    assert smoke.passing_record(bad, tmp_path) is None
    assert smoke.passing_record("sha256:" + "c" * 64, tmp_path) is None


def test_junit(tmp_path) -> None:
    path = tmp_path / "junit.xml"
    smoke.junit([_record("sha256:" + "a" * 64, False)], path)
    suite = ET.parse(path).getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1" and suite.get("skipped") == "1"
    assert suite.find("testcase/failure").get("message") == "m"


# --- lmi test against real images -----------------------------------------------------------------------


def smoke_containers(image: str) -> str:
    """The smoke containers left of `image` (or of an image on top of it): other runs on this engine are
    not this test's."""
    return docker("ps", "-a", "--filter", f"label={smoke.RUN_LABEL}", "--filter", f"ancestor={image}", "--format",
                  "{{.Names}}").stdout.strip()


@pytest.mark.engine
def test_lmi_test_passes_a_good_image(local_image, tmp_path) -> None:
    repo, matrix_path = local_image["repo"], local_image["matrix"]
    junit = tmp_path / "smoke.xml"
    result = lmi("--matrix", str(matrix_path), "test", "--junit", str(junit))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "local-cpu  passed" in result.stdout
    image_id = docker("inspect", f"{repo}:djl0.32-cpu", "--format", "{{.Id}}").stdout.strip()
    record = smoke.passing_record(image_id, ROOT / smoke.RECORD_DIR)
    assert record and record.spec_id == "local-cpu" and record.tiers == ["cpu", "serving"]
    names = {o["name"] for o in record.outcomes}
    assert {"torch-version", "djl-serving-version", "tiny-forward", "serving-invocations", "serving-accelerate",
            "serving-diffusion", "size-budget"} <= names
    assert ET.parse(junit).getroot().find("testsuite").get("failures") == "0"
    assert smoke_containers(f"{repo}:djl0.32-cpu") == ""
    # The checks ran from outside the image: it ships none, and the record names the checker that ran.
    listing = docker("run", "--rm", "--network=none", "--entrypoint", "ls", f"{repo}:djl0.32-cpu", "-A", "/opt/lmi")
    assert listing.returncode == 0 and "image.json" in listing.stdout.split(), listing.stderr
    assert not any("lmi_check" in name for name in listing.stdout.split())
    checker = hashlib.sha256(smoke.CHECKER.read_bytes()).hexdigest()
    assert record.checker == f"sha256:{checker}"


@pytest.mark.engine
def test_serving_tier_fails_with_a_broken_handler(local_image, tmp_path) -> None:
    """Each serving check's answer comes from the image's handler: break it, and every way fails."""
    repo, matrix_path = local_image["repo"], local_image["matrix"]
    context = tmp_path / "broken"
    context.mkdir()
    # Off by one token (the DeepSpeed and Accelerate ways generate alike), and off by one seed (diffusion):
    # the handler still answers 200, but no longer what the plain libraries give.
    for name, good, bad in (
            ("lmi_deepspeed.py", 'kwargs = {"max_new_tokens": params["max_new_tokens"],',
             'kwargs = {"max_new_tokens": params["max_new_tokens"] + 1,'),
            ("lmi_diffusion.py", 'torch.Generator("cpu").manual_seed(job.seed)',
             'torch.Generator("cpu").manual_seed(job.seed + 1)')):
        source = (ROOT / "buildkit" / "resources" / "image" / name).read_text()
        broken = source.replace(good, bad)
        assert broken != source, name
        (context / name).write_text(broken)
    (context / "Dockerfile").write_text(f"FROM {repo}:djl0.32-cpu\n"
                                        "COPY lmi_deepspeed.py lmi_diffusion.py /opt/lmi/python/\n")
    tag = f"{repo}-broken:serving"
    assert docker("build", "-q", "-t", tag, str(context)).returncode == 0
    try:
        result = lmi("--matrix", str(matrix_path), "test", "--tier", "serving", "--image", tag)
        assert smoke_containers(tag) == ""
    finally:
        docker("rmi", "-f", tag)
    assert result.returncode == 1, result.stdout
    assert "FAIL serving/serving-invocations: HTTP 200" in result.stdout and "plain Transformers gives" in result.stdout
    assert "FAIL serving/serving-accelerate: HTTP 200" in result.stdout
    assert "FAIL serving/serving-diffusion: the PNG's pixels are not plain Diffusers' image" in result.stdout


@pytest.mark.engine
def test_lmi_test_wrong_claim_and_hanging_check_fail_and_the_rest_run(local, local_image) -> None:
    """One cpu-tier run of the shared image against a matrix entry that says torch 2.12.0 and adds a check
    that hangs: both fail, each naming why, and the checks after the hang still run."""
    repo = local_image["repo"]
    checks = ("    checks:\n      - {name: hangs, command: \"sleep 600\"}\n"
              "      - {name: java, command: \"java -version\", expect: \"17\"}\n")
    wrong = local_matrix(local["dir"], repo + "-wrong", extra_lines=checks, **{'torch: "2.13.0"': 'torch: "2.12.0"'})
    result = lmi("--matrix", str(wrong), "test", "--tier", "cpu", "--image", f"{repo}:djl0.32-cpu",
                 "--check-timeout", "5", "-v")
    assert result.returncode == 1
    assert "FAIL cpu/torch-version: torch: the matrix says 2.12.0, the image has 2.13.0" in result.stdout
    assert "FAIL cpu/hangs: timed out after 5 s" in result.stdout
    assert "pass cpu/java:" in result.stdout  # the checks after it still ran
    image_id = docker("inspect", f"{repo}:djl0.32-cpu", "--format", "{{.Id}}").stdout.strip()
    record = smoke.load_record(image_id, ROOT / smoke.RECORD_DIR)
    assert record and not record.passed and smoke.passing_record(image_id, ROOT / smoke.RECORD_DIR) is None
    assert smoke_containers(f"{repo}:djl0.32-cpu") == ""


@pytest.mark.engine
def test_serving_failure_is_reported_with_no_container_left(local, repo) -> None:
    matrix_path = local_matrix(local["dir"], repo)
    base = "lmi-local/library/debian:12"  # no entrypoint, no server: `serve` cannot start
    result = lmi("--matrix", str(matrix_path), "test", "--tier", "serving", "--image", base,
                 "--serving-timeout", "5")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "FAIL serving/serving-ping:" in result.stdout
    assert smoke_containers(base) == ""


def test_gpu_required_without_gpu_is_bad_input(tmp_path) -> None:
    import shutil

    if shutil.which("nvidia-smi"):
        pytest.skip("this host has nvidia-smi: --gpu required would not fail here")
    result = lmi("--matrix", str(ROOT / "tests" / "matrix.local.yaml"), "test", "--gpu", "required")
    assert result.returncode == 2 and "--gpu required, but no GPU runtime is usable here" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_tier_is_bad_input() -> None:
    result = lmi("test", "--tier", "cpu,gpux")
    assert result.returncode == 2 and "unknown tier gpux" in result.stderr


@pytest.mark.required_in_ci  # it needs an engine, as the engine tier does
def test_missing_image_says_build_it_first(tmp_path) -> None:
    pytest.importorskip("docker")
    from buildkit import engine

    if not engine.engine_answers():
        pytest.skip("no docker engine answers here")
    result = lmi("test", "--tier", "cpu", "--image", "lmi-no-such-image:1", "djl0.36-cpu")
    assert result.returncode == 2 and "is not in the engine" in result.stderr and "lmi build" in result.stderr




def test_arch_list_coverage_as_torch_reports_it() -> None:
    from lmi_check import arch_covers

    cu128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
    assert arch_covers(cu128, (8, 9)) == "sm_86"  # L40S runs the 8.6 cubin
    assert arch_covers(cu128, (10, 3)) == "sm_100"
    assert arch_covers(cu128, (7, 0)) is None  # V100 is not in this wheel
    assert arch_covers(["sm_80", "sm_90a", "compute_80"], (9, 0)) == "compute_80"  # sm_90a is not sm_90
    assert arch_covers(["sm_80", "sm_90a"], (9, 0)) is None


def test_serving_ranks_follow_the_gpus(production) -> None:
    gpu_image, cpu_image = production["djl0.36-p4d"], production["djl0.36-cpu"]
    ds = gpu_image.profile  # the serving tier's ranks and serving.properties are the DeepSpeed profile's
    assert ds.serving_ranks(cpu_image, False) == 1  # real DJL refuses MPI mode without a GPU
    assert ds.serving_ranks(gpu_image, False) == 1  # a GPU image on a CPU host
    assert [ds.serving_ranks(gpu_image, True, n) for n in (1, 2, 3, 4, 8, 16)] == [1, 2, 2, 4, 8, 8]
    props = ds.serving_properties(gpu_image, 8, gpu=True)
    assert "option.tensor_parallel_degree=8" in props and "option.kernel_injection=false" in props
    assert "option.mpi_mode=true" in props and "option.mpi_mode" not in ds.serving_properties(gpu_image, 1)
    accelerate = ds.serving_properties(cpu_image, 1, way="accelerate")
    assert "option.partition=accelerate" in accelerate and '"model.layers.1":"disk"' in accelerate
    assert "option.mpi_mode=false" in ds.serving_properties(cpu_image, 1, way="diffusion")
