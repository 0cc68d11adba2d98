"""Requests meant to take the server down, through the toolkit's handler with real Transformers, DeepSpeed and
Diffusers on CPU: in-process (one rank) and behind the DJL Serving stand-in with two mpirun ranks, a DJL batch
mixing good and hostile requests. Every hostile request is refused on its own (400 with one line, before any
work), the good ones answer what plain Transformers answers, and the next request answers promptly: rank 0
decides for every rank, bounds come from the model, and no code from the model directory runs."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request

import lmi_check
import lmi_deepspeed as handler
import pytest
from lmi_deepspeed import OptionError, Request, RequestError
from test_handler import PROMPTS, STANDIN_LIB, TOKENS, Standin, _need_mpirun, _post

pytestmark = pytest.mark.required_in_ci

DEEP = ("[" * 988 + "]" * 988).encode()  # the depth that made the two ranks disagree
DEEP_BODY = b'{"inputs": "x", "parameters": {"a": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001 + b"}"


def body(inputs, **params) -> Request:
    return Request(json.dumps({"inputs": inputs, "parameters": params}).encode(), "application/json")


# --- the glue: parsing, batches, bodies, the model directory (no model) ------------------------------------


@pytest.mark.parametrize("data", [DEEP, DEEP_BODY, b"[" * 200000])
def test_a_deep_body_is_a_400_on_any_thread_whatever_its_stack(data) -> None:
    """The nesting is counted before json.loads runs, so a thread with a small stack (a follower's, DJL's)
    decides exactly as the main thread: no RecursionError anywhere."""
    results = []

    def parse():
        try:
            handler.loads_bounded(data, 16, 1 << 20)
        except RequestError as exc:
            results.append((exc.code, str(exc)))
        except BaseException as exc:  # noqa: BLE001 - what must not happen
            results.append(("escaped", repr(exc)[:200]))

    parse()
    threading.stack_size(64 * 1024)
    try:
        thread = threading.Thread(target=parse)
        thread.start()
        thread.join(30)
    finally:
        threading.stack_size(0)
    assert results == [(400, "the body is nested deeper than option.max_body_depth=16")] * 2


def test_json_bounds_keep_valid_bodies_and_refuse_the_rest() -> None:
    assert handler.loads_bounded(b'{"inputs": "a [ { \\" ]", "parameters": {}}', 2, 100) == {
        "inputs": 'a [ { " ]', "parameters": {}}
    for data, code, message in ((b'"x"' * 50, 413, "over option.max_body_bytes=100"),
                                (b'{"inputs": "\\ud800"}', 400, "lone UTF-16 surrogate"),
                                (b"\xff", 400, "not UTF-8"), (b"{", 400, "not JSON"),
                                (b'{"a": ' + b"9" * 5000 + b"}", 400, "not JSON")):
        with pytest.raises(RequestError) as err:
            handler.loads_bounded(data, 16, 100 if code == 413 else 1 << 20)
        assert err.value.code == code and message in str(err.value)


def _input(properties, content):
    sys.path.insert(0, str(STANDIN_LIB))
    try:
        from djl_python.inputs import Input
    finally:
        sys.path.remove(str(STANDIN_LIB))
    return Input(properties, content)


def test_only_djls_batch_is_a_batch_and_the_body_is_the_http_body(monkeypatch) -> None:
    """DJL (RequestParser.parseRequest) adds query parameters first and the body last as "data", and makes
    headers properties: a `?data=` must not replace the body, a `batch_size` header must not make a batch."""
    monkeypatch.setattr(handler, "_max_batch_size", 4)
    single = _input({"batch_size": "9999999", "Content-Type": "text/plain"}, [("data", b"query"), ("data", b"body")])
    assert handler._batch_size(single) == 0
    assert handler._decode(single) == [Request(b"body", "text/plain", "")]
    batch = _input({"batch_size": "2", "batch_000.content-type": "text/plain"},
                   [("batch_000.data", b"q"), ("batch_000.data", b"a"), ("batch_001.data", b"b")])
    assert handler._batch_size(batch) == 2
    assert [r.body for r in handler._decode(batch)] == [b"a", b"b"]
    with pytest.raises(RequestError, match="over option.max_batch_size=4"):
        handler._decode(_input({"batch_size": "5"}, [("batch_004.data", b"x")]))
    assert handler._batch_size(_input({"batch_size": "2"}, [("batch_007.data", b"x")])) == 0  # not DJL's shape


def test_model_code_that_would_run_in_the_server_is_refused(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "modeling_custom.py").write_text("raise SystemExit('never imported')\n")  # remote code: inert
    (tmp_path / "scripts").mkdir()  # a plain directory is no module
    assert handler.model_code(str(tmp_path)) == []
    for name in ("deepspeed.py", "model.py", "json.py", "safetensors/__init__.py", "torch.cpython-311.so"):
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_text("")
    assert handler.model_code(str(tmp_path)) == ["deepspeed.py", "json.py", "model.py", "safetensors",
                                                 "torch.cpython-311.so"]
    with pytest.raises(OptionError, match="option.allow_model_code=true"):
        handler.check_model_dir({"model_id": str(tmp_path)})
    handler.check_model_dir({"model_id": str(tmp_path), "allow_model_code": "true"})


@pytest.mark.parametrize("index,extra,message", [
    ({"_class_name": ["my_pipeline", "MyPipeline"]}, None, "not one of Diffusers' own pipeline classes"),
    ({"_class_name": "MyPipeline"}, None, "not one of Diffusers' own pipeline classes"),
    ({"_class_name": "StableDiffusionPipeline", "unet": ["my_unet", "MyUNet"]}, None, "component 'unet'"),
    ({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "NoSuchUNet"]}, None, "component 'unet'"),
    ({"_class_name": "StableDiffusionPipeline"}, "unet/my_unet.py", "holds code (unet/my_unet.py)"),
])
def test_a_pipeline_that_would_run_its_own_code_is_refused_before_diffusers_reads_it(tmp_path, index, extra,
                                                                                     message) -> None:
    pytest.importorskip("diffusers")
    import lmi_diffusion

    (tmp_path / "model_index.json").write_text(json.dumps(index))
    if extra:
        (tmp_path / extra).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / extra).write_text("import os\n")
    with pytest.raises(OptionError, match="option.model_id") as err:
        lmi_diffusion.parse_options({"model_id": str(tmp_path)}, cuda=False)
    assert message in str(err.value)


@pytest.mark.parametrize("accept,as_json", [
    ("", False), ("*/*", False), ("application/json", True), ("image/png;q=0.5, application/json", True),
    ("application/json;q=0.2, image/*", False), ("*/*;q=0.1, application/json;q=0.9", True),
    ("image/png;q=0, */*", True), ("application/*", True), ("image/png, application/json", False),
])
def test_accept_is_read_as_rfc_9110_says(accept, as_json) -> None:
    pytest.importorskip("diffusers")
    import lmi_diffusion

    assert lmi_diffusion.wants_json(accept) is as_json


@pytest.mark.parametrize("accept", ["image/jpeg", "image/png;q=0, application/json;q=0", "*/*;q=0"])
def test_an_accept_excluding_both_answers_is_a_406(accept) -> None:
    pytest.importorskip("diffusers")
    import lmi_diffusion

    with pytest.raises(RequestError) as err:
        lmi_diffusion.wants_json(accept)
    assert err.value.code == 406


# --- one rank in-process, the tiny Llama (128 positions) ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny(shared, tmp_path_factory):
    """lmi_check's tiny Llama and plain Transformers' answers to PROMPTS (test_handler's, made once a session by
    whichever module asks first: the same seed makes the same model), served in-process too."""
    pytest.importorskip("deepspeed")

    def make() -> dict:
        path = str(tmp_path_factory.mktemp("tiny") / "model")
        lmi_check.make_tiny_model(path)
        return {"dir": path, "reference": lmi_check.reference_generate(path, PROMPTS, TOKENS)}

    model = shared.get("tiny-llama", make)
    service = handler.start({"model_id": model["dir"], "tensor_parallel_degree": "1", "max_new_tokens": "64"})
    return {**model, "service": service}


HOSTILE = {  # request -> the one line that refuses it
    "1M characters": (body("a" * 1_000_000), "over option.max_body_bytes"),
    "over the positions": (body("a" * 100, max_new_tokens=64), "over the model's 128 positions"),
    "over max_prompt_chars": (Request(("a" * 5000).encode(), "text/plain"), "over option.max_prompt_chars=4096"),
    "too many prompts": (body(["a"] * 17), "17 prompts, over option.max_prompts=16"),
    "a seed of 2**64": (body("a", do_sample=True, seed=2**64), "seed must be a whole number from 0 to"),
    "a lone surrogate": (Request(b'{"inputs": "a\\udc00"}', "application/json"), "lone UTF-16 surrogate"),
    "deep": (Request(DEEP_BODY, "application/json"), "nested deeper than option.max_body_depth=16"),
    "a form body": (Request(b"inputs=x", "application/x-www-form-urlencoded"), "cannot read Content-Type"),
}


def test_each_hostile_request_is_refused_alone_before_any_work(tiny, monkeypatch) -> None:
    service = tiny["service"]
    assert (service.limits.positions, service.limits.max_prompt_chars) == (128, 4096)
    good = body(PROMPTS[0], max_new_tokens=TOKENS)
    generated = []
    real = service.generate
    monkeypatch.setattr(service, "generate", lambda ids, params: generated.append(len(ids)) or real(ids, params))
    start = time.monotonic()
    answers = service.answer([good, *(r for r, _ in HOSTILE.values()), good])
    took = time.monotonic() - start
    assert answers[0] == answers[-1] == {"generated_text": tiny["reference"][0]}
    for (name, (_, message)), answer in zip(HOSTILE.items(), answers[1:-1], strict=True):
        assert isinstance(answer, RequestError) and answer.code in (400, 413, 415), name
        assert message in str(answer) and "\n" not in str(answer), (name, str(answer))
    assert generated == [2]  # one generate call, the two good requests only
    assert took < 30, took


def test_integer_sampling_parameters_answer_and_seeded_sampling_does_not_depend_on_the_batch(tiny) -> None:
    service = tiny["service"]
    sampled = body(PROMPTS[1], max_new_tokens=TOKENS, do_sample=True, temperature=1, repetition_penalty=1,
                   top_k=5, seed=11)
    (alone,) = service.answer([sampled])
    together = service.answer([body(PROMPTS[0], max_new_tokens=TOKENS, do_sample=True, temperature=1, top_k=5,
                                    seed=11), sampled, sampled])
    assert "generated_text" in alone and together[1] == together[2] == alone


def test_a_model_failure_is_a_424_for_its_own_requests_only(tiny, monkeypatch) -> None:
    service = tiny["service"]
    real = service.generate

    def generate(ids, params):
        if params["max_new_tokens"] == 5:
            raise RuntimeError("CUDA error: an illegal memory access\nsecond line")
        return real(ids, params)

    monkeypatch.setattr(service, "generate", generate)
    failing, good = service.answer([body("x", max_new_tokens=5), body(PROMPTS[0], max_new_tokens=TOKENS)])
    assert isinstance(failing, RequestError) and failing.code == 424
    assert str(failing) == "the model failed: RuntimeError: CUDA error: an illegal memory access"
    assert good == {"generated_text": tiny["reference"][0]}


def test_a_batch_over_the_token_budget_is_split_not_refused(tiny, monkeypatch) -> None:
    service = tiny["service"]
    monkeypatch.setattr(service, "limits", handler.Limits(**{**service.limits.__dict__, "max_batch_tokens": 75}))
    calls = []
    real = service.generate
    monkeypatch.setattr(service, "generate", lambda ids, params: calls.append(len(ids)) or real(ids, params))
    answers = service.answer([body(p, max_new_tokens=TOKENS) for p in PROMPTS])
    assert answers == [{"generated_text": t} for t in tiny["reference"]]
    assert calls == [2, 1]  # 2 x (23 + 12) tokens fit in 75, three do not


# --- two ranks under mpirun, behind the DJL Serving stand-in ------------------------------------------------


@pytest.fixture(scope="module")
def passive(shared, tiny, tmp_path_factory):
    """test_handler's two passive ranks (DJL 0.36, batch_size 4), started once a session: the routing test
    there asks them first when the whole suite runs."""
    from test_handler import passive_ranks

    _need_mpirun()
    return passive_ranks(shared, tiny, tmp_path_factory)


def test_two_ranks_answer_a_batch_mixing_good_and_hostile_requests_and_stay_in_step(tiny, passive) -> None:
    """DJL 0.36 routing (passive workers), batch_size 4: the good requests of a batch answer the reference,
    each hostile one its own {"error", "code": 400} (DJL gives every request of a batch the batch's HTTP
    status: PyPredictor.batchPredict), and the next request answers at once: the ranks stayed in step."""
    server = passive
    assert server.wait_ready(), server.log.read_text()[-3000:]
    params = {"max_new_tokens": TOKENS}
    sent = [({"inputs": PROMPTS[0], "parameters": params}, ""),
            (DEEP, ""),
            ({"inputs": "a" * 100, "parameters": {"max_new_tokens": 64}}, ""),
            ({"inputs": PROMPTS[1], "parameters": params}, "?data=%7B%22inputs%22%3A%22q%22%7D")]
    results: dict = {}
    calls = [threading.Thread(target=lambda i=i, b=b, q=q: results.update({i: _post(server.port, b, query=q)}))
             for i, (b, q) in enumerate(sent)]
    for call in calls:
        call.start()
        time.sleep(0.1)
    for call in calls:
        call.join(300)
    assert results[0] == (200, {"generated_text": tiny["reference"][0]})
    assert results[3] == (200, {"generated_text": tiny["reference"][1]})  # the body, not ?data=
    assert results[1][1] == {"error": "the body is nested deeper than option.max_body_depth=16", "code": 400}
    assert results[2][1]["code"] == 400 and "over the model's 128 positions" in results[2][1]["error"]
    log = server.log.read_text()
    assert "a batch of 4 requests" in log, log[-3000:]
    assert "batch_size" not in log or "Batch output size mismatch" not in log
    assert "RecursionError" not in log and "Traceback" not in log, log[-3000:]
    start = time.monotonic()
    status, answer = _post(server.port, {"inputs": PROMPTS[2], "parameters": params})
    assert (status, answer) == (200, {"generated_text": tiny["reference"][2]})
    assert time.monotonic() - start < 20
    # Alone, a hostile request is its own HTTP 400; a 1M-character one is refused without work.
    start = time.monotonic()
    status, answer = _post(server.port, {"inputs": "a" * 1_000_000})
    assert status == 413 and "over option.max_body_bytes" in answer["error"]
    status, answer = _post(server.port, DEEP)
    assert status == 400 and "nested deeper" in answer["error"]
    assert time.monotonic() - start < 20
    # A batch_size header (a property, as DJL makes headers; here through SageMaker's custom attributes
    # too) does not make a single request a batch of millions.
    for header in ({"batch_size": "5000000"}, {"X-Amzn-SageMaker-Custom-Attributes": "batch_size=5000000"}):
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/invocations", method="POST",
            data=json.dumps({"inputs": PROMPTS[2], "parameters": params}).encode(),
            headers={"Content-Type": "application/json", **header})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert json.loads(response.read()) == {"generated_text": tiny["reference"][2]}


@pytest.mark.parametrize("version", ["0.27.0", "0.36.0"])
def test_a_model_directory_with_code_fails_the_load_in_one_line(tiny, tmp_path, version) -> None:
    """A transformers.py in the model directory would run instead of Transformers (DJL puts the directory on
    PYTHONPATH): refused before the handler imports it. model.py is refused too, but DJL 0.29+ imports it at
    the worker's start, before the handler's first call: there the handler can refuse to serve, not stop
    it running (docs/handler.md)."""
    import shutil

    model = tmp_path / "src"
    shutil.copytree(tiny["dir"], model)
    (model / "transformers.py").write_text("raise SystemExit('shadowed')\n")
    marker = tmp_path / "model-py-ran"
    (model / "model.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    server = Standin(str(model), "engine=Python\noption.entryPoint=lmi_deepspeed\n", tmp_path, version=version,
                     DJL_STANDIN_GPUS="0")
    try:
        log = server.failed_load()
        assert "Failed to initialize model: lmi_deepspeed: the model directory holds Python that would run in " \
               "the server" in log and "model.py" in log and "transformers.py" in log, log[-3000:]
        assert "shadowed" not in log
        assert marker.exists() is (version == "0.36.0")
    finally:
        server.stop()
