"""Engine profiles (buildkit/profiles): the core names no engine, every registered profile is complete, and each
profile's lines validate, lock and render as its facts say. The tests of one profile's own behaviour live with
the module that tests that behaviour (test_rules, test_render, test_handler...); these run for every profile."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

from buildkit import lock, matrix, profiles, render
from buildkit.errors import UserError
from buildkit.rules import Combo, evaluate
from buildkit.spec import resolve

# The core: every module of the package but the profiles and the code that runs inside images (resources/).
ENGINE_WORDS = re.compile("|".join(sorted({*profiles.PROFILES, *profiles.component_keys()})), re.IGNORECASE)


def _core_files() -> list[Path]:
    package = ROOT / "buildkit"
    return [p for p in sorted(package.rglob("*.py"))
            if not {"profiles", "resources"} & set(p.relative_to(package).parts)]


def test_the_core_names_no_engine() -> None:
    """The done-when of issue #19: `grep -il deepspeed` (or any engine or component name) over the core finds
    nothing; the core meets engines only through buildkit/profiles."""
    assert len(_core_files()) > 20
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()[:100]}" for p in _core_files()
             for n, line in enumerate(p.read_text().splitlines(), 1) if ENGINE_WORDS.search(line)]
    assert not found, "\n".join(found)
    for name in ("Dockerfile.j2", "entrypoint.sh.j2"):  # the core templates too
        assert not ENGINE_WORDS.search((ROOT / "templates" / name).read_text()), name


def test_grep_agrees() -> None:
    """The same as the issue asks it, with grep itself."""
    result = subprocess.run(["grep", "-il", "deepspeed", *map(str, _core_files())], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == "", result.stdout


@pytest.mark.parametrize("name", sorted(profiles.PROFILES))
def test_every_profile_is_complete(name) -> None:
    p = profiles.get(name)
    assert name == p.NAME and p.COMPONENTS and set(p.TITLES) == set(p.COMPONENTS)
    assert p.BASES[-1] == "runtime" and "runtime" in p.LAYERS
    for template in (p.DOCKERFILE, *p.TEMPLATES.values()):
        assert template.startswith(f"profiles/{name}/") and (ROOT / "templates" / template).is_file(), template
    assert (ROOT / "templates" / p.DOCKERFILE).read_text().startswith('{% extends "Dockerfile.j2" %}')
    assert all(source.is_file() for source in p.VERBATIM.values())
    assert set(p.ALONE) <= set(p.LAYERS) and set(p.EXECUTABLE) <= {*p.TEMPLATES, *p.VERBATIM}
    for stem in p.DATA:
        assert (ROOT / "buildkit" / "data" / f"{stem}.yaml").is_file()


def test_a_line_names_a_registered_engine(write_matrix, facts) -> None:
    path = write_matrix("""
        schema: 1
        families: {g5: {}}
        lines:
          x:
            engine: tensorrt
            torch: "2.9.1"
            cuda: "12.8"
            python: "3.12"
            os: ubuntu24.04
    """)
    with pytest.raises(UserError) as err:
        matrix.load(path, facts)
    (line,) = err.value.lines
    assert f"{path}:5:" in line and "engine 'tensorrt' is not one of" in line
    assert all(name in line for name in profiles.PROFILES)


def test_a_line_takes_only_its_engines_keys(write_matrix, facts) -> None:
    path = write_matrix("""
        schema: 1
        families: {g5: {}}
        lines:
          x:
            engine: vllm
            vllm: "0.33.0"
            djl: "0.36.0"
            torch: "2.14.0"
            cuda: "13.0"
            python: "3.12"
            os: ubuntu24.04
            inference_ami: al2-ami-sagemaker-inference-gpu-3-1
    """)
    with pytest.raises(UserError) as err:
        matrix.load(path, facts)
    assert any(f"{path}:7:" in line and "unknown key 'djl'" in line for line in err.value.lines)


# --- the vLLM line -------------------------------------------------------------------------------------------


def _vllm(family: str, **kw) -> Combo:
    values = {"torch": "2.14.0", "cuda": "13.0", "python": "3.12", "os": "ubuntu24.04", "driver": "550", **kw}
    return Combo.of("vllm", family, values.pop("torch"), values.pop("cuda"), values.pop("python"),
                    values.pop("os"), vllm="0.33.0", **values)


def test_vllm_serves_every_family_its_wheel_has_kernels_for(facts) -> None:
    for name, fam in facts.families.items():
        if not fam.is_gpu or fam.arch != "x86_64":
            continue
        verdict = evaluate(_vllm(name, driver=None if fam.min_driver else "550"), facts)
        rules = {e.rule for e in verdict.errors}
        if fam.sm == "7.0":  # V100: no sm_70 code in vLLM's kernels, nor in torch's cu130 wheel
            assert {"arch-in-engine", "arch-in-wheel"} <= rules, name
            engine = next(e for e in verdict.errors if e.rule == "arch-in-engine")
            assert "vllm.yaml" in engine.source and "sm_70" in engine.message
        else:
            assert not {"arch-in-engine", "arch-in-wheel"} & rules, (name, verdict.errors)


def test_vllm_refusals_name_rule_and_source(facts) -> None:
    cpu = evaluate(Combo.of("vllm", "cpu", "2.14.0", None, "3.12", "ubuntu24.04", vllm="0.33.0"), facts)
    assert [e.rule for e in cpu.errors] == ["engine-cpu"]
    wrong = evaluate(_vllm("g5", torch="2.9.1", cuda="12.8", python="3.10", os="ubuntu22.04"), facts)
    assert {"engine-torch", "engine-cuda", "python-range"} <= {e.rule for e in wrong.errors}
    assert all(e.source for e in wrong.errors)
    unknown = evaluate(Combo.of("vllm", "g5", "2.14.0", "13.0", "3.12", "ubuntu24.04", vllm="0.34.1"), facts)
    assert "try 0.33.0" in [e.text() for e in unknown.errors if e.rule == "known-version"][0]  # the nearest first
    g4dn = evaluate(_vllm("g4dn"), facts)
    assert not g4dn.errors and any("no bfloat16" in n for n in g4dn.notes)


def test_vllm_line_of_the_production_matrix(facts) -> None:
    m = matrix.load(ROOT / "matrix.yaml", facts)
    specs = [s for s in resolve(m, facts) if s.engine.name == "vllm"]
    assert specs and {s.family.name for s in specs} == {
        name for name, fam in facts.families.items() if fam.is_gpu and fam.sm != "7.0"} & {
        i.family for i in m.images}
    renderer = render.for_matrix(m)
    for spec in specs:
        assert spec.tag.startswith(f"vllm{spec.engine.vllm}-torch2.14.0-cu130-")
        assert set(spec.aliases) <= {f"vllm0.33-{spec.family.name}", f"vllm-{spec.family.name}-latest"}
        assert spec.bases == (spec.runtime_image,) and spec.arch_list is None  # nothing is compiled
        assert spec.driver and spec.labels["io.lmi.host-driver"] == spec.driver  # the AMI the line names
        ctx = renderer.render(spec)
        assert lock.is_locked(ctx.files), spec.id
        dockerfile = ctx.files["Dockerfile"].decode()
        assert "djl" not in dockerfile.lower() and "java" not in dockerfile.lower()
        stages = [line for line in dockerfile.splitlines() if line.startswith("FROM ")]
        assert stages == ["FROM ${WHEELHOUSE} AS wheelhouse", "FROM ${RUNTIME_IMAGE} AS runtime"]  # no builder
        assert "COPY sm_vllm.py /opt/lmi/python/" in dockerfile and "pip check" in dockerfile
        assert "exec python /opt/lmi/python/sm_vllm.py" in ctx.files["entrypoint.sh"].decode()
        claims = json.loads(ctx.files["image.json"])
        assert claims["versions"]["vllm"] == "0.33.0" and "djl_serving" not in claims["versions"]
        torch_lock, runtime = ctx.files["torch.lock"].decode(), ctx.files["requirements.lock"].decode()
        assert "\ntorch==2.14.0 \\" in torch_lock and "\nvllm==0.33.0 \\" in runtime
        assert "\ntorch==" not in runtime  # the torch layer's packages are not installed twice


def test_a_profile_layer_resolved_alone_keeps_its_own_file() -> None:
    """lock.file_of: requirements.lock for runtime, <layer>.lock otherwise (what every context installs)."""
    assert lock.file_of("runtime") == "requirements.lock" and lock.file_of("torch") == "torch.lock"
    for p in profiles.PROFILES.values():
        assert len({lock.file_of(layer) for layer in ("torch", *p.LAYERS)}) == len(p.LAYERS) + 1
