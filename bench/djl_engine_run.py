"""Research harness, not a test: the hostile cases of tests/test_hostile.py through DJL Serving's REAL Python
engine (`djl_python_engine.py` and its `djl_python` package, exported from deepjavalibrary/djl-serving at a
tag into a directory of your own; DJL's code is never committed here), driving it as DJL's Java side does
(Connection.java, PyProcess.java, PyPredictor.java at v0.27.0 and v0.36.0): the engine started under `mpirun`
with MASTER_ADDR/MASTER_PORT and PYTHONPATH = the handler, DJL's engine directory, the model directory; unix
sockets `<name>.<rank>`; the load (an empty Input with the options) sent to every rank; requests to rank 0
only (passive workers, 0.30+) or to every rank with the last rank's answer returned (older DJL); a batch
encoded as PyPredictor.batchPredict encodes it; HTTP requests as RequestParser.parseRequest makes Inputs of
them (query parameters, then the body as "data"; headers as properties). The wire format is the one
Connection.java's InputEncoder/OutputDecoder and djl_python's inputs.py/outputs.py speak: big-endian shorts
and ints, UTF-8 strings with an int length.

    python bench/djl_engine_run.py DJL_SETUP_DIR [--ranks 2] [--routing rank-0|every-rank]

where DJL_SETUP_DIR holds `djl_python_engine.py` and `djl_python/` (e.g. `git archive v0.36.0
engines/python/setup`, with the `__version__ = "0.36.0"` line DJL's setup.py appends to djl_python/__init__.py
when it installs the package). Prints each case, whether it was handled as the handler promises, and the counts.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
IMAGE_CODE = ROOT / "buildkit" / "resources" / "image"  # the in-image modules, imported flat as the image does
sys.path[1:1] = [str(IMAGE_CODE), str(ROOT / "buildkit" / "resources" / "check")]


def _utf8(value: str) -> bytes:
    data = value.encode("utf-8")
    return struct.pack(">i", len(data)) + data


def encode(properties: dict, content: list[tuple[str, bytes]]) -> bytes:
    out = struct.pack(">h", len(properties))
    for key, value in properties.items():
        out += _utf8(key) + _utf8(str(value))
    out += struct.pack(">h", len(content))
    for key, value in content:
        out += _utf8(key) + struct.pack(">i", len(value)) + value
    return out


class Conn:
    def __init__(self, path: str, deadline: float) -> None:
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        self.file = self.sock.makefile("rb")

    def _read(self, n: int) -> bytes:
        data = self.file.read(n)
        if len(data) < n:
            raise ConnectionError("the engine closed the connection")
        return data

    def _str(self) -> str | None:
        (n,) = struct.unpack(">i", self._read(4))
        return None if n < 0 else self._read(n).decode("utf-8")

    def send(self, properties: dict, content: list) -> None:
        # PyProcess.sendRequest names the handler function on every Input (PyEnv: "handle").
        self.sock.sendall(encode({**properties, "handler": properties.get("handler", "handle")}, content))

    def receive(self, timeout: float) -> dict:
        self.sock.settimeout(timeout)
        (code,) = struct.unpack(">h", self._read(2))
        message = self._str()
        (n,) = struct.unpack(">h", self._read(2))
        props = {self._str(): self._str() for _ in range(n)}
        (n,) = struct.unpack(">h", self._read(2))
        content = []
        for _ in range(n):
            key = self._str()
            (size,) = struct.unpack(">i", self._read(4))
            content.append((key, self._read(size)))
        return {"code": code, "message": message, "properties": props, "content": content}


def http_input(body: bytes, headers: dict, query: list | None = None) -> tuple[dict, list]:
    """RequestParser.parseRequest: query parameters first, then the body as "data"; headers as properties."""
    return dict(headers), [(k, v.encode()) for k, v in (query or [])] + [("data", body)]


def batch_input(items: list[tuple[dict, list]]) -> tuple[dict, list]:
    """PyPredictor.batchPredict: batch_size, and every request's properties and content under batch_NNN."""
    properties, content = {"batch_size": str(len(items))}, []
    for i, (props, pairs) in enumerate(items):
        properties.update({f"batch_{i:03d}.{k}": v for k, v in props.items()})
        content += [(f"batch_{i:03d}.{k}", v) for k, v in pairs]
    return properties, content


JSON = {"Content-Type": "application/json"}


def lm(inputs, **params) -> bytes:
    return json.dumps({"inputs": inputs, "parameters": params}).encode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("setup")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--routing", choices=("rank-0", "every-rank"), default="rank-0",
                        help="rank-0: passive workers (DJL >= 0.30); every-rank: older DJL, the last rank's answer")
    args = parser.parse_args()
    import lmi_check

    work = Path(tempfile.mkdtemp(prefix="djl-engine-run-"))
    model = lmi_check.make_tiny_model(str(work / "model"))
    prompts = ["hello world", "the cat sat on the mat", "deepspeed"]
    reference = lmi_check.reference_generate(model, prompts, 12)
    sock = str(work / "sock")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(IMAGE_CODE), args.setup, model]),
           "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000),
           "LOCAL_SIZE": str(args.ranks)}
    engine = [sys.executable, os.path.join(args.setup, "djl_python_engine.py"), "--model-dir", model,
              "--entry-point", "lmi_deepspeed", "--sock-type", "unix", "--sock-name", sock, "--device-id", "-1",
              "--tensor-parallel-degree", str(args.ranks)]
    cmd = (["mpirun", "-np", str(args.ranks), "--allow-run-as-root", "--bind-to", "none", "--oversubscribe",
            "-x", "PYTHONPATH", "-x", "MASTER_ADDR", "-x", "MASTER_PORT", "-x", "OMP_NUM_THREADS", "-x",
            "LOCAL_SIZE", *engine])
    log = open(work / "engine.log", "wb")  # noqa: SIM115 - the engine writes it until the end
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    results = []
    try:
        deadline = time.monotonic() + 300
        conns = [Conn(f"{sock}.{r}", deadline) for r in range(args.ranks)]
        load = {"model_dir": model, "entryPoint": "lmi_deepspeed", "tensor_parallel_degree": str(args.ranks),
                "max_new_tokens": "64", "mpi_mode": "true", "batch_size": "4"}
        for conn in conns:
            conn.send(load, [])
        loaded = [conn.receive(600) for conn in conns]
        assert all(r["code"] < 300 for r in loaded), loaded
        good = [lm(p, max_new_tokens=12) for p in prompts]

        targets = conns[:1] if args.routing == "rank-0" else conns

        def ask(properties, content, timeout=120.0):
            start = time.monotonic()
            for conn in targets:  # passive workers: rank 0 only; else every rank (PyProcess.predictStandard)
                conn.send(properties, content)
            replies = [conn.receive(timeout) for conn in targets]
            return replies[-1], time.monotonic() - start  # the last rank's answer counts

        def answer(reply, i=None):
            pairs = reply["content"] if i is None else [(k, v) for k, v in reply["content"]
                                                         if k.startswith(f"batch_{i}.")]
            return json.loads(pairs[0][1])

        def case(name, ok, detail):
            results.append((name, bool(ok)))
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)

        hostile = {
            "deep body (988)": (b"[" * 988 + b"]" * 988, "nested deeper"),
            "deep body (100000)": (b"[" * 100000 + b"]" * 100000, "nested deeper"),
            "1M-character prompt": (json.dumps({"inputs": "a" * 1_000_000}).encode(), "max_body_bytes"),
            "over the positions": (lm("a" * 120, max_new_tokens=64), "positions"),
            "seed 2**64": (lm("a", do_sample=True, seed=2**64), "seed must be"),
            "lone surrogate": (b'{"inputs": "a\\ud800"}', "surrogate"),
            "17 prompts": (lm(["a"] * 17), "max_prompts"),
        }
        for name, (data, message) in hostile.items():
            reply, took = ask(*http_input(data, JSON))
            error = answer(reply).get("error", "") if reply["content"] else ""
            case(f"alone: {name}", reply["code"] in (400, 413) and message in error,
                 f"{reply['code']} {error[:90]!r} in {took:.2f} s")
            reply, took = ask(*http_input(good[0], JSON))
            case("  then a good request", reply["code"] == 200 and answer(reply) == {"generated_text": reference[0]},
                 f"{reply['code']} in {took:.2f} s")
        reply, took = ask(*http_input(lm(prompts[1], max_new_tokens=12, do_sample=True, temperature=1,
                                          repetition_penalty=1, seed=3), JSON))
        case("integer temperature and repetition_penalty", reply["code"] == 200, f"{reply['code']} in {took:.2f} s")
        reply, _ = ask(*http_input(good[1], JSON, query=[("data", '{"inputs": "q"}')]))
        case("?data= does not replace the body", answer(reply) == {"generated_text": reference[1]}, reply["code"])
        reply, took = ask(*http_input(good[2], {**JSON, "batch_size": "5000000"}))
        case("a batch_size header is one request", reply["code"] == 200 and answer(reply) == {
            "generated_text": reference[2]}, f"{reply['code']} in {took:.2f} s")
        mixed = [http_input(good[0], JSON), http_input(hostile["deep body (988)"][0], JSON),
                 http_input(hostile["over the positions"][0], JSON),
                 http_input(good[1], JSON, query=[("data", "x")])]
        reply, took = ask(*batch_input(mixed))
        answers = [answer(reply, i) for i in range(4)]
        case("a batch mixing good and hostile requests", reply["code"] == 200
             and answers[0] == {"generated_text": reference[0]} and answers[3] == {"generated_text": reference[1]}
             and answers[1].get("code") == 400 and answers[2].get("code") == 400, f"{answers} in {took:.2f} s")
        seeded = lm(prompts[1], max_new_tokens=12, do_sample=True, top_k=5, seed=11)
        alone, _ = ask(*http_input(seeded, JSON))
        reply, _ = ask(*batch_input([http_input(lm(prompts[0], max_new_tokens=12, do_sample=True, seed=11), JSON),
                                     http_input(seeded, JSON)]))
        case("seeded sampling answers alike alone and in a batch", answer(reply, 1) == answer(alone),
             f"{answer(alone)} / {answer(reply, 1)}")
        reply, took = ask(*http_input(good[2], JSON))
        case("the next request answers promptly", reply["code"] == 200 and answer(reply) == {
            "generated_text": reference[2]} and took < 30, f"{reply['code']} in {took:.2f} s")
    except Exception as exc:  # noqa: BLE001 - report how far it got
        print(f"stopped: {type(exc).__name__}: {exc}", flush=True)
        print((work / "engine.log").read_text()[-3000:])
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
    passed = sum(ok for _, ok in results)
    print(f"{args.setup}: {passed} of {len(results)} cases handled as promised, {args.ranks} rank(s), "
          f"routing {args.routing}")


if __name__ == "__main__":
    main()
