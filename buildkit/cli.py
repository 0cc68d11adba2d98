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
    __version__,
    build,
    ci,
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
             s.cuda_patch or "-", f"{s.torch}+{s.wheel_variant}", s.engine.name,
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


def _wheel_components() -> tuple[str, ...]:
    from . import upstream

    return upstream.components(profiles.REGISTRY)


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
    specs = build.select_shard(specs, getattr(args, "shard", None))
    if not specs:
        raise UserError(f"shard {args.shard} has no images; use fewer shards")
    options = _build_options(args, m)
    planned = build.plan(m, specs, options, client)
    if require_locks:
        lock.refuse_unlocked(lock.load(lock.lock_path(m.path)), m.build_args, planned)
    return m, options, planned


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
    runner = smoke.Runner(check_timeout=args.check_timeout, serving_timeout=args.serving_timeout)
    records = []
    try:
        for spec in specs:
            image = args.image or f"{build.repository(spec, args.registry)}:{spec.tag}"
            print(f"testing {spec.id} ({image}): tiers {', '.join(tiers)}", flush=True)
            record = smoke.smoke_image(runner, image, spec, tiers, gpu, reason)
            records.append(record)
            for o in record.outcomes:
                if o["passed"] is False or args.verbose:
                    state = {True: "pass", False: "FAIL", None: "skip"}[o["passed"]]
                    print(f"  {state} {o['tier']}/{o['name']}: {o['message']}")
    except KeyboardInterrupt:
        print("interrupted: removing the test containers", file=sys.stderr)
        return 130
    finally:
        runner.cleanup()
        if args.junit and records:
            smoke.junit(records, Path(args.junit))
    rows = [[r.spec_id, "passed" if r.passed else "FAILED", str(sum(o["passed"] is True for o in r.outcomes)),
             str(sum(o["passed"] is False for o in r.outcomes)), str(sum(o["passed"] is None for o in r.outcomes)),
             r.image_id.split(":")[-1][:12]] for r in records]
    print(_table(rows, ["IMAGE", "RESULT", "PASSED", "FAILED", "SKIPPED", "IMAGE ID"]))
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


def _revision(text: str) -> int:
    """--revision N: a positive number, as in <tag>-rN (an `rN` is taken too)."""
    digits = text[1:] if text[:1] == "r" else text
    if not (digits.isascii() and digits.isdigit() and 0 < int(digits) < 10**9):
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a revision: give N of <tag>-rN, e.g. 2")
    return int(digits)


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


# --- argument parsing ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--matrix", default=argparse.SUPPRESS, metavar="PATH",
                        help="matrix file (default: $LMI_MATRIX or ./matrix.yaml)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    selectors = argparse.ArgumentParser(add_help=False)
    selectors.add_argument("--instance", action="append", metavar="FAMILY",
                           help="select a family (repeatable; an instance type, ml.g5.12xlarge, selects its family)")
    selectors.add_argument("patterns", nargs="*", metavar="PATTERN", help="glob patterns on image ids")

    parser = argparse.ArgumentParser(prog="lmi", parents=[common],
                                     description="Build LMI container images for AWS GPU instances from one matrix.")
    parser.add_argument("--version", action="version", version=f"lmi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("matrix", parents=[common, selectors], help="list the images of the matrix")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_matrix)

    p = sub.add_parser("validate", parents=[common], help="check every image against the compatibility rules")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each image's notes")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("facts", parents=[common], help="facts about the facts: `lmi facts verify` against the index")
    facts_sub = p.add_subparsers(dest="facts_command", required=True, metavar="ACTION")
    q = facts_sub.add_parser("verify", parents=[common], help="re-derive torch wheels/Pythons, the engines' "
                             "releases and library versions from the package index; report drift")
    q.add_argument("--wheels", action="store_true", help="also re-derive the derived records from their wheels "
                   "(fetched by sha256 into .lmi/upstream/)")
    q.set_defaults(func=cmd_facts_verify)
    q = facts_sub.add_parser("add", parents=[common], help="read a release's facts from its wheel on the package "
                             "index into buildkit/data")
    q.add_argument("component", choices=_wheel_components())
    q.add_argument("version")
    q.set_defaults(func=cmd_facts_add)
    q = facts_sub.add_parser("upstream", parents=[common], help="add the facts of every release newer than the "
                             "data's (and, with --add-line, a matrix line per new engine release)")
    q.add_argument("--add-line", action="store_true", help="append a line per new engine release to the matrix")
    q.add_argument("--data-dir", type=Path, default=None, help=argparse.SUPPRESS)
    q.set_defaults(func=cmd_facts_upstream)

    p = sub.add_parser("check", parents=[common], help="can I build this combination? (no matrix needed)")
    p.add_argument("--engine", choices=sorted(profiles.PROFILES), default=profiles.DEFAULT,
                   help=f"the serving engine (default: {profiles.DEFAULT})")
    for name, hint in (("instance", "g5"), ("cuda", "12.4"), ("torch", "2.4.0"), ("python", "3.10"),
                       ("os", "ubuntu22.04")):
        p.add_argument(f"--{name}", required=name != "cuda", metavar=hint.upper() if name == "os" else hint)
    for name in profiles.REGISTRY.option_keys():  # every profile's components and options (the engine's required)
        metavar, text = profiles.REGISTRY.option_flag(name)
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar=metavar, help=text)
    p.add_argument("--torch-cuda", metavar="12.8", help="torch wheel CUDA variant, when not the toolkit's")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--driver", metavar="535.54.03", help="host driver (default: SageMaker's for the family)")
    group.add_argument("--inference-ami", metavar="NAME", help="SageMaker InferenceAmiVersion of the endpoint")
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="also print what AWS shipped (observations)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("render", parents=[common, selectors], help="render build contexts into images/")
    p.add_argument("--out", metavar="DIR", help="render into DIR instead of the matrix's output")
    p.add_argument("--check", action="store_true", help="exit 1 when the contexts differ from a fresh render")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("lock", parents=[common, selectors],
                       help="resolve every image's Python dependencies, hashed, into the matrix's lock file")
    p.add_argument("--check", action="store_true", help="exit 1 when a set is missing or stale (offline)")
    p.add_argument("--upgrade", action="store_true", help="resolve again even the sets that are current")
    p.add_argument("--wheelhouse", metavar="DIR", help="a folder of wheels to resolve from too (and hash)")
    p.add_argument("--pip-index-url", metavar="URL", help="the package index (default: uv's, PyPI); one with "
                   "credentials is better given as $LMI_PIP_INDEX_URL")
    p.set_defaults(func=cmd_lock)

    engine_opts = argparse.ArgumentParser(add_help=False)
    engine_opts.add_argument("--docker", metavar="PATH", help="docker CLI to build with (default: detected; "
                             "also $DOCKER)")
    build_opts = argparse.ArgumentParser(add_help=False)
    build_opts.add_argument("-j", "--jobs", type=int, default=1, metavar="N", help="parallel builds")
    build_opts.add_argument("--registry", metavar="HOST/PREFIX", help="name images for this registry")
    build_opts.add_argument("--base-mirror", metavar="PREFIX", help="pull base images through this prefix")
    build_opts.add_argument("--pip-index-url", metavar="URL",
                            help="package index used inside the builds; one with credentials is better given as "
                                 "$LMI_PIP_INDEX_URL (not in argv); either way they reach builds as a secret only")
    build_opts.add_argument("--wheelhouse", metavar="DIR", help="wheels to prefer, mounted into the builds")
    build_opts.add_argument("--ca-bundle", metavar="FILE",
                            help=f"CA bundle passed as a BuildKit secret (default: {build.DEFAULT_CA_BUNDLE})")
    build_opts.add_argument("--build-arg", action="append", metavar="KEY=VALUE", help="extra build argument")
    build_opts.add_argument("--shard", metavar="I/N", help="build only the I-th of N slices of the selection")
    build_opts.add_argument("--pin-bases", action="store_true",
                            help="use the digest each base tag points at now (a new base digest changes the hash)")

    p = sub.add_parser("plan", parents=[common, selectors, build_opts],
                       help="image ids, tags and content hashes (as `lmi build` with the same options labels them)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("engine", parents=[common, engine_opts],
                       help="make sure a docker engine answers (installs and starts Debian's docker.io if needed)")
    p.set_defaults(func=cmd_engine)

    p = sub.add_parser("build", parents=[common, selectors, engine_opts, build_opts],
                       help="build the selected images with BuildKit")
    p.add_argument("--force", action="store_true", help="rebuild even when the content-hash tag exists")
    p.add_argument("--plain", action="store_true", help="plain progress lines even on a terminal")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("test", parents=[common, selectors], help="smoke-test built images (cpu, gpu, serving)")
    p.add_argument("--tier", default="cpu,gpu,serving", help="comma-separated tiers (default: all)")
    p.add_argument("--gpu", choices=("auto", "required", "off"), default="auto",
                   help="auto: run the gpu tier where a GPU runtime is usable; required: fail without one")
    p.add_argument("--image", metavar="REF", help="test this image instead of the selected spec's tag")
    p.add_argument("--registry", metavar="HOST/PREFIX", help="the images are named for this registry")
    p.add_argument("--junit", metavar="FILE", help="write JUnit XML for CI")
    p.add_argument("--check-timeout", type=float, default=300.0, metavar="S", help="seconds per check")
    p.add_argument("--serving-timeout", type=float, default=600.0, metavar="S",
                   help="seconds for the model to load and /ping to answer (the ranks JIT-compile on CPU images)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every check, not only failures")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("registry", parents=[common], help="start the embedded local registry on 127.0.0.1:5000")
    p.set_defaults(func=cmd_registry)

    index_opt = argparse.ArgumentParser(add_help=False)
    index_opt.add_argument("--index", default=str(index.DEFAULT_INDEX), metavar="PATH",
                           help="release index (default: images.json)")
    p = sub.add_parser("push", parents=[common, selectors, index_opt],
                       help="push smoke-tested images with immutable tags and record them in the index")
    p.add_argument("--registry", metavar="URL", help=f"ecr://ACCOUNT/REGION[/PREFIX] or oci://HOST[:PORT][/PREFIX] "
                                                     f"(default: {registry.DEFAULT_REGISTRY})")
    p.add_argument("--no-index-artifact", action="store_true",
                   help="write the index file only (CI jobs whose fragments are merged later)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("promote", parents=[common, selectors, index_opt],
                       help="copy published images by digest to other registries or regions")
    p.add_argument("--from", dest="source", required=True, metavar="URL", help="registry to copy from")
    p.add_argument("--to", action="append", required=True, metavar="URL", help="registry to copy to (repeatable)")
    p.add_argument("--no-index-artifact", action="store_true", help="write the index file only")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("uri", parents=[common], help="the digest-pinned URI to pull for an instance family")
    p.add_argument("--instance", required=True, metavar="TYPE",
                   help="an instance type (ml.g5.12xlarge, g5.12xlarge: also prints its GPUs and the "
                        "tensor_parallel_degree that uses them) or a family (g5)")
    p.add_argument("--region", metavar="REGION")
    p.add_argument("--registry", metavar="URL", help="only URIs in this registry")
    p.add_argument("--engine", choices=sorted(profiles.PROFILES),
                   help=f"only images of this engine (default: any; where several fit, {profiles.DEFAULT})")
    for name in (*profiles.component_keys(), *index.FILTERS):
        p.add_argument(f"--{name}", metavar="VERSION", help="a version or its prefix (0.27 matches 0.27.0)")
    p.add_argument("--revision", type=_revision, metavar="N",
                   help="that revision of the component tuple (its <tag>-rN; default: the newest)")
    p.add_argument("--index", default=str(index.DEFAULT_INDEX), metavar="PATH|URL")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_uri)

    p = sub.add_parser("sbom", parents=[common, selectors, index_opt],
                       help="print or save an image's SBOM (CycloneDX 1.5) or provenance (in-toto, SLSA v1)")
    p.add_argument("--registry", metavar="URL",
                   help=f"where the image is published (default: {registry.DEFAULT_REGISTRY})")
    p.add_argument("--provenance", action="store_true", help="the provenance statement instead of the SBOM")
    p.add_argument("--local", action="store_true", help="make the SBOM now from the image in the engine")
    p.add_argument("-o", "--output", metavar="FILE", help="save to FILE instead of printing")
    p.set_defaults(func=cmd_sbom)

    p = sub.add_parser("gate", parents=[common, selectors, index_opt],
                       help="the release gate: read the registry's scan findings, record a verdict in the index")
    p.add_argument("--registry", metavar="URL", required=True, help="the staging registry the images were pushed to")
    p.add_argument("--floor", default="HIGH", metavar="SEVERITY",
                   help="fail on fixable ACTIVE findings at or above this (default: HIGH)")
    p.add_argument("--allowlist", metavar="FILE",
                   help="accepted findings (default: scan-allowlist.yaml beside the matrix)")
    p.add_argument("--scan-timeout", type=float, default=1800.0, metavar="S",
                   help="seconds to wait for a scan to complete (then fail closed)")
    p.add_argument("--no-scan-gate", action="store_true",
                   help="promote without a scan (a plain OCI registry has no scanner); recorded in the index")
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("bake", parents=[common, selectors, build_opts],
                       help="print a docker buildx bake file for the selected images")
    p.set_defaults(func=cmd_bake)

    p = sub.add_parser("ci-matrix", parents=[common, selectors, build_opts], help="JSON for a CI job matrix")
    p.add_argument("--compact", action="store_true", help="one line (for $GITHUB_OUTPUT)")
    p.add_argument("--changed-since", metavar="GIT_REF", help="only images whose content hash differs from GIT_REF")
    p.add_argument("--unpublished-in", metavar="URL", help="only images whose content-hash tag is not in URL")
    p.set_defaults(func=cmd_ci_matrix)

    p = sub.add_parser("index", parents=[common], help="release index maintenance")
    index_sub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    q = index_sub.add_parser("merge", parents=[common], help="merge index fragments (e.g. one per CI job)")
    q.add_argument("fragments", nargs="*", metavar="FRAGMENT")
    q.add_argument("--index", default=str(index.DEFAULT_INDEX), metavar="PATH")
    q.add_argument("--fetch", action="append", metavar="URL", help="first merge the index published in URL")
    q.add_argument("--publish", action="append", metavar="URL", help="then publish the result beside the images")
    q.add_argument("--repository", default="lmi-inference", help="image repository the index lives in")
    q.set_defaults(func=cmd_index_merge)
    return parser


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
