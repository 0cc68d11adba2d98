"""Publishing: push images that passed their smoke tests, with immutable tags, and promote them by
digest to other registries and regions without rebuilding.

Revisions: the content-hash tag (hash-<16 hex>) is the dedup key. Content the target already holds is
not pushed again and gets no new revision. New content of a component tuple gets the next free revision
there, <tuple>-r<N> (N = 1 + the highest N among the target's tags), an immutable tag; the bare tuple tag
and the other aliases then move to it. So a matrix change, a toolkit change and a new base digest all
publish with the same command and no flag, and a re-run pushes nothing.

Order per image: the revision tag, then the content-hash tag, then the aliases. A tag that already holds
the same image is left alone; an immutable tag that holds another image refuses the whole run before
anything is pushed. Transient failures are retried with backoff; a run cut off halfway is completed by
running it again (the half-published revision is found by its content-hash tag and completed). The index
is written only when every push succeeded.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import attest, engine, gate, index, smoke, versions
from . import facts as facts_mod
from .errors import LmiError, UserError
from .interface import Registry
from .registry import Address, AuthError, Ecr, OciClient, RegistryError
from .registry.tags import ecr_tags, oci_tags
from .spec import ImageSpec, hash_tag, is_alias, revision_tag, revisions

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
    revision: int
    attestations: dict | None = None  # {"sbom": digest, "provenance": digest}: OCI referrers of `digest`

    def entry(self, known: facts_mod.Facts) -> dict:
        s = self.spec
        return {
            "id": s.id, "family": s.family.name, "gpu": s.family.gpu, "sm": s.family.sm, "arch": s.family.arch,
            "repository": s.repository, "tag": self.full_tag, "revision": self.revision, "tags": sorted(self.tags),
            "aliases": [s.tag, *s.aliases],
            "engine": s.stack.name,
            "components": {**s.versions, "torch": s.torch, "cuda": s.cuda_patch, "python": s.python, "os": s.os.name,
                           **s.libraries},
            "torch_variant": s.wheel_variant, "cuda_compat": s.needs_compat, "host": host_entry(s, known),
            "image_id": self.image_id, "digest": self.digest, "content_hash": self.content_hash,
            "built": self.built,
            "smoke": {"passed": self.record.passed, "tiers": self.record.tiers, "finished": self.record.finished},
            "registries": [registry_entry(self.address, s.repository, self.digest)],
            **(self.attestations or {}),
        }


def host_entry(spec: ImageSpec, known: facts_mod.Facts) -> dict:
    """Which host drivers and SageMaker InferenceAmiVersions the image runs on, natively or through its
    cuda-compat (only an image that keeps cuda-compat runs on the older branches), from buildkit/data."""
    if spec.cuda is None:
        return {"summary": "CPU image: runs on any host, no NVIDIA driver needed"}
    f = known
    tk = f.toolkits[spec.cuda]
    floor = max(tk.min_driver, spec.family.min_driver or "0", key=versions.key)
    branches = list(tk.compat_branches) if spec.needs_compat else []

    def how(driver: str) -> str | None:
        if versions.at_least(driver, floor):
            return "native"
        return "cuda-compat" if driver.split(".")[0] in branches else None

    amis = {name: how(driver) for name, driver in sorted(f.amis.items())}
    amis = {name: way for name, way in amis.items() if way}
    where = f"InferenceAmiVersion {spec.inference_ami}" if spec.inference_ami else f"{spec.family.name}'s default"
    compat = f", branches {'/'.join('R' + b for b in branches)} through cuda-compat" if branches else ""
    return {
        "native_driver_min": floor, "cuda_compat_branches": branches,
        "checked_driver": spec.driver, "checked_on": where, "inference_amis": amis,
        "summary": (f"CUDA {spec.cuda_patch} runs on host driver >= {floor} natively{compat}; checked against "
                    f"driver {spec.driver} ({where}); InferenceAmiVersion: "
                    + (", ".join(f"{n} ({w})" for n, w in amis.items()) or "none listed")),
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

    def tags(self, repo: str) -> list[str]:
        path = self.address.path(repo)
        return ecr_tags(self.ecr, path) if self.ecr else oci_tags(self.oci, path)

    def revision_of(self, spec: ImageSpec, content_hash: str, image_id: str) -> tuple[int, str | None]:
        """(revision, the image ID the content-hash tag holds: None if the content is new here). Content
        already here keeps the revision whose tag holds it; a push cut off after its revision tag keeps that
        one (the newest); new content gets the next free revision, and so does content published before
        revisions existed (its hash tag there, no revision tag on it)."""
        repo = spec.repository
        listed = self.tags(repo)
        taken = revisions(listed, spec.tag)
        held = self.config_digest(repo, hash_tag(content_hash)) if hash_tag(content_hash) in listed else None
        for n in taken if held else taken[:1]:
            if self.config_digest(repo, revision_tag(spec.tag, n)) == (held or image_id):
                return n, held
        return (taken[0] + 1 if taken else 1), held


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
    """One image to publish: its spec, the content hash it was built with (its io.lmi.content-hash label)
    and its revision in the target."""

    spec: ImageSpec
    content_hash: str
    revision: int

    @property
    def full_tag(self) -> str:
        return revision_tag(self.spec.tag, self.revision)

    @property
    def immutable(self) -> list[str]:
        return [self.full_tag, hash_tag(self.content_hash)]

    @property
    def tags(self) -> list[str]:
        """Immutable first, then the aliases: the bare tuple tag and the floating ones."""
        return [*self.immutable, self.spec.tag, *self.spec.aliases]


def held_tags(target: Target, item: Item) -> dict[str, str | None]:
    """The image ID each tag of `item` holds in the target (None: the tag is free)."""
    return {tag: target.config_digest(item.spec.repository, tag) for tag in item.tags}


def conflicts(target: Target, item: Item, image_id: str, held: dict[str, str | None] | None = None) -> list[str]:
    """Immutable tags that already hold another image in the target."""
    out = []
    for tag, held_id in (held if held is not None else held_tags(target, item)).items():
        if held_id is not None and held_id != image_id and not is_alias(tag):
            out.append(f"{target.address.ref(item.spec.repository, tag)} already holds image {held_id[:19]}…, not "
                       f"{image_id[:19]}…; immutable tags are never overwritten (another publisher took this "
                       "revision meanwhile): run the push again for the next one")
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
         record_dir: Path = smoke.RECORD_DIR, retries: int = 3, index_artifact: bool = True,
         matrix_path: Path | None = None, *, known: facts_mod.Facts) -> list[Published]:
    """Push the smoke-tested images of `specs` and record them in the index (`known`: the facts they were
    resolved with; their registry of profiles reads the index)."""
    client = engine.detect_client()
    sdk = engine.sdk()
    images = []
    for spec in specs:
        img = local_image(sdk, spec, address)
        content_hash = (img.labels or {}).get("io.lmi.content-hash")
        if not content_hash:
            raise PublishError(f"{spec.id}: image {img.id[:19]}… has no io.lmi.content-hash label: build it with "
                               "`lmi build` (or `lmi bake`); nothing was pushed")
        images.append((spec, content_hash, img))
    # The gate: every digest needs a passing smoke record, or nothing is pushed.
    refused = [f"{spec.id}: image {img.id[:19]}… has no passing smoke record; run `lmi test {spec.id}`"
               for spec, _, img in images if smoke.passing_record(img.id, record_dir) is None]
    if refused:
        raise PublishError(*refused, "nothing was pushed")
    target = Target(address, client.path)
    try:
        for line in target.prepare({s.repository for s in specs}):
            print(f"{address.url}: {line}")
        items = []
        for spec, content_hash, img in images:
            revision, held_id = target.revision_of(spec, content_hash, img.id)
            ref = address.ref(spec.repository, revision_tag(spec.tag, revision))
            if held_id is not None and held_id != img.id:  # the dedup key: this content is published
                print(f"{spec.id}: its content ({hash_tag(content_hash)}) is already published as image "
                      f"{held_id[:19]}… ({ref}), built separately; this build is not pushed")
                continue
            items.append((Item(spec, content_hash, revision), img))
            print(f"{spec.id}: {ref} ({'published before' if held_id else 'new content'})")
        held = {p.spec.id: held_tags(target, p) for p, _ in items}
        clashes = [c for p, img in items for c in conflicts(target, p, img.id, held[p.spec.id])]
    except (RegistryError, AuthError) as exc:
        raise PublishError(str(exc), "nothing was pushed; the index is unchanged") from None
    if clashes:
        raise PublishError(*clashes, "nothing was pushed")

    published = []
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        for p, img in items:
            repo = p.spec.repository
            pushed = []
            for tag in p.tags:
                ref = address.ref(repo, tag)
                if held[p.spec.id].get(tag) == img.id:  # a tag that already holds this image
                    print(f"  {ref}: already there (same image)")
                    continue
                img.tag(address.ref(repo, tag).rsplit(":", 1)[0], tag)
                _docker_push(client, ref, log_dir / f"{p.spec.id}.push.log", retries)
                pushed.append(tag)
                print(f"  {ref}: pushed")
            digest = target.manifest_digest(repo, p.full_tag)
            record = smoke.passing_record(img.id, record_dir)
            attached = attest.attach(target.oci, address.path(repo), address.ref(repo, digest=digest).split("@")[0],
                                     digest, client.path, img.id, p.spec, matrix_path)
            print(f"  {address.ref(repo, digest=digest)}: SBOM {attached['sbom'][:19]}…, provenance "
                  f"{attached['provenance'][:19]}… attached")
            published.append(Published(p.spec, img.id, digest, address, p.tags, p.content_hash,
                                       img.attrs.get("Created", ""), record, p.full_tag, p.revision, attached))
    except (RegistryError, AuthError) as exc:
        raise PublishError(str(exc), "the index is unchanged; run the same command again to complete") from None
    _update_index(index_path, [p.entry(known) for p in published], [target] if index_artifact else [],
                  {s.repository for s in specs}, known.profiles)
    return published


def _update_index(index_path: Path, entries: list[dict], targets: list[Target], repositories: set[str],
                  profiles: Registry) -> None:
    """Write the index file, then publish it beside the images (a mutable `index-latest` artifact tag)."""
    index.update(index_path, entries, profiles)
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
            record_dir: Path = smoke.RECORD_DIR, index_artifact: bool = True, *, profiles: Registry) -> list[str]:
    """Copy each image by digest from `source` to every target, with all its tags: the image the bare tuple
    tag names in `source` (its newest revision), under the same revision tag. No rebuild: the same digest
    everywhere. The index gains the new URIs once every copy succeeded."""
    client = engine.detect_client()
    src = Target(source, client.path)
    dsts = [Target(t, client.path) for t in targets]
    known = index.load(index_path, profiles, missing_ok=True)
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
            why = gate.refusal(listed, spec.id)  # the release gate: a passing verdict in the index
            if why:
                raise PublishError(why, "nothing was promoted")
            content_hash = (listed or {}).get("content_hash") or _content_hash(src, repo, spec.tag)
            revision, held_id = src.revision_of(spec, content_hash, image_id)
            if held_id not in (None, image_id):
                raise PublishError(f"{source.ref(repo, spec.tag)} and {hash_tag(content_hash)} name different images "
                                   f"in {source.url}; run `lmi push {spec.id}` there again first")
            plan.append((Item(spec, content_hash, revision), digest, image_id, listed))
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
                    dst.oci.copy_referrers(src.oci, source.path(repo), digest, dst.address.path(repo))  # SBOM etc.
                done.append(f"{source.ref(repo, digest=digest)} -> {dst.address.ref(repo, digest=digest)}")
                entry = dict(listed) if listed else None
                if entry:
                    entry["registries"] = [registry_entry(dst.address, repo, digest)]
                    entries.append(entry)
    except (RegistryError, AuthError) as exc:
        raise PublishError(str(exc), "the index is unchanged; run the same command again to complete") from None
    if entries:
        _update_index(index_path, entries, dsts if index_artifact else [], {s.repository for s in specs}, profiles)
    return done


INDEX_TAG = "index-latest"
INDEX_MEDIA_TYPE = "application/vnd.lmi.index.v1+json"


def _index_target(address: Address) -> Target:
    """A registry to read or write the index in: only ECR needs the engine (for its login)."""
    return Target(address, engine.detect_client().path if address.kind == "ecr" else "docker")


class IndexMoved(PublishError):
    """index-latest changed between reading it and publishing over it."""


def fetch_index(address: Address, repository: str, profiles: Registry) -> dict:
    """The release index published beside the images (an empty one if none is there yet)."""
    return fetch_index_at(address, repository, profiles)[0]


def fetch_index_at(address: Address, repository: str, profiles: Registry) -> tuple[dict, str | None]:
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
        return index.checked(json.loads(blob), f"{address.url} ({repository}:{INDEX_TAG})", profiles), found[0]
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

