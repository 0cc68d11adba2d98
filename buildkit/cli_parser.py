"""The `lmi` command line's parser: every subcommand, its options and their help (buildkit/cli.py runs them).
`lmi --help` and each `lmi <command> --help` read from here."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import __version__, build, index, profiles, registry, upstream


def revision(text: str) -> int:
    """--revision N: a positive number, as in <tag>-rN (an `rN` is taken too)."""
    digits = text[1:] if text[:1] == "r" else text
    if not (digits.isascii() and digits.isdigit() and 0 < int(digits) < 10**9):
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a revision: give N of <tag>-rN, e.g. 2")
    return int(digits)


def parser(commands: Any) -> argparse.ArgumentParser:
    """The `lmi` argument parser; each subcommand runs its `commands.cmd_<name>` (buildkit/cli.py)."""
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
    p.set_defaults(func=commands.cmd_matrix)

    p = sub.add_parser("validate", parents=[common], help="check every image against the compatibility rules")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each image's notes")
    p.set_defaults(func=commands.cmd_validate)

    p = sub.add_parser("facts", parents=[common], help="facts about the facts: `lmi facts verify` against the index")
    facts_sub = p.add_subparsers(dest="facts_command", required=True, metavar="ACTION")
    q = facts_sub.add_parser("verify", parents=[common], help="re-derive torch wheels/Pythons, the engines' "
                             "releases and library versions from the package index; report drift")
    q.add_argument("--wheels", action="store_true", help="also re-derive the derived records from their wheels "
                   "(fetched by sha256 into .lmi/upstream/)")
    q.set_defaults(func=commands.cmd_facts_verify)
    q = facts_sub.add_parser("add", parents=[common], help="read a release's facts from its wheel on the package "
                             "index into buildkit/data")
    q.add_argument("component", choices=upstream.components(profiles.REGISTRY))
    q.add_argument("version")
    q.set_defaults(func=commands.cmd_facts_add)
    q = facts_sub.add_parser("upstream", parents=[common], help="add the facts of every release newer than the "
                             "data's (and, with --add-line, a matrix line per new engine release)")
    q.add_argument("--add-line", action="store_true", help="append a line per new engine release to the matrix")
    q.add_argument("--data-dir", type=Path, default=None, help=argparse.SUPPRESS)
    q.set_defaults(func=commands.cmd_facts_upstream)

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
    p.set_defaults(func=commands.cmd_check)

    p = sub.add_parser("render", parents=[common, selectors], help="render build contexts into images/")
    p.add_argument("--out", metavar="DIR", help="render into DIR instead of the matrix's output")
    p.add_argument("--check", action="store_true", help="exit 1 when the contexts differ from a fresh render")
    p.set_defaults(func=commands.cmd_render)

    p = sub.add_parser("lock", parents=[common, selectors],
                       help="resolve every image's Python dependencies, hashed, into the matrix's lock file")
    p.add_argument("--check", action="store_true", help="exit 1 when a set is missing or stale (offline)")
    p.add_argument("--upgrade", action="store_true", help="resolve again even the sets that are current")
    p.add_argument("--wheelhouse", metavar="DIR", help="a folder of wheels to resolve from too (and hash)")
    p.add_argument("--pip-index-url", metavar="URL", help="the package index (default: uv's, PyPI); one with "
                   "credentials is better given as $LMI_PIP_INDEX_URL")
    p.set_defaults(func=commands.cmd_lock)

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
    p.set_defaults(func=commands.cmd_plan)

    p = sub.add_parser("engine", parents=[common, engine_opts],
                       help="make sure a docker engine answers (installs and starts Debian's docker.io if needed)")
    p.set_defaults(func=commands.cmd_engine)

    p = sub.add_parser("build", parents=[common, selectors, engine_opts, build_opts],
                       help="build the selected images with BuildKit")
    p.add_argument("--force", action="store_true", help="rebuild even when the content-hash tag exists")
    p.add_argument("--plain", action="store_true", help="plain progress lines even on a terminal")
    p.set_defaults(func=commands.cmd_build)

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
    p.set_defaults(func=commands.cmd_test)

    p = sub.add_parser("registry", parents=[common], help="start the embedded local registry on 127.0.0.1:5000")
    p.set_defaults(func=commands.cmd_registry)

    index_opt = argparse.ArgumentParser(add_help=False)
    index_opt.add_argument("--index", default=str(index.DEFAULT_INDEX), metavar="PATH",
                           help="release index (default: images.json)")
    p = sub.add_parser("push", parents=[common, selectors, index_opt],
                       help="push smoke-tested images with immutable tags and record them in the index")
    p.add_argument("--registry", metavar="URL", help=f"ecr://ACCOUNT/REGION[/PREFIX] or oci://HOST[:PORT][/PREFIX] "
                                                     f"(default: {registry.DEFAULT_REGISTRY})")
    p.add_argument("--no-index-artifact", action="store_true",
                   help="write the index file only (CI jobs whose fragments are merged later)")
    p.set_defaults(func=commands.cmd_push)

    p = sub.add_parser("promote", parents=[common, selectors, index_opt],
                       help="copy published images by digest to other registries or regions")
    p.add_argument("--from", dest="source", required=True, metavar="URL", help="registry to copy from")
    p.add_argument("--to", action="append", required=True, metavar="URL", help="registry to copy to (repeatable)")
    p.add_argument("--no-index-artifact", action="store_true", help="write the index file only")
    p.set_defaults(func=commands.cmd_promote)

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
    p.add_argument("--revision", type=revision, metavar="N",
                   help="that revision of the component tuple (its <tag>-rN; default: the newest)")
    p.add_argument("--index", default=str(index.DEFAULT_INDEX), metavar="PATH|URL")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands.cmd_uri)

    p = sub.add_parser("sbom", parents=[common, selectors, index_opt],
                       help="print or save an image's SBOM (CycloneDX 1.5) or provenance (in-toto, SLSA v1)")
    p.add_argument("--registry", metavar="URL",
                   help=f"where the image is published (default: {registry.DEFAULT_REGISTRY})")
    p.add_argument("--provenance", action="store_true", help="the provenance statement instead of the SBOM")
    p.add_argument("--local", action="store_true", help="make the SBOM now from the image in the engine")
    p.add_argument("-o", "--output", metavar="FILE", help="save to FILE instead of printing")
    p.set_defaults(func=commands.cmd_sbom)

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
    p.set_defaults(func=commands.cmd_gate)

    p = sub.add_parser("bake", parents=[common, selectors, build_opts],
                       help="print a docker buildx bake file for the selected images")
    p.set_defaults(func=commands.cmd_bake)

    p = sub.add_parser("ci-matrix", parents=[common, selectors, build_opts], help="JSON for a CI job matrix")
    p.add_argument("--compact", action="store_true", help="one line (for $GITHUB_OUTPUT)")
    p.add_argument("--changed-since", metavar="GIT_REF", help="only images whose content hash differs from GIT_REF")
    p.add_argument("--unpublished-in", metavar="URL", help="only images whose content-hash tag is not in URL")
    p.set_defaults(func=commands.cmd_ci_matrix)

    p = sub.add_parser("index", parents=[common], help="release index maintenance")
    index_sub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    q = index_sub.add_parser("merge", parents=[common], help="merge index fragments (e.g. one per CI job)")
    q.add_argument("fragments", nargs="*", metavar="FRAGMENT")
    q.add_argument("--index", default=str(index.DEFAULT_INDEX), metavar="PATH")
    q.add_argument("--fetch", action="append", metavar="URL", help="first merge the index published in URL")
    q.add_argument("--publish", action="append", metavar="URL", help="then publish the result beside the images")
    q.add_argument("--repository", default="lmi-inference", help="image repository the index lives in")
    q.set_defaults(func=commands.cmd_index_merge)
    return parser
