"""Render image specs into self-contained build contexts (images/<id>/) with Jinja2.

Rendering is deterministic: the same specs and templates give byte-identical files, so the committed
images/ can be checked against a fresh render (`lmi render --check`, the CI gate).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import lock
from .errors import UserError
from .matrix import Matrix
from .spec import ImageSpec, PlannedImage, content_hash

if TYPE_CHECKING:
    import jinja2

# What a context holds comes from the image's profile (buildkit/profiles): its Dockerfile template (which
# extends the core templates/Dockerfile.j2), further templates, and files copied verbatim (a handler, an
# entry point); image.json is written from the spec itself. The smoke checks (buildkit/resources/check/: the
# checker lmi_check.py and the profile's) are not: `lmi test` mounts them into its test containers, so the image
# ships no test code and a check edit changes no content hash.


@dataclass(frozen=True)
class Context:
    """A rendered build context, in memory."""

    id: str
    files: dict[str, bytes]
    executable: frozenset[str] = frozenset()

    def mode(self, name: str) -> int:
        return 0o755 if name in self.executable else 0o644

    @property
    def modes(self) -> dict[str, int]:
        return {name: self.mode(name) for name in self.files}


def shell_word(value: object) -> str:
    """One shell word (RUN lines run under bash)."""
    return shlex.quote(str(value))


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def label_value(value: object) -> str:
    """A double-quoted Dockerfile LABEL value: quotes, backslashes and $ escaped; no line breaks."""
    text = str(value)
    if _CONTROL.search(text):
        raise UserError(f"label value {text[:60]!r} holds a control character; fix the matrix or the facts")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


class Renderer:
    """Renders contexts from templates; with `locks` (the matrix's lock file), every context whose
    dependency set is locked for exactly its inputs also gets its lock files (buildkit/lock.py)."""

    def __init__(self, templates_dir: Path, locks: lock.LockFile | None = None,
                 build_args: dict[str, str] | None = None) -> None:
        self.locks = locks
        self.build_args = dict(build_args or {})
        self._verbatim: dict[Path, bytes] = {}
        if not templates_dir.is_dir():
            raise UserError(f"{templates_dir}: templates directory not found; set 'templates' in the matrix")
        import jinja2  # here: commands that render nothing (validate, check, matrix) need no template engine

        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(templates_dir)),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            autoescape=False,  # noqa: S701 - renders Dockerfiles and shell, not HTML
        )
        # Quoting for each context a value lands in, so even a value that passed validation cannot break out.
        self.env.filters["sh"] = shell_word
        self.env.filters["label"] = label_value

    def render(self, spec: ImageSpec) -> Context:
        import jinja2

        profile = spec.profile
        files = {}
        for name, template in sorted({"Dockerfile": profile.DOCKERFILE, **profile.TEMPLATES}.items()):
            try:
                text = self.env.get_template(template).render(spec=spec, lock_files=lock.files_of(spec),
                                                              verbatim_files=tuple(profile.VERBATIM))
            except jinja2.TemplateError as exc:
                raise UserError(f"templates/{_where(exc, template)}: {exc.message if hasattr(exc, 'message') else exc}"
                                "; fix the template") from exc
            files[name] = text.encode()
        files["image.json"] = (json.dumps(spec.claims(), indent=2, sort_keys=True) + "\n").encode()
        for name, source in profile.VERBATIM.items():
            if source not in self._verbatim:  # read once per renderer, not once per image
                self._verbatim[source] = source.read_bytes()
            files[name] = self._verbatim[source]
        found = self.locks.current(spec, self.build_args) if self.locks else None
        if found:
            files.update(lock.context_files(found))
        return Context(spec.id, files, frozenset(profile.EXECUTABLE))


def _where(exc: jinja2.TemplateError, template: str) -> str:
    """template[:line] of an error: a syntax error's own, else the innermost template frame of the traceback
    (a profile's template extends the core's, so the error may be in either)."""
    if getattr(exc, "lineno", None):
        return f"{getattr(exc, 'name', None) or template}:{exc.lineno}"
    frames, tb = [], exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(".j2"):
            frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    if not frames:
        return template
    path, line = frames[-1]
    name = path.split("/templates/", 1)[-1] if "/templates/" in path else template
    return f"{name}:{line}"


def for_matrix(m: Matrix) -> Renderer:
    """The renderer of m's contexts, with their locks (the matrix's lock file, beside it)."""
    return Renderer(m.templates, lock.load(lock.lock_path(m.path)), m.build_args)


def plan(specs: list[ImageSpec], renderer: Renderer, build_args: Mapping[str, str] | None = None, *,
         extra_args: Mapping[str, str] | None = None, pinned: Mapping[str, str] | None = None,
         host_args: Callable[[ImageSpec], Mapping[str, str]] | None = None) -> list[tuple[PlannedImage, Context]]:
    """The one plan of every command that names an image (plan, build, bake, ci-matrix; push publishes the
    hash build labelled the image with): each spec's context, build args and content hash.

    The hash covers what the image is made of: its context (files and modes), the build args written out
    (`build_args`, the matrix's, and `extra_args`, the user's --build-arg) and its base images, by digest
    where `pinned` maps a base to the digest it points at now (--pin-bases). It leaves out where this host
    fetches things from (`host_args(spec)`: a base mirror, a package index, a wheelhouse): every Python file
    is pinned by sha256 in the context's locks and a mirror serves the same base, so an image has one name
    wherever it is planned. Precedence in the build: --build-arg, then the host's, then the matrix's."""
    matrix_args, extra, pins = dict(build_args or {}), dict(extra_args or {}), dict(pinned or {})
    hashed = {**matrix_args, **extra}
    out = []
    for spec in specs:
        ctx = renderer.render(spec)
        bases = tuple(f"{b}@{pins[b]}" if b in pins else b for b in spec.bases)
        args = {**matrix_args, **(host_args(spec) if host_args else {}), **extra}
        out.append((PlannedImage(spec, content_hash(ctx.files, hashed, bases, ctx.modes), args, hashed, bases),
                    ctx))
    return out


MANIFEST = ".lmi-render.json"  # in the output directory: the contexts `lmi render` wrote there
_TEMP_PREFIXES = (".lmi-tmp-", ".lmi-old-")  # staging of an interrupted render, always ours to remove
RENDERED_MARK = b"Rendered by `lmi render`"  # in every Dockerfile the templates write (legacy adoption)


def owned(out_dir: Path) -> set[str]:
    """Ids of the contexts that `lmi render` wrote into out_dir. Raises UserError when out_dir holds
    anything else, so nothing there is ever overwritten or pruned unless the toolkit made it."""
    if not out_dir.exists():
        return set()
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise UserError(f"{out_dir}: not a directory the toolkit made; choose another output directory")
    manifest = out_dir / MANIFEST
    ids: set[str] = set()
    if manifest.is_file() and not manifest.is_symlink():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            ids = {i for i in data["ids"] if isinstance(i, str) and _safe_id(i)}
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{manifest}: unreadable render manifest ({exc}); remove the directory's "
                            "rendered contexts and the manifest, then render again") from exc
    strangers = []
    for child in sorted(out_dir.iterdir()):
        name = child.name
        if name == MANIFEST or name.startswith(_TEMP_PREFIXES):
            continue
        if name in ids and child.is_dir() and not child.is_symlink():
            continue
        if not manifest.exists() and _looks_rendered(child):
            ids.add(name)  # a context rendered before manifests existed: adopt it
            continue
        strangers.append(name)
    if strangers:
        shown = ", ".join(strangers[:3]) + (f" and {len(strangers) - 3} more" if len(strangers) > 3 else "")
        raise UserError(f"{out_dir}: holds {shown}, which `lmi render` did not write; render into a directory "
                        "of its own (the matrix's 'output', or --out DIR) or move those away")
    return ids


def _safe_id(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and not name.startswith(".")


def _looks_rendered(path: Path) -> bool:
    if not path.is_dir() or path.is_symlink() or not _safe_id(path.name):
        return False
    dockerfile, claims = path / "Dockerfile", path / "image.json"
    try:
        return claims.is_file() and RENDERED_MARK in dockerfile.read_bytes()[:512]
    except OSError:
        return False


def _write_manifest(out_dir: Path, ids: set[str]) -> None:
    tmp = out_dir / f"{_TEMP_PREFIXES[0]}{MANIFEST}"
    tmp.write_text(json.dumps({"written_by": "lmi render", "ids": sorted(ids)}, indent=1) + "\n")
    os.replace(tmp, out_dir / MANIFEST)


def write(contexts: list[Context], out_dir: Path, prune: bool) -> list[str]:
    """Write contexts under out_dir/<id>/, each replaced whole so no half-written context is left.
    Only what `lmi render` wrote is ever replaced or removed: out_dir's manifest names it, and an
    out_dir holding anything else is refused before anything is written. With prune, contexts it
    wrote for images no longer in the matrix are removed. Returns what changed."""
    for ctx in contexts:
        if not _safe_id(ctx.id):
            raise UserError(f"image id '{ctx.id}' cannot name a directory; fix the line or family name")
    mine = owned(out_dir)  # raises before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    for child in out_dir.iterdir():  # what an interrupted render left behind
        if not child.name.startswith(_TEMP_PREFIXES):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    keep = {c.id for c in contexts}
    if not keep <= mine or not (out_dir / MANIFEST).exists():
        mine |= keep
        _write_manifest(out_dir, mine)  # claimed before it is created
    changed = []
    for ctx in contexts:
        target = out_dir / ctx.id
        if not _differs(ctx, target):
            continue
        staging = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIXES[0]}{ctx.id}.", dir=out_dir))
        try:
            for name, data in ctx.files.items():
                path = staging / name
                path.write_bytes(data)
                path.chmod(ctx.mode(name))
            staging.chmod(0o755)
            if target.exists():
                old = out_dir / f"{_TEMP_PREFIXES[1]}{ctx.id}"
                os.rename(target, old)
                os.rename(staging, target)
                shutil.rmtree(old)
            else:
                os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        changed.append(ctx.id)
    if prune:
        for name in sorted(mine - keep):
            shutil.rmtree(out_dir / name, ignore_errors=True)
            changed.append(f"{name} (removed)")
        if mine != keep:
            _write_manifest(out_dir, keep)
    return changed


def _differs(ctx: Context, target: Path) -> bool:
    return bool(diff([ctx], target.parent, prune=False))


def diff(contexts: list[Context], out_dir: Path, prune: bool) -> list[str]:
    """Differences between fresh contexts and what is on disk, one line each (empty: up to date)."""
    problems = []
    for ctx in contexts:
        target = out_dir / ctx.id
        if not target.is_dir():
            problems.append(f"{target}: missing")
            continue
        on_disk = {p.name for p in target.iterdir()}
        for name in sorted(on_disk - set(ctx.files)):
            problems.append(f"{target / name}: not produced by the templates")
        for name, data in sorted(ctx.files.items()):
            path = target / name
            if name not in on_disk:
                problems.append(f"{path}: missing")
            elif path.read_bytes() != data:
                problems.append(f"{path}: differs from a fresh render")
            elif bool(path.stat().st_mode & 0o100) != bool(ctx.mode(name) & 0o100):
                # Only the executable bit: the rest depends on the umask of whoever checked it out.
                problems.append(f"{path}: executable bit differs from a fresh render")
    if prune and out_dir.is_dir():
        keep = {c.id for c in contexts}
        try:
            mine = owned(out_dir)
        except UserError as exc:
            return [*problems, *exc.lines]
        problems.extend(f"{out_dir / name}: no longer in the matrix" for name in sorted(mine - keep))
        if not (out_dir / MANIFEST).is_file() or mine != keep:
            problems.append(f"{out_dir / MANIFEST}: does not list exactly the rendered contexts")
    return problems
