#!/usr/bin/env python3
"""Stand-in for DJL Serving in the local test images, installed as /usr/bin/djl-serving by a real .deb.

DJL Serving's package cannot be fetched on the machines the tests run on. This implements the part of
its Python engine that a handler relies on, so the image's own handler, DeepSpeed and Transformers
produce every answer:
- the model directory's serving.properties, with OPTION_<NAME> environment variables as defaults
  (option.entryPoint, option.mpi_mode, option.tensor_parallel_degree, ...), as DJL reads them;
- the ranks: in MPI mode `mpirun -np <tensor_parallel_degree>` starts one worker per rank (DJL passes
  PYTHONPATH and MASTER_ADDR the same way), else one worker; each imports the entry point module;
- the calls: an empty Input carrying the model's properties loads the model on every rank; each request
  goes to every rank as a batch, and rank 0's Output is the answer (its code becomes the HTTP status);
- port 8080: GET /ping (200 once the model is loaded), POST /invocations. A model that fails to load
  stops the server with the handler's message, as DJL fails a model load.
What it does not do: DJL's wire protocol, dynamic batching across requests, several models, workers
restarts, streaming. It is a test fixture, never shipped in a production image.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL_DIR = os.environ.get("SM_MODEL_DIR", "/opt/ml/model")
LIB = os.environ.get("DJL_STANDIN_LIB", "/usr/lib/djl-serving-standin")
PORT = int(os.environ.get("DJL_STANDIN_PORT", "8080"))
LOAD_TIMEOUT_S = float(os.environ.get("DJL_STANDIN_LOAD_TIMEOUT", "900"))


def log(message):
    sys.stderr.write(f"djl-serving stand-in: {message}\n")
    sys.stderr.flush()


def read_properties(model_dir):
    """serving.properties, then OPTION_* environment defaults that the file does not set."""
    props = {}
    path = os.path.join(model_dir, "serving.properties")
    if os.path.isfile(path):
        with open(path) as fh:
            for raw in fh:
                line = raw.strip()
                if line and not line.startswith(("#", "!")) and "=" in line:
                    key, value = line.split("=", 1)
                    props[key.strip()] = value.strip()
    for key, value in os.environ.items():
        if key.startswith("OPTION_") and value:
            name = key[7:].lower()
            name = {"entrypoint": "entryPoint"}.get(name, name)
            if name == "engine":
                props.setdefault("engine", value)
            else:
                props.setdefault(f"option.{name}", value)
    return props


class Ranks:
    """The worker processes of one model and a connection to each."""

    def __init__(self, props):
        self.lock = threading.Lock()
        entry = props.get("option.entryPoint") or ("model.py" if os.path.isfile(
            os.path.join(MODEL_DIR, "model.py")) else None)
        if not entry:
            raise RuntimeError("no entry point: set option.entryPoint or put a model.py in the model directory")
        mpi = props.get("option.mpi_mode", "false").lower() == "true"
        self.world = int(props.get("option.tensor_parallel_degree", "1")) if mpi else 1
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        worker = [sys.executable, os.path.join(LIB, "worker.py"), "--model-dir", MODEL_DIR, "--entry-point", entry,
                  "--port", str(self.port)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (LIB, os.environ.get("PYTHONPATH")) if p))
        if mpi:
            cmd = ["mpirun", "-np", str(self.world), "--allow-run-as-root", "--bind-to", "none", "--oversubscribe",
                   "-x", "PYTHONPATH", "-x", "MASTER_ADDR=127.0.0.1", *worker]
        else:
            cmd = worker
        log(f"starting {self.world} rank(s): {' '.join(cmd)}")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        self.conns = [self._connect(rank) for rank in range(self.world)]

    def _connect(self, rank):
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the workers exited ({self.proc.returncode}) before rank {rank} listened")
            try:
                sock = socket.create_connection(("127.0.0.1", self.port + rank), timeout=5)
                sock.settimeout(None)
                return sock.makefile("rwb")
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"rank {rank} did not listen within {LOAD_TIMEOUT_S:.0f} s")

    def call(self, message):
        """Send one message to every rank; every rank answers; rank 0's answer counts."""
        with self.lock:
            data = (json.dumps(message) + "\n").encode()
            for conn in self.conns:
                conn.write(data)
                conn.flush()
            replies = []
            for rank, conn in enumerate(self.conns):
                line = conn.readline()
                if not line:
                    raise RuntimeError(f"rank {rank} closed its connection (exit {self.proc.poll()})")
                replies.append(json.loads(line))
            return replies[0]


STATE = {"ranks": None}


class Handler(BaseHTTPRequestHandler):
    def _send(self, code, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/ping":
            ready = STATE["ranks"] is not None
            self._send(200 if ready else 503, {"status": "Healthy" if ready else "Loading"})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        if self.path != "/invocations":
            return self._send(404, {"error": "not found"})
        if STATE["ranks"] is None:
            return self._send(503, {"error": "the model is not loaded yet"})
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8", "replace")
        try:
            reply = STATE["ranks"].call({"batch": [body]})
        except Exception as exc:  # a dead rank: DJL answers 5xx too
            return self._send(503, {"error": str(exc)})
        if reply.get("exception"):
            return self._send(500, {"error": reply["exception"]})
        if reply["code"] != 200:
            return self._send(reply["code"], {"code": reply["code"], "message": reply["message"],
                                              "error": reply.get("error")})
        content = reply["content"]
        self._send(200, content[0][1].encode() if content else b"")

    def log_message(self, fmt, *args):
        log(fmt % args)


def main():
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    props = read_properties(MODEL_DIR)
    engine = props.get("engine", "Python")
    if engine not in ("Python", "MPI"):
        log(f"engine={engine}: this stand-in serves DJL's Python engine only")
        sys.exit(1)
    try:
        ranks = Ranks(props)
        options = {k[7:]: v for k, v in props.items() if k.startswith("option.")}
        options["model_dir"] = MODEL_DIR
        reply = ranks.call({"properties": options, "batch": []})
    except Exception as exc:
        log(f"model load failed: {exc}")
        sys.exit(1)
    if reply.get("exception"):
        log(f"model load failed: {reply['exception']}")
        ranks.proc.terminate()
        sys.exit(1)
    STATE["ranks"] = ranks
    log(f"model loaded on {ranks.world} rank(s); serving on port {PORT}")
    code = ranks.proc.wait()
    log(f"the workers exited ({code})")
    sys.exit(1)


if __name__ == "__main__":
    main()
