"""Locked dependencies (`lmi lock`, buildkit/lock.py): inputs and their fingerprint, splitting a resolution
into layers, the lock file's integrity, what contexts and builds make of it, and one real resolution."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import ROOT, lmi

from buildkit import lock, matrix, render
from buildkit.errors import UserError
from buildkit.spec import content_hash, resolve

LOCAL = ROOT / "tests" / "matrix.local.yaml"


@pytest.fixture(scope="module")
def production(facts):
    m = matrix.load(ROOT / "matrix.yaml", facts)
    return m, {s.id: s for s in resolve(m, facts)}


# --- inputs ---------------------------------------------------------------------------------------


def test_a_line_s_gpu_images_share_one_set_and_cpu_has_its_own(production) -> None:
    m, specs = production
    g5, p5, p3, cpu = (lock.inputs_of(specs[f"djl0.36-{f}"], m.build_args) for f in ("g5", "p5", "p3", "cpu"))
    assert g5 == p5 == p3 and g5.key == "djl0.36-cu128"
    assert cpu.key == "djl0.36-cpu" and cpu.fingerprint != g5.fingerprint
    assert g5.python == "3.12" and g5.platform == "x86_64-manylinux_2_39"  # noble's glibc, not this host's
    assert cpu.indexes == ("https://download.pytorch.org/whl/cpu",) and g5.indexes == ()
    # DeepSpeed's requirements as its setup.py computes them for a CUDA build (nvidia-ml-py), not for CPU.
    assert "nvidia-ml-py" in g5.roots_of("runtime") and "nvidia-ml-py" not in cpu.roots_of("runtime")
    assert g5.roots_of("deepspeed") == ("deepspeed==0.18.9",) and g5.roots_of("torch") == ("torch==2.9.1",)


def test_every_input_changes_the_fingerprint(production) -> None:
    m, specs = production
    spec = specs["djl0.36-g5"]
    base = lock.inputs_of(spec, m.build_args).fingerprint
    for change in ({"libraries": {**spec.libraries, "accelerate": "1.12.0"}}, {"python": "3.11"},
                   {"wheel_platform": "x86_64-manylinux_2_35"}, {"pip": ("numpy==1.26.4",)},
                   {"stack": replace(spec.stack, deepspeed="0.18.8")},
                   {"stack": replace(spec.stack, deepspeed_requires=(*spec.stack.deepspeed_requires, "extra"))}):
        assert lock.inputs_of(replace(spec, **change), m.build_args).fingerprint != base, change
    assert lock.inputs_of(spec, {"TORCH_INDEX_URL": "https://example.org/whl"}).fingerprint != base


def test_deepspeed_requirements_come_from_its_tags(facts) -> None:
    assert facts.stacks["deepspeed"].deepspeed_requirements("0.12.6", cuda=True) == (
        "hjson", "ninja", "numpy", "packaging>=20.0", "psutil", "py-cpuinfo", "pydantic", "pynvml", "torch", "tqdm")
    assert facts.stacks["deepspeed"].deepspeed_requirements("0.18.9", cuda=False)[-1] == "tqdm"
    assert facts.stacks["deepspeed"].deepspeed_requirements("0.18.9", cuda=True)[-1] == "nvidia-ml-py"
    assert "pydantic<2.0.0" in facts.stacks["deepspeed"].deepspeed_requirements("0.10.3", cuda=True)
    assert facts.stacks["deepspeed"].deepspeed_requirements("0.19.8", cuda=True) is None  # newer than the tags read


def test_an_unread_deepspeed_release_cannot_be_locked(production) -> None:
    m, specs = production
    with pytest.raises(UserError, match="DeepSpeed 0.19.8's requirements are not recorded"):
        spec = specs["djl0.36-g5"]
        lock.inputs_of(replace(spec, stack=replace(spec.stack, deepspeed="0.19.8", deepspeed_requires=None)))


# --- splitting a resolution -----------------------------------------------------------------------

GRAPH = textwrap.dedent("""\
    filelock==4.3.1 \\
        --hash=sha256:aa
        # via
        #   huggingface-hub
        #   torch
    huggingface-hub==0.36.2 \\
        # via transformers
    numpy==2.5.5 \\
        # via
        #   -r roots.in
        #   transformers
    setuptools==80.0.0 \\
        # via
        #   -r roots.in
        #   torch
    torch==2.9.1 \\
        # via -r roots.in
    transformers==4.57.3 \\
        # via -r roots.in
    wheel==0.45.1 \\
        # via -r roots.in
    """)


def _pin(name: str, version: str) -> lock.Pin:
    return lock.Pin(name, version, (f"sha256:{hashlib.sha256(name.encode()).hexdigest()}",))


def test_graph_and_layers() -> None:
    versions, edges = lock.parse_graph(GRAPH)
    assert versions["torch"] == "2.9.1" and versions["huggingface-hub"] == "0.36.2"
    assert edges["torch"] == {"filelock", "setuptools"} and edges["transformers"] == {"huggingface-hub", "numpy"}
    inputs = lock.Inputs("x-cu128", "3.12", "x86_64-manylinux_2_39", (), (
        ("torch", ("torch==2.9.1",)), ("build", ("setuptools>=75.8.2", "wheel==0.45.1")),
        ("runtime", ("transformers==4.57.3", "numpy", "torch")), ("deepspeed", ("deepspeed==0.18.9",))),
        alone=("deepspeed",))
    pins = {n: _pin(n, v) for n, v in versions.items()}
    layers = lock.partition(inputs, pins, edges, {"deepspeed": _pin("deepspeed", "0.18.9")})
    names = {layer: [p.name for p in pins_] for layer, pins_ in layers.items()}
    assert names == {"torch": ["filelock", "setuptools", "torch"], "build": ["wheel"],
                     "runtime": ["huggingface-hub", "numpy", "transformers"], "deepspeed": ["deepspeed"]}
    unhashed = {**pins, "numpy": lock.Pin("numpy", "2.5.5", ())}
    with pytest.raises(UserError, match="no sha256 for numpy"):
        lock.partition(inputs, unhashed, edges, {"deepspeed": _pin("deepspeed", "0.18.9")})


def test_a_marker_left_by_the_resolver_is_refused() -> None:
    with pytest.raises(UserError, match="marker"):
        lock.parse_graph("pywin32==311 ; sys_platform == 'win32'\n    # via -r roots.in\n")


# --- the lock file --------------------------------------------------------------------------------


def test_committed_locks_are_current() -> None:
    result = lmi("--matrix", str(LOCAL), "lock", "--check")
    assert result.returncode == 0, result.stderr
    assert "the dependency sets of 1 images are locked in" in result.stdout
    result = lmi("lock", "--check")  # the production CPU sets: recorded as not resolvable where they were made
    assert result.returncode == 0, result.stderr
    assert "no set in matrix.lock is missing or stale; 2 recorded as not locked" in result.stdout
    assert sorted(re.findall(r"set (\S+) is not locked", result.stderr)) == ["djl0.27-cpu", "djl0.36-cpu"]


def test_committed_local_lock_hashes_the_wheelhouse_torch() -> None:
    lockfile = lock.load(lock.lock_path(LOCAL))
    (torch,) = [p for p in lockfile.sets["local-cpu"].layers["torch"] if p.name == "torch"]
    assert torch.version == "2.13.0+cpu" and len(torch.hashes) == 1
    wheel = Path("/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
    if wheel.is_file():
        assert torch.hashes[0] == "sha256:" + hashlib.sha256(wheel.read_bytes()).hexdigest()


@pytest.mark.parametrize("tamper, message", [
    (lambda d: d.update({"lmi-lock": 9}), "schema 9"),
    (lambda d: d["sets"]["local-cpu"].update(inputs="md5:00"), "not a sha256"),
    (lambda d: d["sets"]["local-cpu"]["layers"]["torch"][0][2].__setitem__(0, "sha256:xyz"), "no valid sha256"),
    (lambda d: d["sets"]["local-cpu"]["layers"]["runtime"][0].__setitem__(1, "1.0\n--index-url http://evil"),
     "is not a pin"),
    (lambda d: d["sets"]["local-cpu"].update(resolver="uv\n--index-url http://evil"), "resolver"),
    (lambda d: d["sets"]["local-cpu"].update(python="3.11\n--trusted-host evil"), "python"),
])
def test_a_tampered_lock_file_is_refused(tmp_path, tamper, message) -> None:
    doc = json.loads(lock.lock_path(LOCAL).read_text())
    tamper(doc)
    path = tmp_path / "m.lock"
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError, match=re.escape(message)):
        lock.load(path)


def test_a_nesting_bomb_is_refused_in_one_line(tmp_path) -> None:
    path = tmp_path / "m.lock"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(UserError, match="not a lock file this toolkit can read"):
        lock.load(path)


def test_lock_file_round_trips_byte_for_byte() -> None:
    for path in (lock.lock_path(ROOT / "matrix.yaml"), lock.lock_path(LOCAL)):
        assert lock.load(path).dumps() == path.read_text()


# --- contexts and builds --------------------------------------------------------------------------


def test_contexts_carry_their_locks_and_a_changed_lock_changes_the_content_hash(production) -> None:
    m, specs = production
    lockfile = lock.load(lock.lock_path(m.path))
    spec = specs["djl0.36-g5"]
    ctx = render.Renderer(m.templates, lockfile, m.build_args).render(spec)
    assert set(lock.files_of(spec).values()) <= set(ctx.files)
    assert b"torch==2.9.1 \\\n    --hash=sha256:" in ctx.files["torch.lock"]
    key = "djl0.36-cu128"
    found = lockfile.sets[key]
    torch_layer = list(found.layers["torch"])
    torch_layer[0] = replace(torch_layer[0], hashes=("sha256:" + "0" * 64,))
    changed = lock.LockFile(lockfile.path, {**lockfile.sets, key: replace(
        found, layers={**found.layers, "torch": tuple(torch_layer)})})
    other = render.Renderer(m.templates, changed, m.build_args).render(spec)
    assert content_hash(ctx.files, {}, spec.bases, ctx.modes) != content_hash(other.files, {}, spec.bases, other.modes)
    # Without a current set, the context has no locks (and `lmi build` refuses it).
    bare = render.Renderer(m.templates, lock.LockFile(lockfile.path, {}), m.build_args)
    assert not lock.is_locked(bare.render(spec).files)


def test_the_families_of_a_line_install_byte_identical_locks(production) -> None:
    """Each lock is bind-mounted into its layer's step: one byte of difference between two families and
    BuildKit re-runs the 7 GB torch step for each, instead of sharing it across the fleet."""
    m, specs = production
    renderer = render.Renderer(m.templates, lock.load(lock.lock_path(m.path)), m.build_args)
    for line in {s.line for s in specs.values()}:
        gpu = [(s, renderer.render(s)) for s in specs.values() if s.line == line and s.family.is_gpu]
        assert len(gpu) > 1, line  # every line of the production matrix builds several GPU families
        for name in lock.files_of(gpu[0][0]).values():
            assert len({ctx.files[name] for _, ctx in gpu}) == 1, (line, name)


def test_every_python_install_is_hashed(production) -> None:
    m, specs = production
    renderer = render.Renderer(m.templates, lock.load(lock.lock_path(m.path)), m.build_args)
    for spec in specs.values():
        text = re.sub(r"\\\n\s*", " ", renderer.render(spec).files["Dockerfile"].decode())
        for step in (s for s in text.splitlines() if s.startswith("RUN") and re.search(r"pip (install|wheel)", s)):
            for command in re.findall(r"pip (?:install|wheel) [^&]*", step):
                if "/tmp/wheels/deepspeed-" in command:  # the wheel the builder stage made from the hashed sdist
                    assert "--no-deps" in command
                    continue
                assert "--require-hashes" in command and "--no-deps" in command, (spec.id, command)
                assert re.search(r"-r /tmp/lock/\w+\.lock", command), (spec.id, command)


def _local_copy(tmp_path: Path, old: str = "", new: str = "") -> Path:
    text = LOCAL.read_text().replace("templates: ../templates", f"templates: {ROOT / 'templates'}")
    text = text.replace("output: .lmi/images-local", f"output: {tmp_path / 'images'}").replace(old, new)
    path = tmp_path / "m.yaml"
    path.write_text(text)
    shutil.copyfile(lock.lock_path(LOCAL), lock.lock_path(path))
    return path


def test_a_changed_matrix_makes_its_lock_stale_and_unbuildable(tmp_path) -> None:
    path = _local_copy(tmp_path, 'accelerate: "1.11.0"', 'accelerate: "1.12.0"')
    check = lmi("--matrix", str(path), "lock", "--check")
    assert check.returncode == 1
    assert "set local-cpu is stale" in check.stderr and "run `lmi lock`" in check.stderr
    bake = lmi("--matrix", str(path), "bake")  # plans like build, without an engine
    assert bake.returncode == 2 and "Traceback" not in bake.stderr
    assert bake.stderr.strip().splitlines() == [
        f"{lock.lock_path(path)}: image local-cpu: its lock set is stale; run `lmi lock` (make lock) where its "
        "package indexes are reachable, then build"]
    assert lmi("--matrix", str(_local_copy(tmp_path)), "bake").returncode == 0


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=10).close()
        return True
    except OSError:
        return False


def test_lock_resolves_the_local_line_for_its_own_python_and_platform(tmp_path) -> None:
    if not _pypi_reachable():
        pytest.skip("pypi.org cannot be reached: `lmi lock` resolves from the package index")
    wheelhouse = Path("/opt/wheels")
    if not (wheelhouse / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").is_file():
        pytest.skip("the local matrix's torch wheel is not in /opt/wheels")
    path = _local_copy(tmp_path)
    lock.lock_path(path).unlink()
    result = lmi("--matrix", str(path), "lock", "--wheelhouse", str(wheelhouse))
    assert result.returncode == 0, result.stdout + result.stderr
    found = lock.load(lock.lock_path(path)).sets["local-cpu"]
    layers = {layer: {p.name: p for p in pins} for layer, pins in found.layers.items()}
    assert layers["torch"]["torch"].version == "2.13.0+cpu" and "nvidia-cublas-cu12" not in layers["torch"]
    assert {"transformers", "accelerate", "diffusers", "mpi4py", "pydantic", "hjson"} <= set(layers["runtime"])
    assert not set(layers["torch"]) & set(layers["runtime"])  # each package installed once, in the lowest layer
    assert set(layers["deepspeed"]) == {"deepspeed"} and layers["build"]["wheel"].version == "0.45.1"
    assert all(p.hashes for pins in found.layers.values() for p in pins)
    assert lmi("--matrix", str(path), "lock", "--check").returncode == 0
    assert (tmp_path / "images" / "local-cpu" / "requirements.lock").is_file()  # re-rendered with its locks


def test_index_credentials_never_reach_output_or_the_lock(tmp_path) -> None:
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = _local_copy(tmp_path, 'accelerate: "1.11.0"', 'accelerate: "1.12.0"')
    env = {**os.environ, "LMI_PIP_INDEX_URL": f"https://lmi-user:s3cr3t-token@127.0.0.1:{port}/simple"}
    result = lmi("--matrix", str(path), "lock", env=env)
    assert result.returncode == 1  # recorded as not resolvable here
    assert "s3cr3t-token" not in result.stdout + result.stderr
    text = lock.lock_path(path).read_text()
    assert "s3cr3t-token" not in text and '"unresolved"' in text
