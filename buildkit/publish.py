"""Publishing: push images that passed their smoke tests, with immutable tags, and promote them by
digest to other registries and regions without rebuilding.

Order per image: the immutable full tag, then the content-hash tag, then the floating aliases. An
immutable tag that already holds the same image is left alone; one that holds another image refuses
the whole run before anything is pushed. Transient failures are retried with backoff; a run cut off
halfway is completed by running it again. The index is written only when every push succeeded.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import engine, index, smoke
from .errors import LmiError, UserError
from .registry import Address, AuthError, Ecr, OciClient, RegistryError
from .spec import ALIAS_FILTERS, ImageSpec, is_alias

TRANSIENT = re.compile(r"connection refused|connection reset|EOF|timeout|i/o timeout|broken pipe|"
                       r"status: 5\d\d|50[0234]|Service Unavailable|Bad Gateway|TLS handshake", re.I)
DENIED = re.compile(r"unauthorized|denied|authentication required|no basic auth credentials", re.I)


class PublishError(LmiError):
    """Publishing failed or was refused; nothing more was pushed and the index was not touched (exit 1)."""


@dataclass
class Published:
    spec: ImageSpec
    image_id: str
    digest: str
    address: Address
    tags: list[str]
    content_hash: str | None
    built: str
    record: smoke.Record
    full_tag: str

    def entry(self) -> dict:
        s = self.spec
        return {
            "id": s.id, "family": s.family.name, "gpu": s.family.gpu, "sm": s.family.sm, "arch": s.family.arch,
            "repository": s.repository, "tag": self.full_tag, "tags": sorted(self.tags), "aliases": list(s.aliases),
            "components": {"djl_serving": s.djl, "deepspeed": s.deepspeed, "torch": s.torch, "cuda": s.cuda_patch,
                           "python": s.python, "os": s.os.name, "java": s.java, **s.libraries},
            "torch_variant": s.wheel_variant, "cuda_compat": s.needs_compat,
            "image_id": self.image_id, "digest": self.digest, "content_hash": self.content_hash,
            "built": self.built,
            "smoke": {"passed": self.record.passed, "tiers": self.record.tiers, "finished": self.record.finished},
            "registries": [registry_entry(self.address, s.repository, self.digest)],
        }


def registry_entry(address: Address, repository: str, digest: str) -> dict:
    return {"url": address.url, "kind": address.kind, "region": address.region,
            "uri": address.ref(repository, digest=digest)}


class Target:
    """One registry: how to log in, and how to read what a tag holds."""

    def __init__(self, address: Address, docker: str) -> None:
        self.address = address
        self.docker = docker
        self.ecr = Ecr(address) if address.kind == "ecr" else None
        self._oci: OciClient | None = None

    def prepare(self, repositories: set[str]) -> list[str]:
        if not self.ecr:
            return []
        changed = [c for repo in sorted(repositories) for c in self.ecr.ensure_repository(self.address.path(repo))]
        user, password = self.ecr.token()
        docker_login(self.docker, self.address.host, user, password)
        self._oci = OciClient(self.address.host, credentials=(user, password))
        return changed

    @property
    def oci(self) -> OciClient:
        if self._oci is None:
            self._oci = OciClient(self.address.host)
        return self._oci

    def config_digest(self, repo: str, tag: str) -> str | None:
        path = self.address.path(repo)
        return self.ecr.config_digest(path, tag) if self.ecr else self.oci.config_digest(path, tag)

    def manifest_digest(self, repo: str, tag: str) -> str | None:
        path = self.address.path(repo)
        if self.ecr:
            return self.ecr.manifest_digest(path, tag)
        found = self.oci.manifest(path, tag)
        return found[0] if found else None


def docker_login(docker: str, host: str, user: str, password: str) -> None:
    """Store credentials in the engine's credential store; the password goes through stdin only."""
    login = subprocess.run([docker, "login", "--username", user, "--password-stdin", host], input=password,
                           capture_output=True, text=True)
    if login.returncode:
        raise PublishError(f"docker login to {host} failed: {_scrub(login.stderr, password)}")


def _scrub(text: str, *secrets: str) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text.strip()[-300:]


@dataclass(frozen=True)
class Item:
    """One image to publish: its spec and the content hash it was built with (its io.lmi.content-hash label)."""

    spec: ImageSpec
    content_hash: str
    revision: str | None = None

    @property
    def full_tag(self) -> str:
        return f"{self.spec.tag}-{self.revision}" if self.revision else self.spec.tag

    @property
    def immutable(self) -> list[str]:
        return [self.full_tag, f"hash-{self.content_hash[:16]}"]

    @property
    def tags(self) -> list[str]:
        return [*self.immutable, *self.spec.aliases]


def held_tags(target: Target, item: Item) -> dict[str, str | None]:
    """The image ID each immutable tag of `item` holds in the target (None: the tag is free)."""
    return {tag: target.config_digest(item.spec.repository, tag) for tag in item.immutable}


def conflicts(target: Target, item: Item, image_id: str, held: dict[str, str | None] | None = None) -> list[str]:
    """Immutable tags that already hold another image in the target."""
    out = []
    for tag, held_id in (held if held is not None else held_tags(target, item)).items():
        if held_id is not None and held_id != image_id:
            out.append(f"{target.address.ref(item.spec.repository, tag)} already holds image {held_id[:19]}…, not "
                       f"{image_id[:19]}…; immutable tags are never overwritten: change the matrix (a new version "
                       "or tag_suffix) to publish a different image")
    return out


def local_image(sdk, spec: ImageSpec, address: Address):
    for ref in (f"{spec.repository}:{spec.tag}", address.ref(spec.repository, spec.tag)):
        try:
            return sdk.images.get(ref)
        except Exception:  # noqa: S112 - try the next name
            continue
    raise UserError(f"image {spec.id} ({spec.repository}:{spec.tag}) is not in the engine; build and test it first: "
                    f"`lmi build {spec.id}` and `lmi test {spec.id}`")


def push(specs: list[ImageSpec], address: Address, index_path: Path, log_dir: Path = Path(".lmi/logs"),
         record_dir: Path = smoke.RECORD_DIR, retries: int = 3, revision: str | None = None,
         index_artifact: bool = True) -> list[Published]:
    if revision is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._]{0,30}", revision):
        raise UserError(f"--revision {revision}: use letters, digits, dots and underscores (e.g. 20261130)")
    if revision is not None and any(is_alias(f"{s.tag}-{revision}") for s in specs):
        raise UserError(f"--revision {revision}: <tag>-{revision} would match an alias pattern "
                        f"({', '.join(ALIAS_FILTERS)}) and could be moved; use e.g. a date (20261130)")
    client = engine.detect_client()
    sdk = engine.sdk()
    images = []
    for spec in specs:
        img = local_image(sdk, spec, address)
        content_hash = (img.labels or {}).get("io.lmi.content-hash")
        if not content_hash:
            raise PublishError(f"{spec.id}: image {img.id[:19]}… has no io.lmi.content-hash label: build it with "
                               "`lmi build` (or `lmi bake`); nothing was pushed")
        images.append((Item(spec, content_hash, revision), img))
    # The gate: every digest needs a passing smoke record, or nothing is pushed.
    refused = [f"{p.spec.id}: image {img.id[:19]}… has no passing smoke record; run `lmi test {p.spec.id}`"
               for p, img in images if smoke.passing_record(img.id, record_dir) is None]
    if refused:
        raise PublishError(*refused, "nothing was pushed")
    target = Target(address, client.path)
    try:
        for line in target.prepare({s.repository for s in specs}):
            print(f"{address.url}: {line}")
        held = {p.spec.id: held_tags(target, p) for p, _ in images}
        clashes = [c for p, img in images for c in conflicts(target, p, img.id, held[p.spec.id])]
    except (RegistryError, AuthError) as exc:
        raise PublishError(str(exc), "nothing was pushed; the index is unchanged") from None
    if clashes:
        raise PublishError(*clashes, "nothing was pushed")

    published = []
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        for p, img in images:
            repo = p.spec.repository
            pushed = []
            for tag in p.tags:
                ref = address.ref(repo, tag)
                if held[p.spec.id].get(tag) == img.id:  # an immutable tag that already holds this image
                    print(f"  {ref}: already there (same image)")
                    continue
                img.tag(address.ref(repo, tag).rsplit(":", 1)[0], tag)
                _docker_push(client, ref, log_dir / f"{p.spec.id}.push.log", retries)
                pushed.append(tag)
                print(f"  {ref}: pushed")
            digest = target.manifest_digest(repo, p.full_tag)
            record = smoke.passing_record(img.id, record_dir)
            published.append(Published(p.spec, img.id, digest, address, p.tags, p.content_hash,
                                       img.attrs.get("Created", ""), record, p.full_tag))
    except (RegistryError, AuthError) as exc:
        raise PublishError(str(exc), "the index is unchanged; run the same command again to complete") from None
    _update_index(index_path, [p.entry() for p in published], [target] if index_artifact else [],
                  {s.repository for s in specs})
    return published


def _update_index(index_path: Path, entries: list[dict], targets: list[Target], repositories: set[str]) -> None:
    """Write the index file, then publish it beside the images (a mutable `index-latest` artifact tag)."""
    index.update(index_path, entries)
    for target in targets:
        for repo in sorted(repositories):
            try:
                target.oci.push_artifact(target.address.path(repo), INDEX_TAG, index_path.read_bytes(),
                                         INDEX_MEDIA_TYPE)
            except (RegistryError, AuthError) as exc:
                print(f"warning: the index file is written, but publishing it to {target.address.url} failed: {exc}")


def _docker_push(client: engine.Client, ref: str, log: Path, retries: int) -> None:
    for attempt in range(retries + 1):
        result = subprocess.run([client.path, "push", ref], capture_output=True, text=True)
        with log.open("a") as fh:
            fh.write(f"$ docker push {ref}  (attempt {attempt + 1})\n{result.stdout}{result.stderr}\n")
        if result.returncode == 0:
            return
        output = result.stdout + result.stderr
        if DENIED.search(output):
            raise AuthError(f"push of {ref} was denied: log in with `docker login {ref.split('/')[0]}` and check "
                            f"the permissions (log: {log})")
        if not TRANSIENT.search(output) or attempt == retries:
            tail = output.strip().splitlines()[-1:] or ["no output"]
            raise RegistryError(f"push of {ref} failed after {attempt + 1} tries: {tail[0][:300]} (log: {log})")
        time.sleep(2 ** attempt)


def promote(specs: list[ImageSpec], source: Address, targets: list[Address], index_path: Path,
            record_dir: Path = smoke.RECORD_DIR, index_artifact: bool = True) -> list[str]:
    """Copy each image by digest from `source` to every target, with all its tags. No rebuild: the same
    digest everywhere. The index gains the new URIs once every copy succeeded."""
    client = engine.detect_client()
    src = Target(source, client.path)
    dsts = [Target(t, client.path) for t in targets]
    known = index.load(index_path, missing_ok=True)
    done, entries = [], []
    try:
        src.prepare(set())
        plan = []
        for spec in specs:
            repo = spec.repository
            digest = src.manifest_digest(repo, spec.tag)
            image_id = src.config_digest(repo, spec.tag)
            if digest is None:
                raise PublishError(f"{source.ref(repo, spec.tag)} does not exist; push it there first")
            listed = next((e for e in known.get("images", []) if e["digest"] == digest), None)
            if not ((listed and listed["smoke"]["passed"]) or smoke.passing_record(image_id, record_dir)):
                raise PublishError(f"{spec.id}: {digest[:19]}… has no passing smoke record; nothing was promoted")
            content_hash = (listed or {}).get("content_hash") or _content_hash(src, repo, spec.tag)
            plan.append((Item(spec, content_hash), digest, image_id, listed))
        for dst in dsts:
            dst.prepare({s.repository for s in specs})
            clashes = [c for p, _, image_id, _ in plan for c in conflicts(dst, p, image_id)]
            if clashes:
                raise PublishError(*clashes, "nothing was promoted")
        for dst in dsts:
            for p, digest, _, listed in plan:
                repo = p.spec.repository
                tags = p.tags
                same_ecr_repo = (src.ecr and dst.ecr and source.host == dst.address.host
                                 and source.path(repo) == dst.address.path(repo))
                if same_ecr_repo:
                    dst.ecr.retag(source.path(repo), digest, dst.address.path(repo), tags)
                else:
                    dst.oci.copy_image(src.oci, source.path(repo), digest, dst.address.path(repo), tags)
                done.append(f"{source.ref(repo, digest=digest)} -> {dst.address.ref(repo, digest=digest)}")
                entry = dict(listed) if listed else None
                if entry:
                    entry["registries"] = [registry_entry(dst.address, repo, digest)]
                    entries.append(entry)
    except (RegistryError, AuthError) as exc:
        raise PublishError(str(exc), "the index is unchanged; run the same command again to complete") from None
    if entries:
        _update_index(index_path, entries, dsts if index_artifact else [], {s.repository for s in specs})
    return done


INDEX_TAG = "index-latest"
INDEX_MEDIA_TYPE = "application/vnd.lmi.index.v1+json"


def _index_target(address: Address) -> Target:
    """A registry to read or write the index in: only ECR needs the engine (for its login)."""
    return Target(address, engine.detect_client().path if address.kind == "ecr" else "docker")


class IndexMoved(PublishError):
    """index-latest changed between reading it and publishing over it."""


def fetch_index(address: Address, repository: str) -> dict:
    """The release index published beside the images (an empty one if none is there yet)."""
    return fetch_index_at(address, repository)[0]


def fetch_index_at(address: Address, repository: str) -> tuple[dict, str | None]:
    """The published index and the manifest digest it was read at (None: none published yet)."""
    target = _index_target(address)
    target.prepare(set())
    repo = address.path(repository)
    try:
        found = target.oci.manifest(repo, INDEX_TAG)
        if found is None:
            return index.empty(), None
        layer = json.loads(found[2])["layers"][0]["digest"]
        if not index.DIGEST.fullmatch(str(layer)):
            raise PublishError(f"{address.url}: the release index manifest names layer {str(layer)[:80]!r}, not a "
                               "sha256 digest; refusing it")
        blob = target.oci.request("GET", f"/v2/{repo}/blobs/{layer}").read()
        if "sha256:" + hashlib.sha256(blob).hexdigest() != layer:
            raise PublishError(f"{address.url}: the release index blob does not match its digest {layer}; "
                               "refusing a tampered or damaged index")
        data = json.loads(blob)
        index.validate(data, f"{address.url} ({repository}:{INDEX_TAG})")
        return data, found[0]
    except (RegistryError, AuthError) as exc:
        raise PublishError(f"{address.url}: cannot fetch the release index: {exc}") from None


def publish_index(path: Path, addresses: list[Address], repository: str,
                  read_at: dict[str, str | None] | None = None) -> None:
    """Push the index as index-latest. With read_at (url -> the manifest digest the merge started from),
    an index-latest that moved since is not overwritten (IndexMoved): the caller merges again. OCI
    registries have no conditional tag update, so the check comes right before the push."""
    for address in addresses:
        target = _index_target(address)
        try:
            target.prepare({repository})
            if read_at is not None and address.url in read_at:
                now = target.oci.manifest(address.path(repository), INDEX_TAG)
                if (now[0] if now else None) != read_at[address.url]:
                    raise IndexMoved(f"{address.url}: {INDEX_TAG} moved while merging (read at "
                                     f"{read_at[address.url]}, now {now[0] if now else None})")
            target.oci.push_artifact(address.path(repository), INDEX_TAG, path.read_bytes(), INDEX_MEDIA_TYPE)
        except (RegistryError, AuthError) as exc:
            raise PublishError(f"{address.url}: cannot publish the release index: {exc}") from None


def _content_hash(target: Target, repo: str, tag: str) -> str:
    """The io.lmi.content-hash label of a published image, read from its config blob."""
    config = target.config_digest(repo, tag)
    blob = target.oci.request("GET", f"/v2/{target.address.path(repo)}/blobs/{config}").read()
    labels = (json.loads(blob).get("config") or {}).get("Labels") or {}
    if "io.lmi.content-hash" not in labels:
        raise PublishError(f"{target.address.ref(repo, tag)} has no io.lmi.content-hash label; it was not built "
                           "by lmi")
    return labels["io.lmi.content-hash"]

