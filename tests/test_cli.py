"""The `lmi` command line, run for real: check, matrix, plan, selectors, exit codes, --debug."""

from __future__ import annotations

import json
import os
import re

import pytest
from conftest import LINE_027, ROOT, lmi, production_images

from buildkit import facts, index, profiles
from buildkit.errors import UserError
from buildkit.profiles import REGISTRY

CHECK = ["check", "--instance", "g5", "--cuda", "12.4", "--torch", "2.4.0", "--deepspeed", "0.15.1",
         "--djl", "0.30.0", "--python", "3.10", "--os", "ubuntu22.04"]
# vLLM 0.33.0 as the production matrix's line has it: CUDA 13, which g6e runs on InferenceAmiVersion 3-1's
# driver through cuda-compat.
CHECK_VLLM = ["check", "--engine", "vllm", "--vllm", "0.33.0", "--instance", "g6e", "--cuda", "13.0", "--torch",
              "2.14.0", "--python", "3.12", "--os", "ubuntu24.04",
              "--inference-ami", "al2-ami-sagemaker-inference-gpu-3-1"]


def test_check_valid_combination_is_one_line_with_notes() -> None:
    result = lmi(*CHECK)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ok: g5 can run DJL Serving 0.30.0")
    assert "needs cuda-compat on the default 470 driver" in lines[0]


def test_check_invalid_combination_exits_2_with_reasons() -> None:
    args = [a if a != "12.4" else "12.9" for a in CHECK]
    result = lmi(*args, "--torch-cuda", "12.4")
    assert result.returncode == 2
    assert result.stdout == "" and "Traceback" not in result.stderr
    reasons = result.stderr.splitlines()
    assert any("(host-driver," in r and "; try " in r for r in reasons)
    assert any("(deepspeed-cuda," in r for r in reasons)


def test_check_json() -> None:
    ok = json.loads(lmi(*CHECK, "--json").stdout)
    assert ok["valid"] and ok["cuda_compat"] and ok["torch_variant"] == "cu124"
    assert ok["torch_cuda_arch_list"] == "8.6" and ok["host_driver"] == "470"
    result = lmi(*[a if a != "g5" else "p6-b200" for a in CHECK], "--json")
    assert result.returncode == 2
    bad = json.loads(result.stdout)
    assert not bad["valid"] and {"arch-in-wheel", "arch-in-nvcc", "host-driver"} <= {e["rule"] for e in bad["errors"]}


def test_check_with_inference_ami_and_cpu() -> None:
    args = [a if a != "g5" else "g6e" for a in CHECK]
    assert lmi(*args).returncode == 2  # g6e's default driver is undocumented
    result = lmi(*args, "--inference-ami", "al2-ami-sagemaker-inference-gpu-3-1")
    assert result.returncode == 0 and "cuda-compat" not in result.stdout  # 550 >= 12.4's minimum
    cpu = lmi("check", "--instance", "cpu", "--torch", "2.9.1", "--deepspeed", "0.18.9", "--djl", "0.36.0",
              "--python", "3.12", "--os", "ubuntu24.04")
    assert cpu.returncode == 0 and "CPU" in cpu.stdout


def test_check_missing_flag_is_a_usage_error() -> None:
    result = lmi("check", "--instance", "g5")
    assert result.returncode == 2 and "required" in result.stderr
    without = [a for i, a in enumerate(CHECK) if "--djl" not in CHECK[max(i - 1, 0):i + 1]]
    result = lmi(*without)  # the default engine's components are required
    assert result.returncode == 2 and "needs --djl" in result.stderr and "Traceback" not in result.stderr


def test_check_another_engine_with_its_own_flags() -> None:
    """`--engine` picks the profile; its components are flags (one per profile component), its rules apply."""
    ok = lmi(*CHECK_VLLM)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: g6e can run vLLM 0.33.0, torch 2.14.0+cu130, CUDA 13.0.2")
    assert "needs cuda-compat on driver 550" in ok.stdout
    data = json.loads(lmi(*CHECK_VLLM, "--json").stdout)
    assert data["valid"] and data["combination"]["engine"] == "vllm" and data["combination"]["vllm"] == "0.33.0"
    assert data["torch_cuda_arch_list"] is None  # nothing is compiled: the kernels come in the wheel
    p3 = lmi(*[a if a != "g6e" else "p3" for a in CHECK_VLLM])
    assert p3.returncode == 2 and p3.stdout == "" and "Traceback" not in p3.stderr
    assert any("(arch-in-engine," in line and "sm_70" in line and "; try " in line for line in p3.stderr.splitlines())
    foreign = lmi(*CHECK_VLLM, "--djl", "0.30.0")
    assert foreign.returncode == 2 and "--djl belongs to engine deepspeed, not to vllm" in foreign.stderr
    handler = lmi(*CHECK_VLLM, "--handler", "lmi")  # an option of another profile
    assert handler.returncode == 2 and "--handler belongs to engine deepspeed" in handler.stderr
    missing = lmi(*[a for a in CHECK_VLLM if a not in ("--vllm", "0.33.0")])
    assert missing.returncode == 2 and "engine vllm needs --vllm" in missing.stderr
    assert lmi(*CHECK_VLLM[:2], "--engine", "nope", *CHECK_VLLM[4:]).returncode == 2


def test_check_options_come_from_the_profile() -> None:
    own = json.loads(lmi(*CHECK, "--handler", "djl", "--json").stdout)
    assert not own["valid"] and [e["rule"] for e in own["errors"]] == ["deepspeed-handler"]
    assert own["combination"]["handler"] == "djl"
    bad = lmi(*CHECK, "--handler", "nope")
    assert bad.returncode == 2 and "--handler 'nope': not one of lmi, djl" in bad.stderr


def test_matrix_table_json_and_selectors() -> None:
    table = lmi("matrix", "--instance", "g5").stdout.splitlines()
    g5 = [i for i in production_images() if i.family == "g5"]
    assert table[0].split() == ["ID", "FAMILY", "GPU", "CUDA", "TORCH", "ENGINE", "VERSIONS", "PYTHON", "OS", "COMPAT"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert sorted(rows) == sorted(i.id for i in g5)
    for image in g5:  # the engine and its versions under their matrix keys, whatever the engine
        row = rows[image.id]
        assert row[6] == image.combo.profile
        assert row[7] == ",".join(f"{k}={image.combo.part(k)}" for k in profiles.get(image.combo.profile).COMPONENTS)
    data = json.loads(lmi("matrix", "--json", "djl0.36-p5*").stdout)
    assert [d["id"] for d in data] == ["djl0.36-p5", "djl0.36-p5e", "djl0.36-p5en"]
    both = json.loads(lmi("matrix", "--json", "--instance", "g5", "--instance", "cpu").stdout)
    assert {d["family"] for d in both} == {"g5", "cpu"}


def test_unknown_selector_exits_2() -> None:
    result = lmi("plan", "--instance", "g7")
    assert result.returncode == 2 and "did you mean" in result.stderr and "Traceback" not in result.stderr
    result = lmi("plan", "nothing-*")
    assert result.returncode == 2 and "no image matches nothing-*" in result.stderr


def test_plan_json_has_tags_hashes_and_args() -> None:
    plan = json.loads(lmi("plan", "--json", "--instance", "p5").stdout)
    p5 = {i.id: i for i in production_images() if i.family == "p5"}
    assert {p["id"] for p in plan} == set(p5)
    for p in plan:
        assert len(p["content_hash"]) == 64 and p["hash_tag"] == f"hash-{p['content_hash'][:16]}"
        # the family's SM where the engine compiles CUDA code; nothing where its kernels come built
        compiles = profiles.get(p5[p["id"]].combo.profile).COMPILES
        assert p["torch_cuda_arch_list"] == ("9.0" if compiles else None)
    again = json.loads(lmi("plan", "--json", "--instance", "p5").stdout)
    assert again == plan  # deterministic across processes


def test_validate_production_and_verbose_notes() -> None:
    result = lmi("validate", "--verbose")
    assert result.returncode == 0
    assert result.stdout.splitlines()[-1].startswith(f"ok: {len(production_images())} images valid")
    assert "note: djl0.36-g4dn: DeepSpeed ops not built for sm_75" in result.stdout


def test_lmi_matrix_env_and_debug(write_matrix) -> None:
    path = write_matrix("schema: 1\nfamilies: {g5: {}}\nlines:" + LINE_027.replace('"3.10"', "3.10"))
    env = {**os.environ, "LMI_MATRIX": str(path)}
    quiet = lmi("validate", env=env)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr and "python is the number 3.10" in quiet.stderr
    loud = lmi("validate", "--debug", env=env)
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "UserError" in loud.stderr


def test_no_command_is_usage() -> None:
    result = lmi()
    assert result.returncode == 2 and "usage: lmi" in result.stderr


def test_bake_file_has_a_target_per_image() -> None:
    bake = json.loads(lmi("bake", "--instance", "p5", "--registry", "reg.example/team", "--base-mirror",
                          "mirror.example/hub").stdout)
    assert bake["group"]["default"]["targets"] == [i.id.replace(".", "_") for i in production_images()
                                                   if i.family == "p5"]
    target = bake["target"]["djl0_36-p5"]
    assert target["context"] == "images/djl0.36-p5" and os.path.isfile(os.path.join(target["context"], "Dockerfile"))
    assert target["tags"][0] == "reg.example/team/lmi-inference:0.36.0-deepspeed0.18.9-torch2.9.1-cu128-py312-" \
                                "ubuntu24.04-p5"
    assert "reg.example/team/lmi-inference:p5-latest" in target["tags"]
    assert target["args"]["RUNTIME_IMAGE"] == "mirror.example/hub/nvidia/cuda:12.8.1-base-ubuntu24.04"
    assert target["args"]["BUILDER_IMAGE"] == "mirror.example/hub/nvidia/cuda:12.8.1-devel-ubuntu24.04"
    assert target["secret"][0].startswith("id=ca,src=") and target["network"] == "host"
    assert target["cache-to"] == ["type=registry,ref=reg.example/team/lmi-inference:buildcache-djl0.36-p5,mode=max"]
    assert re.fullmatch(r"[0-9a-f]{64}", target["labels"]["io.lmi.content-hash"])


def test_bake_hash_matches_plan_when_no_build_args() -> None:
    bake = json.loads(lmi("bake", "--instance", "g5").stdout)
    plan = {p["id"]: p["content_hash"] for p in json.loads(lmi("plan", "--json", "--instance", "g5").stdout)}
    assert bake["target"]["djl0_27-g5"]["labels"]["io.lmi.content-hash"] == plan["djl0.27-g5"]


def _hashes(*args: str) -> dict[str, dict[str, str]]:
    """The content hash of every image as `lmi plan`, `lmi ci-matrix` and `lmi bake` print it."""
    plan = {p["id"]: p["content_hash"] for p in json.loads(lmi(*args[:2], "plan", "--json", *args[2:]).stdout)}
    ci = {e["id"]: e["content_hash"] for e in json.loads(lmi(*args[:2], "ci-matrix", *args[2:]).stdout)["include"]}
    bake = json.loads(lmi(*args[:2], "bake", *args[2:]).stdout)["target"]
    return {"plan": plan, "ci-matrix": ci,
            "bake": {i: bake[i.replace(".", "_")]["labels"]["io.lmi.content-hash"] for i in plan}}


def test_one_plan_whatever_the_host_options(tmp_path) -> None:
    """plan, ci-matrix and bake print one hash (the one build labels the image with, tests/test_build.py);
    where this host fetches from (a wheelhouse, a base mirror, a package index) leaves it alone, and a build
    arg, which is content, moves all three alike."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "x-1.0-py3-none-any.whl").write_bytes(b"not really a wheel")
    local = ("--matrix", str(ROOT / "tests" / "matrix.local.yaml"))
    plain = _hashes(*local)
    assert plain["plan"] and plain["plan"] == plain["ci-matrix"] == plain["bake"]
    hosted = _hashes(*local, "--wheelhouse", str(wheels), "--base-mirror", "mirror.example/hub",
                     "--pip-index-url", "https://index.example/simple")
    assert hosted == plain
    with_arg = _hashes(*local, "--wheelhouse", str(wheels), "--build-arg", "MAX_JOBS=2")
    assert with_arg["plan"] == with_arg["ci-matrix"] == with_arg["bake"] != plain["plan"]


def test_ci_matrix_runner_labels_and_shards() -> None:
    full = json.loads(lmi("ci-matrix").stdout)["include"]
    assert [e["id"] for e in full] == [i.id for i in production_images()]
    g5 = next(e for e in full if e["id"] == "djl0.36-g5")
    assert g5["runs-on"] == ["self-hosted", "linux", "x64", "gpu", "g5"] and g5["gpu"]
    cpu = next(e for e in full if e["family"] == "cpu")
    assert cpu["runs-on"] == ["self-hosted", "linux", "x64", "cpu"] and not cpu["gpu"]
    shards = [json.loads(lmi("ci-matrix", "--shard", f"{i}/3").stdout)["include"] for i in (1, 2, 3)]
    ids = [e["id"] for shard in shards for e in shard]
    assert sorted(ids) == sorted(e["id"] for e in full) and len(ids) == len(set(ids))
    assert lmi("ci-matrix", "--shard", "4/3").returncode == 2
    compact = lmi("ci-matrix", "--compact", "--instance", "g5").stdout
    assert compact.count("\n") == 1


def test_build_flags_are_validated_before_any_engine_work() -> None:
    result = lmi("bake", "--build-arg", "NOEQUALS")
    assert result.returncode == 2 and "expected KEY=VALUE" in result.stderr
    result = lmi("bake", "--wheelhouse", "/no/such/folder")
    assert result.returncode == 2 and "wheelhouse directory not found" in result.stderr


def test_changed_since_follows_the_content_hash(tmp_path) -> None:
    import shutil
    import subprocess

    for name in ("matrix.yaml", "matrix.lock", "templates", "images"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("-c", "user.email=t@example.com", "-c", "user.name=t", "add", ".")
    git("-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "base")
    matrix = str(tmp_path / "matrix.yaml")
    assert json.loads(lmi("--matrix", matrix, "ci-matrix", "--changed-since", "HEAD").stdout)["include"] == []
    text = (tmp_path / "matrix.yaml").read_text().replace('transformers: "4.57.3"', 'transformers: "4.57.4"')
    (tmp_path / "matrix.yaml").write_text(text)
    assert lmi("--matrix", matrix, "render").returncode == 0
    touched = [e["id"] for e in json.loads(lmi("--matrix", matrix, "ci-matrix", "--changed-since", "HEAD").stdout)
               ["include"]]
    assert touched and touched == [i.id for i in production_images() if i.libraries.get("transformers") == "4.57.3"]
    bad = lmi("--matrix", matrix, "ci-matrix", "--changed-since", "no-such-ref")
    assert bad.returncode == 2 and "no such commit here" in bad.stderr


# --- `lmi uri` over the engines ------------------------------------------------------------------------------


def _entry(n: int, family: str, engine: str, torch: str, cuda: str, **versions: str) -> dict:
    digest = f"sha256:{n:064d}"
    return {"id": f"{engine}-{n}-{family}", "family": family, "tag": f"t{n}", "digest": digest, "built": f"2026-{n}",
            "engine": engine, "components": {**versions, "torch": torch, "cuda": cuda, "python": "3.12",
                                              "os": "ubuntu24.04"},
            "registries": [{"url": "oci://r.example/ml", "kind": "oci", "region": None,
                            "uri": f"r.example/ml/lmi@{digest}"}]}


def _suffix(result) -> str:
    return result.stdout.strip()[-2:]


def test_uri_chooses_among_engines(tmp_path) -> None:
    """An index with images of both engines: --engine and each engine's component flags choose; without them
    a family answers as it did before profiles (the default engine's image), and says what else it has."""
    entries = [_entry(1, "g5", "deepspeed", "2.1.2", "12.1.1", djl="0.27.0", deepspeed="0.12.6"),
               _entry(2, "g5", "deepspeed", "2.9.1", "12.8.1", djl="0.36.0", deepspeed="0.18.9"),
               _entry(3, "g6e", "deepspeed", "2.9.1", "12.8.1", djl="0.36.0", deepspeed="0.18.9"),
               _entry(4, "g6e", "vllm", "2.14.0", "13.0.2", vllm="0.33.0"),
               _entry(5, "g6", "vllm", "2.14.0", "13.0.2", vllm="0.33.0")]
    path = tmp_path / "images.json"
    index.update(path, entries, REGISTRY)
    assert json.loads(path.read_text())["schema"] == index.SCHEMA
    at = ("--index", str(path))
    vllm = lmi("uri", "--instance", "g6e", "--engine", "vllm", *at)
    assert vllm.returncode == 0 and _suffix(vllm) == "04", vllm.stderr
    implied = lmi("uri", "--instance", "g6e", "--vllm", "0.33", *at)  # a component flag implies its engine
    assert _suffix(implied) == "04" and "also has" not in implied.stderr
    default = lmi("uri", "--instance", "g6e", *at)
    assert _suffix(default) == "03" and "g6e also has images of engine vllm (choose with --engine)" in default.stderr
    assert _suffix(lmi("uri", "--instance", "g6", *at)) == "05"  # the only engine a family has answers
    g5 = lmi("uri", "--instance", "g5", *at)
    assert _suffix(g5) == "02" and "also has" not in g5.stderr  # as before there were engines: the newest
    assert _suffix(lmi("uri", "--instance", "g5", "--djl", "0.27", *at)) == "01"
    data = json.loads(lmi("uri", "--instance", "g6e", "--engine", "vllm", "--json", *at).stdout)
    assert data["engine"] == "vllm" and data["components"]["vllm"] == "0.33.0"
    none = lmi("uri", "--instance", "g5", "--engine", "vllm", *at)
    assert none.returncode == 2 and "Traceback" not in none.stderr
    assert "no g5 image with engine vllm; g5 has: djl 0.27.0, deepspeed 0.12.6 (engine deepspeed" in none.stderr
    assert lmi("uri", "--instance", "g6e", "--engine", "vllm", "--djl", "0.36", *at).returncode == 2
    assert lmi("uri", "--instance", "g6e", "--engine", "nope", *at).returncode == 2
    table = (tmp_path / "AVAILABLE_IMAGES.md").read_text()
    assert "| g6e | - | vllm | vLLM 0.33.0 | 2.14.0 |" in table
    assert "| g6e | - | deepspeed | DJL Serving 0.36.0, DeepSpeed 0.18.9 | 2.9.1 |" in table

    import buildkit

    assert buildkit.image_uri("g6e", engine="vllm", index=str(path)).endswith("04")
    assert buildkit.image_uri("g6e", vllm="0.33.0", index=str(path)).endswith("04")
    assert buildkit.image_uri("g5", djl="0.27", index=str(path)).endswith("01")
    with pytest.raises(UserError, match="unknown component 'dj'"):
        buildkit.image_uri("g5", dj="0.27", index=str(path))
    with pytest.raises(UserError, match="unknown engine 'vlm'"):
        buildkit.image_uri("g5", engine="vlm", index=str(path))


def test_an_old_index_still_answers_and_merges_forward(tmp_path) -> None:
    """Schema 1 (before profiles): no `engine`, DJL Serving recorded as `djl_serving`. It answers as the
    default engine's images, and merging into it writes the current schema, its entries upgraded."""
    old = _entry(1, "g5", "deepspeed", "2.1.2", "12.1.1", deepspeed="0.12.6")
    del old["engine"]
    old["components"] = {"djl_serving": "0.27.0", **old["components"], "java": "11"}
    path = tmp_path / "images.json"
    path.write_text(json.dumps({"schema": 1, "generated": None, "images": [old]}))
    at = ("--index", str(path))
    assert _suffix(lmi("uri", "--instance", "g5", "--djl", "0.27", *at)) == "01"
    assert _suffix(lmi("uri", "--instance", "g5", "--engine", "deepspeed", "--deepspeed", "0.12", *at)) == "01"
    data = json.loads(lmi("uri", "--instance", "g5", "--json", *at).stdout)
    assert data["engine"] == "deepspeed" and data["components"]["djl"] == "0.27.0"
    assert "djl_serving" not in data["components"]
    index.update(path, [_entry(2, "g6e", "vllm", "2.14.0", "13.0.2", vllm="0.33.0")], REGISTRY)
    merged = json.loads(path.read_text())
    assert merged["schema"] == index.SCHEMA
    assert {e["id"]: (e["engine"], sorted(e["components"])[:3]) for e in merged["images"]} == {
        old["id"]: ("deepspeed", ["cuda", "deepspeed", "djl"]), "vllm-2-g6e": ("vllm", ["cuda", "os", "python"])}
    future = lmi("uri", "--instance", "g5", "--index", str(_write(tmp_path / "future.json", {"schema": 3})))
    assert future.returncode == 2 and "not a release index of schema 1/2 (got '3')" in future.stderr


def _write(path, doc: dict):
    path.write_text(json.dumps({"generated": None, "images": [], **doc}))
    return path


def test_render_warns_what_the_profile_warns(tmp_path) -> None:
    """The engine's profile says what a render warns about (here: DJL Serving downloads without a recorded
    sha256); images of an engine with nothing to warn about add no line."""
    result = lmi("render", "--instance", "g5", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    g5 = [i for i in production_images() if i.family == "g5"]
    djl = facts.load(REGISTRY).stacks["deepspeed"].djl
    versions = {i.combo.part("djl") for i in g5} - {None}
    expected = sorted(v for v in versions if djl[v].sha256 is None)
    assert [w.split("DJL Serving ")[1].split()[0] for w in warnings] == expected
    assert all("used by 1 image(s)" in w for w in warnings)
