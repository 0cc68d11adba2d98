#!/usr/bin/env python3
"""Stand-in for DJL Serving in the local test images, installed as /usr/bin/djl-serving by a real .deb.

DJL Serving's package cannot be fetched on the machines the tests run on. This implements the part of its
Python engine that a handler relies on, so the image's own handler, DeepSpeed and Transformers produce every
answer, and it follows real DJL where the handler depends on it: every such behaviour is a fact in
buildkit/data/djl.yaml (`behaviour`, each with its DJL source), and the stand-in reads the values for its
DJL version from djl-facts.json (shipped in its package by tests/local/prepare.py; DJL_STANDIN_FACTS names
another file). Facts carry over, code does not: this is not DJL's code.
- the model directory's serving.properties, with OPTION_<NAME> environment variables as defaults; no engine=
  line: engine Python, and the rolling batch DJL's recommender would choose (rolling_batch_without_engine);
- the ranks: in MPI mode `mpirun -np <tensor_parallel_degree>` (default: every GPU) starts one worker per rank
  with MASTER_ADDR and MASTER_PORT (a free port here; DJL passes 19000 + n), else one worker. MPI mode without
  enough GPUs fails the load, as DJL does (mpi_needs_gpus). GPUs are counted with nvidia-smi; the test-only
  knob DJL_STANDIN_GPUS=N pretends N GPUs, so MPI routing can be exercised with CPU (gloo) ranks;
- the model directory on the workers' Python path, and model.py imported at a worker's start where the DJL
  version does (model_dir_on_pythonpath, model_py_at_start);
- the calls: the load (an empty Input with the model's options) goes to every rank; requests go to rank 0
  only (routing rank-0: passive workers, unless option.use_passive_workers=false) or to every rank, and then
  the last rank's answer counts (answer_rank); a load answered with a code >= 300 fails with
  "Failed to initialize model: <its message>" (load_failure);
- requests: query parameters and then the body ("data") as content, headers as properties, SageMaker's
  custom attributes split into properties (request_parsing, query_before_body); a batch_size property makes
  a batch as the DJL version's Input reads it (batch_property);
  with batch_size > 1, requests arriving within max_batch_delay ms are one batch, encoded and split as DJL
  does (batch); None is answered 204 (none_answer), an exception 424 (handler_exception);
- port 8080 (DJL_STANDIN_PORT): GET /ping (200 once the model is loaded), POST /invocations;
- where the model comes from: HF_MODEL_ID with an empty model store becomes a model directory whose
  serving.properties names it as option.model_id (hf_model_id: ModelStore), left for the handler to
  download; an s3:// option.model_id (or HF_MODEL_ID) is downloaded before the load with DJL's command line
  (/opt/djl/bin/s5cmd --retry-count 1 sync <url>/* <tmp>, else aws s3 sync), into DJL's directory and
  hash, through a temporary directory moved into place, and handed over as model_id (s3_download). The
  test-only knob DJL_STANDIN_S5CMD=PATH stands for /opt/djl/bin/s5cmd on a host that has none there;
- streaming: a handler's stream content reaches the client chunk by chunk as the worker sends it, written as
  DJL writes a chunked HTTP answer; with every rank asked, the answering rank's stream (stream_wire,
  stream_http, stream_single_chunk, stream_routing, stream_client_gone).
What it does not do: DJL's wire protocol, several models or workers, worker restarts, rolling batch. It is a
test fixture, never shipped in a production image.
"""

import base64
import itertools
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

MODEL_DIR = os.environ.get("SM_MODEL_DIR", "/opt/ml/model")
LIB = os.environ.get("DJL_STANDIN_LIB", "/usr/lib/djl-serving-standin")
PORT = int(os.environ.get("DJL_STANDIN_PORT", "8080"))
LOAD_TIMEOUT_S = float(os.environ.get("DJL_STANDIN_LOAD_TIMEOUT", "900"))
BATCH_KEY = re.compile(r"batch_(\d+)\.(.*)", re.S)


def log(message):
    sys.stderr.write(f"djl-serving stand-in: {message}\n")
    sys.stderr.flush()


def load_facts():
    """{"version": DJL version, "behaviour": {name: value}} for the DJL version this stand-in plays."""
    with open(os.environ.get("DJL_STANDIN_FACTS") or os.path.join(LIB, "djl-facts.json")) as fh:
        return json.load(fh)


FACTS = load_facts()
B = FACTS["behaviour"]


def gpu_count():
    pretend = os.environ.get("DJL_STANDIN_GPUS")
    if pretend:  # test-only: pretend GPUs so that MPI mode (and its routing) can run on CPU ranks
        return int(pretend)
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


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


def is_text_generation(model_dir):
    try:
        with open(os.path.join(model_dir, "config.json")) as fh:
            architectures = json.load(fh).get("architectures") or []
    except (OSError, ValueError):
        return None  # no config.json: DJL's recommender does not run
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def configure(props):
    """What DJL's ModelInfo and LMI recommender make of the properties: the engine and the rolling batch."""
    model_id = props.get("option.model_id", "")  # a local directory once an s3:// model is downloaded
    text_generation = is_text_generation(model_id if os.path.isdir(model_id) else MODEL_DIR)
    default = B["rolling_batch_without_engine"]
    recommender_runs = default != "auto" or "engine" not in props  # 0.27: only without an engine= line
    if text_generation is not None and recommender_runs:
        if int(props.get("batch_size", "1")) > 1 or not text_generation:
            props["option.rolling_batch"] = "disable"
        elif props.get("option.rolling_batch", "auto") == "auto":
            props["option.rolling_batch"] = default
    props.setdefault("engine", "Python")
    if props["engine"] == "MPI":
        props["option.mpi_mode"] = "true"
    return props


class Ranks:
    """The worker processes of one model and a connection to each."""

    def __init__(self, props):
        self.lock = threading.Lock()
        self.idle = threading.Event()  # no stream being read from the workers (set by _chunks at its end)
        self.idle.set()
        entry = props.get("option.entryPoint") or ("model.py" if os.path.isfile(
            os.path.join(MODEL_DIR, "model.py")) else None)
        if not entry:
            raise RuntimeError("no entry point: set option.entryPoint or put a model.py in the model directory")
        mpi = props.get("option.mpi_mode", "false").lower() == "true"
        self.world = 1
        if mpi:
            gpus = gpu_count()
            degree = props.get("option.tensor_parallel_degree", "max")
            self.world = gpus if degree == "max" else int(degree)
            if B["mpi_needs_gpus"] and (self.world < 1 or gpus // self.world == 0):
                raise RuntimeError(f"GPU devices are not enough to run {self.world} partitions.")
            props["option.tensor_parallel_degree"] = str(self.world)
        self.passive = (mpi and B["routing"] == "rank-0"
                        and props.get("option.use_passive_workers", "true").lower() == "true")
        self.port = free_port()
        worker = [sys.executable, os.path.join(LIB, "worker.py"), "--model-dir", MODEL_DIR, "--entry-point", entry,
                  "--port", str(self.port), "--none-code", str(B["none_answer"]),
                  "--error-message", B["handler_exception"], "--batch-property", B["batch_property"]]
        if B["model_py_at_start"]:
            worker.append("--import-model-py")
        # DJL's order: the inherited PYTHONPATH, its engine directory (djl_python), the model directory.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (os.environ.get("PYTHONPATH"), LIB, MODEL_DIR) if p))
        if mpi:
            cmd = ["mpirun", "-np", str(self.world), "--allow-run-as-root", "--bind-to", "none", "--oversubscribe",
                   "-x", "PYTHONPATH", "-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={free_port()}", *worker]
        else:
            cmd = worker
        log(f"starting {self.world} rank(s){' (passive workers)' if self.passive else ''}: {' '.join(cmd)}")
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
                # DJL connects as soon as each rank logs "Python engine started." (PyProcess.startPythonProcess
                # awaits a latch its ReaderThreads count down, v0.36.0): no poll interval of its own to mimic.
                time.sleep(0.02)
        raise RuntimeError(f"rank {rank} did not listen within {LOAD_TIMEOUT_S:.0f} s")

    def call(self, properties, content, load=False):
        """Send one Input to the ranks DJL would send it to; the answer of the rank DJL would return."""
        self.idle.wait()  # the workers answer the next Input after the last chunk of a stream
        with self.lock:
            targets = self.conns if load or not self.passive else self.conns[:1]
            data = (json.dumps({"properties": properties, "content": [
                [k, base64.b64encode(v).decode()] for k, v in content]}) + "\n").encode()
            for conn in targets:
                conn.write(data)
                conn.flush()
            replies = []
            for rank, conn in enumerate(targets):
                line = conn.readline()
                if not line:
                    raise RuntimeError(f"rank {rank} closed its connection (exit {self.proc.poll()})")
                replies.append(json.loads(line))
            reply = replies[-1] if B["answer_rank"] == "last" else replies[0]
            reply["content"] = [(k, base64.b64decode(v)) for k, v in reply["content"]]
            if any(r.get("stream") for r in replies):
                self.idle.clear()
                reply["chunks"] = self._chunks(targets, replies, reply)
            return reply

    def _chunks(self, targets, replies, chosen):
        """The chunks of a streamed answer, as they come, from the rank whose answer DJL returns (stream_routing:
        DJL takes a rank's answer once its header arrives, so that rank's stream is the one the client reads);
        the other ranks' chunks are read and dropped, as DJL's connection decoders read them into suppliers
        nobody reads. Releases the ranks when the last chunk of every stream is in."""
        try:
            for conn, reply in zip(targets, replies, strict=True):
                if reply is chosen:
                    yield from _read_chunks(conn)
            for conn, reply in zip(targets, replies, strict=True):
                if reply is not chosen and reply.get("stream"):
                    for _ in _read_chunks(conn):
                        pass
        finally:
            self.idle.set()


def _read_chunks(conn):
    """A worker's chunk lines until the last one (more: false), as bytes; a closed connection ends them."""
    while True:
        line = conn.readline()
        if not line:
            return
        chunk = json.loads(line)
        yield base64.b64decode(chunk["chunk"])
        if not chunk["more"]:
            return


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_reply(code, message):
    return {"code": code, "message": message, "properties": {"content-type": "application/json"},
            "content": [("data", json.dumps({"code": code, "message": message}).encode())]}


class Batcher:
    """DJL's dynamic batching: requests that arrive within max_batch_delay ms, up to batch_size, are one call."""

    def __init__(self, ranks, size, delay_ms):
        self.ranks, self.size, self.delay = ranks, size, delay_ms / 1000
        self.queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def submit(self, properties, content):
        slot = {"done": threading.Event()}
        self.queue.put((properties, content, slot))
        slot["done"].wait()
        return slot["reply"]

    def _run(self):
        while True:
            items = [self.queue.get()]
            deadline = time.monotonic() + self.delay
            while len(items) < self.size:
                try:
                    items.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                replies = self._call(items)
            except Exception as exc:  # a dead rank: DJL answers 5xx too
                replies = [error_reply(503, str(exc))] * len(items)
            for (_, _, slot), reply in zip(items, replies, strict=True):
                slot["reply"] = reply
                slot["done"].set()

    def _call(self, items):
        if len(items) == 1:
            return [self.ranks.call(items[0][0], items[0][1])]
        log(f"a batch of {len(items)} requests")
        properties, content = {"batch_size": str(len(items))}, []
        for i, (props, pairs, _) in enumerate(items):
            properties.update({f"batch_{i:03d}.{k}": v for k, v in props.items()})
            content += [(f"batch_{i:03d}.{k}", v) for k, v in pairs]
        reply = self.ranks.call(properties, content)
        if reply["code"] >= 300:
            return [reply] * len(items)
        if len(reply["content"]) != len(items):
            return [error_reply(500, f"Batch output size mismatch, expected: {len(items)}, actual: "
                                     f"{len(reply['content'])}")] * len(items)
        replies = [dict(reply, content=[]) for _ in items]
        for key, value in reply["content"]:
            match = BATCH_KEY.fullmatch(key or "")
            if not match or int(match.group(1)) >= len(items):
                return [error_reply(500, f"Unexpected batch output key: {key}")] * len(items)
            replies[int(match.group(1))]["content"].append((match.group(2), value))
        return replies


STATE = {"batcher": None}


class Handler(BaseHTTPRequestHandler):
    def _send(self, code, body=b"", content_type="application/json"):
        self.send_response(code)
        if code != 204:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if code != 204:
            self.wfile.write(body)

    def do_GET(self):
        if self.path == "/ping":
            ready = STATE["batcher"] is not None
            self._send(200 if ready else 503, json.dumps({"status": "Healthy" if ready else "Loading"}).encode())
        else:
            self._send(404, b'{"error": "not found"}')

    def do_POST(self):
        url = urlsplit(self.path)
        if url.path != "/invocations":
            return self._send(404, b'{"error": "not found"}')
        if STATE["batcher"] is None:
            return self._send(503, b'{"error": "the model is not loaded yet"}')
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        content = [(k, v.encode()) for k, v in parse_qsl(url.query, keep_blank_values=True)] + [("data", body)]
        properties = {}
        for key, value in self.headers.items():
            if key.lower() == "x-amzn-sagemaker-custom-attributes":
                for token in value.split(";"):
                    name, sep, val = token.partition("=")
                    if sep:
                        properties[name.strip()] = val.strip()
            else:
                properties[key] = value
        reply = STATE["batcher"].submit(properties, content)
        if "chunks" in reply:
            return self._send_stream(reply)
        content_type = next((v for k, v in reply["properties"].items() if k.lower() == "content-type"),
                            "application/octet-stream")
        self._send(reply["code"], reply["content"][0][1] if reply["content"] else b"", content_type)

    def _send_stream(self, reply):
        """A streamed answer as DJL's HTTP handler writes one (stream_http): nothing until the first chunk, then
        the status and the Output's properties as headers with Transfer-Encoding: chunked, each chunk as it
        comes, and the last (empty) chunk; from 0.31 a stream of one chunk is one plain answer instead. The
        stream is read to its end even when the client has gone (stream_client_gone: nothing tells the worker)."""
        chunks = reply["chunks"]
        first = next(chunks, None)
        second = next(chunks, None) if first is not None else None
        if second is None and B["stream_single_chunk"] == "full":
            return self._send(reply["code"], first or b"", reply["properties"].get("content-type",
                                                                                  "application/octet-stream"))
        self.protocol_version = "HTTP/1.1"  # chunked transfer needs HTTP/1.1 (DJL answers in 1.1)
        self.send_response(reply["code"])
        for key, value in reply["properties"].items():
            self.send_header(key, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        gone = False
        for data in itertools.chain((first, second), chunks) if second is not None else (first or b"",):
            if data and not gone:
                try:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                except OSError:
                    gone = True
                    log("the client went away; the stream is read to its end")
        if not gone:
            try:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                pass

    def log_message(self, fmt, *args):
        log(fmt % args)


def djl_hash(text):
    """DJL's Utils.hash: the first 20 bytes of the SHA-256 of the UTF-8 text, in hex."""
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:40]


def download_root():
    """SERVING_DOWNLOAD_DIR, else DJL's cache directory (DJL_CACHE_DIR, else ~/.djl.ai)."""
    return (os.environ.get("SERVING_DOWNLOAD_DIR") or os.environ.get("DJL_CACHE_DIR")
            or os.path.join(os.path.expanduser("~"), ".djl.ai"))


def model_directory():
    """The model DJL loads: the model store's, or with HF_MODEL_ID and an empty store, what ModelStore makes
    of HF_MODEL_ID (hf_model_id): the URL itself, a local path, or a directory with a serving.properties."""
    model_id, fact = os.environ.get("HF_MODEL_ID"), B["hf_model_id"]
    if not model_id:
        return MODEL_DIR
    if os.path.isdir(MODEL_DIR) and any(not n.startswith(".") for n in os.listdir(MODEL_DIR)):
        log(f"HF_MODEL_ID={model_id} beside a model in {MODEL_DIR}: DJL loads both; this stand-in serves one "
            "model, the model store's")
        return MODEL_DIR
    if fact["urls_as_is"] and (model_id.startswith(("s3://", "djl://")) or os.path.exists(model_id)):
        return model_id
    directory = os.path.join(download_root(), djl_hash(model_id))
    if not os.path.isdir(directory):
        os.makedirs(directory)
        lines = [f"option.model_id={model_id}"]
        if os.environ.get(fact["revision_env"]):
            lines.append(f"option.revision={os.environ[fact['revision_env']]}")
        if os.environ.get("HF_TASK"):
            lines.append(f"option.task={os.environ['HF_TASK']}")
        with open(os.path.join(directory, "serving.properties"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
    log(f"HF_MODEL_ID={model_id}: model directory {directory}")
    return directory


def s3_download(url):
    """An s3:// model as DJL's Java side downloads it (s3_download), or RuntimeError with DJL's message."""
    fact = B["s3_download"]
    target = fact["directory"].format(root=download_root(), hash=djl_hash(url))
    if os.path.isdir(target):
        log(f"artifacts has been downloaded already: {target}")
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="tmp", dir=os.path.dirname(target))
    try:
        s5cmd = os.environ.get("DJL_STANDIN_S5CMD") or fact["s5cmd"]  # the knob: test-only, on a host
        if os.path.exists(s5cmd):
            src = url if url.endswith("*") else url + ("*" if url.endswith("/") else "/*")
            cmd = [s5cmd] + [a.format(src=src, dest=tmp) for a in fact["s5cmd_args"]]
        else:
            cmd = [a.format(src=url, dest=tmp) for a in fact["fallback"]]
        log(f"S3 url found, start downloading from {url}: {' '.join(cmd)}")
        try:
            out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError:
            raise RuntimeError("Model failed to download from s3") from None
        if out.returncode != 0 or out.stdout.startswith("ERROR "):
            log(out.stdout.strip())
            raise RuntimeError(f"Failed to execute: [{' '.join(cmd)}]")
        os.rename(tmp, target)
        log(f"Download completed! Files saved to {target}")
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    global MODEL_DIR
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        MODEL_DIR = model_directory()
        if MODEL_DIR.startswith("s3://"):
            MODEL_DIR = s3_download(MODEL_DIR)
        props = read_properties(MODEL_DIR)
        if props.get("option.model_id", "").strip().startswith("s3://"):
            props["option.model_id"] = s3_download(props["option.model_id"].strip())
    except Exception as exc:
        log(f"model load failed: {exc}")
        sys.exit(1)
    props = configure(props)
    log(f"DJL Serving {FACTS['version']} stand-in; engine={props['engine']}")
    if props["engine"] not in ("Python", "MPI"):
        log(f"engine={props['engine']}: this stand-in serves DJL's Python engine only")
        sys.exit(1)
    try:
        ranks = Ranks(props)
        options = {k[7:]: v for k, v in props.items() if k.startswith("option.")}
        options["model_dir"] = MODEL_DIR
        reply = ranks.call(options, [], load=True)
    except Exception as exc:
        log(f"model load failed: {exc}")
        sys.exit(1)
    if reply["code"] >= 300:
        log(f"model load failed: {B['load_failure']}{reply['message']}")
        ranks.proc.terminate()
        sys.exit(1)
    STATE["batcher"] = Batcher(ranks, int(props.get("batch_size", "1")), int(props.get("max_batch_delay", "100")))
    log(f"model loaded on {ranks.world} rank(s); serving on port {PORT}")
    code = ranks.proc.wait()
    log(f"the workers exited ({code})")
    sys.exit(1)


if __name__ == "__main__":
    main()
