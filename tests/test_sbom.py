"""SBOM and provenance: the parsers and the CycloneDX document on their own (fast), then the real local
image (built by the engine tests' fixtures) pushed to Debian's docker-registry started here: its SBOM and
provenance are attached as referrers, read back with `lmi sbom`, gated and promoted along with it."""

from __future__ import annotations

import hashlib
import json
import secrets
import time

import pytest
from conftest import ROOT, docker, lmi, local_matrix

from buildkit import provenance, registry, sbom, smoke
from buildkit.profiles import REGISTRY

DPKG = """Package: zlib1g
Status: install ok installed
Architecture: amd64
Source: zlib
Version: 1:1.2.13.dfsg-1
Description: compression library
 a continuation line: Package: not-a-package

Package: removed-one
Status: deinstall ok config-files
Version: 1.0

Package: djl-serving
Status: install ok installed
Architecture: all
Version: 0.32.0-1
"""
LOCK = """# header
torch==2.13.0+cpu \\
    --hash=sha256:{a} \\
    --hash=sha256:{b}
Jinja2==3.1.6 \\
    --hash=sha256:{c}
""".format(a="a" * 64, b="b" * 64, c="c" * 64)


def test_parsers() -> None:
    pkgs = sbom.parse_dpkg_status(DPKG)
    assert [(p["Package"], p["Version"]) for p in pkgs] == [("zlib1g", "1:1.2.13.dfsg-1"), ("djl-serving", "0.32.0-1")]
    assert sbom.parse_lock(LOCK) == {"torch": ("2.13.0+cpu", ["a" * 64, "b" * 64]), "jinja2": ("3.1.6", ["c" * 64])}
    assert sbom.parse_os_release('ID=ubuntu\nVERSION_ID="24.04"\n') == {"ID": "ubuntu", "VERSION_ID": "24.04"}


def test_bom_from_an_inventory_validates_with_purls_and_hashes() -> None:
    inv = {"os_release": 'ID=ubuntu\nVERSION_ID="24.04"\n', "dpkg_status": DPKG + "\nPackage: openjdk-17-jre-headless\n"
           "Status: install ok installed\nArchitecture: amd64\nVersion: 17.0.13+11-2\n",
           "locks": {"torch.lock": LOCK}, "python_inventory": "importlib.metadata of /opt/venv",
           "dists": [{"name": "torch", "version": "2.13.0+cpu", "ops": []},
                     {"name": "pip", "version": "24.0", "ops": []},
                     {"name": "deepspeed", "version": "0.18.9",
                      "ops": ["deepspeed/ops/adam/fused_adam_op.cpython-312-x86_64-linux-gnu.so",
                              "deepspeed/ops/transformer_inference_op.cpython-312-x86_64-linux-gnu.so"]}],
           "claims": {"sm": "8.6"}}
    facts = {"id": "sha256:" + "e" * 64, "created": "2026-12-01T10:00:00.123456789Z",
             "labels": {"org.opencontainers.image.base.name": "nvidia/cuda:12.8.1-base-ubuntu24.04",
                        "io.lmi.cuda": "12.8.1", "org.opencontainers.image.version": "t1"}}
    digest = "sha256:" + "d" * 64
    text = sbom.build(inv, facts, "127.0.0.1:5000/lmi", digest, "sha256:" + "f" * 64, profiles=REGISTRY.values())
    again = sbom.build(inv, facts, "127.0.0.1:5000/lmi", digest, "sha256:" + "f" * 64, profiles=REGISTRY.values())
    assert text == again  # deterministic
    doc = json.loads(text)
    assert doc["specVersion"] == "1.5" and doc["metadata"]["timestamp"].startswith("2026-12-01T10:00:00")
    by = {c["name"]: c for c in doc["components"]}
    assert by["zlib1g"]["purl"] == "pkg:deb/ubuntu/zlib1g@1:1.2.13.dfsg-1?arch=amd64&distro=ubuntu-24.04"
    assert "removed-one" not in by
    assert [h["content"] for h in by["torch"]["hashes"]] == ["a" * 64, "b" * 64]
    assert "hashes" not in by["pip"] and {"name": "lmi:lock", "value": "none (installed by the venv or not locked)"} \
        in by["pip"]["properties"]
    props = {p["name"]: p["value"] for p in by["deepspeed"]["properties"]}
    assert props["lmi:deepspeed:ops-prebuilt"] == "fused_adam,transformer_inference"
    assert props["lmi:deepspeed:sm"] == "8.6"
    roles = {c["name"]: p["value"] for c in doc["components"] for p in c.get("properties", [])
             if p["name"] == "lmi:role"}
    assert roles == {"djl-serving": "djl-serving", "openjdk-17-jre-headless": "java", "nvidia/cuda": "base-image",
                     "deepspeed": "deepspeed"}
    assert by["nvidia/cuda"]["purl"] == "pkg:docker/nvidia/cuda@sha256:" + "f" * 64 + "?tag=12.8.1-base-ubuntu24.04"
    broken = json.loads(text)
    broken["components"][0]["type"] = "not-a-type"
    with pytest.raises(sbom.SbomError, match="does not validate against CycloneDX 1.5"):
        sbom.validate(json.dumps(broken))


def test_provenance_keeps_secrets_out() -> None:
    history = ["RUN |3 PIP_INDEX_URL=https://user:s3cret@pypi.example/simple HF_TOKEN=hf_abc DJL_SERVING_SHA256=ab "
               "/bin/bash -o pipefail -c pip install x", "COPY file /x", "RUN /bin/sh -c true"]
    args = provenance.build_args_from_history(history)
    assert args == {"DJL_SERVING_SHA256": "ab", "PIP_INDEX_URL": "https://***@pypi.example/simple"}
    assert provenance.safe_args({"AWS_SECRET_ACCESS_KEY": "x", "GITHUB_TOKEN": "y", "API_KEY": "z", "MAX_JOBS": "2"}) \
        == {"MAX_JOBS": "2"}


# --- the real local image ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(local_image):
    """The local image as `lmi build` made it: the session's shared one (tests/conftest.py)."""
    matrix, plan = local_image["matrix"], local_image["plan"]
    image_id = docker("inspect", local_image["ref"], "--format", "{{.Id}}").stdout.strip()
    return {"repo": local_image["repo"], "matrix": matrix, "ref": local_image["ref"], "image_id": image_id,
            "id": plan["id"], "content_hash": plan["content_hash"], "context": matrix.parent / "images" / plan["id"]}


def spec_of(matrix):
    from buildkit import facts as facts_mod
    from buildkit import matrix as matrix_mod
    from buildkit.spec import resolve

    f = facts_mod.load(REGISTRY)
    return resolve(matrix_mod.load(matrix, f), f)[0]


@pytest.mark.engine
def test_sbom_and_provenance_of_the_local_image(built, tmp_path) -> None:
    """What `lmi push` attaches, made from the real local image: valid CycloneDX 1.5 with its dpkg packages
    (distro-qualified purls) and every locked Python distribution with its lock's sha256; provenance naming
    the lock digests, the content hash, the verified runtime base and the build args."""
    from buildkit import attest, engine

    out = tmp_path / "sbom.json"
    got = lmi("--matrix", str(built["matrix"]), "sbom", built["id"], "--local", "-o", str(out))
    assert got.returncode == 0, got.stderr
    text = out.read_text()
    sbom.validate(text)
    doc = json.loads(text)
    comps = doc["components"]
    debs = [c for c in comps if c["purl"].startswith("pkg:deb/debian/")]
    assert len(debs) > 50 and all("distro=debian-12" in c["purl"] for c in debs)
    pypi = {sbom.canonical(c["name"]): c for c in comps if c["purl"].startswith("pkg:pypi/")}
    locks = {p.name: p.read_text() for p in built["context"].glob("*.lock")}
    locked = {k: v for text in locks.values() for k, v in sbom.parse_lock(text).items()}
    assert locked and set(locked) <= set(pypi)
    for name, (version, hashes) in locked.items():
        assert pypi[name]["version"] == version and [h["content"] for h in pypi[name]["hashes"]] == hashes, name
    roles = {p["value"] for c in comps for p in c.get("properties", []) if p["name"] == "lmi:role"}
    assert {"djl-serving", "java", "deepspeed", "base-image"} <= roles

    digest = "sha256:" + "0" * 64  # the digest it would be pushed as
    bom, statement = attest.documents(engine.detect_client().path, built["ref"], spec_of(built["matrix"]),
                                      "127.0.0.1:5000/x", digest, built["matrix"])
    assert json.loads(bom)["components"] == comps  # the same inventory
    prov = json.loads(statement)
    assert prov["_type"] == "https://in-toto.io/Statement/v1"
    assert prov["predicateType"] == "https://slsa.dev/provenance/v1"
    assert prov["subject"] == [{"name": "127.0.0.1:5000/x", "digest": {"sha256": "0" * 64}}]
    build_def = prov["predicate"]["buildDefinition"]
    assert build_def["internalParameters"] == {"contentHash": built["content_hash"], "imageId": built["image_id"]}
    assert build_def["externalParameters"]["matrix"]["image"] == built["id"]
    deps = {d.get("name"): d for d in build_def["resolvedDependencies"]}
    for name, text in locks.items():
        assert deps[name]["digest"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert "DJL_SERVING_URL" in build_def["externalParameters"]["buildArgs"]
    runtime = next(d for d in build_def["resolvedDependencies"] if d.get("annotations", {}).get("role") ==
                   "runtime base")
    assert runtime["annotations"]["verified"] and len(runtime["digest"]["sha256"]) == 64
    assert prov["predicate"]["runDetails"]["builder"]["version"]["lmi-buildkit"]


@pytest.fixture
def small(local, tmp_path):
    """A few-KB image under the local matrix's tag in a repository of its own, labelled like an `lmi build`
    image, with a passing smoke record: pushing and promoting need no 2 GB image (the SBOM of the real
    one is tested above). It has no venv: its SBOM says its Python inventory was not taken."""
    repo = f"lmi-ref-{secrets.token_hex(4)}"
    matrix = local_matrix(tmp_path, repo)
    spec = spec_of(matrix)
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "payload").write_text(repo)
    content_hash = hashlib.sha256(repo.encode()).hexdigest()
    (tmp_path / "ctx" / "Dockerfile").write_text(f"FROM scratch\nCOPY payload /payload\n"
                                                 f"LABEL io.lmi.content-hash={content_hash}\n")
    ref = f"{repo}:{spec.tag}"
    assert docker("build", "-q", "-t", ref, str(tmp_path / "ctx")).returncode == 0
    image_id = docker("inspect", ref, "--format", "{{.Id}}").stdout.strip()
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    smoke.Record(schema=smoke.RECORD_SCHEMA, image=ref, image_id=image_id, content_hash=content_hash,
                 spec_id=spec.id, tiers=["cpu"], passed=True, outcomes=[], started=now,
                 finished=now).save(ROOT / smoke.RECORD_DIR)
    yield {"repo": repo, "matrix": matrix, "id": spec.id}
    for tag in docker("images", repo, "--format", "{{.Tag}}").stdout.split():
        docker("rmi", "-f", f"{repo}:{tag}")


@pytest.mark.engine
def test_push_attaches_referrers_that_follow_a_promotion(small, plain_registry, tmp_path) -> None:
    host, repo, idx = plain_registry, small["repo"], tmp_path / "images.json"
    m = ["--matrix", str(small["matrix"])]
    pushed = lmi(*m, "push", "--registry", f"oci://{host}/staging", "--index", str(idx))
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    entry = json.loads(idx.read_text())["images"][0]
    digest = entry["digest"]
    oci = registry.OciClient(host, credentials=None)
    # no referrers API on docker-registry 2.8: both are listed in the sha256-<hex> referrers tag
    listed = {m["artifactType"]: m["digest"] for m in oci.referrers(f"staging/{repo}", digest)}
    assert listed == {sbom.MEDIA_TYPE: entry["sbom"], provenance.MEDIA_TYPE: entry["provenance"]}
    assert oci.manifest(f"staging/{repo}", registry.referrers_tag(digest)) is not None
    assert oci.manifest(f"staging/{repo}", entry["tag"])[0] == digest  # the image's digest is unchanged
    again = lmi(*m, "push", "--registry", f"oci://{host}/staging", "--index", str(idx))
    assert again.returncode == 0, again.stderr
    assert len(oci.referrers(f"staging/{repo}", digest)) == 2  # the same documents, not new ones

    got = lmi(*m, "sbom", small["id"], "--registry", f"oci://{host}/staging", "--index", str(idx))
    assert got.returncode == 0, got.stderr
    sbom.validate(got.stdout)
    root = json.loads(got.stdout)["metadata"]["component"]
    assert root["purl"].startswith(f"pkg:oci/{repo}@{digest}?repository_url={host}/staging/{repo}")
    assert {"name": "lmi:python-inventory", "value": "not taken: /opt/venv/pyvenv.cfg is absent (not an lmi image)"} \
        in root["properties"]
    prov = json.loads(lmi(*m, "sbom", small["id"], "--provenance", "--registry", f"oci://{host}/staging",
                          "--index", str(idx)).stdout)
    assert prov["subject"][0]["digest"]["sha256"] == digest.split(":")[1]

    # promotion: refused without a verdict (saying why), then allowed after an explicit --no-scan-gate
    promote = [*m, "promote", "--from", f"oci://{host}/staging", "--to", f"oci://{host}/release", "--index", str(idx)]
    refused = lmi(*promote)
    assert refused.returncode == 1 and "has no gate verdict" in refused.stderr, refused.stdout + refused.stderr
    gated = lmi(*m, "gate", "--registry", f"oci://{host}/staging", "--index", str(idx), "--no-scan-gate")
    assert gated.returncode == 0 and "NOT SCANNED" in gated.stdout, gated.stderr
    done = lmi(*promote)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {m["artifactType"]: m["digest"] for m in oci.referrers(f"release/{repo}", digest)} == listed
    uri = json.loads(lmi("uri", "--instance", "cpu", "--registry", f"oci://{host}/release", "--index", str(idx),
                         "--json").stdout)
    assert (uri["sbom"], uri["provenance"]) == (entry["sbom"], entry["provenance"])
    assert uri["gate"]["scanner"] == "none" and uri["gate"]["waived"] == "--no-scan-gate"
