"""Token streaming (lmi_stream.py, option.enable_streaming) with real Transformers and DeepSpeed on CPU:
the options as LMI took them, the incremental decoder against a real byte-level BPE tokenizer (multi-byte
characters), one process in-process (the DeepSpeed and Accelerate ways, a byte-level BPE model, a stream closed
early), and the DJL Serving stand-in streaming as DJL does (buildkit/data/djl.yaml, behaviour stream_*): one
process, two passive ranks (0.32) and every-rank routing (0.27) under mpirun; the chunks are read off the
socket as they arrive. Every streamed answer, joined, must equal the non-streamed greedy answer."""

from __future__ import annotations

import json
import random
import socket
import threading
import time

import lmi_check
import lmi_deepspeed as handler
import lmi_stream
import pytest
from conftest import ROOT
from lmi_deepspeed import OptionError, Request

pytestmark = pytest.mark.required_in_ci  # mpirun, DeepSpeed: the project's to provide (tests/conftest.py)

PROMPTS = ["hello world", "the cat sat on the mat"]
TOKENS = 40
STANDIN_LIB = ROOT / "tests" / "local" / "standin"
MULTIBYTE = "naïve café, 日本語のテキスト, emoji 🙂👍 and ünïcödé. " * 3


def body(inputs, **params) -> Request:
    return Request(json.dumps({"inputs": inputs, "parameters": params}).encode(), "application/json")


def lines_of(stream) -> list[dict]:
    return [json.loads(line) for line in stream]


def joined(lines: list[dict]) -> list[str]:
    """Each prompt's text: the lines' outputs joined."""
    return ["".join(parts) for parts in zip(*(line["outputs"] for line in lines), strict=True)]


# --- options (no model) ----------------------------------------------------------------------------------


def test_enable_streaming_takes_lmis_values() -> None:
    assert lmi_stream.parse_streaming({}) is False
    assert lmi_stream.parse_streaming({"enable_streaming": "false"}) is False
    assert lmi_stream.parse_streaming({"enable_streaming": "TRUE"}) is True
    assert lmi_stream.parse_streaming({"enable_streaming": "true"}, "lmi_accelerate") is True


@pytest.mark.parametrize("props,way,message", [
    ({"enable_streaming": "huggingface"}, "deepspeed",
     "option.enable_streaming=huggingface: LMI's per-token streamer splits multi-byte characters; use "
     "option.enable_streaming=true"),
    ({"enable_streaming": "yes"}, "deepspeed", "option.enable_streaming='yes': use true or false"),
    ({"enable_streaming": "true", "batch_size": "4"}, "deepspeed",
     "option.enable_streaming=true streams one request at a time, but batch_size=4; remove batch_size"),
    ({"enable_streaming": "true"}, "lmi_diffusion", "a diffusion pipeline answers one image, not tokens"),
])
def test_a_bad_streaming_option_is_one_line(props, way, message) -> None:
    with pytest.raises(OptionError) as err:
        lmi_stream.parse_streaming(props, way)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_bad_streaming_option_fails_the_load_before_anything_loads(tmp_path, monkeypatch) -> None:
    """Through DJL's entry point: the load answers the one line DJL reports ("Failed to initialize model: ...")."""
    monkeypatch.syspath_prepend(str(STANDIN_LIB))
    from djl_python.inputs import Input

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(handler, "_ranks", None)
    monkeypatch.setattr(handler, "_load_error", None)
    out = handler.handle(Input({"model_id": str(tmp_path), "enable_streaming": "huggingface"}))
    assert out.code == 500 and out.message.startswith("lmi_deepspeed: option.enable_streaming=huggingface: ")
    assert "\n" not in out.message


# --- the incremental decoder against a real byte-level BPE ----------------------------------------------


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE (GPT-2's kind) trained here on text with multi-byte characters: tokens that hold part
    of a character, and tokens that merge several."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    core = ByteLevelBPETokenizer()
    core.train_from_iterator([MULTIBYTE, "hello world, the cat sat on the mat. " * 5], vocab_size=300, min_frequency=2,
                             special_tokens=["<pad>", "<s>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core._tokenizer, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", clean_up_tokenization_spaces=False)
    path = tmp_path_factory.mktemp("bpe")
    tokenizer.save_pretrained(path)
    return tokenizer


def _pieces(tokenizer, ids, step: int = 1, **kwargs) -> list[str]:
    decoder = lmi_stream.TextDecoder(tokenizer, **kwargs)
    pieces = [decoder.push(ids[i:i + step]) for i in range(0, len(ids), step)]
    return [*pieces, decoder.finish()]


def test_the_decoder_never_splits_a_character_nor_repeats_a_merged_token(bpe) -> None:
    ids = bpe(MULTIBYTE)["input_ids"]
    alone = [bpe.decode([i]) for i in ids]
    assert any("\ufffd" in text for text in alone)  # some tokens hold part of a character: the case at stake
    assert "".join(alone) != MULTIBYTE  # decoding token by token would break them
    pieces = _pieces(bpe, ids)
    assert "".join(pieces) == bpe.decode(ids) == MULTIBYTE
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > len(ids) // 3  # it streams, it does not wait for the end
    # Random token sequences (invalid UTF-8 included): the pieces always join to the whole decoding, and no
    # piece but the last ends with half a character.
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(3, len(bpe)) for _ in range(rng.randrange(1, 30))]
        pieces = _pieces(bpe, ids, step=rng.choice((1, 2)))
        assert "".join(pieces) == bpe.decode(ids, skip_special_tokens=True)
        assert not any(p.endswith("\ufffd") for p in pieces[:-1])


def test_the_decoder_holds_back_a_space_that_cleanup_may_remove(bpe) -> None:
    text = "hello world , the cat sat . on the mat !"
    ids = bpe(text)["input_ids"]
    for cleanup in (True, False):
        pieces = _pieces(bpe, ids, clean_up_tokenization_spaces=cleanup)
        assert "".join(pieces) == bpe.decode(ids, clean_up_tokenization_spaces=cleanup)
    assert bpe.decode(ids, clean_up_tokenization_spaces=True) != text  # cleanup did change it


# --- one process, in-process ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("deepspeed")
    path = str(tmp_path_factory.mktemp("tiny") / "model")
    lmi_check.make_tiny_model(path)
    return {"dir": path, "reference": lmi_check.reference_generate(path, PROMPTS, TOKENS)}


def _streaming(props: dict):
    service = handler.start(props)
    ranks = handler.Ranks(service, cuda=False)
    return lmi_stream.attach(ranks, props), service


@pytest.mark.parametrize("way", ["deepspeed", "accelerate"])
def test_one_process_streams_the_greedy_answer(tiny, way) -> None:
    streaming, _ = _streaming({"model_id": tiny["dir"], "max_new_tokens": "64", "enable_streaming": "true",
                               "partition": way})
    (stream,) = streaming.answer([body(PROMPTS[0], max_new_tokens=TOKENS)])
    lines = lines_of(stream)
    assert joined(lines) == [tiny["reference"][0]]
    assert len(lines) > TOKENS // 2 and all(len(line["outputs"]) == 1 for line in lines)
    assert lines[-1]["finish_reason"] == ["length"] and "finish_reason" not in lines[0]
    (stream,) = streaming.answer([body(PROMPTS, max_new_tokens=TOKENS)])  # a list: one text per prompt a line
    assert joined(lines_of(stream)) == tiny["reference"]
    (stream,) = streaming.answer([body(PROMPTS[1], max_new_tokens=TOKENS, return_full_text=True)])
    assert joined(lines_of(stream)) == [PROMPTS[1] + tiny["reference"][1]]
    (error,) = streaming.answer([body(3)])  # a bad request is refused as without streaming
    assert isinstance(error, handler.RequestError) and error.code == 400


def test_a_closed_stream_stops_generating(tiny) -> None:
    # 100 new tokens: the prompt and what it asks for fit the tiny model's 128 positions (a bound checked first)
    streaming, _ = _streaming({"model_id": tiny["dir"], "max_new_tokens": "100", "enable_streaming": "true"})
    (stream,) = streaming.answer([body(PROMPTS[0], max_new_tokens=100)])
    next(stream)
    stream.close()
    assert stream.finished.wait(120)
    assert stream.finish_reason == ["cancelled"] and stream.tokens < 100
    assert lines_of(stream)[-1]["finish_reason"] == ["cancelled"]


def test_a_byte_level_model_streams_whole_characters(bpe, tmp_path) -> None:
    """A tiny random Llama on the byte-level BPE above: its greedy tokens are arbitrary byte pieces, so the
    stream must hold back half characters; joined it is the non-streamed answer."""
    pytest.importorskip("deepspeed")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(bpe), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128,
                         pad_token_id=bpe.pad_token_id, bos_token_id=1, eos_token_id=bpe.eos_token_id)
    LlamaForCausalLM(config).eval().save_pretrained(tmp_path, safe_serialization=True)
    bpe.save_pretrained(tmp_path)
    streaming, service = _streaming({"model_id": str(tmp_path), "max_new_tokens": "64", "enable_streaming": "true"})
    prompts = ["日本語の", "café 🙂"]
    expected = [a["generated_text"] for a in service.answer([body(prompts, max_new_tokens=40)])[0]]
    (stream,) = streaming.answer([body(prompts, max_new_tokens=40)])
    lines = lines_of(stream)
    assert joined(lines) == expected
    # Random weights pick arbitrary byte pieces, so the answer may hold invalid UTF-8 (U+FFFD) of its own; a line
    # never ends with half a character that a later token completes.
    assert not any(text.endswith("\ufffd") for line in lines[:-1] for text in line["outputs"])
    assert any(ord(c) > 127 for text in expected for c in text)  # the model did produce multi-byte text


def test_a_dynamic_batch_is_refused_in_one_line(tiny, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(STANDIN_LIB))
    from djl_python.inputs import Input

    streaming, _ = _streaming({"model_id": tiny["dir"], "max_new_tokens": "64", "enable_streaming": "true"})
    batch = Input({"batch_size": "2"}, [("batch_000.data", b'{"inputs": "a"}'), ("batch_001.data", b'{"inputs": "b"}')])
    out = streaming.handle(batch, handler._decode(batch))
    error = json.loads(out.content.value_at(0))["error"]
    assert out.code == 400 and out.stream_content is None and "\n" not in error
    assert error == ("option.enable_streaming=true streams one request at a time, but DJL batched 2; remove "
                     "batch_size from serving.properties (or set it to 1)")


# --- behind the DJL Serving stand-in ---------------------------------------------------------------------


def test_the_stand_ins_djl_python_sends_stream_chunks_as_djl_python_does(monkeypatch) -> None:
    """djl.yaml stream_line and stream_wire: the default formatter's line, items as they come, an empty last
    chunk, or the exception's text as the last chunk."""
    monkeypatch.syspath_prepend(str(STANDIN_LIB))
    from djl_python.outputs import Output

    out = Output().add_stream_content(iter([["a"], ["b", "c"]]))
    assert list(out.stream_chunks()) == [(b'{"outputs": ["a"]}\n', True), (b'{"outputs": ["b", "c"]}\n', True),
                                         (b"", False)]

    def failing():
        yield "x"
        raise RuntimeError("out of memory")

    out = Output().add_stream_content(failing(), output_formatter=None)
    assert list(out.stream_chunks()) == [(b"x", True), (b"out of memory", False)]


def stream_post(port: int, payload, timeout: float = 300) -> tuple[int, dict, list[tuple[float, bytes]]]:
    """POST /invocations and read the answer off the socket: (status, headers, [(seconds since the request,
    chunk)]), each chunk timed when its last byte arrived (Transfer-Encoding: chunked parsed here)."""
    data = json.dumps(payload).encode()
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        f = sock.makefile("rb")
        status = int(f.readline().split()[1])
        headers = {}
        while (header := f.readline()) not in (b"\r\n", b""):
            key, value = header.decode().split(":", 1)
            headers[key.strip().lower()] = value.strip()
        chunks = []
        if headers.get("transfer-encoding") == "chunked":
            while size := int(f.readline().strip(), 16):
                chunk = f.read(size)
                assert f.readline() == b"\r\n"
                chunks.append((time.monotonic() - start, chunk))
        else:
            chunks.append((time.monotonic() - start, f.read(int(headers.get("content-length", 0)))))
    return status, headers, chunks


@pytest.fixture(scope="module")
def servers(tiny, tmp_path_factory):
    """Three stand-ins started together (most of a load is start-up): one process (DJL 0.36, no GPU), two
    passive ranks (0.32, dynamic batching on) and two ranks each asked (0.27)."""
    from test_handler import Standin, _need_mpirun

    _need_mpirun()
    common = "option.entryPoint=lmi_deepspeed\noption.max_new_tokens=64\noption.enable_streaming=true\n"
    started = {
        "one": Standin(tiny["dir"], "engine=Python\n" + common, tmp_path_factory.mktemp("one"), version="0.36.0",
                       DJL_STANDIN_GPUS="0"),
        "passive": Standin(tiny["dir"], "engine=Python\noption.mpi_mode=true\noption.tensor_parallel_degree=2\n"
                           "batch_size=2\nmax_batch_delay=1000\n" + common, tmp_path_factory.mktemp("passive"),
                           version="0.32.0", DJL_STANDIN_GPUS="2"),
        "every-rank": Standin(tiny["dir"], "engine=MPI\noption.tensor_parallel_degree=2\n" + common,
                              tmp_path_factory.mktemp("every"), version="0.27.0", DJL_STANDIN_GPUS="2"),
    }
    yield started
    for server in started.values():
        server.stop()


def _check_stream(server, tiny, prompt: int = 0) -> list[tuple[float, bytes]]:
    status, headers, chunks = stream_post(server.port, {"inputs": PROMPTS[prompt],
                                                        "parameters": {"max_new_tokens": TOKENS}})
    assert status == 200, chunks
    assert headers["content-type"] == "application/jsonlines" and headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers
    assert all(chunk.endswith(b"\n") and chunk.count(b"\n") == 1 for _, chunk in chunks)  # a line a chunk
    lines = [json.loads(chunk) for _, chunk in chunks]
    assert joined(lines) == [tiny["reference"][prompt]]
    assert lines[-1]["finish_reason"] == ["length"]
    return chunks


@pytest.mark.parametrize("name", ["one", "passive", "every-rank"])
def test_the_stand_in_streams_chunks_as_they_come(tiny, servers, name) -> None:
    """The chunks arrive one by one while the ranks generate (bench/stream_bench.py measures how early)."""
    server = servers[name]
    try:
        assert server.wait_ready(), server.log.read_text()[-3000:]
        chunks = _check_stream(server, tiny)
        times = [t for t, _ in chunks]
        # Sent as generated, the first chunk comes while the ranks still generate the rest (a step takes a
        # millisecond or more here; a busy machine may bunch a few chunks together); an answer written at its
        # end would come in one burst, its chunks microseconds apart.
        assert len(chunks) > TOKENS // 2 and times[-1] - times[0] > 0.01, times
        if name == "passive":  # a dynamic batch of streams: each request is refused in one line
            results: dict = {}
            calls = [threading.Thread(target=lambda i=i: results.update({i: stream_post(
                server.port, {"inputs": PROMPTS[i], "parameters": {"max_new_tokens": 4}})})) for i in range(2)]
            for call in calls:
                call.start()
                time.sleep(0.2)
            for call in calls:
                call.join(300)
            for status, _, chunks in results.values():
                assert status == 400
                assert json.loads(chunks[0][1])["error"].startswith(
                    "option.enable_streaming=true streams one request at a time, but DJL batched 2")
        _check_stream(server, tiny, prompt=1)  # and the ranks are still in step
        log = server.log.read_text()
        assert "Traceback" not in log, log[-3000:]
    finally:
        server.stop()
