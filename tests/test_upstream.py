"""`lmi facts add` / `lmi facts upstream` / `lmi facts verify --wheels`: facts read from release files.

The wheels here are synthetic but their kernels are real: tests/data/fatbin holds two nvcc-built CUDA
libraries and NVIDIA cuobjdump's listing of each (tests/data/fatbin/README.md). The package index is a loopback
PEP 503 index (http.server on a free 127.0.0.1 port) holding two vLLM releases and a torch release.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import sys
import threading
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, lmi

from buildkit import facts as facts_mod
from buildkit import upstream, verify, wheelfacts
from buildkit.facts import coverage
from buildkit.profiles import REGISTRY

FATBIN = ROOT / "tests" / "data" / "fatbin"
TODAY = "2026-12-07"
BF16 = """class CudaPlatform:
    @classmethod
    def check_if_supports_dtype(cls, dtype):
        if dtype == torch.bfloat16:
            if not cls.has_device_capability(80):
                raise ValueError("Bfloat16 is only supported on GPUs with compute capability of at least 8.0.")
        if cls.has_device_capability(89):
            pass
"""


# --- the reader, against NVIDIA's cuobjdump ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["libplain", "libzstd"])
def test_fatbin_reader_lists_what_cuobjdump_lists(name: str) -> None:
    lib = wheelfacts.read_library(FATBIN / f"{name}.so", name)
    mine = Counter({("cubin", sm): n for sm, n in lib.cubins.items()}) + \
        Counter({("ptx", sm): n for sm, n in lib.ptx.items()})
    theirs = wheelfacts.cuobjdump_counts((FATBIN / f"{name}.cuobjdump.txt").read_text())
    assert theirs and mine == theirs
    assert "libcudart.so.13" in lib.needed


def test_fatbin_reader_summaries_follow_the_gencode_flags() -> None:
    plain = wheelfacts.read_library(FATBIN / "libplain.so", "plain")
    zstd = wheelfacts.read_library(FATBIN / "libzstd.so", "zstd")
    assert plain.summary() == "7.5;8.0;9.0a +PTX 9.0"
    assert zstd.summary() == "10.0;10.0a;12.0 +PTX 8.0"  # sm_100f is listed as sm_100, as cuobjdump does


def test_a_library_without_device_code_has_none() -> None:
    lib = wheelfacts.read_library(Path(sys.executable).resolve(), "host")  # an ELF executable, host code only
    assert not lib.has_device_code and lib.summary() == ""


def test_a_truncated_fatbin_is_refused() -> None:
    data = (FATBIN / "libplain.so").read_bytes()
    with open(FATBIN / "libplain.so", "rb") as fh:
        offset, length = wheelfacts.ElfView(fh).fatbin
    with pytest.raises(wheelfacts.Unreadable, match="runs past"):
        wheelfacts.fatbin_entries(data[offset:offset + length // 2])


def test_python_ranges_and_arch_lists() -> None:
    assert wheelfacts.python_range("<3.15,>=3.11") == ["3.11", "3.14"]
    assert wheelfacts.python_range(">=3.10") == ["3.10", None]
    with pytest.raises(wheelfacts.Unreadable):
        wheelfacts.python_range(None)
    assert wheelfacts.arch_list_text("sm_75 sm_80 sm_120 compute_120") == "7.5;8.0;12.0+PTX"
    assert wheelfacts.glibc_floor("manylinux_2_28_x86_64") == "2.28"
    assert wheelfacts.glibc_floor("manylinux2014_x86_64") == "2.17"


# --- synthetic releases on a loopback index ------------------------------------------------------------------

def _wheel(folder: Path, name: str, version: str, tag: str, meta: list[str], files: dict[str, bytes]) -> Path:
    path = folder / f"{name}-{version}-{tag}.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, data in files.items():
            zf.writestr(member, data)
        zf.writestr(f"{info}/METADATA", "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                                                   *meta]) + "\n")
        zf.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: {tag}\n")
    return path


def _vllm(folder: Path, version: str, *, bf16: bool = True, torch: str = "2.90.0") -> Path:
    files = {"vllm/_C.abi3.so": (FATBIN / "libplain.so").read_bytes(),
             "vllm/_moe_C.abi3.so": (FATBIN / "libzstd.so").read_bytes(),
             "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so": (FATBIN / "libzstd.so").read_bytes(),
             "vllm/platforms/cuda.py": (BF16 if bf16 else "pass\n").encode()}
    meta = ["Requires-Python: <3.15,>=3.11", f"Requires-Dist: torch=={torch}", "Requires-Dist: numpy",
            'Requires-Dist: tensorizer==2.10.1; extra == "tensorizer"']
    return _wheel(folder, "vllm", version, "cp38-abi3-manylinux_2_28_x86_64", meta, files)


def _torch(folder: Path, version: str, py: str) -> Path:
    flags = b"\0sm_75 sm_80 compute_90\0"
    files = {"torch/version.py": f"__version__ = '{version}+cu130'\ncuda: str = '13.0'\nhip = None\n".encode(),
             "torch/lib/libtorch_python.so": Path(sys.executable).resolve().read_bytes() + flags,  # host code only
             "torch/lib/libtorch_cuda.so": (FATBIN / "libplain.so").read_bytes()}
    meta = ["Requires-Python: >=3.10", "Requires-Dist: filelock", "Requires-Dist: nvidia-cudnn-cu13==9.1.0.1; "
            'platform_system == "Linux"', 'Requires-Dist: triton~=3.8.0; platform_system == "Linux"',
            'Requires-Dist: pywin32==300; sys_platform == "win32"']
    return _wheel(folder, "torch", version, f"{py}-{py}-manylinux_2_28_x86_64", meta, files)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class Index:
    """A PEP 503 index of the wheels in `root/files`, served on 127.0.0.1 (a free port) until closed."""

    def __init__(self, root: Path, bad_hash: set[str] = frozenset()) -> None:
        self.root, self.bad_hash = root, bad_hash
        handler = functools.partial(_Quiet, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/simple"
        self.publish()

    def publish(self) -> None:
        projects: dict[str, list[str]] = {}
        for whl in sorted((self.root / "files").glob("*.whl")):
            digest = "0" * 64 if whl.name in self.bad_hash else hashlib.sha256(whl.read_bytes()).hexdigest()
            projects.setdefault(whl.name.split("-")[0], []).append(
                f'<a href="../../files/{whl.name}#sha256={digest}">{whl.name}</a><br/>')
        for project, anchors in projects.items():
            page = self.root / "simple" / project
            page.mkdir(parents=True, exist_ok=True)
            (page / "index.html").write_text("<html><body>\n" + "\n".join(anchors) + "\n</body></html>\n")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def world(tmp_path: Path, monkeypatch):
    """A copy of buildkit/data and of the matrix, and an index with torch 2.90.0 and vLLM 0.90.0 and 0.91.0."""
    data = tmp_path / "data"
    shutil.copytree(facts_mod.DATA_DIR, data)
    files = tmp_path / "index" / "files"
    files.mkdir(parents=True)
    for py in ("cp311", "cp312"):
        _torch(files, "2.90.0", py)
    for version in ("0.90.0", "0.91.0"):
        _vllm(files, version)
    index = Index(tmp_path / "index")
    monkeypatch.setattr(facts_mod, "DATA_DIR", data)
    facts_mod.load.cache_clear()
    yield {"data": data, "index": index, "cache": tmp_path / "cache", "files": files, "tmp": tmp_path}
    index.close()
    facts_mod.load.cache_clear()


def _add(world, component: str, version: str) -> upstream.Added:
    return upstream.add(component, version, profiles=REGISTRY, base=world["index"].url, cache=world["cache"],
                        data_dir=world["data"], today=TODAY)


def test_facts_add_reads_torch_then_vllm_and_writes_loadable_data(world) -> None:
    before = (world["data"] / "vllm.yaml").read_text()
    torch = _add(world, "torch", "2.90.0")
    assert torch.release_written and not torch.unread
    rec = torch.record
    assert rec["variant"] == "cu130" and rec["cuda_major"] == "13" and rec["local_version"] == "2.90.0+cu130"
    assert rec["arch_list"] == "7.5;8.0;9.0+PTX" and rec["extra_cubins"] == "9.0a"
    assert rec["requires"] == ["nvidia-cudnn-cu13==9.1.0.1", "triton~=3.8.0"]  # no filelock, no win32 pin
    assert rec["source"]["sha256"] == hashlib.sha256(
        (world["files"] / rec["source"]["file"]).read_bytes()).hexdigest()

    vllm = _add(world, "vllm", "0.91.0")
    assert vllm.release_written and not vllm.unread
    rec = vllm.record
    assert rec["python"] == ["3.11", "3.14"] and rec["pins"] == {"torch": "2.90.0"} and rec["glibc"] == "2.28"
    assert rec["sm"] == ["7.5", "8.0", "10.0", "12.0"] and rec["ptx"] == ["8.0", "9.0"]  # 9.0a/10.0a: not general
    assert rec["kernels"]["vllm_flash_attn/_vllm_fa3_C"] == "10.0;10.0a;12.0 +PTX 8.0"
    assert rec["bf16_min_sm"] == "8.0" and rec["cuda_major"] == "13"

    text = (world["data"] / "vllm.yaml").read_text()
    assert text.startswith(before.split("\n", 1)[0]) and "# How the kernel SMs were read" in text  # comments kept
    old, new = yaml.safe_load(before), yaml.safe_load(text)
    assert new["releases"]["0.33.0"] == old["releases"]["0.33.0"] and new["aws_sagemaker"] == old["aws_sagemaker"]
    f = facts_mod.load(REGISTRY)
    assert "2.90.0" in f.torch_versions and f.torch["2.90"].variants["cu130"].archs["x86_64"]
    release = f.stacks["vllm"].releases["0.91.0"]
    assert release.torch == "2.90.0" and release.torch_variant == "cu130" and release.min_glibc == "2.28"
    # coverage from the derived SMs: a V100 (7.0) has no code, an A10G (8.6) runs the sm_80 cubins, an H100
    # (9.0) has no general cubin (9.0a is arch-specific, kept apart) and JITs the compute_90 PTX
    assert not coverage(release.archs, "7.0").covered
    assert coverage(release.archs, "8.6").via == "cubin sm_80"
    assert coverage(release.archs, "9.0").covered


def test_facts_add_refuses_what_it_cannot_read(world) -> None:
    _vllm(world["files"], "0.92.0", bf16=False)
    world["index"].publish()
    added = _add(world, "vllm", "0.92.0")  # torch 2.90.0 has no derived record yet, bf16 floor unstated
    assert not added.release_written
    assert any("bf16_min_sm" in m for m in added.release_missing)
    assert any("lmi facts add torch 2.90.0" in m for m in added.release_missing)
    doc = yaml.safe_load((world["data"] / "vllm.yaml").read_text())
    assert "0.92.0" not in doc["releases"] and "bf16_min_sm" in " ".join(doc["derived"]["0.92.0"]["unread"])


def test_a_file_whose_hash_differs_from_the_index_is_not_kept(world) -> None:
    _vllm(world["files"], "0.93.0")
    world["index"].bad_hash = {"vllm-0.93.0-cp38-abi3-manylinux_2_28_x86_64.whl"}
    world["index"].publish()
    with pytest.raises(upstream.UpstreamError, match="sha256"):
        _add(world, "vllm", "0.93.0")
    assert not [p for p in world["cache"].rglob("*") if p.is_file()]
    assert "0.93.0" not in (world["data"] / "vllm.yaml").read_text()


def test_hostile_index_entries_are_refused_before_anything_is_written(tmp_path) -> None:
    good = "a" * 64
    for name, digest, why in (("../../evil-1.0-py3-none-any.whl", good, "plain file name"),
                              ("vllm-1.0-py3-none-any.whl", None, "no sha256"),
                              ("vllm-1.0-py3-none-any.whl", "zz", "no sha256")):
        with pytest.raises(upstream.UpstreamError, match=why):
            upstream.fetch(upstream.IndexFile(name, "http://127.0.0.1:9/x", digest), tmp_path)
    assert not list(tmp_path.iterdir())


def test_verify_rederives_and_catches_a_hand_edit(world) -> None:
    _add(world, "torch", "2.90.0")
    _add(world, "vllm", "0.91.0")
    kwargs = {"base": world["index"].url, "data_dir": world["data"], "cache": world["cache"]}
    drift, checked = verify.verify_derived(profiles=REGISTRY, wheels=True, **kwargs)
    assert checked > 20 and not [d for d in drift if "0.91.0" in d or "2.90.0" in d]
    path = world["data"] / "vllm.yaml"
    text = path.read_text()
    tail = text.index(upstream.DERIVED_MARK)
    derived = text[tail:]
    at = derived.index('"0.91.0":')
    mistyped = derived[:at] + derived[at:].replace('sm: ["7.5", "8.0",', 'sm: ["7.0", "8.0",', 1)
    assert mistyped != derived
    path.write_text(text[:tail] + mistyped)
    drift, _ = verify.verify_derived(profiles=REGISTRY, wheels=True, **kwargs)
    assert any("vllm 0.91.0 sm:" in d and "re-derived" in d for d in drift)  # the record against its wheel
    assert any("vllm 0.91.0 sm:" in d and "the data says" in d for d in drift)  # the entry against the record


def test_upstream_finds_the_newer_release_and_adds_a_line(world) -> None:
    _add(world, "torch", "2.90.0")
    _add(world, "vllm", "0.90.0")
    assert upstream.new_releases("vllm", base=world["index"].url, data_dir=world["data"]) == ["0.91.0"]
    matrix = world["tmp"] / "matrix.yaml"
    shutil.copy(ROOT / "matrix.yaml", matrix)
    report = upstream.run(profiles=REGISTRY, base=world["index"].url, data_dir=world["data"], matrix_path=matrix,
                          cache=world["cache"], today=TODAY)
    assert any(r.startswith("vllm 0.91.0: derived record written") for r in report), report
    doc = yaml.safe_load(matrix.read_text())
    line = doc["lines"]["vllm0.91"]
    assert line["vllm"] == "0.91.0" and line["torch"] == "2.90.0" and line["cuda"] == "13.0"
    assert "p3" in line["exclude"] and "sm_70" in line["exclude"]["p3"]  # the rules' reason, from the derived SMs
    assert "cpu" in line["exclude"]
    assert "g5" not in line["exclude"]
    assert upstream.run(profiles=REGISTRY, base=world["index"].url, data_dir=world["data"], cache=world["cache"]) == [
        "nothing new on the index for torch and vllm"]


def test_upstream_reads_the_older_torch_a_new_vllm_pins(world) -> None:
    """vLLM 0.95.0 pins torch 2.14.1: in the data's 2.14 minor, so not new, but without a derived record."""
    _vllm(world["files"], "0.95.0", torch="2.14.1")
    _torch(world["files"], "2.14.1", "cp312")
    world["index"].publish()
    _add(world, "torch", "2.90.0")
    _add(world, "vllm", "0.91.0")
    report = upstream.run(profiles=REGISTRY, base=world["index"].url, data_dir=world["data"], cache=world["cache"],
                          today=TODAY)
    assert any(r.startswith("torch 2.14.1: derived record written") for r in report), report
    assert report[-1].startswith("vllm 0.95.0: derived record written to vllm.yaml; release entry written"), report
    doc = yaml.safe_load((world["data"] / "vllm.yaml").read_text())
    assert doc["releases"]["0.95.0"]["torch"] == "2.14.1" and doc["releases"]["0.95.0"]["torch_variant"] == "cu130"


def test_facts_add_refuses_components_it_cannot_read() -> None:
    result = lmi("facts", "add", "deepspeed", "0.18.9")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    result = lmi("facts", "add", "vllm", "not-a-version", env={**os.environ,
                                                               "PIP_INDEX_URL": "http://127.0.0.1:9/simple"})
    assert result.returncode == 2 and "not a version" in result.stderr and "Traceback" not in result.stderr
