"""The compatibility data itself: it loads, is internally consistent, and says where each fact came from."""

from __future__ import annotations

import os
import re

import pytest
from conftest import lmi

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
    assert facts.stacks["deepspeed"].deepspeed_release("0.16.4").accepted_cuda12_minors("0.16.4")[-1] == "12.8"
    assert "12.8" not in facts.stacks["deepspeed"].deepspeed_release("0.16.3").accepted_cuda12_minors("0.16.3")


def test_djl_checksums_are_real_or_explained(facts) -> None:
    for rel in facts.stacks["deepspeed"].djl.values():
        assert rel.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", rel.sha256)
    assert "sha256sum" in facts.stacks["deepspeed"].djl_checksum_unknown
    assert "{version}" in facts.stacks["deepspeed"].djl_package_url


def test_nearest_versions() -> None:
    assert versions.nearest("13.0", ["11.8", "12.1", "12.8", "12.9"], 2) == ["12.9", "12.8"]
    assert versions.nearest("3.1", [f"3.{m}" for m in range(8, 13)], 1) == ["3.10"]
    assert versions.nearest("g55", ["g5", "g6", "p5"], 1) == ["g5"]
    assert versions.at_least("535.104.05", "535.54.03") and not versions.at_least("535", "535.104.05")
    assert versions.in_range("3.12", ("3.8", "3.12")) and not versions.in_range("3.13", ("3.8", "3.12"))


# --- `lmi facts verify`: the data against the package index ----------------------------------------------


def _index_reachable() -> bool:
    from buildkit import verify

    try:
        verify.fetch_files("deepspeed")
        return True
    except verify.IndexUnreachable:
        return False


def test_facts_verify_reports_no_drift_against_the_index() -> None:
    if not _index_reachable():
        pytest.skip("the package index is unreachable from here: `lmi facts verify` cannot run")
    import time

    start = time.monotonic()
    result = lmi("facts", "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "facts match the index" in result.stdout and time.monotonic() - start < 60


def test_facts_verify_finds_drift_on_a_local_index(facts, tmp_path) -> None:
    """A loopback index whose torch 2.2 has no cp312 wheel, and where DeepSpeed 0.12.6 is missing."""
    import http.server
    import json
    import threading

    from buildkit import verify

    files = {"torch": [], "deepspeed": [], "numpy": ["numpy-1.26.4.tar.gz"],
             "vllm": [f"vllm-{v}-cp38-abi3-manylinux_2_28_x86_64.whl" for v in facts.stacks["vllm"].releases]}
    for release in facts.torch.values():
        for version in release.versions:
            lo, hi = release.python
            top = 11 if version.startswith("2.2.") else int(hi.split(".")[1])
            files["torch"] += [f"torch-{version}-cp3{m}-cp3{m}-manylinux_2_28_x86_64.whl"
                               for m in range(int(lo.split(".")[1]), top + 1)]
    known = facts.stacks["deepspeed"].deepspeed_versions
    files["deepspeed"] = [f"deepspeed-{v}.tar.gz" for v in known if v != "0.12.6"]

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.strip("/").split("/")[-1]
            body = json.dumps({"files": [{"filename": f} for f in files.get(name, [])]}).encode()
            self.send_response(200 if name in files else 404)
            self.send_header("Content-Type", "application/vnd.pypi.simple.v1+json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        drift, checked = verify.verify(facts, ["numpy==1.26.4"], base=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert checked > 100
    assert drift == [
        "torch 2.2: the data says Python 3.8-3.12, the wheels of every 2.2.x cover 3.8-3.11 "
        "(buildkit/data/torch.yaml)",
        "deepspeed 0.12.6: not on the index (buildkit/data/deepspeed.yaml)",
    ]


def test_facts_verify_without_an_index_is_a_clear_error(monkeypatch) -> None:
    result = lmi("facts", "verify", env={**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/simple"})
    assert result.returncode == 2 and "the package index is unreachable" in result.stderr
    assert "Traceback" not in result.stderr


def test_cuda132_decides_the_newest_torch_line(facts) -> None:
    """torch 2.15.0's PyPI wheel is cu132: CUDA 13.2's entry (nvcc's arch list, the cuda-compat branches) decides
    which SMs and host drivers a line on it serves."""
    from buildkit.rules import Combo, evaluate

    def on(family: str, driver: str):
        return evaluate(Combo.of("deepspeed", family, "2.15.0", "13.2", "3.12", "ubuntu24.04", djl="0.36.0",
                                 deepspeed="0.19.8", driver=driver), facts)

    g5 = on("g5", "580.95.05")  # R580: in 13.2's cuda-compat list
    assert g5.ok and g5.wheel_variant == "cu132", [e.text() for e in g5.errors]
    assert {"arch-in-nvcc", "arch-in-wheel"} <= {e.rule for e in on("p3", "580.95.05").errors}  # sm_70
    # R550 runs CUDA 13.0 through cuda-compat, but 13.2's list drops it (and 550 < 13's minor-compat floor, 580)
    assert {e.rule for e in on("g5", "550.163.01").errors} == {"host-driver"}
    assert on("p6-b200", "580.95.05").ok  # sm_100: in torch's arch list and nvcc 13.2's
