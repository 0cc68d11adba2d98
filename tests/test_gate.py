"""The release gate, against moto's ECR server (findings injected through its moto-api endpoint) and
botocore's Stubber (status sequences and paging, which moto ignores). No engine, no network."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, free_port, lmi

from buildkit import facts as facts_mod
from buildkit import gate, index, registry
from buildkit import matrix as matrix_mod
from buildkit.errors import UserError
from buildkit.profiles import REGISTRY
from buildkit.spec import resolve

MATRIX = ROOT / "tests" / "matrix.local.yaml"
ACCOUNT, REGION = "123456789012", "us-west-2"


@pytest.fixture(scope="module")
def spec():
    f = facts_mod.load(REGISTRY)
    return resolve(matrix_mod.load(MATRIX, f), f)[0]


def enhanced(cve: str, severity: str = "HIGH", fix: str = "YES", status: str = "ACTIVE", package: str = "openssl"):
    return {"packageVulnerabilityDetails": {"vulnerabilityId": cve, "vulnerablePackages": [{"name": package,
                                                                                            "version": "1.0"}]},
            "severity": severity, "fixAvailable": fix, "status": status, "title": f"{cve} - {package}",
            "findingArn": f"arn:aws:inspector2:{REGION}:{ACCOUNT}:finding/{cve}"}


def page(status: str = "COMPLETE", findings=(), basic=(), token: str | None = None) -> dict:
    out = {"registryId": ACCOUNT, "repositoryName": "ml/lmi-local", "imageId": {"imageDigest": "sha256:" + "a" * 64},
           "imageScanStatus": {"status": status, "description": f"status {status}"},
           "imageScanFindings": {"enhancedFindings": list(findings), "findings": list(basic)}}
    if token:
        out["nextToken"] = token
    return out


def allowlist(tmp_path: Path, entries: str) -> Path:
    path = tmp_path / "scan-allowlist.yaml"
    path.write_text("allow:\n" + entries if entries.strip() else "allow: []\n")
    return path


# --- the decision ------------------------------------------------------------------------------------------


def test_floor_fix_and_status_decide(spec, tmp_path) -> None:
    scan = gate.Scan("COMPLETE", findings=gate._findings({"enhancedFindings": [
        enhanced("CVE-1", "CRITICAL"), enhanced("CVE-2", "HIGH", fix="NO"), enhanced("CVE-3", "MEDIUM"),
        enhanced("CVE-4", "HIGH", status="SUPPRESSED"), enhanced("CVE-5", "HIGH", fix="PARTIAL"),
        enhanced("CVE-6", "UNTRIAGED")]}))
    verdict = gate.decide(scan, spec, [], [], "HIGH", "ecr")
    assert not verdict["passed"]
    assert verdict["blocking"] == ["CVE-1 (openssl, CRITICAL)", "CVE-5 (openssl, HIGH)", "CVE-6 (openssl, UNTRIAGED)"]
    assert verdict["counts"] == {"CRITICAL": 1, "HIGH": 2, "MEDIUM": 1, "UNTRIAGED": 1}  # SUPPRESSED not counted
    assert gate.decide(scan, spec, [], [], "CRITICAL", "ecr")["blocking"] == [
        "CVE-1 (openssl, CRITICAL)", "CVE-6 (openssl, UNTRIAGED)"]
    # basic scanning says nothing of fixes: its findings count as fixable (fail closed)
    basic = gate.Scan("COMPLETE", findings=gate._findings({"findings": [
        {"name": "CVE-7", "severity": "HIGH", "attributes": [{"key": "package_name", "value": "zlib"}]}]}))
    assert gate.decide(basic, spec, [], [], "HIGH", "ecr")["blocking"] == ["CVE-7 (zlib, HIGH)"]


def test_allowlist_scopes_expiry_and_bad_entries(spec, tmp_path) -> None:
    future = (dt.date.today() + dt.timedelta(days=30)).isoformat()
    path = allowlist(tmp_path, f"""
  - {{id: CVE-1, scope: global, reason: not reachable, expires: {future}, owner: ml-platform}}
  - {{id: CVE-5, package: openssl, scope: line, line: {spec.line}, reason: r, expires: {future}, owner: o}}
  - {{id: CVE-5, package: zlib, scope: image, image: {spec.id}, reason: r, expires: {future}, owner: o}}
  - {{id: CVE-9, scope: image, image: other-image, reason: r, expires: {future}, owner: o}}
  - {{id: CVE-OLD, scope: global, reason: r, expires: 2020-01-01, owner: o}}
""")
    allow, expired = gate.load_allowlist(path)
    assert [a.id for a in allow] == ["CVE-1", "CVE-5", "CVE-5", "CVE-9"] and [a.id for a in expired] == ["CVE-OLD"]
    scan = gate.Scan("COMPLETE", findings=gate._findings({"enhancedFindings": [
        enhanced("CVE-1", "CRITICAL"), enhanced("CVE-5", "HIGH"), enhanced("CVE-9", "HIGH")]}))
    verdict = gate.decide(scan, spec, allow, [], "HIGH", "ecr")
    assert verdict["allowlisted"] == ["CVE-1 (openssl, CRITICAL)", "CVE-5 (openssl, HIGH)"]
    assert verdict["blocking"] == ["CVE-9 (openssl, HIGH)"]  # its entry is for another image
    assert {a.id + (a.package or "") for a in set(allow) - gate.used(allow, [(spec, scan)], "HIGH")} == \
        {"CVE-5zlib", "CVE-9"}  # unused entries
    # an expired entry fails the gate by itself, naming its id
    clean = gate.Scan("COMPLETE")
    failed = gate.decide(clean, spec, allow, expired, "HIGH", "ecr")
    assert not failed["passed"] and failed["expired_allowlist"] == ["CVE-OLD"]
    assert "CVE-OLD" in gate.refusal({"digest": "sha256:" + "a" * 64, "gate": failed}, spec.id)

    for bad, says in ((f"  - {{id: CVE-1, scope: global, reason: '', expires: {future}, owner: o}}\n", "empty reason"),
                      (f"  - {{id: CVE-1, scope: team, reason: r, expires: {future}, owner: o}}\n", "scope 'team'"),
                      (f"  - {{id: CVE-1, scope: line, reason: r, expires: {future}, owner: o}}\n", "needs `line:`"),
                      ("  - {id: CVE-1, scope: global, reason: r, expires: soon, owner: o}\n", "must be a date"),
                      (f"  - {{id: CVE-1, scope: global, reason: r, expires: {future}, owner: o, x: 1}}\n",
                       "unknown key(s) x")):
        with pytest.raises(UserError) as err:
            gate.load_allowlist(allowlist(tmp_path, bad))
        assert f"{tmp_path / 'scan-allowlist.yaml'}:2: allowlist entry CVE-1: " in str(err.value) and says in \
            str(err.value), str(err.value)


def test_refusal_says_why() -> None:
    digest = "sha256:" + "b" * 64
    assert "not in the release index" in gate.refusal(None, "x")
    assert "no gate verdict" in gate.refusal({"digest": digest}, "x")
    assert "CVE-1 (openssl, HIGH)" in gate.refusal({"digest": digest, "gate": {
        "passed": False, "blocking": ["CVE-1 (openssl, HIGH)"], "checked": "now"}}, "x")
    assert gate.refusal({"digest": digest, "gate": gate.waived("oci://h", "--no-scan-gate")}, "x") is None


# --- polling and paging, with botocore's Stubber ---------------------------------------------------------------


def stubbed():
    import boto3
    from botocore.stub import Stubber

    client = boto3.client("ecr", region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing")
    return client, Stubber(client)


def args(token: str | None = None) -> dict:
    out = {"registryId": ACCOUNT, "repositoryName": "ml/lmi-local", "imageId": {"imageDigest": "sha256:" + "a" * 64}}
    if token:
        out["nextToken"] = token
    return out


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def poll(client, timeout_s: float = 60, clock: Clock | None = None) -> gate.Scan:
    clock = clock or Clock()
    return gate.poll(client, ACCOUNT, "ml/lmi-local", "sha256:" + "a" * 64, timeout_s=timeout_s, interval_s=10,
                     clock=clock, sleep=clock.sleep)


def test_poll_waits_then_reads_every_page() -> None:
    client, stub = stubbed()
    stub.add_client_error("describe_image_scan_findings", "ScanNotFoundException", "no scan yet",
                          expected_params=args())
    stub.add_response("describe_image_scan_findings", page("PENDING"), args())
    stub.add_response("describe_image_scan_findings", page("IN_PROGRESS"), args())
    stub.add_response("describe_image_scan_findings", page("ACTIVE", [enhanced("CVE-1")], token="t2"), args())
    stub.add_response("describe_image_scan_findings", page("ACTIVE", [enhanced("CVE-2")], token="t3"), args("t2"))
    stub.add_response("describe_image_scan_findings", page("ACTIVE", [enhanced("CVE-3", "LOW")]), args("t3"))
    clock = Clock()
    with stub:
        scan = poll(client, clock=clock)
    stub.assert_no_pending_responses()
    assert scan.status == "ACTIVE" and scan.pages == 3 and clock.now == 30
    assert [f.id for f in scan.findings] == ["CVE-1", "CVE-2", "CVE-3"]


@pytest.mark.parametrize("status", ["FAILED", "UNSUPPORTED_IMAGE", "FINDINGS_UNAVAILABLE", "SOMETHING_NEW"])
def test_poll_fails_closed_on_failure_statuses(status) -> None:
    client, stub = stubbed()
    stub.add_response("describe_image_scan_findings", page("PENDING"), args())
    stub.add_response("describe_image_scan_findings", page(status), args())
    with stub, pytest.raises(gate.GateFailed, match=f"scan status {status} .*fails closed"):
        poll(client)


def test_poll_fails_closed_on_timeout_and_refusals() -> None:
    client, stub = stubbed()
    for _ in range(4):
        stub.add_response("describe_image_scan_findings", page("IN_PROGRESS"), args())
    with stub, pytest.raises(gate.GateFailed, match="still IN_PROGRESS after 30s; the gate fails closed"):
        poll(client, timeout_s=30)
    client, stub = stubbed()
    stub.add_client_error("describe_image_scan_findings", "AccessDeniedException", "no", expected_params=args())
    with stub, pytest.raises(gate.GateFailed, match="AccessDeniedException"):
        poll(client)


# --- end to end: `lmi gate` and the index, against moto's ECR server ---------------------------------------------


@pytest.fixture(scope="module")
def moto():
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    env = {**os.environ, "AWS_ENDPOINT_URL_ECR": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}
    yield {"port": port, "env": env}
    proc.terminate()


def moto_image(moto, spec, layer: str) -> str:
    """An image in moto's ECR (with imageDigest=: moto computes a wrong digest otherwise), scanned once."""
    import boto3

    client = boto3.client("ecr", region_name=REGION, endpoint_url=moto["env"]["AWS_ENDPOINT_URL_ECR"],
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    repo = f"ml/{spec.repository}"
    with contextlib.suppress(client.exceptions.RepositoryAlreadyExistsException):
        client.create_repository(repositoryName=repo)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2,
                                      "digest": "sha256:" + hashlib.sha256(layer.encode()).hexdigest()},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 1,
                                       "digest": "sha256:" + hashlib.sha256(layer.encode() + b"l").hexdigest()}]})
    digest = "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()
    client.put_image(repositoryName=repo, imageManifest=manifest, imageDigest=digest, imageTag=layer,
                     imageManifestMediaType="application/vnd.oci.image.manifest.v1+json")
    client.start_image_scan(repositoryName=repo, imageId={"imageDigest": digest})
    return digest


def inject(moto, spec, digest: str, *responses: dict) -> None:
    results = [{**r, "registryId": ACCOUNT, "repositoryName": f"ml/{spec.repository}",
                "imageId": {"imageDigest": digest}} for r in responses]
    req = urllib.request.Request(f"http://127.0.0.1:{moto['port']}/moto-api/static/ecr/scan-finding-results",
                                 data=json.dumps({"results": results, "region": REGION}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()


def index_with(path: Path, spec, digest: str, url: str) -> None:
    address = registry.parse(url)
    entry = {"id": spec.id, "family": spec.family.name, "repository": spec.repository, "tag": spec.tag,
             "tags": [spec.tag], "digest": digest, "built": "2026-12-01T00:00:00Z",
             "engine": spec.stack.name,
             "components": {**spec.versions, "torch": spec.torch, "cuda": None, "python": spec.python,
                            "os": spec.os.name},
             "smoke": {"passed": True}, "registries": [{"url": url, "kind": address.kind, "region": address.region,
                                                         "uri": address.ref(spec.repository, digest=digest)}]}
    path.write_text(json.dumps({"schema": index.SCHEMA, "generated": None, "images": [entry]}))


def run_gate(moto, idx: Path, allow: Path, url: str = f"ecr://{ACCOUNT}/{REGION}/ml", *extra: str):
    return lmi("--matrix", str(MATRIX), "gate", "--registry", url, "--index", str(idx), "--allowlist", str(allow),
               *extra, env=moto["env"])


def test_lmi_gate_pass_fail_and_fail_closed_on_moto(moto, spec, tmp_path) -> None:
    future = (dt.date.today() + dt.timedelta(days=30)).isoformat()
    allow = allowlist(tmp_path, f"  - {{id: CVE-2, scope: image, image: {spec.id}, reason: not in the serving path, "
                                f"expires: {future}, owner: ml-platform}}\n"
                                f"  - {{id: CVE-UNUSED, scope: global, reason: r, expires: {future}, owner: o}}\n")
    idx = tmp_path / "images.json"

    digest = moto_image(moto, spec, "pass")  # findings, but none blocking once CVE-2 is allowlisted
    inject(moto, spec, digest, page("ACTIVE", [enhanced("CVE-2", "CRITICAL"), enhanced("CVE-3", "MEDIUM"),
                                               enhanced("CVE-4", "HIGH", fix="NO")]))
    index_with(idx, spec, digest, f"ecr://{ACCOUNT}/{REGION}/ml")
    ok = run_gate(moto, idx, allow)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "allowlisted: CVE-2 (openssl, CRITICAL)" in ok.stdout
    assert "allowlist entry CVE-UNUSED matched no blocking finding of this run (unused)" in ok.stdout
    verdict = json.loads(idx.read_text())["images"][0]["gate"]
    assert verdict["passed"] and verdict["scan_status"] == "ACTIVE" and verdict["allowlisted"] == [
        "CVE-2 (openssl, CRITICAL)"] and verdict["counts"] == {"CRITICAL": 1, "HIGH": 1, "MEDIUM": 1}
    uri = json.loads(lmi("uri", "--instance", "cpu", "--index", str(idx), "--json").stdout)
    assert uri["gate"]["passed"] and "sbom" in uri and "provenance" in uri

    digest = moto_image(moto, spec, "fail")
    inject(moto, spec, digest, page("COMPLETE", [enhanced("CVE-9", "HIGH", fix="PARTIAL", package="zlib")]))
    index_with(idx, spec, digest, f"ecr://{ACCOUNT}/{REGION}/ml")
    bad = run_gate(moto, idx, allow)
    assert bad.returncode == 1 and "blocking: CVE-9 (zlib, HIGH)" in bad.stdout, bad.stdout + bad.stderr
    assert json.loads(idx.read_text())["images"][0]["gate"]["blocking"] == ["CVE-9 (zlib, HIGH)"]

    digest = moto_image(moto, spec, "broken")
    inject(moto, spec, digest, page("FAILED"))
    index_with(idx, spec, digest, f"ecr://{ACCOUNT}/{REGION}/ml")
    closed = run_gate(moto, idx, allow)
    assert closed.returncode == 1 and "FAILED CLOSED" in closed.stdout and "scan status FAILED" in closed.stdout
    verdict = json.loads(idx.read_text())["images"][0]["gate"]
    assert not verdict["passed"] and "fails closed" in verdict["error"]

    expired = allowlist(tmp_path, "  - {id: CVE-OLD, scope: global, reason: r, expires: 2021-06-30, owner: sec}\n")
    digest = moto_image(moto, spec, "expired")
    inject(moto, spec, digest, page("COMPLETE"))
    index_with(idx, spec, digest, f"ecr://{ACCOUNT}/{REGION}/ml")
    late = run_gate(moto, idx, expired)
    assert late.returncode == 1 and "allowlist entry CVE-OLD expired on 2021-06-30" in late.stdout, late.stdout


def test_plain_oci_registry_needs_an_explicit_choice(moto, spec, tmp_path) -> None:
    idx = tmp_path / "images.json"
    url = "oci://127.0.0.1:5999/staging"
    index_with(idx, spec, "sha256:" + "c" * 64, url)
    allow = allowlist(tmp_path, "")
    refused = run_gate(moto, idx, allow, url)
    assert refused.returncode == 1 and "has no vulnerability scanner" in refused.stderr
    assert "gate" not in json.loads(idx.read_text())["images"][0]
    waived = run_gate(moto, idx, allow, url, "--no-scan-gate")
    assert waived.returncode == 0 and "NOT SCANNED" in waived.stdout, waived.stderr
    verdict = json.loads(idx.read_text())["images"][0]["gate"]
    assert verdict["scanner"] == "none" and verdict["waived"] == "--no-scan-gate"
    assert "no vulnerability database was consulted" in verdict["note"]
    assert not any(k in verdict for k in ("counts", "blocking", "findings"))  # nothing claimed about findings
