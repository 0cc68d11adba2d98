"""Matrix parsing and expansion, and every kind of bad input: exit 2, one clear file:line message each,
no traceback (through the real `lmi` console script)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import LINE_027, ROOT, lmi

from buildkit import matrix
from buildkit.errors import UserError

FLEET = """
schema: 1
families:
  g4dn: {}
  g5: {}
  p5: {}
  cpu: {}
lines:
"""


def load(path: Path, facts) -> matrix.Matrix:
    return matrix.load(path, facts)


def test_production_matrix_expands_lines_times_families(facts) -> None:
    m = load(ROOT / "matrix.yaml", facts)
    ids = [i.id for i in m.images]
    assert len(ids) == len(set(ids))
    lines = {i.line for i in m.images}
    assert {"djl0.27", "djl0.36"} <= lines
    # Derived from the file itself, not pinned: every line x every family of `families`, minus its `exclude`.
    doc = yaml.safe_load((ROOT / "matrix.yaml").read_text())
    expected = [f"{line}-{fam}" for line, body in doc["lines"].items() for fam in body.get("include", doc["families"])
                if fam not in body.get("exclude", {})]
    assert ids == expected
    assert {i.family for i in m.images} == set(doc["families"])
    assert any(body.get("exclude") for body in doc["lines"].values())  # the production fleet has an exclusion


def test_all_fleet_families_minus_exclude(write_matrix, facts) -> None:
    path = write_matrix(FLEET + LINE_027 + "    exclude: {p5: \"testing\"}\n")
    m = load(path, facts)
    assert [i.id for i in m.images] == ["djl0.27-g4dn", "djl0.27-g5", "djl0.27-cpu"]
    cpu = m.images[-1]
    assert cpu.combo.cuda is None and cpu.combo.torch == "2.1.2"


def test_include_selects_and_keeps_order(write_matrix, facts) -> None:
    path = write_matrix(FLEET + LINE_027 + "    include: [p5, g5]\n")
    assert [i.id for i in load(path, facts).images] == ["djl0.27-p5", "djl0.27-g5"]


def test_overrides_apply_to_one_family_and_record_their_line(write_matrix, facts) -> None:
    path = write_matrix(FLEET + LINE_027 + "    overrides:\n      g5:\n        torch: \"2.1.1\"\n")
    images = {i.family: i for i in load(path, facts).images}
    assert images["g5"].combo.torch == "2.1.1" and images["p5"].combo.torch == "2.1.2"
    text = path.read_text().splitlines()
    assert text[images["g5"].line_of("torch") - 1].strip() == 'torch: "2.1.1"'


def test_family_driver_and_ami_overrides(write_matrix, facts) -> None:
    fleet = FLEET.replace("g5: {}", "g5: {driver: \"535.104.05\"}").replace(
        "p5: {}", "p5: {inference_ami: al2-ami-sagemaker-inference-gpu-3-1}")
    images = {i.family: i for i in load(write_matrix(fleet + LINE_027), facts).images}
    assert images["g5"].combo.driver == "535.104.05"
    assert images["p5"].combo.driver == "550" and images["p5"].inference_ami.endswith("gpu-3-1")
    assert images["g4dn"].combo.driver is None  # the documented default applies


def test_pip_pins(write_matrix, facts) -> None:
    path = write_matrix(FLEET + LINE_027 + "    pip: [\"numpy==1.26.4\"]\n")
    assert load(path, facts).images[0].pip == ("numpy==1.26.4",)


# --- bad input: each one exit 2, file:line, what is wrong, how to fix, no traceback ---------------------


def bad(path: Path, *expected: str) -> str:
    result = lmi("--matrix", str(path), "validate")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    for text in expected:
        assert re.search(text, result.stderr), (text, result.stderr)
    return result.stderr


def test_missing_matrix_file(tmp_path) -> None:
    bad(tmp_path / "nope.yaml", r"nope\.yaml: file not found; pass an existing file with --matrix")


def test_malformed_yaml(write_matrix) -> None:
    path = write_matrix(FLEET + LINE_027 + "    exclude: {p5: \"x\"\n")
    bad(path, r"matrix\.yaml:\d+: malformed YAML: .*; fix the syntax at that line")


def test_empty_file(write_matrix) -> None:
    bad(write_matrix(""), r"matrix\.yaml: the file is empty")


def test_list_where_mapping_belongs(write_matrix) -> None:
    path = write_matrix("schema: 1\nfamilies: {g5: {}}\nlines:\n  - djl: \"0.27.0\"\n")
    bad(path, r"matrix\.yaml:4: lines must be a mapping, got a list")


def test_top_level_list(write_matrix) -> None:
    bad(write_matrix("- a\n- b\n"), r"matrix\.yaml:1: the matrix must be a mapping")


def test_unknown_keys_suggest(write_matrix) -> None:
    text = FLEET + LINE_027.replace('    cuda: "12.1"', '    cudaa: "12.1"')
    err = bad(write_matrix(text), r"matrix\.yaml:\d+: unknown key 'cudaa' in line 'djl0.27'; did you mean 'cuda'")
    assert "builds GPU families but has no 'cuda'" in err


def test_unknown_top_level_key(write_matrix) -> None:
    bad(write_matrix("famillies: {}\n" + FLEET + LINE_027), r"matrix\.yaml:1: unknown key 'famillies'.*'families'")


def test_wrong_types(write_matrix) -> None:
    text = FLEET + LINE_027.replace('    os: ubuntu22.04', '    os: [ubuntu22.04]') + "    pip: numpy\n"
    bad(write_matrix(text), r"os must be a non-empty string, got a list", r"pip must be a list of pinned")


def test_float_version_is_rejected_with_its_text(write_matrix) -> None:
    text = FLEET + LINE_027.replace('    cuda: "12.1"', '    cuda: 12.10')
    err = bad(write_matrix(text), r"matrix\.yaml:(\d+): line 'djl0.27': cuda is the number 12\.10.*cuda: \"12\.10\"")
    line = int(re.search(r"matrix\.yaml:(\d+)", err).group(1))
    assert (Path(err.split(":")[0]).read_text().splitlines()[line - 1]).strip() == "cuda: 12.10"


def test_int_and_bool_versions(write_matrix) -> None:
    text = FLEET + LINE_027.replace('    python: "3.10"', '    python: 3').replace('    os: ubuntu22.04', '    os: yes')
    bad(write_matrix(text), r"python is the number 3", r"os must be a non-empty string, got a boolean")


def test_duplicate_key(write_matrix) -> None:
    text = FLEET + LINE_027 + LINE_027
    bad(write_matrix(text), r"matrix\.yaml:\d+: duplicate key 'djl0.27' \(first at line \d+\)")


def test_duplicate_ids(write_matrix) -> None:
    bad(write_matrix(FLEET + LINE_027 + "    include: [g5, g5]\n"),
        r"matrix\.yaml:\d+: duplicate image id 'djl0.27-g5' \(also at line \d+\)")


def test_unknown_family(write_matrix) -> None:
    bad(write_matrix(FLEET.replace("g5: {}", "g55: {}") + LINE_027),
        r"matrix\.yaml:4: unknown instance family 'g55'; did you mean 'g5'")


def test_unknown_version_in_validation(write_matrix) -> None:
    text = FLEET + LINE_027.replace('torch: "2.1.2"', 'torch: "2.1.3"')
    err = bad(write_matrix(text), r"matrix\.yaml:12: image djl0.27-g5: unknown torch '2.1.3' \(known-version, .*\); "
                                  r"try 2\.1\.2")
    assert len([line for line in err.splitlines() if "unknown torch" in line]) == 4  # one line per image


def test_impossible_combination_names_rule_and_line(write_matrix) -> None:
    text = FLEET.replace("p5: {}", "p6-b200: {inference_ami: al2023-ami-sagemaker-inference-gpu-4-1}") + LINE_027
    # Each finding points at the line of the component it blames: torch for the wheel, cuda for nvcc.
    bad(write_matrix(text), r"matrix\.yaml:12: image djl0.27-p6-b200: .* \(arch-in-wheel, .*\); try ",
        r"matrix\.yaml:13: image djl0.27-p6-b200: nvcc 12.1 cannot compile for p6-b200's sm_100 \(arch-in-nvcc")


def test_exclude_needs_reason_and_known_family(write_matrix) -> None:
    bad(write_matrix(FLEET + LINE_027 + "    exclude: {p5: \"\", p55: \"x\"}\n"),
        r"exclude.p5 must say why", r"exclude names 'p55'.*did you mean 'p5'")


def test_unknown_ami(write_matrix) -> None:
    bad(write_matrix(FLEET.replace("g5: {}", "g5: {inference_ami: al2-gpu-3}") + LINE_027),
        r"unknown inference_ami 'al2-gpu-3'; did you mean")


def test_bad_line_name(write_matrix) -> None:
    bad(write_matrix(FLEET + LINE_027.replace("djl0.27:", "DJL 0.27:")), r"line names are lowercase")


def test_schema_version(write_matrix) -> None:
    bad(write_matrix(FLEET.replace("schema: 1", "schema: 2") + LINE_027), r"matrix\.yaml:1: schema must be 1")


def test_user_error_is_importable_for_api_callers(write_matrix, facts) -> None:
    with pytest.raises(UserError) as info:
        load(write_matrix(FLEET + LINE_027.replace('cuda: "12.1"', "cuda: 12.1")), facts)
    assert info.value.exit_code == 2


def test_paths_are_relative_to_the_matrix_and_typed(write_matrix, facts) -> None:
    m = load(write_matrix("output: out\n" + FLEET + LINE_027), facts)
    assert m.output == m.path.parent / "out" and m.templates == m.path.parent / "templates"
    bad(write_matrix("output: 3\n" + FLEET + LINE_027), r"matrix\.yaml:1: the matrix: output must be a non-empty")


def test_cpu_only_line_needs_no_cuda(write_matrix, facts) -> None:
    text = FLEET + LINE_027.replace('    cuda: "12.1"\n', "") + "    include: [cpu]\n"
    images = load(write_matrix(text), facts).images
    assert [i.id for i in images] == ["djl0.27-cpu"] and images[0].combo.cuda is None


def test_base_mirror_and_build_args(write_matrix, facts) -> None:
    m = load(write_matrix("base_mirror: mirror.example/hub\nbuild_args: {PIP_INDEX_URL: \"https://i\"}\n"
                          + FLEET + LINE_027), facts)
    assert m.base_mirror == "mirror.example/hub" and m.build_args == {"PIP_INDEX_URL": "https://i"}
    bad(write_matrix("build_args: {PIP_INDEX_URL: 3, bad-name: x}\n" + FLEET + LINE_027),
        r"matrix\.yaml:1: build_args: PIP_INDEX_URL must be a string", r"'bad-name' is not a build argument name")
