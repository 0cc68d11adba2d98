"""Registry trust and release-index integrity, against local servers on loopback (no engine needed):
credentials never cross origins, loopback is parsed not prefix-matched, passwords never echo, the
index refuses bad digests, tampered blobs and moved immutable tags, and concurrent writers lose nothing."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ROOT, lmi

from buildkit import index, profiles, publish, registry
from buildkit.errors import UserError
from buildkit.profiles import REGISTRY


class Server:
    """A loopback HTTP server whose handler records every request's Authorization header."""

    def __init__(self, handler_cls) -> None:
        self.seen: list[tuple[str, str | None]] = []
        outer = self

        class Handler(handler_cls):
            def log_message(self, *args):
                pass

            def record(self):
                outer.seen.append((self.path, self.headers.get("Authorization")))

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


def test_credentials_never_follow_a_redirect_to_another_origin() -> None:
    class Other(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.record()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

    other = Server(Other)

    class Redirecting(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.record()
            target = f"http://127.0.0.1:{other.port}/elsewhere" if "away" in self.path else "/v2/same-origin"
            if self.path == "/v2/same-origin":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")
                return
            self.send_response(307)
            self.send_header("Location", target)
            self.end_headers()

    origin = Server(Redirecting)
    try:
        client = registry.OciClient(f"127.0.0.1:{origin.port}", credentials=("lmi", "s3cret"), retries=0)
        client.request("GET", "/v2/away")
        client.request("GET", "/v2/here")
        basic = "Basic " + base64.b64encode(b"lmi:s3cret").decode()
        assert origin.seen[0] == ("/v2/away", basic)
        assert other.seen == [("/elsewhere", None)]  # another port is another origin: no credentials
        assert ("/v2/same-origin", basic) in origin.seen  # the same origin keeps them
    finally:
        origin.close()
        other.close()


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1:5000", True), ("127.3.4.5", True), ("localhost:5000", True), ("[::1]:5000", True),
    ("127.evil.example", False), ("127.0.0.1.nip.io:5000", False), ("10.0.0.1:5000", False),
    ("localhost.example", False), ("registry.example:443", False),
])
def test_loopback_is_parsed_not_prefix_matched(host, loopback) -> None:
    assert registry.is_loopback(host) is loopback
    assert registry.OciClient(host, credentials=None).base.startswith("http://" if loopback else "https://")


def test_a_rejected_registry_url_never_echoes_its_password() -> None:
    with pytest.raises(UserError) as err:
        registry.parse("oci://admin:hunter2@registry.example:5000/ml")
    assert "hunter2" not in str(err.value) and "***@" in str(err.value)
    result = lmi("push", "--registry", "https://admin:hunter2@registry.example/ml")
    assert result.returncode == 2 and "hunter2" not in result.stdout + result.stderr


def test_a_plain_http_token_service_never_gets_credentials() -> None:
    class Challenging(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.record()
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer realm="http://tokens.example/token",service="r"')
            self.end_headers()

    server = Server(Challenging)
    try:
        client = registry.OciClient(f"127.0.0.1:{server.port}", credentials=("lmi", "s3cret"), retries=0)
        with pytest.raises(registry.AuthError, match="is not HTTPS"):
            client.request("GET", "/v2/")
    finally:
        server.close()


# --- the release index ------------------------------------------------------------------------------------


def entry(i: int, digest: str | None = None, tag: str | None = None) -> dict:
    digest = digest or "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()
    return {"id": f"line{i}-g5", "family": "g5", "repository": "lmi", "tag": tag or f"t{i}",
            "tags": [tag or f"t{i}", "djl0.36-g5"], "digest": digest,
            "engine": "deepspeed",
            "components": {"djl": "0.36.0", "deepspeed": "0.18.9", "torch": "2.9.1", "cuda": "12.8.1",
                           "python": "3.12", "os": "ubuntu24.04"},
            "registries": [{"url": "oci://r.example/ml", "kind": "oci", "region": None,
                            "uri": f"r.example/ml/lmi@{digest}"}]}


@pytest.mark.parametrize("digest", ["sha256:abc", "md5:" + "0" * 32, "sha256:" + "G" * 64, None])
def test_digests_are_validated_on_read_and_write(tmp_path, digest) -> None:
    bad = entry(1)
    bad["digest"] = digest
    path = tmp_path / "images.json"
    path.write_text(json.dumps({"schema": index.SCHEMA, "generated": None, "images": [bad]}))
    with pytest.raises(UserError, match="not sha256:<64 hex>"):
        index.load(path, REGISTRY)
    with pytest.raises(UserError, match="not sha256:<64 hex>"):
        index.merge(index.empty(), [bad], REGISTRY)


def test_an_immutable_tag_never_names_two_digests() -> None:
    one = index.merge(index.empty(), [entry(1, tag="0.36.0-g5-r1")], REGISTRY)
    moved = entry(2, tag="0.36.0-g5-r1")
    with pytest.raises(UserError) as err:
        index.merge(one, [moved], REGISTRY, "fragment.json")
    assert one["images"][0]["digest"] in str(err.value) and moved["digest"] in str(err.value)
    assert "fragment.json" in str(err.value)
    # Aliases float: the same alias on another digest is fine, the bare tuple tag (an alias of its newest
    # revision) included.
    assert len(index.merge(one, [entry(3)], REGISTRY)["images"]) == 2
    assert len(index.merge(one, [entry(4, tag="0.36.0-g5")], REGISTRY)["images"]) == 2


def test_an_entry_records_its_engine_and_versions_by_matrix_key(tmp_path) -> None:
    """What `lmi push` records for an image of each engine: the profile's name, and its versions under the
    matrix's keys beside the core's components, so `lmi uri --<component>` finds them."""
    from buildkit import facts, matrix, smoke
    from buildkit.spec import resolve

    f = facts.load(REGISTRY)
    specs = resolve(matrix.load(ROOT / "matrix.yaml", f), f)
    record = smoke.Record(schema=1, image="x", image_id="sha256:" + "1" * 64, content_hash=None, spec_id="x",
                          tiers=["cpu"], passed=True, outcomes=[], started="s", finished="f")
    address = registry.parse("oci://r.example/ml")
    entries = []
    for name in sorted({s.stack.name for s in specs}):
        spec = next(s for s in specs if s.stack.name == name and s.family.name == "g6e")
        digest = "sha256:" + hashlib.sha256(spec.id.encode()).hexdigest()
        e = publish.Published(spec, record.image_id, digest, address, [spec.tag], None, "2026", record,
                              f"{spec.tag}-r1", 1).entry(f)
        assert e["engine"] == name and e["components"] == {
            **spec.versions, "torch": spec.torch, "cuda": spec.cuda_patch, "python": spec.python,
            "os": spec.os.name, **spec.libraries}
        entries.append(e)
    path = tmp_path / "images.json"
    index.update(path, entries, REGISTRY)
    for e in entries:
        flags = [f"--{k}={e['components'][k]}" for k in (*profiles.component_keys(), *index.FILTERS)
                 if k in e["components"]]
        found = lmi("uri", "--instance", "g6e", "--engine", e["engine"], *flags, "--index", str(path), "--json")
        assert json.loads(found.stdout)["id"] == e["id"], found.stderr


def test_a_mistyped_index_path_is_an_error_not_an_empty_index(tmp_path) -> None:
    result = lmi("uri", "--instance", "g5", "--index", str(tmp_path / "imagse.json"))
    assert result.returncode == 2 and "no release index there" in result.stderr


def test_twenty_concurrent_merges_keep_twenty_entries(tmp_path) -> None:
    path = tmp_path / "images.json"
    fragments = []
    for i in range(20):
        fragment = tmp_path / f"fragment{i}.json"
        fragment.write_text(json.dumps({"schema": 1, "generated": None, "images": [entry(i)]}))
        fragments.append(fragment)
    procs = [subprocess.Popen([str(Path(sys.executable).parent / "lmi"), "index", "merge", str(f), "--index",
                               str(path)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for f in fragments]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert len(json.loads(path.read_text())["images"]) == 20


def test_index_files_keep_their_mode(tmp_path) -> None:
    path = tmp_path / "images.json"
    index.write(path, index.empty(), REGISTRY)
    os.chmod(path, 0o644)
    index.update(path, [entry(1)], REGISTRY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_tampered_published_index_is_refused(monkeypatch) -> None:
    good = json.dumps({"schema": 1, "generated": None, "images": [entry(1)]}).encode()
    layer = "sha256:" + hashlib.sha256(good).hexdigest()
    manifest = json.dumps({"schemaVersion": 2, "layers": [{"digest": layer}]}).encode()
    state = {"blob": good}

    class Registry(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.record()
            body = manifest if "/manifests/" in self.path else state["blob"] if "/blobs/" in self.path else b"{}"
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            self.send_header("Docker-Content-Digest", "sha256:" + hashlib.sha256(body).hexdigest())
            self.end_headers()
            self.wfile.write(body)

    server = Server(Registry)
    try:
        address = registry.parse(f"oci://127.0.0.1:{server.port}/ml")
        assert publish.fetch_index(address, "lmi", REGISTRY)["images"][0]["id"] == "line1-g5"
        state["blob"] = good.replace(b"line1-g5", b"evil1-g5")
        with pytest.raises(publish.PublishError, match="does not match its digest"):
            publish.fetch_index(address, "lmi", REGISTRY)
    finally:
        server.close()


def test_package_index_credentials_travel_as_a_secret_only(tmp_path, monkeypatch) -> None:
    from buildkit import build, matrix
    from buildkit import facts as facts_mod
    from buildkit.spec import resolve

    url = "https://ci:t0ps3cret@pypi.internal.example/simple"
    f = facts_mod.load(REGISTRY)
    spec = resolve(matrix.load(ROOT / "matrix.yaml", f), f)[0]
    options = build.BuildOptions(pip_index_url=url)
    args = build.host_args(spec, options, {}, None)
    assert args["PIP_INDEX_URL"] == "https://pypi.internal.example/simple"
    secret = tmp_path / "secret"
    cmd = build._command(type("C", (), {"build_command": lambda self: ["docker", "build"]})(),
                         build.PlannedImage(spec, "0" * 64, args), tmp_path, options, tmp_path / "iid", None, secret)
    assert "t0ps3cret" not in " ".join(cmd) and f"id=pip_index_url,src={secret}" in cmd
    result = lmi("bake", "--instance", "g5", env={**os.environ, "LMI_PIP_INDEX_URL": url})
    assert result.returncode == 0 and "t0ps3cret" not in result.stdout
    assert "id=pip_index_url,env=LMI_PIP_INDEX_URL" in result.stdout and "LMI_PIP_INDEX_URL" in result.stderr
    dockerfile = (ROOT / "images" / "djl0.36-g5" / "Dockerfile").read_text()
    assert dockerfile.count("--mount=type=secret,id=pip_index_url,required=false") >= 4


def test_index_latest_is_not_overwritten_when_it_moved(tmp_path, monkeypatch) -> None:
    pushed = []

    class Oci:
        def manifest(self, repo, ref):
            return ("sha256:" + "b" * 64, "application/vnd.oci.image.manifest.v1+json", b"{}")

        def push_artifact(self, *args):
            pushed.append(args)

    class Target:
        oci = Oci()

        def prepare(self, repositories):
            return []

    monkeypatch.setattr(publish, "_index_target", lambda address: Target())
    path = tmp_path / "images.json"
    index.write(path, index.empty(), REGISTRY)
    address = registry.parse("oci://r.example/ml")
    with pytest.raises(publish.IndexMoved, match="moved while merging"):
        publish.publish_index(path, [address], "lmi", {address.url: "sha256:" + "a" * 64})
    assert pushed == []
    publish.publish_index(path, [address], "lmi", {address.url: "sha256:" + "b" * 64})
    assert len(pushed) == 1


def test_base_mirrors_and_provenance_follow_the_profiles_bases() -> None:
    """A base mirror rewrites each base an image is built from, as the build argument <ROLE>_IMAGE: a build
    stage's base where the profile has one (a GPU image of a profile that compiles), and the runtime."""
    from buildkit import build, engine, matrix, provenance
    from buildkit import facts as facts_mod
    from buildkit.spec import resolve

    f = facts_mod.load(REGISTRY)
    options = build.BuildOptions(base_mirror="mirror.example/hub")
    seen = set()
    for spec in resolve(matrix.load(ROOT / "matrix.yaml", f), f):
        roles = provenance.base_roles(spec)
        assert list(roles)[-1] == "runtime" and roles["runtime"] == spec.runtime_image
        assert tuple(roles.values()) == spec.bases  # every base the content hash covers, each once
        args = build.host_args(spec, options, {}, None)
        assert {k: v for k, v in args.items() if k.endswith("_IMAGE")} == {
            f"{role.upper()}_IMAGE": engine.mirrored(ref, "mirror.example/hub") for role, ref in roles.items()}
        seen.add((spec.stack.name, tuple(roles)))
    assert ("deepspeed", ("builder", "runtime")) in seen and ("deepspeed", ("runtime",)) in seen  # GPU, CPU
    assert ("vllm", ("runtime",)) in seen
