"""`lmi`: the command line. Each subcommand is one step of matrix -> specs -> contexts -> plan.

Exit codes: 0 ok, 1 failure (e.g. `render --check` found drift), 2 invalid input or usage; an error
says its own (buildkit/errors.py: LmiError.exit_code). Errors are one line each, without a traceback;
--debug shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from . import (
    build,
    ci,
    cli_parser,
    engine,
    facts,
    index,
    lock,
    matrix,
    profiles,
    publish,
    registry,
    render,
    rules,
    smoke,
)
from .errors import LmiError, UserError
from .facts import sm_name
from .progress import progress_for
from .rules import Combo, evaluate
from .spec import ImageSpec, resolve, select

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class Terminated(KeyboardInterrupt):
    """SIGTERM (e.g. a cancelled CI job): stop like Ctrl-C, so no build is left running or half-tagged."""


def _on_sigterm(signum, frame):
    raise Terminated()


# --- loading and selecting -----------------------------------------------------------------------


def _matrix_path(args: argparse.Namespace) -> Path:
    return Path(args.matrix or os.environ.get("LMI_MATRIX") or "matrix.yaml")


def _load(args: argparse.Namespace) -> tuple[matrix.Matrix, list[ImageSpec]]:
    f = facts.load(profiles.REGISTRY)
    m = matrix.load(_matrix_path(args), f)
    return m, resolve(m, f)


def _selected(args: argparse.Namespace) -> tuple[matrix.Matrix, list[ImageSpec]]:
    """The matrix and its images that --instance (a family or an instance type of it) and the patterns select."""
    m, specs = _load(args)
    return m, select(specs, [_instance(i).family for i in args.instance or []], args.patterns or [])


def _warn(specs: list[ImageSpec]) -> None:
    """What each profile warns about for its images (e.g. a download without a recorded checksum)."""
    for line in profiles.REGISTRY.warnings(specs):
        print(f"warning: {line}", file=sys.stderr)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


# --- subcommands ---------------------------------------------------------------------------------


def cmd_matrix(args: argparse.Namespace) -> int:
    _, specs = _selected(args)
    if args.json:
        print(json.dumps([s.claims() for s in specs], indent=2, sort_keys=True))
        return EXIT_OK
    rows = [[s.id, s.family.name, f"{s.family.gpu} {sm_name(s.family.sm)}" if s.family.is_gpu else "-",
             s.cuda_patch or "-", f"{s.torch}+{s.wheel_variant}", s.stack.name,
             ",".join(f"{k}={v}" for k, v in s.versions.items()), s.python, s.os.name,
             "yes" if s.needs_compat else "no"] for s in specs]
    print(_table(rows, ["ID", "FAMILY", "GPU", "CUDA", "TORCH", "ENGINE", "VERSIONS", "PYTHON", "OS", "COMPAT"]))
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    m, specs = _load(args)
    for s in specs:
        for note in s.notes:
            if args.verbose:
                print(f"note: {s.id}: {note}")
    print(f"ok: {len(specs)} images valid in {m.path} "
          f"({len({s.line for s in specs})} lines x {len({s.family.name for s in specs})} families)")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    f = facts.load(profiles.REGISTRY)
    driver = rules.host_driver(f, args.driver, args.inference_ami)
    given = {k: getattr(args, k) for k in profiles.REGISTRY.option_keys() if getattr(args, k) is not None}
    parts = profiles.REGISTRY.parts(args.engine, given)
    family = _instance(args.instance).family  # ml.g5.12xlarge checks g5
    cpu = family == "cpu"
    combo = Combo.of(args.engine, family, args.torch, None if cpu else args.cuda, args.python, args.os,
                     torch_cuda=None if cpu else args.torch_cuda, driver=driver, **parts)
    verdict = evaluate(combo, f)
    if args.json:
        print(json.dumps(rules.verdict_json(combo, verdict), indent=2))
        return EXIT_OK if verdict.ok else EXIT_USAGE
    if not verdict.ok:
        for e in verdict.errors:
            print(f"error: {e.text()}", file=sys.stderr)
        return EXIT_USAGE
    print(rules.summary(combo, verdict, f))
    if args.verbose:
        for line in verdict.observations:
            print(f"observed: {line}")
    return EXIT_OK


def cmd_render(args: argparse.Namespace) -> int:
    m, specs = _selected(args)
    out = Path(args.out) if args.out else m.output
    problem = matrix.output_problem(out, m.path.parent, outside_ok=True) if args.out else None
    if problem:
        raise UserError(f"--out {args.out}: {problem}")
    renderer = render.for_matrix(m)
    contexts = [renderer.render(s) for s in specs]
    whole = not args.instance and not args.patterns
    if args.check:
        problems = render.diff(contexts, out, prune=whole)
        if problems:
            for line in problems:
                print(line, file=sys.stderr)
            print(f"{out} is stale: run `lmi render` (or `make render`) and commit the result", file=sys.stderr)
            return EXIT_FAIL
        print(f"ok: {len(contexts)} contexts in {out} match a fresh render")
        return EXIT_OK
    _warn(specs)
    changed = render.write(contexts, out, prune=whole and not args.out)
    print(f"rendered {len(contexts)} contexts into {out} ({len(changed)} changed)")
    for line in changed:
        print(f"  {line}")
    return EXIT_OK


def cmd_lock(args: argparse.Namespace) -> int:
    """Resolve the selected images' Python dependency sets into the matrix's lock file, then re-render."""
    from . import locker

    m, specs = _selected(args)
    if args.check:
        path = lock.lock_path(m.path)
        stale, unresolved = lock.problems(specs, lock.load(path), m.build_args)
        for line in unresolved:
            print(f"warning: {line} (its images cannot be built until it is)", file=sys.stderr)
        if stale:
            for line in stale:
                print(line, file=sys.stderr)
            print(f"{path} is stale: run `lmi lock` (or `make lock`) and commit it with images/", file=sys.stderr)
            return EXIT_FAIL
        if unresolved:
            print(f"ok: no set in {path} is missing or stale; {len(unresolved)} recorded as not locked (above)")
        else:
            print(f"ok: the dependency sets of {len(specs)} images are locked in {path} for their current inputs")
        return EXIT_OK
    path, changed, failed = locker.relock(
        m, specs, whole=not args.instance and not args.patterns, upgrade=args.upgrade,
        index_url=args.pip_index_url or os.environ.get("LMI_PIP_INDEX_URL"),
        find_links=[Path(args.wheelhouse)] if args.wheelhouse else [], say=print)
    print(f"wrote {path}; re-rendered {len(changed)} context(s) in {m.output}")
    for line in failed:
        print(f"error: {path}: {line}", file=sys.stderr)
    if failed:
        print("recorded as not locked: its images cannot be built; run `lmi lock` where the index is reachable",
              file=sys.stderr)
    return EXIT_FAIL if failed else EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    _, _, planned = _planned_for_build(args, None)
    if args.json:
        print(json.dumps([p.to_json() for p, _ in planned], indent=2, sort_keys=True))
        return EXIT_OK
    rows = [[p.spec.id, p.spec.tag, p.content_hash[:16], ", ".join(p.spec.aliases) or "-"]
            for p, _ in planned]
    print(_table(rows, ["ID", "TAG", "CONTENT HASH", "ALIASES"]))
    return EXIT_OK


def cmd_facts_verify(args: argparse.Namespace) -> int:
    from . import verify

    f = facts.load(profiles.REGISTRY)
    m = matrix.load(_matrix_path(args), f)
    pins = verify.matrix_pins(m)
    print(f"reading {verify.index_url()} ...")
    drift, checked = verify.verify(f, pins)
    more, counted = verify.verify_derived(profiles=profiles.REGISTRY, wheels=getattr(args, "wheels", False))
    drift, checked = drift + more, checked + counted
    for line in drift:
        print(f"drift: {line}")
    if drift:
        print(f"{len(drift)} of {checked} facts differ from the index: fix buildkit/data (with the source) or the "
              "matrix", file=sys.stderr)
        return EXIT_FAIL
    print(f"ok: {checked} facts match the index (torch wheels and Python ranges, the engines' releases, "
          f"{len(pins)} pins of {m.path})")
    return EXIT_OK


def cmd_facts_add(args: argparse.Namespace) -> int:
    from . import upstream

    added = upstream.add(args.component, args.version, profiles=profiles.REGISTRY)
    print(upstream.said(added))
    return EXIT_FAIL if added.release_missing else EXIT_OK  # a release entry it could not write: said above


def cmd_facts_upstream(args: argparse.Namespace) -> int:
    from . import upstream

    for line in upstream.run(profiles=profiles.REGISTRY, data_dir=args.data_dir,
                             matrix_path=_matrix_path(args) if args.add_line else None):
        print(line)
    return EXIT_OK


def cmd_engine(args: argparse.Namespace) -> int:
    print(engine.ensure_engine())
    client = engine.detect_client(args.docker or os.environ.get("DOCKER"))
    print(f"builds with {client.path} ({client.kind}, client {client.version})")
    return EXIT_OK


def _build_options(args: argparse.Namespace, m: matrix.Matrix) -> build.BuildOptions:
    return build.options(m, build_args=args.build_arg or [], base_mirror=args.base_mirror, registry=args.registry,
                         pip_index_url=args.pip_index_url or os.environ.get("LMI_PIP_INDEX_URL"),
                         wheelhouse=args.wheelhouse, ca_bundle=args.ca_bundle, jobs=args.jobs,
                         force=getattr(args, "force", False), pin_bases=args.pin_bases)


def _planned_for_build(args: argparse.Namespace, client: engine.Client | None, require_locks: bool = False):
    """Selected specs, planned as they will be built (build.plan). With require_locks, an image whose context
    has no current lock is refused before anything is built."""
    m, specs = _selected(args)
    options = _build_options(args, m)
    return m, options, build.planned(m, specs, options, client, getattr(args, "shard", None), require_locks)


def cmd_build(args: argparse.Namespace) -> int:
    engine.sdk()  # a stopped daemon is reported as such, not as a client that cannot build
    client = engine.detect_client(args.docker or os.environ.get("DOCKER"))
    m, options, planned = _planned_for_build(args, client, require_locks=True)
    contexts = [ctx for _, ctx in planned]
    stale = render.diff(contexts, m.output, prune=False)
    if stale:
        changed = render.write(contexts, m.output, prune=False)
        print(f"rendered {len(changed)} stale context(s) into {m.output}: {', '.join(changed)}")
    _warn([p.spec for p, _ in planned])
    work = [(p, m.output / p.spec.id) for p, _ in planned]
    progress = progress_for([p.spec.id for p, _ in planned], plain=True if args.plain else None)
    try:
        with progress:
            results = build.Builder(client, options, progress).build_all(work)
    except build.BuildInterrupted as stop:
        _summary(stop.results)
        print("interrupted: running builds were stopped; nothing half-built was tagged", file=sys.stderr)
        return 143 if isinstance(stop.__context__, Terminated) else 130
    _summary(results)
    failed = [r for r in results if r.state == "failed"]
    for r in failed:
        print(f"\nfailed: {r.id}: {r.reason}\n  log: {r.log}", file=sys.stderr)
        for line in r.tail:
            print(f"  | {line}", file=sys.stderr)
    return EXIT_FAIL if failed else EXIT_OK


def _summary(results: list[build.Result]) -> None:
    rows = [[r.id, r.state, f"{r.seconds:.0f}s" if r.seconds else "-",
             (r.tags[0] if r.tags else r.reason) or "-"] for r in results]
    print(_table(rows, ["IMAGE", "RESULT", "TIME", "TAG / REASON"]))
    counts = {state: sum(r.state == state for r in results) for state in ("built", "skipped", "failed")}
    print(", ".join(f"{n} {state}" for state, n in counts.items()))


def cmd_bake(args: argparse.Namespace) -> int:
    """A docker buildx bake file: one target per image, for remote or Kubernetes BuildKit builders."""
    m, options, planned = _planned_for_build(args, None, require_locks=True)
    print(json.dumps(build.bake_file(planned, options, m.output), indent=2))
    if build.has_credentials(options.pip_index_url):
        print("note: the package index's credentials are not in the bake file; set LMI_PIP_INDEX_URL to the "
              "full URL where `docker buildx bake` runs", file=sys.stderr)
    return EXIT_OK


def cmd_ci_matrix(args: argparse.Namespace) -> int:
    """JSON for a CI job matrix: one entry per image, with the runner labels its family needs."""
    m, options, planned = _planned_for_build(args, None)
    chosen = [p for p, _ in planned]
    if args.changed_since:
        chosen = ci.changed_since(chosen, args.changed_since, m.output)
    if args.unpublished_in:
        chosen = ci.unpublished(chosen, _address(args.unpublished_in))
    print(json.dumps(ci.job_matrix(chosen), indent=None if args.compact else 2))
    return EXIT_OK


def cmd_index_merge(args: argparse.Namespace) -> int:
    merged = ci.merge_index(Path(args.index), args.fragments, [_address(u) for u in args.fetch or []],
                            [_address(u) for u in args.publish or []], args.repository, profiles.REGISTRY,
                            say=lambda line: print(line, file=sys.stderr))
    print(f"{args.index}: {len(merged['images'])} image(s), {len(args.fragments)} fragment(s) merged; "
          "AVAILABLE_IMAGES.md beside it")
    for url in args.publish or []:
        print(f"published to {url} ({args.repository}:{publish.INDEX_TAG})")
    return EXIT_OK


def cmd_test(args: argparse.Namespace) -> int:
    tiers = smoke.tiers_of(args.tier)
    build.prefix("--registry", args.registry)
    m, specs = _selected(args)
    if args.image and len(specs) != 1:
        raise UserError(f"--image {args.image} tests one image, but the selection has {len(specs)}; "
                        "select exactly one with --instance or a pattern")
    gpu, reason = smoke.gpu_for(args.gpu, tiers)
    images = [(spec, args.image or f"{build.repository(spec, args.registry)}:{spec.tag}") for spec in specs]
    records: list[smoke.Record] = []
    try:
        smoke.run(images, tiers, gpu, reason, records, check_timeout=args.check_timeout,
                  serving_timeout=args.serving_timeout, junit_path=Path(args.junit) if args.junit else None,
                  verbose=args.verbose, say=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("interrupted: removing the test containers", file=sys.stderr)
        return 130
    print(_table(smoke.summary_rows(records), ["IMAGE", "RESULT", "PASSED", "FAILED", "SKIPPED", "IMAGE ID"]))
    print(f"records: {smoke.RECORD_DIR}/<image id>.json" + (f"; JUnit: {args.junit}" if args.junit else ""))
    return EXIT_OK if all(r.passed for r in records) else EXIT_FAIL


def _address(url: str | None) -> registry.Address:
    return registry.parse(url or registry.DEFAULT_REGISTRY)


def cmd_registry(args: argparse.Namespace) -> int:
    print(registry.ensure_local_registry())
    return EXIT_OK


def cmd_push(args: argparse.Namespace) -> int:
    address = _address(args.registry)
    if address.url == registry.DEFAULT_REGISTRY:
        registry.ensure_local_registry()
    _, specs = _selected(args)
    print(f"pushing {len(specs)} image(s) to {address.url}")
    done = publish.push(specs, address, Path(args.index), index_artifact=not args.no_index_artifact,
                        matrix_path=_matrix_path(args), known=facts.load(profiles.REGISTRY))
    for p in done:
        print(f"{p.spec.id}: {p.address.ref(p.spec.repository, digest=p.digest)}")
    print(f"index: {args.index} ({len(done)} image(s) recorded); AVAILABLE_IMAGES.md beside it")
    return EXIT_OK


def cmd_promote(args: argparse.Namespace) -> int:
    source = _address(args.source)
    targets = [_address(t) for t in args.to]
    _, specs = _selected(args)
    for line in publish.promote(specs, source, targets, Path(args.index), index_artifact=not args.no_index_artifact,
                                profiles=profiles.REGISTRY):
        print(line)
    return EXIT_OK


def _instance(text: str) -> facts.InstanceType:
    """--instance as a family (g5) or an instance type (ml.g5.12xlarge, g5.12xlarge): facts.instance_type."""
    try:
        return facts.instance_type(text, facts.load(profiles.REGISTRY))
    except ValueError as exc:
        raise UserError(f"--instance: {exc}") from None


def cmd_uri(args: argparse.Namespace) -> int:
    wanted = {k: getattr(args, k) for k in (*profiles.component_keys(), *index.FILTERS)}
    instance = _instance(args.instance)
    entry, reg, others = index.answer(index.load(args.index, profiles.REGISTRY), profiles.REGISTRY, instance,
                                      region=args.region, registry=args.registry, revision=args.revision,
                                      engine=args.engine, **wanted)
    if others:
        print(f"note: {instance.family} also has images of engine {', '.join(others)} (choose with --engine)",
              file=sys.stderr)
    size = index.instance_facts(instance)
    if args.json:
        print(json.dumps(index.uri_json(entry, reg, size), indent=2))
    else:
        if entry.get("host"):
            print(f"{entry['tag']}: {entry['host']['summary']}", file=sys.stderr)
        if size:
            print(f"{instance.name}: {instance.summary()}", file=sys.stderr)
        print(reg["uri"])
    return EXIT_OK


def cmd_sbom(args: argparse.Namespace) -> int:
    """Print or save the SBOM (or provenance) of one selected image: the artifact attached to its digest in
    a registry (as the index records it), or, with --local, made now from the image in the engine."""
    from . import attest

    _, specs = _selected(args)
    if len(specs) != 1:
        raise UserError(f"{len(specs)} images match; select one (e.g. `lmi sbom {specs[0].id}`)")
    spec = specs[0]
    if args.local:
        if args.provenance:
            raise UserError("--local makes an SBOM only; provenance exists for a pushed image (drop --local)")
        text = attest.documents(engine.detect_client().path, f"{spec.repository}:{spec.tag}", spec,
                                spec.repository, None)[0]
    else:
        address = _address(args.registry)
        entry = index.published(index.load(args.index, profiles.REGISTRY), spec.id, address.url, args.index)
        target = publish.Target(address, engine.detect_client().path if address.kind == "ecr" else "docker")
        target.prepare(set())
        kind = "provenance" if args.provenance else "sbom"
        text = attest.read(target.oci, address.path(spec.repository), entry["digest"], kind, entry.get(kind))
    if args.output:
        Path(args.output).write_bytes(text)
        print(f"wrote {args.output} ({len(text)} bytes)")
    else:
        sys.stdout.write(text.decode() + ("" if text.endswith(b"\n") else "\n"))
    return EXIT_OK


def cmd_gate(args: argparse.Namespace) -> int:
    from . import gate

    m, specs = _selected(args)
    allowlist = Path(args.allowlist) if args.allowlist else m.path.parent / gate.DEFAULT_ALLOWLIST.name
    if args.allowlist and not allowlist.is_file():
        raise UserError(f"--allowlist {args.allowlist}: no such file; omit it to use {gate.DEFAULT_ALLOWLIST.name} "
                        "beside the matrix")
    results = gate.run(specs, _address(args.registry), Path(args.index), allowlist, args.floor,
                       no_scan_gate=args.no_scan_gate, timeout_s=args.scan_timeout, profiles=profiles.REGISTRY)
    failed = [spec.id for spec, verdict in results if not verdict["passed"]]
    if failed:
        print(f"gate: {len(failed)} of {len(results)} image(s) may not be promoted: {', '.join(failed)} "
              f"(verdicts in {args.index})", file=sys.stderr)
        return EXIT_FAIL
    print(f"gate: {len(results)} image(s) may be promoted (verdicts in {args.index})")
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    return cli_parser.parser(sys.modules[__name__])


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.matrix = getattr(args, "matrix", None)
    debug = getattr(args, "debug", False)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except LmiError as exc:  # each kind of error carries its exit code (buildkit/errors.py)
        if debug:
            raise
        for line in exc.lines:
            print(f"{exc.prefix}{line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print("interrupted", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # a bug, not bad input: say so briefly; --debug shows where
        if debug:
            raise
        print(f"lmi: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
