"""Rendering: golden files, determinism, the CI gate, atomic writes, and what every Dockerfile must be."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, lmi, production_images

from buildkit import lock, matrix, profiles, render, smoke
from buildkit.errors import UserError
from buildkit.spec import resolve

GOLDEN = ROOT / "tests" / "golden"
HADOLINT = Path(sys.executable).parent / "hadolint"


@pytest.fixture(scope="module")
def production(facts):
    m = matrix.load(ROOT / "matrix.yaml", facts)
    specs = resolve(m, facts)
    renderer = render.Renderer(m.templates, lock.load(lock.lock_path(m.path)), m.build_args)
    return [(s, renderer.render(s)) for s in specs]


def test_golden_rendering(facts, request) -> None:
    m = matrix.load(GOLDEN / "matrix.yaml", facts)
    # A profile's verbatim files (its handler, its entry point) are copied, not rendered: render --check guards
    # them in images/, not the goldens.
    verbatim = {name for p in profiles.PROFILES.values() for name in p.VERBATIM}
    contexts = [render.Context(c.id, {n: b for n, b in c.files.items() if n not in verbatim}, c.executable)
                for c in (render.Renderer(ROOT / "templates").render(s) for s in resolve(m, facts))]
    assert [c.id for c in contexts] == ["ds012-g4dn", "ds012-p5", "ds018-g6e", "ds018-cpu", "vllm033-g6e"]
    if request.config.getoption("--update-golden"):
        render.write(contexts, GOLDEN / "rendered", prune=True)
    problems = render.diff(contexts, GOLDEN / "rendered", prune=True)
    assert not problems, "golden files differ; if the template change is intended, run pytest --update-golden"


def test_no_context_or_image_carries_the_checker(production) -> None:
    """The smoke checks run from outside the image (`lmi test` mounts them): no context has them, so no image
    does; the committed images/ neither."""
    checker = smoke.CHECKER.read_bytes()
    for spec, ctx in production:
        assert "lmi_check.py" not in ctx.files and checker not in ctx.files.values()
        assert spec.profile.CHECKER.name not in ctx.files
        assert b"lmi_check" not in ctx.files["Dockerfile"]
        assert all(name.encode() in ctx.files["Dockerfile"] for name in spec.profile.VERBATIM)  # what ships
    assert not list((ROOT / "images").glob("*/lmi_check.py"))


def _plan_with_edited(tmp_path: Path, name: str) -> dict[str, str]:
    """`lmi plan` from a copy of the toolkit whose buildkit/<name> has one line more (None: unedited)."""
    copy = tmp_path / (name.replace("/", "-") or "pristine")
    shutil.copytree(ROOT / "buildkit", copy / "buildkit", ignore=shutil.ignore_patterns("__pycache__"))
    if name:
        with (copy / "buildkit" / name).open("a") as fh:
            fh.write("# one line more\n")
    result = subprocess.run([sys.executable, "-m", "buildkit.cli", "--matrix", str(ROOT / "matrix.yaml"), "plan",
                             "--json", "--instance", "g5"], cwd=copy, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return {p["id"]: p["content_hash"] for p in json.loads(result.stdout)}


def test_editing_a_check_changes_no_content_hash(tmp_path, production) -> None:
    pristine = _plan_with_edited(tmp_path, "")
    assert _plan_with_edited(tmp_path, "resources/check/lmi_check.py") == pristine
    # A profile's verbatim file (a handler) ships in the images of that profile: a new hash for those only.
    shipping = {spec.id for spec, _ in production if "lmi_deepspeed.py" in spec.profile.VERBATIM}
    handler = _plan_with_edited(tmp_path, "resources/image/lmi_deepspeed.py")
    assert handler.keys() == pristine.keys() and shipping & handler.keys()
    assert all((handler[i] != pristine[i]) == (i in shipping) for i in pristine)


def test_render_is_deterministic(tmp_path, facts) -> None:
    for out in ("a", "b"):
        result = lmi("render", "--out", str(tmp_path / out))
        assert result.returncode == 0, result.stderr
    a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*"))
    b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*"))
    assert a == b and a
    for rel in a:
        if (tmp_path / "a" / rel).is_file():
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_committed_images_match_a_fresh_render() -> None:
    result = lmi("render", "--check")
    assert result.returncode == 0, result.stderr
    assert "match a fresh render" in result.stdout


def test_render_check_catches_drift(tmp_path) -> None:
    shutil.copytree(ROOT / "images", tmp_path / "images")
    shutil.copytree(ROOT / "templates", tmp_path / "templates")
    shutil.copy(ROOT / "matrix.yaml", tmp_path / "matrix.yaml")
    dockerfile = tmp_path / "images" / "djl0.27-g5" / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace("EXPOSE 8080", "EXPOSE 8081"))
    # A context this toolkit rendered for a line since removed from the matrix.
    shutil.copytree(tmp_path / "images" / "djl0.27-g5", tmp_path / "images" / "djl0.19-g5")
    manifest = tmp_path / "images" / render.MANIFEST
    manifest.write_text(manifest.read_text().replace('"djl0.27-cpu"', '"djl0.19-g5", "djl0.27-cpu"'))
    (tmp_path / "images" / "djl0.36-g5" / "entrypoint.sh").chmod(0o644)
    result = lmi("--matrix", str(tmp_path / "matrix.yaml"), "render", "--check")
    assert result.returncode == 1
    assert "djl0.27-g5/Dockerfile: differs from a fresh render" in result.stderr
    assert "djl0.19-g5: no longer in the matrix" in result.stderr
    assert "djl0.36-g5/entrypoint.sh: executable bit differs" in result.stderr
    # Rendering repairs all of it, and the stale context is removed.
    assert lmi("--matrix", str(tmp_path / "matrix.yaml"), "render").returncode == 0
    assert lmi("--matrix", str(tmp_path / "matrix.yaml"), "render", "--check").returncode == 0
    assert not (tmp_path / "images" / "djl0.19-g5").exists()


def _ids() -> list[str]:
    from conftest import production_images

    return [image.id for image in production_images()]


def test_selective_render_leaves_other_contexts(tmp_path) -> None:
    out = tmp_path / "out"
    assert lmi("render", "--instance", "p5", "--out", str(out)).returncode == 0
    assert lmi("render", "--instance", "g5", "--out", str(out)).returncode == 0
    wanted = sorted(i for i in _ids() if i.endswith(("-g5", "-p5")))
    assert sorted(p.name for p in out.iterdir()) == [render.MANIFEST, *wanted]


# --- render owns only what it wrote -----------------------------------------------------------------


def _checkout(tmp_path: Path, output: str) -> Path:
    """A checkout-like tree: the toolkit's own directories beside a matrix whose output is `output`."""
    tmp_path.mkdir(exist_ok=True)
    for name in ("buildkit", "tests", "bench"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.py").write_text("precious = True\n")
    shutil.copytree(ROOT / "templates", tmp_path / "templates")
    text = (ROOT / "matrix.yaml").read_text().replace("repository: lmi-inference",
                                                      f"repository: lmi-inference\noutput: {output}")
    (tmp_path / "matrix.yaml").write_text(text)
    return tmp_path / "matrix.yaml"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("output", [".", "..", "./", "images/.."])
def test_output_at_or_above_the_matrix_is_refused_and_nothing_is_touched(tmp_path, output) -> None:
    path = _checkout(tmp_path / "co" if output.startswith("..") else tmp_path, output)
    root = path.parent.parent if output.startswith("..") else path.parent
    before = _tree(root)
    for command in (["render"], ["render", "--check"], ["validate"]):
        result = lmi("--matrix", str(path), *command)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"{path}:" in result.stderr and "matrix's own directory or a parent" in result.stderr
        assert "Traceback" not in result.stderr
    assert _tree(root) == before


def test_output_outside_the_matrix_tree_needs_out(tmp_path) -> None:
    elsewhere = tmp_path / "elsewhere"
    path = _checkout(tmp_path / "co", str(elsewhere))
    result = lmi("--matrix", str(path), "render")
    assert result.returncode == 2 and "lies outside the matrix's directory" in result.stderr
    assert not elsewhere.exists()
    # A symbolic link inside the tree that points outside is outside too.
    (tmp_path / "co" / "images").symlink_to(elsewhere, target_is_directory=True)
    elsewhere.mkdir()
    path.write_text(path.read_text().replace(f"output: {elsewhere}", "output: images"))
    result = lmi("--matrix", str(path), "render")
    assert result.returncode == 2 and "lies outside" in result.stderr
    assert list(elsewhere.iterdir()) == []
    # Named on the command line, it is a choice: allowed into an empty directory.
    (tmp_path / "co" / "images").unlink()
    assert lmi("--matrix", str(path), "render", "--out", str(elsewhere)).returncode == 0
    assert (elsewhere / "djl0.36-g5" / "Dockerfile").is_file()
    result = lmi("--matrix", str(path), "render", "--out", str(tmp_path / "co"))
    assert result.returncode == 2 and "parent" in result.stderr


def test_output_holding_other_files_is_refused_before_anything_is_written(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    (out / "project").mkdir()
    (out / "project" / "main.py").write_text("x = 1\n")
    before = _tree(out)
    for args in (["render", "--out", str(out)], ["render", "--instance", "g5", "--out", str(out)]):
        result = lmi(*args)
        assert result.returncode == 2, result.stderr
        assert "notes.txt, project, which `lmi render` did not write" in result.stderr
    assert _tree(out) == before and sorted(p.name for p in out.iterdir()) == ["notes.txt", "project"]


def test_prune_removes_only_what_render_wrote(tmp_path, facts) -> None:
    m = matrix.load(ROOT / "matrix.yaml", facts)
    renderer = render.Renderer(m.templates)
    specs = resolve(m, facts)
    out = tmp_path / "out"
    render.write([renderer.render(s) for s in specs[:3]], out, prune=False)
    changed = render.write([renderer.render(specs[0])], out, prune=True)
    assert sorted(changed) == sorted(f"{s.id} (removed)" for s in specs[1:3])
    assert sorted(p.name for p in out.iterdir()) == [render.MANIFEST, specs[0].id]
    assert json.loads((out / render.MANIFEST).read_text())["ids"] == [specs[0].id]
    # A directory that appears later is not the toolkit's: refused, and left as it was.
    (out / "scratch").mkdir()
    with pytest.raises(UserError, match="scratch, which `lmi render` did not write"):
        render.write([renderer.render(specs[0])], out, prune=True)
    assert (out / "scratch").is_dir()


def test_interrupted_render_is_cleaned_by_the_next(tmp_path, facts) -> None:
    m = matrix.load(ROOT / "matrix.yaml", facts)
    renderer = render.Renderer(m.templates)
    ctx = renderer.render(resolve(m, facts)[0])
    out = tmp_path / "out"
    render.write([ctx], out, prune=False)
    # What a kill between the steps of a replace leaves: a staging copy and the old context moved aside.
    (out / f".lmi-tmp-{ctx.id}.x1y2").mkdir()
    (out / f".lmi-tmp-{ctx.id}.x1y2" / "Dockerfile").write_text("half")
    (out / ctx.id).rename(out / f".lmi-old-{ctx.id}")
    assert render.diff([ctx], out, prune=True)  # the context is missing
    assert render.write([ctx], out, prune=True) == [ctx.id]
    assert sorted(p.name for p in out.iterdir()) == [render.MANIFEST, ctx.id]
    assert render.diff([ctx], out, prune=True) == []


def test_contexts_rendered_before_manifests_are_adopted(tmp_path, facts) -> None:
    m = matrix.load(ROOT / "matrix.yaml", facts)
    renderer = render.Renderer(m.templates)
    specs = resolve(m, facts)
    out = tmp_path / "out"
    render.write([renderer.render(s) for s in specs[:2]], out, prune=False)
    (out / render.MANIFEST).unlink()
    assert render.owned(out) == {specs[0].id, specs[1].id}
    render.write([renderer.render(specs[0])], out, prune=True)
    assert sorted(p.name for p in out.iterdir()) == [render.MANIFEST, specs[0].id]


def test_strict_undefined_names_the_template(tmp_path, facts) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    (templates / "entrypoint.sh.j2").write_text("x={{ spec.no_such_field }}\n")
    spec = resolve(matrix.load(ROOT / "matrix.yaml", facts), facts)[0]
    with pytest.raises(UserError, match=r"templates/entrypoint.sh.j2.*no_such_field"):
        render.Renderer(templates).render(spec)


# --- what every production Dockerfile must be -----------------------------------------------------


def _instructions(dockerfile: str) -> list[str]:
    """Logical instructions (continuations joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", dockerfile)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_layer_order_and_contract(production) -> None:
    for spec, ctx in production:
        dockerfile = ctx.files["Dockerfile"].decode()
        assert "# syntax" not in dockerfile, spec.id
        steps = _instructions(dockerfile)
        runtime = steps[next(i for i, s in enumerate(steps) if s.endswith("AS runtime")):]
        markers = [
            lambda s: "venv" in s and s.startswith("RUN apt-get"),  # OS + Python
            lambda s: "pip install" in s and "/tmp/lock/torch.lock" in s,  # torch
            lambda s: "/tmp/lock/requirements.lock" in s and s.startswith("RUN"),  # other Python deps
            lambda s: s.startswith("COPY entrypoint.sh"),  # entrypoint/config
        ]
        if "deepspeed" in spec.profile.LAYERS:  # Java + DJL, then DeepSpeed: the family-specific layer
            markers[3:3] = [lambda s: "djl-serving.deb" in s, lambda s: "deepspeed" in s and s.startswith("RUN")]
        order = [next(i for i, s in enumerate(runtime) if marker(s)) for marker in markers]
        assert order == sorted(order), (spec.id, order)
        assert "EXPOSE 8080" in runtime
        assert runtime[-2:] == ['ENTRYPOINT ["/usr/local/bin/dockerd-entrypoint.sh"]', 'CMD ["serve"]']
        user = [s for s in runtime if s.startswith("USER ")]
        assert user == ["USER 1001:1001"], spec.id
        assert any(s.startswith("HEALTHCHECK") and "/ping" in s for s in runtime)
        assert "/opt/ml/model" in dockerfile


def test_every_download_step_takes_the_ca_as_a_secret(production) -> None:
    for spec, ctx in production:
        for step in _instructions(ctx.files["Dockerfile"].decode()):
            offline = "pip install --no-cache-dir --no-deps /tmp/wheels/deepspeed-" in step  # the wheel built above
            if step.startswith("RUN") and ("pip install" in step or "pip wheel" in step or "curl -" in step) \
                    and not offline:
                assert "--mount=type=secret,id=ca,required=false" in step, (spec.id, step)
                assert "PIP_CERT=/run/secrets/ca" in step
        assert "ca-certificates.crt" not in "".join(s for s in _instructions(ctx.files["Dockerfile"].decode())
                                                   if s.startswith(("COPY", "ADD", "ENV", "ARG")))


def _of(production, profile_name: str):
    """The production contexts of one profile (for tests of what that profile renders)."""
    found = [(spec, ctx) for spec, ctx in production if spec.stack.name == profile_name]
    assert found, profile_name
    return found


def test_deepspeed_ops_prebuilt_for_the_family_sm_only(production) -> None:
    for spec, ctx in _of(production, "deepspeed"):
        dockerfile = ctx.files["Dockerfile"].decode()
        if spec.family.is_gpu:
            assert "AS deepspeed-builder" in dockerfile
            step = next(s for s in _instructions(dockerfile) if "pip wheel" in s and "TORCH_CUDA_ARCH_LIST" in s)
            assert "DS_ACCELERATOR=cuda DS_BUILD_OPS=0 DS_ENABLE_NINJA=1" in step
            assert f'TORCH_CUDA_ARCH_LIST="{spec.family.sm}"' in step
            assert '/lib64/stubs' in step  # ops link -lcuda: the driver stub stands in
            switched_on = set(re.findall(r"(DS_BUILD_[A-Z_]+)=1", step))  # the serving ops only
            assert switched_on == {switch for _, switch, _ in spec.stack.ds_ops_on}, spec.id
            assert not {"DS_BUILD_RAGGED_DEVICE_OPS", "DS_BUILD_CUTLASS_OPS", "DS_BUILD_SPARSE_ATTN",
                        "DS_BUILD_EVOFORMER_ATTN", "DS_BUILD_CPU_ADAM"} & switched_on
            assert "DS_BUILD_TRANSFORMER_INFERENCE" in switched_on and "DS_BUILD_RAGGED_OPS" not in switched_on
            claims = json.loads(ctx.files["image.json"])["deepspeed_ops"]
            assert set(claims["prebuilt"]) == set(spec.stack.ds_ops_built)
            assert "transformer_inference" in claims["prebuilt"]
            assert "--no-build-isolation" in step
            assert "--mount=type=bind,from=deepspeed-builder" in dockerfile
            assert "FROM ${BUILDER_IMAGE}" in dockerfile and spec.stack.builder_image.endswith(
                f"devel-ubuntu{spec.os.ubuntu}")
            assert spec.runtime_image.endswith(f"base-ubuntu{spec.os.ubuntu}")
        else:
            assert "deepspeed-builder" not in dockerfile and "DS_BUILD_OPS=0" in dockerfile


def test_cuda_compat_only_where_the_driver_needs_it(production) -> None:
    seen = set()
    for spec, ctx in production:
        dockerfile, entrypoint = ctx.files["Dockerfile"].decode(), ctx.files["entrypoint.sh"].decode()
        seen.add(spec.needs_compat)
        if not spec.family.is_gpu:
            assert "cuda-compat-" not in dockerfile and "compat" not in entrypoint
        elif spec.needs_compat:
            assert f"install -y --no-install-recommends python{spec.python}" in dockerfile
            assert spec.compat_package in dockerfile and "purge" not in dockerfile
            assert "LD_LIBRARY_PATH" in entrypoint
        else:
            assert f"apt-get purge -y {spec.compat_package}" in dockerfile
            assert "LD_LIBRARY_PATH" not in entrypoint
    assert seen == {True, False}


def test_image_json_carries_the_claims(production) -> None:
    for spec, ctx in production:
        claims = json.loads(ctx.files["image.json"])
        assert claims["versions"]["torch"] == spec.torch and claims["cuda_compat"] == spec.needs_compat
        assert claims["labels"] == spec.labels


def test_djl_download_is_verified_or_warns(production) -> None:
    for spec, ctx in _of(production, "deepspeed"):
        dockerfile = ctx.files["Dockerfile"].decode()
        assert f"ARG DJL_SERVING_SHA256={spec.stack.djl_sha256 or ''}\n" in dockerfile
        assert 'sha256sum -c -' in dockerfile and "WARNING: no sha256 is recorded for DJL Serving" in dockerfile


def test_entrypoint_scripts_are_valid_bash(production, tmp_path) -> None:
    for spec, ctx in production:
        script = tmp_path / f"{spec.id}.sh"
        script.write_bytes(ctx.files["entrypoint.sh"])
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, (spec.id, result.stderr)


def test_every_entrypoint_starts_on_a_host_without_a_driver(production, tmp_path) -> None:
    """`docker run <image> <command>` on a machine with no NVIDIA driver (no /proc/driver/nvidia, no compat
    directory, as here) runs the command: the compat probe must not end the container under `set -e`."""
    if Path("/proc/driver/nvidia/version").exists():
        pytest.skip("this host has an NVIDIA driver: the case under test is a host without one")
    assert any(spec.needs_compat for spec, _ in production)
    for spec, ctx in production:
        script = tmp_path / f"{spec.id}.sh"
        script.write_bytes(ctx.files["entrypoint.sh"])
        result = subprocess.run(["bash", str(script), "echo", "reached"], capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stdout) == (0, "reached\n"), (spec.id, result.stderr)


def test_entrypoint_runs_other_commands_and_picks_compat(tmp_path, production) -> None:
    """Run the compat entrypoint for real with a fake /proc and compat dir substituted in."""
    spec, ctx = next((s, c) for s, c in production if s.needs_compat)
    compat = tmp_path / "compat"
    compat.mkdir()
    (compat / "libcuda.so.530.30.02").write_text("")
    for host, expect in (("470.256.02", str(compat)), ("535.54.03", "")):
        proc = tmp_path / f"version-{host}"
        proc.write_text(f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {host}  Thu Jan 1\n")
        script = ctx.files["entrypoint.sh"].decode().replace("/usr/local/cuda/compat", str(compat)).replace(
            "/proc/driver/nvidia/version", str(proc))
        path = tmp_path / "entry.sh"
        path.write_text(script)
        result = subprocess.run(["bash", str(path), "bash", "-c", 'echo "LD=${LD_LIBRARY_PATH:-}"'],
                                capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"LD={expect}", (host, result.stdout, result.stderr)


@pytest.mark.integration
def test_hadolint_clean_on_every_rendered_dockerfile() -> None:
    dockerfiles = sorted(str(p) for p in (ROOT / "images").glob("*/Dockerfile"))
    assert len(dockerfiles) == len(production_images())
    result = subprocess.run([str(HADOLINT), "--config", str(ROOT / ".hadolint.yaml"), *dockerfiles],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
def test_hadolint_would_catch_a_bad_dockerfile(tmp_path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:22.04\nRUN pip install torch\nUSER root\n")
    result = subprocess.run([str(HADOLINT), "--config", str(ROOT / ".hadolint.yaml"), str(bad)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "DL3013" in result.stdout


def test_validate_and_render_load_only_what_they_use() -> None:
    """Start-up is most of `lmi validate` and `lmi render`: neither imports the docker SDK (nor requests),
    and validate no template engine either. Each command runs in a fresh interpreter, as a user runs it."""
    probe = ("import sys; from buildkit import cli; code = cli.main(sys.argv[1:]); "
             "print('LOADED', ' '.join(m for m in ('docker', 'requests', 'jinja2') if m in sys.modules)); "
             "sys.exit(code)")
    loaded = {}
    for command in (["validate"], ["render", "--check"]):
        run = subprocess.run([sys.executable, "-c", probe, *command], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        loaded[command[0]] = set(run.stdout.split("LOADED", 1)[1].split())
    assert loaded == {"validate": set(), "render": {"jinja2"}}
