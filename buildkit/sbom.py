"""The SBOM of a built image: CycloneDX 1.5 JSON (cyclonedx-python-lib), made from the image itself.

What is installed is read from the image: its dpkg status database, /etc/os-release, the lock files
the build installed from (/opt/lmi/lock) and the build's claims (/opt/lmi/image.json) are copied out of
a container that is created, never started; every Python distribution is listed by the image's own venv
Python (importlib.metadata) in one `docker run --network=none`. From those:

- every OS package as `pkg:deb/<distro>/<name>@<version>?arch=..&distro=<id>-<version_id>`;
- every Python distribution as `pkg:pypi/<name>@<version>`, with the sha256 of every file its lock
  allows (pip installed one of them with --require-hashes); one that no lock names says so;
- the CUDA base and the engine's parts marked by role (`lmi:role`), with the properties the engine's
  profile gives them (buildkit/profiles: DEB_ROLES, SBOM_FILES, sbom_properties), e.g. the op libraries
  found prebuilt in the image and the SM they were built for.

The document is deterministic for one image (serial number and timestamp come from its digest and
creation time): publishing the same image again attaches the same SBOM, not a second one. It is
validated against the CycloneDX 1.5 JSON schema the library ships (offline) before anyone sees it.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone

from .errors import LmiError
from .interface import Profile

MEDIA_TYPE = "application/vnd.cyclonedx+json"
SPEC_VERSION = "1.5"

# Runs inside the image (its venv's Python, no network): every Python distribution, as JSON, with the shared
# libraries under the paths the profiles ask about (SBOM_FILES) as "ops".
_DISTS = r"""
import importlib.metadata as md, json
prefixes = tuple(json.loads(PREFIXES))
print(json.dumps([{"name": d.metadata["Name"], "version": d.version,
                   "ops": sorted(str(f) for f in (d.files or []) if str(f).startswith(prefixes)
                                 and str(f).endswith(".so"))} for d in md.distributions()]))
"""


def _dists_script(profiles: Iterable[Profile]) -> str:
    prefixes = sorted({p for profile in profiles for p in profile.SBOM_FILES})
    return _DISTS.replace("PREFIXES", repr(json.dumps(prefixes)))
VENV = "/opt/venv"
# Files copied out of the image (no process of the image runs for these; a path may be absent).
FILES = {"os_release": "/etc/os-release", "dpkg_status": "/var/lib/dpkg/status", "claims": "/opt/lmi/image.json",
         "venv": f"{VENV}/pyvenv.cfg"}
LOCK_DIR = "/opt/lmi/lock"


class SbomError(LmiError):
    """The image could not be inventoried, or its SBOM did not validate (exit 1)."""


def inventory(docker: str, image: str, profiles: Iterable[Profile], timeout: float = 300) -> dict:
    """What is installed in `image` (an ID or reference): files copied out of a created (never started)
    container, then the Python distributions read by the image's own venv Python, network off. An image
    without that venv (not built by lmi) has its Python inventory marked as not taken, not as empty."""
    created = subprocess.run([docker, "create", "--network=none", image, "/lmi-sbom-never-runs"], capture_output=True,
                             text=True, timeout=120)
    if created.returncode:
        raise SbomError(f"{image}: cannot create a container to read it ({created.stderr.strip()[-200:]})")
    container = created.stdout.strip()
    try:
        found = {key: _copy_out(docker, container, path).get(path.rsplit("/", 1)[-1]) for key, path in FILES.items()}
        locks = {name: data.decode(errors="replace")
                 for name, data in _copy_out(docker, container, LOCK_DIR).items() if name.endswith(".lock")}
    finally:
        subprocess.run([docker, "rm", "-f", container], capture_output=True, timeout=120)
    inv = {key: value.decode(errors="replace") if value is not None else None for key, value in found.items()}
    inv["locks"] = {name.rsplit("/", 1)[-1]: text for name, text in sorted(locks.items())}
    inv["claims"] = json.loads(inv["claims"]) if inv["claims"] else None
    inv["dists"], inv["python_inventory"] = [], f"not taken: {VENV}/pyvenv.cfg is absent (not an lmi image)"
    if inv.pop("venv") is not None:
        result = subprocess.run([docker, "run", "--rm", "--network=none", "--entrypoint", f"{VENV}/bin/python", image,
                                 "-c", _dists_script(profiles)], capture_output=True, text=True, timeout=timeout)
        if result.returncode:
            tail = (result.stderr.strip().splitlines() or ["no output"])[-1][:300]
            raise SbomError(f"{image}: cannot list its Python distributions ({VENV}/bin/python failed: {tail})")
        inv["dists"], inv["python_inventory"] = json.loads(result.stdout), f"importlib.metadata of {VENV}"
    return inv


def _copy_out(docker: str, container: str, path: str) -> dict[str, bytes]:
    """Regular files at `path` (a file or a folder) in a container, by name relative to path's parent;
    nothing when the path is absent. Symbolic links are followed (/etc/os-release is one)."""
    result = subprocess.run([docker, "cp", "-L", f"{container}:{path}", "-"], capture_output=True, timeout=300)
    if result.returncode:
        return {}
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def image_facts(docker: str, image: str) -> dict:
    """The engine's view of the image: its ID, creation time, labels and environment."""
    result = subprocess.run([docker, "image", "inspect", image], capture_output=True, text=True, timeout=60)
    if result.returncode:
        raise SbomError(f"{image}: not in the engine ({result.stderr.strip()[-200:]})")
    doc = json.loads(result.stdout)[0]
    config = doc.get("Config") or {}
    env = dict(e.partition("=")[::2] for e in config.get("Env") or [])
    return {"id": doc["Id"], "created": doc.get("Created"), "labels": config.get("Labels") or {}, "env": env}


def parse_os_release(text: str | None) -> dict[str, str]:
    out = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip().strip('"')
    return out


def parse_dpkg_status(text: str | None) -> list[dict[str, str]]:
    """Installed packages (Status: install ok installed) from a dpkg status database, in its order."""
    packages = []
    for stanza in re.split(r"\n\s*\n", text or ""):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") and key:
                continue  # continuation lines (descriptions, conffiles) are not needed
            key, sep, value = line.partition(":")
            if sep:
                fields[key] = value.strip()
        if fields.get("Package") and fields.get("Status", "").endswith(" installed"):
            packages.append(fields)
    return packages


def parse_lock(text: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) from a lock file in pip's format (what lock.Pin.line writes)."""
    out = {}
    for entry in re.sub(r"\\\n\s*", " ", text).splitlines():
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)\s*$", entry)
        if m:
            out[canonical(m.group(1))] = (m.group(2), re.findall(r"sha256:([0-9a-f]{64})", m.group(3)))
    return out


def canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


def build(inv: dict, facts: dict, name: str, digest: str | None = None, base_digest: str | None = None, *,
          profiles: Iterable[Profile]) -> str:
    """The CycloneDX 1.5 JSON of one image, validated. `name` is its repository; `digest` its manifest
    digest once pushed (the subject the SBOM describes); `profiles`: the image's own (their roles and properties)."""
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.output.json import JsonV1Dot5
    from packageurl import PackageURL

    labels, claims = facts["labels"], inv.get("claims") or {}
    osr = parse_os_release(inv.get("os_release"))
    distro_id, distro = osr.get("ID", "unknown"), f"{osr.get('ID', 'unknown')}-{osr.get('VERSION_ID', 'unknown')}"
    identity = digest or facts["id"]
    created = _parse_time(facts.get("created")) or _parse_time(labels.get("org.opencontainers.image.created"))
    bom = Bom(serial_number=uuid.uuid5(uuid.NAMESPACE_URL, f"lmi-sbom:{identity}"))
    bom.metadata.timestamp = created or datetime(1970, 1, 1, tzinfo=timezone.utc)
    version = labels.get("org.opencontainers.image.version") or claims.get("tag")
    qualifiers = {k: v for k, v in (("repository_url", name if "/" in name else None), ("tag", version)) if v}
    root_purl = PackageURL("oci", None, name.rsplit("/", 1)[-1], identity if identity.startswith("sha256:") else None,
                           qualifiers or None)
    root = Component(name=name, version=version, type=ComponentType.CONTAINER, bom_ref="image", purl=root_purl,
                     properties=[Property(name="lmi:image-id", value=facts["id"]),
                                 Property(name="lmi:python-inventory", value=inv.get("python_inventory") or "unknown")]
                     + [Property(name=f"lmi:label:{k}", value=v) for k, v in sorted(labels.items())])
    bom.metadata.component = root
    components = []

    def prop(role: str) -> list:
        return [Property(name="lmi:role", value=role)]

    for pkg in parse_dpkg_status(inv.get("dpkg_status")):
        arch = pkg.get("Architecture") or None
        purl = PackageURL("deb", distro_id, pkg["Package"], pkg.get("Version"),
                          {k: v for k, v in (("arch", arch), ("distro", distro)) if v})
        role = _deb_role(pkg["Package"], profiles)
        properties = prop(role) if role else []
        if pkg.get("Source"):
            properties.append(Property(name="lmi:deb:source", value=pkg["Source"]))
        components.append(Component(name=pkg["Package"], version=pkg.get("Version"), purl=purl,
                                    bom_ref=purl.to_string(), properties=properties,
                                    type=ComponentType.APPLICATION if role else ComponentType.LIBRARY))

    locked = {}
    for file, text in (inv.get("locks") or {}).items():
        for key, (ver, hashes) in parse_lock(text or "").items():
            locked[key] = (ver, hashes, file)
    for dist in sorted(inv.get("dists") or [], key=lambda d: canonical(d["name"])):
        key = canonical(dist["name"])
        purl = PackageURL("pypi", None, key, dist["version"])
        lock_entry = locked.get(key)
        properties = []
        hashes = []
        if lock_entry and lock_entry[0] == dist["version"]:
            hashes = [HashType(alg=HashAlgorithm.SHA_256, content=h) for h in lock_entry[1]]
            properties.append(Property(name="lmi:lock", value=lock_entry[2]))
        else:
            properties.append(Property(name="lmi:lock", value="none (installed by the venv or not locked)"
                                       if not lock_entry else f"{lock_entry[2]} pins {lock_entry[0]}"))
        for profile in profiles:  # each names its own distributions only
            properties += [Property(name=k, value=v)
                           for k, v in profile.sbom_properties(key, list(dist.get("ops") or []), claims)]
        components.append(Component(name=dist["name"], version=dist["version"], purl=purl, bom_ref=purl.to_string(),
                                    hashes=hashes, properties=properties))

    base = labels.get("org.opencontainers.image.base.name")
    if base:
        repo, _, tag = base.rpartition(":") if "@" not in base else (base.split("@")[0], "", "")
        qualifiers = {"tag": tag} if tag else {}
        purl = PackageURL("docker", None, repo or base, base_digest, qualifiers or None)
        base_props = prop("base-image")
        cuda = labels.get("io.lmi.cuda")
        if cuda and cuda != "none":
            base_props.append(Property(name="lmi:cuda", value=cuda))
        components.append(Component(name=repo or base, version=tag or base_digest, type=ComponentType.CONTAINER,
                                    purl=purl, bom_ref="base-image", properties=base_props,
                                    hashes=[HashType(alg=HashAlgorithm.SHA_256, content=base_digest.split(":")[1])]
                                    if base_digest else []))
    for c in components:
        bom.components.add(c)
    bom.register_dependency(root, components)
    text = JsonV1Dot5(bom).output_as_string(indent=2)
    validate(text)
    return text


def validate(text: str) -> None:
    """Against the CycloneDX 1.5 JSON schema shipped with cyclonedx-python-lib (no network)."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_5).validate_str(text)
    if error is not None:
        raise SbomError(f"the SBOM does not validate against CycloneDX {SPEC_VERSION}: {str(error)[:300]}")


def _deb_role(package: str, profiles: Iterable[Profile]) -> str | None:
    for profile in profiles:
        role = next((r for pattern, r in profile.DEB_ROLES.items() if re.fullmatch(pattern, package)), None)
        if role:
            return role
    if re.fullmatch(r"cuda-(compat|cudart|toolkit|libraries|runtime)-\d+-\d+", package):
        return "cuda"
    return None


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", value).replace("Z", "+00:00"))
    except ValueError:
        return None
