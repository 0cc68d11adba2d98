"""`lmi facts add` and `lmi facts upstream`: a release on the package index becomes facts in buildkit/data.

The release's files come from the index the locks use (LMI_PIP_INDEX_URL, else PIP_INDEX_URL, else PyPI; the
host's CA bundle as `lmi lock` hands it to uv), are checked against the sha256 the index lists (a file the
index gives no sha256 for is refused) and kept in a cache by hash (.lmi/upstream/), so a second read does not
download again and a partial download is never used. The facts are read from the files themselves by
buildkit/wheelfacts.py and written as `derived:` records at the end of the data file (the file, its sha256
and the date with each), apart from the hand-read entries and observations; a release new to the toolkit
also gets its `releases:` entry, from the derived record only. What the files do not state is said and left
out, never guessed. `lmi facts verify --wheels` re-derives every record from the same files.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from packaging.tags import Tag
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from . import versions, wheelfacts
from .errors import UserError
from .facts import DATA_DIR
from .interface import Registry

DEFAULT_INDEX = "https://pypi.org/simple"
CACHE_DIR = Path(__file__).resolve().parent.parent / ".lmi" / "upstream"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
TIMEOUT_S = 60
PYTHON = "3.12"  # the interpreter whose wheel is read when a release has one per CPython (torch)
DERIVED_MARK = "# --- derived records"
READER = "buildkit/wheelfacts.py (pyelftools for ELF, the .nv_fatbin entry headers parsed in Python)"
TORCH_ARCH_FLAGS = rb"(?<![\w.])(?:sm|compute)_\d{2,3}[af]?(?: (?:sm|compute)_\d{2,3}[af]?){2,}(?![\w.])"


class UpstreamError(UserError):
    pass


# --- the package index -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IndexFile:
    filename: str
    url: str
    sha256: str | None
    size: int | None = None


def index_url() -> str:
    return (os.environ.get("LMI_PIP_INDEX_URL") or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX).rstrip("/")


def _public(url: str) -> str:
    """The URL without credentials, for messages."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def _open(url: str, accept: str = "*/*"):
    parts = urllib.parse.urlsplit(url)
    headers = {"Accept": accept, "User-Agent": "lmi-facts-add"}
    if parts.username:  # credentials go in a header, never in what is printed
        token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(token.encode()).decode()
        url = _public(url)
    ca = os.environ.get("SSL_CERT_FILE") or os.environ.get("PIP_CERT") or str(CA_BUNDLE)
    context = ssl.create_default_context(cafile=ca if Path(ca).is_file() else None)
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S,
                                      context=context if url.startswith("https:") else None)
    except urllib.error.HTTPError as exc:
        raise UpstreamError(f"{_public(url)}: HTTP {exc.code}; check the package index (LMI_PIP_INDEX_URL)") from exc
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        raise UpstreamError(f"the package index is unreachable ({_public(url)}: {why})") from exc


def listing(project: str, base: str | None = None) -> list[IndexFile]:
    """The files the index lists for a project, with their sha256 (PEP 691 JSON, else PEP 503 HTML)."""
    base = (base or index_url()).rstrip("/")
    page = f"{base}/{canonicalize_name(project)}/"
    with _open(page, "application/vnd.pypi.simple.v1+json, text/html;q=0.1") as response:
        body, kind = response.read(), response.headers.get("Content-Type", "")
    if "json" in kind:
        return [IndexFile(f["filename"], urllib.parse.urljoin(page, f["url"]), f.get("hashes", {}).get("sha256"),
                          f.get("size")) for f in json.loads(body)["files"]]
    files = []
    for href, name in re.findall(r'<a [^>]*href="([^"]+)"[^>]*>([^<]+)</a>', body.decode("utf-8", "replace")):
        url, _, fragment = href.replace("&amp;", "&").partition("#")
        digest = fragment.split("=", 1)[1] if fragment.startswith("sha256=") else None
        files.append(IndexFile(name.strip(), urllib.parse.urljoin(page, url), digest))
    return files


def released(files: list[IndexFile]) -> list[Version]:
    """Final releases with files on the index, oldest first (pre-releases and dev builds aside)."""
    found = set()
    for f in files:
        try:
            version = (parse_wheel_filename(f.filename)[1] if f.filename.endswith(".whl")
                       else parse_sdist_filename(f.filename)[1])
        except (ValueError, InvalidVersion):
            continue
        if not version.is_prerelease and not version.is_devrelease:
            found.add(version)
    return sorted(found)


def torch_pythons(files: list[str]) -> dict[str, set[tuple[int, int]]]:
    """torch version -> the CPython versions it has manylinux x86_64 wheels for (free-threaded ones aside)."""
    found: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for name in files:
        if not name.endswith(".whl"):
            continue
        try:
            _, version, _, tags = parse_wheel_filename(name)
        except ValueError:
            continue
        for tag in tags:
            match = re.fullmatch(r"cp3(\d+)", tag.interpreter)
            if match and tag.abi == tag.interpreter and "manylinux" in tag.platform and "x86_64" in tag.platform:
                found[version.base_version].add((3, int(match.group(1))))
    return found


def pick_wheel(files: list[IndexFile], project: str, version: str, python: str = PYTHON) -> IndexFile:
    """The Linux x86_64 wheel of a release that a CPython `python` installs (abi3 or its own cpXY)."""
    cp = "cp" + python.replace(".", "")
    fits = []
    for f in files:
        if not f.filename.endswith(".whl"):
            continue
        try:
            name, ver, _, tags = parse_wheel_filename(f.filename)
        except (ValueError, InvalidVersion):
            continue
        if name != canonicalize_name(project) or ver != Version(version):
            continue
        for tag in tags:
            if _linux_x86_64(tag) and (tag.interpreter == cp and tag.abi == cp
                                       or tag.abi == "abi3" and _cp(tag.interpreter) <= _cp(cp)
                                       or tag.abi == "none" and tag.interpreter in ("py3", cp)):
                fits.append(f)
                break
    if not fits:
        raise UpstreamError(f"{project} {version}: the index has no Linux x86_64 wheel for Python {python}; "
                            "check the version (`lmi facts upstream` lists what is new)")
    return sorted(fits, key=lambda f: f.filename)[0]


def _cp(interpreter: str) -> tuple[int, ...]:
    """'cp38' -> (3, 8), 'cp312' -> (3, 12); anything else sorts last."""
    match = re.fullmatch(r"cp3(\d+)", interpreter)
    return (3, int(match.group(1))) if match else (99,)


def _linux_x86_64(tag: Tag) -> bool:
    return tag.platform.endswith("x86_64") and tag.platform.startswith("manylinux")


def fetch(file: IndexFile, cache: Path | None = None) -> Path:
    """The file, from the cache when its sha256 matches, else downloaded and checked; never a partial one."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", file.filename):
        raise UpstreamError(f"the index names a file {file.filename!r}: not a plain file name; refusing it")
    if not file.sha256 or not re.fullmatch(r"[0-9a-f]{64}", file.sha256):
        raise UpstreamError(f"{file.filename}: the index lists no sha256 for it; refusing a file it cannot check")
    folder = (cache or CACHE_DIR) / file.sha256[:2] / file.sha256
    target = folder / file.filename
    if target.is_file() and _sha256(target) == file.sha256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    with _open(file.url) as response, part.open("wb") as out:
        while chunk := response.read(1 << 22):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != file.sha256:
        part.unlink()
        raise UpstreamError(f"{file.filename}: its sha256 is {digest.hexdigest()}, the index says {file.sha256}; "
                            "nothing was kept")
    part.replace(target)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# --- reading the facts ---------------------------------------------------------------------------------------

def _source(file: IndexFile, path: Path, today: str) -> dict:
    return {"file": file.filename, "sha256": file.sha256, "bytes": path.stat().st_size, "read": today}


def derive_torch(path: Path, source: dict) -> tuple[dict, list[str]]:
    """A torch wheel's record, and what could not be read."""
    flags_lib = "torch/lib/libtorch_python.so"
    wheel = wheelfacts.read_wheel(path, texts=("torch/version.py",), libraries=r"^torch/lib/[^/]+\.so(\.\d+)*$",
                                  pattern={flags_lib: TORCH_ARCH_FLAGS})
    unread: list[str] = []
    constants = wheelfacts.module_constants(wheel.texts.get("torch/version.py", ""))
    record: dict = {"source": source, "local_version": constants.get("__version__")}
    cuda = constants.get("cuda")
    if constants.get("__version__") is None:
        unread.append("local_version: torch/version.py has no __version__")
    record["variant"] = ("cu" + cuda.replace(".", "")) if cuda else ("cpu" if "cuda" in constants else None)
    if record["variant"] is None:
        unread.append("variant: torch/version.py names no cuda")
    record["requires_python"] = wheel.requires_python
    try:
        record["python"] = wheelfacts.python_range(wheel.requires_python)
    except wheelfacts.Unreadable as exc:
        unread.append(f"python: {exc}")
    majors = wheel.cuda_majors()
    if cuda:
        if len(majors) == 1:
            record["cuda_major"] = majors.pop()
        else:
            unread.append(f"cuda_major: torch/lib links {sorted(majors) or 'no'} libcudart.so.N")
    record["requires"] = wheel.pinned_requirements()
    lib = wheel.libraries.get(flags_lib)
    matches = lib.rodata_matches if lib else ()
    if cuda and len(matches) == 1:
        record["arch_list"] = wheelfacts.arch_list_text(matches[0])
        words = matches[0].split()
        listed = {wheelfacts.arch_list_text(w) for w in words if w.startswith("sm_")}
        cubins = {sm for lib_ in wheel.libraries.values() for sm in lib_.cubins}
        ptx = {sm for lib_ in wheel.libraries.values() for sm in lib_.ptx}
        missing = sorted(listed - cubins, key=wheelfacts.sm_key)
        missing += [f"{w} (PTX)" for w in words if w.startswith("compute_")
                    and wheelfacts.arch_list_text(w).partition("+")[0] not in ptx]
        if missing:
            unread.append(f"arch_list: {flags_lib} lists {', '.join(missing)}, which no library of the wheel has")
        record["extra_cubins"] = ";".join(sorted(cubins - listed, key=wheelfacts.sm_key))
    elif cuda:
        unread.append(f"arch_list: {flags_lib} holds {len(matches)} arch-flags strings, not one "
                      f"({'; '.join(matches) or 'none'})")
    if unread:
        record["unread"] = unread
    return record, unread


def readers(profiles: Registry) -> dict[str, Any]:
    """component -> the module that reads its wheels: a profile's <profile>_facts module, as the registry lists
    them (buildkit/profiles); torch is read here."""
    return dict(profiles.readers)


def components(profiles: Registry) -> tuple[str, ...]:
    return ("torch", *readers(profiles))


def rederive(component: str, path: Path, file: IndexFile, today: str, profiles: Registry) -> tuple[dict, list[str]]:
    source = _source(file, path, today)
    return derive_torch(path, source) if component == "torch" else readers(profiles)[component].derive(path, source)


def derive(component: str, version: str, *, profiles: Registry, base: str | None = None, cache: Path | None = None,
           today: str | None = None) -> tuple[dict, list[str]]:
    if component not in components(profiles):
        raise UpstreamError(f"`lmi facts add` reads the wheels of {', '.join(components(profiles))}, not '{component}' "
                            "(a component shipped as an sdist has its facts read from its sources: docs/matrix.md)")
    try:
        Version(version)
    except InvalidVersion as exc:
        raise UpstreamError(f"'{version}' is not a version (e.g. 0.32.0)") from exc
    file = pick_wheel(listing(component, base), component, version)
    path = fetch(file, cache)
    return rederive(component, path, file, today or datetime.date.today().isoformat(), profiles)


# --- writing the data files ----------------------------------------------------------------------------------

DERIVED_HEADER = f"""{DERIVED_MARK} (written by `lmi facts add`, re-derived by `lmi facts verify --wheels`; edit nothing
# below by hand). Each is read from one wheel of the package index, named with its sha256, size and read date, by
# {READER};
# `unread` says what the files did not state.
"""


class _Dumper(yaml.SafeDumper):
    """Strings that start with a digit ("2.14", "13", "7.5;8.0") in double quotes, as the hand-written data."""


_Dumper.add_representer(str, lambda dumper, data: dumper.represent_scalar(
    "tag:yaml.org,2002:str", data, style='"' if data[:1].isdigit() else None))


def _scalar(value: object) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=all(_scalar(v) for v in data)))
_Dumper.add_representer(dict, lambda dumper, data: dumper.represent_mapping(
    "tag:yaml.org,2002:map", data.items(), flow_style=len(data) <= 3 and all(_scalar(v) for v in data.values())))


def _dump(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=110, allow_unicode=True)


def data_path(component: str, data_dir: Path | None = None) -> Path:
    return (data_dir or DATA_DIR) / f"{component}.yaml"


def derived_records(text: str) -> dict:
    if DERIVED_MARK not in text:
        return {}
    return (yaml.safe_load(text[text.index(DERIVED_MARK):]) or {}).get("derived") or {}


def with_derived(text: str, records: dict) -> str:
    """The file's text with its derived block (always last) replaced; nothing above it changes."""
    head = text[:text.index(DERIVED_MARK)] if DERIVED_MARK in text else text.rstrip("\n") + "\n\n"
    body = _dump({"derived": dict(sorted(records.items(), key=lambda kv: Version(kv[0])))})
    return head + DERIVED_HEADER + body


def insert_entry(text: str, section: str, key: str, entry: dict, comment: str) -> str:
    """Add `key:` with `entry` at the end of the top-level mapping `section`, keeping every other line."""
    lines = text.splitlines(keepends=True)
    try:
        start = lines.index(f"{section}:\n")
    except ValueError as exc:
        raise UpstreamError(f"the data file has no top-level '{section}:'") from exc
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " #"):
        end += 1
    while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].startswith("#")):
        end -= 1  # comments at column 0 before the next section belong to it
    dumped = _dump({key: entry})
    block = "".join(f"  # {line}\n" for line in comment.splitlines()) + "".join("  " + line for line in
                                                                                 dumped.splitlines(keepends=True))
    return "".join(lines[:end] + [block] + lines[end:])


def torch_release(version: str, record: dict, pythons: set[tuple[int, int]]) -> tuple[dict | None, list[str]]:
    missing = [k for k in ("variant", "arch_list") if not record.get(k)]
    if not pythons:
        missing.append("python (the index lists no manylinux x86_64 cpXY wheel)")
    if missing:
        return None, missing
    lo, hi = min(pythons), max(pythons)
    return {"versions": [version], "python": [f"{lo[0]}.{lo[1]}", f"{hi[0]}.{hi[1]}"],
            "pypi_variant": record["variant"],
            "variants": {record["variant"]: {"x86_64": record["arch_list"], "source": "derived"}}}, []


@dataclass
class Added:
    component: str
    version: str
    record: dict
    unread: list[str]
    release_written: bool
    release_missing: list[str]
    path: Path


def add(component: str, version: str, *, profiles: Registry, base: str | None = None, cache: Path | None = None,
        data_dir: Path | None = None, today: str | None = None) -> Added:
    """Derive a release's record and write it (and, for a release new to the data, its `releases:` entry)."""
    record, unread = derive(component, version, profiles=profiles, base=base, cache=cache, today=today)
    path = data_path(component, data_dir)
    text = path.read_text(encoding="utf-8")
    records = derived_records(text)
    records[version] = record
    doc = yaml.safe_load(text)
    written, missing = False, []
    if component != "torch":
        torch_records = derived_records(data_path("torch", data_dir).read_text(encoding="utf-8"))
        if version not in doc.get("releases", {}):
            entry, missing = readers(profiles)[component].release_entry(version, record, torch_records)
            if entry:
                text = insert_entry(text, "releases", version, entry,
                                    f"{component} {version}: written by `lmi facts add` from the derived record below")
                written = True
    else:
        minor = versions.minor(version)
        release = doc.get("releases", {}).get(minor)
        if release is None:
            pythons = torch_pythons([f.filename for f in listing("torch", base)]).get(version, set())
            entry, missing = torch_release(version, record, pythons)
            if entry:
                text = insert_entry(text, "releases", minor, entry,
                                    f"torch {minor}: written by `lmi facts add` from the derived record of {version}")
                written = True
        elif version not in release["versions"]:
            missing = [f"torch {minor} is in the data without {version}: add it to its versions by hand"]
    path.write_text(with_derived(text, records), encoding="utf-8")
    return Added(component, version, record, unread, written, missing, path)


# --- new releases (the scheduled workflow) -------------------------------------------------------------------

def known(component: str, data_dir: Path | None = None) -> list[Version]:
    doc = yaml.safe_load(data_path(component, data_dir).read_text(encoding="utf-8"))
    if component == "torch":
        return sorted(Version(v) for r in doc["releases"].values() for v in r["versions"])
    return sorted(Version(v) for v in doc["releases"])


def new_releases(component: str, *, base: str | None = None, data_dir: Path | None = None) -> list[str]:
    """Releases on the index newer than the newest the data knows (final releases only)."""
    newest = max(known(component, data_dir))
    return [str(v) for v in released(listing(component, base)) if v > newest]


def matrix_line(matrix_text: str, component: str, version: str, entry: dict, profiles: Registry) -> tuple[str, str]:
    """The matrix with a new line for an engine release: a copy of the engine's last line with the versions
    the release sets (its reader's line_versions), the copy's excludes dropped (the rules decide again)."""
    reader = readers(profiles)[component]
    doc = yaml.safe_load(matrix_text)
    lines = doc.get("lines") or {}
    model = next((n for n in reversed(list(lines)) if lines[n].get("engine") == reader.ENGINE), None)
    if model is None:
        raise UpstreamError(f"the matrix has no {reader.ENGINE} line to model a new one on")
    name = reader.ENGINE + ".".join(version.split(".")[:2])
    if name in lines:
        name = reader.ENGINE + version
    if name in lines:
        raise UpstreamError(f"the matrix has a line '{name}' already")
    line = dict(lines[model])
    line.update(reader.line_versions(version, entry))
    lo, hi = entry["python"]
    if not versions.in_range(line["python"], (lo, hi)):
        line["python"] = lo
    line.pop("exclude", None)
    block = _dump({name: line})
    text = matrix_text.rstrip("\n") + "\n\n" + f"  # {component} {version}, added by `lmi facts upstream` " \
        f"(a copy of {model} with the versions the release pins)\n" + \
        "".join("  " + row for row in block.splitlines(keepends=True))
    return text, name


def refused_families(matrix_path: Path, line: str, profiles: Registry) -> dict[str, str]:
    """family -> the rules' reasons, for the families of `line` the rules refuse (facts as now on disk)."""
    from . import facts as facts_mod
    from . import matrix as matrix_mod
    from . import rules

    facts_mod.load.cache_clear()
    f = facts_mod.load(profiles)
    m = matrix_mod.load(matrix_path, f)
    out = {}
    for image in m.images:
        if image.line != line:
            continue
        verdict = rules.evaluate(image.combo, f)
        if verdict.errors:
            out[image.family] = "; ".join(e.message for e in verdict.errors)
    return out


def with_excludes(matrix_text: str, line: str, refused: dict[str, str]) -> str:
    """Append an `exclude:` with the rules' reasons to the line `line` (the last block of the file)."""
    if not refused:
        return matrix_text
    block = yaml.dump({"exclude": refused}, Dumper=_Dumper, sort_keys=False, width=200)
    return matrix_text.rstrip("\n") + "\n" + "".join("    " + row for row in block.splitlines(keepends=True))


def run(*, profiles: Registry, base: str | None = None, data_dir: Path | None = None,
        matrix_path: Path | None = None, cache: Path | None = None, today: str | None = None) -> list[str]:
    """The scheduled job: new torch and engine releases on the index become derived records and release entries;
    each engine release whose entry could be written becomes a matrix line (its refused families excluded with
    the rules' reasons). Returns one line per thing done or not done; locking and rendering come after."""
    report: list[str] = []
    news = {component: new_releases(component, base=base, data_dir=data_dir) for component in components(profiles)}
    again = {"profiles": profiles, "base": base, "cache": cache, "data_dir": data_dir, "today": today}
    for version in sorted(news["torch"], key=Version):
        report.append(said(add("torch", version, **again)))
    for component in components(profiles)[1:]:
        for version in news[component]:
            added = add(component, version, **again)
            pin = added.record.get("pins", {}).get("torch")
            if not added.release_written and pin and any(f"facts add torch {pin}" in m for m in added.release_missing):
                # the torch it pins is older than the newest known and not in the data yet: read it, then again
                report.append(said(add("torch", pin, **again)))
                added = add(component, version, **again)
            report.append(said(added))
            if not added.release_written or matrix_path is None:
                continue
            entry = yaml.safe_load(added.path.read_text(encoding="utf-8"))["releases"][version]
            text, line = matrix_line(matrix_path.read_text(encoding="utf-8"), component, version, entry, profiles)
            matrix_path.write_text(text, encoding="utf-8")
            refused = refused_families(matrix_path, line, profiles)
            matrix_path.write_text(with_excludes(text, line, refused), encoding="utf-8")
            report.append(f"matrix: line {line} added to {matrix_path.name}"
                          + (f"; the rules refuse {', '.join(sorted(refused))} (excluded with the reasons)"
                             if refused else ""))
    if not any(news.values()):
        report.append("nothing new on the index for " + " and ".join(components(profiles)))
    return report


def said(added: Added) -> str:
    """One line saying what `add` wrote and what it could not."""
    head = f"{added.component} {added.version}: derived record written to {added.path.name}"
    if added.release_written:
        head += "; release entry written"
    elif added.release_missing:
        head += "; no release entry (" + "; ".join(added.release_missing) + ")"
    if added.unread:
        head += "; not read from the files: " + "; ".join(added.unread)
    return head
