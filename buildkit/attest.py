"""SBOM and provenance for a pushed image, attached to its manifest digest as OCI 1.1 referrers (or listed
in the `sha256-<hex>` referrers tag where a registry has no referrers API), copied along on promotion,
and read back for `lmi sbom`. The image's own digest never changes: the artifacts point at it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from . import provenance, sbom
from .errors import UserError
from .registry import OciClient, RegistryError

KINDS = {"sbom": sbom.MEDIA_TYPE, "provenance": provenance.MEDIA_TYPE}


def _versions(docker: str) -> dict[str, str]:
    result = subprocess.run([docker, "version", "--format", "{{.Client.Version}} {{.Server.Version}}"],
                            capture_output=True, text=True, timeout=60)
    client, _, server = result.stdout.strip().partition(" ")
    return {k: v for k, v in (("docker-client", client), ("docker-engine", server)) if v}


def documents(docker: str, image: str, spec, subject_name: str, digest: str | None,
              matrix_path: Path | None = None) -> tuple[bytes, bytes | None]:
    """(SBOM, provenance) of the local `image`, pushed as subject_name@digest. Without a digest (an image
    not pushed yet) there is an SBOM only: provenance needs its subject."""
    inv = sbom.inventory(docker, image, (spec.profile,))
    facts = sbom.image_facts(docker, image)
    bases = provenance.bases(docker, image, spec)
    bom = sbom.build(inv, facts, subject_name, digest, bases.get(spec.runtime_image, {}).get("digest"),
                     profiles=(spec.profile,))
    if digest is None:
        return bom.encode(), None
    statement = provenance.statement(
        subject_name, digest, spec, facts, inv.get("locks") or {},
        provenance.build_args_from_history(provenance.history(docker, image)), bases,
        provenance.git_source(matrix_path.parent if matrix_path else Path.cwd()), _versions(docker),
        str(matrix_path) if matrix_path else None)
    return bom.encode(), provenance.dumps(statement)


def attach(oci: OciClient, repo: str, subject_name: str, digest: str, docker: str, image: str, spec,
           matrix_path: Path | None = None) -> dict[str, str]:
    """Make the SBOM and provenance of the local `image` (pushed as repo@digest) and attach both.
    Returns {"sbom": artifact digest, "provenance": artifact digest} for the release index."""
    bom, statement = documents(docker, image, spec, subject_name, digest, matrix_path)
    notes = {"io.lmi.id": spec.id}
    return {"sbom": oci.push_referrer(repo, digest, sbom.MEDIA_TYPE, bom, notes),
            "provenance": oci.push_referrer(repo, digest, provenance.MEDIA_TYPE, statement, notes)}


def read(oci: OciClient, repo: str, digest: str, kind: str, recorded: str | None = None) -> bytes:
    """The payload of the image's `kind` artifact: the one the index recorded, else the one attached."""
    media_type = KINDS[kind]
    if recorded is None:
        found = oci.referrers(repo, digest, media_type)
        if not found:
            raise UserError(f"{oci.host}/{repo}@{digest} has no {kind} attached; publish it with `lmi push` "
                            "(which attaches one) or check --registry")
        recorded = found[-1]["digest"]
    try:
        artifact_type, payload = oci.referrer_payload(repo, recorded, subject=digest)
    except RegistryError as exc:
        raise UserError(f"cannot read the {kind} {recorded}: {exc}") from None
    if artifact_type != media_type:
        raise UserError(f"{oci.host}/{repo}@{recorded} is a {artifact_type or 'plain manifest'}, not a {kind}")
    json.loads(payload)  # a damaged document is an error here, not in the reader's tool
    return payload
