"""What a CI pipeline asks before it fans out: which images a change touches, which are not published
yet, and what digest each base image tag points at today."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .errors import UserError
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
    """Images whose content hash at `ref` (its committed context, today's build args and bases) differs
    from now: the images a change touches. The CI gate keeps images/ equal to a fresh render."""
    out = []
    for p in planned:
        before = context_at(ref, output / p.spec.id)
        if before is None or content_hash(before[0], p.build_args, p.spec.bases, before[1]) != p.content_hash:
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
    first = name.split("/")[0]
    if "." in first or ":" in first or first == "localhost":
        host, repo = first, name.split("/", 1)[1]
    else:
        host, repo = "registry-1.docker.io", name if "/" in name else f"library/{name}"
    return host, repo, tag or "latest"


def pin(ref: str) -> str:
    """`ref` pinned to the digest its tag points at now, asked of its registry (no pull)."""
    if "@" in ref:
        return ref
    host, repo, tag = _registry_of(ref)
    try:
        found = OciClient(host, retries=2).manifest(repo, tag)
    except RegistryError as exc:
        raise UserError(f"base image {ref}: cannot resolve its digest ({exc}); set --base-mirror or drop "
                        "--pin-bases") from None
    if found is None:
        raise UserError(f"base image {ref} does not exist in its registry; check the tag or the mirror")
    return f"{ref.rsplit(':', 1)[0]}@{found[0]}"
