"""The CI workflows: actionlint over every workflow, and the publishing workflow's sequence
(ci-matrix -> build -> test -> push -> promote -> index) run with the CLI against the local engine and
registries, so its logic is proven without GitHub."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, docker, lmi, local_matrix

from buildkit import registry

ACTIONLINT = Path(sys.executable).parent / "actionlint"
WORKFLOWS = ROOT / ".github" / "workflows"


def test_actionlint_clean_on_every_workflow() -> None:
    assert sorted(p.name for p in WORKFLOWS.glob("*.yml")) == ["pr.yml", "publish.yml", "upstream.yml"]
    result = subprocess.run([str(ACTIONLINT)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_mistakes(tmp_path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("on: pull_request\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n"
                   "      - run: echo ${{ github.event.pull_request.title }}\n")
    result = subprocess.run([str(ACTIONLINT), str(bad)], capture_output=True, text=True)
    assert result.returncode == 1 and "potentially untrusted" in result.stdout


def workflow_lmi_calls(name: str) -> list[str]:
    """The lmi subcommands a workflow runs, in order."""
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    calls = []
    for job in doc["jobs"].values():
        for step in job.get("steps", []):
            calls += re.findall(r"\blmi ([a-z-]+)", step.get("run", ""))
    return calls


def test_workflow_shapes() -> None:
    publish = yaml.safe_load((WORKFLOWS / "publish.yml").read_text())
    triggers = publish[True]  # PyYAML reads the key `on` as True
    assert set(triggers) == {"push", "schedule", "workflow_dispatch"} and triggers["push"]["tags"] == ["v*"]
    image = publish["jobs"]["image"]
    assert image["strategy"]["fail-fast"] is False and image["runs-on"] == "${{ matrix.runs-on }}"
    assert image["concurrency"]["group"] == "publish-image-${{ matrix.id }}"
    assert image["permissions"]["id-token"] == "write"  # OIDC, no long-lived keys
    assert "secrets." not in (WORKFLOWS / "publish.yml").read_text()
    assert publish["jobs"]["index"]["needs"] == ["plan", "image"]
    # shared steps are composite actions, not copies
    for name in ("pr.yml", "publish.yml"):
        text = (WORKFLOWS / name).read_text()
        assert "uses: ./.github/actions/setup-lmi" in text and "make venv" not in text
    assert workflow_lmi_calls("publish.yml") == ["ci-matrix", "build", "test", "push", "gate", "promote",
                                                 "index"]
    # every trigger publishes with the same commands: no revision (or any other flag) to remember
    assert "--revision" not in (WORKFLOWS / "publish.yml").read_text()
    assert workflow_lmi_calls("pr.yml") == ["validate", "ci-matrix", "build", "test"]


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    result = lmi(*args, **kw)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


@pytest.mark.engine
@pytest.mark.e2e
def test_publish_workflow_sequence_then_nothing_new(local, plain_registry, tmp_path) -> None:  # noqa: F811
    """What publish.yml does on main, step by step, with the same commands (the smoke step on the cpu tier
    only: the serving tier's two-rank model is tests/test_smoke.py's, and a GPU runner adds the gpu tier)."""
    repo = f"lmi-ci-{uuid.uuid4().hex[:6]}"
    matrix = str(local_matrix(local["dir"], repo))
    wheels = ["--wheelhouse", str(local["wheelhouse"])]
    staging, release_a, release_b = (f"oci://{plain_registry}/{p}" for p in ("staging", "rel-a", "rel-b"))

    plan = json.loads(run("--matrix", matrix, "ci-matrix", *wheels, "--unpublished-in", staging, "--compact").stdout)
    assert [e["id"] for e in plan["include"]] == ["local-cpu"]
    entry = plan["include"][0]
    assert entry["runs-on"] == ["self-hosted", "linux", "x64", "cpu"] and entry["gpu"] is False
    image_id = entry["id"]
    fragment = tmp_path / f"index-{image_id}.json"
    run("--matrix", matrix, "build", image_id, "--plain", *wheels)
    # The cpu tier as the gate; the serving tier (a tiny model on two ranks) is tests/test_smoke.py's.
    run("--matrix", matrix, "test", image_id, "--tier", "cpu", "--gpu", "off", "--junit",
        str(tmp_path / f"smoke-{image_id}.xml"))
    run("--matrix", matrix, "push", image_id, "--registry", staging, "--index", str(fragment), "--no-index-artifact")
    # (the workflow's staging is ECR, which scans; this plain registry has no scanner)
    run("--matrix", matrix, "gate", image_id, "--registry", staging, "--index", str(fragment), "--no-scan-gate")
    run("--matrix", matrix, "promote", image_id, "--from", staging, "--to", release_a, "--to", release_b,
        "--index", str(fragment), "--no-index-artifact")
    final = tmp_path / "images.json"
    run("index", "merge", str(fragment), "--index", str(final), "--fetch", release_a, "--publish", release_a,
        "--publish", release_b, "--repository", repo)

    data = json.loads(final.read_text())
    urls = {r["url"] for r in data["images"][0]["registries"]}
    assert urls == {staging, release_a, release_b}
    digest = data["images"][0]["digest"]
    oci = registry.OciClient(plain_registry)
    for prefix in ("rel-a", "rel-b"):
        assert oci.manifest(f"{prefix}/{repo}", "cpu-latest")[0] == digest
        assert oci.manifest(f"{prefix}/{repo}", "index-latest") is not None  # the index beside the images
    assert run("uri", "--instance", "cpu", "--registry", release_b, "--index", str(final)).stdout.strip() == \
        f"{plain_registry}/rel-b/{repo}@{digest}"

    # the next run on main with no matrix change publishes nothing
    again = json.loads(run("--matrix", matrix, "ci-matrix", *wheels, "--unpublished-in", staging,
                           "--compact").stdout)
    assert again["include"] == []

    # the index job of a later run starts from what is published
    later = tmp_path / "later.json"
    run("index", "merge", "--index", str(later), "--fetch", release_b, "--repository", repo)
    assert json.loads(later.read_text())["images"][0]["digest"] == digest

    # A toolkit change (one comment line in a template) on main: the same steps, no flag, publish revision 2
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    with (templates / "Dockerfile.j2").open("a") as fh:
        fh.write("{# a toolkit edit #}\n# a toolkit edit\n")
    text = Path(matrix).read_text().replace(f"templates: {ROOT / 'templates'}", f"templates: {templates}")
    Path(matrix).write_text(text)
    plan = json.loads(run("--matrix", matrix, "ci-matrix", *wheels, "--unpublished-in", staging, "--compact").stdout)
    assert [e["id"] for e in plan["include"]] == [image_id]
    fragment2 = tmp_path / f"index2-{image_id}.json"
    run("--matrix", matrix, "build", image_id, "--plain", *wheels)
    run("--matrix", matrix, "test", image_id, "--tier", "cpu", "--gpu", "off")
    pushed = run("--matrix", matrix, "push", image_id, "--registry", staging, "--index", str(fragment2),
                 "--no-index-artifact")
    tag = json.loads(run("--matrix", matrix, "plan", "--json").stdout)[0]["tag"]
    assert f"{tag}-r2 (new content)" in pushed.stdout
    run("--matrix", matrix, "gate", image_id, "--registry", staging, "--index", str(fragment2), "--no-scan-gate")
    run("--matrix", matrix, "promote", image_id, "--from", staging, "--to", release_a, "--to", release_b,
        "--index", str(fragment2), "--no-index-artifact")
    run("index", "merge", str(fragment2), "--index", str(final), "--fetch", release_a, "--publish", release_a,
        "--publish", release_b, "--repository", repo)
    second = json.loads(fragment2.read_text())["images"][0]
    assert second["revision"] == 2 and second["tag"] == f"{tag}-r2" and second["digest"] != digest
    for prefix in ("staging", "rel-a", "rel-b"):
        assert oci.manifest(f"{prefix}/{repo}", f"{tag}-r1")[0] == digest  # revision 1 stays
        for alias in (tag, "cpu-latest"):
            assert oci.manifest(f"{prefix}/{repo}", alias)[0] == second["digest"]  # the aliases moved
    assert run("uri", "--instance", "cpu", "--index", str(final)).stdout.strip().endswith(second["digest"])
    assert run("uri", "--instance", "cpu", "--revision", "1", "--index", str(final)).stdout.strip().endswith(digest)
    # the same push re-run pushes nothing and exits 0; the next plan is empty
    again = run("--matrix", matrix, "push", image_id, "--registry", staging, "--index", str(fragment2),
                "--no-index-artifact")
    assert ": pushed" not in again.stdout and f"{tag}-r2 (published before)" in again.stdout
    assert json.loads(run("--matrix", matrix, "ci-matrix", *wheels, "--unpublished-in", staging,
                          "--compact").stdout)["include"] == []
    for tag in docker("images", repo, "--format", "{{.Tag}}").stdout.split():
        docker("rmi", "-f", f"{repo}:{tag}")


@pytest.mark.engine
@pytest.mark.e2e
def test_weekly_rebuild_on_a_new_base_digest(local, plain_registry, tmp_path) -> None:  # noqa: F811
    """The scheduled run: bases pinned to today's digest; a new base digest means a new content hash,
    a rebuild published as the next revision with the plain push, and only the aliases move."""
    repo = f"lmi-wk-{uuid.uuid4().hex[:6]}"
    mirror = f"{plain_registry}/mirror-{uuid.uuid4().hex[:4]}"
    base = "lmi-local/library/debian:12"
    mirrored = f"{mirror}/library/debian:12"
    assert docker("tag", base, mirrored).returncode == 0
    assert docker("push", mirrored).returncode == 0
    matrix = str(local_matrix(local["dir"], repo, **{"base_mirror: lmi-local": f"base_mirror: {mirror}"}))
    wheels = ["--wheelhouse", str(local["wheelhouse"])]
    staging = f"oci://{plain_registry}/wk"
    index_path = tmp_path / "images.json"

    def hash_now() -> str:
        plan = run("--matrix", matrix, "ci-matrix", *wheels, "--pin-bases", "--compact").stdout
        return json.loads(plan)["include"][0]["content_hash"]

    first = hash_now()
    run("--matrix", matrix, "build", "--plain", "--pin-bases", *wheels)
    run("--matrix", matrix, "test", "--tier", "cpu", "--gpu", "off")
    run("--matrix", matrix, "push", "--registry", staging, "--index", str(index_path))
    assert hash_now() == first  # same base digest: same hash, nothing to rebuild
    unpublished = run("--matrix", matrix, "ci-matrix", *wheels, "--pin-bases", "--unpublished-in", staging,
                      "--compact").stdout
    assert json.loads(unpublished)["include"] == []

    # a security fix lands in the base: same tag, new digest
    box = docker("create", mirrored, "true").stdout.strip()
    patched = subprocess.run(["sh", "-c", f"echo fixed > {tmp_path}/fix"], check=True)
    assert patched.returncode == 0 and docker("cp", f"{tmp_path}/fix", f"{box}:/etc/lmi-base-fix").returncode == 0
    assert docker("commit", box, mirrored).returncode == 0 and docker("push", mirrored).returncode == 0
    docker("rm", box)
    second = hash_now()
    assert second != first
    run("--matrix", matrix, "build", "--plain", "--pin-bases", *wheels)
    run("--matrix", matrix, "test", "--tier", "cpu", "--gpu", "off")
    run("--matrix", matrix, "push", "--registry", staging, "--index", str(index_path))

    oci = registry.OciClient(plain_registry)
    tag = json.loads(run("--matrix", matrix, "plan", "--json").stdout)[0]["tag"]
    old = oci.manifest(f"wk/{repo}", f"{tag}-r1")[0]
    new = oci.manifest(f"wk/{repo}", f"{tag}-r2")[0]
    assert old != new  # both immutable tags stay, each on its own image
    assert oci.manifest(f"wk/{repo}", "cpu-latest")[0] == new  # the alias moved
    data = json.loads(index_path.read_text())
    assert {e["tag"] for e in data["images"]} == {f"{tag}-r1", f"{tag}-r2"}
    assert oci.manifest(f"wk/{repo}", tag)[0] == new  # the bare tuple tag is an alias of the newest revision
    assert run("uri", "--instance", "cpu", "--index", str(index_path)).stdout.strip().endswith(new)
    for t in docker("images", repo, "--format", "{{.Tag}}").stdout.split():
        docker("rmi", "-f", f"{repo}:{t}")
