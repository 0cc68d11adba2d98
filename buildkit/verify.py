"""`lmi facts verify`: re-derive from the package index what buildkit/data records and can be derived
there, and report drift: every torch version of the data has manylinux x86_64 wheels, and the Pythons
that every version of a torch minor has wheels for are the data's range; every engine release the data
names exists (each profile's index_versions); the matrix's libraries and pins exist. Reads the index's
simple API (PEP 691 JSON, else PEP 503 HTML) at PIP_INDEX_URL or PyPI; nothing else is contacted.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import Version

from . import upstream
from .errors import UserError
from .facts import Facts
from .interface import Registry
from .upstream import torch_pythons

DEFAULT_INDEX = "https://pypi.org/simple"
TIMEOUT_S = 30


class IndexUnreachable(UserError):
    pass


def index_url() -> str:
    return (os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX).rstrip("/")


def fetch_files(project: str, base: str | None = None) -> list[str]:
    """File names the index lists for a project."""
    url = f"{base or index_url()}/{canonicalize_name(project)}/"
    request = urllib.request.Request(url, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1", "User-Agent": "lmi-facts-verify"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            body = response.read()
            kind = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise IndexUnreachable(f"{url}: HTTP {exc.code}; check PIP_INDEX_URL") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise IndexUnreachable(f"the package index is unreachable ({url}: {getattr(exc, 'reason', exc)}); "
                               "`lmi facts verify` needs it") from exc
    if "json" in kind:
        return [f["filename"] for f in json.loads(body)["files"]]
    return re.findall(r'<a [^>]*>([^<]+)</a>', body.decode("utf-8", "replace"))


def _released(files: list[str]) -> set[Version]:
    """Versions a project has files for (wheels and sdists)."""
    versions = set()
    for name in files:
        try:
            versions.add(parse_wheel_filename(name)[1] if name.endswith(".whl") else parse_sdist_filename(name)[1])
        except ValueError:
            continue
    return versions


def matrix_pins(m) -> list[str]:
    """name==version of every library and pip pin the matrix's images install (what `lmi facts verify` checks)."""
    return sorted({f"{name}=={version}" for image in m.images for name, version in image.libraries.items()}
                  | {pin for image in m.images for pin in image.pip})


def verify(facts: Facts, requirements: list[str], base: str | None = None) -> tuple[list[str], int]:
    """(drift lines, facts checked). `requirements` are name==version pins the matrix installs."""
    engines = {name: profile.index_versions(facts.stacks[name]) for name, profile in facts.profiles.items()}
    projects = {"torch", *(project for listed in engines.values() for project in listed),
                *(Requirement(r).name for r in requirements)}
    with ThreadPoolExecutor(max_workers=4) as pool:
        listing = dict(zip(projects, pool.map(lambda p: fetch_files(p, base), projects), strict=True))
    drift, checked = [], 0
    pythons = torch_pythons(listing["torch"])
    for minor, release in facts.torch.items():
        have = []
        for version in release.versions:
            checked += 1
            if not pythons.get(version):
                drift.append(f"torch {version}: no manylinux x86_64 wheel on the index (buildkit/data/torch.yaml)")
            else:
                have.append(pythons[version])
        if have:
            common = set.intersection(*have)
            checked += 1
            derived = (f"{min(common)[0]}.{min(common)[1]}", f"{max(common)[0]}.{max(common)[1]}") if common else None
            if derived != tuple(release.python):
                drift.append(f"torch {minor}: the data says Python {release.python[0]}-{release.python[1]}, the "
                             f"wheels of every {minor}.x cover {derived[0]}-{derived[1] if derived else 'nothing'}"
                             " (buildkit/data/torch.yaml)")
    for listed in engines.values():
        for project, (known, data) in sorted(listed.items()):
            released = _released(listing[project])
            for version in known:
                checked += 1
                if Version(version) not in released:
                    drift.append(f"{project} {version}: not on the index ({data})")
    for req in sorted(set(requirements)):
        parsed = Requirement(req)
        pinned = next(iter(parsed.specifier)).version
        checked += 1
        if Version(pinned) not in _released(listing[parsed.name]):
            drift.append(f"{parsed.name} {pinned}: not on the index (the matrix pins it)")
    return drift, checked


# --- records derived from release files (`lmi facts add`): checked against the hand-read entries, against the
# index's sha256 and, with --wheels, re-derived from the files themselves ------------------------------------

def _hand_torch(doc: dict, version: str, record: dict) -> list[tuple[str, object, object]]:
    """(fact, the data's value, the derived value) for torch.yaml's entry of one derived torch record."""
    pairs = []
    release = doc.get("releases", {}).get(version.rsplit(".", 1)[0])
    variant = record.get("variant")
    if release is not None and version in release.get("versions", ()):
        pairs.append(("pypi_variant", release.get("pypi_variant"), variant))
        listed = (release.get("variants") or {}).get(variant) or {}
        if listed.get("source") in ("archs-wheel", "derived"):
            pairs.append((f"variants.{variant}.x86_64", listed.get("x86_64"), record.get("arch_list")))
    return pairs


def _same(a: object, b: object) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return [str(x) if x is not None else None for x in a] == [str(x) if x is not None else None for x in b]
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return (str(a) if a is not None else None) == (str(b) if b is not None else None)


def verify_derived(*, profiles: Registry, wheels: bool = False, base: str | None = None, data_dir=None, cache=None,
                   today: str | None = None) -> tuple[list[str], int]:
    """(drift lines, facts checked) for the derived records of torch.yaml and the engines' files: each agrees with the
    hand-read entries it backs; its file is on the index with the recorded sha256; with `wheels`, the record
    re-derived from that file (fetched by hash, cached) is the committed one."""
    readers = upstream.readers(profiles)
    docs = {c: yaml.safe_load(upstream.data_path(c, data_dir).read_text(encoding="utf-8"))
            for c in upstream.components(profiles)}
    drift, checked = [], 0
    for component in upstream.components(profiles):
        records = docs[component].get("derived") or {}
        files = {f.filename: f for f in upstream.listing(component, base)} if records else {}
        for version, record in records.items():
            where = f"buildkit/data/{component}.yaml derived {version}"
            if component == "torch":
                pairs = _hand_torch(docs["torch"], version, record)
                for name, reader in readers.items():  # an engine's data may hold its own reading of a torch build
                    pairs += reader.torch_pairs(docs[name], record)
            else:
                pairs = readers[component].hand_pairs(docs[component], version, record)
            for fact, hand, derived in pairs:
                checked += 1
                if not _same(hand, derived):
                    drift.append(f"{component} {version} {fact}: the data says {hand}, its wheel {derived} ({where})")
            source = record.get("source") or {}
            listed = files.get(source.get("file"))
            checked += 1
            if listed is None or listed.sha256 != source.get("sha256"):
                drift.append(f"{component} {version}: {source.get('file')} with sha256 {source.get('sha256')} is not "
                             f"on the index ({'its sha256 there is ' + str(listed.sha256) if listed else 'absent'}) "
                             f"({where})")
                continue
            if not wheels:
                continue
            path = upstream.fetch(listed, cache)
            again, _ = upstream.rederive(component, path, listed, source.get("read") or today or "", profiles)
            for key in sorted(set(record) | set(again)):
                if key == "source":
                    continue
                checked += 1
                if not _same(record.get(key), again.get(key)):
                    drift.append(f"{component} {version} {key}: the record says {record.get(key)}, re-derived from "
                                 f"{listed.filename}: {again.get(key)} ({where})")
    return drift, checked
