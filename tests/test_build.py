"""The build engine against the real Docker Engine with BuildKit, on the local test matrix.

These tests build real images from the production templates (tests/matrix.local.yaml swaps only the
base image, the torch wheel source and the DJL Serving package, which cannot be fetched here).
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import signal
import subprocess
import tarfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import LMI, ROOT, build, docker, lmi, local_matrix, tags_of

from buildkit import lock
from tests.local import prepare

pytestmark = pytest.mark.engine


def test_build_tags_labels_then_skip_then_force(local, local_image) -> None:
    # The session's shared image: its first build, in a repository of its own, is this test's.
    repo, matrix, first = local_image["repo"], local_image["matrix"], local_image["result"]
    assert "1 built" in first.stdout, first.stdout
    plan = local_image["plan"]
    tags = tags_of(repo)
    assert {"0.32.0-deepspeed0.18.9-torch2.13.0-cpu-py311-debian12-cpu", "deepspeed0.18-cpu", "djl0.32-cpu",
            "cpu-latest"} <= tags
    assert any(t == f"hash-{labels_hash[:16]}" for t in tags) if (labels_hash := docker(
        "inspect", f"{repo}:djl0.32-cpu", "--format", "{{index .Config.Labels \"io.lmi.content-hash\"}}"
    ).stdout.strip()) else False
    labels = json.loads(docker("inspect", f"{repo}:djl0.32-cpu", "--format", "{{json .Config.Labels}}").stdout)
    assert labels["io.lmi.torch"] == "2.13.0" and labels["io.lmi.deepspeed"] == "0.18.9"
    assert labels["io.lmi.djl-serving"] == "0.32.0" and labels["io.lmi.python"] == "3.11"
    assert labels["com.amazonaws.sagemaker.capabilities.accept-bind-to-port"] == "true"
    assert re.fullmatch(r"[0-9a-f]{64}", labels["io.lmi.content-hash"])
    assert plan["tag"] in tags
    # One plan: `lmi plan` (no wheelhouse, as `make plan` runs it), `lmi ci-matrix` (with it, as CI runs it)
    # and the label of the image `lmi build --wheelhouse` (the Makefile's path) built name the same hash.
    ci = json.loads(lmi("--matrix", str(matrix), "ci-matrix", "--wheelhouse", str(local["wheelhouse"])).stdout)
    assert plan["content_hash"] == ci["include"][0]["content_hash"] == labels["io.lmi.content-hash"]
    config = json.loads(docker("inspect", f"{repo}:djl0.32-cpu", "--format", "{{json .Config}}").stdout)
    assert config["User"] == "1001:1001" and "8080/tcp" in config["ExposedPorts"]
    image_id = docker("inspect", f"{repo}:djl0.32-cpu", "--format", "{{.Id}}").stdout.strip()

    again = build(matrix, local)
    assert again.returncode == 0
    assert re.search(r"local-cpu\s+skipped", again.stdout) and "0 built, 1 skipped" in again.stdout
    assert docker("inspect", f"{repo}:djl0.32-cpu", "--format", "{{.Id}}").stdout.strip() == image_id

    forced = build(matrix, local, "--force")
    assert forced.returncode == 0 and "1 built" in forced.stdout
    # The same content under the same tags (a new creation time): the tests sharing the image find what they
    # were given.
    assert _hash_tag_of(repo, "djl0.32-cpu", full=True) == plan["content_hash"] and tags_of(repo) == tags


@pytest.fixture(scope="module")
def bumped(local, local_image, tmp_path_factory):
    """A DJL-only bump (0.32.0 -> 0.31.0) of the shared image, its DJL step run for real (nonce) with a CA
    bundle secret holding a marker and the package's sha256 as a build arg: one forced run of that step
    proves the layer reuse of a bump, the checksum verification and that the secret reaches no layer."""
    directory = tmp_path_factory.mktemp("bumped")
    marker = f"lmi-ca-marker-{uuid.uuid4().hex}"
    bundle = directory / "ca.crt"
    bundle.write_text(Path("/etc/ssl/certs/ca-certificates.crt").read_text() + f"# {marker}\n")
    digest = hashlib.sha256(prepare.standin_deb("0.31.0", directory).read_bytes()).hexdigest()
    repo = f"lmi-bump-{uuid.uuid4().hex[:8]}"
    bump = {'djl: "0.32.0"': 'djl: "0.31.0"', "djl-serving_0.32.0-1_all.deb": "djl-serving_0.31.0-1_all.deb"}
    matrix = local_matrix(directory, repo, rerun_djl_step=True, **bump)
    arg = ("--build-arg", f"DJL_SERVING_SHA256={digest}")
    result = build(matrix, local, "--ca-bundle", str(bundle), *arg)
    log = (ROOT / ".lmi" / "logs" / "local-cpu.log").read_text()  # read now: every build of local-cpu writes it
    yield {"repo": repo, "matrix": matrix, "result": result, "log": log, "marker": marker, "arg": arg,
           "directory": directory}
    for tag in tags_of(repo):
        docker("rmi", "-f", f"{repo}:{tag}")


def test_djl_bump_reuses_torch_and_library_layers(bumped) -> None:
    result, log = bumped["result"], bumped["log"]
    assert result.returncode == 0, result.stdout + result.stderr
    steps = {}
    for match in re.finditer(r"^#(\d+) \[runtime\s+\d+/\d+\] (RUN .*)$", log, re.M):
        steps[match.group(1)] = match.group(2)
    cached = set(re.findall(r"^#(\d+) CACHED$", log, re.M))
    by_kind = {kind: [n for n, step in steps.items() if marker in step] for kind, marker in (
        ("torch", "torch.lock"), ("deepspeed", "deepspeed.lock"), ("libraries", "requirements.lock"),
        ("djl", "djl-serving.deb"))}
    assert all(by_kind.values()), by_kind
    for kind in ("torch", "libraries"):
        assert set(by_kind[kind]) <= cached, (kind, log[-2000:])
    # Only the DJL step and what follows ran again: DeepSpeed, the one family-specific layer, comes last.
    assert not set(by_kind["djl"]) & cached and not set(by_kind["deepspeed"]) & cached
    assert "0.31.0-deepspeed0.18.9" in " ".join(tags_of(bumped["repo"]))


def test_broken_image_fails_alone_with_its_log(local, repo) -> None:
    # A second line whose lock was tampered with: one file's sha256 no longer matches what the index serves.
    broken = """
  broken:
    djl: "0.32.0"
    deepspeed: "0.18.9"
    torch: "2.13.0"
    python: "3.11"
    os: debian12
    transformers: "4.57.3"
    diffusers: "0.35.2"
    accelerate: "1.11.0"
    tag_suffix: broken
"""
    matrix = local_matrix(local["dir"], repo, extra_lines=broken)
    doc = json.loads(lock.lock_path(matrix).read_text())
    tampered = json.loads(json.dumps(doc["sets"]["local-cpu"]))
    for pin in tampered["layers"]["runtime"]:
        if pin[0] == "accelerate":
            pin[2] = ["sha256:" + "0" * 64]
    doc["sets"]["broken-cpu"] = tampered
    lock.lock_path(matrix).write_text(json.dumps(doc))
    result = build(matrix, local, "-j", "2")
    assert result.returncode == 1
    assert re.search(r"local-cpu\s+built", result.stdout), result.stdout
    assert re.search(r"broken-cpu\s+failed", result.stdout)
    assert "failed: broken-cpu:" in result.stderr and "log: " in result.stderr
    assert "HASHES" in result.stderr and "accelerate" in result.stderr  # the tail of its log names what failed
    assert "Traceback" not in result.stderr
    tags = tags_of(repo)
    broken = json.loads(lmi("--matrix", str(matrix), "plan", "--json", "broken-*").stdout)[0]
    assert broken["tag"].endswith("-cpu-broken") and "djl0.32-cpu-broken" in broken["aliases"]
    assert not {broken["tag"], *broken["aliases"]} & tags and "djl0.32-cpu" in tags
    assert {t for t in tags if t.startswith("hash-")} == {_hash_tag_of(repo, "djl0.32-cpu")}  # none for broken


def _hash_tag_of(repo: str, tag: str, full: bool = False) -> str:
    """The image's hash- tag as its io.lmi.content-hash label names it (full: the whole label)."""
    label = docker("inspect", f"{repo}:{tag}", "--format", "{{index .Config.Labels \"io.lmi.content-hash\"}}")
    return label.stdout.strip() if full else f"hash-{label.stdout.strip()[:16]}"


def test_ca_bundle_never_reaches_a_layer(bumped) -> None:
    # The DJL step ran for real (nonce), mounted the CA secret and downloaded with it.
    repo, matrix, arg, marker = bumped["repo"], bumped["matrix"], bumped["arg"], bumped["marker"]
    assert bumped["result"].returncode == 0, bumped["result"].stdout + bumped["result"].stderr
    # A build arg is content: plan and ci-matrix given the same one name the hash the image is labelled with.
    plan = json.loads(lmi("--matrix", str(matrix), "plan", "--json", *arg).stdout)[0]["content_hash"]
    ci = json.loads(lmi("--matrix", str(matrix), "ci-matrix", *arg).stdout)["include"][0]["content_hash"]
    assert plan == ci == _hash_tag_of(repo, "djl0.31-cpu", full=True)
    assert plan != json.loads(lmi("--matrix", str(matrix), "plan", "--json").stdout)[0]["content_hash"]
    assert "/tmp/djl-serving.deb: OK" in bumped["log"]  # verified against the checksum this time
    assert re.search(r"^#\d+ \[runtime\s+\d+/\d+\] RUN --mount=type=secret,id=ca", bumped["log"], re.M)
    assert marker not in docker("history", "--no-trunc", f"{repo}:djl0.31-cpu").stdout
    assert marker not in docker("inspect", f"{repo}:djl0.31-cpu").stdout
    saved = bumped["directory"] / "image.tar"
    assert docker("save", "-o", str(saved), f"{repo}:djl0.31-cpu").returncode == 0
    needle = marker.encode()
    with tarfile.open(saved) as outer:
        for member in outer.getmembers():
            if member.isfile():
                data = outer.extractfile(member).read()
                assert needle not in data, member.name
                if member.name.endswith("layer.tar"):
                    with tarfile.open(fileobj=io.BytesIO(data)) as layer:
                        for f in layer.getmembers():
                            if f.isfile():
                                assert needle not in layer.extractfile(f).read(), (member.name, f.name)
    saved.unlink()


def test_wrong_checksum_fails_the_build(local, repo) -> None:
    matrix = local_matrix(local["dir"], repo, rerun_djl_step=True)
    result = build(matrix, local, "--build-arg", "DJL_SERVING_SHA256=" + "0" * 64)
    assert result.returncode == 1
    assert "FAILED" in result.stderr or "did NOT match" in result.stderr
    assert not tags_of(repo)


def test_unpullable_base_says_how_out(local, repo) -> None:
    # A mirror on a closed loopback port: the pull fails at once, and no traffic leaves the machine.
    matrix = local_matrix(local["dir"], repo, **{"base_mirror: lmi-local": "base_mirror: 127.0.0.1:9/none"})
    result = build(matrix, local)
    assert result.returncode == 1
    assert "base image 127.0.0.1:9/none/library/debian:12 cannot be pulled" in result.stderr
    assert "--base-mirror" in result.stderr and "docker load" in result.stderr


class _Slow(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        time.sleep(60)
        self.send_error(500)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("when,sig,code", [("as-the-build-starts", signal.SIGINT, 130),
                                           ("mid-download", signal.SIGINT, 130),
                                           ("mid-download", signal.SIGTERM, 143)])  # a cancelled CI job
def test_interrupt_stops_the_build_and_tags_nothing(local, repo, when, sig, code) -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/slow.deb"
    matrix = local_matrix(local["dir"], repo, **{local["djl_url"]: url})
    log = ROOT / ".lmi" / "logs" / "local-cpu.log"
    log.unlink(missing_ok=True)  # wait on this build's log, not an earlier one
    # As from an interactive terminal: a shell starts background jobs with SIGINT ignored, which would
    # make this a test of the caller's shell, not of lmi.
    proc = subprocess.Popen([str(LMI), "--matrix", str(matrix), "build", "--plain", "--wheelhouse",
                             str(local["wheelhouse"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # The build log starts with the command (naming slow.deb); the DJL step's header names the package.
    ready = {"as-the-build-starts": lambda text: "slow.deb" in text,
             "mid-download": lambda text: re.search(r"^#\d+ \[runtime\s+\d+/\d+\] RUN .*djl-serving\.deb", text, re.M)}
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (log.exists() and ready[when](log.read_text(errors="replace"))):
        time.sleep(0.05)
    if when == "mid-download":
        time.sleep(2)
    started = time.monotonic()
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=60)
    httpd.shutdown()
    assert proc.returncode == code, out + err
    assert time.monotonic() - started < 30  # not left to run into the 60 s download
    assert "interrupted" in err and "Traceback" not in err
    assert not tags_of(repo)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(matrix.parent / "images" / "local-cpu") not in ps  # no build left running


def test_stopped_engine_is_a_clear_error(tmp_path) -> None:
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-such.sock"}
    result = lmi("--matrix", str(prepare.LOCAL_MATRIX), "build", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the docker engine does not answer" in result.stderr and "make engine" in result.stderr


def test_client_without_buildkit_is_passed_over(local, tmp_path) -> None:
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\n"
                    "case \"$1\" in version) echo 99.0.0;; buildx) echo \"unknown command: buildx\" >&2; exit 1;;\n"
                    "build) echo 'ERROR: BuildKit is enabled but the buildx component is missing or broken.' >&2;"
                    " exit 1;; esac\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    detected = subprocess.run([str(LMI), "engine"], capture_output=True, text=True, env=env, timeout=120)
    assert detected.returncode == 0, detected.stderr
    assert "builds with /usr/bin/docker (buildkit" in detected.stdout  # the fake one first on PATH is skipped
    forced = subprocess.run([str(LMI), "engine", "--docker", str(fake)], capture_output=True, text=True, env=env,
                            timeout=120)
    assert forced.returncode == 2 and "Traceback" not in forced.stderr
    assert f"{fake} (client 99.0.0): no buildx, and DOCKER_BUILDKIT=1 build failed: ERROR: BuildKit is enabled" \
        in forced.stderr
    assert "Install the buildx plugin" in forced.stderr


def test_one_engine_query_tells_which_hash_tags_exist(repo) -> None:
    """A no-op `lmi build` asks the engine once for every image's content-hash tag (engine.present), and its
    answer is image_exists' for each ref, a ref spelled with docker.io/ included."""
    from buildkit import engine

    try:
        engine.ensure_engine()
    except engine.EngineError as exc:
        pytest.skip(f"no docker engine can run here: {exc}")
    sdk = engine.sdk()
    image = sdk.images.build(fileobj=io.BytesIO(b"FROM scratch\nLABEL io.lmi.test=present\n"), rm=True)[0]
    for tag in ("hash-a", "hash-b"):
        image.tag(repo, tag)
    other = f"{repo}-other"
    image.tag(other, "hash-c")
    try:
        asked = [f"{repo}:hash-a", f"{repo}:hash-b", f"{repo}:hash-missing", f"docker.io/library/{other}:hash-c",
                 f"{other}:hash-a"]
        lists = []
        listing = sdk.api.images
        sdk.api.images = lambda **kw: lists.append(kw) or listing(**kw)
        found = engine.present(sdk, asked)
        assert len(lists) == 1, lists  # one listing for all of them
        assert found == {f"{repo}:hash-a", f"{repo}:hash-b", f"docker.io/library/{other}:hash-c"}
        assert found == {ref for ref in asked if engine.image_exists(sdk, ref)}
        assert engine.present(sdk, []) == set()
    finally:
        docker("rmi", f"{other}:hash-c")
