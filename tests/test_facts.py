"""The compatibility data itself: it loads, is internally consistent, and says where each fact came from."""

from __future__ import annotations

import re

from buildkit import versions
from buildkit.facts import variant_cuda, variant_name


def test_every_family_fact_has_a_source(facts) -> None:
    for fam in facts.families.values():
        if fam.is_gpu:
            assert {"gpu", "sm", "default_driver"} <= set(fam.sources), fam.name
            assert fam.default_driver or fam.unverified, f"{fam.name}: no driver and no reason"


def test_toolkits_are_consistent(facts) -> None:
    ubuntus = {s.ubuntu for s in facts.systems.values()}
    for tk in facts.toolkits.values():
        assert tk.patch.startswith(tk.version + ".")
        assert versions.is_numeric(tk.min_driver)
        assert tk.nvcc_archs == tuple(sorted(tk.nvcc_archs, key=versions.key))
        assert set(tk.ubuntu) & ubuntus or tk.version == "11.8"
        assert tk.major in facts.minor_compat


def test_torch_variants_exist_as_toolkits_or_cpu(facts) -> None:
    for rel in facts.torch.values():
        assert all(v.startswith(rel.minor + ".") for v in rel.versions)
        assert rel.pypi_variant is None or rel.pypi_variant in rel.variants
        for name, var in rel.variants.items():
            assert name == variant_name(variant_cuda(name))
            for entries in var.archs.values():
                sms = [versions.key(e.sm) for e in entries]
                assert sms == sorted(sms), (rel.minor, name)
            if name != "cpu":
                assert var.source in facts.sources["torch"], (rel.minor, name)


def test_known_facts_from_the_reference(facts) -> None:
    # A few facts the rules depend on, spelled out so a data edit that breaks them is noticed.
    assert "7.0" not in facts.toolkits["13.0"].nvcc_archs
    assert "470" not in facts.toolkits["12.9"].compat_branches
    assert "470" in facts.toolkits["12.8"].compat_branches
    assert "24.04" not in facts.toolkits["12.4"].ubuntu
    assert facts.families["g5"].sm == "8.6" and facts.families["p6-b200"].sm == "10.0"
    assert facts.torch["2.1"].pypi_variant == "cu121"
    assert facts.deepspeed_release("0.16.4").accepted_cuda12_minors("0.16.4")[-1] == "12.8"
    assert "12.8" not in facts.deepspeed_release("0.16.3").accepted_cuda12_minors("0.16.3")


def test_djl_checksums_are_real_or_explained(facts) -> None:
    for rel in facts.djl.values():
        assert rel.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", rel.sha256)
    assert "sha256sum" in facts.djl_checksum_unknown
    assert "{version}" in facts.djl_package_url


def test_nearest_versions() -> None:
    assert versions.nearest("13.0", ["11.8", "12.1", "12.8", "12.9"], 2) == ["12.9", "12.8"]
    assert versions.nearest("3.1", [f"3.{m}" for m in range(8, 13)], 1) == ["3.10"]
    assert versions.nearest("g55", ["g5", "g6", "p5"], 1) == ["g5"]
    assert versions.at_least("535.104.05", "535.54.03") and not versions.at_least("535", "535.104.05")
    assert versions.in_range("3.12", ("3.8", "3.12")) and not versions.in_range("3.13", ("3.8", "3.12"))
