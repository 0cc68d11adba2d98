"""Publishing against real servers started here: Debian's docker-registry with htpasswd auth (and a
fault-injecting proxy in front of it), and moto's ECR server. No traffic leaves the machine."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import secrets
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, docker, free_port, lmi, local_matrix, local_registry

from buildkit import engine, index, registry, smoke
from buildkit import facts as facts_mod
from buildkit import matrix as matrix_mod
from buildkit.profiles import REGISTRY
from buildkit.publish import docker_login
from buildkit.spec import IMMUTABLE_FILTERS, resolve

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory):
    """docker-registry on a loopback port, htpasswd auth, a random password."""
    import bcrypt

    root = tmp_path_factory.mktemp("registry")
    password = secrets.token_urlsafe(18)
    htpasswd = root / "htpasswd"
    htpasswd.write_text("lmi:" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=8)).decode() + "\n")
    with local_registry(root, htpasswd) as host:
        yield {"host": host, "user": "lmi", "password": password, "root": root}


@pytest.fixture
def client_env(tmp_path, auth_registry):
    """A docker config of its own (so the user's is untouched), logged in to the test registry."""
    config = tmp_path / "docker-config"
    config.mkdir()
    env = {**os.environ, "DOCKER_CONFIG": str(config)}
    return env


def login(env, host, user, password):
    old = os.environ.get("DOCKER_CONFIG")
    os.environ["DOCKER_CONFIG"] = env["DOCKER_CONFIG"]
    try:
        docker_login(engine.detect_client().path, host, user, password)
    finally:
        if old is None:
            os.environ.pop("DOCKER_CONFIG")
        else:
            os.environ["DOCKER_CONFIG"] = old


def small_image(tested, payload: str, passed: bool | None = True) -> str:
    """A few-KB image under the spec's immutable tag, labelled like an `lmi build` image, with a smoke
    record for its digest (passed, failed, or none): registry logic needs no 2 GB image. The gate and the
    end-to-end flow with the real local image are tested in tests/test_smoke.py and tests/test_ci.py."""
    import hashlib

    spec = tested["spec"]
    context = Path(tested["dir"]) / f"small-{hashlib.sha256(payload.encode()).hexdigest()[:8]}"
    context.mkdir(exist_ok=True)
    (context / "payload").write_text(payload)
    content_hash = hashlib.sha256(payload.encode()).hexdigest()
    (context / "Dockerfile").write_text(f"FROM scratch\nCOPY payload /payload\n"
                                        f"LABEL io.lmi.content-hash={content_hash}\n")
    ref = f"{spec.repository}:{spec.tag}"
    assert docker("build", "-q", "-t", ref, str(context)).returncode == 0
    image_id = docker("inspect", ref, "--format", "{{.Id}}").stdout.strip()
    if passed is not None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        smoke.Record(schema=smoke.RECORD_SCHEMA, image=ref, image_id=image_id, content_hash=content_hash,
                     spec_id=spec.id, tiers=["cpu"], passed=passed, outcomes=[], started=now,
                     finished=now).save(ROOT / smoke.RECORD_DIR)
    return image_id


@pytest.fixture(scope="module")
def tested(local, tmp_path_factory):  # noqa: F811
    """The spec of the local matrix in a repository of its own, with a small image under its tag."""
    repo = f"lmi-pub-{secrets.token_hex(4)}"
    matrix = local_matrix(local["dir"], repo)
    f = facts_mod.load(REGISTRY)
    spec = resolve(matrix_mod.load(matrix, f), f)[0]
    info = {"repo": repo, "matrix": matrix, "spec": spec, "dir": tmp_path_factory.mktemp("small")}
    small_image(info, "v1")
    yield info
    for tag in docker("images", repo, "--format", "{{.Tag}}").stdout.split():
        docker("rmi", "-f", f"{repo}:{tag}")


def push(tested, url, idx, env, *extra):
    return lmi("--matrix", str(tested["matrix"]), "push", "--registry", url, "--index", str(idx), *extra, env=env)


def no_secret(password: str, *texts: str) -> None:
    for text in texts:
        assert password not in text
    for log in (ROOT / ".lmi" / "logs").glob("*"):
        assert password not in log.read_text(errors="replace"), log


def test_push_uri_pull_and_rerun(tested, auth_registry, client_env, tmp_path) -> None:
    host, password = auth_registry["host"], auth_registry["password"]
    login(client_env, host, "lmi", password)
    idx = tmp_path / "images.json"
    first = push(tested, f"oci://{host}/team", idx, client_env)
    assert first.returncode == 0, first.stdout + first.stderr
    lines = first.stdout.splitlines()
    pushed = [line.split(": ")[0].split(":")[-1] for line in lines if line.endswith(": pushed")]
    tag = tested["spec"].tag
    assert pushed[:2] == [f"{tag}-r1", f"hash-{small_hash('v1')[:16]}"]  # immutable first: revision 1, content
    assert set(pushed[2:]) == {tag, "cpu-latest", "deepspeed0.18-cpu", "djl0.32-cpu"}  # then the aliases
    data = json.loads(idx.read_text())
    assert data["schema"] == index.SCHEMA and len(data["images"]) == 1
    entry = data["images"][0]
    assert entry["family"] == "cpu" and entry["smoke"]["passed"] and entry["components"]["torch"] == "2.13.0"
    assert entry["revision"] == 1 and entry["tag"] == f"{tag}-r1" and tag in entry["aliases"]
    assert entry["host"]["summary"].startswith("CPU image")
    assert entry["registries"][0]["uri"] == f"{host}/team/{tested['repo']}@{entry['digest']}"
    assert (tmp_path / "AVAILABLE_IMAGES.md").read_text().count(entry["digest"]) == 1

    uri = lmi("uri", "--instance", "cpu", "--index", str(idx)).stdout.strip()
    assert uri == entry["registries"][0]["uri"]
    pulled = subprocess.run([engine.detect_client().path, "pull", uri], capture_output=True, text=True,
                            env=client_env)
    assert pulled.returncode == 0, pulled.stderr
    assert f"Digest: {entry['digest']}" in pulled.stdout
    repo_digests = docker("inspect", uri, "--format", "{{json .RepoDigests}}").stdout
    assert entry["digest"] in repo_digests

    oci = registry.OciClient(host, credentials=("lmi", password))
    assert oci.manifest(f"team/{tested['repo']}", "index-latest") is not None  # the index, beside the images

    again = push(tested, f"oci://{host}/team", idx, client_env)
    assert again.returncode == 0
    assert again.stdout.count("already there (same image)") == 6 and ": pushed" not in again.stdout
    no_secret(password, first.stdout, first.stderr, again.stdout, again.stderr, idx.read_text())


def small_hash(payload: str) -> str:
    import hashlib

    return hashlib.sha256(payload.encode()).hexdigest()


def test_new_content_is_the_next_revision_and_a_rerun_pushes_nothing(local, tested, auth_registry, client_env,  # noqa: F811
                                                                     tmp_path) -> None:
    """Issue 16's scenario with the plain commands: a first publish, then a toolkit edit (the same spec, new
    content, a new content hash) publishes revision 2; the same push again pushes nothing and exits 0."""
    host, password = auth_registry["host"], auth_registry["password"]
    login(client_env, host, "lmi", password)
    url, repo, tag = f"oci://{host}/rev", f"rev/{tested['repo']}", tested["spec"].tag
    idx = tmp_path / "images.json"
    first_id = small_image(tested, "rev-1")
    assert push(tested, url, idx, client_env).returncode == 0
    second_id = small_image(tested, "rev-2")  # what a template, check or handler edit does to the image
    second = push(tested, url, idx, client_env)
    assert second.returncode == 0, second.stderr
    assert f"{tag}-r2 (new content)" in second.stdout
    oci = registry.OciClient(host, credentials=("lmi", password))
    assert oci.config_digest(repo, f"{tag}-r1") == first_id  # an immutable tag never moves
    for moved in (f"{tag}-r2", tag, "cpu-latest", "djl0.32-cpu", f"hash-{small_hash('rev-2')[:16]}"):
        assert oci.config_digest(repo, moved) == second_id, moved
    data = json.loads(idx.read_text())
    assert sorted((e["revision"], e["tag"]) for e in data["images"]) == [(1, f"{tag}-r1"), (2, f"{tag}-r2")]
    digests = {e["revision"]: e["digest"] for e in data["images"]}
    assert lmi("uri", "--instance", "cpu", "--index", str(idx)).stdout.strip().endswith(digests[2])
    older = lmi("uri", "--instance", "cpu", "--revision", "r1", "--index", str(idx), "--json")
    assert json.loads(older.stdout)["digest"] == digests[1] and json.loads(older.stdout)["revision"] == 1
    missing = lmi("uri", "--instance", "cpu", "--revision", "3", "--index", str(idx))
    assert missing.returncode == 2 and "revision 3" in missing.stderr and "revision 2" in missing.stderr
    bad = lmi("uri", "--instance", "cpu", "--revision", "r0", "--index", str(idx))
    assert bad.returncode == 2 and "is not a revision" in bad.stderr and "Traceback" not in bad.stderr
    before = idx.read_bytes()
    again = push(tested, url, idx, client_env)
    assert again.returncode == 0 and ": pushed" not in again.stdout
    assert f"{tag}-r2 (published before)" in again.stdout
    assert json.loads(idx.read_bytes())["images"] == json.loads(before)["images"]
    # The same content built again (another image ID, the same io.lmi.content-hash) is not pushed: the
    # content-hash tag is the dedup key.
    assert docker("build", "-q", "-t", f"{tested['spec'].repository}:{tag}", "--label", "rebuilt=1",
                  str(Path(tested["dir"]) / f"small-{small_hash('rev-2')[:8]}")).returncode == 0
    rebuilt = docker("inspect", f"{tested['spec'].repository}:{tag}", "--format", "{{.Id}}").stdout.strip()
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    smoke.Record(schema=smoke.RECORD_SCHEMA, image=tag, image_id=rebuilt, content_hash=small_hash("rev-2"),
                 spec_id=tested["spec"].id, tiers=["cpu"], passed=True, outcomes=[], started=now,
                 finished=now).save(ROOT / smoke.RECORD_DIR)
    same = push(tested, url, idx, client_env)
    assert same.returncode == 0 and ": pushed" not in same.stdout
    assert "is already published as image" in same.stdout and "this build is not pushed" in same.stdout
    assert oci.config_digest(repo, tag) == second_id


def test_no_smoke_record_no_push(local, tested, auth_registry, client_env, tmp_path) -> None:  # noqa: F811
    host = auth_registry["host"]
    login(client_env, host, "lmi", auth_registry["password"])
    small_image(tested, f"v3-{time.time()}", passed=None)  # built, never tested
    idx = tmp_path / "images.json"
    refused = push(tested, f"oci://{host}/gate", idx, client_env)
    assert refused.returncode == 1
    assert "has no passing smoke record; run `lmi test local-cpu`" in refused.stderr
    assert not idx.exists()
    oci = registry.OciClient(host, credentials=("lmi", auth_registry["password"]))
    assert oci.manifest(f"gate/{tested['repo']}", "djl0.32-cpu") is None
    small_image(tested, f"v4-{time.time()}", passed=False)  # tested, failed
    refused = push(tested, f"oci://{host}/gate", idx, client_env)
    assert refused.returncode == 1 and "has no passing smoke record" in refused.stderr
    # and once it passes, it goes through
    small_image(tested, f"v5-{time.time()}", passed=True)
    assert push(tested, f"oci://{host}/gate", idx, client_env).returncode == 0


def test_wrong_credentials(tested, auth_registry, client_env, tmp_path) -> None:
    host = auth_registry["host"]
    config = Path(client_env["DOCKER_CONFIG"]) / "config.json"
    wrong = "not-" + auth_registry["password"]
    import base64

    config.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(f"lmi:{wrong}".encode()).decode()}}}))
    idx = tmp_path / "images.json"
    result = push(tested, f"oci://{host}/creds", idx, client_env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "access denied" in result.stderr and f"docker login {host}" in result.stderr
    assert not idx.exists()
    no_secret(wrong, result.stdout, result.stderr)
    no_secret(auth_registry["password"], result.stdout, result.stderr)


class FaultProxy:
    """An HTTP proxy in front of the registry that can answer 503 or drop everything, on demand."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.mode = "pass"  # pass | 503 | down
        self.manifest_puts = 0
        self.down_after_manifests: int | None = None
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                is_manifest_put = self.command == "PUT" and "/manifests/" in self.path
                if proxy.down_after_manifests is not None and is_manifest_put and \
                        proxy.manifest_puts >= proxy.down_after_manifests:
                    proxy.mode = "down"
                if proxy.mode == "down":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if proxy.mode == "503":
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = self._read_chunked()  # how docker push uploads layers
                else:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(proxy.upstream, timeout=120)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("content-length", "transfer-encoding")}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if is_manifest_put and resp.status == 201:
                    proxy.manifest_puts += 1
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v.replace(proxy.upstream, proxy.host))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _read_chunked(self) -> bytes:
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_registry_down_mid_push_then_completed_by_a_rerun(tested, auth_registry, client_env, tmp_path) -> None:
    proxy = FaultProxy(auth_registry["host"])
    try:
        login(client_env, proxy.host, "lmi", auth_registry["password"])
        idx = tmp_path / "images.json"
        proxy.down_after_manifests = 1  # the immutable tag goes through, then the registry is gone
        cut = push(tested, f"oci://{proxy.host}/mid", idx, client_env)
        assert cut.returncode == 1 and "Traceback" not in cut.stderr
        assert "the index is unchanged; run the same command again to complete" in cut.stderr
        assert not idx.exists()
        proxy.mode, proxy.down_after_manifests = "pass", None
        rerun = push(tested, f"oci://{proxy.host}/mid", idx, client_env)
        assert rerun.returncode == 0, rerun.stderr
        assert "already there (same image)" in rerun.stdout  # the tag pushed before the cut
        assert json.loads(idx.read_text())["images"][0]["smoke"]["passed"]
    finally:
        proxy.close()


def test_registry_answering_5xx_fails_cleanly(tested, auth_registry, client_env, tmp_path) -> None:
    proxy = FaultProxy(auth_registry["host"])
    try:
        login(client_env, proxy.host, "lmi", auth_registry["password"])
        proxy.mode = "503"
        idx = tmp_path / "images.json"
        started = time.monotonic()
        result = push(tested, f"oci://{proxy.host}/five", idx, client_env)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "did not answer" in result.stderr and "tries" in result.stderr  # retried with backoff first
        assert time.monotonic() - started > 3
        assert not idx.exists()
    finally:
        proxy.close()


def test_promote_by_digest_between_registries(tested, auth_registry, client_env, tmp_path) -> None:
    host = auth_registry["host"]
    login(client_env, host, "lmi", auth_registry["password"])
    idx = tmp_path / "images.json"
    assert push(tested, f"oci://{host}/staging", idx, client_env).returncode == 0
    digest = json.loads(idx.read_text())["images"][0]["digest"]
    gated = lmi("--matrix", str(tested["matrix"]), "gate", "--registry", f"oci://{host}/staging", "--index", str(idx),
                "--no-scan-gate", env=client_env)  # a plain OCI registry has no scanner
    assert gated.returncode == 0, gated.stderr
    result = lmi("--matrix", str(tested["matrix"]), "promote", "--from", f"oci://{host}/staging",
                 "--to", f"oci://{host}/release-a", "--to", f"oci://{host}/release-b", "--index", str(idx),
                 env=client_env)
    assert result.returncode == 0, result.stderr
    oci = registry.OciClient(host, credentials=("lmi", auth_registry["password"]))
    for prefix in ("release-a", "release-b"):
        for tag in ("djl0.32-cpu", "cpu-latest"):
            assert oci.manifest(f"{prefix}/{tested['repo']}", tag)[0] == digest  # the same digest, not a rebuild
    urls = {r["url"] for r in json.loads(idx.read_text())["images"][0]["registries"]}
    assert urls == {f"oci://{host}/staging", f"oci://{host}/release-a", f"oci://{host}/release-b"}
    assert lmi("uri", "--instance", "cpu", "--registry", f"oci://{host}/release-b", "--index",
               str(idx)).stdout.strip() == f"{host}/release-b/{tested['repo']}@{digest}"


def test_uri_from_an_index_url_and_python_api(tmp_path) -> None:
    """An index of schema 1 (before engines were profiles: no `engine`, DJL Serving as `djl_serving`) still
    answers, read as the default engine's images with the components under their matrix keys."""
    data = {"schema": 1, "generated": "now", "images": [
        {"id": f"djl0.{v}-g5", "family": "g5", "tag": f"t{v}", "digest": f"sha256:{v:064d}", "built": "2026",
         "components": {"djl_serving": f"0.{v}.0", "deepspeed": "0.12.6", "torch": "2.1.2", "cuda": "12.1.1",
                        "python": "3.10", "os": "ubuntu22.04"},
         "registries": [{"url": "ecr://123456789012/us-west-2", "kind": "ecr", "region": "us-west-2",
                         "uri": f"123456789012.dkr.ecr.us-west-2.amazonaws.com/lmi@sha256:{v:064d}"}]}
        for v in (26, 27)]}
    (tmp_path / "images.json").write_text(json.dumps(data))
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/images.json"
        newest = lmi("uri", "--instance", "g5", "--region", "us-west-2", "--index", url)
        assert newest.stdout.strip().endswith(f"{27:064d}")
        older = lmi("uri", "--instance", "g5", "--djl", "0.26", "--index", url, "--json")
        assert json.loads(older.stdout)["components"]["djl"] == "0.26.0"
        assert json.loads(older.stdout)["engine"] == "deepspeed"
        missing = lmi("uri", "--instance", "g5", "--djl", "0.30", "--index", url)
        assert missing.returncode == 2 and "g5 has: djl 0.26.0" in missing.stderr and "djl 0.27.0" in missing.stderr
        elsewhere = lmi("uri", "--instance", "g5", "--region", "eu-west-1", "--index", url)
        assert elsewhere.returncode == 2 and "it is in: us-west-2" in elsewhere.stderr
    finally:
        server.shutdown()
    import buildkit

    assert buildkit.image_uri("g5", region="us-west-2", djl="0.26", index=str(tmp_path / "images.json")) \
        .endswith(f"{26:064d}")


# --- ECR's control plane, against moto in server mode ----------------------------------------------------------


@pytest.fixture(scope="module")
def moto_ecr():
    port = free_port()
    proc = subprocess.Popen([str(Path(os.sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL_ECR": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-west-2"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    yield registry.parse("ecr://123456789012/us-west-2/ml")
    proc.terminate()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_ecr_repository_settings(moto_ecr) -> None:
    ecr = registry.Ecr(moto_ecr)
    assert ecr.ensure_repository("ml/lmi-inference") == ["created repository ml/lmi-inference"]
    repo = ecr.client.describe_repositories(repositoryNames=["ml/lmi-inference"])["repositories"][0]
    assert repo["imageTagMutability"] == "MUTABLE_WITH_EXCLUSION"
    assert {f["filter"] for f in repo["imageTagMutabilityExclusionFilters"]} == set(IMMUTABLE_FILTERS)
    assert repo["imageScanningConfiguration"]["scanOnPush"] is True
    assert repo["encryptionConfiguration"]["encryptionType"] == "AES256"
    policy = json.loads(ecr.client.get_lifecycle_policy(repositoryName="ml/lmi-inference")["lifecyclePolicyText"])
    assert policy["rules"][0]["selection"]["tagStatus"] == "untagged"
    assert ecr.ensure_repository("ml/lmi-inference") == []  # idempotent
    ecr.client.create_repository(repositoryName="ml/old", imageTagMutability="MUTABLE")
    assert "ml/old: revision and content-hash tags made immutable (the rest are aliases)" in \
        ecr.ensure_repository("ml/old")


def test_ecr_token_and_retagging(moto_ecr) -> None:
    ecr = registry.Ecr(moto_ecr)
    # moto 5.2 compiles ECR's WILDCARD exclusion filters ("*-latest") as regular expressions and answers
    # put_image with a 500 in such a repository, so retagging is exercised in a plain IMMUTABLE one.
    ecr.client.create_repository(repositoryName="ml/retag", imageTagMutability="IMMUTABLE")
    user, password = ecr.token()
    assert user == "AWS" and password
    # (moto derives an image's digest from its layer digests, so each test image has a layer of its own)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                           "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 2,
                                      "digest": "sha256:" + "c" * 64},
                           "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 1,
                                       "digest": "sha256:" + "1" * 64}]})
    put = ecr.client.put_image(repositoryName="ml/retag", imageManifest=manifest, imageTag="0.27.0-g5-r1",
                               imageManifestMediaType="application/vnd.docker.distribution.manifest.v2+json")
    digest = put["image"]["imageId"]["imageDigest"]
    assert ecr.config_digest("ml/retag", "0.27.0-g5-r1") == "sha256:" + "c" * 64
    ecr.retag("ml/retag", digest, "ml/retag", ["g5-latest", "djl0.27-g5"])
    assert ecr.manifest_digest("ml/retag", "g5-latest") == digest
    other = manifest.replace("c" * 64, "d" * 64).replace("1" * 64, "2" * 64)
    ecr.client.put_image(repositoryName="ml/retag", imageManifest=other, imageTag="0.28.0-g5-r1",
                         imageManifestMediaType="application/vnd.docker.distribution.manifest.v2+json")
    with pytest.raises(registry.RegistryError, match="already holds another image"):
        ecr.retag("ml/retag", digest, "ml/retag", ["0.28.0-g5-r1"])  # a revision tag never moves


def test_ecr_and_oci_addresses() -> None:
    a = registry.parse("ecr://123456789012/us-west-2/team/ml")
    assert (a.host, a.prefix, a.region) == ("123456789012.dkr.ecr.us-west-2.amazonaws.com", "team/ml", "us-west-2")
    assert a.ref("lmi", "g5-latest") == "123456789012.dkr.ecr.us-west-2.amazonaws.com/team/ml/lmi:g5-latest"
    b = registry.parse("oci://127.0.0.1:5000")
    assert b.ref("lmi", digest="sha256:x") == "127.0.0.1:5000/lmi@sha256:x" and b.loopback
    for bad in ("ecr://12345/us-west-2", "s3://x", "oci://", "ecr://123456789012/uswest2"):
        result = lmi("uri", "--instance", "g5", "--registry", bad, "--index", "/nonexistent.json")
        assert result.returncode == 2
        with pytest.raises(Exception, match="is not an address"):
            registry.parse(bad)


def test_index_merge_is_by_image_and_atomic(tmp_path) -> None:
    path = tmp_path / "images.json"
    digest = "sha256:" + "1" * 64
    entry = {"id": "a-g5", "family": "g5", "digest": digest, "tags": ["t"], "built": "1", "tag": "t",
             "components": {"djl_serving": "0.27.0", "deepspeed": "0.12.6", "torch": "2.1.2", "cuda": "12.1.1",
                            "python": "3.10", "os": "ubuntu22.04"},
             "registries": [{"url": "oci://a", "kind": "oci", "region": None, "uri": f"a/x@{digest}"}]}
    index.update(path, [entry], REGISTRY)
    other = {**entry, "registries": [{"url": "oci://b", "kind": "oci", "region": None, "uri": f"b/x@{digest}"}]}
    index.update(path, [other], REGISTRY)
    data = json.loads(path.read_text())
    assert len(data["images"]) == 1 and {r["url"] for r in data["images"][0]["registries"]} == {"oci://a", "oci://b"}
    # no temp files left (the writers' lock file stays, empty)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".images.json.lock"]
    assert lmi("uri", "--instance", "g5", "--index", str(tmp_path / "broken.json")).returncode == 2
