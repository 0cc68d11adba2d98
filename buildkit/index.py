"""The release index: which URI to pull for which instance family, engine and versions.

`images.json` (schema-versioned) lists every published image: its family, engine (the profile's name),
components (the engine's versions under their matrix keys, then torch, CUDA, Python, OS and libraries),
all tags, the digest, digest-pinned URIs per registry and region, content hash, build time and smoke
result. It is written atomically, and only after every push of a run succeeded. `AVAILABLE_IMAGES.md` is
generated beside it. `lmi uri` and `buildkit.image_uri()` answer from it.

Schema 2 added `engine`. A schema-1 index (written before engines were profiles) is read as schema 2: its
entries are the default profile's, with their component keys renamed by that profile's INDEX_LEGACY.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from . import fsutil, versions
from .errors import UserError
from .interface import Registry
from .spec import is_alias

SCHEMA = 2
READS = (1, 2)  # the schemas `load` reads (older ones upgraded on read: `upgrade`)
DEFAULT_INDEX = Path("images.json")


def empty() -> dict:
    return {"schema": SCHEMA, "generated": None, "images": []}


DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# Per entry: the digests of its SBOM and provenance (OCI referrers of its image) and the release gate's verdict.
SUPPLY_CHAIN = ("sbom", "provenance", "gate")


def load(location: str | Path, profiles: Registry, missing_ok: bool = False) -> dict:
    """An index from a path or a URL (http, https, file), validated. A local path that does not exist is
    an error (a mistyped --index must not read as an empty index) unless the caller creates it."""
    text = str(location)
    try:
        if "://" in text:
            with urllib.request.urlopen(text, timeout=30) as resp:
                data = json.loads(resp.read())
        else:
            path = Path(text)
            if not path.exists():
                if missing_ok:
                    return empty()
                raise UserError(f"{text}: no release index there; check --index (lmi push and lmi index merge "
                                "create one)")
            data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{text}: cannot read the release index ({exc}); pass a valid --index") from exc
    return checked(data, text, profiles)


def checked(data: object, source: str, profiles: Registry) -> dict:
    """`data` as a valid release index of the current schema (an older schema upgraded), or a UserError."""
    if not isinstance(data, dict) or data.get("schema") not in READS:
        got = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{source}: not a release index of schema {'/'.join(map(str, READS))} (got "
                        f"{str(got)[:40]!r}); upgrade lmi or point --index at an index it wrote")
    validate(data, source)
    return {**data, "schema": SCHEMA, "images": [upgrade(e, profiles) for e in data["images"]]}


def upgrade(entry: dict, profiles: Registry) -> dict:
    """A schema-1 entry (no `engine`) as schema 2: the default profile's image, its components renamed."""
    if "engine" in entry:
        return entry
    legacy = profiles.get(profiles.default).INDEX_LEGACY
    return {**entry, "engine": profiles.default,
            "components": {legacy.get(k, k): v for k, v in (entry.get("components") or {}).items()}}


def validate(data: dict, source: str) -> None:
    """Every digest is sha256:<64 hex>, and every URI pins its entry's digest."""
    images = data.get("images")
    if not isinstance(images, list):
        raise UserError(f"{source}: 'images' is not a list; not a release index lmi wrote")
    for i, entry in enumerate(images):
        digest = entry.get("digest") if isinstance(entry, dict) else None
        if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
            raise UserError(f"{source}: image {i + 1} has digest {str(digest)[:80]!r}, not sha256:<64 hex>; "
                            "the index is damaged or was not written by lmi")
        for key in ("sbom", "provenance"):
            if entry.get(key) is not None and not DIGEST.fullmatch(str(entry[key])):
                raise UserError(f"{source}: image {entry.get('id')} has {key} {str(entry[key])[:80]!r}, not "
                                "sha256:<64 hex>; the index is damaged or was not written by lmi")
        for reg in entry.get("registries") or []:
            uri = reg.get("uri", "") if isinstance(reg, dict) else ""
            if not uri.endswith("@" + digest):
                raise UserError(f"{source}: image {entry.get('id')} lists URI {uri[:120]!r}, which does not pin "
                                f"its digest {digest}")


def merge(index: dict, entries: list[dict], profiles: Registry, source: str = "the new entries") -> dict:
    """Add entries; an image already listed (same id and digest) gains the new URIs and tags. An immutable
    tag that would name two digests is refused, naming both."""
    validate({"images": list(entries)}, source)
    entries = [upgrade(e, profiles) for e in entries]
    images = [dict(upgrade(e, profiles)) for e in index.get("images", [])]
    owner = {(e["repository"] if "repository" in e else e["id"], t): e for e in images for t in e.get("tags", [])
             if not is_alias(t)}
    for new in entries:
        for tag in new.get("tags", []):
            held = owner.get((new["repository"] if "repository" in new else new["id"], tag))
            if held is not None and held["digest"] != new["digest"]:
                raise UserError(f"immutable tag {tag} would name two images: {held['digest']} (in the index) and "
                                f"{new['digest']} (from {source}); an immutable tag is never moved")
    for new in entries:
        old = next((e for e in images if e["id"] == new["id"] and e["digest"] == new["digest"]), None)
        if old is None:
            images.append(new)
            continue
        old["registries"] = _union(old["registries"], new["registries"], key=lambda r: r["url"])
        old["tags"] = sorted(set(old["tags"]) | set(new["tags"]))
        old.update({k: new[k] for k in SUPPLY_CHAIN if new.get(k) is not None})  # the newer SBOM/verdict wins
    images.sort(key=lambda e: (e["family"], _newness(e, profiles)), reverse=False)
    return {"schema": SCHEMA, "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "images": images}


def _union(a: list, b: list, key) -> list:
    seen = {key(x): x for x in a}
    for x in b:
        seen[key(x)] = x
    return sorted(seen.values(), key=key)


def write(path: Path, index: dict, profiles: Registry) -> None:
    """Atomically: a reader sees the old index or the new one, never half of one. The file keeps its mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, text in ((path, json.dumps(index, indent=2, sort_keys=True) + "\n"),
                         (path.with_name("AVAILABLE_IMAGES.md"), markdown(index, profiles))):
        fsutil.replace_text(target, text)


@contextlib.contextmanager
def locked(path: Path):
    """One writer at a time: an exclusive lock on <index>.lock, held across read-merge-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def update(path: Path, entries: list[dict], profiles: Registry, source: str = "the new entries") -> dict:
    """Merge entries into the index at path under the lock, re-reading it there, then replace it."""
    with locked(path):
        merged = merge(load(path, profiles, missing_ok=True), entries, profiles, source)
        write(path, merged, profiles)
    return merged


def _engine_keys(entry: dict, profiles: Registry) -> tuple[str, ...]:
    """The entry's engine components, in the profile's order (none for an engine this lmi does not know)."""
    profile = profiles.by_name.get(entry.get("engine") or "")
    return profile.COMPONENTS if profile else ()


def _newness(entry: dict, profiles: Registry) -> tuple:
    c = entry["components"]
    return (entry.get("engine") or "", *(versions.key(c.get(k) or "0") for k in _engine_keys(entry, profiles)),
            versions.key(c["torch"]), versions.key(c.get("cuda") or "0"), entry.get("revision") or 0,
            entry.get("built") or "")


def _matches(have: str | None, want: str | None) -> bool:
    """'0.27' matches 0.27.0; '12.1' matches 12.1.1; an exact version matches itself."""
    if want is None:
        return True
    if have is None:
        return False
    return have == want or have.startswith(want + ".")


FILTERS = ("torch", "cuda")  # the core's components `lmi uri` filters on, beside every profile's (component_keys)


def lookup(index: dict, profiles: Registry, instance: str, region: str | None = None, registry: str | None = None,
           revision: int | None = None, engine: str | None = None, asked: str | None = None,
           **wanted: str | None) -> tuple[dict, dict]:
    """The newest image for `instance` of `engine` (any, if None) matching every version given (components by
    their matrix keys, torch, cuda; and the revision, if given: the component tuple's N-th publish, its
    <tag>-r<N>), and its registry entry. Where images of several engines fit and no engine was asked for,
    the default profile's answer (as every image was its before there were profiles). `asked` is what the
    user named, for messages (ml.g5.12xlarge for the family g5)."""
    known_keys = (*profiles.component_keys(), *FILTERS)
    for key in wanted:
        if key not in known_keys:
            raise UserError(f"unknown component {key!r}; filter on one of {', '.join(known_keys)}")
    if engine is not None and engine not in profiles:
        raise UserError(f"unknown engine {engine!r}; {versions.did_you_mean(engine, sorted(profiles))}")
    family = [e for e in index.get("images", []) if e["family"] == instance]
    if not family:
        known = sorted({e["family"] for e in index.get("images", [])})
        what = f"'{asked}' (family {instance})" if asked and asked != instance else f"instance family '{instance}'"
        raise UserError(f"no image for {what} in the index; it has: {', '.join(known) or 'nothing yet'}")
    fits = [e for e in family if all(_matches(e["components"].get(k), v) for k, v in wanted.items())
            and (engine is None or e.get("engine") == engine) and (revision is None or e.get("revision") == revision)]
    if not fits:
        have = "; ".join(sorted({_describe(e, profiles) for e in family}))
        asked = [f"{k} {v}" for k, v in (("engine", engine), *wanted.items()) if v]
        asked = ", ".join(asked + ([f"revision {revision}"] if revision else []))
        raise UserError(f"no {instance} image with {asked}; {instance} has: {have}")
    if len({e.get("engine") for e in fits}) > 1:
        if not any(e.get("engine") == profiles.default for e in fits):
            raise UserError(f"{instance} has images of engines {', '.join(engines(fits, profiles))}; "
                            "choose one with --engine")
        fits = [e for e in fits if e.get("engine") == profiles.default]
    for entry in sorted(fits, key=lambda e: _newness(e, profiles), reverse=True):
        regs = [r for r in entry["registries"] if (region is None or r.get("region") == region)
                and (registry is None or r["url"] == registry)]
        if regs:
            return entry, regs[0]
    where = sorted({r.get("region") or r["url"] for e in fits for r in e["registries"]})
    newest = max(fits, key=lambda e: _newness(e, profiles))
    raise UserError(f"{instance} image {_describe(newest, profiles)} is not published "
                    f"{'in region ' + region if region else 'to ' + str(registry)}; it is in: {', '.join(where)}")


def answer(index: dict, profiles: Registry, instance, *, region: str | None, registry: str | None,
           revision: int | None, engine: str | None, **wanted: str | None) -> tuple[dict, dict, list[str]]:
    """`lmi uri`: (entry, its registry entry, the family's other engines worth a note: where no engine and no
    component was asked for and the family has images of other engines)."""
    entry, reg = lookup(index, profiles, instance.family, region=region, registry=registry, revision=revision,
                        engine=engine, asked=instance.name, **wanted)
    chose = engine or any(wanted.get(k) for k in profiles.component_keys())
    others = [e for e in engines([i for i in index["images"] if i["family"] == instance.family], profiles)
              if e != entry["engine"]]
    return entry, reg, [] if chose else others


def uri_json(entry: dict, reg: dict, size: dict | None) -> dict:
    """`lmi uri --json`."""
    return {"uri": reg["uri"], "registry": reg["url"], "region": reg.get("region"), "id": entry["id"],
            "engine": entry["engine"], "tag": entry["tag"], "revision": entry.get("revision"),
            "host": entry.get("host"), "digest": entry["digest"], "components": entry["components"],
            "sbom": entry.get("sbom"), "provenance": entry.get("provenance"), "gate": entry.get("gate"),
            **({"instance": size} if size else {})}


def published(index: dict, spec_id: str, url: str, source: str) -> dict:
    """The newest entry of image `spec_id` published in registry `url` (`lmi sbom`), else a UserError."""
    listed = [e for e in index["images"]
              if e["id"] == spec_id and any(r["url"] == url for r in e.get("registries", []))]
    if not listed:
        raise UserError(f"{spec_id}: the index {source} lists no image of it in {url}; check --index and --registry, "
                        "or use --local for the image in the engine")
    return max(listed, key=lambda e: e.get("built") or "")


def instance_facts(instance) -> dict | None:
    """What `lmi uri` says of an instance size (a facts.InstanceType): its GPUs and the tensor_parallel_degree
    that uses them all (LMI's `max`), or None for a bare family or a CPU one."""
    fam = instance.facts
    if not instance.size or fam is None or not fam.is_gpu:
        return None
    return {"type": instance.name, "family": instance.family, "gpus": instance.gpus, "gpu": fam.gpu_model or fam.gpu,
            "gpu_memory_gb": fam.gpu_memory_gb, "gpu_memory_mib": fam.gpu_memory_mib,
            "tensor_parallel_degree": instance.tensor_parallel_degree}


def engines(entries: list[dict], profiles: Registry) -> list[str]:
    """The engines of these entries, the default profile's first."""
    return sorted({e.get("engine") or "" for e in entries}, key=lambda n: (n != profiles.default, n))


def _versions(entry: dict, profiles: Registry, titles: bool = False) -> str:
    """The entry's engine versions, `<key> <version>` by matrix key in the profile's order (by title for people)."""
    profile, c = profiles.by_name.get(entry.get("engine") or ""), entry["components"]
    name = (lambda k: profile.TITLES.get(k, k)) if titles and profile else (lambda k: k)
    return ", ".join(f"{name(k)} {c.get(k) or '?'}" for k in _engine_keys(entry, profiles))


def _describe(entry: dict, profiles: Registry) -> str:
    c = entry["components"]
    revision = f", revision {entry['revision']}" if entry.get("revision") else ""
    return (f"{_versions(entry, profiles)} (engine {entry.get('engine')}, torch {c['torch']}, "
            f"cuda {c.get('cuda') or 'none'}{revision})")


def markdown(index: dict, profiles: Registry) -> str:
    lines = ["# Available images", "",
             "Generated from the release index (`images.json`) by lmi; do not edit. Pull by digest:", "",
             "| family | GPU | engine | versions | torch | CUDA | Python | OS | tag | URI |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in sorted(index.get("images", []), key=lambda e: (e["family"], _newness(e, profiles)), reverse=True):
        c = e["components"]
        for reg in e["registries"]:
            lines.append(f"| {e['family']} | {e.get('gpu') or '-'} | {e.get('engine')} | "
                         f"{_versions(e, profiles, titles=True)} | {c['torch']} | {c.get('cuda') or '-'} | "
                         f"{c['python']} | {c['os']} | `{e['tag']}` | `{reg['uri']}` |")
    return "\n".join(lines) + "\n"


def image_uri(profiles: Registry, instance: str, region: str | None = None, *, engine: str | None = None,
              torch: str | None = None, cuda: str | None = None, index: str | Path = DEFAULT_INDEX,
              **components: str | None) -> str:
    """The digest-pinned URI of the newest image for an instance family (the Python face of `lmi uri`):
    of `engine` (any, if None) and with the given versions (components by their matrix keys)."""
    entry, reg = lookup(load(index, profiles), profiles, instance, region=region, engine=engine, torch=torch, cuda=cuda,
                        **components)
    return reg["uri"]
