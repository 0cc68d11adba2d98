"""One test per compatibility rule: real shipped combinations pass, impossible ones fail naming the rule."""

from __future__ import annotations

import dataclasses

import pytest

from buildkit.rules import Combo as CoreCombo
from buildkit.rules import evaluate


def Combo(family, djl, deepspeed, torch, cuda, python, os, torch_cuda=None, driver=None,  # noqa: N802
          custom_bases=False, handler=None) -> CoreCombo:
    """A DeepSpeed profile combo, in the order these tests were written in."""
    return CoreCombo.of("deepspeed", family, torch, cuda, python, os, djl=djl, deepspeed=deepspeed, handler=handler,
                        torch_cuda=torch_cuda, driver=driver, custom_bases=custom_bases)

# What AWS actually shipped (compat.md §5/§8), on the instance families it served.
SHIPPED = [
    Combo("g5", "0.27.0", "0.12.6", "2.1.2", "12.1", "3.10", "ubuntu22.04"),  # LMI v9 DeepSpeed
    Combo("p4d", "0.26.0", "0.12.6", "2.1.2", "12.1", "3.10", "ubuntu22.04"),
    Combo("p5", "0.36.0", "0.18.9", "2.9.1", "12.8", "3.12", "ubuntu24.04"),
    Combo("g6", "0.35.0", "0.18.0", "2.9.0", "12.8", "3.12", "ubuntu24.04"),
]


def rules_of(combo: Combo, facts) -> set[str]:
    return {e.rule for e in evaluate(combo, facts).errors}


def only(combo: Combo, facts, rule: str) -> None:
    verdict = evaluate(combo, facts)
    assert {e.rule for e in verdict.errors} == {rule}, [e.text() for e in verdict.errors]
    for e in verdict.errors:
        assert e.source and e.fix, e


def test_shipped_combinations_pass(facts) -> None:
    for combo in SHIPPED:
        verdict = evaluate(combo, facts)
        assert verdict.ok, [e.text() for e in verdict.errors]


def test_python_39_shipped_with_djl_023_is_valid_on_torch_20(facts) -> None:
    combo = Combo("g5", "0.23.0", "0.10.0", "2.0.1", "11.8", "3.9", "ubuntu22.04")
    # DJL 0.23 ran DeepSpeed 0.9.5 (before our data) on ubuntu20.04 (not in our data): with 0.10.0 on
    # ubuntu22.04, which ships 3.10, only the OS half of the Python rule objects.
    assert rules_of(combo, facts) == {"python-range"}


# --- rule 1: the family's SM must be in the torch wheel ---------------------------------------------


def test_arch_in_wheel_p3_on_cu130(facts) -> None:
    combo = Combo("p3", "0.36.0", "0.18.9", "2.11.0", "12.9", "3.12", "ubuntu24.04", torch_cuda="12.9",
                  driver="575.57.08")
    only(combo, facts, "arch-in-wheel")  # 2.11+cu129 dropped sm_70 (pytorch#182250)


def test_arch_in_wheel_p6_needs_sm100_wheel(facts) -> None:
    combo = Combo("p6-b200", "0.36.0", "0.18.9", "2.9.1", "12.8", "3.12", "ubuntu24.04", torch_cuda="12.6",
                  driver="580.95.05")
    verdict = evaluate(combo, facts)
    assert "arch-in-wheel" in {e.rule for e in verdict.errors}
    fix = next(e.fix for e in verdict.errors if e.rule == "arch-in-wheel")
    assert "cuda 12.8" in fix or "cuda 12.9" in fix or "cuda 13.0" in fix


def test_arch_in_wheel_sm89_covered_by_sm86_cubin(facts) -> None:
    verdict = evaluate(Combo("g6e", "0.27.0", "0.12.6", "2.1.2", "12.1", "3.10", "ubuntu22.04", driver="550"), facts)
    assert verdict.ok and not verdict.ptx_only  # L40S runs the 8.6 cubin: same major, lower minor


def test_arch_in_wheel_aarch64_t4g_has_no_wheel(facts) -> None:
    combo = Combo("g5g", "0.36.0", "0.18.9", "2.10.0", "12.8", "3.12", "ubuntu24.04", driver="580.95.05")
    verdict = evaluate(combo, facts)
    assert "arch-in-wheel" in {e.rule for e in verdict.errors}
    assert "aarch64" in next(e.message for e in verdict.errors if e.rule == "arch-in-wheel")


def test_arch_coverage_cubin_and_ptx() -> None:
    from buildkit.facts import ArchEntry, coverage

    # "12.0+PTX" is torch's notation for the sm_120 cubin plus compute_120 PTX.
    entries = tuple(ArchEntry.parse(e) for e in ["7.5", "8.0", "8.6", "9.0", "10.0", "12.0+PTX"])
    assert coverage(entries, "12.1").via == "cubin sm_120"  # same major, lower minor
    assert coverage(entries, "10.3").via == "cubin sm_100"  # B300 runs B200 cubins
    assert coverage(entries, "13.0").ptx_only  # a newer major only through PTX JIT
    assert not coverage(entries, "7.0").covered  # PTX never runs on an older SM
    assert not coverage(tuple(ArchEntry.parse(e) for e in ["8.0", "8.6"]), "9.0").covered


def test_wheel_variant_must_be_published(facts) -> None:
    combo = Combo("g5", "0.27.0", "0.12.6", "2.1.2", "12.2", "3.10", "ubuntu22.04", driver="535.104.05")
    only(combo, facts, "wheel-variant")  # torch 2.1 has cu118 and cu121 only


# --- rule 2: nvcc must target the SM ----------------------------------------------------------------


def test_arch_in_nvcc_cuda13_cannot_build_sm70(facts) -> None:
    combo = Combo("p3", "0.36.0", "0.18.9", "2.9.1", "13.0", "3.12", "ubuntu24.04", torch_cuda="12.8",
                  driver="580.95.05")
    assert "arch-in-nvcc" in rules_of(combo, facts)


def test_arch_in_nvcc_cuda121_cannot_build_sm100(facts) -> None:
    combo = Combo("p6-b200", "0.27.0", "0.12.6", "2.1.2", "12.1", "3.10", "ubuntu22.04", driver="580.95.05")
    assert "arch-in-nvcc" in rules_of(combo, facts)


def test_arch_list_is_the_family_sm_only(facts) -> None:
    p5 = Combo("p5", "0.36.0", "0.18.9", "2.9.1", "12.8", "3.12", "ubuntu24.04")
    assert evaluate(p5, facts).arch_list == "9.0"


# --- rule 3: host driver --------------------------------------------------------------------------------


def test_host_driver_compat_on_default_470(facts) -> None:
    verdict = evaluate(SHIPPED[0], facts)
    assert verdict.ok and verdict.needs_compat
    assert "needs cuda-compat on the default 470 driver" in verdict.notes


def test_host_driver_native_needs_no_compat(facts) -> None:
    verdict = evaluate(Combo("p5", "0.27.0", "0.12.6", "2.1.2", "12.1", "3.10", "ubuntu22.04"), facts)
    assert verdict.ok and not verdict.needs_compat  # 535 >= 530.30.02


def test_host_driver_cuda129_on_470_is_impossible(facts) -> None:
    # 12.9's cuda-compat dropped R470 (aws/deep-learning-containers#4990).
    combo = Combo("g5", "0.36.0", "0.18.9", "2.9.1", "12.9", "3.12", "ubuntu24.04", torch_cuda="12.8")
    only(combo, facts, "host-driver")
    fix = evaluate(combo, facts).errors[0].fix
    assert "cuda 12.8" in fix and "inference_ami" in fix


def test_host_driver_minor_version_compat(facts) -> None:
    # R525 is not in 12.8's compat list, but 525.60.13 runs any 12.x through minor-version compatibility.
    verdict = evaluate(Combo("g5", "0.36.0", "0.18.9", "2.9.1", "12.8", "3.12", "ubuntu24.04", driver="525.85.12"),
                       facts)
    assert verdict.ok and not verdict.needs_compat
    assert any("minor-version compatibility" in n for n in verdict.notes)


def test_host_driver_b200_floor(facts) -> None:
    combo = Combo("p6-b200", "0.36.0", "0.18.9", "2.9.1", "12.8", "3.12", "ubuntu24.04", driver="565.57.01")
    only(combo, facts, "host-driver")


def test_host_driver_unknown_default_asks_for_ami(facts) -> None:
    combo = Combo("g6e", "0.36.0", "0.18.9", "2.9.1", "12.8", "3.12", "ubuntu24.04")
    only(combo, facts, "host-driver")
    assert "inference_ami" in evaluate(combo, facts).errors[0].fix


# --- rule 4: Python ranges ------------------------------------------------------------------------------


def test_deepspeed_classifiers_are_evidence_not_a_limit(facts) -> None:
    # DeepSpeed 0.16.2 names Python 3.6-3.10 in its classifiers and sets no python_requires: a note.
    combo = Combo("g5", "0.36.0", "0.16.2", "2.9.1", "12.6", "3.12", "ubuntu24.04", driver="570.124.06")
    verdict = evaluate(combo, facts)
    assert "python-range" not in {e.rule for e in verdict.errors}
    assert any("DeepSpeed 0.16.2's classifiers name Python 3.6-3.10, not 3.12" in n for n in verdict.notes)
    # From 0.16.3 the classifiers name 3.8-3.12 (setup.py at the tag): no note (the old data said 3.6-3.10).
    assert facts.stacks["deepspeed"].deepspeed_release("0.16.3").classifiers("0.16.3") == ("3.8", "3.12")
    assert facts.stacks["deepspeed"].deepspeed_release("0.16.9").classifiers("0.16.9") == ("3.8", "3.12")
    assert facts.stacks["deepspeed"].deepspeed_release("0.16.2").classifiers("0.16.2") == ("3.6", "3.10")


def test_python_outside_torch_range(facts) -> None:
    combo = Combo("g5", "0.23.0", "0.10.0", "2.0.1", "11.8", "3.12", "ubuntu24.04")
    messages = [e.message for e in evaluate(combo, facts).errors if e.rule == "python-range"]
    assert any("torch 2.0.1 has wheels for Python 3.8-3.11, not 3.12" in m for m in messages)


@pytest.mark.parametrize("minor,old,new", [
    ("2.2", ("3.8", "3.11"), ("3.8", "3.12")),  # cp312 wheels exist for 2.2.x
    ("2.3", ("3.8", "3.11"), ("3.8", "3.12")),
    ("2.5", ("3.9", "3.12"), ("3.9", "3.13")),  # cp313 wheels exist for 2.5.x
    ("2.13", ("3.10", "3.15"), ("3.10", "3.14")),  # cp315 wheels first appear in 2.15.0
    ("2.14", ("3.10", "3.15"), ("3.10", "3.14")),
])
def test_torch_python_ranges_follow_the_wheels(facts, minor, old, new) -> None:
    assert facts.torch[minor].python == new != old


def test_python_must_be_one_the_os_packages(facts) -> None:
    combo = Combo("g5", "0.27.0", "0.12.6", "2.1.2", "12.1", "3.9", "ubuntu22.04")
    verdict = evaluate(combo, facts)
    assert {e.rule for e in verdict.errors} == {"python-range"}
    assert any("ubuntu22.04 packages Python 3.10, not 3.9" in e.message for e in verdict.errors)


def test_djl_python_is_an_observation_not_a_requirement(facts) -> None:
    # AWS shipped DJL 0.31/0.32 with Python 3.11; DJL declares no Python requirement, so 3.10 on
    # ubuntu22.04 (and 3.12 on 24.04) is fine, with what AWS shipped as an observation.
    verdict = evaluate(Combo("g5", "0.31.0", "0.15.1", "2.5.1", "12.4", "3.10", "ubuntu22.04"), facts)
    assert verdict.ok, verdict.errors
    assert verdict.observations == ["AWS shipped DJL Serving 0.31.0 with Python 3.11 (this is 3.10)"]
    assert facts.stacks["deepspeed"].djl["0.32.0"].aws_python == "3.11"


# What AWS shipped as LMI DeepSpeed images (DJL 0.23-0.27), each with its own OS and Python.
AWS_SHIPPED = [
    ("g5", "0.23.0", "0.9.5", "2.0.1", "11.8", "3.9", "ubuntu20.04"),
    ("p4d", "0.24.0", "0.10.0", "2.0.1", "11.8", "3.9", "ubuntu20.04"),
    ("g4dn", "0.25.0", "0.11.0", "2.0.1", "11.8", "3.9", "ubuntu20.04"),
    ("g5", "0.26.0", "0.12.6", "2.1.2", "12.1", "3.10", "ubuntu22.04"),
    ("p4d", "0.27.0", "0.12.6", "2.1.2", "12.1", "3.10", "ubuntu22.04"),
    ("p5", "0.27.0", "0.12.6", "2.1.2", "12.1", "3.10", "ubuntu22.04"),
]


@pytest.mark.parametrize("combo", AWS_SHIPPED)
def test_what_aws_shipped_passes(facts, combo) -> None:
    verdict = evaluate(Combo(*combo), facts)
    assert verdict.ok, [e.text() for e in verdict.errors]


@pytest.mark.parametrize("combo,rule", [
    (("g5", "0.23.0", "0.9.5", "2.0.1", "11.8", "3.10", "ubuntu20.04"), "python-range"),  # focal has 3.8, 3.9
    (("p6-b200", "0.27.0", "0.12.6", "2.1.2", "12.1", "3.10", "ubuntu22.04"), "arch-in-wheel"),
    (("g5", "0.27.0", "0.12.6", "2.1.2", "12.4", "3.10", "ubuntu22.04", "12.1"), "deepspeed-cuda"),
])
def test_impossible_ones_still_fail_naming_the_rule(facts, combo, rule) -> None:
    assert rule in {e.rule for e in evaluate(Combo(*combo), facts).errors}


# --- rule 5: base image exists --------------------------------------------------------------------------


def test_base_image_cuda124_has_no_ubuntu2404(facts) -> None:
    combo = Combo("g5", "0.36.0", "0.18.9", "2.5.1", "12.4", "3.12", "ubuntu24.04")
    only(combo, facts, "base-image")
    assert "os ubuntu22.04" in evaluate(combo, facts).errors[0].fix


# --- rule 6: every version known, with did-you-mean -----------------------------------------------------


def test_unknown_versions_suggest_nearest(facts) -> None:
    combo = Combo("g5", "0.27.1", "0.12.7", "2.1.3", "12.3", "3.1", "ubuntu22.4")
    errors = {e.field: e for e in evaluate(combo, facts).errors if e.rule == "known-version"}
    assert set(errors) == {"djl", "deepspeed", "torch", "cuda", "python", "os"}
    assert errors["torch"].fix.startswith("2.1.2")
    assert errors["deepspeed"].fix.startswith("0.12.6")
    assert errors["python"].fix.startswith("3.10")  # the float 3.10 read as 3.1
    assert errors["os"].fix.startswith("ubuntu22.04")


def test_unknown_family(facts) -> None:
    verdict = evaluate(Combo("g55", "0.27.0", "0.12.6", "2.1.2", "12.1", "3.10", "ubuntu22.04"), facts)
    assert [e.fix.split(" or ")[0] for e in verdict.errors if e.field == "family"] == ["g5"]


# --- DeepSpeed: nvcc and torch CUDA must be the same major, minors in its tolerance list ---------------


def test_deepspeed_cuda_minor_mismatch_refused_by_old_release(facts) -> None:
    combo = Combo("p5", "0.36.0", "0.16.3", "2.9.1", "12.8", "3.10", "ubuntu22.04", torch_cuda="12.6")
    verdict = evaluate(combo, facts)
    dsc = [e for e in verdict.errors if e.rule == "deepspeed-cuda"]
    assert dsc and dsc[0].fix == "deepspeed 0.16.4"  # 12.8 accepted from 0.16.4


def test_deepspeed_cuda_major_mismatch(facts) -> None:
    combo = Combo("p5", "0.36.0", "0.18.9", "2.9.1", "13.0", "3.12", "ubuntu24.04", torch_cuda="12.8",
                  driver="580.95.05")
    assert "deepspeed-cuda" in rules_of(combo, facts)


# What op_builder/*.py says at each pinned tag: (family, DeepSpeed) -> ops below the SM floor, ops built.
BUILT_0189 = {"spatial_inference", "transformer_inference"}  # the ops DeepSpeed's inference code loads
NOT_SERVING_0189 = {"async_io", "cpu_adagrad", "cpu_adam", "cpu_lion", "fused_adam", "fused_lamb", "fused_lion",
                    "inference_core_ops", "quantizer", "ragged_ops", "random_ltd", "stochastic_transformer",
                    "transformer", "utils"}  # buildable for every family, left to DeepSpeed's JIT build
NEEDS_0189 = {"cutlass_ops", "ragged_device_ops", "fp_quantizer", "evoformer_attn", "sparse_attn", "gds", "dc"}


@pytest.mark.parametrize("family,below_floor", [
    ("p3", {"cutlass_ops", "fp_quantizer", "ragged_device_ops"}),  # sm_70: evoformer's 7.0 floor is met
    ("g4dn", {"cutlass_ops", "fp_quantizer", "ragged_device_ops"}),
    ("g5", set()), ("p4d", set()), ("p5", set()),
])
def test_deepspeed_0189_op_switches_per_family(facts, family, below_floor) -> None:
    verdict = evaluate(Combo(family, "0.36.0", "0.18.9", "2.9.1", "12.8", "3.12", "ubuntu24.04",
                             driver="570.124.06"), facts)
    assert verdict.ok, verdict.errors
    assert set(verdict.stack["ops"]["skipped"]) == below_floor
    assert set(verdict.stack["ops"]["built"]) == BUILT_0189
    assert set(verdict.stack["ops"]["off"]) == NEEDS_0189 | NOT_SERVING_0189
    assert "training only" in verdict.stack["ops"]["off"]["cpu_adam"]
    for op in below_floor:
        assert "needs sm_80+" in verdict.stack["ops"]["off"][op] and family in verdict.stack["ops"]["off"][op]
    ragged = verdict.stack["ops"]["off"]["ragged_device_ops"]
    assert "dskernels" in ragged or "sm_80" in ragged
    assert "ragged_ops" not in verdict.stack["ops"]["skipped"]  # floor 6.0 (ragged_utils.py), not the 8.0 device op


def test_deepspeed_0126_has_no_utils_gds_or_fp_quantizer(facts) -> None:
    verdict = evaluate(Combo("g5", "0.27.0", "0.12.6", "2.1.2", "12.1", "3.10", "ubuntu22.04",
                             driver="535.104.05"), facts)
    assert verdict.ok, verdict.errors
    assert set(verdict.stack["ops"]["built"]) == BUILT_0189  # the serving ops exist from 0.10.0
    assert set(verdict.stack["ops"]["off"]) == ({"cutlass_ops", "ragged_device_ops", "evoformer_attn", "sparse_attn"}
                                                 | NOT_SERVING_0189 - {"utils"})
    names = {op.name: op for op in facts.stacks["deepspeed"].ops_of("0.12.6")}
    assert names["ragged_device_ops"].build_var == "DS_BUILD_RAGGED_DEVICE_OPS"
    assert names["ragged_ops"].build_var == "DS_BUILD_RAGGED_OPS" and names["ragged_ops"].sm == "6.0"
    assert names["cutlass_ops"].build_var == "DS_BUILD_CUTLASS_OPS" and names["cutlass_ops"].sm == "8.0"


# --- Java ---------------------------------------------------------------------------------------------


def test_java_floor_is_met_by_every_os(facts) -> None:
    for system in facts.systems.values():
        for djl in facts.stacks["deepspeed"].djl.values():
            assert int(system.java) >= int(djl.java)


# --- suggestions are real: applying a fix makes the rule pass ------------------------------------------


@pytest.mark.parametrize("combo,field,value", [
    (Combo("g5", "0.36.0", "0.18.9", "2.9.1", "12.9", "3.12", "ubuntu24.04", torch_cuda="12.8"), "cuda", "12.8"),
    (Combo("g5", "0.36.0", "0.18.9", "2.5.1", "12.4", "3.12", "ubuntu24.04"), "os", "ubuntu22.04"),
])
def test_suggested_fix_passes_its_rule(facts, combo, field, value) -> None:
    before = rules_of(combo, facts)
    fixed = dataclasses.replace(combo, **{field: value})
    after = rules_of(fixed, facts)
    assert before - after, (before, after)


def test_cpu_family_skips_gpu_rules(facts) -> None:
    verdict = evaluate(Combo("cpu", "0.36.0", "0.18.9", "2.9.1", None, "3.12", "ubuntu24.04"), facts)
    assert verdict.ok and verdict.wheel_variant == "cpu" and verdict.arch_list is None
