"""vLLM's own S3 path inside a built vLLM image, against moto's S3 server on this machine's loopback.

    python bench/vllm_s3_stream.py IMAGE   (e.g. the image `make test-vllm` builds)

Makes a two-shard safetensors model here, uploads it to moto (a free port on 127.0.0.1, stopped at the end), then
runs in the image, with the host's network and only the environment for configuration, what vLLM 0.33.0 does for
`--load-format runai_streamer` with an s3:// model, short of a GPU: runai_utils.list_safetensors,
ObjectStorageModel.pull_files of the config (ModelConfig.maybe_pull_model_tokenizer_for_runai) and
weight_utils.runai_safetensors_weights_iterator (the Run:ai streamer). Prints whether the tensors it read equal
the files', and the times. No GPU is needed (VLLM_TARGET_DEVICE=cpu only selects vLLM's platform)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import safetensors.torch as st
import torch

IN_IMAGE = """
import json, os, sys, time
import safetensors.torch
from vllm.model_executor.model_loader.weight_utils import runai_safetensors_weights_iterator
from vllm.transformers_utils.runai_utils import ObjectStorageModel, list_safetensors
uri = sys.argv[1]
start = time.monotonic()
files = sorted(list_safetensors(uri))
local = ObjectStorageModel(url=uri)
local.pull_files(uri, allow_pattern=["*.json"])
got = {name: tensor.clone() for name, tensor in runai_safetensors_weights_iterator(files, False)}
seconds = time.monotonic() - start
safetensors.torch.save_file(got, "/out/read.safetensors")
print("RESULT " + json.dumps({"files": files, "pulled": sorted(os.listdir(local.dir)), "seconds": seconds}))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(image: str) -> int:
    port = free_port()
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = Path(tempfile.mkdtemp(prefix="lmi-s3-"))
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        model, out = work / "model", work / "out"
        model.mkdir()
        out.mkdir(mode=0o777)
        out.chmod(0o777)  # the image runs as uid 1001
        gen = torch.Generator().manual_seed(0)
        st.save_file({"embed.weight": torch.randn(4096, 256, generator=gen),
                      "norm.weight": torch.ones(256, dtype=torch.bfloat16)}, model / "model-00001-of-00002.safetensors")
        st.save_file({"lm_head.weight": torch.randn(256, 4096, generator=gen).half(),
                      "positions": torch.arange(7)}, model / "model-00002-of-00002.safetensors")
        (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", region_name="us-west-2", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing")
        s3.create_bucket(Bucket="models", CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
        for path in model.iterdir():
            s3.upload_file(str(path), "models", f"tiny/{path.name}")
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_REGION": "us-west-2", "AWS_EC2_METADATA_DISABLED": "true",
               "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0", "VLLM_TARGET_DEVICE": "cpu"}
        start = time.monotonic()
        run = subprocess.run(["docker", "run", "--rm", "--network", "host", "-v", f"{out}:/out",
                              *(a for k, v in env.items() for a in ("-e", f"{k}={v}")), "--entrypoint", "python",
                              image, "-c", IN_IMAGE, "s3://models/tiny/"], capture_output=True, text=True, timeout=600)
        wall = time.monotonic() - start
        lines = [line[7:] for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode != 0 or not lines:
            print(f"failed (exit {run.returncode}): {run.stderr[-1500:]}")
            return 1
        said = json.loads(lines[-1])
        got = st.load_file(out / "read.safetensors")
        want = {k: v for p in sorted(model.glob("*.safetensors")) for k, v in st.load_file(p).items()}
        equal = set(got) == set(want) and all(got[k].dtype == v.dtype and torch.equal(got[k], v)
                                              for k, v in want.items())
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        print(f"image: {image}")
        print(f"listed: {said['files']}; pulled: {said['pulled']}")
        print(f"tensors: {sorted(got)}; equal to the files: {equal}; {size / 1e6:.1f} MB of safetensors")
        print(f"in-image list + pull + stream: {said['seconds']:.2f} s; docker run with vLLM's imports: {wall:.1f} s")
        return 0 if equal else 1
    finally:
        moto.terminate()
        moto.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/vllm_s3_stream.py IMAGE")
    sys.exit(main(sys.argv[1]))
