"""The GPU families of a DeepSpeed line differ only in what must differ: DeepSpeed's serving ops, compiled for
the family's SM, in one late layer; DeepSpeed's Python package and every other layer the same for all families.
Read from rendered Dockerfiles (production matrix and the GPU-local test matrix); fast, no engine."""

from __future__ import annotations

import json
import re
from itertools import groupby

import pytest
from conftest import ROOT

from buildkit import lock, matrix, render
from buildkit.spec import resolve

MARKER = "# --- Family-specific from here on"
# What DeepSpeed's inference code (init_inference, kernel injection, diffusers) loads: buildkit/data/deepspeed.yaml
SERVING_OPS = {"transformer_inference", "spatial_inference"}


def _rendered(facts, path):
    m = matrix.load(path, facts)
    renderer = render.Renderer(m.templates, lock.load(lock.lock_path(m.path)), m.build_args)
    return [(s, renderer.render(s).files) for s in resolve(m, facts) if s.stack.name == "deepspeed"]


@pytest.fixture(scope="module", params=["matrix.yaml", "tests/matrix.gpu-local.yaml"])
def gpu_lines(facts, request):
    """line -> [(spec, rendered files)] of its GPU families (at least two per line)."""
    gpu = [(s, f) for s, f in _rendered(facts, ROOT / request.param) if s.family.is_gpu]
    lines = {line: list(group) for line, group in groupby(sorted(gpu, key=lambda x: x[0].line), lambda x: x[0].line)}
    assert lines and all(len(images) >= 2 for images in lines.values()), sorted(lines)
    return lines


def _stage(dockerfile: str, name: str) -> str:
    """The text of one build stage, from its FROM line to the next FROM."""
    start = dockerfile.index(f"AS {name}\n")
    start = dockerfile.rindex("\nFROM ", 0, start)
    end = dockerfile.find("\nFROM ", start + 1)
    lines = dockerfile[start:end if end >= 0 else None].split("\n")
    while lines and (not lines[-1].strip() or lines[-1].startswith("#")):  # the next stage's heading
        lines.pop()
    return "\n".join(lines)


def _family_words(spec) -> list[str]:
    return [spec.family.name, spec.id, f"sm_{spec.family.sm.replace('.', '')}", spec.family.gpu]


def test_production_lines_mix_families_with_and_without_cuda_compat(facts) -> None:
    """What the test above proves for cuda-compat: production's DeepSpeed lines each hold families that need it
    (older SageMaker drivers) and families that do not (djl0.27: g6 on; djl0.36: p6-b200)."""
    needs: dict[str, set[bool]] = {}
    for spec, _ in _rendered(facts, ROOT / "matrix.yaml"):
        if spec.family.is_gpu:
            needs.setdefault(spec.line, set()).add(spec.needs_compat)
    assert needs and all(both == {True, False} for both in needs.values()), needs


def test_families_of_a_line_differ_only_after_the_marked_line(gpu_lines) -> None:
    for line, images in gpu_lines.items():
        runtimes = {}
        for spec, files in images:
            dockerfile = files["Dockerfile"].decode()
            runtime = _stage(dockerfile, "runtime")
            assert runtime.count(MARKER) == 1, spec.id
            before, after = runtime.split(MARKER)
            runtimes[spec.id] = before
            # nothing of the family above the marker: no arch list, no id, no label
            assert not any(re.search(rf"\b{re.escape(w)}\b", before) for w in _family_words(spec)), spec.id
            assert "LABEL" not in before and "TORCH_CUDA_ARCH_LIST" not in before
            # below it: one step brings DeepSpeed's ops; the rest are small files, ENV and metadata
            # (and, in a family whose drivers all run the CUDA natively, the removal of cuda-compat)
            runs = [s for s in re.split(r"\n(?=[A-Z]+ )", after) if s.startswith("RUN ")]
            purge = [r for r in runs if "apt-get purge -y cuda-compat-" in r]
            assert len(purge) == (0 if spec.needs_compat else 1), (spec.id, runs)
            assert len(runs) == 1 + len(purge) and "from=deepspeed-ops" in runs[0], (spec.id, runs)
            assert "pip " not in after and after.count("apt-get") == len(purge), spec.id
            # the Python package (no op) and everything shared come before the marker
            assert "/tmp/wheels/deepspeed-" in before and "djl-serving.deb" in before and "torch.lock" in before
        # the same text for every family of the line, whether its host drivers need cuda-compat or not (the OS
        # step installs the same package in each; a family that needs none removes it after the marker)
        assert len(set(runtimes.values())) == 1, (line, sorted(runtimes))
        # the builder stage (DeepSpeed's Python wheel, no op) is the same text for every family too; only the
        # ops stage carries the SM
        builders = {_stage(f["Dockerfile"].decode(), "deepspeed-builder") for _, f in images}
        assert len(builders) == 1, line
        for spec, files in images:
            builder = builders.copy().pop()
            assert "TORCH_CUDA_ARCH_LIST" not in builder and "DS_BUILD_OPS=0" in builder, spec.id
            ops = _stage(files["Dockerfile"].decode(), "deepspeed-ops")
            assert f'TORCH_CUDA_ARCH_LIST="{spec.family.sm}"' in ops, spec.id


def test_only_the_serving_ops_are_prebuilt(gpu_lines, facts) -> None:
    for images in gpu_lines.values():
        for spec, files in images:
            e = spec.stack
            built = set(e.ds_ops_built)
            assert built == SERVING_OPS, (spec.id, built)  # both exist from 0.10.0 and build for sm_60+
            assert {op for op, _, _ in e.ds_ops_on} == built
            assert not built & {op for op, _, _ in e.ds_ops_off}
            step = next(s for s in re.split(r"\n(?=[A-Z]+ )", _stage(files["Dockerfile"].decode(), "deepspeed-ops"))
                        if "pip wheel" in s)
            assert "DS_ACCELERATOR=cuda DS_BUILD_OPS=0 DS_ENABLE_NINJA=1" in step
            assert set(re.findall(r"(DS_BUILD_[A-Z_]+)=1", step)) == {switch for _, switch, _ in e.ds_ops_on}
            assert not re.search(r"DS_BUILD_[A-Z_]+=0 \\\n", step)  # nothing switched off one by one now
            assert "/lib64/stubs" in step and "--no-build-isolation" in step
            # the op libraries and DeepSpeed's installed-ops record are what the late layer takes
            assert "git_version_info_installed" in step and '-name "*.so"' in step and "/ops/RECORD" in step
            claims = json.loads(files["image.json"])["deepspeed_ops"]
            assert set(claims["prebuilt"]) == built
            assert set(claims["absent"]) == {op.name for op in facts.stacks["deepspeed"].ops_of(e.deepspeed)} - built
            for op in ("cpu_adam", "fused_adam", "transformer", "quantizer", "inference_core_ops"):
                if op in claims["absent"]:
                    assert "JIT-built at first use" in claims["absent"][op], (spec.id, op, claims["absent"][op])


def test_serving_ops_are_facts_with_a_source(facts) -> None:
    from buildkit import yamlio

    data = yamlio.load_file(ROOT / "buildkit" / "data" / "deepspeed.yaml")
    serving = {name for name, op in data["ops"].items() if op.get("serving")}
    assert serving == SERVING_OPS
    assert not any(data["ops"][name].get("training") for name in serving)
    source = data["sources"]["serving"]
    assert "deepspeedai/DeepSpeed" in source and "v0.12.6" in source and "v0.18.9" in source


def test_fleet_bench_arithmetic() -> None:
    """bench/fleet_bench.py's numbers: shared layers once, each family's own, the unmeasured ones as the largest."""
    from bench.fleet_bench import fleet

    gb = 10**9
    measured = {"g5": [("base", 8 * gb), ("ops86", gb // 10), ("cfg-g5", 1000)],
                "p3": [("base", 8 * gb), ("ops70", gb // 20), ("cfg-p3", 1000)]}
    n = fleet(measured, families=11)
    assert n["shared"] == 8 * gb and n["one"] == 8 * gb + gb // 10 + 1000
    assert n["own_max"] == gb // 10 + 1000 and n["own_min"] == gb // 20 + 1000
    assert n["second_pull"] == gb // 20 + 1000  # p3's layers that g5 lacks
    assert n["fleet"] == 8 * gb + (gb // 10 + 1000) + (gb // 20 + 1000) + 9 * (gb // 10 + 1000)
    assert round(n["ratio"], 3) == round(n["fleet"] / n["one"], 3) and 1.1 < n["ratio"] < 1.15
