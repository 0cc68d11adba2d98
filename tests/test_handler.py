"""The toolkit's handler (lmi_deepspeed.py) with real DeepSpeed and Transformers on CPU: options,
requests and DJL's batch encoding checked; one rank in-process; ranks started by mpirun as DJL's MPI mode
starts them, behind the DJL Serving stand-in, which follows real DJL per version (buildkit/data/djl.yaml,
behaviour): passive workers (0.30+) and every-rank routing with the last rank's answer (0.27), no MPI mode
without a GPU, rolling batch turned on by 0.27 when serving.properties has no engine= line. Every answer must
equal plain Transformers' greedy output; the tiny model families the LMI containers name (GPT-2, GPT-NeoX,
OPT, BLOOM, Llama) are partitioned over two ranks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import lmi_check
import lmi_deepspeed as handler
import pytest
from conftest import ROOT, docker
from lmi_deepspeed import OptionError, Reply, Request, RequestError, parse_options, parse_request

from buildkit import engine
from buildkit import facts as facts_mod
from buildkit.profiles import REGISTRY
from tests.local import prepare

# Their prerequisites (mpirun, DeepSpeed, Accelerate, Diffusers, the registry) are the project's to provide:
# under CI a skip here fails the run (tests/conftest.py).
pytestmark = pytest.mark.required_in_ci

PROMPTS = ["hello world", "the cat sat on the mat", "deepspeed"]
TOKENS = 12
STANDIN = ROOT / "tests" / "local" / "djl_serving_standin.py"
STANDIN_LIB = ROOT / "tests" / "local" / "standin"
IMAGE_CODE = ROOT / "buildkit" / "resources" / "image"  # the handler, imported flat as the image does
# The families the LMI containers name, besides Llama (lmi_check's tiny model: every other test here).
FAMILIES = ("gpt2", "gpt_neox", "opt", "bloom")


def json_request(body, content_type: str = "application/json") -> Request:
    return Request(json.dumps(body).encode(), content_type)


def make_tiny(tmp_path_factory) -> dict:
    path = str(tmp_path_factory.mktemp("tiny") / "model")
    lmi_check.make_tiny_model(path)
    return {"dir": path, "reference": lmi_check.reference_generate(path, PROMPTS, TOKENS)}


@pytest.fixture(scope="module")
def tiny(shared, tmp_path_factory):
    """lmi_check's tiny Llama and plain Transformers' greedy answers to PROMPTS, made once a session (test_hostile
    serves the same model): nothing may change the directory (a server copies it)."""
    pytest.importorskip("deepspeed")
    return shared.get("tiny-llama", lambda: make_tiny(tmp_path_factory))


def make_family_model(path: str, family: str) -> str:
    """A tiny random causal LM of one family with lmi_check's character tokenizer (no hub): 8 heads, 2 layers,
    weights drawn wide enough that greedy continuations differ from prompt to prompt."""
    import torch
    import transformers as tf

    lmi_check.make_tiny_model(path)  # the tokenizer files (and a Llama, replaced below unless asked for)
    if family == "llama":
        return path
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    ids = {"vocab_size": len(tokenizer), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    config = {
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=8, n_positions=128, initializer_range=0.5, **ids),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                             intermediate_size=128, max_position_embeddings=128,
                                             initializer_range=0.5, **ids),
        "opt": lambda: tf.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, ffn_dim=128,
                                    max_position_embeddings=128, word_embed_proj_dim=64, init_std=0.5, **ids),
        "bloom": lambda: tf.BloomConfig(hidden_size=64, n_layer=2, n_head=8, initializer_range=0.5, **ids),
    }[family]()
    torch.manual_seed(0)
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        Path(path, name).unlink(missing_ok=True)
    tf.AutoModelForCausalLM.from_config(config).eval().save_pretrained(path, safe_serialization=True)
    return path


# --- options, routing and requests (no model needed) ---------------------------------------------------


def test_options_from_serving_properties(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    o = parse_options({"model_id": str(tmp_path), "tensor_parallel_degree": "2", "dtype": "bfloat16",
                       "max_new_tokens": "100", "engine": "Python", "mpi_mode": "true"}, world_size=2, cuda=False)
    assert (o.tensor_parallel_degree, o.dtype, o.max_new_tokens, o.kernel_injection) == (2, "bf16", 100, "auto")
    assert parse_options({"model_dir": str(tmp_path)}, world_size=1, cuda=True).dtype == "fp16"


@pytest.mark.parametrize("props,world,message", [
    ({"tensor_parallel_degree": "4"}, 2, "option.tensor_parallel_degree=4, but 2 rank(s) were started"),
    ({"tensor_parallel_degree": "2"}, 1, "set option.mpi_mode=true so DJL starts one rank per partition (DJL runs "
                                         "MPI mode only where GPUs are)"),
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


@pytest.mark.parametrize("props,message", [
    ({"rolling_batch": "auto"}, "option.rolling_batch=auto: DJL would stream tokens through its rolling-batch "
                                "protocol"),
    ({"rolling_batch": "scheduler"}, "set option.rolling_batch=disable (DJL 0.27 turns it on"),
    ({"async_mode": "true"}, "option.async_mode=true: this handler answers each batch synchronously"),
])
def test_what_djl_would_route_wrongly_is_refused_in_one_line(props, message) -> None:
    with pytest.raises(OptionError) as err:
        handler.check_routing(props)
    assert message in str(err.value) and "\n" not in str(err.value)
    handler.check_routing({"rolling_batch": "disable", "async_mode": "false"})  # what DJL 0.36 sets: fine


def test_the_way_is_chosen_in_serving_properties(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert handler.service_class({"model_id": str(tmp_path)}) == ("deepspeed", handler.Service)
    with pytest.raises(OptionError, match=r"^option.partition='fsdp': use deepspeed or accelerate$"):
        handler.service_class({"model_id": str(tmp_path), "partition": "fsdp"})


def test_requests_in_the_lmi_shape() -> None:
    assert parse_request({"inputs": "hi"}, 64) == (["hi"], {"max_new_tokens": 32}, False)
    prompts, params, is_list = parse_request({"inputs": ["a", "b"], "parameters": {
        "max_new_tokens": 5, "do_sample": True, "temperature": 0.7, "top_k": 5, "seed": 3}}, 64)
    assert prompts == ["a", "b"] and is_list and params["max_new_tokens"] == 5 and params["seed"] == 3
    # A text body is the prompt itself (DJL's own handlers took text too); JSON otherwise.
    assert Request(b"hello there", "text/plain").lmi() == {"inputs": "hello there"}
    assert json_request({"inputs": "x"}).lmi() == {"inputs": "x"}
    with pytest.raises(RequestError, match="the body is not JSON"):
        Request(b"hello", "").lmi()


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


class Echo:
    """A service that answers what it was asked: the glue's decoding and encoding, without a model."""

    def answer(self, requests):
        return [RequestError("no", 400) if r.body == b"bad" else
                Reply(r.body, "image/png") if r.content_type == "image/png" else
                {"body": r.body.decode(), "type": r.content_type, "accept": r.accept} for r in requests]


def test_a_batch_is_decoded_and_answered_by_batch_index_as_djl_encodes_it(monkeypatch) -> None:
    """DJL's batch (PyPredictor.batchPredict): `batch_size`, every request's headers and content under
    batch_NNN.; a query parameter is a content entry of its own, so keys must not be taken from the content."""
    monkeypatch.syspath_prepend(str(STANDIN_LIB))
    from djl_python.inputs import Input

    monkeypatch.setattr(handler, "_ranks", handler.Ranks.__new__(handler.Ranks))
    handler._ranks.world, handler._ranks.service = 1, Echo()
    batch = Input({"batch_size": "3", "batch_000.Content-Type": "application/json; charset=utf-8",
                   "batch_000.Accept": "application/json", "batch_001.content-type": "text/plain",
                   "batch_002.content-type": "application/json"},
                  [("batch_000.foo", b"bar"), ("batch_000.data", b'{"a": 1}'), ("batch_001.data", b"two"),
                   ("batch_002.data", b"bad")])
    out = handler.handle(batch)
    assert out.code == 200 and out.properties == {"content-type": "application/json"}
    assert [k for k, _ in out.content.pairs] == ["batch_0.data", "batch_1.data", "batch_2.data"]
    answers = [json.loads(v) for _, v in out.content.pairs]
    assert answers == [{"body": '{"a": 1}', "type": "application/json", "accept": "application/json"},
                       {"body": "two", "type": "text/plain", "accept": ""}, {"error": "no", "code": 400}]
    single = handler.handle(Input({"Content-Type": "image/png"}, [("foo", b"bar"), ("data", b"\x89PNG")]))
    assert (single.code, single.properties, single.content.pairs) == (200, {"content-type": "image/png"},
                                                                      [("data", b"\x89PNG")])
    error = handler.handle(Input({}, [("data", b"bad")]))
    assert error.code == 400 and json.loads(error.content.value_at(0))["error"] == "no"


def test_the_stand_ins_behaviour_table_is_the_cited_djl_facts_per_version(tmp_path) -> None:
    f = facts_mod.load(REGISTRY).stacks["deepspeed"]  # DJL Serving's facts are the DeepSpeed profile's
    for b in f.djl_behaviour.values():  # every behaviour cites DJL's own file at a tag it was read at
        assert b.source.startswith("deepjavalibrary/djl-serving@") and b.checked, b.name
        assert any(part in b.source for part in (".java", ".py")), b.name
    expected = {  # read from DJL Serving at these versions (docs/djl.md)
        "0.27.0": {"routing": "every-rank", "answer_rank": "last", "mpi_needs_gpus": True,
                   "rolling_batch_without_engine": "auto", "none_answer": 204, "handler_exception":
                   "prediction failure", "load_failure": "Failed to initialize model: "},
        "0.32.0": {"routing": "rank-0", "rolling_batch_without_engine": "disable",
                   "handler_exception": "invoke handler failure"},
        "0.36.0": {"routing": "rank-0", "answer_rank": "last", "mpi_needs_gpus": True,
                   "rolling_batch_without_engine": "disable", "none_answer": 204},
    }
    for version, values in expected.items():
        at = f.djl_behaviour_at(version)
        assert {k: at[k] for k in values} == values, version
    assert f.djl_behaviour_at("0.29.0")["routing"] == "every-rank"
    assert f.djl_behaviour_at("0.30.0")["routing"] == "rank-0"
    # What the stand-in package ships is exactly that table, for the package's version.
    deb = prepare.standin_deb("0.32.0", tmp_path)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path / "x")], check=True)
    shipped = json.loads((tmp_path / "x/usr/lib/djl-serving-standin/djl-facts.json").read_text())
    assert shipped == {"version": "0.32.0", "behaviour": f.djl_behaviour_at("0.32.0")}


# --- one rank, in-process ------------------------------------------------------------------------------


def test_one_rank_answers_as_plain_transformers_does(tiny) -> None:
    service = handler.start({"model_id": tiny["dir"], "tensor_parallel_degree": "1", "max_new_tokens": "64"})
    assert not service.injected  # CPU: AutoTP, never kernel injection
    one = {"max_new_tokens": TOKENS}
    answers = service.answer([
        json_request({"inputs": PROMPTS[0], "parameters": one}),
        json_request({"inputs": PROMPTS[1:], "parameters": one}),  # a list in, a list out
        json_request({"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 4}}),  # other parameters: a group
        json_request({"inputs": 3}),
        Request(b"\xff", "text/plain"),
    ])
    assert answers[0] == {"generated_text": tiny["reference"][0]}
    assert answers[1] == [{"generated_text": t} for t in tiny["reference"][1:]]
    assert tiny["reference"][0].startswith(answers[2]["generated_text"])
    assert isinstance(answers[3], RequestError) and isinstance(answers[4], RequestError)
    full = service.answer([json_request({"inputs": PROMPTS[0], "parameters": {**one, "return_full_text": True}})])
    assert full == [{"generated_text": PROMPTS[0] + tiny["reference"][0]}]


def test_one_rank_without_kernel_injection_never_imports_deepspeed(tiny) -> None:
    """One rank and no kernel injection: DeepSpeed's init_inference would only cast the model to its dtype and
    move it to the device, so the handler does that itself and does not import DeepSpeed (seconds of every
    cold start). Run flat, as the image runs it, in a fresh interpreter; the answer is plain Transformers'."""
    code = textwrap.dedent(f"""
        import json, sys
        import lmi_deepspeed
        service = lmi_deepspeed.start({{"model_id": {tiny["dir"]!r}, "tensor_parallel_degree": "1"}})
        body = json.dumps({{"inputs": {PROMPTS[0]!r}, "parameters": {{"max_new_tokens": {TOKENS}}}}}).encode()
        answer = service.answer([lmi_deepspeed.Request(body, "application/json")])[0]
        print(json.dumps({{"deepspeed": sorted(m for m in sys.modules if m.split(".")[0] == "deepspeed"),
                          "module": type(service.engine.module).__name__, "answer": answer}}))
    """)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(handler.__file__))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1]) == {
        "deepspeed": [], "module": "LlamaForCausalLM", "answer": {"generated_text": tiny["reference"][0]}}


# --- ranks under mpirun, behind the DJL Serving stand-in -----------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(port: int, body, content_type: str = "application/json", query: str = "") -> tuple[int, object]:
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations{query}", data=data, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Standin:
    """The DJL Serving stand-in of one DJL version on a loopback port of its own, serving a model directory."""

    def __init__(self, model_dir: str, properties: str, tmp_path: Path, version: str = "0.32.0", **env) -> None:
        self.dir = tmp_path / "model"
        shutil.copytree(model_dir, self.dir)
        (self.dir / "serving.properties").write_text(textwrap.dedent(properties))
        facts_file = tmp_path / "djl-facts.json"
        facts_file.write_text(json.dumps(prepare.standin_facts(version)))
        self.port = _free_port()
        env = {**os.environ, "SM_MODEL_DIR": str(self.dir), "DJL_STANDIN_LIB": str(STANDIN_LIB),
               "DJL_STANDIN_FACTS": str(facts_file), "DJL_STANDIN_PORT": str(self.port),
               "PYTHONPATH": str(IMAGE_CODE), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               "OMP_NUM_THREADS": "1", **env}
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

    def failed_load(self) -> str:
        """The stand-in's log after a load it must refuse (it exits 1)."""
        assert not self.wait_ready(timeout=300)
        assert self.proc.wait(60) == 1
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)


def _need_mpirun() -> None:
    if not shutil.which("mpirun"):
        pytest.skip("mpirun is missing: `make test` installs Debian's openmpi-bin (make mpi)")
    pytest.importorskip("mpi4py")


@pytest.fixture
def mpirun():
    _need_mpirun()


# DJL 0.36's passive workers (the stand-in's behaviour is 0.32's in every fact of buildkit/data/djl.yaml: all
# are the same from 0.31 on) with dynamic batching, up to 4 requests within 1.5 s: one server for the routing
# test below and test_hostile's mixed batch, whose requests are all it differs in.
PASSIVE_RANKS = """
    engine=Python
    option.mpi_mode=true
    option.entryPoint=lmi_deepspeed
    option.tensor_parallel_degree=2
    option.max_new_tokens=64
    batch_size=4
    max_batch_delay=1500
    """


def passive_ranks(shared, tiny, tmp_path_factory) -> Standin:
    """The DJL stand-in's two passive ranks on pretended GPUs (gloo ranks), started once a session and kept for
    every module that asks (the tests never stop it: a later request is the proof the ranks stayed in step)."""
    _need_mpirun()
    return shared.server("passive-ranks", lambda: Standin(tiny["dir"], PASSIVE_RANKS, tmp_path_factory.mktemp(
        "passive"), version="0.36.0", DJL_STANDIN_GPUS="2"))


@pytest.fixture(scope="module")
def two_ranks(shared, tiny, tmp_path_factory):
    """The two-rank stand-ins of the routing tests below, the shared passive ranks (DJL 0.36) and DJL 0.27
    (every rank), started together: most of a load is start-up (mpirun, imports, the ranks' rendezvous), so the
    two take little longer than one. The every-rank test stops its own; the passive ranks stay for the
    session."""
    _need_mpirun()
    servers = {
        "passive": passive_ranks(shared, tiny, tmp_path_factory),
        "every-rank": Standin(tiny["dir"], """
            engine=MPI
            option.entryPoint=lmi_deepspeed
            option.tensor_parallel_degree=2
            option.max_new_tokens=64
            """, tmp_path_factory.mktemp("every-rank"), version="0.27.0", DJL_STANDIN_GPUS="2"),
    }
    yield servers
    servers["every-rank"].stop()


def test_two_passive_ranks_answer_batches_as_transformers_does(tiny, two_ranks) -> None:
    """DJL 0.36 (passive workers: only rank 0 gets requests) with MPI mode on pretended GPUs (gloo ranks):
    rank 0 broadcasts each batch, both ranks generate, and each request of a batch gets its own answer. The
    ranks are shared with test_hostile, which goes on asking them: not stopped here."""
    server = two_ranks["passive"]
    assert server.wait_ready(), server.log.read_text()[-3000:]
    params = {"max_new_tokens": TOKENS}
    status, answer = _post(server.port, {"inputs": PROMPTS[0], "parameters": params})
    assert (status, answer) == (200, {"generated_text": tiny["reference"][0]})
    status, answer = _post(server.port, {"inputs": PROMPTS, "parameters": params})
    assert (status, answer) == (200, [{"generated_text": t} for t in tiny["reference"]])
    # Two requests in one batch, one with a query string (a content entry of its own in DJL's Input) and one
    # a text/plain prompt: each gets its own continuation.
    results: dict = {}
    calls = [threading.Thread(target=lambda: results.update(a=_post(server.port, {"inputs": PROMPTS[1],
                                                                                 "parameters": params},
                                                                    query="?foo=bar"))),
             threading.Thread(target=lambda: results.update(b=_post(server.port, PROMPTS[2].encode(),
                                                                    "text/plain")))]
    for call in calls:
        call.start()
        time.sleep(0.2)
    for call in calls:
        call.join(300)
    assert results["a"] == (200, {"generated_text": tiny["reference"][1]})
    text_default = lmi_check.reference_generate(tiny["dir"], [PROMPTS[2]], 32)[0]  # no parameters: 32 tokens
    assert results["b"] == (200, {"generated_text": text_default})
    status, answer = _post(server.port, {"inputs": "x", "parameters": {"max_tokens": 3}})
    assert status == 400 and "unknown parameter(s) max_tokens" in answer["error"]
    status, answer = _post(server.port, b"not json")
    assert status == 400 and "the body is not JSON" in answer["error"]
    # The server still answers after bad requests: the ranks stayed in step.
    status, answer = _post(server.port, {"inputs": PROMPTS[2], "parameters": params})
    assert (status, answer) == (200, {"generated_text": tiny["reference"][2]})
    log = server.log.read_text()
    assert "starting 2 rank(s) (passive workers): mpirun -np 2" in log and "model loaded on 2 rank(s)" in log
    assert log.count("AutoTP") >= 2  # each rank partitioned its copy
    assert "a batch of 2 requests" in log  # the two were one batch
    assert "batch_size" not in log or "Batch output size mismatch" not in log


def test_every_rank_routing_returns_the_last_ranks_answer_which_is_right_too(tiny, two_ranks) -> None:
    """DJL 0.27 sends each request to every rank and returns the last rank's answer."""
    server = two_ranks["every-rank"]
    try:
        assert server.wait_ready(), server.log.read_text()[-3000:]
        for prompt, reference in zip(PROMPTS[:2], tiny["reference"][:2], strict=True):
            status, answer = _post(server.port, {"inputs": prompt, "parameters": {"max_new_tokens": TOKENS}})
            assert (status, answer) == (200, {"generated_text": reference})
        assert "starting 2 rank(s): mpirun -np 2" in server.log.read_text()
    finally:
        server.stop()


def test_without_a_gpu_djl_runs_one_process_and_it_answers(tiny, tmp_path) -> None:
    """What a CPU image does under real DJL: no MPI mode, one rank; DJL 0.32 sets no rolling batch."""
    server = Standin(tiny["dir"], "option.entryPoint=lmi_deepspeed\noption.max_new_tokens=64\n", tmp_path,
                     DJL_STANDIN_GPUS="0")
    try:
        assert server.wait_ready(), server.log.read_text()[-3000:]
        status, answer = _post(server.port, {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": TOKENS}})
        assert (status, answer) == (200, {"generated_text": tiny["reference"][0]})
        assert "starting 1 rank(s): " in server.log.read_text()
    finally:
        server.stop()


@pytest.mark.parametrize("case", ["mpi-without-gpu", "0.27-without-engine", "wrong-option"])
def test_a_load_djl_would_refuse_or_route_wrongly_fails_with_one_line(tiny, tmp_path, case) -> None:
    properties, version, line = {
        "mpi-without-gpu": ("option.entryPoint=lmi_deepspeed\noption.mpi_mode=true\noption.tensor_parallel_degree=2\n",
                            "0.32.0",
                            "model load failed: GPU devices are not enough to run 2 partitions.\n"),
        "0.27-without-engine": ("option.entryPoint=lmi_deepspeed\n", "0.27.0",
                                "model load failed: Failed to initialize model: lmi_deepspeed: "
                                "option.rolling_batch=auto: DJL would stream tokens"),
        "wrong-option": ("engine=Python\noption.entryPoint=lmi_deepspeed\noption.dtype=int3\n", "0.36.0",
                         "model load failed: Failed to initialize model: lmi_deepspeed: option.dtype='int3': use "
                         "one of fp16, bf16, fp32\n"),
    }[case]
    server = Standin(tiny["dir"], properties, tmp_path, version=version, DJL_STANDIN_GPUS="0")
    try:
        log = server.failed_load()
        assert line in log, log[-3000:]
        assert "Traceback" not in log
    finally:
        server.stop()


def test_each_family_is_partitioned_over_two_ranks_and_answers_as_transformers_does(mpirun, tmp_path) -> None:
    """GPT-2 (which AutoTP declines: the handler's tensor-slicing policy), GPT-NeoX, OPT and BLOOM (ALiBi),
    each over two ranks in one mpirun job (Llama: the tests above): every rank holds part of the weights and
    answers what plain Transformers answers."""
    pytest.importorskip("deepspeed")
    import torch
    from transformers import AutoModelForCausalLM

    models = {f: make_family_model(str(tmp_path / f), f) for f in FAMILIES}
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(IMAGE_CODE)!r})
        import lmi_deepspeed
        out = {{}}
        for family, path in {models!r}.items():
            service = lmi_deepspeed.start({{"model_id": path, "tensor_parallel_degree": "2"}})
            bodies = [json.dumps({{"inputs": p, "parameters": {{"max_new_tokens": 8}}}}) for p in {PROMPTS[:2]!r}]
            answers = service.answer([lmi_deepspeed.Request(b.encode(), "application/json") for b in bodies])
            out[family] = {{"params": sum(p.numel() for p in service.engine.module.parameters()),
                           "answers": [a["generated_text"] for a in answers]}}
        with open(os.path.join({str(tmp_path)!r}, "rank" + os.environ["RANK"] + ".json"), "w") as fh:
            json.dump(out, fh)
    """))
    log = tmp_path / "ranks.log"
    with log.open("wb") as sink:
        ranks_job = subprocess.Popen(["mpirun", "-np", "2", "--allow-run-as-root", "--oversubscribe", "--bind-to",
                                      "none", sys.executable, str(script)], stdout=sink, stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:  # plain Transformers' answers and sizes, while the ranks start
        reference = {f: lmi_check.reference_generate(d, PROMPTS[:2], 8) for f, d in models.items()}
        full = {f: sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).parameters())
                for f, d in models.items()}
        ranks_job.wait(timeout=900)
    finally:
        if ranks_job.poll() is None:
            ranks_job.kill()
            ranks_job.wait()
    assert all(len(set(r)) == 2 for r in reference.values()), reference  # not degenerate
    assert ranks_job.returncode == 0, log.read_text(errors="replace")[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]  # one file a rank
    for family in models:
        for rank in ranks:
            assert rank[family]["answers"] == reference[family], family
            assert rank[family]["params"] < 0.9 * full[family], (family, rank[family]["params"], full[family])


# --- through the local image's own entrypoint (engine tests: they build the local image) --------------------


# ~2.5 min on 2 cores: `make test-e2e` (bench/results.md). make test keeps the same routing through the stand-in
# (test_two_passive_ranks_answer_batches_as_transformers_does) and one process in the image (test_smoke).
@pytest.mark.engine
@pytest.mark.e2e
def test_the_image_serves_passive_ranks_and_one_process_without_a_gpu(local_image, tiny, tmp_path) -> None:
    """The local image (DJL 0.32 stand-in, CPU) started as SageMaker does (`serve`): without a GPU the
    entrypoint leaves MPI mode off and one process answers; with GPUs pretended to the stand-in (test-only)
    and option.mpi_mode=true, two passive ranks answer a batch as plain Transformers does."""
    repo = local_image["repo"]
    model = tmp_path / "model"
    shutil.copytree(tiny["dir"], model)
    model.chmod(0o755)
    for path in model.iterdir():  # the image runs as uid 1001; save_pretrained writes some files 0600
        path.chmod(0o644)
    params = {"max_new_tokens": TOKENS}
    for name, properties, env in (
            ("one", "engine=Python\noption.max_new_tokens=64\n", []),
            ("two", "engine=Python\noption.mpi_mode=true\noption.tensor_parallel_degree=2\nbatch_size=2\n"
                    "max_batch_delay=1000\n", ["-e", "DJL_STANDIN_GPUS=2"])):
        (model / "serving.properties").write_text(properties)
        run = docker("run", "-d", "--network", "none", "-e", "OMP_NUM_THREADS=1", *env, "-v",
                     f"{model}:/opt/ml/model:ro", f"{repo}:djl0.32-cpu", "serve")
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
            assert ping.stdout.strip() == "200", logs.stdout[-2000:] + logs.stderr[-2000:]
            curl = ["curl", "-sS", "-X", "POST", "-H", "Content-Type: application/json", "-d"]
            requests = [(PROMPTS[0], ""), (PROMPTS[1], "?foo=bar")] if name == "two" else [(PROMPTS[0], "")]
            procs = [subprocess.Popen([engine.detect_client().path, "exec", container, *curl,
                                       json.dumps({"inputs": prompt, "parameters": params}),
                                       f"http://127.0.0.1:8080/invocations{query}"], stdout=subprocess.PIPE)
                     for prompt, query in requests]
            answers = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
            assert answers == [{"generated_text": t} for t in tiny["reference"][:len(requests)]], name
            # A hostile request through the entrypoint: a body nested 988 deep (a RecursionError on one rank
            # once put the ranks out of step) behind a ?data= query; then a good one answers at once.
            hostile = docker("exec", container, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X",
                             "POST", "-H", "Content-Type: application/json", "-d", "[" * 988 + "]" * 988,
                             "http://127.0.0.1:8080/invocations?data=x")
            assert hostile.stdout.strip() == "400", (hostile.stdout, hostile.stderr)
            again = docker("exec", container, *curl, json.dumps({"inputs": PROMPTS[0], "parameters": params}),
                           "--max-time", "60", "http://127.0.0.1:8080/invocations")
            assert json.loads(again.stdout) == {"generated_text": tiny["reference"][0]}, name
            logs = docker("logs", container).stderr
            started = "starting 2 rank(s) (passive workers): mpirun -np 2" if name == "two" else "starting 1 rank(s): "
            assert started in logs, logs[-2000:]
        finally:
            docker("rm", "-f", container)
