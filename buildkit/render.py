"""Render image specs into self-contained build contexts (images/<id>/) with Jinja2.

Rendering is deterministic: the same specs and templates give byte-identical files, so the committed
images/ can be checked against a fresh render (`lmi render --check`, the CI gate).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2

from .errors import UserError
from .spec import ImageSpec, PlannedImage, content_hash

# context file -> template; image.json is written from the spec itself.
TEMPLATES = {
    "Dockerfile": "Dockerfile.j2",
    "entrypoint.sh": "entrypoint.sh.j2",
    "config.properties": "config.properties.j2",
    "requirements.txt": "requirements.txt.j2",
}
BUILDER_TEMPLATES = {"build-requirements.txt": "build-requirements.txt.j2"}  # only images with a builder stage
EXECUTABLE = {"entrypoint.sh"}
CHECK_MODULE = Path(__file__).with_name("incheck.py")


@dataclass(frozen=True)
class Context:
    """A rendered build context, in memory."""

    id: str
    files: dict[str, bytes]

    def mode(self, name: str) -> int:
        return 0o755 if name in EXECUTABLE else 0o644

    @property
    def modes(self) -> dict[str, int]:
        return {name: self.mode(name) for name in self.files}


class Renderer:
    def __init__(self, templates_dir: Path) -> None:
        if not templates_dir.is_dir():
            raise UserError(f"{templates_dir}: templates directory not found; set 'templates' in the matrix")
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(templates_dir)),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            autoescape=False,  # noqa: S701 - renders Dockerfiles and shell, not HTML
        )

    def render(self, spec: ImageSpec) -> Context:
        wanted = dict(TEMPLATES, **(BUILDER_TEMPLATES if spec.builder_image else {}))
        files = {}
        for name, template in sorted(wanted.items()):
            try:
                text = self.env.get_template(template).render(spec=spec)
            except jinja2.TemplateError as exc:
                lineno = getattr(exc, "lineno", None)
                at = f"{template}:{lineno}" if lineno else template
                raise UserError(f"templates/{at}: {exc.message if hasattr(exc, 'message') else exc}; "
                                "fix the template") from exc
            files[name] = text.encode()
        files["image.json"] = (json.dumps(spec.claims(), indent=2, sort_keys=True) + "\n").encode()
        files["lmi_check.py"] = CHECK_MODULE.read_bytes()  # the in-image smoke checks, verbatim
        return Context(spec.id, files)


def plan(specs: list[ImageSpec], renderer: Renderer, build_args: dict[str, str] | None = None
         ) -> list[tuple[PlannedImage, Context]]:
    out = []
    for spec in specs:
        ctx = renderer.render(spec)
        args = dict(build_args or {})
        out.append((PlannedImage(spec, content_hash(ctx.files, args, spec.bases, ctx.modes), args), ctx))
    return out


def write(contexts: list[Context], out_dir: Path, prune: bool) -> list[str]:
    """Write contexts under out_dir/<id>/, each replaced whole so no half-written context is left.
    With prune, directories of images no longer in the matrix are removed. Returns what changed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    changed = []
    for ctx in contexts:
        target = out_dir / ctx.id
        if not _differs(ctx, target):
            continue
        staging = Path(tempfile.mkdtemp(prefix=f".{ctx.id}.", dir=out_dir))
        try:
            for name, data in ctx.files.items():
                path = staging / name
                path.write_bytes(data)
                path.chmod(ctx.mode(name))
            staging.chmod(0o755)
            if target.exists():
                old = target.with_name(f".{ctx.id}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.rename(target, old)
                os.rename(staging, target)
                shutil.rmtree(old)
            else:
                os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        changed.append(ctx.id)
    if prune:
        keep = {c.id for c in contexts}
        for child in sorted(out_dir.iterdir()):
            if child.is_dir() and child.name not in keep and not child.name.startswith("."):
                shutil.rmtree(child)
                changed.append(f"{child.name} (removed)")
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
        problems.extend(f"{child}: no longer in the matrix" for child in sorted(out_dir.iterdir())
                        if child.is_dir() and child.name not in keep and not child.name.startswith("."))
    return problems
