"""Token streaming (option.enable_streaming=true, lmi_stream.py) on CPU, through the DJL Serving stand-in
as a client sees it: time to the first chunk (the first token's text) against time to the whole answer, for one
process and for two passive ranks (mpirun, gloo), and the same request answered without streaming by one
process (what streaming costs on the whole answer). The model: a small random Llama with the tests' character
tokenizer (one token a character), 8 layers, hidden 512, greedy. Writes its section of bench/results.md.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
IMAGE_CODE = ROOT / "buildkit" / "resources" / "image"  # the in-image modules, imported flat as the image does
sys.path[1:1] = [str(IMAGE_CODE), str(ROOT / "buildkit" / "resources" / "check")]

import lmi_check  # noqa: E402

from bench.results_md import write_section  # noqa: E402
from tests.local import prepare  # noqa: E402

MARKER = "## Token streaming"
ROUNDS = 5
NEW_TOKENS = 200
PROMPT = "the cat sat on the mat"


def make_model(path: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    lmi_check.make_tiny_model(path)  # the character tokenizer (the tiny model is replaced)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(lmi_check.TINY_ALPHABET) + 4, hidden_size=512, intermediate_size=1024,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=None,
                         tie_word_embeddings=False)  # no end of sequence: every answer is NEW_TOKENS long
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        Path(path, name).unlink(missing_ok=True)
    LlamaForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """The stand-in DJL of tests/local on a free loopback port, serving a copy of the model."""

    def __init__(self, model: str, properties: str, tmp: Path, version: str, gpus: str) -> None:
        self.dir = tmp / "model"
        shutil.copytree(model, self.dir)
        (self.dir / "serving.properties").write_text(properties)
        facts = tmp / "djl-facts.json"
        facts.write_text(json.dumps(prepare.standin_facts(version)))
        self.port = free_port()
        env = {**os.environ, "SM_MODEL_DIR": str(self.dir), "DJL_STANDIN_LIB": str(ROOT / "tests/local/standin"),
               "DJL_STANDIN_FACTS": str(facts), "DJL_STANDIN_PORT": str(self.port), "DJL_STANDIN_GPUS": gpus,
               "PYTHONPATH": str(IMAGE_CODE), "OMP_NUM_THREADS": "1",
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        self.log = tmp / "standin.log"
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests/local/djl_serving_standin.py")], env=env,
                                     stdout=self.log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise SystemExit(f"the stand-in did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(60)


def post(port: int) -> tuple[float, float, str]:
    """(seconds to the first chunk of the answer's body, seconds to its end, the answer's text)."""
    data = json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": NEW_TOKENS}}).encode()
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        f = sock.makefile("rb")
        status = int(f.readline().split()[1])
        headers = {}
        while (line := f.readline()) not in (b"\r\n", b""):
            key, value = line.decode().split(":", 1)
            headers[key.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") != "chunked":
            body = f.read(int(headers["content-length"]))
            end = time.monotonic() - start
            assert status == 200, body
            return end, end, json.loads(body)["generated_text"]
        first, texts = None, []
        while size := int(f.readline().strip(), 16):
            chunk = f.read(size)
            f.readline()
            first = first or time.monotonic() - start
            texts.append("".join(json.loads(chunk)["outputs"]))
        assert status == 200
        return first, time.monotonic() - start, "".join(texts)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lmi-stream-bench-"))
    try:
        model = make_model(str(tmp / "small"))
        common = f"option.entryPoint=lmi_deepspeed\noption.max_new_tokens={NEW_TOKENS}\n"
        setups = {
            "one process, streaming": (f"engine=Python\n{common}option.enable_streaming=true\n", "0.36.0", "0"),
            "one process, not streaming": (f"engine=Python\n{common}", "0.36.0", "0"),
            "two passive ranks (tp=2), streaming": (
                f"engine=Python\noption.mpi_mode=true\noption.tensor_parallel_degree=2\n{common}"
                "option.enable_streaming=true\n", "0.32.0", "2"),
        }
        results, texts = {}, {}
        for name, (props, version, gpus) in setups.items():  # one at a time: the 2 cores are the ranks'
            (tmp / name).mkdir()
            server = Server(model, props, tmp / name, version, gpus)
            try:
                server.wait_ready()
                post(server.port)  # warm-up
                runs = [post(server.port) for _ in range(ROUNDS)]
            finally:
                server.stop()
            texts[name] = {t for _, _, t in runs}
            results[name] = ([r[0] for r in runs], [r[1] for r in runs])
            print(name, results[name], flush=True)
        assert all(len(t) == 1 for t in texts.values()) and len(set.union(*texts.values())) == 1, texts
        chars = len(next(iter(texts.values())).pop())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for name, (firsts, ends) in results.items():
        first, end = statistics.median(firsts), statistics.median(ends)
        rows.append(f"| {name} | {first * 1000:.0f} ms | {end * 1000:.0f} ms | {first / end:.1%} |")
    stream_end = statistics.median(results["one process, streaming"][1])
    plain_end = statistics.median(results["one process, not streaming"][1])
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    section = (
        f"{MARKER}\n\n"
        f"Measured {now} by `make bench-stream` (bench/stream_bench.py) on this machine (2 cores, shared), CPU, "
        f"through the DJL stand-in (worker socket, chunked HTTP) as a client reads it: a random Llama of 8 layers, "
        f"hidden 512, with the tests' character tokenizer (one token a character), \"{PROMPT}\" -> "
        f"{NEW_TOKENS} new tokens ({chars} characters), greedy; median of {ROUNDS} requests after a warm-up. "
        f"Every answer, streamed or not, on one or two ranks, was the same text.\n\n"
        "| setup | time to first chunk | time to whole answer | first / whole |\n|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\nStreaming's cost on the whole answer (one process): {stream_end / plain_end:.2f}x the non-streamed "
        "time (decoding every step, a line and a chunk per token).\n")
    write_section(MARKER, section)
    print(section)


if __name__ == "__main__":
    main()
