"""Profiles (buildkit/profiles): the dependency direction holds (import-linter's contracts, and an upward import
breaks them), every registered profile is complete, and each profile's lines validate, lock and render as its
facts say. The tests of one profile's own behaviour live with
the module that tests that behaviour (test_rules, test_render, test_handler...); these run for every profile."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from buildkit import lock, matrix, profiles, render
from buildkit.errors import UserError
from buildkit.interface import Profile
from buildkit.rules import Combo, evaluate
from buildkit.spec import resolve

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")  # import-linter, a dev dependency


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter over the package under `root` with the contracts of `root`/pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_import_contracts_hold() -> None:
    """The dependency direction of pyproject.toml's [tool.importlinter] (also run by `make lint`): the CLI above
    the profiles above the commands above the core above the bottom; no core module imports a profile; a profile
    imports no command; the profiles are independent; no import cycle; no host module imports the code that runs
    inside images."""
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 6 kept, 0 broken." in result.stdout, result.stdout


@pytest.mark.parametrize(("module", "injected", "broken"), [
    ("facts.py", "from . import profiles", ("cli above profiles", "the core and the bottom import no profile")),
    ("rules.py", "from . import spec", ("cli above profiles",)),  # an upward import inside the core
    ("profiles/vllm.py", "from .. import smoke", ("a profile imports the core and the bottom only",)),
    ("profiles/vllm.py", "from . import deepspeed", ("the profiles are independent",)),
    ("index.py", "from . import publish", ("no import cycle",)),  # publish imports index
    ("smoke.py", "import lmi_check", ("no host module imports the code that runs inside images",)),
])
def test_an_upward_import_breaks_them(tmp_path, module, injected, broken) -> None:
    """A copy of the package with one import added fails the contracts it breaks (where the import also
    closes a longer chain, others may break too)."""
    shutil.copytree(ROOT / "buildkit", tmp_path / "buildkit", ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / "buildkit" / module
    text = target.read_text()
    head, sep, rest = text.partition("\nfrom __future__ import annotations\n")
    target.write_text(head + sep + injected + "  # noqa\n" + rest if sep else injected + "\n" + text)
    result = _lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in broken:
        verdict = [line for line in lines if line.startswith(name)]
        assert verdict and " BROKEN" in verdict[0] and " KEPT" not in verdict[0], (name, result.stdout)
    assert "Contracts: 6 kept" not in result.stdout


IMAGE_CODE = ROOT / "buildkit" / "resources"


def _imports(path: Path) -> set[str]:
    """The modules a file imports (absolute names; relative ones as "." + name)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names |= {base} | {f"{base}.{a.name}" if node.module else f"{base}{a.name}" for a in node.names}
    return names


def test_host_code_and_image_code_import_nothing_of_each_other() -> None:
    """The code under buildkit/resources/ runs inside images, imported flat from /opt/lmi/python (or the test
    container's checker folder): it imports nothing of the host package, and no host module imports it, by its
    flat name (also import-linter's contract) or through the package path, which import-linter cannot see (no
    __init__.py there: the folders are data to the host)."""
    image_files = sorted(IMAGE_CODE.rglob("*.py"))
    image_names = {p.stem for p in image_files}
    assert {"lmi_deepspeed", "lmi_check", "sm_vllm", "deepspeed_check"} <= image_names
    for path in image_files:
        bad = {n for n in _imports(path) if n.split(".")[0] == "buildkit" or n.startswith(".")}
        assert not bad, (path.relative_to(ROOT), bad)
    host = [p for p in sorted((ROOT / "buildkit").rglob("*.py")) if IMAGE_CODE not in p.parents]
    assert len(host) > 30
    for path in host:
        bad = {n for n in _imports(path)
               if n.split(".")[0] in image_names or n.lstrip(".").startswith("resources")
               or n.startswith("buildkit.resources")}
        assert not bad, (path.relative_to(ROOT), bad)


def test_the_separation_test_can_fail(tmp_path) -> None:
    """The checks above find an import through the package path, which import-linter misses."""
    text = "from __future__ import annotations\nfrom buildkit.resources.image import lmi_deepspeed\n"
    (tmp_path / "x.py").write_text(text)
    assert "buildkit.resources.image.lmi_deepspeed" in _imports(tmp_path / "x.py")
    (tmp_path / "y.py").write_text("from .resources.check import lmi_check\n")
    assert ".resources.check.lmi_check" in _imports(tmp_path / "y.py")


def test_the_index_loads_no_profile() -> None:
    """`import buildkit.index` (behind the public image_uri()) loads no profile and no smoke runner."""
    code = "import buildkit.index, json, sys; print(json.dumps(sorted(m for m in sys.modules if 'buildkit' in m)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    loaded = json.loads(out)
    assert "buildkit.index" in loaded and "buildkit.interface" in loaded
    assert not [m for m in loaded if m.startswith(("buildkit.profiles", "buildkit.smoke", "buildkit.engine"))], loaded


def test_every_profile_has_every_member_of_the_interface() -> None:
    """At run time too (mypy checks the types in `make lint`): each member the Profile protocol declares."""
    members = {n for n in dir(Profile) if not n.startswith("_")}
    assert {"NAME", "RULES", "LAYERS", "ALONE", "OPTION_HELP", "labels", "claims", "lock_problem"} <= members
    for p in profiles.PROFILES.values():
        assert not [m for m in sorted(members) if not hasattr(p, m)], p.NAME


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
    specs = [s for s in resolve(m, facts) if s.stack.name == "vllm"]
    assert specs and {s.family.name for s in specs} == {
        name for name, fam in facts.families.items() if fam.is_gpu and fam.sm != "7.0"} & {
        i.family for i in m.images}
    renderer = render.for_matrix(m)
    for spec in specs:
        assert spec.tag.startswith(f"vllm{spec.stack.vllm}-torch2.14.0-cu130-")
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
