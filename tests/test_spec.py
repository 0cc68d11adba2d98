"""Image specs: tags, aliases, labels, torch wheel selection and the content hash."""

from __future__ import annotations

import re

import pytest
from conftest import LINE_027, ROOT

from buildkit import build, matrix, render
from buildkit.spec import SAGEMAKER_BIND_LABEL, content_hash, resolve

TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")  # the OCI distribution spec's tag grammar


@pytest.fixture(scope="module")
def production(facts):
    return {s.id: s for s in resolve(matrix.load(ROOT / "matrix.yaml", facts), facts)}


def test_full_tag_grammar(production) -> None:
    assert production["djl0.27-g5"].tag == "0.27.0-deepspeed0.12.6-torch2.1.2-cu121-py310-ubuntu22.04-g5"
    assert production["djl0.36-cpu"].tag == "0.36.0-deepspeed0.18.9-torch2.9.1-cpu-py312-ubuntu24.04-cpu"
    tags = [s.tag for s in production.values()]
    assert len(tags) == len(set(tags))
    assert all(TAG.match(t) for t in tags)


def test_aliases_belong_to_the_newest_image(production) -> None:
    assert production["djl0.27-g5"].aliases == ("deepspeed0.12-g5", "djl0.27-g5")
    assert production["djl0.36-g5"].aliases == ("deepspeed0.18-g5", "djl0.36-g5", "g5-latest")
    everything = [a for s in production.values() for a in s.aliases]
    assert len(everything) == len(set(everything))  # an alias never points at two images
    assert all(TAG.match(a) for a in everything)


def test_newer_line_with_same_deepspeed_minor_takes_the_alias(write_matrix, facts) -> None:
    text = "schema: 1\nfamilies: {g5: {}}\nlines:" + LINE_027 + LINE_027.replace("djl0.27:", "djl0.26:").replace(
        '"0.27.0"', '"0.26.0"')
    specs = {s.id: s for s in resolve(matrix.load(write_matrix(text), facts), facts)}
    assert "deepspeed0.12-g5" in specs["djl0.27-g5"].aliases
    assert "deepspeed0.12-g5" not in specs["djl0.26-g5"].aliases
    assert specs["djl0.26-g5"].aliases == ("djl0.26-g5",)


def test_labels(production) -> None:
    labels = production["djl0.27-g5"].labels
    assert labels[SAGEMAKER_BIND_LABEL] == "true"
    for key, value in {"io.lmi.cuda": "12.1.1", "io.lmi.torch": "2.1.2", "io.lmi.deepspeed": "0.12.6",
                       "io.lmi.djl-serving": "0.27.0", "io.lmi.python": "3.10", "io.lmi.transformers": "4.39.0",
                       "io.lmi.diffusers": "0.26.3", "io.lmi.accelerate": "0.27.2", "io.lmi.sm": "8.6",
                       "io.lmi.cuda-compat": "true", "io.lmi.java": "17"}.items():
        assert labels[key] == value
    for key in ("title", "description", "version", "licenses", "base.name"):
        assert labels[f"org.opencontainers.image.{key}"]
    assert labels["org.opencontainers.image.version"] == production["djl0.27-g5"].tag


def test_torch_wheel_selection(production, write_matrix, facts) -> None:
    g5 = production["djl0.27-g5"]
    assert (g5.torch_requirement, g5.torch_index) == ("torch==2.1.2", None)  # PyPI's 2.1.2 is cu121
    cpu = production["djl0.27-cpu"]
    assert cpu.torch_requirement == "torch==2.1.2+cpu" and cpu.torch_index.endswith("/cpu")
    text = "schema: 1\nfamilies: {g5: {}}\nlines:" + LINE_027.replace('cuda: "12.1"', 'cuda: "11.8"')
    cu118 = resolve(matrix.load(write_matrix(text), facts), facts)[0]
    assert cu118.torch_requirement == "torch==2.1.2+cu118" and cu118.torch_index.endswith("/cu118")


def test_arch_list_and_bases(production) -> None:
    g4dn = production["djl0.36-g4dn"]
    assert g4dn.arch_list == "7.5"
    assert g4dn.bases == ("nvidia/cuda:12.8.1-devel-ubuntu24.04", "nvidia/cuda:12.8.1-base-ubuntu24.04")
    assert production["djl0.36-cpu"].bases == ("ubuntu:24.04",)


def test_content_hash_is_stable_and_sensitive() -> None:
    files = {"Dockerfile": b"FROM x\n", "a.txt": b"a"}
    base = content_hash(files, {"A": "1"}, ["x"], {"a.txt": 0o644})
    assert base == content_hash(dict(reversed(files.items())), {"A": "1"}, ["x"], {"a.txt": 0o644})
    assert base != content_hash({**files, "a.txt": b"b"}, {"A": "1"}, ["x"], {"a.txt": 0o644})
    assert base != content_hash({**files, "b.txt": b""}, {"A": "1"}, ["x"], {"a.txt": 0o644})
    assert base != content_hash(files, {"A": "2"}, ["x"], {"a.txt": 0o644})
    assert base != content_hash(files, {"A": "1"}, ["y"], {"a.txt": 0o644})
    assert base != content_hash(files, {"A": "1"}, ["x"], {"a.txt": 0o755})


def test_plan_hash_changes_only_for_the_image_whose_input_changed(write_matrix, facts) -> None:
    text = "schema: 1\nfamilies: {g5: {}, p5: {}}\nlines:" + LINE_027
    path = write_matrix(text)

    def hashes(p):
        m = matrix.load(p, facts)
        return {pl.spec.id: pl.content_hash for pl, _ in render.plan(resolve(m, facts), render.Renderer(m.templates))}

    first, again = hashes(path), hashes(path)
    assert first == again
    bumped = write_matrix(text + "    overrides: {g5: {transformers: \"4.40.0\"}}\n")
    after = hashes(bumped)
    assert after["djl0.27-p5"] == first["djl0.27-p5"]
    assert after["djl0.27-g5"] != first["djl0.27-g5"]
    m = matrix.load(path, facts)
    with_args = {pl.spec.id: pl.content_hash
                 for pl, _ in render.plan(resolve(m, facts), render.Renderer(m.templates), {"PIP_INDEX_URL": "x"})}
    assert with_args["djl0.27-p5"] != first["djl0.27-p5"]


def test_duplicate_full_tags_are_refused_and_tag_suffix_tells_lines_apart(write_matrix, facts) -> None:
    from buildkit.errors import UserError

    twin = LINE_027.replace("djl0.27:", "djl0.27b:").replace('accelerate: "0.27.2"', 'accelerate: "0.28.0"')
    text = "schema: 1\nfamilies: {g5: {}}\nlines:" + LINE_027 + twin
    with pytest.raises(UserError, match=r"image djl0.27b-g5: its immutable tag .* is also djl0.27-g5's; tell the "
                                        r"lines apart with tag_suffix"):
        resolve(matrix.load(write_matrix(text), facts), facts)
    specs = {s.id: s for s in resolve(matrix.load(write_matrix(text + "    tag_suffix: acc028\n"), facts), facts)}
    assert specs["djl0.27b-g5"].tag.endswith("-g5-acc028")
    assert specs["djl0.27b-g5"].aliases == ("deepspeed0.12-g5-acc028", "djl0.27-g5-acc028", "g5-acc028-latest")
    assert specs["djl0.27-g5"].aliases == ("deepspeed0.12-g5", "djl0.27-g5", "g5-latest")


def test_plan_hashes_what_an_image_is_not_where_it_is_fetched(write_matrix, facts) -> None:
    m = matrix.load(write_matrix("schema: 1\nfamilies: {g5: {}}\nlines:" + LINE_027), facts)
    specs, renderer = resolve(m, facts), render.Renderer(m.templates)
    (plain, _), = render.plan(specs, renderer, {"M": "matrix"})
    spec = plain.spec
    # Where this host fetches from: in the build's args, not in the hash.
    options = build.BuildOptions(base_mirror="mirror.example/hub", pip_index_url="https://u:p@index.example/simple")
    (hosted, _), = render.plan(specs, renderer, {"M": "matrix"},
                               host_args=lambda s: build.host_args(s, options, {}, "lmi-wheelhouse:0"))
    assert hosted.content_hash == plain.content_hash
    assert hosted.build_args["RUNTIME_IMAGE"] == f"mirror.example/hub/{spec.runtime_image}"
    assert hosted.build_args["PIP_INDEX_URL"] == "https://index.example/simple"  # never the credentials
    assert hosted.build_args["WHEELHOUSE"] == "lmi-wheelhouse:0" and hosted.build_args["M"] == "matrix"
    # A base pinned to a digest (--pin-bases) is content: a new digest, a new hash; the build pulls it by digest
    # through the mirror.
    digest = "sha256:" + "a" * 64
    pins = {spec.runtime_image: digest}
    (pinned, _), = render.plan(specs, renderer, {"M": "matrix"}, pinned=pins,
                               host_args=lambda s: build.host_args(s, options, pins, None))
    assert pinned.content_hash != plain.content_hash
    assert f"{spec.runtime_image}@{digest}" in pinned.content_bases
    assert pinned.build_args["RUNTIME_IMAGE"] == (f"mirror.example/hub/{spec.runtime_image.rsplit(':', 1)[0]}"
                                                  f"@{digest}")
    # --build-arg is content and wins over what the host sets.
    (extra, _), = render.plan(specs, renderer, {"M": "matrix"}, extra_args={"PIP_INDEX_URL": "https://mine"},
                              host_args=lambda s: build.host_args(s, options, {}, None))
    assert extra.content_hash != plain.content_hash and extra.build_args["PIP_INDEX_URL"] == "https://mine"


def test_sagemaker_cuda_label_follows_the_pinned_ami(facts) -> None:
    """LMI's com.amazonaws.sagemaker.inference.cuda.verified_versions names the CUDA version of the host driver
    the image is verified on: set where the matrix pins an InferenceAmiVersion, from that AMI's driver."""
    from buildkit.spec import SAGEMAKER_CUDA_LABEL

    production = {s.id: s for s in resolve(matrix.load(ROOT / "matrix.yaml", facts), facts)}
    pinned = [s for s in production.values() if s.inference_ami]
    assert pinned, "matrix.yaml pins no inference_ami any more: pick another case"
    for spec in pinned:
        assert spec.labels[SAGEMAKER_CUDA_LABEL] == facts.ami_cuda[spec.inference_ami]
    assert all(SAGEMAKER_CUDA_LABEL not in s.labels for s in production.values() if not s.inference_ami)
