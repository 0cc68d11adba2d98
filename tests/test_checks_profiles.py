"""The smoke checks per profile: what `lmi test` generates for each engine's images, the builtins
each profile names and where they are defined, and how the checker (lmi_check.py) loads a profile's
checks from a file, as it does when `lmi test` mounts both in a test container."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from importlib import metadata

import pytest
from conftest import ROOT

from buildkit import matrix, profiles, smoke
from buildkit.spec import resolve


@pytest.fixture(scope="module")
def production(facts):
    return {s.id: s for s in resolve(matrix.load(ROOT / "matrix.yaml", facts), facts)}


def _one(production, name: str, gpu: bool = True):
    return next(s for s in production.values() if s.stack.name == name and s.family.is_gpu == gpu)


def _by_tier(checks) -> dict[str, list[str]]:
    tiers: dict[str, list[str]] = {}
    for c in checks:
        tiers.setdefault(c.tier, []).append(c.name)
    return tiers


# What `lmi test` generated for a DeepSpeed GPU image before the profiles existed (smoke.py at the commit
# before the profiles existed), in order: the profile refactor must not change it.
DEEPSPEED_BEFORE = {
    "cpu": ["python-version", "torch-version", "torch-cuda", "deepspeed-version", "transformers-version",
            "diffusers-version", "accelerate-version", "djl-serving-version", "java-version", "pip-check", "imports",
            "tiny-forward", "deepspeed-prebuilt-ops", "cuda-compat-files", "entrypoint-file", "serving-config",
            "model-dir", "metadata-labels", "metadata-user", "metadata-port", "metadata-healthcheck",
            "metadata-entrypoint", "metadata-env", "size-budget"],
    "gpu": ["nvidia-smi", "cuda-available", "compute-capability", "arch-list", "bf16", "deepspeed-ops",
            "deepspeed-inference", "nccl-allreduce", "cuda-compat-active"],
    "serving": ["serving-ping", "serving-invocations", "serving-accelerate", "serving-diffusion"],
}


def test_deepspeed_checks_are_what_they_were(production) -> None:
    for spec in (s for s in production.values() if s.stack.name == "deepspeed"):
        tiers = _by_tier(smoke.generate(spec, smoke.TIERS))
        want = DEEPSPEED_BEFORE if spec.family.is_gpu else {t: n for t, n in DEEPSPEED_BEFORE.items() if t != "gpu"}
        assert tiers == want, spec.id
    config = next(c for c in smoke.generate(_one(production, "deepspeed"), ("cpu",)) if c.name == "serving-config")
    assert config.params == {"path": "/opt/djl/conf/config.properties", "contains": r"(?m)^model_store=/opt/ml/model$"}


def test_vllm_gets_its_own_checks_and_none_of_djl(production) -> None:
    spec = _one(production, "vllm")
    checks = smoke.generate(spec, smoke.TIERS)
    tiers = _by_tier(checks)
    assert tiers["cpu"][:11] == ["python-version", "torch-version", "torch-cuda", "vllm-version", "pip-check",
                                 "installed-files-distinct", "vllm-import", "vllm-routes", "sm-vllm-mapping",
                                 "vllm-serve-help", "cuda-compat-files"]
    assert "vllm-kernels" in tiers["gpu"] and "nvidia-smi" in tiers["gpu"]
    assert tiers["serving"] == ["serving-ping", "serving-chat", "serving-completion"]
    text = json.dumps([c.record() for c in checks]).lower()
    assert not re.search(r"deepspeed|djl|java|imports|accelerate|diffusion", text), text
    config = next(c for c in checks if c.name == "serving-config")
    assert config.params["path"] == "/opt/lmi/python/sm_vllm.py"
    assert len({c.name for c in checks}) == len(checks)


def _registered(checker) -> dict[str, str]:
    """name -> tier of every builtin the checker registers with this profile's checks loaded (a fresh process)."""
    code = ("import json, sys; sys.path.insert(0, 'buildkit/resources/check'); import lmi_check; "
            "lmi_check.load_profile(sys.argv[1]); "
            "print(json.dumps({n: t for n, (t, _) in lmi_check.BUILTINS.items()}))")
    out = subprocess.run([sys.executable, "-c", code, str(checker)], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("name", sorted(profiles.PROFILES))
def test_every_builtin_a_profile_names_is_defined_in_its_tier(production, name) -> None:
    """Each name is registered by the checker or the profile's checks, in the tier the profile runs it, or is a
    library version (`<dist>-version`) the image's claims name."""
    spec = _one(production, name)
    registered = _registered(spec.profile.CHECKER)
    claimed = spec.claims()["versions"]
    for tier, names in spec.profile.checks(spec).items():
        for check in names:
            if check in registered:
                assert registered[check] == tier, (check, registered[check], tier)
            else:
                assert check.endswith("-version") and check[: -len("-version")] in claimed, check


def test_the_core_checkers_name_no_engine() -> None:
    for path in (ROOT / "buildkit" / "smoke.py", smoke.CHECKER):
        assert not re.search(r"deepspeed|djl|vllm", path.read_text(), re.I), path


# --- the checker loads a profile's checks from a file ---------------------------------------------------------

PROFILE_CHECKS = '''import lmi_check
from lmi_check import builtin, expect


@builtin("answer", "cpu")
def answer(claims):
    expect(claims["answer"] == 42, f"the answer is {claims['answer']}")
    return "42, " + lmi_check.__name__
'''


def _run(args: list[str], cwd=ROOT) -> tuple[int, list[dict], str]:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300)
    return out.returncode, [json.loads(line) for line in out.stdout.splitlines()], out.stderr


@pytest.mark.parametrize("how", ["in-place", "mounted"])
def test_checker_loads_a_profile_from_a_path(tmp_path, how) -> None:
    """Run where it lies on a host, and as the copy that test containers run: the profile's `import lmi_check` is
    the checker that runs, in the worker process too."""
    (tmp_path / "toy_check.py").write_text(PROFILE_CHECKS)
    if how == "in-place":
        start = [str(smoke.CHECKER)]
    else:
        shutil.copy(smoke.CHECKER, tmp_path / "lmi_check.py")
        start = [str(tmp_path / "lmi_check.py")]
    records = json.dumps([{"name": "answer", "tier": "cpu", "kind": "builtin"}])
    code, events, err = _run([*start, "--profile", str(tmp_path / "toy_check.py"), "--claims-json",
                              '{"answer": 42}', "--checks-json", records], cwd=tmp_path if how == "mounted" else ROOT)
    assert code == 0, err
    assert events == [{"name": "answer", "tier": "cpu", "passed": True, "message": "42, __main__", "seconds":
                       events[0]["seconds"]}]
    code, events, _ = _run([*start, "--profile", str(tmp_path / "toy_check.py"), "--claims-json", '{"answer": 41}',
                            "--checks-json", records], cwd=tmp_path if how == "mounted" else ROOT)
    assert code == 1 and events[0]["message"] == "the answer is 41"
    # Without the profile's checks, its builtin is unknown: a failed check that says so, not a crash.
    code, events, _ = _run([*start, "--claims-json", "{}", "--checks-json", records],
                           cwd=tmp_path if how == "mounted" else ROOT)
    assert code == 1 and events[0]["message"].startswith("no builtin check answer")


def test_a_profile_that_cannot_load_is_refused(tmp_path) -> None:
    (tmp_path / "clash_check.py").write_text("from lmi_check import builtin\n\n\n"
                                             "@builtin('pip-check', 'cpu')\ndef mine(claims):\n    return ''\n")
    for path, why in ((tmp_path / "missing_check.py", "FileNotFoundError"),
                      (tmp_path / "clash_check.py", "builtin check pip-check is registered twice")):
        code, events, err = _run([str(smoke.CHECKER), "--profile", str(path), "--claims-json", "{}",
                                  "--checks-json", "[]"])
        assert code == 2 and not events and f"--profile {path}: cannot load it" in err and why in err, err
        assert "Traceback" not in err


def test_library_versions_come_from_the_claims() -> None:
    pip = metadata.version("pip")
    records = json.dumps([{"name": "pip-version", "tier": "cpu", "kind": "builtin"}])
    code, events, _ = _run([str(smoke.CHECKER), "--claims-json", json.dumps({"versions": {"pip": pip}}),
                            "--checks-json", records])
    assert code == 0 and events[0]["message"] == f"pip {pip}"
    code, events, _ = _run([str(smoke.CHECKER), "--claims-json", json.dumps({"versions": {"pip": "1.0"}}),
                            "--checks-json", records])
    assert code == 1 and events[0]["message"] == f"pip: the matrix says 1.0, the image has {pip}"
    code, events, _ = _run([str(smoke.CHECKER), "--claims-json", '{"versions": {}}', "--checks-json", records])
    assert code == 1 and events[0]["message"] == "the claims name no version of pip"


# --- what the runner asks of the profile, without an engine ----------------------------------------------------


def _runner(tmp_path) -> smoke.Runner:
    """A Runner's host-side parts (no engine: nothing here starts a container)."""
    runner = smoke.Runner.__new__(smoke.Runner)
    runner._checker_dir, runner._profiles = tmp_path, {}
    return runner


def test_profile_checks_are_mounted_beside_the_checker_and_named(production, tmp_path) -> None:
    runner = _runner(tmp_path)
    for name in sorted(profiles.PROFILES):
        spec = _one(production, name)
        path, digest = runner.profile_checker(spec)
        source = spec.profile.CHECKER.read_bytes()
        assert path == f"{smoke.CHECK_DIR}/{spec.profile.CHECKER.name}"
        assert digest == "sha256:" + hashlib.sha256(source).hexdigest()
        assert (tmp_path / spec.profile.CHECKER.name).read_bytes() == source


def test_vllm_serving_is_skipped_without_a_gpu(production, tmp_path) -> None:
    spec = _one(production, "vllm")
    checks = [c for c in smoke.generate(spec, ("serving",))]
    outcomes = _runner(tmp_path).serving("no-image", spec, checks, False, "nvidia-smi is not on this host")
    assert [(o.name, o.passed) for o in outcomes] == [(c.name, None) for c in checks]
    assert outcomes[0].message == "skipped: the vllm way needs a GPU (nvidia-smi is not on this host)"


def test_expected_env_comes_from_the_profile(production) -> None:
    check = smoke.Check("metadata-env", "cpu", "metadata", {"what": "env"})
    for name in sorted(profiles.PROFILES):
        spec = _one(production, name)
        env = {"LMI_IMAGE_ID": spec.id, **spec.profile.SERVING_ENV}
        if spec.arch_list:
            env["TORCH_CUDA_ARCH_LIST"] = spec.arch_list
        attrs = {"Config": {"Env": [f"{k}={v}" for k, v in env.items()]}}
        assert smoke.Runner.metadata(None, attrs, spec, check).passed, name
        missing = next(iter(spec.profile.SERVING_ENV))
        attrs = {"Config": {"Env": [f"{k}={v}" for k, v in env.items() if k != missing]}}
        outcome = smoke.Runner.metadata(None, attrs, spec, check)
        assert not outcome.passed and missing in outcome.message, name


def test_the_vllm_answers_are_checked(production) -> None:
    """The chat and completion asks pass an OpenAI answer of the right shape and fail anything else."""
    way = _one(production, "vllm").profile.SERVING_WAYS[0]
    chat, completion = (a.ask for a in way.asks)

    class Answers:
        def __init__(self, status, body):
            self.status, self.body, self.sent = status, body, []

        def post(self, payload, *curl):
            self.sent.append(payload)
            return self.status, json.dumps(self.body)

    good_chat = {"object": "chat.completion", "choices": [{"message": {"role": "assistant", "content": "ab"}}],
                 "usage": {"completion_tokens": 2}}
    client = Answers("200", good_chat)
    assert chat(client, ["ab"], 1)[0] and client.sent[0]["messages"][0]["role"] == "user"
    assert not chat(Answers("200", {**good_chat, "usage": {"completion_tokens": 0}}), ["ab"], 1)[0]
    assert not chat(Answers("400", {"error": "no chat template"}), ["ab"], 1)[0]
    good = {"object": "text_completion", "choices": [{"text": "ab"}], "usage": {"completion_tokens": 2}}
    client = Answers("200", good)
    ok, message = completion(client, ["ab"], 1)
    assert ok and "prompt" in client.sent[0] and "'ab'" in message
    assert not completion(Answers("200", good_chat), ["ab"], 1)[0]
