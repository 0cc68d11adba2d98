"""OCI 1.1 referrers against Debian's docker-registry 2.8 started here on loopback: it has no referrers API,
so attaching falls back to the `sha256-<hex>` referrers tag (an image index), which the reader then uses.
No engine is needed: the image pushed here is a few bytes of manifest and blobs."""

from __future__ import annotations

import hashlib
import json

import pytest

from buildkit import registry
from buildkit.registry.errors import RegistryError

# Its prerequisite (Debian's docker-registry, which the project installs) is the project's to provide:
# under CI a skip here fails the run (tests/conftest.py).
pytestmark = pytest.mark.required_in_ci

SBOM, PROV = "application/vnd.cyclonedx+json", "application/vnd.in-toto+json"


@pytest.fixture(scope="module")
def oci(plain_registry):
    return registry.OciClient(plain_registry, credentials=None)


def small_image(client: registry.OciClient, repo: str, payload: bytes) -> str:
    """A one-layer OCI image pushed by the API; returns its manifest digest."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    for blob in (config, payload):
        client.put_blob(repo, "sha256:" + hashlib.sha256(blob).hexdigest(), blob)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": len(config),
                                      "digest": "sha256:" + hashlib.sha256(config).hexdigest()},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": len(payload),
                                       "digest": "sha256:" + hashlib.sha256(payload).hexdigest()}]}).encode()
    return client.put_manifest(repo, "v1", "application/vnd.oci.image.manifest.v1+json", manifest)


def test_attach_list_read_and_fallback_tag(oci) -> None:
    digest = small_image(oci, "staging/app", b"layer-1")
    sbom_doc, prov_doc = b'{"bomFormat": "CycloneDX"}', b'{"_type": "https://in-toto.io/Statement/v1"}'
    s = oci.push_referrer("staging/app", digest, SBOM, sbom_doc, {"io.lmi.id": "x"})
    p = oci.push_referrer("staging/app", digest, PROV, prov_doc)
    assert oci.push_referrer("staging/app", digest, SBOM, sbom_doc, {"io.lmi.id": "x"}) == s  # idempotent
    # docker-registry 2.8 has no referrers API ...
    api = oci.request("GET", f"/v2/staging/app/referrers/{digest}", ok=(200, 404))
    assert api.status == 404
    # ... so the artifacts are listed in the referrers tag, an image index, once each
    tag = registry.referrers_tag(digest)
    assert tag == "sha256-" + digest.split(":")[1]
    found = oci.manifest("staging/app", tag)
    assert found[1] == "application/vnd.oci.image.index.v1+json"
    listed = json.loads(found[2])["manifests"]
    assert [(m["digest"], m["artifactType"]) for m in listed] == [(s, SBOM), (p, PROV)]
    assert [m["digest"] for m in oci.referrers("staging/app", digest)] == [s, p]
    assert [m["digest"] for m in oci.referrers("staging/app", digest, PROV)] == [p]
    # each artifact manifest points at the image by `subject`, and its payload reads back checked
    artifact = json.loads(oci.manifest("staging/app", s)[2])
    assert artifact["subject"]["digest"] == digest and artifact["artifactType"] == SBOM
    assert oci.referrer_payload("staging/app", s) == (SBOM, sbom_doc)
    # the image itself is unchanged: its tag still names the same digest
    assert oci.manifest("staging/app", "v1")[0] == digest


def test_referrers_follow_a_copy_and_refuse_a_missing_subject(oci) -> None:
    digest = small_image(oci, "staging/copy", b"layer-2")
    s = oci.push_referrer("staging/copy", digest, SBOM, b'{"n": 1}')
    assert oci.copy_image(oci, "staging/copy", digest, "release/copy", ["v1"]) == digest
    assert oci.copy_referrers(oci, "staging/copy", digest, "release/copy") == [s]
    assert [m["digest"] for m in oci.referrers("release/copy", digest)] == [s]
    assert oci.referrer_payload("release/copy", s) == (SBOM, b'{"n": 1}')
    with pytest.raises(RegistryError, match="does not exist; push the image first"):
        oci.push_referrer("staging/copy", "sha256:" + "0" * 64, SBOM, b"{}")


def test_a_forged_referrers_tag_is_not_trusted(oci) -> None:
    """The fallback tag is plain data anyone with push access can write: an entry naming another image's
    artifact is never copied along with this one."""
    mine = small_image(oci, "staging/forged", b"layer-3")
    other = small_image(oci, "staging/forged", b"layer-4")
    theirs = oci.push_referrer("staging/forged", other, SBOM, b'{"other": true}')
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": theirs,
         "size": len(oci.manifest("staging/forged", theirs)[2]), "artifactType": SBOM}]}
    oci.put_manifest("staging/forged", registry.referrers_tag(mine), "application/vnd.oci.image.index.v1+json",
                     json.dumps(index).encode())
    assert [m["digest"] for m in oci.referrers("staging/forged", mine)] == [theirs]
    oci.copy_image(oci, "staging/forged", mine, "release/forged", ["v1"])
    with pytest.raises(RegistryError, match="names another subject"):
        oci.copy_referrers(oci, "staging/forged", mine, "release/forged")
