"""Deploying on the vLLM line as SageMaker users do: a model from S3 through the Run:ai model streamer (what
`--load-format runai_streamer` reads s3:// models with in vLLM 0.33.0), against moto's S3 server on loopback.

The streamer is the one the vLLM lock pins (runai-model-streamer and its S3 backend, the host extras of
pyproject.toml). It runs in a child process configured only through the environment, as in the image: the
endpoint from AWS_ENDPOINT_URL (its S3 backend reads it; vLLM copies it to RUNAI_STREAMER_S3_ENDPOINT for older
streamers), the region from AWS_REGION, path-style addressing (RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING=0) for
a loopback endpoint, credentials from the standard variables. It uses the calls vLLM makes: list_safetensors
(runai_streamer_loader._prepare_weights), pull_files (ModelConfig.maybe_pull_model_tokenizer_for_runai: the
config, not the weights) and SafetensorsStreamer (weight_utils.runai_safetensors_weights_iterator)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sm_vllm
from conftest import ROOT, free_port

from buildkit import facts, profiles
from buildkit.profiles import REGISTRY

streamer = pytest.importorskip("runai_model_streamer", reason="the Run:ai model streamer is a host extra "
                               "(pip install -e '.[host]'); the vLLM lock pins it")
torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

BUCKET, PREFIX, REGION = "models", "tiny-llama", "us-west-2"


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free loopback port, stopped after the module."""
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("moto_server did not listen within 30 s")
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION,
               "AWS_EC2_METADATA_DISABLED": "true", "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0"}
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def model(s3, tmp_path_factory):
    """Two safetensors shards and a config, made here and uploaded under s3://models/tiny-llama/."""
    import boto3

    local = tmp_path_factory.mktemp("model")
    gen = torch.Generator().manual_seed(0)
    shards = {"model-00001-of-00002.safetensors": {"embed.weight": torch.randn(64, 16, generator=gen),
                                                   "norm.weight": torch.ones(16, dtype=torch.bfloat16)},
              "model-00002-of-00002.safetensors": {"lm_head.weight": torch.randn(16, 64, generator=gen).half(),
                                                   "positions": torch.arange(7, dtype=torch.int64)}}
    for name, tensors in shards.items():
        safetensors_torch.save_file(tensors, local / name)
    (local / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    client = boto3.client("s3", region_name=REGION, endpoint_url=s3["AWS_ENDPOINT_URL"],
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    for path in local.iterdir():
        client.upload_file(str(path), BUCKET, f"{PREFIX}/{path.name}")
    return local


# What the child runs: the streamer alone, configured by its environment; it saves what it read.
READ = textwrap.dedent("""
    import json, os, sys
    import safetensors.torch
    from runai_model_streamer import SafetensorsStreamer, list_safetensors, pull_files
    uri, out = sys.argv[1], sys.argv[2]
    files = sorted(list_safetensors(uri))
    pull_files(uri, os.path.join(out, "pulled"), ["*.json"], None)
    got = {}
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(files)
        for name, tensor in streamer.get_tensors():
            got[name] = tensor.clone()
    safetensors.torch.save_file(got, os.path.join(out, "read.safetensors"))
    print(json.dumps({"files": files, "pulled": sorted(os.listdir(os.path.join(out, "pulled")))}))
""")


def _read(uri: str, out: Path, env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RUNAI_"))}
    return subprocess.run([sys.executable, "-c", READ, uri, str(out)], env={**clean, **env}, capture_output=True,
                          text=True, timeout=180)


def test_the_streamer_reads_the_models_tensors_from_s3_equal_to_the_files(s3, model, tmp_path) -> None:
    result = _read(f"s3://{BUCKET}/{PREFIX}/", tmp_path, s3)
    assert result.returncode == 0, result.stderr[-2000:]
    said = json.loads(result.stdout.strip().splitlines()[-1])
    assert said["files"] == [f"s3://{BUCKET}/{PREFIX}/{p.name}" for p in sorted(model.glob("*.safetensors"))]
    assert said["pulled"] == ["config.json"]  # the config comes down; the weights are streamed, not pulled
    got = safetensors_torch.load_file(tmp_path / "read.safetensors")
    want = {k: v for p in sorted(model.glob("*.safetensors")) for k, v in safetensors_torch.load_file(p).items()}
    assert set(got) == set(want) == {"embed.weight", "norm.weight", "lm_head.weight", "positions"}
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_the_streamer_reads_only_from_the_endpoint_the_environment_names(s3, model, tmp_path) -> None:
    """Pointed at another loopback port (nothing listens there), the streamer reads nothing and fails: the
    endpoint it read from above is the one the environment named, not a default."""
    env = {**s3, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    result = _read(f"s3://{BUCKET}/{PREFIX}/", tmp_path, env)
    assert result.returncode != 0 and not (tmp_path / "read.safetensors").exists()


# --- the entrypoint: a hub id or s3:// as AWS's containers take them -------------------------------------------


def test_s3_model_with_the_streamer_maps_as_aws_maps_it(tmp_path) -> None:
    env = {"SM_VLLM_MODEL": "s3://models/tiny-llama/", "SM_VLLM_LOAD_FORMAT": "runai_streamer",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_SECRET_ACCESS_KEY": "never-on-argv"}
    args = sm_vllm.build_args(env, str(tmp_path / "empty"))
    assert args == ["--port", "8080", "--load-format", "runai_streamer", "--model", "s3://models/tiny-llama/"]
    hf = sm_vllm.build_args({"HF_MODEL_ID": "s3://models/tiny-llama", "SM_VLLM_LOAD_FORMAT": "runai_streamer_sharded"},
                            str(tmp_path / "empty"))
    assert hf[:4] == ["--port", "8080", "--model", "s3://models/tiny-llama"]


@pytest.mark.parametrize("env, says", [
    ({"SM_VLLM_MODEL": "s3://models/m/"}, "SM_VLLM_MODEL=s3://models/m/: vLLM reads an s3:// model only with the "
                                          "Run:ai model streamer; set SM_VLLM_LOAD_FORMAT=runai_streamer"),
    ({"SM_VLLM_MODEL": "S3://models/m/", "SM_VLLM_LOAD_FORMAT": "safetensors"}, "(not 'safetensors')"),
    ({"HF_MODEL_ID": "s3://models/m/"}, "HF_MODEL_ID=s3://models/m/: vLLM reads an s3:// model only"),
    ({"SM_VLLM_MODEL": "gs://models/m/", "SM_VLLM_LOAD_FORMAT": "runai_streamer"}, "streams models from s3:// only"),
])
def test_an_object_store_model_the_image_cannot_read_is_refused(tmp_path, env, says) -> None:
    with pytest.raises(sm_vllm.BadValue) as err:
        sm_vllm.build_args(env, str(tmp_path / "empty"))
    assert says in str(err.value)


def test_dry_run_of_a_hub_id_keeps_the_token_off_argv(tmp_path) -> None:
    """A gated hub model: vLLM downloads it itself with HF_TOKEN from the environment; the printed command (and
    so the argv exec'd) never carries it."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SM_VLLM_", "HF_"))},
           "HF_MODEL_ID": "meta-llama/Llama-3.1-8B-Instruct", "HF_TOKEN": "hf_secret_value_123",
           "SM_VLLM_TENSOR_PARALLEL_SIZE": "4"}
    script = Path(sm_vllm.__file__)
    out = subprocess.run([sys.executable, str(script), "--dry-run"], env=env, capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("vllm serve --port 8080 --model meta-llama/Llama-3.1-8B-Instruct "
                                  "--tensor-parallel-size 4")
    assert "hf_secret_value_123" not in out.stdout + out.stderr


def test_the_vllm_line_locks_the_streamer_and_checks_it_in_the_image() -> None:
    """The lock roots carry the streamer with its S3 backend, every vLLM lock pins both (the versions the host
    extras install for the test above), and the image's cpu tier checks that it imports and streams."""
    release = facts.load(REGISTRY).stacks["vllm"].releases["0.33.0"]
    assert "runai-model-streamer[s3]>=0.15.7" in release.extra_roots
    from importlib import metadata

    host = {d: metadata.version(d) for d in ("runai-model-streamer", "runai-model-streamer-s3")}
    for path in (ROOT / "matrix.lock", ROOT / "tests" / "matrix.vllm-local.lock"):
        sets = json.loads(path.read_text())["sets"]
        pinned = {n: v for key, s in sets.items() if key.startswith("vllm") for rows in s["layers"].values()
                  for n, v, _ in rows if n in host}
        assert pinned == host, path
    assert "runai-streamer" in profiles.get("vllm").CHECKS["cpu"]
    code = ("import json, sys; sys.path.insert(0, 'buildkit/resources/check'); import lmi_check; "
            "lmi_check.load_profile(sys.argv[1]); "
            "print(json.dumps(lmi_check.BUILTINS['runai-streamer'][0]))")
    out = subprocess.run([sys.executable, "-c", code, str(profiles.get("vllm").CHECKER)], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and json.loads(out.stdout) == "cpu", out.stderr
