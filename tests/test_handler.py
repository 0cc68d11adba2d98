"""The toolkit's DeepSpeed handler (buildkit/lmi_deepspeed.py) with real DeepSpeed and Transformers on CPU:
options and requests checked, one rank in-process, and two real ranks started by mpirun as DJL's MPI mode
starts them, behind the DJL Serving stand-in. Every answer must equal plain Transformers' greedy output."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT

from buildkit import incheck
from buildkit import lmi_deepspeed as handler
from buildkit.lmi_deepspeed import OptionError, RequestError, parse_options, parse_request

PROMPTS = ["hello world", "the cat sat on the mat", "deepspeed"]
TOKENS = 12
STANDIN = ROOT / "tests" / "local" / "djl_serving_standin.py"
STANDIN_LIB = ROOT / "tests" / "local" / "standin"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("deepspeed")
    path = str(tmp_path_factory.mktemp("tiny") / "model")
    incheck.make_tiny_model(path)
    return {"dir": path, "reference": incheck.reference_generate(path, PROMPTS, TOKENS)}


# --- options and requests (no model needed) ------------------------------------------------------------


def test_options_from_serving_properties(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    o = parse_options({"model_id": str(tmp_path), "tensor_parallel_degree": "2", "dtype": "bfloat16",
                       "max_new_tokens": "100", "engine": "Python", "mpi_mode": "true"}, world_size=2, cuda=False)
    assert (o.tensor_parallel_degree, o.dtype, o.max_new_tokens, o.kernel_injection) == (2, "bf16", 100, "auto")
    assert parse_options({"model_dir": str(tmp_path)}, world_size=1, cuda=True).dtype == "fp16"


@pytest.mark.parametrize("props,world,message", [
    ({"tensor_parallel_degree": "4"}, 2, "option.tensor_parallel_degree=4, but 2 rank(s) were started"),
    ({"tensor_parallel_degree": "two"}, 1, "option.tensor_parallel_degree='two': not a whole number"),
    ({"dtype": "int3"}, 1, "option.dtype='int3': use one of fp16, bf16, fp32"),
    ({"dtype": "fp16"}, 1, "option.dtype=fp16: half precision needs a GPU"),
    ({"max_new_tokens": "0"}, 1, "option.max_new_tokens=0: must be at least 1"),
    ({"kernel_injection": "maybe"}, 1, "option.kernel_injection='maybe'"),
    ({"trust_remote_code": "true"}, 1, "option.trust_remote_code"),
    ({"model_id": "s3://bucket/model"}, 1, "not a local directory"),
    ({"model_id": "/nonexistent"}, 1, "not a local directory"),
])
def test_a_bad_option_is_one_line_naming_it(tmp_path, props, world, message) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(OptionError) as err:
        parse_options({"model_id": str(tmp_path), **props}, world_size=world, cuda=False)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_requests_in_the_lmi_shape() -> None:
    assert parse_request({"inputs": "hi"}, 64) == (["hi"], {"max_new_tokens": 32}, False)
    prompts, params, is_list = parse_request({"inputs": ["a", "b"], "parameters": {
        "max_new_tokens": 5, "do_sample": True, "temperature": 0.7, "top_k": 5, "seed": 3}}, 64)
    assert prompts == ["a", "b"] and is_list and params["max_new_tokens"] == 5 and params["seed"] == 3


@pytest.mark.parametrize("body,message", [
    ("hello", "the body must be a JSON object"),
    ({}, "'inputs' must be a non-empty string"),
    ({"inputs": ""}, "'inputs' must be a non-empty string"),
    ({"inputs": ["ok", 3]}, "'inputs' must be a non-empty string"),
    ({"inputs": "x", "prompt": "y"}, "unknown field(s) prompt"),
    ({"inputs": "x", "parameters": {"max_tokens": 4}}, "unknown parameter(s) max_tokens"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 65}}, "max_new_tokens must be a whole number from 1 to 64"),
    ({"inputs": "x", "parameters": {"max_new_tokens": True}}, "max_new_tokens must be a whole number"),
    ({"inputs": "x", "parameters": {"temperature": 0}}, "temperature must be a number in (0, 100]"),
    ({"inputs": "x", "parameters": {"do_sample": "yes"}}, "do_sample must be true or false"),
    ({"inputs": "x", "parameters": []}, "'parameters' must be a JSON object"),
])
def test_a_bad_request_is_a_400_with_a_message(body, message) -> None:
    with pytest.raises(RequestError) as err:
        parse_request(body, 64)
    assert message in str(err.value) and err.value.code == 400


# --- one rank, in-process ------------------------------------------------------------------------------


def test_one_rank_answers_as_plain_transformers_does(tiny) -> None:
    service = handler.start({"model_id": tiny["dir"], "tensor_parallel_degree": "1", "max_new_tokens": "64"})
    assert not service.injected  # CPU: AutoTP, never kernel injection
    one = {"max_new_tokens": TOKENS}
    answers = service.answer([
        {"inputs": PROMPTS[0], "parameters": one},
        {"inputs": PROMPTS[1:], "parameters": one},  # a list in, a list out
        {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 4}},  # other parameters: another group
        {"inputs": 3},
    ])
    assert answers[0] == {"generated_text": tiny["reference"][0]}
    assert answers[1] == [{"generated_text": t} for t in tiny["reference"][1:]]
    assert tiny["reference"][0].startswith(answers[2]["generated_text"])
    assert isinstance(answers[3], RequestError)
    full = service.answer([{"inputs": PROMPTS[0], "parameters": {**one, "return_full_text": True}}])[0]
    assert full == {"generated_text": PROMPTS[0] + tiny["reference"][0]}


# --- two ranks under mpirun, behind the DJL Serving stand-in -------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(port: int, body) -> tuple[int, object]:
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Standin:
    """The DJL Serving stand-in on a loopback port of its own, serving a model directory."""

    def __init__(self, model_dir: str, properties: str, tmp_path: Path) -> None:
        self.dir = tmp_path / "model"
        shutil.copytree(model_dir, self.dir)
        (self.dir / "serving.properties").write_text(textwrap.dedent(properties))
        self.port = _free_port()
        env = {**os.environ, "SM_MODEL_DIR": str(self.dir), "DJL_STANDIN_LIB": str(STANDIN_LIB),
               "DJL_STANDIN_PORT": str(self.port), "PYTHONPATH": str(ROOT / "buildkit"),
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
        self.log = tmp_path / "standin.log"
        self.proc = subprocess.Popen([sys.executable, str(STANDIN)], env=env, stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 480) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=5) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)


@pytest.fixture
def mpirun():
    if not shutil.which("mpirun"):
        pytest.skip("mpirun is missing: `make test` installs Debian's openmpi-bin (make mpi)")
    pytest.importorskip("mpi4py")


def test_two_ranks_partition_the_model_and_answer_as_transformers_does(tiny, mpirun, tmp_path) -> None:
    server = Standin(tiny["dir"], """
        engine=Python
        option.mpi_mode=true
        option.entryPoint=lmi_deepspeed
        option.tensor_parallel_degree=2
        option.max_new_tokens=64
        """, tmp_path)
    try:
        assert server.wait_ready(), server.log.read_text()[-3000:]
        status, answer = _post(server.port, {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": TOKENS}})
        assert (status, answer) == (200, {"generated_text": tiny["reference"][0]})
        status, answer = _post(server.port, {"inputs": PROMPTS, "parameters": {"max_new_tokens": TOKENS}})
        assert (status, answer) == (200, [{"generated_text": t} for t in tiny["reference"]])
        status, answer = _post(server.port, {"inputs": "x", "parameters": {"max_tokens": 3}})
        assert status == 400 and "unknown parameter(s) max_tokens" in answer["error"]
        status, answer = _post(server.port, b"not json")
        assert status == 400 and "must be a JSON object" in answer["error"]
        # The server still answers after bad requests: the ranks stayed in step.
        status, answer = _post(server.port, {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": TOKENS}})
        assert (status, answer) == (200, {"generated_text": tiny["reference"][2]})
        log = server.log.read_text()
        assert "starting 2 rank(s): mpirun -np 2" in log and "model loaded on 2 rank(s)" in log
        assert log.count("AutoTP") >= 2  # each rank partitioned its copy
    finally:
        server.stop()


def test_each_rank_holds_part_of_the_weights(tiny, mpirun, tmp_path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(ROOT / 'buildkit')!r})
        import lmi_deepspeed
        service = lmi_deepspeed.start({{"model_id": {tiny['dir']!r}, "tensor_parallel_degree": "2"}})
        params = sum(p.numel() for p in service.engine.module.parameters())
        out = service.answer([{{"inputs": {PROMPTS[1]!r}, "parameters": {{"max_new_tokens": {TOKENS}}}}}])
        with open(os.path.join({str(tmp_path)!r}, "rank" + os.environ["RANK"] + ".json"), "w") as fh:
            json.dump({{"params": params, "answer": out[0]}}, fh)
    """))
    result = subprocess.run(["mpirun", "-np", "2", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
                             sys.executable, str(script)], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]  # one file a rank
    import torch
    from transformers import AutoModelForCausalLM

    full = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny["dir"], dtype=torch.float32).parameters())
    assert all(r["params"] < 0.75 * full for r in ranks), (ranks, full)  # partitioned, not replicated
    assert all(r["answer"] == {"generated_text": tiny["reference"][1]} for r in ranks)


def test_a_wrong_option_fails_the_model_load_with_one_line(tiny, mpirun, tmp_path) -> None:
    server = Standin(tiny["dir"], """
        engine=Python
        option.mpi_mode=true
        option.entryPoint=lmi_deepspeed
        option.tensor_parallel_degree=2
        option.dtype=int3
        """, tmp_path)
    try:
        assert not server.wait_ready(timeout=300)
        assert server.proc.wait(60) == 1
        log = server.log.read_text()
        assert "model load failed: ValueError: lmi_deepspeed: option.dtype='int3': use one of fp16, bf16, fp32" in log
    finally:
        server.stop()
