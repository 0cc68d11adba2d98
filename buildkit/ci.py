"""What a CI pipeline asks before it fans out: which images a change touches, which are not published
yet, and what digest each base image tag points at today."""

from __future__ import annotations

import subprocess
from pathlib import Path

from . import index, publish
from .errors import UserError
from .interface import Registry
from .registry import Address, OciClient, RegistryError
from .spec import PlannedImage, content_hash


def _git(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True)


def context_at(ref: str, context_dir: Path) -> tuple[dict[str, bytes], dict[str, int]] | None:
    """The committed build context as it was at `ref` (files and modes), or None if it did not exist."""
    top = _git("rev-parse", "--show-toplevel", cwd=context_dir.parent)
    if top.returncode:
        raise UserError(f"{context_dir}: not inside a git repository; --changed-since needs one")
    root = Path(top.stdout.decode().strip())
    rel = context_dir.resolve().relative_to(root.resolve()).as_posix()
    if _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", cwd=root).returncode:
        raise UserError(f"--changed-since {ref}: no such commit here; fetch it first (e.g. fetch-depth: 0)")
    listing = _git("ls-tree", "-r", ref, "--", f"{rel}/", cwd=root).stdout.decode().splitlines()
    if not listing:
        return None
    files, modes = {}, {}
    for line in listing:
        meta, path = line.split("\t", 1)
        mode = meta.split()[0]
        name = path[len(rel) + 1:]
        files[name] = _git("show", f"{ref}:{path}", cwd=root).stdout
        modes[name] = 0o755 if mode == "100755" else 0o644
    return files, modes


def changed_since(planned: list[PlannedImage], ref: str, output: Path) -> list[PlannedImage]:
    """Images whose content hash at `ref` (its committed context, today's hashed build args and bases) differs
    from now: the images a change touches. The CI gate keeps images/ equal to a fresh render."""
    out = []
    for p in planned:
        before = context_at(ref, output / p.spec.id)
        if before is None or content_hash(before[0], p.content_args, p.content_bases, before[1]) != p.content_hash:
            out.append(p)
    return out


def unpublished(planned: list[PlannedImage], address: Address) -> list[PlannedImage]:
    """Images whose content-hash tag is not in the registry yet: a run with no change publishes nothing."""
    if address.kind == "ecr":
        from .registry import Ecr

        ecr = Ecr(address)
        held = lambda repo, tag: ecr.config_digest(address.path(repo), tag)  # noqa: E731
    else:
        oci = OciClient(address.host)
        held = lambda repo, tag: oci.config_digest(address.path(repo), tag)  # noqa: E731
    try:
        return [p for p in planned if held(p.spec.repository, p.hash_tag) is None]
    except RegistryError as exc:
        raise UserError(f"{address.url}: cannot tell what is published: {exc}") from None


def _registry_of(ref: str) -> tuple[str, str, str]:
    """(API host, repository, tag) of an image reference, Docker Hub names included."""
    name, _, tag = ref.rpartition(":") if "@" not in ref else (ref, "", "")
    if "/" in tag:  # the colon was a port's: no tag
        name, tag = ref, ""
    first = name.split("/")[0]
    if "." in first or ":" in first or first == "localhost":
        host, repo = first, name.split("/", 1)[1]
    else:
        host, repo = "registry-1.docker.io", name if "/" in name else f"library/{name}"
    return host, repo, tag or "latest"


def digest_of(ref: str) -> str:
    """The digest `ref`'s tag points at now, asked of its registry (no pull); a ref by digest is its own."""
    if "@" in ref:
        return ref.split("@", 1)[1]
    host, repo, tag = _registry_of(ref)
    try:
        found = OciClient(host, retries=2).manifest(repo, tag)
    except RegistryError as exc:
        raise UserError(f"base image {ref}: cannot resolve its digest ({exc}); set --base-mirror or drop "
                        "--pin-bases") from None
    if found is None:
        raise UserError(f"base image {ref} does not exist in its registry; check the tag or the mirror")
    return found[0]


def runner_labels(family) -> list[str]:
    """The self-hosted runner labels a family's image is built and tested on."""
    arch = family.arch.replace("x86_64", "x64").replace("aarch64", "arm64")
    return ["self-hosted", "linux", arch, *(["gpu", family.name] if family.is_gpu else ["cpu"])]


def job_matrix(planned: list[PlannedImage]) -> dict:
    """`{"include": [...]}` for a CI job matrix: per image its id, family, runner labels, tag and content hash."""
    return {"include": [{"id": p.spec.id, "family": p.spec.family.name, "gpu": p.spec.family.is_gpu,
                         "runs-on": runner_labels(p.spec.family), "tag": p.spec.tag, "content_hash": p.content_hash}
                        for p in planned]}


def merge_index(index_path: Path, fragments: list[str], fetch: list[Address], publish_to: list[Address],
                repository: str, profiles: Registry, attempts: int = 3, say=print) -> dict:
    """Merge index fragments (one per CI job) into `index_path`, starting from what `fetch` publishes, and
    publish the result. Read, merge and replace happen under the index's lock, and the publish is a
    compare-and-swap on what was fetched: an index that moved meanwhile is merged in again, never dropped."""
    for attempt in range(1, attempts + 1):
        read_at: dict[str, str | None] = {}
        with index.locked(index_path):
            merged = index.load(index_path, profiles, missing_ok=True)
            for address in fetch:
                published, read_at[address.url] = publish.fetch_index_at(address, repository, profiles)
                merged = index.merge(merged, published["images"], profiles, address.url)
            for fragment in fragments:
                merged = index.merge(merged, index.load(fragment, profiles)["images"], profiles, str(fragment))
            index.write(index_path, merged, profiles)
            try:
                publish.publish_index(index_path, publish_to, repository, read_at)
                return merged
            except publish.IndexMoved as moved:
                if attempt == attempts:
                    raise
                say(f"{moved}; merging again ({attempt}/{attempts})")
    raise AssertionError("unreachable")
