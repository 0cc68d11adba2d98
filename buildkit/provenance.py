"""Provenance of a published image: an in-toto Statement v1 whose predicate has the shape of SLSA
provenance v1 (https://slsa.dev/spec/v1.0/provenance). It names what the image was built from and by:

- subject: the pushed manifest digest (what is pulled and scanned);
- externalParameters: the matrix entry (file, image id, line, family) and the build arguments the image's
  own history records (`RUN |N KEY=VALUE ...`), secrets never: a key that names a secret is dropped and
  credentials in a URL are masked;
- internalParameters: the content hash (io.lmi.content-hash) and the image ID;
- resolvedDependencies: the git commit of the checkout, the base images by digest (as the engine knows
  them), and every lock file installed from, with its sha256 as found in the image;
- runDetails: the toolkit's version, the docker client and engine versions, the build time.

BuildKit's own provenance attestation is not used: it wraps the image in an index, which changes the
digest users pin and clashes with ECR scanning of the child manifest (moby/buildkit#3499).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

from . import __version__
from .registry import redact

MEDIA_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:lmi-buildkit:docker-build:v1"  # described in docs/supply-chain.md
BUILDER_ID = "urn:lmi-buildkit:builder"

SECRET_KEY = re.compile(r"TOKEN|PASSW|SECRET|CREDENTIAL|AUTH|_KEY$|^KEY$|PRIVATE", re.I)


def build_args_from_history(created_by: list[str]) -> dict[str, str]:
    """The build arguments BuildKit records in the image history (`RUN |2 A=x B=y /bin/sh -c ...`), with
    secrets left out: the same rule as `safe_args`."""
    args: dict[str, str] = {}
    for line in created_by:
        m = re.match(r"\s*RUN \|(\d+) (.*)", line, re.S)
        if not m:
            continue
        for pair in m.group(2).split(" ")[: int(m.group(1))]:
            key, sep, value = pair.partition("=")
            if sep:
                args[key] = value
    return safe_args(args)


def safe_args(args: dict[str, str]) -> dict[str, str]:
    """Build arguments fit to publish: keys that name a secret are dropped, URL credentials masked."""
    return {k: redact(v) for k, v in sorted(args.items()) if not SECRET_KEY.search(k)}


def history(docker: str, image: str) -> list[str]:
    result = subprocess.run([docker, "history", "--no-trunc", "--format", "{{.CreatedBy}}", image],
                            capture_output=True, text=True, timeout=60)
    return result.stdout.splitlines() if result.returncode == 0 else []


def _inspect(docker: str, ref: str) -> dict | None:
    result = subprocess.run([docker, "image", "inspect", ref], capture_output=True, text=True, timeout=60)
    return json.loads(result.stdout)[0] if result.returncode == 0 else None


def base_roles(spec) -> dict[str, str]:
    """The base images of a spec by role: the profile's build stages' bases (its BASES before the runtime, e.g.
    a builder; a CPU image may have none of them), then the runtime. Each is the build argument <ROLE>_IMAGE."""
    return {**dict(zip(spec.profile.BASES[:-1], spec.stack.bases, strict=False)), "runtime": spec.runtime_image}


def bases(docker: str, image: str, spec) -> dict[str, dict]:
    """The base images of `spec`'s `image` by digest, as the Docker engine has them: for each base name,
    the local image of that name (or one pulled through a mirror: `<mirror>/<name>`, `<mirror>/library/<name>`)
    and its registry digest (RepoDigests), else its image ID (a base made locally has no registry digest). The
    runtime base is verified: its layers must be the first layers of `image`. A build stage's base (a
    builder's) has no layers in the image, so it is named as found, marked unverified. A base the engine no
    longer has is listed without digest."""
    layers = ((_inspect(docker, image) or {}).get("RootFS") or {}).get("Layers") or []
    listed = subprocess.run([docker, "images", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True,
                            text=True, timeout=60).stdout.split()
    out = {}
    roles = base_roles(spec)
    for role, name in (("runtime", roles.pop("runtime")), *roles.items()):
        if not name:
            continue
        out[name] = {"role": role}
        bare = name.split("@")[0]
        for ref in [name] + [r for r in listed if r.endswith("/" + bare) or r.endswith("/library/" + bare)]:
            doc = _inspect(docker, ref)
            base_layers = ((doc or {}).get("RootFS") or {}).get("Layers") or []
            if doc is None or (role == "runtime" and layers[:len(base_layers)] != base_layers):
                continue
            repo_digest = next((d.split("@", 1)[1] for d in doc.get("RepoDigests") or []), None)
            out[name] = {"role": role, "ref": ref, "digest": repo_digest or doc["Id"],
                         "kind": "registry digest" if repo_digest else "local image ID",
                         "verified": role == "runtime"}
            break
    return out


def git_source(where: Path) -> dict | None:
    """The commit of the checkout the matrix lives in, and whether it had uncommitted changes."""
    def git(*args: str) -> str | None:
        r = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    remote = git("config", "--get", "remote.origin.url")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"uri": f"git+{redact(remote)}" if remote else f"git+file://{where.resolve()}",
            "digest": {"gitCommit": commit}, "annotations": {"dirty": dirty}}


def statement(subject_name: str, digest: str, spec, facts: dict, locks: dict[str, str | None],
              build_args: dict[str, str], bases: dict[str, dict], source: dict | None,
              builder: dict[str, str], matrix_path: str | None = None) -> dict:
    """The in-toto statement (a dict; json.dumps(sort_keys=True) it)."""
    labels = facts.get("labels") or {}
    deps = [source] if source else []
    for name, base in sorted(bases.items()):
        dep = {"uri": f"pkg:docker/{name}",
               "annotations": {k: v for k, v in base.items() if k != "digest"} | {"role": f"{base['role']} base"}}
        if base.get("digest"):
            dep["digest"] = {"sha256": base["digest"].split(":", 1)[-1]}
        deps.append(dep)
    for name, text in sorted(locks.items()):
        if text is not None:
            deps.append({"name": name, "uri": f"file:///opt/lmi/lock/{name}",
                         "digest": {"sha256": hashlib.sha256(text.encode()).hexdigest()}})
    created = labels.get("org.opencontainers.image.created") or facts.get("created")
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject_name, "digest": {"sha256": digest.split(":", 1)[1]}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "matrix": {"path": matrix_path, "image": spec.id, "line": spec.line, "family": spec.family.name,
                               "repository": spec.repository, "tag": spec.tag},
                    "buildArgs": safe_args(build_args),
                },
                "internalParameters": {"contentHash": labels.get("io.lmi.content-hash"), "imageId": facts["id"]},
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"lmi-buildkit": __version__, **builder}},
                "metadata": {"invocationId": f"{spec.id}@{labels.get('io.lmi.content-hash', facts['id'])}",
                             "finishedOn": created},
            },
        },
    }


def dumps(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, indent=2).encode()
